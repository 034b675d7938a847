"""A run resumed after what it trains changed under it: another LoRA rank, or the root's component
replaced (imported again with --force). Either would fail on every attempt or quietly train on the old
weights; both are refused before any worker starts."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
from jobs_helpers import tiny_config
from test_preflight import job_for, write_checkpoint

from jobs import fit, loop
from jobs.base import BaseWorker
from jobs.preflight import RunRefused, check_resume, run_identity
from muse import checkpoint

CHECKPOINT = "checkpoint_2026-12-01_10-00-00.000001"  # step 2


def test_another_lora_rank_is_refused_and_the_same_one_resumes(tmp_path):
    root, run_dir = str(tmp_path / "root"), str(tmp_path / "root" / "runs" / "base_lora")
    rank4 = replace(job_for(root), lora_rank=4)
    write_checkpoint(run_dir, CHECKPOINT, run_identity(rank4))
    assert check_resume(run_dir, run_identity(rank4), "base").step == 2
    with pytest.raises(RunRefused, match=r"another adapters: adapters LoRA rank 4 \(this run: LoRA rank 8\)"):
        check_resume(run_dir, run_identity(replace(job_for(root), lora_rank=8)), "base")


def test_a_run_that_learnt_codes_of_a_tokenizer_trained_again_since_is_refused(tmp_path):
    """Its checkpoints learnt codes that now draw other images: going on would mix them; `train all`
    re-tokenizes first, then this says how to start over."""
    root, run_dir = str(tmp_path / "root"), str(tmp_path / "root" / "runs" / "base")
    write_checkpoint(run_dir, CHECKPOINT, run_identity(replace(job_for(root), codes="a" * 64)))
    assert check_resume(run_dir, run_identity(replace(job_for(root), codes="a" * 64)), "base").step == 2
    with pytest.raises(RunRefused, match=r"another tokenizer's codes: .*trained again since that run began.*"
                                         r"--set base.run.name=NEW"):
        check_resume(run_dir, run_identity(replace(job_for(root), codes="b" * 64)), "base")
    assert check_resume(run_dir, run_identity(job_for(root)), "base").step == 2  # a stage that learns no codes


def test_resuming_over_a_component_replaced_since_the_run_started_is_refused(tmp_path, capsys):
    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("base",), seed=0)
    uri = checkpoint.component_uri(root, "base")
    job = replace(job_for(root), init_from=uri)
    run_dir = os.path.join(root, "runs", "base")
    write_checkpoint(run_dir, CHECKPOINT, run_identity(job))  # the run began from this base
    section = tiny_config("base.run.max_steps=10").base
    resume = check_resume(run_dir, run_identity(job), "base")
    assert fit._refuse_training_over_another_export(job, "base", run_dir, resume, 10, run_identity(job)) is None

    checkpoint.init_model_root("tiny", root, components=("base",), seed=1)  # written again (an import --force)
    noted = replace(job, notes=("[base] trains base-tiny from scratch; it replaces the root's base when done",))
    with pytest.raises(RunRefused, match=r"holds other weights than this run started from .* step 2"):
        fit.fit_stage(BaseWorker, section, noted, dataset=None)
    assert "from scratch" not in capsys.readouterr().out  # what the stage chose is not said before a refusal
    # The run's own export since (a finished run given more steps) is its own to continue.
    model = checkpoint.load_component(uri)
    checkpoint.save_component(model, uri, extra=loop.finished_extra("base", 2, "base"))
    resume = check_resume(run_dir, run_identity(job), "base")
    assert fit._refuse_training_over_another_export(job, "base", run_dir, resume, 10, run_identity(job)) is None


def test_an_interrupted_run_over_a_component_another_run_wrote_resumes_when_the_component_is_unchanged(tmp_path):
    """`train base`, then `train base --lora-rank 8` (run "base_lora") killed at step 2: ROOT/base is still
    run "base"'s export, the very weights the LoRA run started from, so the same command resumes."""
    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("base",))
    uri = checkpoint.component_uri(root, "base")
    checkpoint.save_component(checkpoint.load_component(uri), uri,
                              extra=loop.finished_extra("base", 500, "base"))
    job = replace(job_for(root), init_from=uri, lora_rank=8)
    run_dir = os.path.join(root, "runs", "base_lora")
    write_checkpoint(run_dir, "checkpoint_2026-12-01_10-00-00.000001", run_identity(job))
    resume = check_resume(run_dir, run_identity(job), "base")
    assert resume.step == 2 and resume.started_from == run_identity(job)["init"]
    assert fit._refuse_training_over_another_export(job, "base_lora", run_dir, resume, 10, run_identity(job)) is None


def test_a_run_with_nothing_left_to_train_says_nothing_of_what_it_would_train(tmp_path, capsys, monkeypatch):
    """"trains X from scratch; it replaces the root's base" before "nothing to train" said two
    contrary things: a run at or past its steps keeps the stage's notes to itself."""
    root = str(tmp_path / "root")
    job = replace(job_for(root), notes=("[base] trains base-tiny from scratch; it replaces the root's base when done",))
    write_checkpoint(os.path.join(root, "runs", "base"), CHECKPOINT, run_identity(job))  # step 2

    class NotesSaid(Exception):
        pass

    def after_the_notes(folder):
        raise NotesSaid

    monkeypatch.setattr(fit, "remove_unregistered", after_the_notes)
    monkeypatch.setattr(fit, "_check_room", lambda *args: None)  # no Ray here
    for max_steps, said in ((2, False), (10, True)):
        with pytest.raises(NotesSaid):
            fit.fit_stage(BaseWorker, tiny_config(f"base.run.max_steps={max_steps}").base, job, dataset=None)
        assert ("from scratch" in capsys.readouterr().out) == said
