"""`muse train all` orchestration: stage order, skipping finished stages, base and super-res
concurrently when the cluster has room. Stages are replaced by fakes that write what a real
export writes (config.json with its "extra"), so this runs in a second without Ray."""

from __future__ import annotations

import json
import threading
import time

import pytest
from jobs_helpers import tiny_config

from jobs import all as train_all_module
from jobs.preflight import RunRefused
from muse import checkpoint, storage

ALL_STAGES = "stages=[vqgan,base,superres,decoder]"
CHECK_BEFORE_TRAINING = train_all_module.check_before_training


def write_fake_component(root: str, name: str, extra: dict) -> None:
    kind = "vqgan" if name.startswith("vqgan") else name
    storage.write_text(storage.join(root, name, "config.json"),
                       json.dumps({"kind": kind, "format_version": 1, "config": {}, "extra": extra}))


class FakeStages:
    def __init__(self, root: str):
        self.root, self.calls, self.active, self.overlap = root, [], 0, False
        self.data: dict[str, str] = {}  # stage or component -> the data it was given
        self.lock = threading.Lock()
        self.tokenized = {"run_parts": 2, "run_rows": 40}  # what tokenize.run returns

    def run_stage(self, stage, cfg, data, root, component=None, format="auto"):
        with self.lock:
            self.calls.append(component if stage in ("vqgan",) else stage)
            self.data[component if stage == "vqgan" else stage] = data
            self.active += 1
            self.overlap |= self.active > 1
        time.sleep(0.2)
        name = component if stage in ("vqgan", "decoder") else stage
        extra = {"finished": True, "stage": stage} | ({"decoder_finetuned": True} if stage == "decoder" else {})
        write_fake_component(root, name, extra)
        with self.lock:
            self.active -= 1
        return []

    def tokenize(self, corpus, tokens, models, cfg, format, progress=True, reporter=None):
        self.calls.append("tokenize")
        self.data["tokenize"], self.models = corpus, models
        return dict(self.tokenized)


@pytest.fixture
def fake(monkeypatch, tmp_path):
    from pipelines import tokenize

    root = str(tmp_path / "root")
    stages = FakeStages(root)
    monkeypatch.setattr(train_all_module, "ensure_ray", lambda: None)
    monkeypatch.setattr(train_all_module, "run_stage", stages.run_stage)
    monkeypatch.setattr(train_all_module, "check_before_training", lambda *args: None)  # fake tokens
    monkeypatch.setattr(tokenize, "run", stages.tokenize)
    monkeypatch.setattr(tokenize, "resolve_models", lambda root: tokenize.Models(f"{root}/vqgan_lo", f"{root}/text_encoder",
                                                                                 f"{root}/vqgan_hi"))
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 8.0})
    # Lines printed as said, whether or not an earlier test left Ray up or a board drawing: a board
    # draws them later, from its own thread.
    from jobs import progress

    progress.stop_display()
    monkeypatch.setattr(train_all_module, "start_display", lambda: None)
    return stages


def test_runs_every_stage_in_order_then_skips_them_all(fake):
    cfg = tiny_config(ALL_STAGES)
    report = train_all_module.train_all(cfg, "corpus", fake.root)
    assert fake.calls[:3] == ["vqgan_lo", "vqgan_hi", "tokenize"]
    assert sorted(fake.calls[3:5]) == ["base", "superres"] and fake.calls[5:] == ["decoder"]
    assert fake.overlap  # base and super-res ran at the same time
    assert checkpoint.has_component(fake.root, "text_encoder")  # written from the t5-tiny preset
    assert checkpoint.component_extra(checkpoint.component_uri(fake.root, "vqgan_hi"))["decoder_finetuned"]
    assert "trained" in report["base"]
    assert report["tokenize"].startswith("tokenized 2 parts (40 samples) in ")

    fake.calls.clear()
    report = train_all_module.train_all(cfg, "corpus", fake.root)
    assert fake.calls == []  # nothing left to do, not even tokenization
    assert all(v.startswith("skipped") for v in report.values())


def test_tokenization_with_nothing_left_says_skipped(fake):
    """A rerun after the tokens were all written (training not yet finished) tokenizes nothing: the
    report says so instead of "trained in 0s"."""
    fake.tokenized = {"run_parts": 0, "run_rows": 0}
    report = train_all_module.train_all(tiny_config("stages=[base]"), "corpus", fake.root)
    assert fake.calls == ["tokenize", "base"]
    assert report["tokenize"] == "skipped (every part already tokenized)"
    assert report["base"].startswith("trained in ")


def test_tokenizers_learn_from_the_images_given_and_the_rest_from_the_corpus(fake, tmp_path):
    corpus, images = str(tmp_path / "corpus"), str(tmp_path / "images")
    train_all_module.train_all(tiny_config(ALL_STAGES, "concurrent=false"), corpus, fake.root, images=images)
    assert fake.data["vqgan_lo"] == fake.data["vqgan_hi"] == fake.data["decoder"] == images
    assert fake.data["tokenize"] == corpus
    assert fake.data["base"] == fake.data["superres"] == storage.join(fake.root, "tokens")


def test_base_and_superres_named_into_one_run_folder_are_refused_before_any_work(fake):
    """Their checkpoints would mix in one folder (Ray's record keeping one run's), and neither could resume."""
    cfg = tiny_config(ALL_STAGES, "base.run.name=shared", "superres.run.name=shared")
    with pytest.raises(RunRefused, match="both keep their checkpoints in .*shared.*superres.run.name"):
        train_all_module.train_all(cfg, "corpus", fake.root)
    assert fake.calls == []
    train_all_module.train_all(tiny_config(ALL_STAGES, "base.run.name=shared"), "corpus", fake.root)
    assert "base" in fake.calls and "superres" in fake.calls


def test_tokens_of_tokenizers_trained_again_are_made_again_or_refused(fake, tmp_path):
    """Token shards whose tokenizers the root has retrained since (a smoke run, then the real one)
    would be refused by the resuming tokenization on every run: train all's own ROOT/tokens is made
    again; a --tokens folder of the user's is refused, not deleted."""
    from pipelines.shards import JOB_FILE

    before = json.dumps({"weights": {"vqgan_lo": {"extra": {"run": "a smoke run"}}}})
    mine = str(tmp_path / "my_tokens")
    storage.write_text(storage.join(mine, JOB_FILE), before)
    with pytest.raises(RunRefused, match="--tokens .*my_tokens holds tokens of the root's vqgan_lo"):
        train_all_module.train_all(tiny_config(ALL_STAGES, "concurrent=false"), "corpus", fake.root, tokens=mine)
    assert storage.exists(storage.join(mine, JOB_FILE)) and "tokenize" not in fake.calls
    owned = storage.join(fake.root, "tokens")
    storage.write_text(storage.join(owned, JOB_FILE), before)
    train_all_module.train_all(tiny_config(ALL_STAGES, "concurrent=false"), "corpus", fake.root)
    assert not storage.exists(storage.join(owned, JOB_FILE)) and "tokenize" in fake.calls


def test_resumes_after_the_last_finished_stage(fake):
    for name in ("vqgan_lo", "vqgan_hi"):
        write_fake_component(fake.root, name, {"finished": True, "stage": "vqgan"})
    write_fake_component(fake.root, "base", {"finished": True, "stage": "base"})
    write_fake_component(fake.root, "superres", {})  # e.g. from `muse init`: random, not trained
    train_all_module.train_all(tiny_config(ALL_STAGES, "concurrent=false"), "corpus", fake.root)
    assert fake.calls == ["tokenize", "superres", "decoder"]


def test_a_stage_is_finished_only_for_the_run_this_config_would_train(fake):
    """A smoke run's export (fewer steps than this config's) or another run's (a LoRA fine-tune) is
    trained on, not skipped; the exports of this config's runs, and the decoder's vqgan_hi, are."""
    from jobs.vqgan import component_run

    cfg = tiny_config(ALL_STAGES, "concurrent=false")
    done = {"finished": True}
    write_fake_component(fake.root, "vqgan_lo", done | {"stage": "vqgan", "run": "vqgan_lo",
                                                        "step": component_run(cfg.vqgan, "vqgan_lo").max_steps})
    write_fake_component(fake.root, "vqgan_hi", done | {"stage": "vqgan", "run": "vqgan_hi", "step": 5})
    write_fake_component(fake.root, "base", done | {"stage": "base", "run": "base", "step": cfg.base.run.max_steps})
    write_fake_component(fake.root, "superres", done | {"stage": "superres", "run": "lora", "step": 10**6})
    train_all_module.train_all(cfg, "corpus", fake.root)
    assert fake.calls == ["vqgan_hi", "tokenize", "superres", "decoder"]
    write_fake_component(fake.root, "vqgan_hi", done | {"stage": "decoder", "run": "decoder_vqgan_hi", "step": 1})
    fake.calls.clear()
    train_all_module.train_all(tiny_config(ALL_STAGES, "concurrent=false", "stages=[vqgan]"), "corpus", fake.root)
    assert fake.calls == []  # the decoder fine-tune built on it


def test_no_high_res_tokenizer_means_no_super_res_whatever_the_root_holds(fake):
    write_fake_component(fake.root, "vqgan_hi", {})  # `muse init` writes a random one
    train_all_module.train_all(tiny_config("stages=[base,superres]", "vqgan.hi_model=null"), "corpus", fake.root)
    assert fake.calls == ["tokenize", "base"] and fake.models.vqgan_hi is None


def test_sequential_when_the_cluster_has_no_room_for_both(fake, monkeypatch):
    monkeypatch.setattr("ray.cluster_resources", lambda: {"CPU": 1.0})
    train_all_module.train_all(tiny_config(ALL_STAGES), "corpus", fake.root)
    assert not fake.overlap and fake.calls[3:5] == ["base", "superres"]


def test_only_the_configured_stages_run(fake):
    train_all_module.train_all(tiny_config("stages=[vqgan,base]"), "corpus", fake.root)
    assert fake.calls == ["vqgan_lo", "vqgan_hi", "tokenize", "base"]


class FakeAutoscaler:
    """The cluster as the autoscaler grows it: no GPUs until both trainers' bundles are requested,
    then one more GPU node per poll."""

    def __init__(self, node_gpus: float = 2.0):
        self.gpus, self.node_gpus, self.requests, self.now = 0.0, node_gpus, [], 0.0

    def resources(self):
        return {"CPU": 64.0, "GPU": self.gpus}

    def request(self, bundles):
        self.requests.append(bundles)

    def sleep(self, seconds):
        self.now += seconds
        if self.requests and self.requests[-1]:
            self.gpus += self.node_gpus


GPU_TRAINERS = ["base.scaling.use_gpu=true", "base.scaling.num_workers=2",
                "superres.scaling.use_gpu=true", "superres.scaling.num_workers=2"]


def test_train_all_asks_the_autoscaler_instead_of_reading_what_is_up():
    cfg = tiny_config(*GPU_TRAINERS)
    cluster = FakeAutoscaler()
    assert train_all_module.room_for_both(cfg, cluster.resources, cluster.request, autoscaling=True,
                                          wait_s=600, sleep=cluster.sleep, clock=lambda: cluster.now)
    # Both trainers' workers, asked for at once, then withdrawn once they are up: a request stands
    # until replaced, and would keep the nodes as the cluster's minimum size after training.
    assert cluster.requests == [[{"CPU": 1.0, "GPU": 1.0}] * 4, []]
    assert cluster.gpus >= 4


def test_the_autoscaler_request_is_withdrawn_even_when_the_wait_fails():
    cfg = tiny_config(*GPU_TRAINERS)
    cluster = FakeAutoscaler()

    def broken_sleep(seconds):
        raise KeyboardInterrupt  # e.g. the user gives up waiting

    with pytest.raises(KeyboardInterrupt):
        train_all_module.room_for_both(cfg, cluster.resources, cluster.request, autoscaling=True, wait_s=600,
                                       sleep=broken_sleep, clock=lambda: cluster.now)
    assert cluster.requests[-1] == []


def test_both_trainers_must_leave_ray_data_a_cpu():
    cfg = tiny_config("base.scaling.num_workers=2", "superres.scaling.num_workers=2")  # 4 CPUs in all
    assert not train_all_module.fit_together(cfg, {"CPU": 4.0})  # every CPU taken: the reads would hang
    assert train_all_module.fit_together(cfg, {"CPU": 5.0})


def test_train_all_runs_stages_in_turn_when_the_cluster_cannot_grow():
    cfg = tiny_config(*GPU_TRAINERS)
    local = FakeAutoscaler(node_gpus=0.0)
    # A local Ray (no autoscaler) does not wait; an autoscaler that adds nothing is given up on and its
    # request withdrawn.
    assert not train_all_module.room_for_both(cfg, local.resources, local.request, autoscaling=False, wait_s=600,
                                              sleep=local.sleep, clock=lambda: local.now)
    assert local.requests == [] and local.now == 0
    assert not train_all_module.room_for_both(cfg, local.resources, local.request, autoscaling=True, wait_s=60,
                                              sleep=local.sleep, clock=lambda: local.now)
    assert local.requests[-1] == [] and local.now >= 60


def test_a_concurrent_trainer_that_fails_is_said_at_once_and_raised(fake, monkeypatch, capsys):
    real, real_say = fake.run_stage, train_all_module.say
    failure_said, said_while_superres_ran = threading.Event(), []

    def say(line):
        real_say(line)
        if "base failed" in line:
            failure_said.set()

    def base_fails(stage, *args, **kwargs):
        if stage == "base":
            raise RuntimeError("base broke")
        if stage == "superres":  # holds on until the failure is said (or gives up): "at once" means meanwhile
            said_while_superres_ran.append(failure_said.wait(timeout=10))
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(train_all_module, "say", say)
    monkeypatch.setattr(train_all_module, "run_stage", base_fails)
    with pytest.raises(RuntimeError, match="base broke"):
        train_all_module.train_all(tiny_config(ALL_STAGES), "corpus", fake.root)
    out = capsys.readouterr().out
    assert said_while_superres_ran == [True]
    assert "[all] base failed: RuntimeError: base broke; waiting for superres to finish" in out and "superres" in fake.calls


def test_a_concurrent_stage_refused_before_training_keeps_the_other_from_starting(fake, monkeypatch, capsys):
    """Side by side, each trainer starts only once both passed their checks: super-res refused on them
    ends the command at once, and base, waiting at its start, trains nothing."""
    from jobs import fit

    real, started = fake.run_stage, []

    def stage(stage, *args, **kwargs):
        if stage == "superres":
            time.sleep(0.3)  # base reaches its start first, and waits there
            raise RunRefused("superres: its run folder holds another architecture")
        if stage == "base":
            fit.start_gate.ready("base")  # where fit_stage starts its trainer
            started.append(stage)
        return real(stage, *args, **kwargs)

    monkeypatch.setattr(train_all_module, "run_stage", stage)
    begun = time.time()
    with pytest.raises(RunRefused, match="holds another architecture"):
        train_all_module.train_all(tiny_config(ALL_STAGES), "corpus", fake.root)
    out = capsys.readouterr().out
    assert started == [] and "base" not in fake.calls and time.time() - begun < 10
    assert "not started: superres failed before training" in out and fit.start_gate is None


def test_a_stage_whose_run_is_past_its_steps_is_summarised_as_nothing_trained(tmp_path):
    """A run at or past max_steps trains nothing and exports its checkpoint: `train all`'s summary says
    so, instead of "trained"."""
    from test_preflight import write_checkpoint

    root = str(tmp_path / "root")
    write_checkpoint(f"{root}/runs/base", "checkpoint_2026-12-01_10-00-00.000001", None)  # step 2
    past = tiny_config("base.run.max_steps=2")
    assert train_all_module.reached_step(past, root, "base") == 2
    assert train_all_module.trained_outcome(2, 11.2) == "nothing to train (its run was at step 2), exported in 11s"
    assert train_all_module.reached_step(tiny_config("base.run.max_steps=10"), root, "base") is None
    assert train_all_module.reached_step(past, root, "superres") is None  # no run yet
    assert train_all_module.trained_outcome(None, 11.2, " (concurrently)") == "trained in 11s (concurrently)"


def test_a_superres_run_that_would_be_refused_is_refused_before_base_trains(fake, monkeypatch, ray_session, tiny_data):
    """`train all` trained base (hours at paper size), then super-res was refused at its start (here: a
    batch larger than the tokens hold), and every rerun found the refusal there again. Each
    transformer's start checks run on the real tokens and root before either trains."""
    real_check = CHECK_BEFORE_TRAINING  # the fixture's fake stands in for it in train_all
    fits = ("stages=[base,superres]", "concurrent=false", "base.run.batch_size=8", "superres.run.batch_size=8")
    real_check(["base", "superres"], tiny_config(*fits), tiny_data.tokens, tiny_data.root)
    cfg = tiny_config(*fits, "superres.run.batch_size=64")
    with pytest.raises(RunRefused, match=r"^superres: the data has 24 rows, fewer than one batch of 64"):
        real_check(["base", "superres"], cfg, tiny_data.tokens, tiny_data.root)

    checked = []

    def refuse(todo, cfg, tokens, root):
        checked.append((list(todo), fake.calls[-1]))
        raise RunRefused("superres: refused")

    monkeypatch.setattr(train_all_module, "check_before_training", refuse)
    with pytest.raises(RunRefused, match="superres: refused"):
        train_all_module.train_all(tiny_config("stages=[vqgan,base,superres]", "concurrent=false"), "corpus",
                                   fake.root)
    assert checked == [(["base", "superres"], "tokenize")] and "base" not in fake.calls
