"""A model root whose component is cut short would fail every worker that loads it, attempt after
attempt (run.max_failures of them): the driver finds it first, from the files' headers."""

from __future__ import annotations

import os
import shutil

import pytest
from jobs_helpers import tiny_config

from jobs import fit
from jobs.base import BaseWorker
from jobs.preflight import RunRefused
from jobs.train_job import TrainJob
from muse.checkpoint import component_uri, init_model_root


def test_fit_stage_refuses_a_root_with_a_component_cut_short_before_any_worker(tmp_path):
    root = str(tmp_path / "root")
    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo", "base"))
    weights = os.path.join(component_uri(root, "text_encoder"), "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(1000)
    job = TrainJob(root=root, component="base", stage="base")
    with pytest.raises(RunRefused, match=r"text_encoder/model.safetensors is cut short.*every attempt"):
        fit.fit_stage(BaseWorker, tiny_config().base, job, dataset=None)
    assert not [f for f in os.listdir(tmp_path / "root" / "runs" / "base") if f.startswith("_active")]  # lock let go


def test_a_model_root_on_a_read_only_filesystem_is_refused_before_ray(tiny_data, read_only_dir, tmp_path, capsys):
    """A root this process may not write was met once Ray was up and the data open (~16 s here), as a
    traceback; the export at the end of training would have failed the same way. Refused first."""
    from jobs import stages

    shutil.copytree(tiny_data.root, tmp_path / "ro_source" / "root")
    root = str(read_only_dir / "root")
    with pytest.raises(SystemExit) as refused:
        stages.get("base").main(["--tokens", tiny_data.tokens, "--checkpoint", root, "--no-progress"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == f"muse train base: error: [Errno 30] Read-only file system: '{root}'\n"
