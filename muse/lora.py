"""Low-rank adapters (LoRA, Hu et al. 2021) for fine-tuning a transformer with its weights frozen.

    y = W x + (alpha / r) · B A x        W frozen; A (r, in) and B (out, r) trained; B starts at 0

`add_lora(model, rank)` wraps the attention projections (by default) of any of our transformers (Muse
base / super-res, aMUSEd's U-ViT) in `LoRALinear` and freezes every other parameter, so an
optimizer over the trainable parameters updates only the adapters. At rank r a d x d projection gains
2·r·d parameters. `merge_lora(model)` folds each adapter into its weight and puts plain `nn.Linear`s
back, so the merged model has the original state-dict keys and loads, samples and serves like any
other component.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# Attention projections in both families: Muse's q/k/v/qkv/out, aMUSEd's q/k/v/out.
DEFAULT_TARGETS = ("q", "k", "v", "qkv", "out")


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype,
                                               device=base.weight.device))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype,
                                               device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear; B = 0 keeps the output unchanged

    @property
    def weight(self) -> torch.Tensor:  # modules that read `.weight` (dtype, device) keep working
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t().to(x.dtype)) @ (self.lora_b.t() * self.scale).to(x.dtype)

    def merged(self) -> nn.Linear:
        out = nn.Linear(self.in_features, self.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            delta = (self.lora_b.float() @ self.lora_a.float()) * self.scale
            out.weight.copy_((self.base.weight.float() + delta).to(out.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _attention(module: nn.Module) -> bool:
    """An attention block: it projects queries (`q`, or `qkv` fused)."""
    return any(isinstance(getattr(module, name, None), (nn.Linear, LoRALinear)) for name in ("q", "qkv"))


def add_lora(model: nn.Module, rank: int, alpha: float | None = None,
             targets: tuple[str, ...] = DEFAULT_TARGETS) -> list[str]:
    """Wrap every `nn.Linear` whose attribute name is in `targets` and freeze everything else.
    alpha defaults to rank (scale 1). Returns the wrapped modules' names."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0 (None: the rank), got {alpha}")
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        if not _attention(module):  # a feed-forward's `out` (the U-ViT's) is not a target
            continue
        for child_name, child in list(module.named_children()):
            if child_name in targets and type(child) is nn.Linear:
                setattr(module, child_name, LoRALinear(child, rank, float(rank if alpha is None else alpha)))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named one of {targets} in {type(model).__name__}")
    return wrapped


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights alone (what a LoRA run changes)."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_a", ".lora_b"))}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight, in place; the model gets back its original modules and keys."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model
