"""Several nodes: a Ray of three nodes on this machine (tests/jobs/multinode_elastic.py, in its own
process beside the session's Ray), with the model root and tokens on the S3 server."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from jobs_helpers import REPO, copy_tree


def test_an_elastic_run_loses_a_node_and_finishes_on_the_other(s3_bucket, tiny_data, tmp_path):
    """cluster.yaml's shape: the head holds no CPUs, each worker node one training worker. The node of
    one worker is killed after the first registered checkpoint: with scaling.min_workers=1 the run
    resumes from that checkpoint on the node left and finishes, and the console says so. A local path
    is refused on this Ray of several nodes."""
    root = copy_tree(tiny_data.root, f"{s3_bucket}/root")
    tokens = copy_tree(tiny_data.tokens, f"{s3_bucket}/tokens")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    # Ray Train's first restart asks for the lost node's worker too and waits this long (60 s by default)
    # before it starts with the workers that fit.
    env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = "20"
    run = subprocess.run([sys.executable, str(REPO / "tests" / "jobs" / "multinode_elastic.py"), root, tokens,
                          str(tmp_path / "tokens")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]  # the driver's output: Ray's own lines and the console
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert "3 nodes" in out["refused"] and "is local" in out["refused"]
    assert len(out["killed"]) == 1 and out["alive_nodes"] == 2  # the head and one worker node
    assert out["step"] == 10, out["seconds"]
    assert 2 <= out["resumed_from"] < 10 and out["resumed_from"] % 2 == 0  # a checkpoint, not step 0
    restarts = [n for n in out["notes"] if n.startswith("[base] attempt 2")]
    assert restarts == [f"[base] attempt 2 resumes from step {int(out['resumed_from'])} on 1 worker(s)"], out["notes"]
