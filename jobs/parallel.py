"""Data parallelism for the training stages, kept apart from the models (which are single-device).

- `WorkerEnv`: rank, world size and device of one training worker (from Ray Train, or local).
- DDP: `ray.train.torch.prepare_model` (moves the model, wraps it when world > 1).
- FSDP: FSDP2 (`torch.distributed.fsdp.fully_shard`) on each block's self-attention, cross-attention
  and MLP, then on the root. Cross-attention K/V are computed by `encode_context` outside the block's
  forward, so `kv` is registered as an FSDP forward method (it all-gathers like `forward`). Ray's
  `prepare_model(parallel_strategy="fsdp")` wraps FSDP1 and refuses CPU; FSDP2 runs on gloo too.
- Under FSDP parameters and optimizer state are DTensor shards: `full_tensor` gathers one (a
  collective: every rank must call it in the same order) and `shard_like` scatters a full tensor.
- `allreduce_grads`: plain gradient averaging for the GAN stages, whose step runs two models and
  `autograd.grad` for the adaptive weight (awkward under DDP's one-forward-one-backward contract).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class WorkerEnv:
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    strategy: str = "ddp"
    bf16: bool = False  # mixed precision active (run.bf16 on GPU, run.cpu_bf16 on CPU)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 and dist.is_available() and dist.is_initialized()

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp" and self.distributed

    def autocast(self):
        """bf16 autocast (DDP or one worker); FSDP casts through its mixed-precision policy instead.
        In bf16 on a CPU, attention also takes the math kernel: the CPU flash kernel's bf16 backward
        made a tiny transformer's whole step ~1.4x slower (benchmarks/RESULTS.md, CPU attention)."""
        enabled = self.bf16 and not self.sharded
        cast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)
        if not (enabled and self.device.type == "cpu"):
            return cast
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack = contextlib.ExitStack()
        stack.enter_context(cast)
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        return stack


def configure_cpu_worker(cpus: float) -> None:
    """Torch settings for a training worker on CPUs, called in its training thread before any op.

    - As many torch threads as CPUs claimed: stages that share a small machine (base and super-res
      side by side) would otherwise each start a pool as wide as the machine.
    - Denormal floats flushed to zero: small gradients late in training are denormals, which x86
      CPUs handle in microcode; a VQGAN step ran 4x slower on an Intel Xeon (benchmarks/RESULTS.md,
      CPU denormals). The flag is per thread and new threads inherit it, hence before any pool starts.
    """
    torch.set_num_threads(max(1, int(cpus)))
    torch.set_flush_denormal(True)


def cpu_runs_bf16() -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX). Without them bf16 is
    emulated: a tiny base step in bf16 autocast ran 10-15x slower than in fp32 on an AVX2 AMD EPYC
    (benchmarks/RESULTS.md, "bf16 only where the CPU has it")."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these probes
        return False


def uses_bf16(device: torch.device, bf16: bool, cpu_bf16: bool) -> bool:
    """Mixed precision for a worker: run.bf16 on GPUs, run.cpu_bf16 on CPUs that run bf16 natively."""
    if device.type == "cpu":
        return cpu_bf16 and cpu_runs_bf16()
    return bf16 and device.type == "cuda"


def ray_worker_env(strategy: str, bf16: bool, cpu_bf16: bool = False) -> WorkerEnv:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    return WorkerEnv(ctx.get_world_rank(), ctx.get_world_size(), device, strategy,
                     uses_bf16(device, bf16, cpu_bf16))


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def wrap(model: nn.Module, env: WorkerEnv, fsdp_units: list[nn.Module] | None = None) -> nn.Module:
    """DDP (through Ray) or FSDP2 over `fsdp_units` + the root; unchanged for one local worker."""
    if not env.distributed:
        return model.to(env.device)
    if env.strategy == "fsdp":
        return fsdp_wrap(model.to(env.device), fsdp_units or [], env)
    import ray.train.torch

    return ray.train.torch.prepare_model(model, parallel_strategy="ddp")


def fsdp_wrap(model: nn.Module, units: list[nn.Module], env: WorkerEnv) -> nn.Module:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if env.bf16 \
        else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=policy)
        if hasattr(unit, "kv"):
            register_fsdp_forward_method(unit, "kv")
    fully_shard(model, mp_policy=policy)
    return model


def transformer_fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The attention and MLP modules of every block of a muse transformer."""
    units = []
    for block in model.modules():
        if hasattr(block, "attn") and hasattr(block, "mlp"):
            units += [m for m in (block.attn, block.cross, block.mlp) if m is not None]
    return units


def is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds (its shard under FSDP)."""
    return t.to_local() if is_dtensor(t) else t


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on CPU (gathers an FSDP shard: a collective)."""
    return (t.full_tensor() if is_dtensor(t) else t).detach().cpu()


def shard_like(full: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`full` laid out like `ref`: a DTensor with ref's mesh and placements, or a plain tensor on ref's device."""
    full = full.to(device=ref.device if not is_dtensor(ref) else ref.to_local().device, dtype=ref.dtype)
    if is_dtensor(ref):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full, ref.device_mesh, ref.placements)
    return full


def allreduce_grads(params: list[nn.Parameter], env: WorkerEnv) -> None:
    """Average the gradients of `params` over the workers, in one flat buffer."""
    if not env.distributed:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= env.world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def allreduce_mean(values: dict[str, float], env: WorkerEnv) -> dict[str, float]:
    """The mean of scalar metrics over the workers (every rank must call it)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.to(env.device)
    dist.all_reduce(t)
    return {k: float(v) / env.world_size for k, v in zip(keys, t.cpu().tolist())}
