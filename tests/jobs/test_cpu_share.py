"""A stage that ends first leaves its CPUs to the stage still training beside it (jobs.cpu_share):
the share's arithmetic, and a worker thread widening its torch pool through a real Ray actor."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from jobs.config import ScalingSettings
from jobs.cpu_share import CpuShare, ThreadBudget, sharing
from jobs.parallel import configure_cpu_worker, cpu_threads


def test_a_finished_stage_s_cpus_are_split_over_the_running_workers():
    share = CpuShare({"base": (2, 1.0), "superres": (1, 2.0), "decoder": (1, 1.0)})
    assert share.finish("superres") == {"base": 1 + 2 / 3, "decoder": 1 + 2 / 3}
    assert share.cpus("superres") is None and share.cpus("base") == pytest.approx(5 / 3)
    assert share.finish("decoder") == {"base": pytest.approx(5 / 3 + 5 / 3 / 2)}
    assert share.finish("base") == {} and share.finish("base") == {}  # the last one, then again: nothing


def test_threads_never_exceed_the_cores_this_process_may_use():
    import os

    cores = len(os.sched_getaffinity(0))
    assert cpu_threads(0.25) == 1 and cpu_threads(1.9) == 1
    assert cpu_threads(cores + 6) == cores


def test_a_training_thread_widens_its_pool_when_the_stage_beside_it_ends(ray_session):
    ray = ray_session
    with sharing({"base": ScalingSettings(cpus_per_worker=1), "superres": ScalingSettings(cpus_per_worker=1)}) as share:
        assert share is not None  # one node, CPU workers
        seen: dict = {}

        def train():  # as a Ray Train worker's training thread does
            configure_cpu_worker(1)
            budget = ThreadBudget(share, "base", 1, every=0.0)
            seen["before"] = torch.get_num_threads()
            seen["polls_before"] = [budget.poll() for _ in range(20)]  # answered: 1 CPU, no change
            ray.get(share.finish.remote("superres"))
            deadline, changed = time.monotonic() + 30, None
            while changed is None and time.monotonic() < deadline:
                changed = budget.poll()
                time.sleep(0.01)
            seen["changed"], seen["after"] = changed, torch.get_num_threads()

        worker = threading.Thread(target=train)
        worker.start()
        worker.join(60)
    assert seen["before"] == 1 and set(seen["polls_before"]) == {None}
    if cpu_threads(2) == 1:
        pytest.skip("one core: there is nothing to widen to")
    assert seen["changed"] == seen["after"] == 2


def test_nothing_is_shared_when_every_stage_trains_on_gpus(ray_session):
    gpu = ScalingSettings(use_gpu=True, gpus_per_worker=1)
    with sharing({"base": gpu, "superres": gpu}) as share:
        assert share is None
    assert ThreadBudget(None, "base", 1).poll() is None
