"""Trainers the cluster cannot hold, refused before a Ray Train run starts (jobs.preflight.room_problem,
checked by jobs.fit): more CPUs or GPUs than the cluster has, or every CPU, which leaves Ray Data's
read tasks none. Ray Train would wait for its placement group for ever, or the data would never
come; on a cluster that may grow it is a warning. No Ray is started."""

from __future__ import annotations

import pytest
from jobs_helpers import tiny_config
from test_preflight import job_for

from jobs import fit
from jobs.base import BaseWorker
from jobs.config import ScalingSettings
from jobs.preflight import RunRefused, data_cpu_problem


def test_trainers_must_leave_ray_data_a_cpu():
    assert data_cpu_problem("base", ScalingSettings(num_workers=3), 4.0) is None
    problem = data_cpu_problem("base", ScalingSettings(num_workers=4), 4.0)  # --workers 4 on a 4-CPU local Ray
    assert "take 4 of the cluster's 4 CPUs" in problem and "at 3 or less" in problem
    assert data_cpu_problem("base", ScalingSettings(num_workers=7, cpus_per_worker=0.5), 4.0)  # 3.5 of 4
    assert data_cpu_problem("base", ScalingSettings(num_workers=6, cpus_per_worker=0.5), 4.0) is None
    elastic = ScalingSettings(num_workers=8, min_workers=2)  # the fewest it runs with is what it must hold
    assert data_cpu_problem("base", elastic, 4.0) is None


def test_fit_stage_refuses_a_trainer_that_starves_the_data_on_a_cluster_that_cannot_grow(tmp_path, monkeypatch,
                                                                                          capsys):
    import ray

    from jobs import progress

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    section = tiny_config("base.scaling.num_workers=4").base
    with pytest.raises(RunRefused, match="would wait forever"):
        fit.fit_stage(BaseWorker, section, job_for(str(tmp_path / "root")), dataset=None)
    # A cluster with an autoscaler may add nodes: said, not refused.
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")
    monkeypatch.setattr(progress, "_display", None)
    monkeypatch.setattr(fit, "_ROOM_WARNED", set())
    fit._check_room("base", section.scaling, streamed=True)
    fit._check_room("base", section.scaling, streamed=True)  # `train all`: before the first stage, then its own
    assert capsys.readouterr().out.count("warning: base: its workers take 4") == 1


def test_a_trainer_larger_than_the_cluster_is_refused_whether_its_data_is_cached_or_streamed():
    """Ray Train would wait for its placement group for ever, silently (Ctrl-C included)."""
    from jobs.preflight import room_problem

    cpus = {"CPU": 4.0}
    assert room_problem("base", ScalingSettings(num_workers=4), cpus, streamed=False) is None  # cached data
    assert "take 5 CPUs and the cluster has 4" in room_problem("base", ScalingSettings(num_workers=5), cpus, False)
    assert "leaving less than 1" in room_problem("base", ScalingSettings(num_workers=4), cpus, streamed=True)
    gpu = ScalingSettings(num_workers=2, use_gpu=True, gpus_per_worker=1.0)
    assert "ask for 2 GPUs and the cluster has 0" in room_problem("base", gpu, cpus, False)
    assert room_problem("base", gpu, {"CPU": 4.0, "GPU": 2.0}, False) is None
