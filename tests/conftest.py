"""Shared test fixtures: one S3-compatible server on loopback and one local Ray per test session."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest


def pytest_report_header(config) -> str:
    """The machine a run's timings and failures come from, and the disk its temporary folders have:
    the suite needs a few hundred MB there, and a full disk fails tests far from the cause."""
    import shutil
    import tempfile

    tmp = tempfile.gettempdir()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"machine: {os.cpu_count()} logical cores, {memory:.0f} GiB memory; "
            f"{shutil.disk_usage(tmp).free / 2**30:.1f} GiB free in {tmp}")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible HTTP server (moto's server mode) on 127.0.0.1. Sets the standard AWS
    environment variables so boto3, pyarrow and Ray workers started afterwards all reach it, and the
    node cache of S3 folders (muse.node_cache) to this session's own folder."""
    from moto.server import ThreadedMotoServer

    from serve.app import unused_port

    port = unused_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
        "MUSE_CACHE_DIR": str(tmp_path_factory.mktemp("muse-cache")),
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh, empty bucket; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=s3_server)
    client.create_bucket(Bucket=name)
    yield f"s3://{name}"
    # The server keeps every object (in memory, or spooled to unnamed temporary files) until deleted:
    # without this, a session's buckets add up to hundreds of MB of disk.
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            keys = [{"Key": item["Key"]} for item in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=name, Delete={"Objects": keys, "Quiet": True})
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", []):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)
    except Exception as e:  # a test that stopped the server, or left it behind a fault proxy
        print(f"bucket {name} not emptied: {e!r}")


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """One local Ray for the whole test session. More logical CPUs than cores so that actor pools
    with fractional CPUs never starve read tasks; S3 variables are set first so workers inherit them.
    The workers' variables come from this process's environment, not a runtime_env: Ray hands its
    idle workers only to jobs without one, so tasks and actors start without booting a process."""
    import ray

    from jobs.cluster import use_local_driver_env

    use_local_driver_env()  # as a local instance of the jobs gets it
    os.environ.update(TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=8,
            include_dashboard=False,
            log_to_driver=False,
            object_store_memory=1_500_000_000,
        )
    yield ray
    ray.shutdown()


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem of 40 KB (tmpfs), which a few token parts or a tiny model root fill; `mount -o
    remount,size=...` gives it room."""
    disk = tmp_path / "small"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder on a real read-only filesystem (a read-only bind mount), as a read-only NFS export or a
    mount of another team's data is: writes below it fail with EROFS, root's included. What a test
    puts in `tmp_path / "ro_source"` shows there."""
    source, folder = tmp_path / "ro_source", tmp_path / "ro"
    source.mkdir()
    folder.mkdir()
    mounted = subprocess.run(["mount", "--bind", str(source), str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {mounted.stderr.decode().strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True, capture_output=True)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)
