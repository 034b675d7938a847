"""The captions file of a folder corpus (`captions.jsonl` / `captions.csv`, or
`reader.captions_file`): one record per image, its path relative to the folder and its caption.

Only text is a caption: a null or absent caption is a missing caption, and a list, number or object
is a counted reject (`caption_not_text`), never its repr stored as text. The file's leading UTF-8
BOM is dropped (a caption's own, preprocessing drops). A line that is not a JSON object fails
planning, naming the file and line. When a path is listed twice, its last record counts.

The file is streamed once, a chunk at a time, into an index on the driver's local disk (SQLite, in
a temporary folder under `TMPDIR`, about the file's size, deleted when planning ends), and looked up
a part at a time: the driver's memory stays bounded however many images the file lists.
"""

from __future__ import annotations

import csv
import json
import os
import posixpath
import shutil
import sqlite3
import tempfile
from collections.abc import Callable, Iterable, Iterator
from itertools import islice

from muse import storage
from pipelines.config import ReaderConfig
from pipelines.rejects import CAPTION_NOT_TEXT, CorpusRefused
INSERT_BATCH = 10_000
LOOKUP_BATCH = 900  # bound parameters per query, under SQLite's oldest limit (999)


def inline_caption(value: object) -> tuple[str | None, str]:
    """(caption, reader reject reason) of a captions-file value. Only text is a caption: null or
    absent is a missing caption, and a list or number is refused (not stored as its repr)."""
    if value is None or isinstance(value, str):
        return value, ""
    return None, CAPTION_NOT_TEXT


def _blob(text: str) -> bytes:
    # Lone surrogates (a JSON "\ud800", undecodable bytes) survive the round trip, so preprocessing
    # can reject them by reason; SQLite's own text encoding would refuse them.
    return text.encode("utf-8", "surrogatepass")


def _text(blob: bytes) -> str:
    return blob.decode("utf-8", "surrogatepass")


class CaptionsIndex:
    """A captions file indexed by image path. `lookup(paths)` gives each image's (caption, reject
    reason): its own record, else a record for its file name alone, else a missing caption."""

    def __init__(self, path: str, cfg: ReaderConfig, progress: Callable[[int], None] | None = None):
        self.folder = tempfile.mkdtemp(prefix="muse-captions-")
        try:
            self.db = sqlite3.connect(os.path.join(self.folder, "captions.db"))
            for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-65536"):  # 64 MB cache
                self.db.execute(f"PRAGMA {pragma}")
            self.db.execute("CREATE TABLE captions (path BLOB PRIMARY KEY, is_text INTEGER, caption BLOB) "
                            "WITHOUT ROWID")
            self.records = self._load(path, cfg, progress)
        except BaseException:
            self.close()
            raise

    def _load(self, path: str, cfg: ReaderConfig, progress: Callable[[int], None] | None) -> int:
        lines = _lines(path)
        records = _jsonl_records(path, lines) if path.endswith((".jsonl", ".json")) else _csv_records(lines)
        count, has_captions = 0, False
        while batch := list(islice(records, INSERT_BATCH)):
            rows = []
            for line, r in batch:
                if r.get(cfg.file_field) is None:
                    raise CorpusRefused(f"{path}, line {line}: no {cfg.file_field!r} (reader.file_field); "
                                     f"got {sorted(map(str, r))}")
                has_captions = has_captions or cfg.caption_field in r
                value = r.get(cfg.caption_field)
                caption, reason = inline_caption(value)
                rows.append((_blob(str(r[cfg.file_field]).removeprefix("./")), not reason,
                             None if caption is None else _blob(caption)))
            self.db.executemany("INSERT OR REPLACE INTO captions VALUES (?, ?, ?)", rows)
            count += len(batch)
            if progress is not None:
                progress(count)
        if count and not has_captions:
            raise CorpusRefused(f"{path}: no record has {cfg.caption_field!r} (reader.caption_field)")
        self.db.commit()
        return count

    def lookup(self, paths: list[str]) -> list[tuple[str | None, str]]:
        found = self._find(paths)
        by_name = self._find([posixpath.basename(p) for p in paths if p not in found])
        missing = (None, "")
        return [found.get(p) or by_name.get(posixpath.basename(p), missing) for p in paths]

    def _find(self, paths: list[str]) -> dict[str, tuple[str | None, str]]:
        found = {}
        for start in range(0, len(paths), LOOKUP_BATCH):
            keys = [_blob(p) for p in paths[start:start + LOOKUP_BATCH]]
            query = f"SELECT path, is_text, caption FROM captions WHERE path IN ({', '.join('?' * len(keys))})"
            for key, is_text, caption in self.db.execute(query, keys):
                found[_text(key)] = ((None, CAPTION_NOT_TEXT) if not is_text
                                     else (None if caption is None else _text(caption), ""))
        return found

    def close(self) -> None:
        if getattr(self, "db", None) is not None:
            self.db.close()
            self.db = None
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> CaptionsIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


CAPTIONS_FILE_NAMES = ("captions.jsonl", "captions.csv")  # looked for in the folder, in this order


def captions_file(root: str, cfg: ReaderConfig) -> str | None:
    """The folder's captions file (`reader.captions_file`, relative to the folder or a full URI, or
    `captions.jsonl` / `captions.csv` in the folder), or None for sidecar captions. A captions file
    named but not there is refused."""
    source = cfg.captions_file
    if source is None:
        source = next((name for name in CAPTIONS_FILE_NAMES
                       if storage.exists(storage.join(root, name))), None)
        return None if source is None else storage.join(root, source)
    path = source if "://" in source or source.startswith("/") else storage.join(root, source)
    if not storage.exists(path):  # a typo in the config: one line, not pyarrow's traceback
        raise CorpusRefused(f"reader.captions_file {source!r}: no such file ({path})")
    return path


def _lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line with its ending) of the file, streamed; undecodable bytes are kept as
    surrogates (preprocessing rejects them by reason), the leading BOM dropped."""
    def decoded(line: bytes, n: int) -> str:
        text = line.decode("utf-8", errors="surrogateescape")
        return text.removeprefix("\ufeff") if n == 1 else text

    unfinished: list[bytes] = []  # the pieces of a line that spans chunks
    n = 0
    for chunk in storage.read_chunks(path):
        *lines, rest = chunk.split(b"\n")
        if lines:
            lines[0] = b"".join([*unfinished, lines[0]])
            unfinished = []
        for line in lines:
            n += 1
            yield n, decoded(line, n) + "\n"
        unfinished.append(rest)
    if last := b"".join(unfinished):
        yield n + 1, decoded(last, n + 1)


def _jsonl_records(path: str, lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
    for n, line in lines:
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise CorpusRefused(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise CorpusRefused(f"{path}, line {n}: a record must be a JSON object, got {type(record).__name__}")
        yield n, record


def _csv_records(lines: Iterable[tuple[int, str]]) -> Iterator[tuple[int, dict]]:
    reader = csv.DictReader(line for _, line in lines)  # a quoted field may span lines
    return ((reader.line_num, r) for r in reader)
