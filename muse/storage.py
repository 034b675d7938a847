"""One way to read and write files at local paths, `file://` URIs and `s3://` URIs.

S3 credentials come from the standard AWS chain (environment, shared config, instance role); they are
never read or logged here. An S3-compatible store is reached through the standard
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables. Writes are atomic: a local file is written to a
temporary name and renamed; an S3 object is a single PUT.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import random
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_endpoint() -> str | None:
    """The custom S3 endpoint from the environment, if any."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


S3_MAX_ATTEMPTS = 10  # per request; MUSE_S3_MAX_ATTEMPTS overrides


def s3_filesystem() -> pafs.S3FileSystem:
    """One S3 client per process and setting (endpoint, region, attempts), shared by every call and
    thread. Requests that S3 throttles (503 SlowDown) or whose connection drops are retried with
    the AWS SDK's standard exponential backoff, up to S3_MAX_ATTEMPTS times: a hot prefix slows a
    job down instead of killing it."""
    endpoint = s3_endpoint()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(endpoint, region, s3_max_attempts())


def s3_max_attempts() -> int:
    return int(os.environ.get("MUSE_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, attempts: int) -> pafs.S3FileSystem:
    # A delayed open writes a file that fits in one part with one PutObject when it is closed, instead of
    # a multipart upload's three requests (each of which a hot prefix may throttle).
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                    "allow_delayed_open": True}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path, file:// or s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def absolute(uri: str) -> str:
    """The same location as an absolute path/URI. Workers of a Ray Train run start in their own
    directory, so a relative local path handed to them would land somewhere else."""
    uri = str(uri)
    if is_s3(uri):
        return uri
    if uri.startswith("file://"):
        return "file://" + os.path.abspath(uri[len("file://"):])
    return os.path.abspath(uri)


def join(uri: str, *parts: str) -> str:
    uri = str(uri)
    if is_s3(uri) or uri.startswith("file://"):
        return posixpath.join(uri.rstrip("/"), *parts)
    return os.path.join(uri, *parts)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    if not is_s3(uri):
        fs.create_dir(path, recursive=True)


# A throttled (503 SlowDown) ranged GET of a small object is misfiled by the AWS SDK: its error body
# overflows the buffer sized to the object, and the request fails as INTERNAL_FAILURE "Failed to
# flush response stream", which the SDK's retry strategy never retries. Tiny files (captions) hit it
# whenever a prefix is hot, so whole-file reads retry it themselves.
MISFILED_THROTTLE = "Failed to flush response stream"


def _misfiled_throttle_retried(read):
    """`read()`, again with backoff while it fails with the misfiled throttle, up to the same number of
    attempts as any request."""
    for attempt in range(s3_max_attempts() - 1):
        try:
            return read()
        except OSError as e:
            if MISFILED_THROTTLE not in str(e):
                raise
            time.sleep(min(2.0, 0.05 * 2**attempt) * random.uniform(0.5, 1.0))  # backoff with jitter
    return read()


class FileTooLarge(Exception):
    """A file over the size a caller would read (`read_bytes`'s `limit`): not a storage error."""


def _error_chain(error: BaseException) -> Iterator[BaseException]:
    """`error`, then the error it wraps (a Ray task's, through `cause`) or was raised while handling (a
    cleanup's), and so on: a few levels at most."""
    for _ in range(8):
        yield error
        cause = getattr(error, "cause", None) or error.__context__
        if not isinstance(cause, BaseException):
            return
        error = cause


def full_disk(error: BaseException) -> OSError | None:
    """The error of a local disk or quota that is full in `error`'s chain (`_error_chain`), or None.
    No retry mends it: the user frees space or writes elsewhere."""
    return next((e for e in _error_chain(error)  # (pyarrow's writes carry the errno too)
                 if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)), None)


def check_room(uri: str, needed: int, what: str) -> None:
    """Raise ENOSPC when the local filesystem that holds `uri` has less than `needed` bytes free, for a
    write that another thread will do, where its caller would not see the error. S3 has no such limit."""
    if is_s3(uri):
        return
    path = _nearest_existing(filesystem(uri)[1])
    free = shutil.disk_usage(path).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"No space left on device for {what}: it needs {needed / 1e6:.1f} MB under "
                                    f"{path}, which has {free / 1e6:.1f} MB free")




def _nearest_existing(path: str) -> str:
    """`path`, or its nearest ancestor that exists: where a write below it would land."""
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path

def access_refused(error: BaseException) -> OSError | None:
    """The error of a local read or write that no retry allows in `error`'s chain (a read-only
    filesystem, a folder of another user), or None."""
    return next((e for e in _error_chain(error)
                 if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)), None)


def check_writable(uri: str) -> None:
    """Raise the OSError that a write below the local `uri` would meet (a read-only filesystem, a
    folder this user may not write), before any work is done. S3 answers for itself."""
    if is_s3(uri):
        return
    path = _nearest_existing(filesystem(uri)[1])
    if not os.access(path, os.W_OK):  # root is refused only by a read-only filesystem
        code = errno.EROFS if os.statvfs(path).f_flag & os.ST_RDONLY else errno.EACCES
        raise OSError(code, os.strerror(code), path)

# S3 answers that no retry changes: a missing bucket, or credentials that do not allow the request.
S3_REFUSALS = ("NO_SUCH_BUCKET", "ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH",
               "HTTP status 403", "EXPIRED_TOKEN", "INVALID_TOKEN")


def s3_refusal(error: BaseException) -> str | None:
    """The first line of an S3 error in `error`'s chain that no retry changes, else None."""
    return _s3_error_line(error, S3_REFUSALS)


def s3_failure(error: BaseException) -> str | None:
    """The first line of any S3 error in `error`'s chain: one that outlasted the filesystem's retries
    (S3_MAX_ATTEMPTS per request), or a refusal; None when there is none."""
    return _s3_error_line(error, ("",))


def _s3_error_line(error: BaseException, codes: tuple[str, ...]) -> str | None:
    for e in _error_chain(error):
        line = (str(e).strip().splitlines() or [""])[0]
        if isinstance(e, OSError) and "AWS Error" in line and any(code in line for code in codes):
            return " ".join(line.split())
    return None


def read_bytes(uri: str, limit: int | None = None) -> bytes:
    """The whole file; with `limit`, at most that many bytes are read, and a larger file raises
    FileTooLarge."""
    fs, path = filesystem(uri)

    def read() -> bytes:
        with fs.open_input_stream(path) as f:
            data = f.read() if limit is None else f.read(limit + 1)
        if limit is not None and len(data) > limit:
            raise FileTooLarge(f"{uri}: over {limit} bytes")
        return data
    return _misfiled_throttle_retried(read)


READ_CHUNK_BYTES = 8 << 20


def read_chunks(uri: str, chunk_bytes: int | None = None) -> Iterator[bytes]:
    """A file of any size, in order, `chunk_bytes` (default READ_CHUNK_BYTES) at a time: one ranged
    read per chunk on S3, each retried on its own, so a transient error late in a big file repeats
    one chunk, not the file."""
    chunk_bytes = chunk_bytes or READ_CHUNK_BYTES
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as f:
        size, offset = f.size(), 0
        while offset < size:
            chunk = _misfiled_throttle_retried(lambda: f.read_at(min(chunk_bytes, size - offset), offset))
            if not chunk:
                raise OSError(f"{uri}: ended at byte {offset} of {size}")
            offset += len(chunk)
            yield chunk


def download_dir(uri: str, dest: str) -> list[str]:
    """Copy every file below `uri` (local or s3://) into the local folder `dest`, keeping their paths
    below it, a chunk at a time (`read_chunks`: each read retried, no file held whole); returns the
    files copied."""
    prefix = uri.rstrip("/") + "/"
    files = list_files(uri)
    for f in files:
        local = os.path.join(dest, f[len(prefix):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as out:
            for chunk in read_chunks(f):
                out.write(chunk)
    return files


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    """Atomic write: readers see the old file or the whole new one, never a part."""
    fs, path = filesystem(uri)
    if is_s3(uri):
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def upload_file(path: str, uri: str) -> None:
    """Copy the local file `path` to `uri` (S3) without holding it in memory: pyarrow streams it in
    parts from C++, so a Python exception (Ctrl-C) cannot land between two parts and close a
    truncated object. Each request is retried by the filesystem's retry strategy."""
    fs, dest = filesystem(uri)
    pafs.copy_files(path, dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs,
                    chunk_size=READ_CHUNK_BYTES, use_threads=False)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, recursive: bool = True, broken_links: list[str] | None = None) -> list[str]:
    """Every file below `uri`, as URIs in the same scheme, sorted (`iter_files`, all held; on S3 one
    listing without delimiters, fewer requests than a folder at a time). A dangling symlink is left
    out, or appended to `broken_links` when that is given."""
    if is_s3(uri):
        fs, path = filesystem(uri)
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        return sorted("s3://" + i.path for i in infos if i.type == pafs.FileType.File)
    files = []
    for f in iter_files(uri, recursive):
        if not f.broken:
            files.append(f.uri)
        elif broken_links is not None:
            broken_links.append(f.uri)
    return files


class Listed(NamedTuple):
    uri: str
    siblings: Mapping[str, int]  # the files in the same folder: name -> size (one per folder, shared)
    broken: bool = False  # a dangling symlink (local folders only)
    size: int = -1  # bytes, as listed (-1: a dangling symlink)


LISTING_LOOKAHEAD = 8  # folders listed ahead of the walk, in threads (an S3 listing is a round trip)


def iter_files(uri: str, recursive: bool = True,
               unlisted: Callable[[str, str], None] | None = None) -> Iterator[Listed]:
    """Every file below `uri` (or `uri` itself, a file), streamed in sorted order: the same order as
    sorting the whole list, since a folder's entries are sorted with "/" after a folder's name and
    walked depth first. Memory holds the listings of the folders on the way down (and a few listed
    ahead), never the whole tree: a corpus of 10^8 images in folders of 10^4 is walked in a few MB.

    S3 is listed one "folder" (common prefix) at a time. Locally symlinks are followed (a loop is
    walked once), and what cannot be listed is skipped rather than failing the whole listing: a file
    or folder whose name is not UTF-8 (pyarrow cannot hold such a path), and a folder below `uri` that
    this user may not read. Each is passed to `unlisted(path, why)`, or without it named on stderr at
    the end. `uri` itself unreadable raises PermissionError."""
    fs, path = filesystem(uri)
    s3 = is_s3(uri)
    prefix = "s3://" if s3 else ""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        yield Listed(prefix + path, {info.base_name: info.size}, size=info.size)
        return
    if info.type == pafs.FileType.NotFound:
        return
    skipped: list[tuple[str, str]] = []
    seen: set[tuple[int, int]] = set()

    def listing(folder: str) -> tuple[tuple[int, int] | None, list[tuple[str, str, str, int]]]:
        """(identity for loop detection, sorted [(sort key, kind, path, size)])."""
        if s3:
            infos = fs.get_file_info(pafs.FileSelector(folder, recursive=False, allow_not_found=True))
            entries = [(i.base_name + "/", "dir", i.path, -1) if i.type == pafs.FileType.Directory
                       else (i.base_name, "file", i.path, i.size) for i in infos
                       if i.type in (pafs.FileType.Directory, pafs.FileType.File)]
            return None, sorted(entries)
        st, entries = os.stat(folder), []
        try:
            found = os.scandir(folder)
        except PermissionError:
            if folder == path:
                raise
            skipped.append((folder, UNLISTED_FOLDER))
            return (st.st_dev, st.st_ino), []
        with found:
            for e in found:
                try:
                    e.name.encode("utf-8")
                except UnicodeEncodeError:
                    skipped.append((e.path, NOT_UTF8_NAME))
                    continue
                if e.is_dir():
                    entries.append((e.name + "/", "dir", e.path, -1))
                elif e.is_file():
                    entries.append((e.name, "file", e.path, None))  # sized by the walk
                elif e.is_symlink() and not os.path.exists(e.path):
                    entries.append((e.name, "broken", e.path, -1))
        return (st.st_dev, st.st_ino), sorted(entries)

    def walk(listed, pool: ThreadPoolExecutor) -> Iterator[Listed]:
        identity, entries = listed
        if identity is not None:
            if identity in seen:  # a symlink loop, or a folder linked twice
                return
            seen.add(identity)
        if not s3:  # here, not in the listing threads: a stat there hands the GIL back and forth
            entries = [(key, kind, p, _size(p) if size is None else size) for key, kind, p, size in entries]
        names = {name: size for name, kind, _, size in entries if kind != "dir"}
        folders = [p for _, kind, p, _ in entries if kind == "dir"] if recursive else []
        ahead: dict[str, Future] = {}
        submitted = 0
        for _, kind, p, size in entries:
            if kind != "dir":
                yield Listed(prefix + p, names, kind == "broken", size)
                continue
            if not recursive:
                continue
            while submitted < len(folders) and len(ahead) < LISTING_LOOKAHEAD:
                ahead[folders[submitted]] = pool.submit(listing, folders[submitted])
                submitted += 1
            yield from walk(ahead.pop(p).result(), pool)

    with ThreadPoolExecutor(LISTING_LOOKAHEAD) as pool:
        yield from walk(listing(path), pool)
    for skipped_path, why in sorted(skipped) if unlisted is not None else ():
        unlisted(shown_path(skipped_path), why)
    for why in sorted({why for _, why in skipped}) if unlisted is None else ():
        names = sorted(shown_path(p) for p, w in skipped if w == why)
        print(f"[storage] skipped {len(names)} {why} below {path}: " + ", ".join(names[:10])
              + (", ..." if len(names) > 10 else ""), file=sys.stderr, flush=True)


NOT_UTF8_NAME = "path(s) whose names are not UTF-8"
UNLISTED_FOLDER = "folder(s) this user may not list (permission denied)"


def shown_path(path: str) -> str:
    """`path` printable: bytes of a name that is not UTF-8 escaped (caf\\xe9.png)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:  # gone since the folder was read: its read reports it
        return -1


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
