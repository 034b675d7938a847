"""Where the job's own actors run."""

from __future__ import annotations

from typing import Any


def on_this_node() -> dict[str, Any]:
    """Actor options that place an actor on the driver's node (the head, for a submitted job): the
    job's bookkeeping actors (the progress board, tokenization's coordinator) must not land on a spot
    node whose loss would end the job."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}
