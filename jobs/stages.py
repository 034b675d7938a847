"""The registry of training stages: the one place that maps a stage name to its `jobs.stage.Stage`.

A stage named in `jobs.config.STAGES` lives in the module `jobs.<name>` as `STAGE`; it is imported
the first time it is looked up, so listing or finding a stage imports torch but never Ray. `register`
adds a stage from elsewhere (a test, an extension). Adding a stage means writing `jobs/<name>.py`
and its section in `jobs/config.py`; `muse train <name>`, `run_stage` and the Ray Train loop find it here.

    run_stage(stage, cfg, data, root, component=None, format="auto") -> [ray.train.Result]

trains one stage on `data` (token shards for base/superres, a corpus for vqgan/decoder) and exports
into the model root `root`. The component lands in ROOT when the run ends.
"""

from __future__ import annotations

import importlib
from typing import Any

from jobs.config import STAGES, TrainConfig
from jobs.stage import Stage

_registered: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Make `stage` known by its name (replacing one of the same name); returns it."""
    _registered[stage.name] = stage
    return stage


def names() -> tuple[str, ...]:
    """Every stage, in recipe order, then the registered extras."""
    return tuple(STAGES) + tuple(n for n in _registered if n not in STAGES)


def get(name: str) -> Stage:
    if name not in _registered:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages are {names()}")
        stage = importlib.import_module(f"jobs.{name}").STAGE
        if stage.name != name:
            raise ValueError(f"jobs.{name}.STAGE is named {stage.name!r}")
        _registered.setdefault(name, stage)
    return _registered[name]


def run_stage(stage: str, cfg: TrainConfig, data: str, root: str, *, component: str | None = None,
              format: str = "auto") -> list[Any]:
    """Train one stage on `data` and export into the model root `root`; returns the Ray Train results
    (one per trained component)."""
    return get(stage).train(cfg, data, root, component=component, format=format)
