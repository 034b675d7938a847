"""Sharded checkpoints (jobs.checkpointing) reshard on load: a run saved by one plain worker resumes on
2 FSDP workers (gloo) and a run saved by those 2 workers resumes on one, with the model, AdamW state,
EMA, schedule and step counter exactly where they were; a checkpoint on S3 is read where it lies, each
rank fetching only the bytes it needs. The 2 workers are forked processes, not Ray,
so this takes seconds; tests/jobs/test_ray_stages.py resumes a real 2-worker Ray Train run on 1."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from jobs.checkpointing import FORMAT, load_training_state, save_sharded
from jobs.common import EMA, build_optimizer, build_scheduler, save_gathered_state
from jobs.config import OptimSettings
from jobs.masked import TrainWrapper
from jobs.parallel import WorkerEnv, fsdp_wrap, full_tensor, transformer_fsdp_units
from muse.config import preset
from muse.transformer import MaskedTransformer
from serve.app import unused_port

BATCH_SEEDS = (11, 12, 13, 14)  # the data of steps 1..4


class Run:
    """A tiny base transformer with the stage's optimizer, schedule and EMA."""

    def __init__(self, env: WorkerEnv, optim: OptimSettings = OptimSettings(lr=1e-3, warmup_steps=2),
                 total_steps: int = 20):
        torch.manual_seed(0)
        model = MaskedTransformer(replace(preset("base-tiny"), layers=1, text_layers=1))  # few tensors: fast
        wrapper = TrainWrapper(model)  # the base stage's module: FSDP runs the context encoder inside it
        self.model = fsdp_wrap(wrapper, transformer_fsdp_units(model), env) if env.world_size > 1 else wrapper
        self.opt = build_optimizer(self.model, optim, env)
        self.sched = build_scheduler(self.opt, optim, total_steps=total_steps)
        self.ema = EMA(self.model, 0.9)
        self.env = env

    def state(self) -> dict:
        return {"modules": {"model": self.model}, "optimizers": {"model": self.opt},
                "schedulers": {"model": self.sched}, "ema": self.ema}

    def loss(self, seed: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 512, (4, 64), generator=gen)
        logits = self.model(ids, torch.randn(4, 5, 64, generator=gen), torch.ones(4, 5, dtype=torch.bool))
        return nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())

    def step(self, step: int) -> float:
        """Every worker takes the same batch, so gradients averaged over 1 or 2 workers are equal."""
        loss = self.loss(BATCH_SEEDS[step])
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad()
        self.ema.update(step)
        return loss.item()

    def save(self, directory: str, step: int) -> None:
        save_sharded(directory, step=step, env=self.env, counters={"samples": 8.0 * step}, **self.state())

    def load(self, directory: str) -> dict:
        return load_training_state(directory, **self.state())

    def full(self) -> dict[str, torch.Tensor]:
        """Weights, AdamW state and EMA as full tensors by name (a collective under FSDP)."""
        out = {f"w/{n}": full_tensor(p) for n, p in self.model.named_parameters()}
        names = {id(p): n for n, p in self.model.named_parameters()}
        for p, st in self.opt.state.items():
            out |= {f"opt/{names[id(p)]}/{k}": full_tensor(v) for k, v in st.items()}
        return out | {f"ema/{k}": v for k, v in self.ema.full_state().items()}


def _two_workers(rank: int, port: int, load_dir: str, save_dir: str, out: str) -> None:
    """Rank `rank` of 2 FSDP workers: resume from `load_dir` (saved by one worker), check the next loss,
    take step 3 and save the run to `save_dir`."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        run = Run(WorkerEnv(rank, 2, torch.device("cpu"), "fsdp"))
        meta = run.load(load_dir)
        with torch.no_grad():
            resumed_loss = run.loss(BATCH_SEEDS[2]).item()
        loss = run.step(2)
        run.save(save_dir, step=3)
        full = run.full()
        if rank == 0:
            save_file({k: v.contiguous() for k, v in full.items()}, os.path.join(out, "full.safetensors"))
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump({"step": meta["step"], "resumed_loss": resumed_loss, "loss": loss,
                           "last_epoch": run.sched.last_epoch}, f)
    finally:
        dist.destroy_process_group()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


def test_a_run_reshards_from_one_worker_to_two_fsdp_workers_and_back(tmp_path):
    one, two, out = (str(tmp_path / n) for n in ("saved_by_1", "saved_by_2", "out"))
    os.makedirs(out)
    ref = Run(WorkerEnv())
    for step in range(2):
        ref.step(step)
    ref.save(one, step=2)
    assert json.load(open(os.path.join(one, "trainer_state.json")))["format"] == FORMAT
    assert not [f for f in os.listdir(one) if not f.endswith((".safetensors", ".json"))]  # nothing pickled
    with torch.no_grad():
        expected_resumed_loss = ref.loss(BATCH_SEEDS[2]).item()
    expected_loss = ref.step(2)  # the single worker's own step 3

    # 1 -> 2: fork two workers (no Ray, no fresh interpreter: seconds).
    mp.start_processes(_two_workers, args=(unused_port(), one, two, out), nprocs=2, start_method="fork")
    got = json.load(open(os.path.join(out, "result.json")))
    assert got["step"] == 2 and got["last_epoch"] == 3
    assert abs(got["resumed_loss"] - expected_resumed_loss) < 1e-5  # the loss continues where it was
    assert abs(got["loss"] - expected_loss) < 1e-5
    assert_same(load_file(os.path.join(out, "full.safetensors")), ref.full())
    assert len([f for f in os.listdir(two) if f.endswith(".safetensors")]) == 2  # one file per rank

    # 2 -> 1: a fresh single worker loads what the two saved.
    back = Run(WorkerEnv())
    meta = back.load(two)
    assert meta["step"] == 3 and meta["world_size"] == 2 and meta["counters"]["samples"] == 24.0
    assert back.sched.last_epoch == 3 and back.opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"]
    assert_same(back.full(), ref.full())
    assert abs(back.step(3) - ref.step(3)) < 1e-5


def test_full_state_checkpoints_of_format_1_still_load(tmp_path):
    ref = Run(WorkerEnv())
    ref.step(0)
    save_gathered_state(str(tmp_path), step=1, env=WorkerEnv(), counters={}, **ref.state())
    back = Run(WorkerEnv())
    assert back.load(str(tmp_path))["step"] == 1
    assert_same(back.full(), ref.full())


def test_an_optimizer_that_has_not_stepped_is_saved_without_stepping_it(tmp_path):
    """The VQGAN stage's discriminator optimizer waits for gan.disc_start: a checkpoint before that
    must not give it a state (AdamW's bias correction would then count one step too many)."""
    ref = Run(WorkerEnv())
    ref.save(str(tmp_path), step=0)
    assert not ref.opt.state
    back = Run(WorkerEnv())
    back.load(str(tmp_path))
    assert not back.opt.state
    assert back.step(0) == ref.step(0)


def _upload(local_dir: str, uri: str):
    """Copy a checkpoint directory to S3; returns (filesystem, path) as a Ray Train checkpoint has them."""
    import pyarrow.fs as pafs

    from muse import storage

    fs, path = storage.filesystem(uri)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return fs, path


def test_a_checkpoint_on_s3_is_read_in_place_and_the_run_continues(s3_bucket, tmp_path):
    """Sharded (format 2) and full-state (format 1) checkpoints both resume from S3 itself."""
    ref = Run(WorkerEnv())
    for step in range(2):
        ref.step(step)
    ref.save(str(tmp_path / "sharded"), step=2)
    os.makedirs(tmp_path / "full")
    save_gathered_state(str(tmp_path / "full"), step=2, env=WorkerEnv(), counters={}, **ref.state())
    for name in ("sharded", "full"):
        fs, path = _upload(str(tmp_path / name), f"{s3_bucket}/run/{name}")
        back = Run(WorkerEnv())
        assert load_training_state(path, filesystem=fs, **back.state())["step"] == 2
        assert_same(back.full(), ref.full())
    assert abs(back.step(2) - ref.step(2)) < 1e-5


class _Planner:
    """The two LoadPlanner calls a StorageReader makes: where a piece goes, and that it arrived."""

    def __init__(self, targets: dict[str, torch.Tensor]):
        self.targets, self.committed = targets, []

    def resolve_tensor(self, item):
        return self.targets[item.dest_index.fqn]

    def commit_tensor(self, item, tensor):
        self.committed.append(item.dest_index.fqn)


def test_a_rank_fetches_only_the_rows_of_the_pieces_it_needs(s3_bucket, tmp_path):
    """What an FSDP rank resuming on more workers asks for: rows 250-499 (and columns 8-23) of a
    saved tensor. Exactly those rows' bytes are fetched from S3, not the file."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem

    from jobs.checkpoint_reader import RangedCheckpointReader

    weights = {"w": torch.randn(1000, 64), "b": torch.randn(64), "step": torch.tensor(7.0)}
    dcp.save(weights, storage_writer=HuggingFaceStorageWriter(str(tmp_path / "ckpt")), no_dist=True)
    fs, path = _upload(str(tmp_path / "ckpt"), f"{s3_bucket}/ckpt")
    reader = RangedCheckpointReader(fs, path, coalesce_gap=0)  # 0: count the bytes of each piece alone
    meta = reader.read_metadata()
    assert reader.keys() == {"w", "b", "step"} and meta.state_dict_metadata["w"].size == torch.Size([1000, 64])

    def item(fqn, offsets, lengths):
        zeros = [0] * len(offsets)
        return ReadItem(type=LoadItemType.TENSOR, dest_index=MetadataIndex(fqn, zeros), dest_offsets=torch.Size(zeros),
                        storage_index=MetadataIndex(fqn, zeros), storage_offsets=torch.Size(offsets),
                        lengths=torch.Size(lengths))

    planner = _Planner({"w": torch.zeros(250, 16), "step": torch.tensor(0.0), "b": torch.zeros(0)})
    plan = LoadPlan([item("w", [250, 8], [250, 16]), item("step", [], []), item("b", [64], [0])])  # b: no rows
    reader.read_data(plan, planner).wait()
    assert torch.equal(planner.targets["w"], weights["w"][250:500, 8:24])
    assert planner.targets["step"].item() == 7.0 and sorted(planner.committed) == ["b", "step", "w"]
    assert reader.bytes_read == 250 * 64 * 4 + 4  # the rows and the scalar; the file is ~260 KB


def test_staging_directories_of_dead_workers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from jobs.checkpointing import remove_orphaned_staging, staging_directory

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs (reaped), as a worker killed mid-upload leaves
    orphan = tmp_path / f"muse-checkpoint-{dead.pid}-00000600-abc123"
    orphan.mkdir()
    (orphan / "shard-1-model-00001-of-00001.safetensors").write_bytes(b"x" * 1000)
    mine = staging_directory(800, parent=str(tmp_path))  # this process's: its upload may be in flight
    older = tmp_path / "muse-checkpoint-00000600-xyz789"  # older code's name, no pid: cannot tell, kept
    older.mkdir()
    other = tmp_path / "not-a-checkpoint"
    other.mkdir()
    assert remove_orphaned_staging(str(tmp_path)) == [orphan.name]
    assert not orphan.exists() and os.path.isdir(mine) and older.exists() and other.exists()
    assert os.path.basename(mine).startswith(f"muse-checkpoint-{os.getpid()}-00000800-")


def test_a_resume_keeps_the_configured_lr_betas_and_weight_decay(tmp_path):
    """The checkpoint's param groups used to replace the config's: lowering the lr after a divergence
    and resuming changed nothing, silently. The schedule follows the new lr (and a new max_steps) from
    the first resumed step, and the change is named."""
    from jobs.common import lr_factor

    ref = Run(WorkerEnv())
    for step in range(2):
        ref.step(step)
    ref.save(str(tmp_path), step=2)

    same = Run(WorkerEnv())
    assert same.load(str(tmp_path))["config_changes"] == []  # nothing changed: nothing to say
    assert same.opt.param_groups[0]["lr"] == ref.opt.param_groups[0]["lr"]

    lowered = OptimSettings(lr=2e-4, warmup_steps=2, betas=(0.9, 0.99), weight_decay=0.1)
    back = Run(WorkerEnv(), lowered, total_steps=40)
    meta = back.load(str(tmp_path))
    assert meta["step"] == 2 and back.sched.last_epoch == 2  # the run itself resumed
    assert meta["config_changes"] == ["model lr 0.001 -> 0.0002", "model betas (0.9, 0.96) -> (0.9, 0.99)",
                                      "model weight_decay 0.045 -> 0.1"]
    decay, no_decay = back.opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0  # per group, as configured
    for group in (decay, no_decay):
        assert group["betas"] == (0.9, 0.99) and group["initial_lr"] == 2e-4
        assert group["lr"] == pytest.approx(2e-4 * lr_factor(2, 2, 40, 0.0))  # the new schedule at step 2
    assert back.sched.base_lrs == [2e-4, 2e-4] and back.sched.get_last_lr()[0] == decay["lr"]
    assert back.opt.state  # AdamW's moments did come back
    back.step(2)
    assert decay["lr"] == pytest.approx(2e-4 * lr_factor(3, 2, 40, 0.0))


def test_a_parameter_without_optimizer_state_at_the_save_resumes_with_fresh_state(tmp_path):
    """The VQGAN codebook gets no gradient during the quantizer warm-up, so a checkpoint taken then
    holds no Adam state for it: the run resumes (that parameter's state starting afresh) instead of
    refusing the checkpoint on every restart. A checkpoint of another model is still refused."""
    env, cfg = WorkerEnv(), OptimSettings(lr=1e-3, warmup_steps=2)

    def make():
        torch.manual_seed(0)
        model = nn.ModuleDict({"enc": nn.Linear(4, 4), "codebook": nn.Embedding(8, 4)})
        opt = build_optimizer(model, cfg, env)
        return model, opt, build_scheduler(opt, cfg, 10)

    model, opt, sched = make()
    model["enc"](torch.randn(2, 4)).sum().backward()  # the codebook unused: warm-up
    opt.step()
    sched.step()
    save_sharded(str(tmp_path / "ck"), step=1, env=env, modules={"m": model}, optimizers={"m": opt},
                 schedulers={"m": sched}, ema=None, counters={})
    back, back_opt, back_sched = make()
    meta = load_training_state(str(tmp_path / "ck"), modules={"m": back}, optimizers={"m": back_opt},
                               schedulers={"m": back_sched}, ema=None)
    assert meta["step"] == 1
    assert torch.equal(back["enc"].weight, model["enc"].weight)
    saved = opt.state[model["enc"].weight]["exp_avg"]
    assert torch.equal(back_opt.state[back["enc"].weight]["exp_avg"], saved)
    assert not back_opt.state[back["codebook"].weight]["exp_avg"].any()  # fresh
    other = nn.ModuleDict({"enc": nn.Linear(4, 4), "head": nn.Linear(4, 2)})
    other_opt = build_optimizer(other, cfg, env)
    with pytest.raises(ValueError, match="does not match the model"):
        load_training_state(str(tmp_path / "ck"), modules={"m": other}, optimizers={"m": other_opt},
                            schedulers={"m": build_scheduler(other_opt, cfg, 10)}, ema=None)
