"""Every stage through Ray Train: 2 CPU workers (gloo), a few steps on tiny data, checkpoints reported
and exported components that the pipeline loads (the decoder fine-tune, whose worker is the vqgan
stage's, and runs that must stop at their first attempt take one worker: on 2 cores a second one
costs ~8 s and shows nothing more there). One worker is killed mid-run and the run resumes
from its last checkpoint; one run keeps its checkpoints and model root on the loopback S3 server, with
checkpoint uploads slowed down (training does not wait for them). Resuming on another number of
workers: the S3 run's two FSDP ranks resume on one worker and then on two again; exact state
equality across a reshard is tests/jobs/test_sharded_checkpoints.py."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from types import SimpleNamespace

import pytest

import torch
from jobs_helpers import copy_tree, ray_test_config
from safetensors.torch import load_file

from jobs.common import lr_factor
from jobs.preflight import RAY_TRAIN_SNAPSHOT, check_resume
from jobs.stages import run_stage
from muse import checkpoint, storage
from muse.data.synthetic import write_corpus


def checkpoint_files(result) -> set[str]:
    with result.checkpoint.as_directory() as d:
        return set(os.listdir(d))


def trainer_state(result) -> tuple[dict, dict]:
    """The checkpoint's JSON and its tensors (the pieces of every rank's shard file)."""
    with result.checkpoint.as_directory() as d:
        meta = json.load(open(os.path.join(d, "trainer_state.json")))
        tensors = {}
        for name in sorted(os.listdir(d)):
            if name.endswith(".safetensors"):
                tensors.update(load_file(os.path.join(d, name)))
        return meta, tensors


def optimizer_steps(tensors: dict) -> set[float]:
    return {float(v) for k, v in tensors.items() if k.startswith("optim/") and k.endswith("/step")}


SHARDS = {f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)}  # one per rank of 2


def test_vqgan_stage_trains_reports_and_exports(ray_session, tiny_data, tmp_path, monkeypatch):
    copy_tree(tiny_data.root, str(tmp_path / "root"))
    # A relative root, as `muse train ... --output root` gives it: Ray Train workers run in their own
    # directory, so the export must still land under the caller's working directory.
    monkeypatch.chdir(tmp_path)
    root = "root"
    before = checkpoint.load_component(checkpoint.component_uri(root, "vqgan_lo"))
    cfg = ray_test_config("vqgan", "vqgan.run.max_steps=3", "vqgan.run.checkpoint_every=3",
                          "vqgan.run.sample_every=3", "vqgan.run.batch_size=2", "vqgan.gan.disc_start=2",
                          "vqgan.run.cache_data=false")  # streamed through the tokenizer's Ray Data readers
    # A folder corpus: its parts' image lists live in plan files in the run's folder while it trains.
    write_corpus(str(tmp_path / "folder"), 24, size=128, format="folder")
    [result] = run_stage("vqgan", cfg, str(tmp_path / "folder"), root, component="vqgan_lo")
    assert result.metrics["step"] == 3 and "d_loss" in result.metrics  # the GAN started at step 2
    assert checkpoint_files(result) == SHARDS | {"trainer_state.json"}  # each rank's shards, merged by Ray
    uri = checkpoint.component_uri(root, "vqgan_lo")
    after = checkpoint.load_component(uri)
    assert checkpoint.component_extra(uri) | {"run": None} == {"finished": True, "stage": "vqgan", "step": 3,
                                                               "run": None}
    assert not torch.equal(before.decoder.conv_out.weight, after.decoder.conv_out.weight)
    assert os.path.exists(tmp_path / "root" / "samples" / "vqgan_lo" / "step_000003.png")
    assert os.path.isdir(tmp_path / "root" / "runs")  # Ray Train's run folder too
    assert not os.path.exists(tmp_path / "root" / "runs" / "vqgan_lo" / "_plan")  # gone with the run


def test_decoder_stage_widens_and_keeps_the_tokens(ray_session, tiny_data, tmp_path):
    root = copy_tree(tiny_data.root, str(tmp_path / "root"))
    cfg = ray_test_config("decoder", "decoder.run.max_steps=2", "decoder.run.batch_size=2",
                          "decoder.decoder_base_channels=16", "decoder.decoder_num_res_blocks=2",
                          "decoder.run.cache_data=true",
                          "decoder.scaling.num_workers=1")  # its worker is the vqgan stage's, run on 2 above
    [result] = run_stage("decoder", cfg, tiny_data.corpus, root, component="vqgan_lo")
    assert result.metrics["step"] == 2
    uri = checkpoint.component_uri(root, "vqgan_lo")
    wide, old = checkpoint.load_component(uri), checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "vqgan_lo"))
    assert (wide.config.decoder_base_channels, wide.config.decoder_num_res_blocks) == (16, 2)
    assert checkpoint.component_extra(uri)["decoder_finetuned"]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(wide.encode(images), old.encode(images))  # encoder and codebook untouched
    assert wide.decode(wide.encode(images)).shape == (2, 3, 64, 64)
    # So the tokens made before the fine-tune are still this root's: not refused as stale, a base trained
    # before it is still finished, and a tokenize run into the same output with the fine-tuned root
    # resumes (no tokenizer difference).
    from jobs.root_fit import codes_version, stale_tokens_problem
    from pipelines.config import TokenizeConfig
    from pipelines.job_spec import job_spec, spec_differences
    from pipelines.tokenize import resolve_models

    before, after = (job_spec(tiny_data.corpus, TokenizeConfig(), resolve_models(r)) for r in (tiny_data.root, root))
    assert stale_tokens_problem("base", root, "TOKENS", before) is None
    assert codes_version("base", root) == codes_version("base", tiny_data.root)
    assert [path for path, _, _ in spec_differences(before, after) if path[0] != "models"] == []


UPLOAD_DELAY_S = 5.0


@pytest.fixture
def slow_checkpoint_store(s3_server):
    """A second endpoint onto the loopback S3 server's buckets (moto keeps them per process) whose first
    upload of a checkpoint shard takes UPLOAD_DELAY_S longer, as a large upload would."""
    from moto.server import DomainDispatcherApplication, create_backend_app
    from werkzeug.serving import make_server

    state = SimpleNamespace(delayed=0)
    app = DomainDispatcherApplication(create_backend_app)

    def slow(environ, start_response):
        if (environ["REQUEST_METHOD"] == "PUT" and "/checkpoint_" in environ["PATH_INFO"]
                and environ["PATH_INFO"].endswith(".safetensors") and not state.delayed):
            state.delayed += 1
            time.sleep(UPLOAD_DELAY_S)
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, slow, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    thread.join()


def test_superres_fsdp_with_checkpoints_and_model_root_on_s3(ray_session, tiny_data, s3_bucket,
                                                             slow_checkpoint_store, monkeypatch):
    from muse.pipeline import MusePipeline

    root = copy_tree(tiny_data.root, f"{s3_bucket}/models/tiny")
    tokens = copy_tree(tiny_data.tokens, f"{s3_bucket}/tokens")
    # Ray Train's storage (the driver's filesystem) is an endpoint whose first checkpoint upload is slow.
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", slow_checkpoint_store.endpoint)
    cfg = ray_test_config("superres", "superres.scaling.strategy=fsdp", "superres.run.max_steps=4",
                          "superres.run.batch_size=2", "superres.run.sample_every=4", "superres.sample_steps=2",
                          "superres.run.cache_data=false")
    [result] = run_stage("superres", cfg, tokens, root)
    assert result.metrics["step"] == 4 and result.metrics["tokens_per_s"] > 0
    optim = cfg.superres.optim  # the report's lr is the one step 4 trained with, not the next step's
    factor = lr_factor(3, min(optim.warmup_steps, 3), 4, optim.final_lr_fraction)
    assert factor != lr_factor(4, min(optim.warmup_steps, 3), 4, optim.final_lr_fraction)
    assert result.metrics["lr"] == pytest.approx(optim.lr * factor)
    run_files = storage.list_files(f"{root}/runs/superres")
    resume = check_resume(f"{root}/runs/superres", {}, "superres")  # from Ray Train's own record of its checkpoints
    assert f"{root}/runs/superres/{RAY_TRAIN_SNAPSHOT}" in run_files and resume.step == 4
    assert resume.uri.endswith(result.checkpoint.path.rsplit("/", 1)[-1])
    saved = {f.rsplit("/", 1)[-1] for f in run_files if "/checkpoint_" in f}
    assert SHARDS | {"trainer_state.json"} <= saved
    assert result.checkpoint.path.startswith(root[len("s3://"):])  # through the S3 storage_filesystem
    meta, optim = trainer_state(result)
    assert meta["step"] == 4 and meta["counters"]["samples"] == 4 * 2 * 2
    assert storage.exists(f"{root}/samples/superres/step_000004.png")
    pipe = MusePipeline.from_pretrained(root)
    [image] = pipe("two blue squares", steps=2, superres_steps=2, seed=0)
    assert image.size == (128, 128)

    assert slow_checkpoint_store.delayed == 1
    assert result.metrics["checkpoint_stall_s"] < UPLOAD_DELAY_S  # step 2's checkpoint did not wait for its upload

    # Resharding through Ray Train: the two FSDP ranks' shards resume on one worker, which goes on.
    one = ray_test_config("superres", "superres.scaling.strategy=fsdp", "superres.scaling.num_workers=1",
                          "superres.run.max_steps=6", "superres.run.batch_size=2", "superres.run.sample_every=0",
                          "superres.sample_steps=2", "superres.run.cache_data=false")
    [again] = run_stage("superres", one, tokens, root)
    assert again.metrics["resumed_from"] == 4 and again.metrics["step"] == 6
    meta, tensors = trainer_state(again)
    assert meta["step"] == 6 and meta["counters"]["samples"] == 4 * 2 * 2 + 2 * 2
    assert optimizer_steps(tensors) == {6.0}  # AdamW's state came through the 2 -> 1 reshard
    assert checkpoint_files(again) == {"shard-00001-model-00001-of-00001.safetensors", "trainer_state.json"}
    # (One rank back to two FSDP ranks: tests/jobs/test_sharded_checkpoints.py, in-process.)


def test_killed_worker_is_replaced_and_training_resumes_from_the_last_checkpoint(ray_session, tiny_data, tmp_path,
                                                                                 monkeypatch):
    """Also the README's path: no model named, so the root's own tiny base is continued. The killed
    worker says nothing itself: the console hears of the restart from the attempt that replaced it."""
    from jobs import progress
    from muse.pipeline import MusePipeline

    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)  # so the workers post to the board
    board = progress.start_display()
    seen = len(ray_session.get(board.poll.remote(0))[1])
    root = copy_tree(tiny_data.root, str(tmp_path / "root"))
    before = checkpoint.read_component_config(checkpoint.component_uri(root, "base"))[1]
    batch = 4
    cfg = ray_test_config("base", "base.run.max_steps=6", "base.run.checkpoint_every=2",
                          f"base.run.batch_size={batch}", "base.run.fail_at_step=3", "base.run.max_failures=1",
                          "base.run.cache_data=true", "base.model=null")
    assert cfg.base.model is None
    [result] = run_stage("base", cfg, tiny_data.tokens, root)
    assert storage.exists(os.path.join(root, "runs", "base", "fault_injected_at_step_3"))  # it did die
    assert result.metrics["step"] == 6
    assert result.metrics["resumed_from"] == 2  # the replacement group restarted from step 2, not 0
    notes = [line for line in ray_session.get(board.poll.remote(seen))[1] if line.startswith("[base] attempt")]
    assert notes == ["[base] attempt 2 resumes from step 2 on 2 worker(s)"]
    meta, optim = trainer_state(result)
    assert meta["step"] == 6
    assert meta["counters"]["samples"] == 6 * batch * 2  # steps 1-2 and 3-6 counted, step 3's retry once
    assert meta["schedulers"]["model"]["last_epoch"] == 6
    assert optimizer_steps(optim) == {6.0}  # AdamW's own step count came back from the checkpoint
    # The checkpoint names its run, which the driver checks before a re-run resumes it (jobs.preflight).
    assert meta["identity"]["root"] == root and meta["identity"]["component"] == "base"
    extra = checkpoint.component_extra(checkpoint.component_uri(root, "base"))
    assert extra["finished"] and extra["step"] == 6
    assert checkpoint.read_component_config(checkpoint.component_uri(root, "base"))[1] == before  # still tiny
    pipe = MusePipeline.from_pretrained(root)
    [image] = pipe("a red circle", steps=2, guidance_scale=2.0, superres=False, seed=0)
    assert image.size == (64, 64)


def test_a_streamed_corpus_too_small_for_a_batch_is_refused_once_not_retried(ray_session, tiny_data, tmp_path,
                                                                            monkeypatch):
    """Rows of a streamed image corpus are known only once read: the workers say so at the end of an
    empty epoch, and the driver refuses, where an error would be retried run.max_failures times."""
    from jobs import progress
    from jobs.preflight import RunRefused

    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)  # so the workers post failed attempts to the board
    board = progress.start_display()
    assert board is not None
    seen = len(ray_session.get(board.poll.remote(0))[1])
    copy_tree(tiny_data.root, str(tmp_path / "root"))
    write_corpus(str(tmp_path / "small"), 1, size=128, format="folder")
    cfg = ray_test_config("vqgan", "vqgan.run.max_steps=3", "vqgan.run.batch_size=2", "vqgan.run.cache_data=false",
                          "vqgan.run.max_failures=5", "vqgan.scaling.num_workers=1")
    with pytest.raises(RunRefused, match="no full batch of 2 per worker"):
        run_stage("vqgan", cfg, str(tmp_path / "small"), str(tmp_path / "root"), component="vqgan_lo")
    # Rank 0 posts "[run] attempt N failed: ..." for every attempt that raised: none did.
    lines = ray_session.get(board.poll.remote(seen))[1]
    assert not [line for line in lines if "attempt" in line and "failed" in line], lines


def test_a_damaged_shard_stops_the_run_at_the_first_attempt_that_reads_it(ray_session, tiny_data, tmp_path,
                                                                         monkeypatch):
    """A token shard damaged after it was written fails every pass that reaches it, where Ray Train
    would restart the workers run.max_failures times: the attempt's workers record the error, the next
    attempt returns at once, and the driver refuses the run in one line. (The first shard's footer is
    read before training starts, tests/jobs/test_preflight.py; this is the second.)"""
    from jobs import progress
    from jobs.attempts import STOPPED
    from jobs.preflight import RunRefused
    from pipelines.shards import load_token_shards, token_shard_files, write_table

    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)  # so the workers post failed attempts to the board
    board = progress.start_display()
    seen = len(ray_session.get(board.poll.remote(0))[1])
    root = copy_tree(tiny_data.root, str(tmp_path / "root"))
    tokens = copy_tree(tiny_data.tokens, str(tmp_path / "tokens"))
    write_table(tokens, load_token_shards(tokens), part="zz")
    damaged = token_shard_files(tokens)[-1]
    assert damaged.endswith("zz.parquet")
    with open(damaged, "r+b") as f:
        f.truncate(os.path.getsize(damaged) // 2)
    cfg = ray_test_config("base", "base.run.max_steps=50", "base.run.batch_size=4", "base.run.cache_data=false",
                          "base.run.max_failures=5", "base.model=null", "base.scaling.num_workers=1",
                          "base.run.name=damaged")  # its own name: the board counts attempts by name
    with pytest.raises(RunRefused, match=r"\[damaged\] stopped, not restarted: CorruptShard: \S+zz.parquet is not a "
                                         r"readable token shard .* mend that and run the same command again"):
        run_stage("base", cfg, tokens, root)
    lines = ray_session.get(board.poll.remote(seen))[1]
    failed = [line for line in lines if "attempt" in line and "failed" in line]
    assert len(failed) <= 1 and all(line.endswith("(it fails every attempt the same way: the run stops)")
                                    for line in failed), lines
    assert not [line for line in lines if "resumes from step" in line or "starts again" in line], lines
    assert not storage.exists(os.path.join(root, "runs", "damaged", STOPPED))  # a re-run after the mend trains


def test_a_checkpoint_the_disk_cannot_hold_stops_the_run_before_its_upload(ray_session, tiny_data, small_disk,
                                                                          monkeypatch):
    """Ray Train uploads checkpoints in a background thread, where a full disk fails the attempt unseen
    by the loop, and each restart fails the same way: each rank checks that its shards fit before the
    upload, and the run stops at the first attempt in one line. The model root sits on a real tmpfs
    with room for its weights and less than a checkpoint (weights, Adam moments and EMA)."""
    from jobs import progress
    from jobs.preflight import RunRefused

    monkeypatch.delenv(progress.VERBOSE_ENV, raising=False)  # so the workers post failed attempts to the board
    board = progress.start_display()
    seen = len(ray_session.get(board.poll.remote(0))[1])
    weights = sum(os.path.getsize(os.path.join(d, f)) for d, _, names in os.walk(tiny_data.root) for f in names)
    subprocess.run(["mount", "-o", f"remount,size={weights // 1024 + 2048}k", str(small_disk)], check=True)
    root = copy_tree(tiny_data.root, str(small_disk / "root"))
    cfg = ray_test_config("base", "base.run.max_steps=4", "base.run.batch_size=4", "base.run.max_failures=5",
                          "base.model=null", "base.scaling.num_workers=1",
                          "base.run.name=fulldisk")  # its own name: the board counts attempts
    with pytest.raises(RunRefused, match=r"\[fulldisk\] stopped, not restarted: OSError: \[Errno 28\] No space left "
                                         r"on device for this worker's shards of the checkpoint at step 2: it needs "
                                         r"[\d.]+ MB under \S+fulldisk, which has [\d.]+ MB free"):
        run_stage("base", cfg, tiny_data.tokens, root)
    lines = ray_session.get(board.poll.remote(seen))[1]
    failed = [line for line in lines if "attempt" in line and "failed" in line]
    assert len(failed) <= 1 and all(line.endswith("(it fails every attempt the same way: the run stops)")
                                    for line in failed), lines
    assert not [line for line in lines if "resumes from step" in line or "starts again" in line], lines
    assert not [name for name in os.listdir(os.path.join(root, "runs", "fulldisk")) if name.startswith("checkpoint_")]
