"""WebDataset tars: consecutive members sharing a key (the path up to the first dot of the file name)
form a sample, unless several of its stems (names up to the last dot) each hold an image and a caption:
a plain tar of dotted photo names (`IMG.2021.jpg`, `IMG.2022.jpg`), which then splits into a sample
per stem. Read as one stream: members that are neither image nor caption are skipped unread, and so
are members over `reader.max_file_bytes`.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pyarrow as pa

from muse import storage
from pipelines.captions_file import inline_caption
from pipelines.config import ReaderConfig
from pipelines.rejects import CAPTION_NOT_TEXT, CAPTION_NOT_UTF8, FILE_TOO_LARGE
from pipelines.rows import TOO_LARGE, UNREAD, Rows, add_sample

if TYPE_CHECKING:
    from pipelines.readers import Part

CAPTION_EXTENSIONS = ("txt", "caption", "json")  # WebDataset members read as captions


def read_tar(part: Part, cfg: ReaderConfig, rows: Rows) -> Iterator[pa.Table | None]:
    """WebDataset: consecutive members sharing a key (path up to the first dot of the basename) form
    a sample; the image is its member with the first of `reader.image_extensions` it has, the caption
    `txt`/`caption`, or `json` with a "caption" (else "text") field. A field whose last suffix is one of these counts
    where no exact one is there (`IMG.2021.jpg` and `IMG.2021.txt`, as plain `tar` packs a folder of
    photos: key `IMG`, fields `2021.jpg` and `2021.txt`). A key whose members hold an image and a
    caption under more than one stem is such a folder of photos, not one sample: see `_split`."""
    fs, path = storage.filesystem(part.uri)
    exts = tuple(cfg.image_extensions)
    wanted = set(exts) | set(CAPTION_EXTENSIONS)
    seen: set[str] = set()
    with fs.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        key, sample = None, {}
        for member in tar:
            if not member.isfile():
                continue
            dirname, base = posixpath.split(member.name)
            if base.startswith("."):
                continue
            stem, _, ext = base.partition(".")
            member_key = posixpath.join(dirname, stem)
            # A field the sample already holds starts a sample of the same key (tars appended with `tar -r`
            # or concatenated): it is kept, under a key made unique, not written over the first.
            if key is not None and (member_key != key or ext in sample):
                for sub_key, sub in _split(key, sample, exts):
                    yield _tar_sample(rows, part, sub_key, sub, exts, seen)
                sample = {}
            key, field = member_key, ext  # case kept for split keys; matched in lower case
            last = field.rpartition(".")[2].lower()
            if last not in wanted:
                continue  # neither image nor caption (.mp4, .npy): never read, the stream skips it
            if not rows.images and last in exts:
                sample[field] = UNREAD
                continue
            if rows.max_bytes is not None and member.size > rows.max_bytes:
                sample[field] = TOO_LARGE  # never read: the stream skips it
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"{member.name}: truncated ({len(data)} of {member.size} bytes)")
            sample[field] = data
        if key is not None:
            for sub_key, sub in _split(key, sample, exts):
                yield _tar_sample(rows, part, sub_key, sub, exts, seen)


def _split(key: str, sample: dict[str, bytes],
           exts: tuple[str, ...]) -> list[tuple[str, dict[str, bytes]]]:
    """The samples of one key's members, fields in lower case. One, as WebDataset means it (`a.jpg`,
    `a.seg.png`, `a.txt`), unless more than one stem holds both an image and a caption: then each stem
    is a sample keyed by itself (`IMG.2021`, `IMG.2022`), as a folder of those files would be, so no
    image is merged away uncounted. Stems are fixed by the member names, so keys stay stable."""
    stems: dict[str, dict[str, bytes]] = {}
    for field, value in sample.items():
        rest, _, last = field.rpartition(".")
        stems.setdefault(rest, {})[last.lower()] = value
    complete = [s for s in stems.values()
                if any(f in exts for f in s) and any(f in CAPTION_EXTENSIONS for f in s)]
    if len(complete) < 2:
        return [(key, {field.lower(): value for field, value in sample.items()})]
    return [(f"{key}.{rest}" if rest else key, fields) for rest, fields in stems.items()]


def _tar_sample(rows: Rows, part: Part, key: str, sample: dict[str, bytes], exts: tuple[str, ...],
                seen: set[str]) -> pa.Table | None:
    # tarfile decodes a member name that is not UTF-8 with surrogateescape: show its bytes instead
    key = key.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="backslashreplace")
    name = f"{part.uri}#{key}"
    if name in seen:  # a key repeated later in the tar: keep keys unique
        name = f"{name}#{rows.count}"
    seen.add(name)
    if any(v is TOO_LARGE for v in sample.values()):
        return rows.add(name, b"", b"", FILE_TOO_LARGE)
    image = _field(sample, exts)
    caption, reason = _field(sample, ("txt", "caption")), ""
    described = _field(sample, ("json",)) if caption is None else None
    if described is not None:
        try:
            meta = json.loads(described)
        except UnicodeError:
            meta, reason = None, CAPTION_NOT_UTF8
        except json.JSONDecodeError:
            meta, reason = None, CAPTION_NOT_TEXT
        if not reason:
            value = meta.get("caption") if isinstance(meta, dict) else None
            value = meta.get("text") if value is None and isinstance(meta, dict) else value
            caption, reason = inline_caption(value)
    return add_sample(rows, name, image, caption, reason if image is not None else "")


def _field(sample: dict[str, bytes], names: tuple[str, ...]) -> bytes | None:
    """A sample's member for the first of the fields `names` it has, else the first member whose
    field's last suffix is one of them."""
    exact = next((sample[n] for n in names if n in sample), None)
    if exact is not None:
        return exact
    return next((v for k, v in sample.items() if "." in k and k.rpartition(".")[2] in names), None)
