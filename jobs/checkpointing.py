"""Training checkpoints: every rank writes its own shards, Ray Train uploads them in the background, and
a run resumes on any number of workers.

Checkpoint directory (each rank reports its own; Ray Train merges them under one checkpoint in storage):

    shard-<rank + 1>-model-00001-of-00001.safetensors   this rank's pieces of every tensor
    trainer_state.json     (rank 0) format, step, counters, scheduler states, optimizer param_groups,
                           and the run's identity (model root, component, architecture: jobs.preflight)

The shards are written by `torch.distributed.checkpoint` (DCP) through its safetensors storage: each
file is plain safetensors whose header records where its pieces sit in the full tensors, so loading
reshards to any worker count and strategy (FSDP on 2 workers -> one plain worker, and back). Nothing
is pickled: no DCP `.metadata` file (its default writer pickles one), no `torch.save` of objects;
non-tensor state goes in the JSON. State dicts come from DCP's `get_state_dict` / `set_state_dict`,
which use the same parameter names for plain, DDP and FSDP modules.

Tensor keys: "module/<name>/<fqn>", "optim/<name>/<fqn>/<key>" (exp_avg, step, ...), "ema/<param name>".

A run resumes from the checkpoint where it lies, local or S3 (`jobs.checkpoint_reader`): each rank
fetches only the byte ranges of the pieces its own shards need, so no node downloads the whole
checkpoint and none needs the disk for it.

Each rank writes its shards to a local staging directory (`staging_directory`) that Ray Train deletes
once uploaded. A worker that dies mid-upload leaves its directory behind, a checkpoint's worth of
disk per failure; the next worker on the node removes the directories of processes that are gone
(`remove_orphaned_staging`).

On load the optimizers keep the lr, betas and weight decay they were built with from the config, and
the schedule its base lrs: the checkpoint's values would otherwise win without a word.

Checkpoints of format_version 1 (full tensors gathered to rank 0: `jobs.common.save_gathered_state`)
still load, on any worker count (from S3 each rank downloads one to a temporary directory first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.distributed.checkpoint.state_dict import get_state_dict, set_model_state_dict, set_state_dict

from jobs import common
from jobs.checkpoint_reader import RangedCheckpointReader
from jobs.common import EMA, STATE_FILE
from jobs.parallel import WorkerEnv, is_dtensor, local
from muse import storage

FORMAT = "torch-dcp-safetensors"
FORMAT_VERSION = 2


STAGING_PREFIX = "muse-checkpoint-"


def staging_directory(step: int, parent: str | None = None) -> str:
    """A new local directory for this process's shards of the checkpoint at `step`; its name carries
    the process id, so that an orphan can be told from a directory still being uploaded."""
    return tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-{step:08d}-", dir=parent)


def check_room_for_upload(directory: str, run_dir: str, step: int) -> None:
    """Ray Train uploads the checkpoint staged in `directory` in a background thread, where a full disk
    fails the attempt unseen by the training loop, and so every restart the same way: refuse it here,
    as an error the loop stops the run for (`jobs.attempts.fails_every_attempt`). Each rank checks its own
    shards only, so a checkpoint that fits is never refused."""
    size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(directory)
               for name in names)
    try:
        storage.check_room(run_dir, size, f"this worker's shards of the checkpoint at step {step}")
    except OSError:
        shutil.rmtree(directory, ignore_errors=True)  # never uploaded: nothing else removes it
        raise


def remove_orphaned_staging(parent: str | None = None) -> list[str]:
    """Delete the staging directories under `parent` (default: the temp dir) whose process no longer
    runs: their uploads died with it, so no checkpoint refers to them. Returns what was removed."""
    parent = parent or tempfile.gettempdir()
    removed = []
    for name in os.listdir(parent):
        if not name.startswith(STAGING_PREFIX):
            continue
        fields = name[len(STAGING_PREFIX):].split("-")  # pid, step, mkdtemp's suffix (no "-" in it)
        if len(fields) != 3 or not fields[0].isdigit() or _process_runs(int(fields[0])):
            continue  # a name without a pid (older code), or a live process's (a reused pid errs on keeping)
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        removed.append(name)
    return removed


def _process_runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _ema_tensors(ema: EMA) -> dict[str, torch.Tensor]:
    """The EMA shadows laid out like their parameters (DTensors under FSDP), sharing their storage."""
    out = {}
    for name, p, s in zip(ema.names, ema.params, ema.shadow):
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
        out[f"ema/{name}"] = s
    return out


def _state(modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None,
           unstepped: set[str]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[dict, dict | None]], dict]:
    """(flat tensors for DCP, nested state dicts per module, JSON-ready optimizer meta). The flat
    tensors are the nested dicts' own tensors, so loading into them fills the nested dicts too.
    Optimizers named in `unstepped` have no state to save: they are left out of DCP's state dicts,
    whose first use of an optimizer takes a zero step that would start its Adam step count early."""
    unknown = set(optimizers) - set(modules)
    if unknown:
        raise ValueError(f"optimizers {sorted(unknown)} have no module of the same name")
    flat: dict[str, torch.Tensor] = {}
    nested: dict[str, tuple[dict, dict | None]] = {}
    meta: dict[str, Any] = {name: {"param_groups": _jsonable(optimizers[name].state_dict()["param_groups"]),
                                   "unstepped": True} for name in unstepped}
    for name, module in modules.items():
        opts = [optimizers[name]] if name in optimizers and name not in unstepped else []
        model_sd, optim_sd = get_state_dict(module, opts)
        flat.update({f"module/{name}/{k}": v for k, v in model_sd.items()})
        if opts:
            scalars = {}
            for fqn, per_param in optim_sd["state"].items():
                for key, value in per_param.items():
                    if torch.is_tensor(value):
                        flat[f"optim/{name}/{fqn}/{key}"] = value
                    else:
                        scalars[f"{fqn}/{key}"] = value
            meta[name] = {"param_groups": _jsonable(optim_sd["param_groups"]), "scalars": scalars}
        nested[name] = (model_sd, optim_sd if opts else None)
    if ema is not None:
        flat.update(_ema_tensors(ema))
    return flat, nested, meta


def _jsonable(groups: list[dict]) -> list[dict]:
    out = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in groups]
    json.dumps(out)  # raises here rather than half-way through writing a checkpoint
    return out


def save_sharded(directory: str, *, step: int, env: WorkerEnv, modules: dict[str, nn.Module],
                 optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any], ema: EMA | None,
                 counters: dict[str, Any], identity: dict | None = None) -> None:
    """Write this rank's shards into `directory` (and the JSON on rank 0). Every rank calls it: DCP
    agrees on who writes which piece (a replicated tensor is written once) through the process group.
    `identity`: the run's (`jobs.preflight.run_identity`), which the driver checks before resuming."""
    unstepped = {name for name, opt in optimizers.items() if not opt.state}
    flat, _, optim_meta = _state(modules, optimizers, ema, unstepped)
    dcp.save(flat, storage_writer=HuggingFaceStorageWriter(directory, save_distributed=True))
    if env.is_main:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "counters": counters,
                "world_size": env.world_size, "strategy": env.strategy,
                "schedulers": {k: s.state_dict() for k, s in schedulers.items()}, "optimizers": optim_meta}
        if identity is not None:
            meta["identity"] = identity
        tmp = os.path.join(directory, STATE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(tmp, os.path.join(directory, STATE_FILE))


def read_meta(directory: str, filesystem: pafs.FileSystem | None = None) -> dict:
    fs = filesystem or pafs.LocalFileSystem()
    with fs.open_input_stream(f"{directory.rstrip('/')}/{STATE_FILE}") as f:
        return json.loads(f.read())


def load_training_state(directory: str, *, modules: dict[str, nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                        ema: EMA | None, filesystem: pafs.FileSystem | None = None,
                        stats: dict | None = None) -> dict:
    """Restore a checkpoint of either format on every rank (any worker count); returns the JSON meta.
    `directory` is a path on `filesystem` (a Ray Train checkpoint's `.path` and `.filesystem`), local
    when no filesystem is given. `stats`, if given, gets this rank's "fetched_bytes" of the checkpoint's
    "total_bytes".

    The optimizers' hyperparameters stay as configured (the optimizers and schedulers were built from
    the config): the checkpoint's lr, betas and weight decay would otherwise silently win, and lowering
    the lr after a divergence would change nothing. meta["config_changes"] names what differed."""
    configured = hyperparameters(optimizers)
    meta = _load(directory, modules=modules, optimizers=optimizers, schedulers=schedulers, ema=ema,
                 filesystem=filesystem, stats=stats)
    meta["config_changes"] = reapply_hyperparameters(optimizers, schedulers, configured)
    return meta


HYPERPARAMETERS = ("lr", "betas", "weight_decay")  # what the config sets in each param group


def hyperparameters(optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, list[dict]]:
    """Each optimizer's configured hyperparameters, per param group; "lr" is the schedule's base lr
    (a scheduler keeps it in the group as "initial_lr", and "lr" is that times its factor)."""
    out = {}
    for name, opt in optimizers.items():
        out[name] = [{"lr": g.get("initial_lr", g["lr"]), "betas": tuple(g["betas"]), "weight_decay": g["weight_decay"]}
                     for g in opt.param_groups]
    return out


def reapply_hyperparameters(optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                            configured: dict[str, list[dict]]) -> list[str]:
    """Put `configured` (from `hyperparameters` before loading) back into every param group and the
    schedulers' base lrs, and set each group's lr from its schedule at the loaded step (so a changed lr,
    warm-up or max_steps applies from the first resumed step). Returns "name key old -> new" for each
    value the checkpoint had otherwise."""
    changes: dict[tuple[str, str], set[tuple[Any, Any]]] = {}
    for name, opt in optimizers.items():
        loaded = hyperparameters({name: opt})[name]
        for group, old, new in zip(opt.param_groups, loaded, configured[name]):
            for key in HYPERPARAMETERS:
                if old[key] != new[key]:
                    changes.setdefault((name, key), set()).add((old[key], new[key]))
            group.update(betas=new["betas"], weight_decay=new["weight_decay"])
            group["initial_lr" if "initial_lr" in group else "lr"] = new["lr"]
    for sched in schedulers.values():
        groups = sched.optimizer.param_groups
        sched.base_lrs = [g.get("initial_lr", g["lr"]) for g in groups]
        if hasattr(sched, "lr_lambdas"):  # LambdaLR (jobs.common.build_scheduler): lr = base * factor(step)
            lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
            for g, lr in zip(groups, lrs):
                g["lr"] = lr
            sched._last_lr = lrs
    return [f"{name} {key} " + ", ".join(f"{_shown(a)} -> {_shown(b)}" for a, b in sorted(pairs, key=str))
            for (name, key), pairs in changes.items()]


def _shown(value: Any) -> str:
    return "(" + ", ".join(f"{v:g}" for v in value) + ")" if isinstance(value, tuple) else f"{value:g}"


def _state_never_saved(missing: set[str], saved_keys: set[str]) -> list[str]:
    """The optimizer-state keys (`optim/<module>/<param>/<key>`) of `missing` whose parameter has no
    optimizer state in the checkpoint at all (an Adam state that was never created), not a partial one."""
    saved_params = {key.rsplit("/", 1)[0] for key in saved_keys if key.startswith("optim/")}
    return [key for key in missing if key.startswith("optim/") and key.rsplit("/", 1)[0] not in saved_params]


def _load(directory: str, *, modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
          schedulers: dict[str, Any], ema: EMA | None, filesystem: pafs.FileSystem | None,
          stats: dict | None) -> dict:
    fs = filesystem or pafs.LocalFileSystem()
    meta = read_meta(directory, fs)
    if meta.get("format") != FORMAT:
        with _local_copy(directory, fs) as local_dir:
            return common.load_gathered_state(local_dir, modules=modules, optimizers=optimizers,
                                              schedulers=schedulers, ema=ema)
    if meta.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {meta['format_version']} is newer than this code")
    reader = RangedCheckpointReader(fs, directory)
    saved_keys = reader.keys()
    restart_ema = ema is not None and not any(k.startswith("ema/") for k in saved_keys)
    unstepped = {name for name, saved in meta["optimizers"].items() if saved.get("unstepped")}
    flat, nested, _ = _state(modules, optimizers, None if restart_ema else ema, unstepped)
    # A parameter that had no gradient before the save (the VQGAN codebook in its warm-up) has no Adam
    # state there; the fresh optimizer here has zero state for it, and keeps that.
    for key in _state_never_saved(set(flat) - saved_keys, saved_keys):
        del flat[key]
    missing = set(flat) - saved_keys
    if missing:
        raise ValueError(f"{directory} does not match the model: missing {sorted(missing)[:5]}")
    dcp.load(flat, storage_reader=reader)  # fills `nested` in place
    if stats is not None:
        stats.update(fetched_bytes=reader.bytes_read, total_bytes=reader.total_bytes)
    for name, module in modules.items():
        model_sd, optim_sd = nested[name]
        if optim_sd is None:
            set_model_state_dict(module, model_sd)
            if name in unstepped:  # no state yet: only its hyperparameters (lr, ...)
                for group, saved in zip(optimizers[name].param_groups, meta["optimizers"][name]["param_groups"]):
                    group.update({k: tuple(v) if k == "betas" else v for k, v in saved.items() if k != "params"})
            continue
        saved = meta["optimizers"][name]
        for key, value in saved["scalars"].items():
            fqn, _, k = key.rpartition("/")
            optim_sd["state"].setdefault(fqn, {})[k] = value
        optim_sd["param_groups"] = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()}
                                    for g in saved["param_groups"]]
        set_state_dict(module, [optimizers[name]], model_state_dict=model_sd, optim_state_dict=optim_sd)
    if ema is not None:
        # A run that turns EMA on starts the average from the loaded weights.
        loaded = [local(p).detach() for p in ema.params] if restart_ema else _loaded_ema(flat, ema)
        with torch.no_grad():
            for s, value in zip(ema.shadow, loaded):
                s.copy_(value)
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    return meta


def _loaded_ema(flat: dict[str, torch.Tensor], ema: EMA) -> list[torch.Tensor]:
    return [flat[f"ema/{n}"].to_local() if is_dtensor(flat[f"ema/{n}"]) else flat[f"ema/{n}"] for n in ema.names]


@contextlib.contextmanager
def _local_copy(directory: str, fs: pafs.FileSystem) -> Iterator[str]:
    """`directory` as a local path: itself when local, else a temporary download (format 1 only)."""
    if isinstance(fs, pafs.LocalFileSystem):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="muse-resume-") as tmp:
        pafs.copy_files(directory, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        yield tmp
