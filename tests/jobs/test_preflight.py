"""What the driver refuses before a Ray Train run starts (jobs.preflight, wired in jobs.fit.fit_stage):
a run name whose checkpoints belong to another root, component or architecture; LoRA with nothing to
adapt; fewer rows than a batch per worker (trainers the cluster cannot hold: test_room.py). Each of these used to
fail inside the workers, where Ray Train retried it run.max_failures (100) times without a word, or
to hang. No Ray is started: the checks run before the trainer is built."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch
from jobs_helpers import tiny_config
from torch import nn

from jobs import fit, loop, masked
from jobs.base import BaseWorker
from jobs.checkpointing import save_sharded
from jobs.common import build_optimizer, build_scheduler
from jobs.config import OptimSettings
from jobs.parallel import WorkerEnv
from jobs.stage import named_run
from jobs.preflight import (RAY_TRAIN_SNAPSHOT, ResumePoint, RunRefused, check_resume, check_rows,
                            newest_checkpoint_state, remove_unregistered, run_identity)
from jobs.train_job import TrainJob
from muse import storage

MODEL = {"layers": 2, "hidden": 64}


def job_for(root: str, model: dict = MODEL, component: str = "base") -> TrainJob:
    return TrainJob(root=root, component=component, stage=component, model_config=model)


def write_checkpoint(run_dir: str, name: str, identity: dict | None) -> str:
    """A real sharded checkpoint of a tiny module, as a worker's save_sharded writes it."""
    torch.manual_seed(0)
    module = nn.Linear(4, 4)
    opt = build_optimizer(module, OptimSettings(), WorkerEnv())
    directory = os.path.join(run_dir, name)
    os.makedirs(directory)
    save_sharded(directory, step=2, env=WorkerEnv(), modules={"model": module}, optimizers={"model": opt},
                 schedulers={"model": build_scheduler(opt, OptimSettings(), 10)}, ema=None, counters={},
                 identity=identity)
    return directory


def test_checkpoints_name_their_run_and_only_that_run_resumes_them(tmp_path):
    root, run_dir = str(tmp_path / "r2"), str(tmp_path / "r2" / "runs" / "base")
    identity = run_identity(job_for(root))
    assert identity["root"] == root and identity["component"] == "base" and len(identity["model"]) == 64
    assert run_identity(job_for("file://" + root + "/")) == identity  # one location, one identity
    assert check_resume(run_dir, identity, "base") is None  # nothing there yet: a fresh run
    older = write_checkpoint(run_dir, "checkpoint_2026-12-01_10-00-00.000001", identity)
    newest = write_checkpoint(run_dir, "checkpoint_2026-12-01_11-00-00.000001", identity)
    os.makedirs(os.path.join(run_dir, "checkpoint_2026-12-01_12-00-00.000001"))  # an upload that never finished
    assert json.load(open(os.path.join(newest, "trainer_state.json")))["identity"] == identity
    assert newest_checkpoint_state(run_dir)[0] == newest and older < newest
    assert check_resume(run_dir, identity, "base") == ResumePoint(newest, 2)  # the same run: resumed

    other_root = run_identity(job_for(str(tmp_path / "r4")))  # --storage shared with another root
    with pytest.raises(RunRefused) as refused:
        check_resume(run_dir, other_root, "base")
    message = str(refused.value)
    assert f"model root {root} (this run: {tmp_path / 'r4'})" in message
    assert "--set base.run.name=NEW" in message and f"delete {run_dir}" in message and newest in message

    other_model = run_identity(job_for(root, {"layers": 3, "hidden": 64}))  # --model of another architecture
    with pytest.raises(RunRefused, match=r"another architecture: architecture config sha256 \w{12} \(this run"):
        check_resume(run_dir, other_model, "base")


def test_a_copied_roots_run_resumes_in_the_copy(tmp_path, s3_bucket):
    """A root copied or moved with its runs (to S3 for the cluster, say) resumes them, saying from
    where; a copy of only the run folder, outside the root, is still another root's run."""
    from jobs.fit import resume_line
    from jobs_helpers import copy_tree

    root = str(tmp_path / "laptop")
    newest = write_checkpoint(f"{root}/runs/base", "checkpoint_2026-12-01_10-00-00.000001",
                              run_identity(job_for(root)))
    for copy in (str(tmp_path / "moved"), f"{s3_bucket}/cluster"):
        copy_tree(root, copy)
        resume = check_resume(f"{copy}/runs/base", run_identity(job_for(copy)), "base")
        assert resume == ResumePoint(storage.join(f"{copy}/runs/base", os.path.basename(newest)), 2, None, root)
        assert resume_line("base", resume, 10, "base").endswith(
            f"; its checkpoints name the model root {root}, which this root was copied or moved from)")
    copy_tree(f"{root}/runs", str(tmp_path / "shared_runs"))  # --storage elsewhere: not the root's own
    with pytest.raises(RunRefused, match="another model root"):
        check_resume(str(tmp_path / "shared_runs" / "base"), run_identity(job_for(str(tmp_path / "moved"))), "base")


def test_a_checkpoint_without_an_identity_resumes_as_before(tmp_path):
    run_dir = str(tmp_path / "runs" / "base")
    old = write_checkpoint(run_dir, "checkpoint_2026-12-01_10-00-00.000001", None)
    assert "identity" not in json.load(open(os.path.join(old, "trainer_state.json")))
    assert check_resume(run_dir, run_identity(job_for(str(tmp_path / "anything"))), "base").uri == old


def test_the_identity_is_read_where_the_checkpoints_lie_on_s3(s3_bucket, tmp_path):
    local = str(tmp_path / "run")
    identity = run_identity(job_for(f"{s3_bucket}/model"))
    assert identity["root"] == f"{s3_bucket}/model"
    write_checkpoint(local, "checkpoint_2026-12-01_10-00-00.000001", identity)
    for path in sorted(p for p in (tmp_path / "run").rglob("*") if p.is_file()):
        storage.write_bytes(storage.join(f"{s3_bucket}/runs/base", str(path.relative_to(local))), path.read_bytes())
    assert check_resume(f"{s3_bucket}/runs/base", identity, "base").uri.startswith(f"{s3_bucket}/runs/base/checkpoint_")
    with pytest.raises(RunRefused, match="another component"):
        check_resume(f"{s3_bucket}/runs/base", identity | {"component": "superres"}, "superres")


def test_fit_stage_refuses_another_runs_checkpoint_before_building_a_trainer(tmp_path):
    root = str(tmp_path / "root")
    write_checkpoint(str(tmp_path / "root" / "runs" / "base"), "checkpoint_2026-12-01_10-00-00.000001",
                     run_identity(job_for(root)))
    section = tiny_config().base
    with pytest.raises(RunRefused, match="another architecture"):
        fit.fit_stage(BaseWorker, section, job_for(root, {"layers": 9}), dataset=None)


def test_too_few_rows_for_a_batch_per_worker_are_refused(tmp_path):
    check_rows("base", 64, batch_size=32, workers=2)  # exactly one batch each
    with pytest.raises(RunRefused, match="63 rows, fewer than one batch of 32 for each of 2 worker"):
        check_rows("base", 63, batch_size=32, workers=2)
    check_rows("base", None, batch_size=32, workers=2)  # unknown: the worker says so if it must
    section = tiny_config("base.run.batch_size=32", "base.scaling.num_workers=2").base
    with pytest.raises(RunRefused, match="24 rows"):
        fit.fit_stage(BaseWorker, section, job_for(str(tmp_path / "root")), dataset=None, rows=24)


@pytest.fixture
def fake_build(monkeypatch, tiny_data):
    """masked.build with the dataset and the run faked: what it hands fit_stage, or what it refuses."""
    import jobs.data

    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_dim": 64, "text_storage": "ids"}
    monkeypatch.setattr(jobs.data, "token_dataset", lambda *a, **k: ("dataset", info))
    calls = []
    monkeypatch.setattr(masked, "fit_stage", lambda worker, section, job, dataset, rows=None: calls.append(
        (job, rows)) or ["result"])
    return calls


def test_lora_without_a_component_to_adapt_is_refused_on_the_driver(fake_build, tiny_data, tmp_path):
    cfg = tiny_config("base.lora_rank=4", "base.model=base-632m")  # a new architecture: nothing to adapt
    with pytest.raises(RunRefused, match=r"asks for a new base-632m: leave it unset \(after --config: --set "
                                         r"base.model=null\)"):
        masked.build("base", BaseWorker, cfg, tiny_data.tokens, tiny_data.root)
    empty = str(tmp_path / "empty")
    shutil.copytree(tiny_data.root, empty)
    shutil.rmtree(os.path.join(empty, "base"))
    with pytest.raises(RunRefused, match=f"{empty} has no base/"):
        masked.build("base", BaseWorker, tiny_config("base.lora_rank=4", "base.model=null"), tiny_data.tokens, empty)
    assert fake_build == []  # no run was started
    masked.build("base", BaseWorker, tiny_config("base.lora_rank=4", "base.model=null"), tiny_data.tokens,
                 tiny_data.root)
    # train_tiny.yaml's own base.model (base-tiny) is the root's architecture: that is adapted too.
    masked.build("base", BaseWorker, tiny_config("base.lora_rank=4"), tiny_data.tokens, tiny_data.root)
    assert [job.init_from for job, _ in fake_build] == [os.path.join(tiny_data.root, "base")] * 2
    assert all(rows == 24 for _, rows in fake_build)  # the shards' manifest says 24 rows


def test_the_command_line_says_a_refusal_in_one_line(fake_build, tiny_data, monkeypatch, capsys):
    import jobs.stage
    from jobs import base

    monkeypatch.setattr(jobs.stage, "ensure_ray", lambda: None)
    with pytest.raises(SystemExit) as exit_info:  # --lora-rank with --model naming another architecture
        base.main(["--tokens", tiny_data.tokens, "--checkpoint", tiny_data.root, "--model", "base-632m",
                   "--lora-rank", "2", "--no-progress"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("muse train base: error: base.lora_rank: LoRA adapts") and "\n" not in err
    assert fake_build == []


def test_data_and_roots_a_stage_cannot_use_are_one_line_too(tiny_data, tmp_path, monkeypatch, capsys):
    """No token shards where --tokens points, a root without the component to fine-tune: refused in
    one line (exit 2), where they were tracebacks (exit 1)."""
    import jobs.stage
    from jobs import base, decoder
    from muse.checkpoint import init_model_root

    monkeypatch.setattr(jobs.stage, "ensure_ray", lambda: None)
    lacking = str(tmp_path / "lacking")
    init_model_root("tiny", lacking, components=("text_encoder",))
    for command, argv, said in (
            (base.main, ["--tokens", str(tmp_path / "nothing"), "--checkpoint", tiny_data.root],
             "nothing does not exist: give the --output of a `muse tokenize` run"),
            (decoder.main, ["--corpus", tiny_data.corpus, "--checkpoint", lacking], "has no vqgan_lo/ to fine-tune")):
        with pytest.raises(SystemExit) as exit_info:
            command([*argv, "--no-progress"])
        err = capsys.readouterr().err.strip()
        assert exit_info.value.code == 2 and said in err and "\n" not in err, err


def test_caption_ids_of_another_tokenizer_are_refused(tiny_data, tmp_path, monkeypatch, capsys):
    """Tokens made through another root's text encoder (a fitted BPE vocabulary, read here as bytes)
    trained without a word: the model learns other words than its prompts give."""
    import shutil

    import jobs.stage
    from jobs import base
    from muse.checkpoint import component_uri
    from pipelines.config import load_config
    from pipelines.job_spec import job_spec, text_ids_mismatch
    from pipelines.shards import JOB_FILE
    from pipelines.tokenize import resolve_models

    spec = json.loads(json.dumps(job_spec(tiny_data.corpus, load_config(None), resolve_models(tiny_data.root))))
    text_encoder = component_uri(tiny_data.root, "text_encoder")
    assert text_ids_mismatch(spec, text_encoder) is None  # the root that made them
    other = json.loads(json.dumps(spec))
    other["text_encoder"] |= {"tokenizer": "bpe", "vocab_size": 1024}
    assert text_ids_mismatch(other, text_encoder) == "tokenizer 'bpe' vs 'byt5', vocab_size 1024 vs 384"
    refitted = json.loads(json.dumps(spec))
    refitted["weights"]["text_encoder"]["files_sha256"] = {"tokenizer.json": "0" * 64}
    assert text_ids_mismatch(refitted, text_encoder) == "other tokenizer files"
    assert text_ids_mismatch(other | {"text_storage": "embeddings"}, text_encoder) is None  # no ids to misread

    tokens = str(tmp_path / "tokens")
    shutil.copytree(tiny_data.tokens, tokens)
    with open(os.path.join(tokens, JOB_FILE), "w") as f:
        json.dump(other, f)
    monkeypatch.setattr(jobs.stage, "ensure_ray", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        base.main(["--tokens", tokens, "--checkpoint", tiny_data.root, "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "hold caption ids of another tokenizer" in err and "\n" not in err, err


def test_a_finished_run_started_again_leaves_a_later_runs_export_alone(tmp_path):
    """`muse train vqgan` again after the decoder fine-tune: the vqgan_hi run trains nothing and must not
    export its old weights over the fine-tuned decoder (the export names the run that wrote it)."""
    from muse import checkpoint

    root = str(tmp_path / "root")
    job = TrainJob(root=root, component="vqgan_hi", run_name="vqgan_hi")
    assert loop.other_run_export(job) is None  # nothing in the root yet: export
    model = checkpoint.build_component("vqgan_hi", checkpoint.model_preset("tiny").vqgan_hi)
    uri = checkpoint.component_uri(root, "vqgan_hi")
    checkpoint.save_component(model, uri, extra=loop.finished_extra("vqgan_hi", 10, "vqgan_hi"))
    assert loop.other_run_export(job) is None  # its own export: writing it again changes nothing
    checkpoint.save_component(model, uri, extra=loop.finished_extra("decoder", 4, "decoder_vqgan_hi"))
    assert loop.other_run_export(job) == "decoder_vqgan_hi"


def test_the_vqgan_stage_continues_the_roots_tokenizer_unless_a_preset_is_named(tmp_path, capsys):
    """`muse train vqgan` on a tiny root trained the paper's 58M-parameter VQGAN (~110 s a step on 2
    cores) whatever the root held: "auto" continues the root's own, an empty root gets the paper's."""
    from jobs.vqgan import tokenizer_config
    from muse import checkpoint
    from muse.config import preset

    root = str(tmp_path / "root")
    cfg, continued = tokenizer_config(root, "vqgan_lo", "auto")
    assert cfg == preset("vqgan-f16-8192") and not continued  # empty root: the paper's
    checkpoint.init_model_root("tiny", root, components=("vqgan_lo",))
    tiny = checkpoint.read_component_config(checkpoint.component_uri(root, "vqgan_lo"))[1]
    cfg, continued = tokenizer_config(root, "vqgan_lo", "auto")
    assert cfg == tiny and continued and "continues the model root's vqgan_lo" in capsys.readouterr().out
    cfg, continued = tokenizer_config(root, "vqgan_lo", "vqgan-f16-8192")
    assert cfg == preset("vqgan-f16-8192") and not continued
    assert "replaces the root's vqgan_lo" in capsys.readouterr().out


def test_token_shards_remember_their_tokenizers_weights_and_training_refuses_them_once_the_root_moved_on(tmp_path):
    """Tokens made before the root's VQGAN was trained again: tokenize refuses to resume into them
    (weights in its job spec), and a transformer stage refuses to learn them."""
    from jobs.root_fit import stale_tokens_problem
    from muse import checkpoint
    from muse.components import component_version
    from pipelines.tokenize import Models, job_spec

    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("text_encoder", "vqgan_lo"))
    lo = checkpoint.component_uri(root, "vqgan_lo")
    models = Models(vqgan_lo=lo, text_encoder=checkpoint.component_uri(root, "text_encoder"))
    from pipelines.config import TokenizeConfig

    spec = job_spec(str(tmp_path / "corpus"), TokenizeConfig(), models)
    assert spec["weights"]["vqgan_lo"] == component_version(lo)
    assert stale_tokens_problem("base", root, "TOKENS", spec) is None
    model = checkpoint.load_component(lo)
    checkpoint.save_component(model, lo, extra=loop.finished_extra("vqgan", 1000, "vqgan_lo"))
    assert job_spec(str(tmp_path / "corpus"), TokenizeConfig(), models)["weights"] != spec["weights"]
    assert "hold the codes of the model root's vqgan_lo as it was before" in stale_tokens_problem("base", root, "TOKENS",
                                                                                                   spec)


def test_a_run_started_again_says_where_it_resumes_or_that_it_is_finished(tmp_path):
    run_dir = str(tmp_path / "runs" / "base")
    uri = write_checkpoint(run_dir, "checkpoint_2026-12-01_10-00-00.000001", None)  # step 2
    resume = check_resume(run_dir, run_identity(job_for(str(tmp_path))), "base")
    assert fit.resume_line("base", resume, 10, "base") == f"[base] resumes its run at step 2 of 10 ({uri})"
    finished = fit.resume_line("base", resume, 2, "superres")
    assert "already finished at step 2 of 2: nothing to train" in finished
    assert "--set superres.run.name=NEW" in finished
    # A checkpoint past a lowered --max-steps: not "finished at step 2 of 1", which it never was.
    assert "checkpoint is at step 2, past --max-steps 1: nothing to train" in fit.resume_line("base", resume, 1, "base")


def test_a_run_resumes_the_checkpoint_ray_train_recorded_not_the_newest_folder(tmp_path):
    """A checkpoint uploaded whole but never registered (the driver died in between) is not what Ray
    Train resumes: its record names the latest registered one, and so does the resume line."""
    run_dir = str(tmp_path / "runs" / "base")
    identity = run_identity(job_for(str(tmp_path)))
    registered = write_checkpoint(run_dir, "checkpoint_2026-12-01_10-00-00.000001", identity)
    unregistered = write_checkpoint(run_dir, "checkpoint_2026-12-01_11-00-00.000001", identity)
    assert check_resume(run_dir, identity, "base").uri == unregistered  # no record: the newest folder
    record = {"ray_version": "2.60.0", "checkpoint_results": [],
              "latest_checkpoint_result": {"checkpoint_dir_name": os.path.basename(registered), "metrics": {}}}
    with open(os.path.join(run_dir, RAY_TRAIN_SNAPSHOT), "w") as f:
        json.dump(record, f)
    assert check_resume(run_dir, identity, "base").uri == registered
    with open(os.path.join(run_dir, RAY_TRAIN_SNAPSHOT), "w") as f:
        f.write("{not json")  # an unreadable record: the newest folder, as before
    assert check_resume(run_dir, identity, "base").uri == unregistered
    assert remove_unregistered(run_dir) == 0  # without a record, nothing is known to be stray

    # With the record, the folder no resume reads goes, and the data order follows what is resumed.
    from jobs.data import data_order_seed

    with open(os.path.join(run_dir, RAY_TRAIN_SNAPSHOT), "w") as f:
        json.dump(record, f)
    seed = data_order_seed(0, run_dir)
    assert remove_unregistered(run_dir) == 1 and not os.path.exists(unregistered) and os.path.exists(registered)
    assert data_order_seed(0, run_dir) == seed  # the stray folder never decided it


def test_training_the_vqgan_again_after_the_decoder_fine_tune_says_why_it_is_refused(tmp_path, monkeypatch):
    """"auto" continues the root's tokenizer, which after the decoder fine-tune has a wider decoder
    than the VQGAN run's checkpoints: the refusal says that the root holds the fine-tune's export."""
    from contextlib import contextmanager

    import jobs.data
    from jobs import vqgan
    from muse import checkpoint

    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("vqgan_lo",))
    uri = checkpoint.component_uri(root, "vqgan_lo")
    trained = checkpoint.load_component(uri)
    write_checkpoint(os.path.join(root, "runs", "vqgan_lo"), "checkpoint_2026-12-01_10-00-00.000001",
                     run_identity(job_for(root, {"the": "vqgan run's own decoder"}, component="vqgan_lo")))

    @contextmanager
    def no_data(*args):
        yield None

    monkeypatch.setattr(jobs.data, "run_images", no_data)
    with pytest.raises(RunRefused, match="another architecture") as plain:
        vqgan.build(tiny_config("vqgan.lo_model=auto"), "corpus", root, "vqgan_lo", "auto")
    assert "decoder fine-tune" not in str(plain.value)
    checkpoint.save_component(trained, uri, extra={"finished": True, "stage": "decoder", "decoder_finetuned": True})
    with pytest.raises(RunRefused, match=r"vqgan_lo is the decoder fine-tune's export, whose decoder is wider"):
        vqgan.build(tiny_config("vqgan.lo_model=auto"), "corpus", root, "vqgan_lo", "auto")


def test_a_run_that_failed_for_good_and_a_tokenization_refusal_are_one_line_each(capsys, monkeypatch):
    import argparse

    from ray.train import WorkerGroupError

    from jobs.stage import errors_in_one_line
    from pipelines.rejects import CorpusRefused

    parser = argparse.ArgumentParser(prog="muse train base")
    from ray.exceptions import RayTaskError

    from pipelines.shards import CorruptShard

    failed = WorkerGroupError("Training failed due to worker errors:\n...", {1: RuntimeError("b"),
                                                                            0: ValueError("no full\nbatch")})
    read = RayTaskError("SplitCoordinator.get", "Traceback (most recent call last): ...",
                        CorruptShard("x.parquet is not a readable token shard")).as_instanceof_cause()
    for error, code, said in ((failed, 1, "training failed after its retries (run.max_failures): ValueError: "
                                           "no full batch; the workers' logs"),
                              (WorkerGroupError("...", {0: read}), 1, "training failed after its retries "
                               "(run.max_failures): CorruptShard: x.parquet is not a readable token shard; the"),
                              (WorkerGroupError("...", {0: OSError(28, "No space left on device")}), 1,
                               "OSError: [Errno 28] No space left on device; a disk is full: free space where the "
                               "run writes"),
                              (CorpusRefused("cannot tell the format"), 2, "error: cannot tell the format")):
        with pytest.raises(SystemExit) as exited, errors_in_one_line(parser):
            raise error
        err = capsys.readouterr().err
        assert exited.value.code == code and said in err and err.count("\n") == 1, err
    with pytest.raises(KeyError), errors_in_one_line(parser):  # a bug keeps its traceback
        raise KeyError("bug")
    # On a cluster the workers' logs lie on their nodes, not in this node's session folder.
    for address, where in ((None, "/tmp/ray/session_latest/logs"), ("10.0.0.5:6379", "`ray logs cluster`")):
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        if address:
            monkeypatch.setenv("RAY_ADDRESS", address)
        with pytest.raises(SystemExit), errors_in_one_line(parser):
            raise failed
        assert where in capsys.readouterr().err


def test_a_muse_init_roots_random_tokenizer_still_gets_the_warm_up(tmp_path, monkeypatch, capsys):
    """"auto" continues the root's tokenizer; the codebook warm-up (autoencoder steps, then k-means++
    seeding) is dropped only for one a run trained, not for the random one `muse init` wrote."""
    from contextlib import contextmanager

    import jobs.data
    from jobs import vqgan
    from muse import checkpoint

    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("vqgan_lo",))
    seen = []

    @contextmanager
    def no_data(*args):
        yield None

    monkeypatch.setattr(jobs.data, "run_images", no_data)
    monkeypatch.setattr(vqgan, "fit_stage", lambda worker, section, job, dataset: seen.append(section))
    cfg = tiny_config("vqgan.lo_model=auto", "vqgan.quantizer_warmup_steps=50")
    vqgan.build(cfg, "corpus", root, "vqgan_lo", "auto")
    assert "warm-up" not in capsys.readouterr().out
    vqgan.build(tiny_config("vqgan.lo_model=auto", "vqgan.quantizer_warmup_steps=50", "vqgan.run.max_steps=20"),
                "corpus", root, "vqgan_lo", "auto")  # a few steps for a try: never seeded, and told so
    assert "20 steps end inside the autoencoder warm-up" in capsys.readouterr().out
    seen.pop()
    uri = checkpoint.component_uri(root, "vqgan_lo")
    checkpoint.save_component(checkpoint.load_component(uri), uri,
                              extra=loop.finished_extra("vqgan", 1000, "vqgan_lo"))
    vqgan.build(cfg, "corpus", root, "vqgan_lo", "auto")
    assert [s.quantizer_warmup_steps for s in seen] == [50, 0]


def test_a_run_resuming_its_checkpoint_does_not_train_over_another_runs_export(tmp_path):
    """Run "base" has a checkpoint at step 2 of 10; since then a LoRA run exported ROOT/base. Continuing
    the root's base under the name "base" would resume step 2 and overwrite the LoRA export: refused."""
    from muse import checkpoint

    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("base",))
    uri = checkpoint.component_uri(root, "base")
    job = replace(job_for(root), init_from=uri)
    write_checkpoint(os.path.join(root, "runs", "base"), "checkpoint_2026-12-01_10-00-00.000001", run_identity(job))
    model = checkpoint.load_component(uri)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # the LoRA run's merged weights
    checkpoint.save_component(model, uri, extra=loop.finished_extra("base", 500, "lora"))
    section = tiny_config("base.run.max_steps=10").base
    with pytest.raises(RunRefused, match=r"holds run 'lora''s export, but this run resumes its own checkpoint .* step 2"):
        fit.fit_stage(BaseWorker, section, job, dataset=None)
    # Trained from a preset (no init_from), it replaces the component by design; finished, it trains nothing.
    resume = check_resume(os.path.join(root, "runs", "base"), run_identity(job), "base")
    assert fit._refuse_training_over_another_export(job_for(root), "base", "runs", resume, 10, {}) is None
    assert fit._refuse_training_over_another_export(job, "base", "runs", resume, 2, run_identity(job)) is None


def test_a_finished_transformer_run_started_again_says_so_without_starting_ray(tmp_path, monkeypatch, capsys):
    """`muse train base` run again after it finished used to start Ray and a trainer (~17 s here) to
    find nothing to train: the root's export says so before either starts. More steps still train."""
    from jobs import stage as stage_module
    from jobs.stages import get
    from muse import checkpoint

    root = str(tmp_path / "root")
    checkpoint.init_model_root("tiny", root, components=("base",))
    uri = checkpoint.component_uri(root, "base")
    preset = tiny_config().base.model
    checkpoint.save_component(checkpoint.load_component(uri), uri,
                              extra=loop.finished_extra("base", 40, "base") | {"model": preset})

    def no_ray():
        raise AssertionError("Ray started")

    monkeypatch.setattr(stage_module, "ensure_ray", no_ray)
    assert get("base").train(tiny_config("base.run.max_steps=30"), str(tmp_path / "tokens"), root) == []
    assert "holds this run's finished export (step 40): nothing to train" in capsys.readouterr().out
    # A longer run, another run, a LoRA fine-tune of the export (a run of its own, base_lora), a new
    # model from another preset, or the root's model continued: each trains.
    for more in ("base.run.max_steps=80", "base.run.name=other", "base.lora_rank=4", "base.model=base-tiny-codes",
                 "base.model=null"):
        with pytest.raises(AssertionError, match="Ray started"):
            get("base").train(tiny_config("base.run.max_steps=40", more), str(tmp_path / "tokens"), root)
    assert named_run(tiny_config("base.lora_rank=4").base, "base").run.name == "base_lora"
    assert named_run(tiny_config("base.lora_rank=4", "base.run.name=mine").base, "base").run.name == "mine"
