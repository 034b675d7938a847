"""One way to read and write files at local paths, `file://` URIs and `s3://` URIs.

S3 credentials come from the standard AWS chain (environment, shared config, instance role); they are
never read or logged here. An S3-compatible store is reached through the standard
`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` variables. Writes are atomic: a local file is written to a
temporary name and renamed; an S3 object is a single PUT.
"""

from __future__ import annotations

import functools
import os
import posixpath
import sys
import uuid
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
    attempts = int(os.environ.get("MUSE_S3_MAX_ATTEMPTS", S3_MAX_ATTEMPTS))
    return _s3_filesystem(endpoint, region, attempts)


@functools.lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None, attempts: int) -> pafs.S3FileSystem:
    kwargs: dict = {"retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
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


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


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


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, recursive: bool = True, broken_links: list[str] | None = None) -> list[str]:
    """Every file below `uri`, as URIs in the same scheme, sorted. Locally, a file (or folder) whose
    name is not UTF-8 is skipped and named on stderr: pyarrow cannot hold such a path, and one used to
    fail the whole listing without naming it. A dangling symlink is left out, or appended to
    `broken_links` when that is given."""
    fs, path = filesystem(uri)
    if is_s3(uri) or not os.path.isdir(path):  # S3 keys are UTF-8; pyarrow's errors for the rest
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=recursive, allow_not_found=True))
        files = sorted(i.path for i in infos if i.type == pafs.FileType.File)
        return ["s3://" + p for p in files] if is_s3(uri) else files
    files, links, odd = [], [], []
    _walk(path, recursive, files, links, odd, set())
    if odd:
        names = [p.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace") for p in sorted(odd)]
        print(f"[storage] skipped {len(odd)} path(s) below {path} whose names are not UTF-8: "
              + ", ".join(names[:10]) + (", ..." if len(names) > 10 else ""), file=sys.stderr, flush=True)
    if broken_links is not None:
        broken_links.extend(sorted(links))
    return sorted(files)


def _walk(folder: str, recursive: bool, files: list[str], links: list[str], odd: list[str],
          seen: set[tuple[int, int]]) -> None:
    """Local listing as pyarrow's (symlinks followed), by str paths that may hold undecodable bytes
    (surrogate-escaped), which are sorted into `odd` rather than raising."""
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in seen:  # a symlink loop
        return
    seen.add((st.st_dev, st.st_ino))
    with os.scandir(folder) as entries:
        for e in entries:
            try:
                e.name.encode("utf-8")
            except UnicodeEncodeError:
                odd.append(e.path)
                continue
            if e.is_dir():
                if recursive:
                    _walk(e.path, recursive, files, links, odd, seen)
            elif e.is_file():
                files.append(e.path)
            elif e.is_symlink() and not os.path.exists(e.path):
                links.append(e.path)


def delete(uri: str) -> None:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)
