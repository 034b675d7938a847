"""What the fake transformers of the sampling, editing and pipeline tests share."""

from __future__ import annotations

import torch


def context_tags(ctx) -> torch.Tensor:
    """The number each row of a fake context carries (B,): its single key's value, read back through
    the context's own attention (one key, so the output is that key's value); a ContextStack's parts
    in order, a one-row part repeated for the rows it serves."""
    if hasattr(ctx, "parts"):
        return torch.cat([context_tags(c).expand(n) for c, n in zip(ctx.parts, ctx.rows)])
    q = torch.ones(ctx.batch_size, 1, 1, 1)
    return ctx.attend(0, q)[:, 0, 0, 0]


def selected(logits: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """A real model's `select`: logits (B, N, K) -> (M, K) at the selected positions."""
    return logits if select is None else logits[select]
