"""Data helpers with no Ray in them: the built-in synthetic captioned-shapes corpus
(`muse.data.synthetic`) and robust image decoding / tensor conversion (`muse.data.images`)."""
