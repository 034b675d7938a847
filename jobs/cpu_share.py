"""Cores for training stages that share one machine.

`muse train all` trains base and super-res side by side when both fit, and each CPU worker runs as
many torch threads as the CPUs it claims. The stage that ends first would leave its cores idle while
the other trains on: in the demo on 2 cores, super-res ends after ~9 minutes and the base then trains
~13 minutes more on one thread. So on a one-node cluster the driver hands a finished stage's CPUs to
the stages still running:

    driver:  with sharing({stage: scaling}) as share:      # a CpuShare actor, or None
                 ... a stage ends -> ray.get(share.finish.remote(stage))
    worker:  budget = ThreadBudget(share, stage, cpus)      # job["cpu_share"], set by fit_stage
             every step: budget.poll()                      # asks every few seconds, never waits

and each worker of a running stage widens its torch thread pool (base-tiny: 1.3-1.5x per step on two
threads instead of one). On a cluster of several nodes, or with GPUs, nothing is shared: the freed
CPUs may sit on a node the other stage does not use, and GPU workers do not compute on CPU threads.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

import torch

from jobs.parallel import cpu_threads


class CpuShare:
    """CPUs per worker of each stage training side by side; a Ray actor on the driver's node."""

    def __init__(self, stages: dict[str, tuple[int, float]]):
        """stages: {stage: (workers, CPUs per worker)}."""
        self.stages = dict(stages)

    def finish(self, stage: str) -> dict[str, float]:
        """`stage` ended: its CPUs go to the running stages, evenly over their workers. Returns the
        running stages' CPUs per worker."""
        workers, cpus = self.stages.pop(stage, (0, 0.0))
        running = sum(w for w, _ in self.stages.values())
        if running:
            extra = workers * cpus / running
            self.stages = {s: (w, c + extra) for s, (w, c) in self.stages.items()}
        return {s: c for s, (_, c) in self.stages.items()}

    def cpus(self, stage: str) -> float | None:
        """CPUs per worker that `stage` holds now (None for a stage not sharing)."""
        entry = self.stages.get(stage)
        return entry[1] if entry else None


_current: Any = None  # this driver's CpuShare handle while stages train side by side


def current() -> Any:
    """The CpuShare handle for workers of stages started now (None when nothing is shared)."""
    return _current


@contextlib.contextmanager
def sharing(scalings: dict[str, Any]) -> Iterator[Any]:
    """A CpuShare for stages about to train side by side ({stage: jobs.config.ScalingSettings}); yields
    its handle, or None on a cluster of several nodes, when every stage trains on GPUs, or without Ray."""
    global _current
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")] if ray.is_initialized() else []
    if len(nodes) != 1 or all(s.use_gpu for s in scalings.values()):
        yield None
        return
    handle = ray.remote(num_cpus=0)(CpuShare).remote(
        {name: (s.num_workers, s.cpus_per_worker) for name, s in scalings.items()})
    _current = handle
    try:
        yield handle
    finally:
        _current = None
        ray.kill(handle)


class ThreadBudget:
    """A worker's side: its torch threads follow the CPUs its stage holds. `poll()` runs every step;
    it sends a question to the CpuShare at most every `every` seconds and reads the answer on a later
    step, so no step waits for it. Call it from the thread that trains (torch's thread count is per
    thread)."""

    def __init__(self, handle: Any, stage: str, cpus: float, every: float = 5.0, clock=time.monotonic):
        self.handle, self.stage, self.every, self.clock = handle, stage, every, clock
        self.threads = cpu_threads(cpus)
        self.pending = None
        self.next_ask = clock() + every

    def poll(self) -> int | None:
        """The new thread count when it changed on this call, else None."""
        if self.handle is None:
            return None
        import ray

        if self.pending is None:
            if self.clock() >= self.next_ask:
                self.pending = self.handle.cpus.remote(self.stage)
                self.next_ask = self.clock() + self.every
            return None
        ready, _ = ray.wait([self.pending], timeout=0)
        if not ready:
            return None
        ref, self.pending = self.pending, None
        try:
            cpus = ray.get(ref)
        except ray.exceptions.RayError:  # the driver ended the share: keep the threads there are
            self.handle = None
            return None
        if cpus is None or cpu_threads(cpus) == self.threads:
            return None
        self.threads = cpu_threads(cpus)
        torch.set_num_threads(self.threads)
        return self.threads
