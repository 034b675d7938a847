"""The stage registry is the one place a stage is defined: every stage has a worker, a driver builder,
data help and a command line; a stage registered from outside is runnable through `muse train`; the
stage modules import without a cycle and without Ray. No Ray is started here."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import replace

import pytest
from jobs_helpers import REPO

from jobs import cli, stages
from jobs.config import STAGES
from jobs.loop import StageWorker, worker_path
from jobs.stage import Stage


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, cfg, data, root, component, format):
        self.calls.append({"cfg": cfg, "data": data, "root": root, "component": component, "format": format})
        return []


@pytest.fixture
def no_ray(monkeypatch):
    monkeypatch.setattr("jobs.stage.ensure_ray", lambda: None)


@pytest.fixture
def registered(monkeypatch):
    """Stages registered in a test are forgotten after it."""
    monkeypatch.setattr(stages, "_registered", dict(stages._registered))


@pytest.mark.parametrize("name", STAGES)
def test_every_stage_is_defined_in_its_own_module(name, capsys):
    stage = stages.get(name)
    assert stage.name == name and stage.summary and stage.data_help
    assert issubclass(stage.worker, StageWorker) and callable(stage.build) and callable(stage.add_args)
    assert stage.worker.__module__ == f"jobs.{name}" and worker_path(stage.worker).startswith(f"jobs.{name}:")
    cli.main([])
    assert stage.summary in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        cli.main([name, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"--{stage.data}" in out and "--checkpoint" in out


def test_a_registered_stage_runs_through_the_cli_without_editing_other_modules(registered, no_ray, capsys, tmp_path):
    build = Recorder()

    def add_args(parser):
        parser.add_argument("--component", choices=("one", "two"))

    register = stages.register(Stage(name="fake", summary="a stage made in a test", worker=StageWorker, build=build,
                                     data="corpus", data_help="some corpus", add_args=add_args))
    assert stages.get("fake") is register and "fake" in stages.names()
    cli.main([])
    assert "a stage made in a test" in capsys.readouterr().out
    cli.main(["fake", "--corpus", str(tmp_path / "c"), "--checkpoint", str(tmp_path / "r"), "--component", "two"])
    [call] = build.calls
    assert (call["data"], call["root"], call["component"]) == (str(tmp_path / "c"), str(tmp_path / "r"), "two")
    stages.run_stage("fake", call["cfg"], "rel/corpus", "rel/root")  # the library entry point too
    assert build.calls[-1]["data"].endswith("/rel/corpus") and build.calls[-1]["root"].endswith("/rel/root")


@pytest.mark.parametrize("flags", [["--tokens", "T", "--checkpoint", "R"], ["--data", "T", "--output", "R"]],
                         ids=["new", "old"])
def test_old_flag_names_stay_aliases(flags, registered, no_ray, monkeypatch):
    build = Recorder()
    stages.register(replace(stages.get("base"), build=build))
    monkeypatch.chdir(REPO)
    cli.main(["base", *flags, "--model", "base-tiny"])
    [call] = build.calls
    assert (call["data"], call["root"]) == (str(REPO / "T"), str(REPO / "R"))
    assert call["cfg"].base.model == "base-tiny"


def test_a_stage_started_as_a_script_sends_its_workers_the_real_module(monkeypatch):
    """`python -m jobs.base` defines BaseWorker in __main__; Ray workers import jobs.base instead."""
    from types import SimpleNamespace

    Worker = type("BaseWorker", (StageWorker,), {"__module__": "__main__"})
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", SimpleNamespace(name="jobs.base"))
    assert worker_path(Worker) == "jobs.base:BaseWorker"


def _jobs_imports(path) -> set[str]:
    """Every jobs module that `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "jobs":
            found |= {f"jobs.{a.name}" for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jobs."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("jobs.")}
    return found


def test_jobs_modules_import_each_other_without_a_cycle_even_lazily():
    graph = {f"jobs.{p.stem}": _jobs_imports(p) for p in (REPO / "jobs").glob("*.py") if p.stem != "__init__"}

    def visit(module, path):
        assert module not in path, f"import cycle: {' -> '.join(path + [module])}"
        for dep in graph.get(module, ()):
            visit(dep, path + [module])

    for module in graph:
        visit(module, [])


def test_stage_modules_import_in_any_order_without_ray():
    """A fresh interpreter per order (in parallel; each module imported first once, the static check
    above covers the rest): no order trips over a half-imported module, and looking up every stage
    imports no Ray."""
    runs = {}
    for order in (("jobs.vqgan", "jobs.decoder", "jobs.stages"), ("jobs.decoder", "jobs.stages", "jobs.vqgan"),
                  ("jobs.stages", "jobs.vqgan", "jobs.decoder")):
        code = (f"import importlib, sys\nfor m in {list(order)!r}: importlib.import_module(m)\n"
                "from jobs import stages\n[stages.get(n) for n in stages.names()]\n"
                "assert 'ray' not in sys.modules, 'a registry lookup imported Ray'\n")
        runs[order] = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stderr=subprocess.PIPE, text=True)
    runs["python -m jobs.decoder --help"] = subprocess.Popen(
        [sys.executable, "-m", "jobs.decoder", "--help"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True)
    for order, proc in runs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (order, err[-2000:])


def test_a_finished_tokenizer_run_is_said_before_ray_starts(tmp_path, monkeypatch, capsys):
    """`muse train vqgan` again after its runs finished (or after the decoder fine-tune of vqgan_hi)
    says there is nothing to train without starting Ray; one tokenizer not finished trains."""
    from jobs_helpers import tiny_config

    from jobs import loop
    from jobs import stage as stage_module
    from muse import checkpoint

    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("vqgan_lo", "vqgan_hi"))
    cfg = tiny_config("vqgan.run.max_steps=10", "vqgan.hi_max_steps=10")

    def export(name: str, stage: str, run_name: str) -> None:
        uri = checkpoint.component_uri(root, name)
        checkpoint.save_component(checkpoint.load_component(uri), uri,
                                  extra=loop.finished_extra(stage, 10, run_name))

    def no_ray():
        raise AssertionError("Ray started")

    monkeypatch.setattr(stage_module, "ensure_ray", no_ray)
    export("vqgan_lo", "vqgan", "vqgan_lo")
    with pytest.raises(AssertionError, match="Ray started"):  # vqgan_hi is not trained yet
        stages.get("vqgan").train(cfg, str(tmp_path / "corpus"), root)
    assert stages.get("vqgan").train(cfg, str(tmp_path / "corpus"), root, component="vqgan_lo") == []
    export("vqgan_hi", "decoder", "decoder_vqgan_hi")  # the decoder fine-tune built on it
    assert stages.get("vqgan").train(cfg, str(tmp_path / "corpus"), root) == []
    assert f"{root} holds this run's finished exports: nothing to train" in capsys.readouterr().out
