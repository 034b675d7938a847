"""The Ray Train layer shared by every stage: one per-worker loop (here) and one `TorchTrainer`
builder (`jobs.fit`).

    driver:  fit_stage(worker class, section, job, dataset)
               TorchTrainer(train_loop_per_worker, ScalingConfig(workers, GPUs, CPUs per worker),
                            RunConfig(name, storage_path [+ S3 filesystem], FailureConfig, CheckpointConfig),
                            datasets={"train": dataset})
    worker:  build the stage's StageWorker -> restore ray.train.get_checkpoint() if any
             -> epochs of get_dataset_shard("train").iter_torch_batches(...) until max_steps:
                  train_step -> metrics line / report every log_every -> sample grid every sample_every
                  -> checkpoint every checkpoint_every and at the last step: each rank writes its
                     shards locally and reports them; Ray Train uploads them in the background
             -> export the stage's component(s) into the model root

A failed worker (or node) makes Ray Train restart the whole worker group
(FailureConfig.max_failures); the new workers resume from the last checkpoint whose upload finished,
with the step counter, optimizer, scheduler, EMA and sample/token counters it holds; rank 0 puts
each failed attempt's error on the console in one line. An error that fails every attempt the same
way (a damaged token shard, a full or read-only disk) is not retried: the next attempt's workers return
at once and the driver refuses the run in one line (`jobs.attempts`). Calling `jobs.fit.fit_stage` again with the same run name and storage
resumes a run the driver lost, on any number of workers (`jobs.checkpointing` reshards), if its
checkpoints belong to the same model root, component and architecture: the driver refuses others
before the trainer starts, with what would fail on every attempt (`jobs.preflight`). Where a resumed
run reads from (`batch_stream`): data cached in the object store (run.cache_data) continues its
stream where the checkpoint left it; streamed data has no position to restore, so it starts a fresh
seeded permutation of the token shard files or of the corpus's parts (`jobs.data.token_dataset`,
`jobs.data.image_dataset`), not the first ones again, and rows mix in a local shuffle buffer of
thousands of rows.
"""

from __future__ import annotations

import importlib
import itertools
import os
import sys
import time
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from jobs.attempts import STOPPED, attempt_started, fails_every_attempt, post_failure, stop_run
from jobs.checkpointing import (check_room_for_upload, load_training_state, remove_orphaned_staging, save_sharded,
                               staging_directory)
from jobs.common import EMA, peak_flops
from jobs.parallel import WorkerEnv, allreduce_mean
from jobs.progress import Reporter, format_seconds
from jobs.train_job import TrainJob
from muse import storage
from muse.config import from_dict


class StageWorker:
    """What the loop needs from a stage, on one worker. Subclasses set `config_class`, build
    `modules` / `optimizers` / `schedulers` / `ema` in __init__ and implement the methods below."""

    config_class: type = object
    console_metrics: tuple[str, ...] = ("loss",)  # shown on the stage's live progress line

    def __init__(self, section: Any, job: TrainJob, env: WorkerEnv):
        self.section, self.job, self.env = section, job, env
        self.modules: dict[str, nn.Module] = {}
        self.optimizers: dict[str, torch.optim.Optimizer] = {}
        self.schedulers: dict[str, Any] = {}
        self.ema: EMA | None = None
        self.generator = torch.Generator(device=env.device)

    def reseed(self, step: int) -> None:
        """Per-rank randomness (masks, dropout of text) that differs after a resume."""
        self.generator.manual_seed(self.section.run.seed * 100_003 + self.env.rank * 7919 + step)

    def collate(self, batch: dict) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_step(self, batch: dict[str, torch.Tensor], step: int) -> dict[str, Any]:
        """One optimizer step; returns metrics, with "loss" and the "tokens"/"flops"/"samples" this worker
        did (floats). The other metrics may be 0-d device tensors: the loop syncs them only when it logs."""
        raise NotImplementedError

    def sample_grid(self, step: int):
        """A PIL image on rank 0 (None elsewhere); every rank calls it (FSDP gathers)."""
        return None

    def export(self, step: int) -> None:
        """Write the stage's component(s) into the model root; every rank calls it."""
        raise NotImplementedError


def finished_extra(stage: str, step: int, run: str, codes: str | None = None) -> dict[str, Any]:
    """What a stage records in its component's config.json "extra", so that `train all` skips finished
    stages: the run and its last step, and for a transformer which tokenizers' codes it learnt
    (`jobs.root_fit.codes_version`; its export adds the preset it was trained from)."""
    return {"finished": True, "stage": stage, "step": int(step), "run": run} | ({"codes": codes} if codes else {})


def worker_path(cls: type) -> str:
    """"module:Class" for the workers to import. A stage started as `python -m jobs.<stage>` defines its
    worker in __main__, which the workers do not have: they import it by the module's real name."""
    module = cls.__module__
    if module == "__main__":
        spec = getattr(sys.modules[module], "__spec__", None)
        module = spec.name if spec is not None else module
    return f"{module}:{cls.__qualname__}"


def import_worker(path: str) -> type[StageWorker]:
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


# ---------------------------------------------------------------------------------------------
# Worker side.


def train_loop_per_worker(config: dict) -> None:
    job = TrainJob.from_config(config)
    if storage.exists(storage.join(job.run_dir, STOPPED)):
        return  # an earlier attempt met an error that fails every attempt: the driver refuses the run
    attempt = attempt_started(job)
    try:
        _train_loop(job, attempt)
    except (Exception, CheckpointException) as e:  # torch's CheckpointException is a BaseException
        post_failure(job, attempt, e, stops=fails_every_attempt(e) and stop_run(job, e))
        raise


def _console(job: TrainJob, line: str) -> None:
    """A line for the driver's console: through the progress board when there is one (the workers'
    own output then stays in Ray's logs), and in the worker's log either way."""
    print(line, flush=True)
    if job.progress_board is not None:
        job.progress_board.note.remote(line)  # not waited for: training goes on


def _train_loop(job: TrainJob, attempt: int | None = None) -> None:
    import ray.train

    from jobs.common import save_png
    from jobs.parallel import configure_cpu_worker, ray_worker_env

    cls = import_worker(job.worker)
    section = from_dict(cls.config_class, job.section)
    run = section.run
    env = ray_worker_env(section.scaling.strategy, run.bf16, run.cpu_bf16)
    if env.device.type == "cpu":
        configure_cpu_worker(section.scaling.cpus_per_worker)
    removed = remove_orphaned_staging()
    if removed:
        print(f"[{job.run_name}] removed {len(removed)} checkpoint staging dir(s) of crashed workers", flush=True)
    torch.manual_seed(run.seed)  # identical initial weights on every rank
    worker = cls(section, job, env)
    step, counters = 0, {"samples": 0.0, "tokens": 0.0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        fetched: dict = {}
        meta = load_training_state(checkpoint.path, filesystem=checkpoint.filesystem, modules=worker.modules,
                                   optimizers=worker.optimizers, schedulers=worker.schedulers, ema=worker.ema,
                                   stats=fetched)
        step, counters = int(meta["step"]), meta["counters"]
    resumed_from = step
    tag = f"[{job.run_name}]"
    if checkpoint is not None and meta.get("config_changes") and env.is_main:
        _console(job, f"{tag} warning: the checkpoint's optimizer settings differ from the config, which now "
                      f"applies: {'; '.join(meta['config_changes'])}")
    saved_batch = (counters.get("data") or {}).get("batch_size")
    if checkpoint is not None and saved_batch not in (None, run.batch_size) and env.is_main:
        _console(job, f"{tag} warning: run.batch_size is {run.batch_size}, the checkpoint's {saved_batch}: the data "
                      "starts a new epoch rather than skip what the checkpoint read in batches of another size")
    if env.is_main:
        read = (f" (this rank read {fetched['fetched_bytes'] / 1e6:,.1f} of the checkpoint's "
                f"{fetched['total_bytes'] / 1e6:,.1f} MB)" if checkpoint and fetched else "")
        precision = "bf16 autocast" if env.bf16 else "fp32"
        if run.cpu_bf16 and env.device.type == "cpu" and not env.bf16:
            precision += " (cpu_bf16 is set, but this CPU has no AVX512-BF16 or AMX: emulated bf16 is slower)"
        print(f"{tag} {'resuming from step ' + str(step) + read if checkpoint else 'starting'}: "
              f"{env.world_size} worker(s) on {env.device.type}, strategy {section.scaling.strategy}, {precision}, "
              f"{run.max_steps} steps of {run.batch_size}/worker", flush=True)
    if attempt is not None and attempt > 1:  # a restart: the failed attempt may not have said so itself
        _console(job, f"{tag} attempt {attempt} " + (f"resumes from step {step}" if checkpoint else
                      "starts again from step 0 (no checkpoint was reported before)") +
                 f" on {env.world_size} worker(s)")
    peak = peak_flops(env.device, run.peak_tflops)
    # run.progress off (--no-progress): no live line, but the notes and the summary still reach the console.
    reporter = (Reporter(job.progress_board, job.run_name, run.max_steps, start_done=step,
                         live=run.progress) if env.is_main else None)
    started, live = time.time(), {}
    shard = ray.train.get_dataset_shard("train")
    window = {"time": 0.0, "tokens": 0.0, "flops": 0.0, "samples": 0.0, "steps": 0}
    sums: dict[str, tuple[Any, int]] = {}  # device tensors until a log step
    stall: float | None = None  # seconds the last checkpoint held training up, for the next report
    tick = time.perf_counter()
    where: dict = {}  # the data stream's place, recorded with each checkpoint (counters["data"])
    if step < run.max_steps:
        for batch in batch_stream(shard, run, env.rank, env.world_size, step, job.cached_rows,
                                  _collate_fn(worker.collate), on_epoch=worker.reseed,
                                  resumed=counters.get("data"), where=where):
            lr = _current_lr(worker)  # the step's own lr: its scheduler moves on inside train_step
            metrics = worker.train_step(batch, step)
            step += 1
            _fail_once_if_asked(run, job, env, step)
            window["time"] += time.perf_counter() - tick
            for key in ("tokens", "flops", "samples"):
                window[key] += metrics.get(key, 0.0)
            window["steps"] += 1
            counters["samples"] += metrics.pop("samples", 0.0) * env.world_size
            counters["tokens"] += metrics.pop("tokens", 0.0) * env.world_size
            metrics.pop("flops", None)
            for k, v in metrics.items():  # (sum, count): some metrics exist only on some steps
                total, count = sums.get(k, (0.0, 0))
                sums[k] = (total + v, count + 1)
            if reporter is not None:
                for k in worker.console_metrics:  # smoothed on the device; the reporter syncs when it posts
                    if k in metrics:
                        live[k] = metrics[k] if k not in live else 0.9 * live[k] + 0.1 * metrics[k]
                reporter.update(step, live)
            last = step >= run.max_steps
            report = None
            if step % run.log_every == 0 or last or step % run.checkpoint_every == 0:
                report = _metrics(sums, window, env, peak, step, resumed_from) | {"lr": lr}
                report["samples_seen"] = counters["samples"]
                if stall is not None:
                    report["checkpoint_stall_s"], stall = stall, None
                sums, window = {}, {"time": 0.0, "tokens": 0.0, "flops": 0.0, "samples": 0.0, "steps": 0}
                if env.is_main:
                    print(f"{tag} " + "  ".join(_fmt(k, v) for k, v in report.items()), flush=True)
            if run.sample_every and (step % run.sample_every == 0 or last):
                grid = worker.sample_grid(step)
                if grid is not None and env.is_main:
                    save_png(grid, storage.join(job.samples_dir, f"step_{step:06d}.png"))
            if step % run.checkpoint_every == 0 or last:
                counters["data"] = {**where, "world_size": env.world_size, "batch_size": run.batch_size}
                stall = _report_checkpoint(worker, env, step, counters, report)
            elif report is not None:
                _report(report)
            tick = time.perf_counter()
            if last:
                break
    if step < run.max_steps:  # an epoch made no step: told to the driver (a refusal there), not retried
        if env.is_main:
            storage.write_text(storage.join(job.run_dir, NO_FULL_BATCH), "no full batch")
        return
    other = other_run_export(job) if step == resumed_from else None
    if other is None:
        worker.export(step)
    elif env.is_main:
        later = " (the decoder fine-tune's)" if other.startswith("decoder") else ""
        _console(job, f"{tag} nothing to train (finished at step {step}); {job.root}/{job.component} holds "
                      f"the export of run {other}{later}, left as it is")
    if reporter is not None:
        took = time.time() - started
        shown = ", ".join(f"{k} {float(v):.3g}" for k, v in live.items())
        where = f"exported to {job.root}" if other is None else f"{job.root}/{job.component} left as it is"
        reporter.finish(f"{step} steps ({step - resumed_from} this run) in {format_seconds(took)}"
                        f"{', ' + shown if shown else ''}; {where}")


def other_run_export(job: TrainJob) -> str | None:
    """The run whose export the root's component holds, when that is another run than this one. A
    finished run that is started again trains nothing and would export its old weights over a later
    stage's (the decoder fine-tune writes vqgan_hi after the vqgan run)."""
    from muse import checkpoint

    if not checkpoint.has_component(job.root, job.component):
        return None
    written_by = checkpoint.component_extra(checkpoint.component_uri(job.root, job.component)).get("run")
    return written_by if written_by and written_by != job.run_name else None


def _current_lr(worker: StageWorker) -> float:
    """The learning rate of the first optimizer's first group (0 without optimizers)."""
    return next(iter(worker.optimizers.values())).param_groups[0]["lr"] if worker.optimizers else 0.0


def _metrics(sums: dict, window: dict, env: WorkerEnv, peak: float | None, step: int,
             resumed_from: int) -> dict[str, float]:
    """Mean metrics over the window and the workers, plus throughput (all ranks call it)."""
    means = {k: float(total) / count for k, (total, count) in sums.items()}  # the window's one host sync
    seconds = max(window["time"], 1e-9)
    local = {"tokens_per_s_per_worker": window["tokens"] / seconds,
             "samples_per_s_per_worker": window["samples"] / seconds, "flops": window["flops"] / seconds}
    merged = allreduce_mean(means | local, env)
    out = {"step": float(step)} | {k: v for k, v in merged.items() if k != "flops"}
    out["tokens_per_s"] = merged["tokens_per_s_per_worker"] * env.world_size
    if peak:
        out["mfu"] = merged["flops"] / peak
    out["resumed_from"] = float(resumed_from)
    return out


def _fmt(key: str, value: float) -> str:
    if key in ("step", "resumed_from"):
        return f"{key} {int(value)}"
    if key == "lr":
        return f"lr {value:.2e}"
    return f"{key} {value:.4g}"


def _report(metrics: dict, checkpoint=None) -> None:
    """Every report is asynchronous: Ray Train keeps reports in order, so a synchronous one would wait
    for a checkpoint upload still in flight."""
    import ray.train

    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def _report_checkpoint(worker: StageWorker, env: WorkerEnv, step: int, counters: dict,
                       report: dict | None) -> float:
    """Every rank writes its shards to a local directory of its own and reports it; Ray Train uploads it
    in a background thread (one upload at a time), merges the ranks' directories into one checkpoint,
    registers it once every rank's upload is done, and then deletes the local directory. Training goes
    on meanwhile; a crash during the upload resumes from the checkpoint before. Returns the seconds
    training was held up (writing the local shards, and the report's barrier)."""
    import ray.train

    start = time.perf_counter()
    directory = staging_directory(step)  # Ray deletes it after the upload
    save_sharded(directory, step=step, env=env, modules=worker.modules, optimizers=worker.optimizers,
                 schedulers=worker.schedulers, ema=worker.ema, counters=dict(counters),
                 identity=worker.job.identity)
    check_room_for_upload(directory, worker.job.run_dir, step)
    _report(report or {"step": float(step)}, checkpoint=ray.train.Checkpoint.from_directory(directory))
    return time.perf_counter() - start


def _fail_once_if_asked(run, job: TrainJob, env: WorkerEnv, step: int) -> None:
    """Fault injection (run.fail_at_step): the last rank dies once, as a crashed process would."""
    import ray.train

    if run.fail_at_step is None or step != run.fail_at_step or env.rank != env.world_size - 1:
        return
    marker = storage.join(job.run_dir, f"fault_injected_at_step_{step}")
    if storage.exists(marker):
        return
    storage.write_text(marker, f"worker rank {env.rank} exited at step {step}\n")
    # The crash comes after the checkpoints reported so far are uploaded, so where it resumes from
    # does not depend on the upload's speed.
    ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    print(f"[{job.run_name}] fault injection: rank {env.rank} exits at step {step}", flush=True)
    sys.stdout.flush()
    os._exit(1)


def batch_stream(shard, run, rank: int, world_size: int, step: int, cached_rows: int | None, collate_fn,
                 on_epoch=lambda step: None, resumed: dict | None = None, where: dict | None = None):
    """The batches of `shard` (a worker's Ray Data iterator) for steps `step`, `step` + 1, ..., epoch
    after epoch, until an epoch gives no full batch. Each epoch mixes its rows in the local shuffle
    buffer seeded by (run.seed, epoch, rank, the step it starts at); `on_epoch(step)` is called as
    each epoch starts, and `where` ({"epoch", "batch"}: batches of it read so far) kept up to date,
    for a checkpoint to record.

    Data cached in the object store (`cached_rows`: its rows, which Ray Train splits equally across
    `world_size` workers) has a known epoch length, so a run resumed at `step` continues the stream
    where it was (`resumed`: the checkpoint's `where` and world size; without it, as `step` gives it):
    it starts that epoch with the seed it had and skips the batches the run already trained on. With
    one worker these are exactly the batches an uninterrupted run reads; with several, the same place
    in the epoch (Ray Data decides which rows reach which worker); on another number of workers (whose
    split differs) or another batch size (whose batches the count does not measure) a new epoch. Streamed data starts a new pass (`jobs.data`: a fresh file
    permutation per resume point)."""
    epoch_steps = (cached_rows // world_size) // run.batch_size if cached_rows else 0
    if not epoch_steps:
        epoch, skip = 0, 0
    elif resumed is None:
        epoch, skip = divmod(step, epoch_steps)
    elif resumed.get("world_size") == world_size and resumed.get("batch_size", run.batch_size) == run.batch_size:
        epoch, skip = int(resumed["epoch"]), int(resumed["batch"])
    else:
        epoch, skip = int(resumed["epoch"]) + 1, 0
    where = {} if where is None else where
    start = step - skip  # the step this epoch started at
    while True:
        where.update(epoch=epoch, batch=skip)
        on_epoch(start + skip)
        batches = iter(shard.iter_torch_batches(
            batch_size=run.batch_size, collate_fn=collate_fn, drop_last=True,
            local_shuffle_buffer_size=run.shuffle_buffer or None,
            local_shuffle_seed=run.seed + 1000 * epoch + rank + start if run.shuffle_buffer else None))
        skipped = sum(1 for _ in itertools.islice(batches, skip))
        seen = 0
        for batch in batches:
            seen += 1
            where["batch"] = skipped + seen
            yield batch
        if seen == 0 and skipped == 0:
            return
        start, epoch, skip = start + skipped + seen, epoch + 1, 0


def _collate_fn(fn):
    from ray.data.collate_fn import NumpyBatchCollateFn

    class Collate(NumpyBatchCollateFn):
        def __call__(self, batch):
            return fn(batch)

    return Collate()


# What rank 0 writes into the run's folder when an epoch of its data made no step (Ray Train keeps no
# metrics reported without a checkpoint).
NO_FULL_BATCH = "_no_full_batch"
