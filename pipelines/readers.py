"""Corpus readers: Parquet, image folders and WebDataset tars, local, file:// or s3://
(`pipelines.corpus_data` wraps them as Ray Data). A format whose files hold many samples is one
`FileFormat` entry of FILE_FORMATS (at the end of this module): how its files are known, planned and
read. Any other listed file of an image type belongs to a folder corpus.

A corpus is cut into *parts* on the driver (`plan_parts`): a run of whole row groups of a Parquet
file (as many as fit in `rows_per_part`, at least one, so no row group is downloaded by two parts),
a `rows_per_part` run of a folder's sorted images, or one tar. A part has an id derived only
from where it comes from, is read by one Ray read task (or by the CPU actor that tokenizes it:
`corpus_data.part_list`), and becomes one output shard, so a re-run can skip every finished part
without opening it. The listing is streamed, one folder at a time, and a folder part's image list
can live in a plan file instead of the driver's memory (`pipelines.folder_plan`).

A read task yields rows (`pipelines.rows`: the schema, and how a sample becomes a row or a reject;
WebDataset tars are read by `pipelines.webdataset`) with the corpus columns

    key      stable id: the source URI + "#" + row index (Parquet), + "#" + sample key (tar),
             or the image URI itself (folder)
    image    encoded image bytes
    caption  caption bytes as stored (decoded and validated by preprocessing, so a bad encoding
             is a counted reject rather than a crash)

and the bookkeeping columns `part`, `index` (row number in the part), `part_rows` (-1 on data rows)
and `reject_reason` ("" or why the reader itself refused the row: missing caption or image, a
caption that is not text, a file over `max_file_bytes`, which is never read, or an unreadable
source). After its rows each task yields one *end row*
(`index` -1, `part_rows` = rows in the part) so whoever consumes the stream knows when a part is
complete. A source that is corrupt (not Parquet, truncated tar, a Parquet file without the
configured columns) never fails the job: the rows read so far are kept and one `unreadable_source`
row records it. Bad text in one sample (a caption that is not UTF-8 or holds a lone surrogate, a
tar member name that is not UTF-8) is that sample's reject, never the job's failure. Storage errors
raise: each S3 request is retried with backoff by the filesystem, then the task by Ray
(`io_task_retries`; a CPU actor redoes the part). Any other error is a bug and fails the job.

What planning refuses, with a message, before any work: Parquet columns of the wrong type (the image
column must hold bytes, or be a struct with a `bytes` field as Hugging Face `datasets` stores an
Image feature; a string column of URLs is refused, since nothing here downloads; the caption column
must be string or binary, one caption per row), and a captions file with a line that is not a JSON
object (named by file and line).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import posixpath
import tarfile
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse import storage
from pipelines.config import ReaderConfig
from pipelines.folder_plan import PassedOver, PlanSpill, part_items, plan_folder, relative
from pipelines.parquet_plan import row_group_parts
from pipelines.rejects import FILE_TOO_LARGE, PERMISSION_DENIED, UNREADABLE_SOURCE, CorpusRefused
from pipelines.rows import UNREAD, Rows, add_sample
from pipelines.webdataset import read_tar


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
    """A unit of reading, tokenizing and publishing. A folder part's images are `items`, as (image
    uri, caption uri or None, inline caption or None, reject reason found at planning or ""), or,
    planned with a spill folder, in row group `plan_group` of the plan file `plan`
    (`pipelines.folder_plan`); `first` is its first image."""

    id: str
    format: str
    uri: str
    start: int = 0
    stop: int | None = None
    items: tuple[tuple[str, str | None, str | None, str], ...] = ()
    first: str | None = None
    plan: str | None = None
    plan_group: int = 0

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
            d |= {"first": self.first, "images": self.stop - self.start}
        return d

    def folder_items(self) -> tuple[tuple[str, str | None, str | None, str], ...]:
        return self.items if self.plan is None else part_items(self.uri, self.plan, self.plan_group)


def part_id(*fields: object) -> str:
    return hashlib.sha1("\x1f".join(map(str, fields)).encode()).hexdigest()[:20]


# How part ids name files: "relative" to the corpus (ids, shard names and so training's file order
# are the same wherever the corpus lies), or "absolute" (outputs written before ids were relative,
# which keep their ids so that they resume).
PART_IDS = ("relative", "absolute")


# ---------------------------------------------------------------------------------------------
# Planning (driver).


@dataclass(frozen=True)
class FilePlan:
    """What a format's planner is given: its files as listed, in order, and how to name their parts."""

    files: list[str]
    cfg: ReaderConfig
    part_id: Callable[..., str]  # part_id(file, *fields): the id of the part of `file` that `fields` say
    note: Callable[[str], None]  # progress of a long planning (and the driver's heartbeat)


@dataclass(frozen=True)
class FileFormat:
    """A corpus format whose files each hold many samples (Parquet files, tars): how the listing knows
    its files, how they are cut into parts, and how a part is read into rows (`pipelines.rows`). Every
    other file of an image type is a folder corpus's image. Adding a reader is its module and one
    entry in FILE_FORMATS."""

    found: str  # what the listing counts, in messages: "Parquet files"
    extensions: tuple[str, ...]  # of its files, lower case, without the dot ("tar.gz" too)
    plan: Callable[[FilePlan], list[Part]]
    read: Callable[[Part, ReaderConfig, Rows], Iterator[pa.Table | None]]


def _plan_parquet(plan: FilePlan) -> list[Part]:
    def footers(n: int) -> None:
        if n % LISTED_NOTE == 0:
            plan.note(f"{n} of {len(plan.files)} Parquet footers read")

    return [Part(plan.part_id(f, start, stop), "parquet", f, start, stop)
            for f, start, stop in row_group_parts(plan.files, plan.cfg, is_bad_source, footers)]


def _plan_tars(plan: FilePlan) -> list[Part]:
    return [Part(plan.part_id(f), "webdataset", f) for f in plan.files]


def formats() -> tuple[str, ...]:
    """What `--format` takes: "auto" (told from the files) and every reader's name."""
    return ("auto", *FILE_FORMATS, FOLDER)


def _by_extension() -> dict[str, list[tuple[str, str]]]:
    """Last extension -> [(format, whole extension)]: one dict lookup per listed file."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, fmt in FILE_FORMATS.items():
        for whole in fmt.extensions:
            found.setdefault(whole.rpartition(".")[2], []).append((name, whole))
    return found


def _claimed_by(uri: str, ext: str, by_extension: dict[str, list[tuple[str, str]]]) -> str | None:
    """The format whose file `uri` (last extension `ext`) is, if any."""
    for name, whole in by_extension.get(ext, ()):
        if whole == ext or uri.lower().endswith("." + whole):
            return name
    return None


def _format(uri: str, files: dict[str, list[str]], images: bool, others: str | None = None) -> str:
    """What a corpus is, from what it holds: the first of FILE_FORMATS with files, else a folder."""
    name = next((name for name, found in files.items() if found), None)
    if name is not None:
        return name
    if images:
        return FOLDER
    raise CorpusRefused(f"cannot tell the format of {uri}: no {', '.join(f.found for f in FILE_FORMATS.values())} "
                        f"or image files{' (it holds ' + others + ')' if others else ''}; pass --format")


def canonical(uri: str) -> str:
    """One spelling per location: absolute, no file:// scheme, no trailing slash. `s3://b/c` and
    `s3://b/c/` (or `/d` and `file:///d/`) name the same corpus, parts and keys."""
    uri = storage.absolute(str(uri)).removeprefix("file://")
    if storage.is_s3(uri):
        return "s3://" + uri[len("s3://"):].rstrip("/")
    return uri.rstrip("/") or "/"


class NoInput(FileNotFoundError):
    """Nothing to read at the corpus's URI: no file, or a folder with none in it."""


def plan_parts(uri: str, format: str, cfg: ReaderConfig, ids: str = "relative", spill: str | None = None,
               progress: Callable[..., None] | None = None, max_images: int | None = None,
               folder_cuts: str = "names", sizes: bool = True, not_read: list[str] | None = None) -> list[Part]:
    """Every part of the corpus at `uri` (a file or a directory), in a deterministic order. Part ids
    hash the files' paths below `uri` (`ids` "relative") or their full spelling ("absolute"), and
    with `sizes` the files' sizes as listed, so that a file rewritten under its name with another
    size (an image replaced, a sidecar caption edited, a Parquet file or tar written again) changes
    the id of the part that reads it. Outputs tokenized before sizes were covered plan without them.

    The listing is streamed (`storage.iter_files`). A folder corpus's image lists go to plan files in
    the folder `spill` when one is given (`pipelines.folder_plan`), so the driver holds ~200 bytes
    per part rather than ~630 per image. `progress(images, parts)` follows a folder's planning, and
    `progress(0, 0, note=...)` a listing of Parquet files or tars and the reading of their footers
    (every LISTED_NOTE files). A `format` that finds nothing it reads where other files are is
    refused (`NoInput`), and so is a corpus whose format cannot be told.
    `max_images` plans only a folder corpus's first parts, up to that many images (its listing stops
    there: a sample of a huge folder neither lists nor holds the rest). A folder corpus is cut by
    names, or by count for outputs tokenized before (`folder_plan.plan_folder`'s `cuts`).
    What the listing passed over (files of other types, folders this user may not list) is said in a
    `[corpus] ... not read:` line, and appended to `not_read` when given, for the job's summary."""
    if ids not in PART_IDS:
        raise ValueError(f"ids must be one of {PART_IDS}, got {ids!r}")
    if format not in formats():
        raise ValueError(f"unknown format {format!r}")
    uri = canonical(uri)
    alone = not storage.is_dir(uri)
    below = posixpath.dirname(uri) if alone else uri  # a file given alone: its basename

    def named(f: str) -> str:
        return f if ids == "absolute" else relative(below, f)

    files: dict[str, list[str]] = {name: [] for name in FILE_FORMATS}  # each format's files, as listed
    file_sizes, listed, image_files, by_extension = {}, 0, 0, _by_extension()
    passed_over = PassedOver(uri, cfg.image_extensions, cfg.captions_file)

    def note(text: str) -> None:
        if progress is not None:
            progress(0, 0, note=text)

    def images() -> Iterator[storage.Listed]:
        """The image files of the listing; the other formats' files met on the way are noted."""
        nonlocal listed, image_files
        for f in storage.iter_files(uri, unlisted=passed_over.unlisted):
            listed += 1
            ext = _ext(f.uri)
            if (claimed := _claimed_by(f.uri, ext, by_extension)) is not None:
                files[claimed].append(f.uri)
                file_sizes[f.uri] = f.size
                if sum(map(len, files.values())) % LISTED_NOTE == 0:
                    note(" and ".join(f"{len(files[n])} {fmt.found}" for n, fmt in FILE_FORMATS.items()) + " listed")
            elif ext in cfg.image_extensions:
                image_files += 1
                if format in ("auto", FOLDER):
                    yield f
            elif format in ("auto", FOLDER):
                passed_over.add(f, ext)

    def make_part(first: str, chunk: tuple, start: int, names: list[str], captions: str | None,
                  part_sizes: list[str]) -> Part:
        fields = [*names, f"captions {captions}"] if captions else names
        if sizes:
            fields = [*fields, "sizes " + " ".join(part_sizes)]
        pid = part_id(FOLDER, *fields) if ids == "relative" else part_id(FOLDER, uri, *fields)
        return Part(pid, FOLDER, uri, start, start + len(chunk), chunk, first=first)

    folder = plan_folder(uri, images(), cfg.rows_per_part, cfg, make_part,
                         PlanSpill(spill, uri) if spill is not None and not alone else None, progress, max_images,
                         folder_cuts)
    if not listed:
        raise NoInput(f"no input at {uri}")
    found = {FOLDER: (image_files, "image files")} | {n: (len(files[n]), fmt.found) for n, fmt in FILE_FORMATS.items()}
    if format == "auto":
        format = _format(uri, files, bool(folder), passed_over.line())
        passed = [f"{n} {what}" for f, (n, what) in found.items() if f != format and n]
        if passed:  # said, not silent: a folder of Parquet files and stray images reads the Parquet files
            _say_not_read(f"{uri} is read as {format}; not read: {', '.join(passed)} (--format picks)",
                          f"{', '.join(passed)} (the corpus is read as {format}; --format picks)", not_read)
    elif not found[format][0]:
        listed_kinds = ", ".join(f"{n} {what}" for n, what in found.values() if n) or "no file of a format read here"
        raise NoInput(f"--format {format}: {uri} holds no {found[format][1]} ({listed_kinds})")
    if format in FILE_FORMATS:
        def file_part_id(f: str, *fields: object) -> str:
            return part_id(format, named(f), *fields, *((f"size {file_sizes[f]}",) if sizes else ()))

        if skipped := passed_over.unlisted_line():
            _say_not_read(f"{uri}: not read: {skipped}", skipped, not_read)
        return FILE_FORMATS[format].plan(FilePlan(files[format], cfg, file_part_id, note))
    if (passed := passed_over.line()) and max_images is None:  # (a sample has not listed the rest)
        _say_not_read(f"{uri}: not read: {passed}", passed, not_read)
    return folder


def _say_not_read(line: str, what: str, not_read: list[str] | None) -> None:
    """Print `line` about the corpus; keep `what` in `not_read` (when given) for the job's summary."""
    print(f"[corpus] {line}", flush=True)
    if not_read is not None:
        not_read.append(what)


LISTED_NOTE = 100  # planning notes its progress (and the driver its heartbeat) every this many files


def _ext(uri: str) -> str:
    name = uri.rpartition("/")[2]  # called for every file listed: string methods, not posixpath
    return name.rpartition(".")[2].lower() if "." in name else ""


# ---------------------------------------------------------------------------------------------
# Reading one part (inside a Ray read task, or anywhere).


def read_part(part: Part, cfg: ReaderConfig, images: bool = True) -> Iterator[pa.Table]:
    """Blocks of corpus rows for `part`, ending with its end row. `images=False` reads the captions
    only (image files and Parquet image columns are not read; the image column stays empty), for what
    needs no pixels, such as fitting a vocabulary."""
    rows = Rows(part, cfg.block_rows, images, cfg.max_file_bytes, cfg.block_bytes)
    reader = _read_folder if part.format == FOLDER else FILE_FORMATS[part.format].read
    try:
        for block in reader(part, cfg, rows):
            if block is not None:
                yield block
    except Exception as e:
        if not (isinstance(e, PermissionError) or is_bad_source(e)):
            raise
        reason = PERMISSION_DENIED if isinstance(e, PermissionError) else UNREADABLE_SOURCE
        rows.add(f"{part.uri}#error", b"", b"", reason)
        print(f"[tokenize] unreadable source {part.uri}: {type(e).__name__}: {e}")
    last = rows.flush()
    if last is not None:
        yield last
    yield rows.end()


def _read_parquet(part: Part, cfg: ReaderConfig, rows: Rows) -> Iterator[pa.Table | None]:
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
        # Batches of about block_bytes too, by the row groups' own sizes: a batch is held beside the block.
        size = sum(pf.metadata.row_group(g).total_byte_size for g in groups) if rows.images else 0
        count = sum(pf.metadata.row_group(g).num_rows for g in groups)
        batch_rows = max(1, min(cfg.block_rows, cfg.block_bytes * count // max(size, 1)))
        for batch in pf.iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            images = _image_bytes(batch.column(cfg.image_column)) if rows.images else [UNREAD] * batch.num_rows
            captions = _values(batch.column(cfg.caption_column))
            for image, text in zip(images, captions):
                if part.start <= row < stop:
                    yield add_sample(rows, f"{part.uri}#{row}", image, text)
                row += 1


def _image_bytes(column: pa.Array) -> list[bytes | None]:
    """An image column's bytes: binary as is, or a struct's `bytes` field (a Hugging Face Image
    feature; null where the struct is null or holds only a path)."""
    if pa.types.is_struct(column.type):
        column = pc.struct_field(column, "bytes")
    return _values(column)


_AS_BYTES = {pa.string(): pa.binary(), pa.large_string(): pa.large_binary(), pa.string_view(): pa.binary_view()}


def _values(column: pa.Array) -> list[bytes | None]:
    """A column of text or bytes (dictionary-encoded or not; nulls only) as Python bytes, so that
    invalid UTF-8 in a caption is preprocessing's to count, not a decoding error here."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_null(column.type):
        return [None] * len(column)
    if column.type in _AS_BYTES:
        column = column.cast(_AS_BYTES[column.type])
    return column.to_pylist()


FOLDER_READS_IN_FLIGHT = 16  # a folder part's files fetched at once: an S3 GET waits ~20-50 ms for its first byte


def _read_folder(part: Part, cfg: ReaderConfig, rows: Rows) -> Iterator[pa.Table | None]:
    """Each image and sidecar caption is a file of its own: up to FOLDER_READS_IN_FLIGHT samples are
    fetched at once, in threads, and added in the part's order. A file listed at planning that cannot
    be read is a storage error (the part is retried), never a reject, unless this user may not read it."""
    items = part.folder_items()

    def fetch(item) -> tuple[bytes | None, bytes | str | None, str]:
        """(image, caption, reason); a reason found at planning (a dangling symlink, a caption that
        is not text, a file over max_file_bytes) leaves nothing to read."""
        image_uri, caption_uri, inline, reason = item
        if reason:
            return None, None, reason
        try:
            image = storage.read_bytes(image_uri, rows.max_bytes) if rows.images else UNREAD
            caption = storage.read_bytes(caption_uri, rows.max_bytes) if caption_uri is not None else inline
        except storage.FileTooLarge:  # grown since planning
            return None, None, FILE_TOO_LARGE
        except PermissionError:  # no retry changes it (S3's AccessDenied is an OSError of its own)
            return None, None, PERMISSION_DENIED
        return image, caption, ""

    with ThreadPoolExecutor(FOLDER_READS_IN_FLIGHT) as pool:
        ahead: deque[Future] = deque()
        for n, item in enumerate(items):
            while len(ahead) < FOLDER_READS_IN_FLIGHT and n + len(ahead) < len(items):
                ahead.append(pool.submit(fetch, items[n + len(ahead)]))
            image, caption, reason = ahead.popleft().result()
            image_uri = item[0]
            if reason:
                yield rows.add(image_uri, b"", b"", reason)
            else:
                yield add_sample(rows, image_uri, image, caption)


# In the order "auto" prefers them: Parquet files win over tars, and both over a folder's images.
FILE_FORMATS: dict[str, FileFormat] = {
    "parquet": FileFormat("Parquet files", ("parquet",), _plan_parquet, _read_parquet),
    "webdataset": FileFormat("tars", ("tar", "tgz", "tar.gz"), _plan_tars, read_tar),
}
FOLDER = "folder"  # images one per file, captions beside them or in a captions file (`pipelines.folder_plan`)
