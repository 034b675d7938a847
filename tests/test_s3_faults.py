"""S3 as a hot prefix serves it: a real proxy between us and the S3 server on loopback answers a
third of the requests 503 SlowDown and drops one connection in eleven. Storage calls ride it out."""

from __future__ import annotations

from urllib.parse import urlparse

import pytest
from fault_proxy import FaultProxy

from muse import storage


@pytest.fixture
def hot_prefix(s3_server, monkeypatch):
    up = urlparse(s3_server)
    proxy = FaultProxy((up.hostname, up.port), throttle=1 / 3, drop=1 / 11, seed=0)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def test_reads_writes_and_listings_survive_throttling_and_dropped_connections(s3_bucket, hot_prefix):
    """SlowDown is retried with the SDK's throttling backoff (about half a second), so few objects."""
    prefix = f"{s3_bucket}/objects"
    for i in range(8):
        storage.write_bytes(f"{prefix}/{i:02d}.bin", bytes([i]) * 5000)
    assert storage.list_files(prefix) == [f"{prefix}/{i:02d}.bin" for i in range(8)]
    assert all(storage.read_bytes(f"{prefix}/{i:02d}.bin") == bytes([i]) * 5000 for i in range(8))
    assert storage.exists(f"{prefix}/03.bin") and not storage.exists(f"{prefix}/nope.bin")
    counts = hot_prefix.counts
    assert counts["throttled"] >= 5 and counts["dropped"] >= 1, counts  # the faults were real


def test_without_retries_the_same_faults_fail(s3_bucket, hot_prefix, monkeypatch):
    monkeypatch.setenv("MUSE_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(OSError) as err:
        for i in range(10):
            storage.write_bytes(f"{s3_bucket}/once/{i:02d}.bin", b"x")
            storage.read_bytes(f"{s3_bucket}/once/{i:02d}.bin")
    # The call failed on the proxy's first fault, its last request: every request before it went through.
    counts, last = hot_prefix.counts, len(hot_prefix.requests) - 1
    assert counts["throttled"] + counts["dropped"] == 1 and counts["forwarded"] == last >= 1, counts
    # A 503 SlowDown (which the SDK misfiles on a tiny object's GET); a dropped connection.
    said = ("SLOW_DOWN", storage.MISFILED_THROTTLE) if counts["throttled"] else ("Empty reply from server",)
    assert any(s in str(err.value) for s in said), err.value


def test_a_training_checkpoint_resumes_through_the_hot_prefix(s3_bucket, hot_prefix, tmp_path):
    """Resuming reads a checkpoint's pieces by ranged GETs (jobs.checkpoint_reader), each retried."""
    import pyarrow.fs as pafs
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    from jobs.checkpoint_reader import RangedCheckpointReader

    saved = {f"layer{i}.weight": torch.randn(64, 32) for i in range(12)} | {"step": torch.tensor(3.0)}
    dcp.save(saved, storage_writer=HuggingFaceStorageWriter(str(tmp_path)), no_dist=True)
    fs, path = storage.filesystem(f"{s3_bucket}/run/checkpoint_000001")
    pafs.copy_files(str(tmp_path), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    loaded = {k: torch.zeros_like(v) for k, v in saved.items()}
    dcp.load(loaded, storage_reader=RangedCheckpointReader(fs, path, coalesce_gap=0), no_dist=True)  # a GET per tensor
    assert all(torch.equal(loaded[k], saved[k]) for k in saved)
    assert hot_prefix.counts["throttled"] >= 3, hot_prefix.counts


def _exits(capsys, command, *argv) -> tuple[int, str]:
    """(exit status, stderr) of a command's main that must exit; stderr must be one line."""
    import argparse

    from jobs.stage import errors_in_one_line

    with pytest.raises(SystemExit) as exit_:
        if isinstance(command, BaseException):  # an error as training's driver meets it
            with errors_in_one_line(argparse.ArgumentParser(prog="muse train base")):
                raise command
        command(list(argv))
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return exit_.value.code, err


def _tokenize_into(tmp_path, capsys, output: str) -> tuple[int, str]:
    """`muse tokenize` of a 4-image corpus with a tiny root into `output`."""
    from muse.checkpoint import init_model_root
    from muse.data.synthetic import write_corpus
    from pipelines.tokenize import main

    root, corpus = str(tmp_path / "root"), str(tmp_path / "corpus")
    init_model_root("tiny", root, components=("vqgan_lo", "text_encoder"))
    write_corpus(corpus, 4, size=64)
    return _exits(capsys, main, "--input", corpus, "--output", output, "--checkpoint", root, "--no-progress")


def test_a_missing_bucket_is_one_line_not_a_traceback(s3_bucket, tmp_path, capsys):
    """S3 answers that no retry changes (a bucket that does not exist; likewise credentials that do not
    allow the request) end `muse tokenize` and training in one line, exit status 2."""
    missing = f"s3://no-such-bucket-{urlparse(s3_bucket).netloc}"
    with pytest.raises(OSError) as real:
        storage.write_text(f"{missing}/runs/base/_active.json", "{}")
    assert "NO_SUCH_BUCKET" in storage.s3_refusal(real.value)
    assert storage.s3_refusal(OSError("AWS Error SLOW_DOWN during PutObject operation")) is None  # retried
    code, err = _exits(capsys, real.value)
    assert code == 2 and "NO_SUCH_BUCKET" in err, err
    code, err = _tokenize_into(tmp_path, capsys, f"{missing}/tokens")
    assert code == 2 and err.startswith("muse tokenize: error: ") and "NO_SUCH_BUCKET" in err, err


def test_s3_unreachable_past_its_retries_is_one_line_saying_the_command_resumes(tmp_path, monkeypatch, capsys):
    """Every request refused at the socket (S3 down, a wrong endpoint) past the filesystem's retries:
    one line that says so and that the same command goes on, exit status 1, for tokenize and training."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    monkeypatch.setenv("MUSE_S3_MAX_ATTEMPTS", "2")
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                        ("AWS_REGION", "us-east-1")):  # no look for credentials elsewhere
        monkeypatch.setenv(name, value)
    with pytest.raises(OSError) as real:
        storage.read_text("s3://bucket/runs/base/state.json")
    assert "NETWORK_CONNECTION" in storage.s3_failure(real.value) and storage.s3_refusal(real.value) is None
    code, err = _exits(capsys, real.value)
    assert code == 1 and "the same command resumes from them" in err, err
    code, err = _tokenize_into(tmp_path, capsys, "s3://bucket/tokens")
    assert code == 1 and "NETWORK_CONNECTION" in err and "the same command tokenizes the rest" in err, err
