"""Tokenizing an S3 corpus through a hot prefix: a real proxy between every process of the job (the
driver and its Ray workers) and the S3 server on loopback answers a third of the requests 503
SlowDown and drops one connection in ten (at most twice in a row for one request, so that the SDK's
backoff stays seconds). The job finishes, every good sample lands exactly once, and a second run adds
nothing."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections import Counter
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.parquet as pq
from corpora import good, mixed_rows
from fault_proxy import FaultProxy

from muse import storage
from pipelines import shards
from pipelines.config import load_config
from pipelines.tokenize import resolve_models, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = ("reader: {rows_per_part: 3, block_rows: 3}\n"
          "preprocess: {num_cpus: 0.5, batch_size: 8, min_side: 16}\n"
          "vqgan_lo: {num_cpus: 0.5, batch_size: 8}\ntext: {num_cpus: 0.5, batch_size: 16}\n"
          "write_cpus: 0.25\n")


def test_tokenize_through_throttling_and_dropped_connections(ray_session, s3_server, s3_bucket, tiny_root_lo_only,
                                                             tmp_path):
    garbage = next(r for r in mixed_rows() if r[0] == "garbage")
    expected = set()
    for f in range(2):  # written straight to the server: the faults are for the job
        rows = [(f"g{f}-{i}", *good(f * 10 + i, 40)) for i in range(4 + f)]
        rows.insert(2, garbage[:3])
        buf = io.BytesIO()
        pq.write_table(pa.table({"image": [r[1] for r in rows], "caption": [r[2].encode() if isinstance(r[2], str)
                                                                              else r[2] for r in rows]}), buf,
                       row_group_size=3)  # two parts per file (parts are whole row groups)
        storage.write_bytes(f"{s3_bucket}/corpus/c{f}.parquet", buf.getvalue())
        expected |= {f"{s3_bucket}/corpus/c{f}.parquet#{i}" for i in range(len(rows)) if i != 2}
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(CONFIG)
    out = f"{s3_bucket}/tokens"

    up = urlparse(s3_server)
    proxy = FaultProxy((up.hostname, up.port), throttle=1 / 3, drop=1 / 10, seed=1, max_in_a_row=2)
    try:
        # Its own driver, joined to the session's Ray: the job's workers take the driver's endpoint.
        env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address, PYTHONPATH=REPO,
                   AWS_ENDPOINT_URL=proxy.url, AWS_ENDPOINT_URL_S3=proxy.url)
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.tokenize", "--input", f"{s3_bucket}/corpus/", "--output", out,
             "--checkpoint", tiny_root_lo_only, "--config", str(cfg_file), "--no-progress"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert proxy.counts["throttled"] >= 10 and proxy.counts["dropped"] >= 3, proxy.counts
        writes = Counter(r.split()[0] for r in proxy.requests if "/tokens/shards/" in r)
        assert writes["PUT"] >= 4, writes  # the workers' shard uploads went through the faults too
    finally:
        proxy.close()
    # Straight to the server: what the faulted run left is read as it is.
    models, cfg = resolve_models(tiny_root_lo_only), load_config(cfg_file)
    again = run(f"{s3_bucket}/corpus", out, models, cfg, progress=False)
    assert again["run_parts"] == 0 and again["parts"] == 4
    keys = Counter(shards.load_token_shards(out, columns=["key"])["key"].to_pylist())
    assert set(keys) == expected and max(keys.values()) == 1
    assert again["accepted"] == len(expected) and again["rejects"]["by_reason"] == {"corrupt_image": 2}
