"""The store behind `response_format: "url"` (serve/files.py): in a replica's memory or on storage
every ingress replica shares."""

from __future__ import annotations

import time

import pytest

from serve.config import Files
from serve.files import FileStore, StoreFull


def test_file_store_in_memory_expires_and_keeps_every_link_it_gave_until_then():
    now = [1_800_000_000.0]
    store = FileStore(Files(ttl_s=10, max_files=3), clock=lambda: now[0])
    a, b = store.put(b"a"), store.put(b"b", "webp")
    assert store.get(a) == b"a" and store.get(b) == b"b" and a.endswith(".png") and b.endswith(".webp")
    assert store.get(a.replace(".png", ".jpeg")) is None  # served only as what it is
    with pytest.raises(StoreFull) as full:  # a response's images are stored all or none
        store.put_all([b"c", b"d"])
    assert full.value.retry_after_s == 10 and len(store._memory) == 2
    now[0] += 4
    store.check_room(1)
    c = store.put(b"c")
    with pytest.raises(StoreFull) as full:  # over max_files: refused, never a link cut short
        store.check_room(1)
    assert full.value.retry_after_s == 6 and (store.get(a), store.get(b), store.get(c)) == (b"a", b"b", b"c")
    now[0] += 7  # a and b expire, and make room
    assert store.get(a) is None and store.get(b) is None and store.get(c) == b"c"
    store.put_all([b"d", b"e"])
    now[0] += 5
    assert store.get(c) is None
    for bad in ("", "../etc/passwd", "1-abc", c + "x", c.upper()):
        assert store.get(bad) is None


def test_file_store_on_shared_storage_sweeps_expired(tmp_path):
    now = [1_800_000_000.0]
    store = FileStore(Files(uri=str(tmp_path / "files"), ttl_s=100), clock=lambda: now[0])
    old = store.put(b"old")
    assert store.get(old) == b"old" and (tmp_path / "files" / old).exists()
    assert FileStore(Files(uri=str(tmp_path / "files")), clock=lambda: now[0]).get(old) == b"old"  # another replica
    now[0] += 101
    new = store.put(b"new")  # starts a sweep in the background
    assert store.get(old) is None  # expired at once, by its id
    deadline = time.monotonic() + 10
    while (tmp_path / "files" / old).exists():
        assert time.monotonic() < deadline, "the expired file was never swept"
        time.sleep(0.05)
    assert store.get(new) == b"new"


def test_a_shared_file_swept_while_it_is_read_is_not_found(tmp_path, monkeypatch):
    """Another replica's sweep may delete a file between the existence check and the read: that is
    a 404 (None here), not a server error."""
    from muse import storage

    store = FileStore(Files(uri=str(tmp_path / "files"), ttl_s=100))
    name = store.put(b"png")
    exists = storage.exists

    def swept_after_check(uri):
        found = exists(uri)
        (tmp_path / "files" / name).unlink()
        return found

    monkeypatch.setattr(storage, "exists", swept_after_check)
    assert store.get(name) is None
