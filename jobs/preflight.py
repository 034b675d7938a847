"""Driver-side checks before a stage's Ray Train run starts (`jobs.fit.fit_stage` calls them).

An exception on a worker makes Ray Train restart the whole worker group, up to run.max_failures
(100 by default) times, so what would fail the same way on every attempt is checked here, once:

- the run's identity. A run name resumes the latest checkpoint under <storage_path>/<name>/
  (Ray Train 2.60 keeps them in checkpoint_<time>/ folders there and records the latest), which must come from a run of
  the same model root, component and architecture: `run_identity`, written into every checkpoint's
  trainer_state.json by `jobs.checkpointing.save_sharded`. A checkpoint without one (older code)
  resumes as before;
- one batch per worker, where the driver knows the row count (the token shards' manifest, or a
  dataset read into the object store);
- a CPU left for Ray Data: trainers that hold every CPU of a cluster that cannot grow leave its read
  tasks none, and the run waits forever without a word;
- the root's components: a weights file cut short or garbled fails every worker that loads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from jobs.checkpointing import read_meta
from jobs.train_job import TrainJob
from muse import storage

IDENTITY_KEY = "identity"  # in trainer_state.json
# CPUs kept free of trainers for Ray Data's tasks (a read task asks for one whole CPU by default).
DATA_CPUS = 1.0


class RunRefused(ValueError):
    """A run that would fail on every attempt; the command lines print it as a usage error (exit 2)."""


def canonical_root(root: str) -> str:
    """The model root as one string per location: an absolute local path (file:// dropped) or an
    s3:// URI without a trailing slash."""
    root = storage.absolute(root)
    if storage.is_s3(root):
        return root.rstrip("/")
    return os.path.normpath(storage.filesystem(root)[1])


def within(uri: str, root: str) -> bool:
    """Whether `uri` lies inside the model root `root` (one location however it is spelled)."""
    return canonical_root(uri).startswith(canonical_root(root) + "/")


def model_hash(model_config: dict) -> str:
    return hashlib.sha256(json.dumps(model_config, sort_keys=True).encode()).hexdigest()


def run_identity(job: TrainJob) -> dict[str, str]:
    """What a run's checkpoints belong to: the model root, the component, the architecture and its
    adapters; and ("init") which weights of the root's component the run started from, when it
    continues one (`jobs.fit` compares that on resume, where the component may be the run's own export)."""
    identity = {"root": canonical_root(job.root), "component": job.component,
                "model": model_hash(job.model_config),
                "adapters": f"LoRA rank {job.lora_rank}" if job.lora_rank else "none"}
    if job.codes:  # a transformer's: which tokenizers' codes it learns (`jobs.root_fit.codes_version`)
        identity["codes"] = job.codes
    if job.init_from:
        from muse.components import component_version

        identity["init"] = model_hash(component_version(job.init_from) or {})
    return identity


# Ray Train 2.60's record of a run's checkpoints, in its run folder: a run started again resumes the
# latest one it names, which need not be the newest folder (an upload that was never registered).
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


@dataclass(frozen=True)
class ResumePoint:
    """The checkpoint a run started again resumes from, and the step it was saved at (None when its
    state names none)."""

    uri: str
    step: int | None
    started_from: str | None = None  # the identity's "init": which component weights the run began from
    moved_from: str | None = None  # the model root the checkpoint names, where the root was copied or moved from


def newest_checkpoint_state(run_dir: str) -> tuple[str, dict] | None:
    """(URI, trainer_state.json) of the checkpoint a run started again resumes, or None: the latest one
    Ray Train recorded, else (no readable record) the newest that has its state file. Names sort by
    time; one whose upload never finished (no state file) is passed over."""
    fs, path = storage.filesystem(run_dir)
    path = path.rstrip("/")
    recorded = _recorded_latest(fs, path)
    if recorded is not None:
        names = [recorded]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        names = sorted((i.base_name for i in infos
                        if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")), reverse=True)
    for name in names:
        try:
            return storage.join(run_dir, name), read_meta(f"{path}/{name}", fs)
        except (OSError, ValueError):
            continue
    return None


def remove_unregistered(run_dir: str) -> int:
    """Delete the checkpoint folders newer than the latest one Ray Train registered: an interrupted
    run's, written but never registered, which no resume reads and `keep_checkpoints` never prunes.
    Only with a readable record (else which are registered is unknown); returns how many went."""
    fs, path = storage.filesystem(run_dir)
    path = path.rstrip("/")
    recorded = _recorded_latest(fs, path)
    if recorded is None:
        return 0
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
    stray = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("checkpoint_")
             and i.base_name > recorded]
    for folder in stray:
        fs.delete_dir(folder)
    return len(stray)


def _recorded_latest(fs: pafs.FileSystem, path: str) -> str | None:
    """The folder name of the latest checkpoint in Ray Train's record, None without a readable one."""
    try:
        with fs.open_input_stream(f"{path}/{RAY_TRAIN_SNAPSHOT}") as f:
            latest = json.loads(f.read()).get("latest_checkpoint_result") or {}
    except (OSError, ValueError, AttributeError):
        return None
    name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
    return name if isinstance(name, str) and name.startswith("checkpoint_") and "/" not in name else None


_FIELDS = {"root": "model root", "component": "component", "model": "architecture", "adapters": "adapters",
           "codes": "tokenizer's codes"}


def check_resume(run_dir: str, identity: dict[str, str], section: str) -> ResumePoint | None:
    """Refuse a run whose name would resume another run's checkpoint; returns the checkpoint it will
    resume from (None: a fresh run). `section` is the config section, for the way out."""
    found = newest_checkpoint_state(run_dir)
    if found is None:
        return None
    uri, state = found
    saved = state.get(IDENTITY_KEY)
    differ = [k for k in _FIELDS if k in identity and k in (saved or {}) and saved[k] != identity[k]]
    # A run folder inside this root that names another root came with the root, copied or moved (to S3
    # for the cluster, say): the run is this root's. One elsewhere (--storage) may be another root's.
    moved = differ == ["root"] and within(run_dir, identity["root"])
    if not differ or moved:  # (a checkpoint written before they named their run, or some of it, resumes as before)
        step = state.get("step")
        return ResumePoint(uri, int(step) if isinstance(step, (int, float)) else None, (saved or {}).get("init"),
                           saved["root"] if moved else None)

    def shown(key: str, value: str) -> str:
        if key == "model":
            return f"config sha256 {value[:12]}"
        return f"sha256 {value[:12]}" if key == "codes" else value

    what = "; ".join(f"{_FIELDS[k]} {shown(k, saved[k])} (this run: {shown(k, identity[k])})" for k in differ)
    if "codes" in differ:
        what += ", as a tokenizer it reads was trained again since that run began"
    raise RunRefused(f"{run_dir} holds a run of another {' and '.join(_FIELDS[k] for k in differ)}: {what}. "
                     f"This run name would resume its checkpoint {uri}. Pass --set {section}.run.name=NEW to start "
                     f"a new run, or delete {run_dir}")


def check_root_weights(root: str) -> None:
    """Refuse a run on a model root holding a component whose weights are missing, cut short or garbled:
    its workers load the root's components, and every attempt would fail on it."""
    from muse import checkpoint

    try:
        checkpoint.check_root_weights(root)
    except checkpoint.CheckpointError as e:
        raise RunRefused(f"{e}: the workers would fail on it at every attempt; write it again "
                         "(train its stage, `muse init`, or restore the file)") from None


def check_rows(name: str, rows: int | None, batch_size: int, workers: int) -> None:
    """Each worker gets floor(rows / workers) rows (Ray Train splits the dataset equally) and takes
    whole batches only: fewer rows than a batch per worker never make a step."""
    if rows is not None and rows < batch_size * workers:
        raise RunRefused(f"{name}: the data has {rows} rows, fewer than one batch of {batch_size} for each of "
                         f"{workers} worker(s) ({batch_size * workers} rows): use a smaller run.batch_size, "
                         "fewer workers or more data")


def trainer_cpus(scaling: Any) -> float:
    """CPUs the trainer holds: its fewest workers when elastic (it takes more only where they fit)."""
    return (scaling.min_workers or scaling.num_workers) * scaling.cpus_per_worker


def room_problem(name: str, scaling: Any, resources: dict[str, float], streamed: bool) -> str | None:
    """Why the trainer can never start on a cluster of `resources` (its workers' CPUs or GPUs are more
    than it has; with `streamed` data, also a CPU for Ray Data), or None when it fits. Ray Train would
    wait for the placement group for ever, silently."""
    workers = scaling.min_workers or scaling.num_workers
    gpus = float(resources.get("GPU", 0.0))
    if scaling.use_gpu and workers * scaling.gpus_per_worker > gpus:
        return (f"{name}: its {workers} worker(s) ask for {workers * scaling.gpus_per_worker:g} GPUs and the "
                f"cluster has {gpus:g}, so the run would wait forever: fewer workers (--workers), a GPU fraction "
                "(--gpus-per-worker), or --gpus-per-worker 0 to train on CPU")
    cpus = float(resources.get("CPU", 0.0))
    if streamed:
        return data_cpu_problem(name, scaling, cpus)
    if trainer_cpus(scaling) > cpus:
        return (f"{name}: its workers take {trainer_cpus(scaling):g} CPUs and the cluster has {cpus:g}, so the "
                "run would wait forever: keep scaling.num_workers x scaling.cpus_per_worker (--workers / "
                f"--cpus-per-worker) at {cpus:g} or less")
    return None


def data_cpu_problem(name: str, scaling: Any, cluster_cpus: float) -> str | None:
    """Why the trainer leaves Ray Data no CPU on a cluster of `cluster_cpus`, or None when it does."""
    need = trainer_cpus(scaling)
    if need + DATA_CPUS <= cluster_cpus:
        return None
    room = max(0.0, cluster_cpus - DATA_CPUS)
    return (f"{name}: its workers take {need:g} of the cluster's {cluster_cpus:g} CPUs, leaving less than "
            f"{DATA_CPUS:g} for the Ray Data tasks that read its data, so the run would wait forever: keep the "
            f"workers' CPUs (scaling.num_workers x scaling.cpus_per_worker, --workers / --cpus-per-worker) at "
            f"{room:g} or less, or read small data once into memory (run.cache_data: true)")
