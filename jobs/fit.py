"""The driver side of a stage's Ray Train run: `fit_stage` refuses what would fail on every attempt
(`jobs.preflight`), builds the `TorchTrainer` whose workers run `jobs.loop.train_loop_per_worker`, and
turns what the workers leave (an epoch without a step) into a refusal. `ensure_ray` joins Ray for
every training entry point.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from typing import Any

from jobs import run_lock
from jobs.attempts import STOPPED
from jobs.loop import NO_FULL_BATCH, StageWorker, train_loop_per_worker, worker_path
from jobs.preflight import (ResumePoint, RunRefused, check_resume, check_root_weights, check_rows,
                            newest_checkpoint_state, remove_unregistered, room_problem, run_identity)
from jobs.progress import quiet_ray_loggers, say, start_display
from jobs.train_job import TrainJob
from muse import storage


def run_location(root: str, run, default_name: str) -> tuple[str, str]:
    """(storage_path URI, run name): run.storage_path or ROOT/runs, and run.name or the default."""
    return storage.absolute(run.storage_path or storage.join(root, "runs")), run.name or default_name


def samples_dir(root: str, run, name: str) -> str:
    """Where run `name` writes its sample grids: ROOT/samples/<name>, or with run.storage_path in its
    run folder there, so two runs of one name in two places do not write over each other's."""
    if run.storage_path:
        return storage.join(storage.absolute(run.storage_path), name, "samples")
    return storage.join(root, "samples", name)


def run_dir(root: str, run, default_name: str) -> str:
    """Where a run keeps its checkpoints (`run_location`, joined)."""
    return storage.join(*run_location(root, run, default_name))


class NotStarted(RunRefused):
    """A concurrent stage that passed its checks, not started because the stage beside it was refused."""


class StartTogether:
    """Trainers run side by side (`train all`) start only once each has passed its checks: a stage
    refused on them ends the command at once, instead of after the other has trained for hours. Each
    thread counts once: at `ready` (its trainer is about to start) or at `ended` (it stopped before)."""

    def __init__(self, count: int):
        self.left, self.refused = count, None
        self.counted = threading.local()
        self.cond = threading.Condition()

    def ready(self, name: str) -> None:
        with self.cond:
            self._count()
            self.cond.wait_for(lambda: self.left == 0 or self.refused is not None)
            if self.refused is not None:
                raise NotStarted(f"[{name}] not started: {self.refused} failed before training (said above)")

    def ended(self, name: str, failed: bool) -> None:
        with self.cond:
            if not getattr(self.counted, "done", False):
                self._count()
                if failed:
                    self.refused = name

    def _count(self) -> None:
        self.counted.done = True
        self.left -= 1
        self.cond.notify_all()


start_gate: StartTogether | None = None  # set by `train all` while its trainers run side by side
run_folders: dict[str, str] = {}  # run name -> its folder, for the line a stopped command ends with


def resume_note(name: str) -> str:
    """Where run `name` of this process resumes: its latest registered checkpoint's step."""
    folder = run_folders.get(name)
    if folder is None:
        return ""
    try:
        found = newest_checkpoint_state(folder)
    except Exception:  # noqa: BLE001 - storage unreachable: the stop line goes without it
        return ""
    step = found[1].get("step") if found else None
    return f" (resumes from step {int(step)})" if isinstance(step, (int, float)) else " (no checkpoint yet)"


def fit_stage(worker: type[StageWorker], section: Any, job: TrainJob, dataset, rows: int | None = None) -> Any:
    """Build and run the TorchTrainer whose workers run `worker`; returns the ray.train.Result (raises
    on failure). `job` is the stage's plan of the run (`jobs.train_job.TrainJob`), which gets the run's
    own fields here; `rows`: the dataset's row count where the caller knows it. What
    would fail on every attempt is refused first (`jobs.preflight`)."""
    import ray
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig

    from muse.config import to_dict

    run, scaling = section.run, section.scaling
    storage_uri, name = run_location(job.root, run, job.component)
    folder = run_folders[name] = storage.join(storage_uri, name)
    stage = job.section_name  # the config section: what --set names
    # Held until the run ends: a second driver on this folder would delete this one's checkpoints.
    lock = run_lock.claim(folder, name, stage)
    try:
        cached = _materialized(dataset)
        if rows is None and cached:
            rows = dataset.count()  # from the blocks' metadata: nothing is read
        identity, resume = check_run(section, job, rows, streamed=not cached)
        nothing_left = resume is not None and resume.step is not None and resume.step >= run.max_steps
        for note in () if nothing_left else job.notes:  # what the run will do, once not refused for it
            say(note)
        if resume is not None:
            if stray := remove_unregistered(folder):
                say(f"[{name}] removed {stray} checkpoint folder(s) an interrupted attempt wrote after its last "
                    "registered checkpoint (never resumed from)")
            say(resume_line(name, resume, run.max_steps, stage))
        if storage.is_s3(storage_uri):
            fs, path = storage.s3_filesystem(), storage_uri[len("s3://"):].rstrip("/")
        else:
            fs, path = None, storage.filesystem(storage_uri)[1]
            os.makedirs(path, exist_ok=True)
        job = replace(job, worker=worker_path(worker), section=to_dict(section), run_name=name, identity=identity,
                      cached_rows=dataset.count() if cached else None,  # an epoch's length, to resume mid-epoch
                      progress_board=start_display(), run_dir=folder,
                      samples_dir=job.samples_dir or samples_dir(job.root, run, name))
        trainer = _trainer_class()(
            train_loop_per_worker,
            train_loop_config=job.as_config(),
            scaling_config=ScalingConfig(num_workers=scaling.workers(), use_gpu=scaling.use_gpu,
                                         resources_per_worker=scaling.resources_per_worker()),
            run_config=RunConfig(name=name, storage_path=path, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=run.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=run.keep_checkpoints)),
            datasets={"train": dataset},
        )
        marker, stopped = storage.join(folder, NO_FULL_BATCH), storage.join(folder, STOPPED)
        for left in (marker, stopped):  # by an earlier run of this name: its cause may be mended since
            storage.delete(left)
        if start_gate is not None:
            start_gate.ready(name)
        try:
            result = fit_off_the_main_thread(trainer)
        except Exception:  # run.max_failures=0: no next attempt read the marker
            _refuse_if_stopped(name, stopped)
            raise
        _refuse_if_stopped(name, stopped)
        if storage.exists(marker):
            storage.delete(marker)
            raise RunRefused(f"{name}: the data gives no full batch of {run.batch_size} per worker ({scaling.workers()} "
                             "worker(s)) after the rejected images: use a smaller run.batch_size, fewer workers or "
                             "more data")
        return result
    finally:
        lock.release()


def _refuse_if_stopped(name: str, stopped: str) -> None:
    """Refuse run `name` when its workers met an error that fails every attempt (`jobs.attempts.STOPPED`)."""
    if storage.exists(stopped):
        why = storage.read_text(stopped)
        storage.delete(stopped)
        raise RunRefused(f"[{name}] stopped, not restarted: {why} (it fails every attempt the same way); "
                         f"mend that and run the same command again{resume_note(name)}")


def check_run(section: Any, job: TrainJob, rows: int | None, streamed: bool) -> tuple[dict, ResumePoint | None]:
    """What would fail on every attempt of `section`'s run of `job`, refused before a trainer is built
    (`train all` asks this of every transformer before the first trains): a root whose weights are
    not ours, another run's checkpoints under its name, too few `rows` for a batch per worker, workers
    the cluster cannot hold (with `streamed` data, and a CPU for Ray Data). Returns the run's identity
    and the checkpoint it resumes from."""
    run, scaling = section.run, section.scaling
    storage_uri, name = run_location(job.root, run, job.component)
    folder = storage.join(storage_uri, name)
    check_root_weights(job.root)
    identity = run_identity(job)
    resume = check_resume(folder, identity, job.section_name)
    if resume is not None:
        _refuse_training_over_another_export(job, name, folder, resume, run.max_steps, identity)
    check_rows(name, rows, run.batch_size, scaling.num_workers)
    _check_room(name, scaling, streamed)  # streamed: Ray Data's read tasks need CPUs beside it
    return identity, resume


class StopWithThreads(KeyboardInterrupt):
    """A stop (Ctrl-C, `ray job stop`) while trainers run in threads: the threads stay blocked in Ray,
    so the process leaves Ray (its trainers, owned by this driver, go with it) and exits without them
    (`jobs.stage.errors_in_one_line`)."""


def fit_off_the_main_thread(trainer) -> Any:
    """`trainer.fit()`, run in a thread of its own. In the main thread Ray Train 2.60's fit() takes
    SIGINT over for good (its handler aborts the run and may `sys.exit(0)`), so a Ctrl-C would end the
    command with neither our stop line nor status 130, and a later Ctrl-C in `train all` would reach a
    finished run's handler. Here a stop reaches this thread as KeyboardInterrupt: StopWithThreads."""
    if threading.current_thread() is not threading.main_thread():
        return trainer.fit()  # already off it (train all's concurrent trainers)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised again in the caller's thread
            outcome["error"] = e

    thread = threading.Thread(target=fit, name="fit", daemon=True)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.5)  # a timed wait, so a signal's KeyboardInterrupt arrives here
    except KeyboardInterrupt:
        raise StopWithThreads from None
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def _refuse_training_over_another_export(job: TrainJob, name: str, folder: str, resume: ResumePoint,
                                         max_steps: int, identity: dict) -> None:
    """A run that continues the root's component (init_from) but resumes its own checkpoint trains on
    from the checkpoint, not from the component. When another run wrote the component since (a LoRA
    fine-tune under another name), or it was replaced (imported again, `muse import --force`), the
    export at the end would replace those weights with training that never saw them. Refused, with the
    ways out. A finished run trains nothing and leaves it; the run's own export is its to continue, and
    so is a component still the one the run started from, whoever wrote it."""
    from muse import checkpoint

    if not job.init_from or resume.step is not None and resume.step >= max_steps:
        return
    written_by = checkpoint.component_extra(job.init_from).get("run")
    if written_by == name:
        return
    if resume.started_from and identity.get("init") == resume.started_from:
        return  # the component is still the one this run started from (an interrupted LoRA run over base)
    section, component = job.section_name, job.component
    ways_out = (f"pass --set {section}.run.name=NEW to continue the root's {component} in a new run, or delete "
                f"{folder} to drop this run's checkpoints")
    if written_by and job.init_from == checkpoint.component_uri(job.root, component):
        raise RunRefused(f"[{name}] {job.root}/{component} holds run {written_by!r}'s export, but this run "
                         f"resumes its own checkpoint ({resume.uri}, step {resume.step}) and would overwrite that "
                         f"export with training that never saw it: {ways_out}")
    if resume.started_from and identity.get("init") != resume.started_from:
        raise RunRefused(f"[{name}] {job.init_from} holds other weights than this run started from (written "
                         f"again or imported since), but the run resumes its own checkpoint ({resume.uri}, step "
                         f"{resume.step}), which holds the old ones, and would export them over the new: {ways_out}")


def resume_line(name: str, resume: ResumePoint, max_steps: int, section: str) -> str:
    """What a run started again will do: go on from its checkpoint, or nothing when it is finished.
    `section`: the config section that names the run (what --set changes)."""
    if resume.step is None:
        return f"[{name}] resumes its run from {resume.uri}"
    if resume.step > max_steps:
        return (f"[{name}] the run's checkpoint is at step {resume.step}, past --max-steps {max_steps}: nothing to "
                f"train (raise --max-steps to go on, or --set {section}.run.name=NEW for a new run)")
    if resume.step == max_steps:
        return (f"[{name}] the run already finished at step {resume.step} of {max_steps}: nothing to train (raise "
                f"--max-steps to go on, or --set {section}.run.name=NEW for a new run)")
    moved = f"; its checkpoints name the model root {resume.moved_from}, which this root was copied or moved from" \
        if resume.moved_from else ""
    return f"[{name}] resumes its run at step {resume.step} of {max_steps} ({resume.uri}{moved})"


def _materialized(dataset) -> bool:
    """Whether the dataset sits in the object store already (run.cache_data): no read tasks to feed."""
    from ray.data.dataset import MaterializedDataset

    return isinstance(dataset, MaterializedDataset)


def _check_room(name: str, scaling, streamed: bool) -> None:
    """Refuse a trainer that can never start on a cluster that cannot grow (its workers' CPUs or GPUs,
    and with streamed data a CPU for Ray Data); on one that may (the autoscaler can add nodes) only warn."""
    import ray

    from jobs.cluster import cluster_may_grow

    problem = room_problem(name, scaling, ray.cluster_resources(), streamed)
    if problem is None:
        return
    if not cluster_may_grow():
        raise RunRefused(problem)
    if problem not in _ROOM_WARNED:  # `train all` checks each trainer before the first trains, then again
        _ROOM_WARNED.add(problem)
        say(f"warning: {problem} (unless the autoscaler adds nodes)")


_ROOM_WARNED: set[str] = set()


PLACEMENT_GROUP_CLEANER = "PlacementGroupCleanerCallback"
CLEANER_OVERRIDE_RAY = "2.60."  # the Ray release the override below was checked against


def _trainer_class():
    """TorchTrainer without the PlacementGroupCleaner callback of Ray 2.60. The cleaner treats one
    missed State API answer as "controller dead" and removes the live run's placement group, which
    kills healthy workers on a busy machine (ray-project/ray#65447 review; seen here on 2 cores). It
    only matters when a controller dies ungracefully, and the driver's Ray job cleans up after that.
    `_create_default_callbacks` is private, so the override applies only to the Ray release it was
    checked against; any other release runs the stock trainer, and a missing callback is logged."""
    import ray
    from ray.train.torch import TorchTrainer

    log = logging.getLogger(__name__)
    if not ray.__version__.startswith(CLEANER_OVERRIDE_RAY) or not hasattr(TorchTrainer, "_create_default_callbacks"):
        log.info("Ray %s: the stock TorchTrainer (the placement-group cleaner override is for Ray %sx)",
                 ray.__version__, CLEANER_OVERRIDE_RAY)
        return TorchTrainer

    class Trainer(TorchTrainer):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            kept = [cb for cb in callbacks if type(cb).__name__ != PLACEMENT_GROUP_CLEANER]
            if len(kept) == len(callbacks):
                log.warning("Ray %s has no %s: nothing to remove", ray.__version__, PLACEMENT_GROUP_CLEANER)
            return kept

    return Trainer


def ensure_ray() -> None:
    """Join Ray (`jobs.cluster.join_ray`: RAY_ADDRESS, a `ray start` cluster on this node, or a local
    Ray), quiet unless verbose; Ray Data's per-operator progress bars are turned off (each stage has
    its own line)."""
    import ray.data

    from jobs.cluster import join_ray

    # A local Ray gets at least 4 logical CPUs even on 2 cores, so a trainer's workers and the data
    # tasks feeding them never wait on each other (a cluster is joined as it is).
    join_ray(worker_env(), num_cpus=max(4, os.cpu_count() or 1))
    quiet_ray_loggers()
    ray.data.DataContext.get_current().enable_progress_bars = False


def worker_env() -> dict[str, str]:
    """Environment for Ray workers: the console verbosity travels with them."""
    from jobs.progress import VERBOSE_ENV

    return {"TOKENIZERS_PARALLELISM": "false", VERBOSE_ENV: os.environ.get(VERBOSE_ENV, "")}
