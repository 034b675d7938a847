"""muse.node_cache: one local copy of an S3 folder per machine, shared by its processes, and never a
stale one after the folder is replaced."""

from __future__ import annotations

import os
import threading
import time

import pytest

from muse import node_cache, storage


@pytest.fixture
def cache(tmp_path, monkeypatch, s3_bucket):
    monkeypatch.setenv(node_cache.CACHE_ENV, str(tmp_path / "cache"))
    downloads = []
    real = node_cache._download

    def counted(uri, dest):
        downloads.append(uri)
        time.sleep(0.2)  # long enough for the other callers to arrive while it runs
        real(uri, dest)

    monkeypatch.setattr(node_cache, "_download", counted)
    return downloads


def _folder(uri: str, weights: bytes) -> None:
    storage.write_bytes(storage.join(uri, "model.safetensors"), weights)
    storage.write_text(storage.join(uri, "config.json"), '{"kind": "x"}')


def test_callers_on_one_machine_share_one_download(cache, s3_bucket):
    uri = f"{s3_bucket}/root/base"
    _folder(uri, b"weights-1")
    seen = []

    def load():
        with node_cache.local_folder(uri) as local:
            seen.append((local, open(os.path.join(local, "model.safetensors"), "rb").read()))

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 1 and len({local for local, _ in seen}) == 1 and {data for _, data in seen} == {b"weights-1"}
    load()
    assert len(cache) == 1  # and later callers find it there


def test_a_folder_replaced_at_its_uri_is_downloaded_again_and_old_copies_are_dropped(cache, s3_bucket):
    uri = f"{s3_bucket}/root/base"
    entries = []
    for i, weights in enumerate((b"first", b"second!", b"third!!!")):
        _folder(uri, weights)
        with node_cache.local_folder(uri) as local:
            assert open(os.path.join(local, "model.safetensors"), "rb").read() == weights
            entries.append(local)
        assert len(cache) == i + 1
    assert len(set(entries)) == 3
    assert not os.path.exists(entries[0]) and os.path.exists(entries[1]) and os.path.exists(entries[2])


def test_local_folders_are_used_in_place_and_off_means_a_private_copy(cache, s3_bucket, tmp_path, monkeypatch):
    with node_cache.local_folder(str(tmp_path)) as local:
        assert local == str(tmp_path) and not cache
    uri = f"{s3_bucket}/t5"
    _folder(uri, b"w")
    monkeypatch.setenv(node_cache.CACHE_ENV, "off")
    with node_cache.local_folder(uri) as local:
        assert os.listdir(local) and not local.startswith(str(tmp_path / "cache"))
    assert not os.path.exists(local) and not os.path.exists(tmp_path / "cache")
    with pytest.raises(FileNotFoundError):
        with node_cache.local_folder(f"{s3_bucket}/nothing"):
            pass
