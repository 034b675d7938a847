"""Whether the joined Ray can ever start the tokenizer's actor pools. Ray Data waits silently, for
ever, for an actor that asks more GPUs or CPUs than any node has (`vqgan_lo.num_gpus=1` on a CPU-only
machine), so that is refused before the job starts, as training refuses a trainer
(`jobs.fit._check_room`); on a cluster that may grow it is only a warning."""

from __future__ import annotations

from jobs.cluster import cluster_may_grow
from pipelines.config import PoolConfig, TokenizeConfig
from pipelines.rejects import CorpusRefused


class NoRoom(CorpusRefused):
    """An actor pool that no node of the cluster can hold one actor of; nothing was tokenized."""


def room_problem(cfg: TokenizeConfig, nodes: list[dict[str, float]]) -> str | None:
    """Why no node of `nodes` (each node's Ray resources) can hold one actor of a pool the job runs,
    or None when each pool fits on some node."""
    pools: list[tuple[str, PoolConfig]] = [("vqgan_lo", cfg.vqgan_lo)]
    if cfg.text_storage == "embeddings":  # ids run no text pool
        pools.append(("text", cfg.text))
    for name, pool in pools:
        for key, asked, field in (("GPU", pool.num_gpus, "num_gpus"), ("CPU", pool.num_cpus, "num_cpus")):
            most = max((float(node.get(key, 0.0)) for node in nodes), default=0.0)
            if asked > most:
                fix = (f"set {name}.num_gpus=0 to run it on CPU, or run on a cluster with GPUs"
                       if key == "GPU" and most == 0 else f"keep {name}.{field} at {most:g} or less")
                return (f"each {name} actor asks for {asked:g} {key}s and no node of the cluster has that many "
                        f"(the most is {most:g}), so the job would wait forever: {fix}")
    return None


def check_room(cfg: TokenizeConfig) -> None:
    """Refuse (`NoRoom`) a job whose pools no node can hold, once Ray is joined; on a cluster that may
    grow (`jobs.cluster.cluster_may_grow`: the autoscaler can add nodes) only warn."""
    import ray

    problem = room_problem(cfg, [node["Resources"] for node in ray.nodes() if node.get("Alive")])
    if problem is None:
        return
    if not cluster_may_grow():
        raise NoRoom(problem)
    print(f"tokenize: warning: {problem} (unless the autoscaler adds nodes)", flush=True)
