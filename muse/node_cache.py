"""One local copy of an S3 folder per machine, shared by every process on it.

On a cluster each process that loads a model used to download it: eight training workers on a GPU node
fetched eight copies of a 19 GB T5-XXL, and every tokenization actor its own VQGANs. `local_folder`
downloads a folder once per node into `MUSE_CACHE_DIR` (default: `<temp dir>/muse-cache`), under a
file lock that the other processes wait on, and hands them all the same folder.

An entry is keyed by the URI, every file's path, size and modification time, and the folder's
config.json (a component's records its weights' sha256), so a component replaced at the same URI (a
stage's export) is a new entry, never a stale copy. The two newest entries of a URI are kept (a
process may still be reading the older). `MUSE_CACHE_DIR=off` gives each call a temporary copy of its
own instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pyarrow.fs as pafs

from muse import storage

CACHE_ENV = "MUSE_CACHE_DIR"
COMPLETE = ".complete"  # written last: an entry without it is a download that did not finish
KEEP_VERSIONS = 2


def cache_root() -> str | None:
    """The cache folder of this machine, None when turned off."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return value or os.path.join(tempfile.gettempdir(), "muse-cache")


@contextlib.contextmanager
def local_folder(uri: str) -> Iterator[str]:
    """A local folder holding the files below `uri`: the folder itself when it is local; for s3://,
    this machine's cached copy (downloaded once, by whichever process asks first)."""
    if not storage.is_s3(uri):
        yield storage.filesystem(uri)[1]
        return
    root = cache_root()
    if root is None:
        with tempfile.TemporaryDirectory() as tmp:
            _download(uri, tmp)
            yield tmp
        return
    yield _cached(uri, root)


def _cached(uri: str, root: str) -> str:
    from filelock import FileLock

    files = _listing(uri)
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    versions = os.path.join(root, hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:24])
    key = json.dumps(files)
    if any(name == "config.json" for name, _, _ in files):  # a component's records its weights' sha256
        key += storage.read_text(storage.join(uri, "config.json"))
    version = hashlib.sha256(key.encode()).hexdigest()[:24]
    entry = os.path.join(versions, version)
    if os.path.exists(os.path.join(entry, COMPLETE)):
        return entry
    os.makedirs(versions, exist_ok=True)
    with FileLock(entry + ".lock"):
        if not os.path.exists(os.path.join(entry, COMPLETE)):  # the lock's previous holder may have made it
            staging = f"{entry}.tmp-{uuid.uuid4().hex}"
            try:
                _download(uri, staging)
                storage.write_text(os.path.join(staging, COMPLETE), uri)
                shutil.rmtree(entry, ignore_errors=True)  # a copy whose download was cut off
                os.rename(staging, entry)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    _drop_old_versions(versions)
    return entry


def _listing(uri: str) -> list[tuple[str, int, int]]:
    """(path below `uri`, size, mtime in ns) of every file: what a version of the folder is."""
    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path.rstrip("/"), recursive=True, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return sorted((i.path[len(prefix):], int(i.size or 0), int(i.mtime_ns or 0))
                  for i in infos if i.type == pafs.FileType.File)


def _download(uri: str, dest: str) -> None:
    if not storage.download_dir(uri, dest):
        raise FileNotFoundError(f"no files under {uri}")


def _drop_old_versions(versions: str) -> None:
    """Keep the KEEP_VERSIONS newest complete copies of a URI."""
    done = [os.path.join(versions, d) for d in os.listdir(versions)
            if os.path.exists(os.path.join(versions, d, COMPLETE))]
    done.sort(key=lambda d: os.path.getmtime(os.path.join(d, COMPLETE)), reverse=True)
    for old in done[KEEP_VERSIONS:]:
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.remove(old + ".lock")
