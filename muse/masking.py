"""Mask rates for training and unmasking schedules for decoding.

Training (Muse §2.4, variable masking rate): each sample's mask rate r follows the truncated arccos
density p(r) = 2/π · (1 − r²)^(−1/2) on [0, 1], mean 2/π ≈ 0.64, which biases training toward the
high mask rates that decoding starts from. Sampling it is one line: r = cos(π/2 · u), u ~ U(0, 1].

Decoding (MaskGIT): after a fraction `progress` of the steps, `schedule(name, progress)` of the
tokens are still masked: cosine cos(π/2 · p) or linear 1 − p.
"""

from __future__ import annotations

import math

import torch


def sample_mask_rates(batch: int, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """(B,) mask rates from the arccos density, in (0, 1]."""
    u = torch.rand(batch, generator=generator, device=device)
    # u in [0, 1): 1 - u in (0, 1], so r = cos(π/2·(1-u)) is never exactly 0 (at least one token masked).
    return torch.cos(math.pi / 2 * (1.0 - u)).clamp(min=1e-6)


def mask_tokens(ids: torch.Tensor, rates: torch.Tensor, mask_id: int, generator: torch.Generator | None = None,
                priority: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace round(rate·N) random positions per row (at least one) by `mask_id`.
    ids (B, N), rates (B,) -> (masked ids (B, N), mask (B, N) bool, True = masked). `priority` (B, N),
    if given, orders the positions instead of a uniform draw: the lowest are masked."""
    B, N = ids.shape
    n_masked = (rates * N).round().clamp(min=1, max=N).long()  # (B,)
    scores = torch.rand(B, N, generator=generator, device=ids.device) if priority is None else priority
    ranks = scores.argsort(dim=1).argsort(dim=1)  # each position's rank in that order
    mask = ranks < n_masked[:, None]
    return torch.where(mask, torch.full_like(ids, mask_id), ids), mask


def schedule(name: str, progress: float) -> float:
    """Fraction of tokens still masked after `progress` ∈ [0, 1] of the decoding steps."""
    p = min(max(float(progress), 0.0), 1.0)
    if name == "cosine":
        return math.cos(math.pi / 2 * p)
    if name == "linear":
        return 1.0 - p
    raise ValueError(f"schedule must be 'cosine' or 'linear', got {name!r}")


def num_masked_after_step(step: int, steps: int, n_tokens: int, name: str = "cosine") -> int:
    """Tokens still masked after step `step` (0-based) of `steps`; 0 after the last step."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if step >= steps - 1:
        return 0
    return int(math.floor(n_tokens * schedule(name, (step + 1) / steps)))
