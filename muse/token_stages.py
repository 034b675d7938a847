"""The two token stages as plain functions, shared by `MusePipeline`, the serving deployments and the
training stages' sample grids:

    TextCondition ──stage_contexts──▶ (context, uncond) ──sampling.generate──▶ token ids

`base_tokens` draws the low-res grid for prompts; `superres_tokens` the high-res grid for low-res ids.
Each stage encodes its cross-attention context once per request (conditional, and unconditional or
negative when guidance is on) and hands it to `sampling.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from muse import sampling
from muse.context import Context
from muse.transformer import MaskedTransformer, SuperResTransformer

@dataclass
class TextCondition:
    """Text encoder output for B prompts: embeddings (B, L, D) and mask (B, L) bool."""

    embeddings: torch.Tensor
    mask: torch.Tensor

    @property
    def batch_size(self) -> int:
        return self.embeddings.shape[0]

    def repeat(self, n: int) -> TextCondition:
        """Each prompt repeated n times in a row."""
        return TextCondition(self.embeddings.repeat_interleave(n, 0), self.mask.repeat_interleave(n, 0))


@torch.no_grad()  # decoding only: no autograd graph kept through the decode
def stage_contexts(model: torch.nn.Module, cond: TextCondition, negative: TextCondition | None, *,
                   guided: bool, lo_ids: torch.Tensor | None = None, repeat: int = 1) -> tuple[Context, Context | None]:
    """(context, uncond_context) for one stage, each encoded once. The base model's contexts are
    encoded per prompt and repeated `repeat` times; the super-res model's are encoded per row of
    `lo_ids` (whose rows are the prompts' images, prompt-major). uncond is None when not guided; it
    comes from `negative` when given, else it is the model's null context (the base model's is one
    cached row that serves every row)."""
    weight = next(model.parameters())
    if lo_ids is not None:
        lo_ids = lo_ids.to(weight.device)

    def encode(c: TextCondition) -> Context:  # on the model's device and in its dtype, wherever c came from
        emb, mask = c.embeddings.to(weight.device, weight.dtype), c.mask.to(weight.device).bool()
        if lo_ids is None:
            return model.encode_context(emb, mask).repeat(repeat) if repeat > 1 else model.encode_context(emb, mask)
        return model.encode_context(emb, mask, lo_ids)

    def rows(c: TextCondition, what: str) -> TextCondition:
        target = cond.batch_size if lo_ids is None else lo_ids.shape[0]
        if c.batch_size == target:
            return c
        if c.batch_size == 0 or target % c.batch_size:
            raise ValueError(f"{what} has {c.batch_size} rows, which does not divide {target}")
        return c.repeat(target // c.batch_size)

    cond = rows(cond, "cond")
    context = encode(cond)
    if not guided:
        return context, None
    if negative is not None:
        return context, encode(rows(negative, "negative"))
    return context, model.null_context() if lo_ids is None else model.null_context(lo_ids)


def base_tokens(base: MaskedTransformer, cond: TextCondition, negative: TextCondition | None = None, *,
                num_images: int = 1, steps: int = 24, guidance_scale: float | torch.Tensor = 4.0,
                generator: sampling.Generators, choice_temperature: float = 4.5, top_k: int | None = None,
                callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Low-res token ids (B·num_images, h, w) for B prompts, prompt-major. `generator`: one, or one
    per output row. `negative` (B or 1 rows) replaces the unconditional branch of guidance. `top_k`:
    each token drawn among the k likeliest codes (None: the whole codebook)."""
    guided = bool((torch.as_tensor(guidance_scale) != 0).any())
    ctx, uncond = stage_contexts(base, cond, negative, guided=guided, repeat=num_images)
    ids = sampling.generate(base, ctx, uncond, steps=steps, guidance_scale=guidance_scale, generator=generator,
                            choice_temperature=choice_temperature, top_k=top_k, callback=callback)
    side = base.config.tokens_per_side
    return ids.view(-1, side, side)


def superres_tokens(superres: SuperResTransformer, cond: TextCondition, lo_ids: torch.Tensor,
                    negative: TextCondition | None = None, *, steps: int = 8,
                    guidance_scale: float | torch.Tensor = 4.0, generator: sampling.Generators,
                    choice_temperature: float = 4.5, top_k: int | None = None,
                    callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """High-res token ids (B', H, W) for low-res ids (B', h, w); `cond` has B' rows or divides B'
    (then each prompt's rows are consecutive, as `base_tokens` returns them). `top_k` as in
    `base_tokens`."""
    guided = bool((torch.as_tensor(guidance_scale) != 0).any())
    ctx, uncond = stage_contexts(superres, cond, negative, guided=guided, lo_ids=lo_ids)
    ids = sampling.generate(superres, ctx, uncond, steps=steps, guidance_scale=guidance_scale,
                            generator=generator, choice_temperature=choice_temperature, top_k=top_k,
                            callback=callback)
    side = superres.config.hi_tokens_per_side
    return ids.view(-1, side, side)
