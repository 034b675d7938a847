"""Driver for tests/jobs/test_multinode.py, run in its own process: a Ray of three nodes on this machine
(a head with no CPUs, as cluster.yaml's, and two worker nodes of one training worker each), and an
elastic base run on S3 whose node of one worker is killed after the first registered checkpoint.
Prints one JSON line."""

from __future__ import annotations

import json
import sys
import threading
import time


def main(root: str, tokens: str, local_path: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    # Lost nodes are declared dead after ~2 s instead of ~15, so the test does not wait on Ray's default.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    try:
        workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
        out = run(cluster, workers, root, tokens, local_path)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(out), flush=True)


def run(cluster, workers: list, root: str, tokens: str, local_path: str) -> dict:
    import ray
    from ray.util.state import list_actors

    from jobs import progress
    from jobs.cluster import LocalPathRefused, check_shared_paths
    from jobs.config import load_config
    from jobs.preflight import RAY_TRAIN_SNAPSHOT
    from jobs.stages import run_stage
    from muse import storage

    out: dict = {"killed": []}
    try:
        check_shared_paths({"--tokens": local_path})
    except LocalPathRefused as refused:
        out["refused"] = str(refused)
    cfg = load_config("configs/train_tiny.yaml", [
        "base.scaling.num_workers=2", "base.scaling.min_workers=1", "base.scaling.cpus_per_worker=1",
        "base.run.max_steps=10", "base.run.checkpoint_every=2", "base.run.batch_size=4", "base.run.log_every=2",
        "base.run.sample_every=0", "base.run.max_failures=2", "base.run.cache_data=true", "base.model=null",
        "base.optim.warmup_steps=1"])
    times = {"start": time.time()}

    def kill_a_worker_node_after_the_first_checkpoint() -> None:
        registered = storage.join(root, "runs", "base", RAY_TRAIN_SNAPSHOT)  # written once a checkpoint counts
        while not storage.exists(registered):
            time.sleep(0.2)
        alive = []
        while not alive:  # between attempts no worker is up: look again
            alive = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        node_id = alive[0].node_id
        times["kill"] = time.time()
        cluster.remove_node(next(n for n in workers if n.node_id == node_id), allow_graceful=False)
        out["killed"].append(node_id)

    threading.Thread(target=kill_a_worker_node_after_the_first_checkpoint, daemon=True).start()
    board = progress.start_display()
    [result] = run_stage("base", cfg, tokens, root)
    times["done"] = time.time()
    out["notes"] = ray.get(board.poll.remote(0))[1]
    progress.stop_display()
    out |= {"step": result.metrics["step"], "resumed_from": result.metrics["resumed_from"],
            "alive_nodes": sum(n["Alive"] for n in ray.nodes()),
            "seconds": {k: round(v - times["start"], 1) for k, v in times.items()}}
    return out


if __name__ == "__main__":
    main(*sys.argv[1:4])
