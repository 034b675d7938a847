"""Pieces every training stage shares: AdamW param groups, warm-up + cosine schedule, EMA of weights,
the full-state checkpoint format (never pickle), sample grids and throughput accounting.

The full-state checkpoint (format_version 1; training now writes sharded checkpoints,
`jobs.checkpointing`, which still loads this one and benchmarks/train.py compares against it):

    <module>.safetensors        full weights of each trained module (model, discriminator)
    ema.safetensors             EMA weights of the trained parameters (when EMA is on)
    <optimizer>.optim.safetensors   optimizer state tensors, key "<param index>.<name>" (exp_avg, ...)
    trainer_state.json          step, counters, scheduler states, optimizer param_groups and scalars

Under FSDP every tensor is gathered to its full shape before it is written and scattered back on
restore, so a checkpoint does not depend on the number of workers or the parallel strategy.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from torch import nn

from jobs.config import OptimSettings
from jobs.parallel import WorkerEnv, full_tensor, is_dtensor, local, shard_like, unwrap
from muse import storage

STATE_FILE = "trainer_state.json"
EMA_FILE = "ema.safetensors"
FORMAT_VERSION = 1

# Dense bf16 peak FLOP/s by GPU name, for MFU (a `run.peak_tflops` setting overrides it).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0}


# ---------------------------------------------------------------------------------------------
# Optimizer and schedule.


DECAYED = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)  # the layers whose weights get weight decay


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on Linear/Conv weights only (transposed convs too: the patch tokenizer's output and
    the U-ViT's upsampling are ConvTranspose2d): not on biases, norms, embeddings, positions, codebooks."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                continue
            (decay if isinstance(module, DECAYED) and name == "weight" else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, optim: OptimSettings, env: WorkerEnv, lr: float | None = None):
    groups = [g for g in param_groups(model, optim.weight_decay) if g["params"]]
    return torch.optim.AdamW(groups, lr=lr or optim.lr, betas=tuple(optim.betas),
                             fused=env.device.type == "cuda")


def lr_factor(step: int, warmup: int, total: int, final: float) -> float:
    """Linear warm-up from 0 to 1 over `warmup` steps, then cosine from 1 down to `final` at `total`."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, optim: OptimSettings, total_steps: int):
    warmup, final = min(optim.warmup_steps, max(0, total_steps - 1)), optim.final_lr_fraction

    def factor(step: int) -> float:  # a plain function: LambdaLR keeps it out of its state_dict
        return lr_factor(step, warmup, total_steps, final)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip in place; returns the global norm as a 0-d tensor on the device (no host sync)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return torch.zeros(())
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return (full_tensor(norm) if is_dtensor(norm) else norm).detach()


class EMA:
    """Exponential moving average of the trainable parameters (the local shards under FSDP).
    The decay warms up as min(decay, (1 + step) / (10 + step)), so short runs are not dominated by
    the initial weights."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.shadow = [local(p).detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [local(p).detach().float() for p in self.params], 1.0 - d)

    @torch.no_grad()
    def copy_from_weights(self, name: str) -> None:
        """Reset one parameter's average to its current weights (after a jump such as a codebook seeding)."""
        i = self.names.index(name)
        self.shadow[i].copy_(local(self.params[i]).detach().float())

    def full_state(self) -> dict[str, torch.Tensor]:
        """Full EMA tensors by parameter name (a collective under FSDP)."""
        out = {}
        for name, p, s in zip(self.names, self.params, self.shadow):
            if is_dtensor(p):
                from torch.distributed.tensor import DTensor

                s = DTensor.from_local(s, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            out[name] = full_tensor(s).to(p.dtype)
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, p, s in zip(self.names, self.params, self.shadow):
            s.copy_(local(shard_like(state[name], p)).float())


# ---------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON.


def module_full_state(module: nn.Module, env: WorkerEnv) -> dict[str, torch.Tensor] | None:
    """Every parameter and buffer, full and on CPU; None on ranks that do not need it."""
    if not (env.is_main or env.sharded):
        return None
    state = {k: full_tensor(v).clone().contiguous() for k, v in unwrap(module).state_dict().items()}
    return state if env.is_main else None


@torch.no_grad()
def load_module_state(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = unwrap(module).state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, t in own.items():
        local(t).copy_(local(shard_like(state[key], t)))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_full_state(optimizer: torch.optim.Optimizer, env: WorkerEnv) -> tuple[dict, dict] | None:
    """(tensors {"<index>.<name>": full tensor}, meta {"param_groups", "scalars"}) or None off rank 0."""
    if not (env.is_main or env.sharded):
        return None
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx in sorted(sd["state"]):
        for key, value in sorted(sd["state"][idx].items()):
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = full_tensor(value).clone().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return (tensors, {"param_groups": groups, "scalars": scalars}) if env.is_main else None


def load_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    params = _optimizer_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        p = params[int(idx)]
        if value.shape == p.shape and value.ndim > 0:
            value = shard_like(value.to(p.dtype if value.is_floating_point() else value.dtype), p)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_gathered_state(directory: str, *, step: int, env: WorkerEnv, modules: dict[str, nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                        ema: EMA | None, counters: dict[str, float]) -> None:
    """Write a checkpoint directory on rank 0; every rank must call it (FSDP gathers)."""
    meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "step": step, "counters": counters,
                            "schedulers": {k: s.state_dict() for k, s in schedulers.items()}, "optimizers": {}}
    for name, module in modules.items():
        state = module_full_state(module, env)
        if state is not None:
            save_file(state, os.path.join(directory, f"{name}.safetensors"))
    for name, opt in optimizers.items():
        out = optimizer_full_state(opt, env)
        if out is not None:
            save_file(out[0], os.path.join(directory, f"{name}.optim.safetensors"))
            meta["optimizers"][name] = out[1]
    if ema is not None:
        state = ema.full_state() if (env.is_main or env.sharded) else None
        if env.is_main:
            save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(directory, EMA_FILE))
    if env.is_main:
        with open(os.path.join(directory, STATE_FILE), "w") as f:
            json.dump(meta, f, indent=1)


def load_gathered_state(directory: str, *, modules: dict[str, nn.Module],
                        optimizers: dict[str, torch.optim.Optimizer], schedulers: dict[str, Any],
                        ema: EMA | None) -> dict:
    """Restore everything `save_gathered_state` wrote (on every rank); returns the JSON meta."""
    with open(os.path.join(directory, STATE_FILE)) as f:
        meta = json.load(f)
    if meta.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"checkpoint format {meta['format_version']} is newer than this code")
    for name, module in modules.items():
        load_module_state(module, load_file(os.path.join(directory, f"{name}.safetensors")))
    for name, opt in optimizers.items():
        load_optimizer_state(opt, load_file(os.path.join(directory, f"{name}.optim.safetensors")),
                             meta["optimizers"][name])
    for name, sched in schedulers.items():
        sched.load_state_dict(meta["schedulers"][name])
    if ema is not None and os.path.exists(os.path.join(directory, EMA_FILE)):
        ema.load_full_state(load_file(os.path.join(directory, EMA_FILE)))
    return meta


def export_state(model: nn.Module, ema: EMA | None, env: WorkerEnv) -> dict[str, torch.Tensor] | None:
    """Full weights to export (EMA values for the trained parameters); None off rank 0."""
    state = module_full_state(model, env)
    ema_state = ema.full_state() if ema is not None and (env.is_main or env.sharded) else None
    if not env.is_main:
        return None
    if ema_state:
        state.update({k: v.to(state[k].dtype) for k, v in ema_state.items()})
    return state


# ---------------------------------------------------------------------------------------------
# Sample grids and throughput.


def image_grid(rows: list[list[Image.Image]], labels: list[str] | None = None, pad: int = 2) -> Image.Image:
    """Tile rows of images (resized to the largest) on white, with an optional label under each row."""
    side = max(im.size[0] for row in rows for im in row)
    cols = max(len(row) for row in rows)
    label_h = 12 if labels else 0
    grid = Image.new("RGB", (cols * (side + pad) + pad, len(rows) * (side + pad + label_h) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        y = pad + r * (side + pad + label_h)
        for c, im in enumerate(row):
            grid.paste(im.resize((side, side), Image.NEAREST), (pad + c * (side + pad), y))
        if labels:
            draw.text((pad, y + side), labels[r][: max(8, cols * side // 6)], fill=(0, 0, 0))
    return grid


def save_png(img: Image.Image, uri: str) -> None:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    storage.write_bytes(uri, buf.getvalue())


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    """Peak bf16 FLOP/s of the accelerator, or None (CPU, unknown GPU) when no override is given."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
