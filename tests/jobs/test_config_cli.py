"""Training configs (YAML overrides only, strict keys) and the `muse train` command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from jobs_helpers import REPO, tiny_config

from jobs import cli, stages
from jobs.config import load_config
from jobs.stage import cli_overrides


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("train_*.yaml")), ids=lambda p: p.name)
def test_every_training_yaml_loads(path: Path):
    cfg = load_config(path)
    assert cfg.base.model.startswith("base-") and cfg.superres.model.startswith("superres-")


def _leaves(data: dict, path: tuple[str, ...] = ()):
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaves(value, (*path, key))
        else:
            yield (*path, key), value


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_yaml_holds_only_what_differs_from_the_defaults(path: Path):
    """A YAML that repeats a default hides which settings a recipe chose, and keeps an old value
    when the default moves on."""
    import yaml

    from muse.config import to_dict
    from pipelines.config import TokenizeConfig

    defaults = to_dict(TokenizeConfig() if path.name.startswith("tokenize") else load_config())
    repeated = []
    for keys, value in _leaves(yaml.safe_load(path.read_text()) or {}):
        default = defaults
        for key in keys:
            default = default.get(key, KeyError) if isinstance(default, dict) else KeyError
        if default == value:
            repeated.append(".".join(keys))
    assert not repeated, f"{path.name} repeats defaults: {repeated}"


def test_tiny_and_3b_configs_hold_what_they_promise():
    tiny = load_config(REPO / "configs" / "train_tiny.yaml")
    assert (tiny.text_encoder, tiny.vqgan.lo_model, tiny.base.model) == ("t5-tiny", "vqgan-tiny", "base-tiny")
    assert tiny.base.text_dropout == 0.1  # the default, not overridden
    big = load_config(REPO / "configs" / "train_3b.yaml")
    assert big.base.model == "base-3b" and big.base.scaling.strategy == "fsdp" and big.base.scaling.use_gpu


def test_unknown_keys_and_bad_values_are_rejected(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base:\n  optim:\n    learning_rate: 0.1\n")
    with pytest.raises(ValueError, match=r"^TrainConfig\.base\.optim: unknown key\(s\) \['learning_rate'\]; valid keys"):
        load_config(bad)  # the section's path: a config has a run and an optim section per stage
    with pytest.raises(ValueError, match=r"^TrainConfig\.superres\.optim: lr > 0, two betas"):
        load_config(None, ["superres.optim.betas=[0.9,0.9,0.9]"])
    with pytest.raises(ValueError, match=r"^TrainConfig\.base\.run\.max_steps: expected int"):
        load_config(None, ["base.run.max_steps=abc"])
    with pytest.raises(ValueError, match="a directory, not a file"):
        load_config(tmp_path)
    with pytest.raises(ValueError, match="num_workers"):
        load_config(None, ["base.scaling.num_workers=0"])
    with pytest.raises(ValueError, match="strategy"):
        load_config(None, ["base.scaling.strategy=zero3"])
    with pytest.raises(ValueError, match="not a BaseTransformerConfig preset"):
        load_config(None, ["base.model=superres-tiny"])
    with pytest.raises(ValueError, match="text_dropout.*dropped"):
        load_config(None, ["base.text_dropout=0.9"])  # a keep-probability passed as the drop rate


def test_command_line_flags_become_typed_overrides():
    args = argparse.Namespace(workers=4, max_steps=100, cpus_per_worker=None, storage="s3://b/runs",
                              gpus_per_worker=1.0, no_progress=True, set=["base.optim.lr=3e-4"])
    cfg = load_config(None, cli_overrides(args, ["base"]))
    assert cfg.base.scaling.num_workers == 4 and cfg.base.scaling.use_gpu and cfg.base.scaling.gpus_per_worker == 1.0
    assert cfg.base.run.max_steps == 100 and cfg.base.run.storage_path == "s3://b/runs"
    assert cfg.base.run.progress is False and cfg.base.optim.lr == 3e-4
    assert cfg.superres.scaling.num_workers == 1  # other stages untouched


@pytest.mark.parametrize("stage", ["vqgan", "base", "superres", "decoder", "all"])
def test_every_stage_has_help(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"muse train {stage}" in out and "--output" in out and "--config" in out


def test_train_without_a_known_stage_lists_the_stages(capsys):
    cli.main([])
    out = capsys.readouterr().out
    assert all(stage in out for stage in stages.names() + ("all",))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bogus"])
    assert exit_info.value.code == 2


def test_elastic_scaling_and_failure_policy():
    from jobs.config import ScalingSettings

    cfg = load_config(None, ["base.scaling.num_workers=8", "base.scaling.min_workers=2"])
    assert cfg.base.scaling.workers() == (2, 8)  # Ray Train's elastic (min, max)
    assert ScalingSettings(num_workers=4).workers() == 4
    assert cfg.base.run.max_failures == 100  # long runs survive many node losses by default
    for bad in ("0", "9"):
        with pytest.raises(ValueError, match="min_workers"):
            load_config(None, ["base.scaling.num_workers=8", f"base.scaling.min_workers={bad}"])


@pytest.mark.parametrize("stage", ["vqgan", "decoder"])
def test_gan_stages_refuse_fsdp_instead_of_ignoring_it(stage):
    with pytest.raises(ValueError, match=f"{stage}.scaling.strategy.*ddp"):
        load_config(None, [f"{stage}.scaling.strategy=fsdp"])
    assert load_config(None, ["base.scaling.strategy=fsdp"]).base.scaling.strategy == "fsdp"


def test_placement_group_cleaner_override_only_on_the_checked_ray(monkeypatch):
    import ray
    from ray.train.torch import TorchTrainer

    from jobs import fit

    assert ray.__version__.startswith(fit.CLEANER_OVERRIDE_RAY)
    assert fit._trainer_class() is not TorchTrainer and issubclass(fit._trainer_class(), TorchTrainer)
    monkeypatch.setattr(ray, "__version__", "9.0.0")
    assert fit._trainer_class() is TorchTrainer  # another release: the stock trainer, not a blind override


def test_max_steps_caps_both_vqgan_runs(tmp_path, monkeypatch):
    """vqgan.hi_max_steps (3,000 in the shipped configs) used to win over --max-steps for vqgan_hi, so
    a 10-step smoke run trained the high-res tokenizer 3,000 steps."""
    import jobs.data
    from jobs import vqgan

    runs = []
    monkeypatch.setattr(vqgan, "fit_stage", lambda worker, section, job, dataset: runs.append(
        (job.component, section.run.max_steps)))
    monkeypatch.setattr(jobs.data, "image_dataset", lambda *a, **k: None)
    parser = vqgan.STAGE.parser()
    for extra, hi in (([], 10), (["--set", "vqgan.hi_max_steps=50"], 50)):  # an explicit --set still wins
        args = parser.parse_args(["--corpus", "c", "--checkpoint", str(tmp_path), "--config",
                                  str(REPO / "configs" / "demo.yaml"), "--max-steps", "10"] + extra)
        cfg = load_config(args.config, cli_overrides(args, ["vqgan"]))
        runs.clear()
        vqgan.build(cfg, "c", str(tmp_path), None, "auto")
        assert runs == [("vqgan_lo", 10), ("vqgan_hi", hi)]
    without = parser.parse_args(["--corpus", "c", "--checkpoint", str(tmp_path), "--config",
                                 str(REPO / "configs" / "demo.yaml")])
    assert load_config(without.config, cli_overrides(without, ["vqgan"])).vqgan.hi_max_steps == 3000
    args = argparse.Namespace(workers=None, max_steps=10, cpus_per_worker=None, storage=None, gpus_per_worker=None,
                              no_progress=False, set=[])
    assert not any("hi_max_steps" in o for o in cli_overrides(args, ["base"]))  # only the vqgan section has it


def test_model_help_says_a_run_of_the_same_name_resumes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["base", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "from scratch unless the run name" in help_text and "--set base.run.name=NEW" in help_text


def test_sample_grids_go_beside_the_run_when_it_is_stored_elsewhere(tmp_path):
    """Two runs of one name, one under ROOT/runs and one under run.storage_path, keep their own grids."""
    from jobs.fit import samples_dir

    root = str(tmp_path / "root")
    assert samples_dir(root, tiny_config().base.run, "base") == f"{root}/samples/base"
    elsewhere = tiny_config("base.run.storage_path=s3://bucket/runs").base.run
    assert samples_dir(root, elsewhere, "base") == "s3://bucket/runs/base/samples"
