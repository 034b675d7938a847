"""Data helpers with no Ray in them: the built-in synthetic captioned-shapes corpus
(`muse.data.synthetic`) and robust image decoding / tensor conversion (`muse.data.images`)."""

# How a corpus is stored; the tokenize job's readers (pipelines.readers) read each, and "auto" tells them apart.
CORPUS_FORMATS = ("parquet", "folder", "webdataset")
