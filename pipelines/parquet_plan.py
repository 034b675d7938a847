"""Planning a Parquet corpus: parts are runs of whole row groups (`pipelines.readers.plan_parts`
names them), so no row group is downloaded by two parts, and the columns' types are checked from the
footers before any work."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pyarrow as pa
import pyarrow.parquet as pq

from muse import storage
from pipelines.config import ReaderConfig
from pipelines.rejects import CorpusRefused


def row_group_parts(files: list[str], cfg: ReaderConfig, is_bad_source,
                    read: Callable[[int], None] | None = None) -> list[tuple[str, int, int | None]]:
    """(file, start row, stop row) of every part of the Parquet files: runs of whole row groups, as
    many as fit in `rows_per_part`; (file, 0, None) for a file whose footer cannot be read (the
    part reports it). Footers are read 16 at a time, `read(footers so far)` called as they come;
    columns and their types are checked before any work."""
    def rows(f: str) -> tuple[list[int] | None, pa.Schema | Exception]:
        """(rows of each row group, Arrow schema), from the footer; (None, why) for a bad file."""
        try:
            fs, path = storage.filesystem(f)
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            return groups, meta.schema.to_arrow_schema()
        except Exception as e:
            if not is_bad_source(e):
                raise
            return None, e

    infos = []
    with ThreadPoolExecutor(16) as pool:
        for info in pool.map(rows, files):
            infos.append(info)
            if read is not None:
                read(len(infos))
    _check_columns(files, [schema for _, schema in infos], cfg)
    parts = []
    for f, (groups, _) in zip(files, infos):
        if groups is None:  # unreadable footer: one part that reports it
            parts.append((f, 0, None))
            continue
        parts += [(f, start, stop) for start, stop in _row_group_runs(groups, cfg.rows_per_part)]
    return parts


def _check_columns(files: list[str], schemas: list[pa.Schema | Exception], cfg: ReaderConfig) -> None:
    """Refuse, before any work, a corpus of no readable file, and any file without both columns:
    read, each would be one `unreadable_source` reject for all its rows. Then check their types."""
    bad = [(f, s) for f, s in zip(files, schemas) if isinstance(s, Exception)]
    if files and len(bad) == len(files):
        f, e = bad[0]
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        why = (str(e).splitlines() or [""])[0]
        raise CorpusRefused(f"no Parquet file could be read: {f}{more} ({type(e).__name__}: {why}); "
                            "are they Parquet files, written whole?")
    wanted = [cfg.image_column, cfg.caption_column]
    lacking = [(f, s) for f, s in zip(files, schemas)
               if isinstance(s, pa.Schema) and not set(wanted) <= set(s.names)]
    if lacking:
        f, schema = lacking[0]
        missing = " and no ".join(repr(c) for c in wanted if c not in schema.names)
        names = schema.names if len(schema.names) <= 12 else [*schema.names[:12], "..."]
        more = f"; {len(lacking) - 1} more file(s) lack them too" if len(lacking) > 1 else ""
        raise CorpusRefused(f"{f} has no {missing} column (reader.image_column / reader.caption_column); "
                            f"its columns: {names}{more}")
    for f, schema in zip(files, schemas):
        if isinstance(schema, pa.Schema):
            _check_column_types(f, schema, cfg)


_BYTES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
_TEXT = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)


def _is(t: pa.DataType, kinds) -> bool:
    """Whether `t`, or the values of a dictionary-encoded `t` (pandas' category), is one of `kinds`."""
    t = t.value_type if pa.types.is_dictionary(t) else t
    return any(k(t) for k in kinds)


def _check_column_types(f: str, schema: pa.Schema, cfg: ReaderConfig) -> None:
    """Refuse, before any work, columns that every row of the file would fail on (or, for URLs,
    be rejected for): a whole-job problem, not a sample's. A column of nulls only (pandas writes an
    all-None column so) is every row's reject, not a refusal."""
    image, caption = schema.field(cfg.image_column).type, schema.field(cfg.caption_column).type
    if not pa.types.is_null(image):
        _check_image_type(f, image, cfg.image_column)
    if pa.types.is_null(caption):
        return
    if pa.types.is_list(caption) or pa.types.is_large_list(caption):
        raise CorpusRefused(f"{f}: caption column {cfg.caption_column!r} holds lists ({caption}), several captions "
                            "per image; tokenization takes one: write one row per caption, or pick one")
    if not _is(caption, _TEXT + _BYTES):
        raise CorpusRefused(f"{f}: caption column {cfg.caption_column!r} has type {caption}; it must be string "
                            "or binary")


def _check_image_type(f: str, image: pa.DataType, column: str) -> None:
    if _is(image, _TEXT):
        raise CorpusRefused(f"{f}: image column {column!r} holds strings ({image}), e.g. image URLs "
                            "or paths; muse tokenize reads encoded image bytes and does not fetch URLs: "
                            "download the images first (into this column as bytes, or a folder or tars)")
    if pa.types.is_struct(image):
        field = image.get_field_index("bytes")
        if field < 0 or not _is(image.field(field).type, _BYTES):
            raise CorpusRefused(f"{f}: image column {column!r} is a struct ({image}) without a binary "
                                "'bytes' field (as Hugging Face datasets stores an Image feature)")
    elif not _is(image, _BYTES):
        raise CorpusRefused(f"{f}: image column {column!r} has type {image}; it must hold encoded "
                            "image bytes (binary), or be a struct with a 'bytes' field")


def _row_group_runs(groups: list[int], rows_per_part: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of consecutive whole row groups, each as many as fit in
    `rows_per_part` (a larger group is a part of its own); one empty range for an empty file."""
    runs, start, stop = [], 0, 0
    for n in groups:
        if stop > start and stop - start + n > rows_per_part:
            runs.append((start, stop))
            start = stop
        stop += n
    if stop > start or not runs:
        runs.append((start, stop))
    return runs
