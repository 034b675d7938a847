"""The captions file of a folder corpus (`captions.jsonl` / `captions.csv`, or
`reader.captions_file`): one record per image, its path relative to the folder and its caption.

Only text is a caption: a null or absent caption is a missing caption, and a list, number or object
is a counted reject (`caption_not_text`), never its repr stored as text. The file's leading UTF-8
BOM is dropped (a caption's own, preprocessing drops). A line that is not a JSON object fails
planning, naming the file and line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator

from muse import storage
from pipelines.config import ReaderConfig

CAPTION_NOT_TEXT = "caption_not_text"


def inline_caption(value: object) -> tuple[str | None, str]:
    """(caption, reader reject reason) of a captions-file value. Only text is a caption: null or
    absent is a missing caption, and a list or number is refused (not stored as its repr)."""
    if value is None or isinstance(value, str):
        return value, ""
    return None, CAPTION_NOT_TEXT


def captions_table(root: str, cfg: ReaderConfig) -> dict[str, object] | None:
    """{relative image path: caption value as stored} from the captions JSONL/CSV, or None for
    sidecar captions. A malformed line fails planning, naming the file and line. The file is read
    whole, on the driver: ~300 bytes per image."""
    source = cfg.captions_file
    if source is None:
        source = next((name for name in ("captions.jsonl", "captions.csv")
                       if storage.exists(storage.join(root, name))), None)
    if source is None:
        return None
    path = source if "://" in source or source.startswith("/") else storage.join(root, source)
    text = storage.read_bytes(path).decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
    if path.endswith(".jsonl") or path.endswith(".json"):
        records = _jsonl_records(path, text)
    else:
        reader = csv.DictReader(io.StringIO(text))
        records = ((reader.line_num, r) for r in reader)
    table: dict[str, object] = {}
    has_captions = False
    for line, r in records:
        if r.get(cfg.file_field) is None:
            raise ValueError(f"{path}, line {line}: no {cfg.file_field!r} (reader.file_field); "
                             f"got {sorted(map(str, r))}")
        has_captions = has_captions or cfg.caption_field in r
        table[str(r[cfg.file_field]).removeprefix("./")] = r.get(cfg.caption_field)
    if table and not has_captions:
        raise ValueError(f"{path}: no record has {cfg.caption_field!r} (reader.caption_field)")
    return table


def _jsonl_records(path: str, text: str) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {n}: a record must be a JSON object, got {type(record).__name__}")
        yield n, record
