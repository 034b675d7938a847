"""Corpus readers: Parquet, image folders and WebDataset tars, local, file:// or s3://, as Ray Data.

A corpus is cut into *parts* on the driver (`plan_parts`): a run of whole row groups of a Parquet
file (as many as fit in `rows_per_part`, at least one, so no row group is downloaded by two parts),
a `rows_per_part` run of a folder's sorted images, or one tar. A part has an id derived only
from where it comes from, is read by one Ray read task (or by the CPU actor that tokenizes it:
`part_list`), and becomes one output shard, so a re-run can skip every finished part without
opening it.

A read task yields rows with the corpus columns

    key      stable id: the source URI + "#" + row index (Parquet), + "#" + sample key (tar),
             or the image URI itself (folder)
    image    encoded image bytes
    caption  caption bytes as stored (decoded and validated by preprocessing, so a bad encoding
             is a counted reject rather than a crash)

and the bookkeeping columns `part`, `index` (row number in the part), `part_rows` (-1 on data rows)
and `reject_reason` ("" or why the reader itself refused the row: missing caption or image, or an
unreadable source). After its rows each task yields one *end row* (`index` -1, `part_rows` = rows in
the part) so whoever consumes the stream knows when a part is complete. A source that is corrupt
(not Parquet, truncated tar, a Parquet file without the configured columns) never fails the job: the
rows read so far are kept and one `unreadable_source` row records it. Storage errors raise: each S3
request is retried with backoff by the filesystem, then the task by Ray (`io_task_retries`; a CPU
actor redoes the part). Any other error is a bug and fails the job.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import lzma
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse import storage
from pipelines.config import ReaderConfig

MISSING_CAPTION = "missing_caption"
MISSING_IMAGE = "missing_image"
UNREADABLE_SOURCE = "unreadable_source"

ROW_SCHEMA = pa.schema([
    ("key", pa.string()), ("image", pa.binary()), ("caption", pa.binary()), ("part", pa.string()),
    ("index", pa.int64()), ("part_rows", pa.int64()), ("reject_reason", pa.string()),
])


class BadSource(Exception):
    """The source is readable but not a corpus file of the configured shape."""


# Errors that mean "this file is bad", as opposed to "the store failed" or a bug (which raise).
_BAD_SOURCE = (BadSource, pa.ArrowInvalid, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile,
               lzma.LZMAError, UnicodeDecodeError, json.JSONDecodeError)


def is_bad_source(e: BaseException) -> bool:
    """Whether `e` says that the file itself is bad (permanent: a counted reject). pyarrow reports
    corrupt data inside a file ("Corrupt snappy compressed data") as a bare OSError; storage errors
    carry an errno (local) or an AWS error code (S3), and stay errors."""
    if isinstance(e, _BAD_SOURCE):
        return True
    return type(e) is OSError and e.errno is None and "AWS Error" not in str(e)


@dataclass(frozen=True)
class Part:
    """A unit of reading, tokenizing and publishing. `items` lists a folder part's images as
    (image uri, caption uri or None, inline caption or None)."""

    id: str
    format: str
    uri: str
    start: int = 0
    stop: int | None = None
    items: tuple[tuple[str, str | None, str | None], ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Part:
        d = json.loads(text)
        return cls(**d | {"items": tuple(tuple(item) for item in d["items"])})

    def describe(self) -> dict:
        d = {"part": self.id, "format": self.format, "source": self.uri}
        if self.format == "parquet":
            d |= {"start": self.start, "stop": self.stop}
        elif self.format == "folder":
            d |= {"first": self.items[0][0] if self.items else None, "images": len(self.items)}
        return d


def part_id(*fields: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, fields)).encode()).hexdigest()[:20]


# How part ids name files: "relative" to the corpus (ids, shard names and so training's file order
# are the same wherever the corpus lies), or "absolute" (outputs written before ids were relative,
# which keep their ids so that they resume).
PART_IDS = ("relative", "absolute")


# ---------------------------------------------------------------------------------------------
# Planning (driver).


def detect_format(uri: str, cfg: ReaderConfig, files: list[str] | None = None) -> str:
    """parquet, webdataset or folder, from a file's extension or a directory's contents."""
    files = _input_files(uri) if files is None else files
    exts = {_ext(f) for f in files}
    if "parquet" in exts:
        return "parquet"
    if {"tar", "tgz"} & exts or any(f.endswith(".tar.gz") for f in files):
        return "webdataset"
    if exts & set(cfg.image_extensions):
        return "folder"
    raise ValueError(f"cannot tell the format of {uri}: no .parquet, .tar or image files; pass --format")


def canonical(uri: str) -> str:
    """One spelling per location: absolute, no file:// scheme, no trailing slash. `s3://b/c` and
    `s3://b/c/` (or `/d` and `file:///d/`) name the same corpus, parts and keys."""
    uri = storage.absolute(str(uri)).removeprefix("file://")
    if storage.is_s3(uri):
        return "s3://" + uri[len("s3://"):].rstrip("/")
    return uri.rstrip("/") or "/"


def plan_parts(uri: str, format: str, cfg: ReaderConfig, ids: str = "relative") -> list[Part]:
    """Every part of the corpus at `uri` (a file or a directory), in a deterministic order. Part ids
    hash the files' paths below `uri` (`ids` "relative") or their full spelling ("absolute")."""
    if ids not in PART_IDS:
        raise ValueError(f"ids must be one of {PART_IDS}, got {ids!r}")
    uri = canonical(uri)
    files = _input_files(uri)
    below = uri if files != [uri] else posixpath.dirname(uri)  # a file given alone: its basename

    def named(f: str) -> str:
        return f if ids == "absolute" else _relative(below, f)

    if format == "auto":
        format = detect_format(uri, cfg, files)
    if format == "parquet":
        return _plan_parquet([f for f in files if _ext(f) == "parquet"], cfg, named)
    if format == "webdataset":
        tars = [f for f in files if _ext(f) in ("tar", "tgz") or f.endswith(".tar.gz")]
        return [Part(part_id("webdataset", named(f)), "webdataset", f) for f in tars]
    if format == "folder":
        return _plan_folder(uri, files, cfg, ids)
    raise ValueError(f"unknown format {format!r}")


def _input_files(uri: str) -> list[str]:
    """`uri` itself, or every file below it (one listing)."""
    files = [uri] if not storage.is_dir(uri) else storage.list_files(uri)
    if not files or (len(files) == 1 and not storage.exists(files[0])):
        raise ValueError(f"no input at {uri}")
    return files


def _ext(uri: str) -> str:
    return posixpath.basename(uri).rsplit(".", 1)[-1].lower() if "." in posixpath.basename(uri) else ""


def _plan_parquet(files: list[str], cfg: ReaderConfig, named) -> list[Part]:
    def rows(f: str) -> tuple[list[int] | None, list[str]]:
        """(rows of each row group, column names), from the footer."""
        try:
            fs, path = storage.filesystem(f)
            with fs.open_input_file(path) as fh:
                meta = pq.ParquetFile(fh).metadata
            groups = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
            return groups, meta.schema.to_arrow_schema().names
        except Exception as e:
            if not is_bad_source(e):
                raise
            return None, []

    with ThreadPoolExecutor(16) as pool:
        infos = list(pool.map(rows, files))
    wanted = {cfg.image_column, cfg.caption_column}
    if files and not any(wanted <= set(names) for _, names in infos):
        seen = next((names for n, names in infos if names), [])
        raise ValueError(
            f"no Parquet file has both columns {sorted(wanted)} (reader.image_column / "
            f"reader.caption_column); columns found: {seen}"
        )
    parts = []
    for f, (groups, _) in zip(files, infos):
        if groups is None:  # unreadable footer: one part that reports it
            parts.append(Part(part_id("parquet", named(f), 0, None), "parquet", f))
            continue
        for start, stop in _row_group_runs(groups, cfg.rows_per_part):
            parts.append(Part(part_id("parquet", named(f), start, stop), "parquet", f, start, stop))
    return parts


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


def _plan_folder(uri: str, files: list[str], cfg: ReaderConfig, ids: str) -> list[Part]:
    exts = set(cfg.image_extensions)
    images = [f for f in files if _ext(f) in exts]
    root = uri
    captions = _captions_table(root, files, cfg)
    sidecars = {f for f in files if _ext(f) == "txt"}
    items = []
    for img in images:
        rel = _relative(root, img)
        txt = img.rsplit(".", 1)[0] + ".txt"
        if captions is not None:
            items.append((img, None, captions.get(rel, captions.get(posixpath.basename(rel)))))
        else:
            items.append((img, txt if txt in sidecars else None, None))
    parts = []
    for start in range(0, len(items), cfg.rows_per_part):
        chunk = tuple(items[start:start + cfg.rows_per_part])
        names = [_relative(root, i[0]) for i in chunk]
        pid = part_id("folder", *names) if ids == "relative" else part_id("folder", root, *names)
        parts.append(Part(pid, "folder", root, start, start + len(chunk), chunk))
    return parts


def _relative(root: str, uri: str) -> str:
    """`uri` below `root` (listed from it, so in the same spelling), without building a client."""
    return uri[len(root):].lstrip("/")


def _captions_table(root: str, files: list[str], cfg: ReaderConfig) -> dict[str, str] | None:
    """{relative image path: caption} from the captions JSONL/CSV, or None for sidecar captions."""
    source = cfg.captions_file
    if source is None:
        top = {_relative(root, f) for f in files if posixpath.basename(f).startswith("captions.")}
        source = next((name for name in ("captions.jsonl", "captions.csv") if name in top), None)
    if source is None:
        return None
    path = source if "://" in source or source.startswith("/") else storage.join(root, source)
    text = storage.read_bytes(path).decode("utf-8", errors="surrogateescape")
    if path.endswith(".jsonl") or path.endswith(".json"):
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = list(csv.DictReader(io.StringIO(text)))
    table = {}
    for r in records:
        if cfg.file_field not in r or cfg.caption_field not in r:
            raise ValueError(f"{path}: each record needs {cfg.file_field!r} and {cfg.caption_field!r} "
                             f"(reader.file_field / reader.caption_field); got {sorted(r)}")
        table[str(r[cfg.file_field]).removeprefix("./")] = str(r[cfg.caption_field])
    return table


# ---------------------------------------------------------------------------------------------
# Reading one part (inside a Ray read task, or anywhere).


class _Rows:
    """Collects rows of one part into blocks of `block_rows`."""

    def __init__(self, part: Part, block_rows: int, images: bool = True):
        self.part, self.block_rows, self.images, self.count = part, block_rows, images, 0
        self.cols: dict[str, list] = {n: [] for n in ROW_SCHEMA.names}

    def add(self, key: str, image: bytes, caption: bytes | None, reason: str = "") -> pa.Table | None:
        for name, value in zip(ROW_SCHEMA.names, (key, image, caption or b"", self.part.id,
                                                  self.count, -1, reason)):
            self.cols[name].append(value)
        self.count += 1
        return self.flush() if len(self.cols["key"]) >= self.block_rows else None

    def flush(self) -> pa.Table | None:
        if not self.cols["key"]:
            return None
        table = pa.table(self.cols, schema=ROW_SCHEMA)
        self.cols = {n: [] for n in ROW_SCHEMA.names}
        return table

    def end(self) -> pa.Table:
        return pa.table({"key": [""], "image": [b""], "caption": [b""], "part": [self.part.id],
                         "index": [-1], "part_rows": [self.count], "reject_reason": [""]},
                        schema=ROW_SCHEMA)


def read_part(part: Part, cfg: ReaderConfig, images: bool = True) -> Iterator[pa.Table]:
    """Blocks of corpus rows for `part`, ending with its end row. `images=False` reads the captions
    only (image files and Parquet image columns are not read; the image column stays empty), for what
    needs no pixels, such as fitting a vocabulary."""
    rows = _Rows(part, cfg.block_rows, images)
    reader = {"parquet": _read_parquet, "webdataset": _read_tar, "folder": _read_folder}[part.format]
    try:
        for block in reader(part, cfg, rows):
            if block is not None:
                yield block
    except Exception as e:
        if not is_bad_source(e):
            raise
        rows.add(f"{part.uri}#error", b"", b"", UNREADABLE_SOURCE)
        print(f"[tokenize] unreadable source {part.uri}: {type(e).__name__}: {e}")
    last = rows.flush()
    if last is not None:
        yield last
    yield rows.end()


def _read_parquet(part: Part, cfg: ReaderConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    fs, path = storage.filesystem(part.uri)
    with fs.open_input_file(path) as fh:
        pf = pq.ParquetFile(fh)
        missing = {cfg.image_column, cfg.caption_column} - set(pf.schema_arrow.names)
        if missing:
            raise BadSource(f"no column {sorted(missing)}")
        stop = pf.metadata.num_rows if part.stop is None else part.stop
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > part.start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if not groups:
            return
        row = first
        columns = [cfg.image_column, cfg.caption_column] if rows.images else [cfg.caption_column]
        for batch in pf.iter_batches(batch_size=cfg.block_rows, row_groups=groups, columns=columns):
            images = batch.column(cfg.image_column).to_pylist() if rows.images else [_UNREAD] * batch.num_rows
            captions = batch.column(cfg.caption_column)
            if pa.types.is_string(captions.type) or pa.types.is_large_string(captions.type):
                captions = captions.cast(pa.binary() if pa.types.is_string(captions.type) else pa.large_binary())
            captions = captions.to_pylist()  # bytes: invalid UTF-8 is preprocessing's to count
            for image, text in zip(images, captions):
                if part.start <= row < stop:
                    yield _add(rows, f"{part.uri}#{row}", image, text)
                row += 1


_UNREAD = b"\x01"  # captions only: an image is there, its bytes are not read (nor kept)


def _add(rows: _Rows, key: str, image: bytes | None, caption: str | bytes | None) -> pa.Table | None:
    caption = caption.encode("utf-8", errors="surrogateescape") if isinstance(caption, str) else caption
    reason = MISSING_IMAGE if not image else MISSING_CAPTION if caption is None else ""
    return rows.add(key, (image or b"") if rows.images else b"", caption, reason)


def _read_folder(part: Part, cfg: ReaderConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    for image_uri, caption_uri, inline in part.items:
        image = storage.read_bytes(image_uri) if rows.images else _UNREAD
        if caption_uri is not None:
            caption = storage.read_bytes(caption_uri)
        else:
            caption = inline.encode("utf-8", errors="surrogateescape") if inline is not None else None
        yield _add(rows, image_uri, image, caption)


def _read_tar(part: Part, cfg: ReaderConfig, rows: _Rows) -> Iterator[pa.Table | None]:
    """WebDataset: consecutive members sharing a key (path up to the first dot of the basename) form
    a sample; the image is the first member with an image extension, the caption `txt`/`caption`,
    or `json` with a "caption" or "text" field."""
    fs, path = storage.filesystem(part.uri)
    exts = set(cfg.image_extensions)
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
            if member_key != key and key is not None:
                yield _tar_sample(rows, part, key, sample, exts, seen)
                sample = {}
            key = member_key
            if not rows.images and ext.lower() in exts:
                sample[ext.lower()] = _UNREAD if member.size else b""
                continue
            data = tar.extractfile(member).read()
            if len(data) != member.size:
                raise tarfile.ReadError(f"{member.name}: truncated ({len(data)} of {member.size} bytes)")
            sample[ext.lower()] = data
        if key is not None:
            yield _tar_sample(rows, part, key, sample, exts, seen)


def _tar_sample(rows: _Rows, part: Part, key: str, sample: dict[str, bytes], exts: set[str],
                seen: set[str]) -> pa.Table | None:
    name = f"{part.uri}#{key}"
    if name in seen:  # a key repeated later in the tar: keep keys unique
        name = f"{name}#{rows.count}"
    seen.add(name)
    image = next((v for k, v in sample.items() if k in exts), None)
    caption = sample.get("txt", sample.get("caption"))
    if caption is None and "json" in sample:
        try:
            meta = json.loads(sample["json"])
            text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            caption = text.encode("utf-8") if isinstance(text, str) else None
        except (json.JSONDecodeError, UnicodeDecodeError):
            caption = None
    return _add(rows, name, image, caption)


# ---------------------------------------------------------------------------------------------
# Ray Data.


def corpus_datasource(parts: list[Part], cfg: ReaderConfig, images: bool = True):
    """A Ray Data datasource with one read task per part (`read_part`)."""
    return _part_datasource("Corpus", parts, lambda p: read_part(p, cfg, images), ROW_SCHEMA)


PART_SCHEMA = pa.schema([("part", pa.string())])


def _part_datasource(name: str, parts: list[Part], read, schema: pa.Schema):
    """A Ray Data datasource with one read task per part, yielding the blocks of `read(part)`."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class PartDatasource(Datasource):
        def get_name(self) -> str:
            return name

        def estimate_inmemory_data_size(self) -> int | None:
            return None

        def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
            return [
                ReadTask(lambda p=p: read(p),
                         BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=[p.uri]),
                         schema=schema)
                for p in parts
            ]

    return PartDatasource()


def accepted(batch: pa.Table) -> pa.ChunkedArray:
    """Which rows are data that no stage rejected (not end rows, no reject reason): the one filter
    that tokenization's model UDFs and training's image data apply."""
    return pc.and_(pc.equal(batch["part_rows"], -1), pc.equal(batch["reject_reason"], ""))


def read_parts(parts: list[Part], cfg: ReaderConfig, num_cpus: float = 1.0,
               ray_remote_args: dict | None = None, images: bool = True):
    """Ray Dataset of corpus rows (with bookkeeping columns and end rows) for `parts`."""
    import ray

    return ray.data.read_datasource(corpus_datasource(parts, cfg, images), override_num_blocks=max(1, len(parts)),
                                    num_cpus=num_cpus, ray_remote_args=ray_remote_args)


def part_list(parts: list[Part], *, num_cpus: float, num_gpus: float, memory: float):
    """Ray Dataset of one row per part, its `Part.to_json` (column `part`), for a pool that reads its
    parts itself: given the pool's resources, Ray Data fuses these reads into the pool, so nothing is
    read twice and no process of its own starts (`pipelines.models.PartTokens`)."""
    import ray

    def describe(part: Part) -> Iterator[pa.Table]:
        yield pa.table({"part": [part.to_json()]}, schema=PART_SCHEMA)

    return ray.data.read_datasource(_part_datasource("Parts", parts, describe, PART_SCHEMA),
                                    override_num_blocks=max(1, len(parts)), num_cpus=num_cpus,
                                    num_gpus=num_gpus, memory=memory)


def read_corpus(uri: str, format: str = "auto", cfg: ReaderConfig | None = None, images: bool = True):
    """Ray Dataset of the corpus at `uri`: one row per readable sample, columns key, image, caption
    (bytes). Rows the reader refused (no caption, no image, unreadable file) are left out. With
    `images=False` the image column is empty and no image is read (see `read_part`)."""
    cfg = cfg or ReaderConfig()
    parts = plan_parts(uri, format, cfg)

    def keep(batch: pa.Table) -> pa.Table:
        return batch.filter(accepted(batch)).select(["key", "image", "caption"])

    return read_parts(parts, cfg, images=images).map_batches(keep, batch_format="pyarrow", batch_size=None)


def sample_captions(uri: str, n: int, format: str = "auto", cfg: ReaderConfig | None = None) -> list[str]:
    """Up to `n` captions of the corpus at `uri`, from its first parts (read by Ray tasks, streamed
    and stopped once `n` are in): what a text encoder's vocabulary is fitted to."""
    rows = read_corpus(uri, format, cfg, images=False).select_columns(["caption"]).limit(n).take_all()
    return [r["caption"].decode("utf-8", errors="replace") for r in rows]
