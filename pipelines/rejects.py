"""What tokenization turns away, in one place.

A *reject* is one sample that cannot be used: it is counted by reason (in the manifest, `rejects.json`
and `manifest.json`) and the job goes on. `REASONS` lists every reason; docs/tokenization.md explains
each. A *refusal* (`CorpusRefused`) is the whole corpus or job, refused with a message before any
work: a Parquet column of the wrong type, a malformed captions file, an output inside its input.
"""

from __future__ import annotations

# Found by the readers (and at planning, from the listing).
MISSING_IMAGE = "missing_image"  # no image: none in the sample, a null value, a dangling symlink
MISSING_CAPTION = "missing_caption"
CAPTION_NOT_TEXT = "caption_not_text"  # a captions-file or tar .json caption that is a list, number or object, or no JSON
FILE_TOO_LARGE = "file_too_large"  # over reader.max_file_bytes: never read
UNREADABLE_SOURCE = "unreadable_source"  # a Parquet file or tar that is itself corrupt
PERMISSION_DENIED = "permission_denied"  # a local file this user may not read (S3's AccessDenied stops the job)
# Found by preprocessing.
CAPTION_NOT_UTF8 = "caption_not_utf8"
EMPTY_CAPTION = "empty_caption"
OUT_OF_MEMORY = "out_of_memory"
# Decoding's (muse.data.images's: the library cannot import this package, and planning need not
# import its image stack).
IMAGE_REASONS = ("corrupt_image", "too_small", "too_many_pixels")

REASONS = (MISSING_IMAGE, MISSING_CAPTION, CAPTION_NOT_TEXT, FILE_TOO_LARGE, UNREADABLE_SOURCE, PERMISSION_DENIED,
           CAPTION_NOT_UTF8, EMPTY_CAPTION, OUT_OF_MEMORY, *IMAGE_REASONS)


class CorpusRefused(ValueError):
    """The corpus (or where its output goes, or what it would run with: a model, the cluster) cannot
    be tokenized as given; nothing was done. The command line prints it as a usage error (exit 2)."""
