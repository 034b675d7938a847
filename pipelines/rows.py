"""The corpus row format that every reader yields (`pipelines.readers`): its schema, the blocks a
part's rows are collected into, and how one sample becomes a row, or a reject by reason.

    key      stable id of the sample (see `pipelines.readers`)
    image    encoded image bytes
    caption  caption bytes as stored (decoded and validated by preprocessing)
    part, index, part_rows, reject_reason: bookkeeping; each part ends with an end row (index -1)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.rejects import FILE_TOO_LARGE, MISSING_CAPTION, MISSING_IMAGE

if TYPE_CHECKING:
    from pipelines.readers import Part

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("caption", pa.binary()), ("part", pa.string()),
    ("index", pa.int64()), ("part_rows", pa.int64()), ("reject_reason", pa.string()),
])


class Rows:
    """Collects rows of one part into blocks of `block_rows`, or fewer once they hold `block_bytes`
    of images and captions: a worker holds a block (and builds its table beside it), so photos of
    tens of MB must not make a block of GBs."""

    def __init__(self, part: Part, block_rows: int, images: bool = True, max_bytes: int | None = None,
                 block_bytes: int | None = None):
        self.part, self.block_rows, self.images, self.count = part, block_rows, images, 0
        self.max_bytes, self.block_bytes, self.held = max_bytes, block_bytes, 0
        self.cols: dict[str, list] = {n: [] for n in ROW_SCHEMA.names}

    def add(self, key: str, image: bytes, caption: bytes | None, reason: str = "") -> pa.Table | None:
        for name, value in zip(ROW_SCHEMA.names, (key, image, caption or b"", self.part.id,
                                                  self.count, -1, reason)):
            self.cols[name].append(value)
        self.count += 1
        self.held += len(image) + len(caption or b"")
        full = len(self.cols["key"]) >= self.block_rows
        return self.flush() if full or (self.block_bytes is not None and self.held >= self.block_bytes) else None

    def flush(self) -> pa.Table | None:
        if not self.cols["key"]:
            return None
        table = pa.table(self.cols, schema=ROW_SCHEMA)
        self.cols, self.held = {n: [] for n in ROW_SCHEMA.names}, 0
        return table

    def end(self) -> pa.Table:
        return pa.table({"key": [""], "image": [b""], "caption": [b""], "part": [self.part.id],
                         "index": [-1], "part_rows": [self.count], "reject_reason": [""]},
                        schema=ROW_SCHEMA)


UNREAD = b"\x01"  # captions only: an image is there, its bytes are not read (nor kept)
TOO_LARGE = object()  # a tar member over max_file_bytes, not read


def caption_bytes(text: str) -> bytes:
    """UTF-8 of a caption decoded with surrogateescape (the original bytes come back). A lone
    surrogate that came from elsewhere (a JSON escape such as "\\ud800") is kept as the invalid
    UTF-8 it is, so preprocessing counts it as `caption_not_utf8` instead of the job failing."""
    try:
        return text.encode("utf-8", errors="surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", errors="surrogatepass")


def add_sample(rows: Rows, key: str, image: bytes | None, caption: str | bytes | None,
         reason: str = "") -> pa.Table | None:
    caption = caption_bytes(caption) if isinstance(caption, str) else caption
    # An empty file is there: decoding calls it corrupt_image.
    reason = reason or (MISSING_IMAGE if image is None else MISSING_CAPTION if caption is None else "")
    if not reason and rows.max_bytes is not None and max(len(image), len(caption)) > rows.max_bytes:
        reason = FILE_TOO_LARGE  # a Parquet value (files and tar members are not even read)
    return rows.add(key, (image or b"") if rows.images and not reason else b"", caption, reason)


def accepted(batch: pa.Table) -> pa.ChunkedArray:
    """Which rows are data that no stage rejected (not end rows, no reject reason): the one filter
    that tokenization's model UDFs and training's image data apply."""
    return pc.and_(pc.equal(batch["part_rows"], -1), pc.equal(batch["reject_reason"], ""))
