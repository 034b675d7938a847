"""Iterative parallel decoding (MaskGIT, Chang et al. 2022; Muse arXiv 2301.00704 §2.8).

Start from a grid in which every free token is [MASK]. At step s of S:

    logits = model(ids, context)                       one forward over all N tokens   (B, N, K)
    logits = (1 + t_s)·ℓ_cond − t_s·ℓ_uncond           classifier-free guidance, t_s = scale·s/(S−1)
    x ~ softmax(logits)   at every masked position     (optionally only among the top-k ids)
    confidence = log p(x) + τ·(1 − (s+1)/S)·Gumbel      annealed noise; decoded tokens get +inf
    re-mask the ⌊N_free·γ((s+1)/S)⌋ least confident     γ = cosine (or linear) schedule, 0 at s = S−1

so after the last step no [MASK] is left. The conditional and unconditional branches run as one
batched forward over a context concatenated once before the loop; the text K/V inside `context` are
computed by the caller once per request (`model.encode_context`) and never inside the loop. A negative
prompt is simply a different `uncond_context`.

Randomness comes only from the explicit `generator`: one `torch.Generator` for the whole batch, or one
per row, in which case each row's draws depend on its own generator alone, so a batched server gives a
request the same tokens as running it by itself (given the same logits).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from muse.masking import num_masked_after_step
from muse.transformer import Context

Generators = torch.Generator | Sequence[torch.Generator]


def generate(
    model: torch.nn.Module,
    context: Context,
    uncond_context: Context | None = None,
    *,
    steps: int,
    guidance_scale: float | torch.Tensor = 0.0,
    generator: Generators,
    temperature: float = 4.5,
    schedule: str = "cosine",
    init_ids: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    top_k: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Decode token ids (B, N) long with no [MASK] left.

    model: `model(ids (B, N), context) -> logits (B, N, K)` with `.mask_token_id` and `.num_tokens`.
    context / uncond_context: from `model.encode_context`, B rows each (an uncond_context of one row is
        broadcast). Guidance needs `uncond_context`; a guidance scale of 0 never runs it.
    guidance_scale: target t (float or (B,) tensor), reached on the last step.
    generator: one torch.Generator or a list of B (one per row).
    temperature: τ, the Gumbel-noise scale on the confidence, annealed linearly to 0.
    init_ids (B, N) and fixed (B, N) bool: positions where `fixed` is True keep `init_ids` and are
        never resampled (inpainting); without `fixed`, every non-[MASK] id of init_ids is kept.
    top_k: sample only among the k most likely ids at each position (None = the full codebook).
    callback(step, ids): after each step, with the current ids ([MASK] where still undecided).
    """
    B = context.batch_size
    N, mask_id = model.num_tokens, model.mask_token_id
    device = context.mask.device
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gens = row_generators(generator, B)
    scale = guidance_scales(guidance_scale, B, device)  # (B,)
    if bool((scale != 0).any()) and uncond_context is None:
        raise ValueError("guidance_scale != 0 needs an uncond_context")
    joint = cfg_context(context, uncond_context) if bool((scale != 0).any()) else None

    if init_ids is None:
        if fixed is not None:
            raise ValueError("fixed needs init_ids")
        ids = torch.full((B, N), mask_id, dtype=torch.long, device=device)
    else:
        init_ids = init_ids.reshape(B, N).to(device=device, dtype=torch.long)
        fixed = (init_ids != mask_id) if fixed is None else fixed.reshape(B, N).to(device=device, dtype=torch.bool)
        if bool((init_ids[fixed] == mask_id).any()):
            raise ValueError("fixed positions of init_ids must not be [MASK]")
        ids = torch.where(fixed, init_ids, torch.full_like(init_ids, mask_id))
    n_free = (ids == mask_id).sum(dim=1).tolist()  # tokens to decode, per row
    n_remask = torch.tensor(  # (steps, B): still masked after each step
        [[num_masked_after_step(s, steps, n, schedule) for n in n_free] for s in range(steps)], device=device
    )

    with torch.no_grad():
        for step in range(steps):
            masked = ids == mask_id  # (B, N)
            ramp = step / (steps - 1) if steps > 1 else 1.0  # guidance ramps 0 -> scale
            logits = guided_logits(model, ids, context, joint if ramp > 0 else None, scale * ramp)  # (B, N, K)
            sampled, logp = sample_tokens(logits, gens, top_k=top_k)  # (B, N), (B, N)
            sampled = torch.where(masked, sampled, ids)

            # Confidence of this step's samples; everything decoded earlier (or fixed) is kept.
            noise_scale = temperature * (1.0 - (step + 1) / steps)
            confidence = logp + noise_scale * gumbel_noise((B, N), gens, device)
            confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
            order = confidence.argsort(dim=1, stable=True)  # least confident first
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=device).expand(B, N))
            ids = torch.where(ranks < n_remask[step][:, None], torch.full_like(ids, mask_id), sampled)
            if callback is not None:
                callback(step, ids)
    return ids


def cfg_context(context: Context, uncond_context: Context | None) -> Context | None:
    """[cond ; uncond] along the batch, built once per request for the batched guided forward."""
    if uncond_context is None:
        return None
    B = context.batch_size
    if uncond_context.batch_size == 1 and B > 1:
        uncond_context = uncond_context.repeat(B)
    if uncond_context.batch_size != B:
        raise ValueError(f"uncond_context has {uncond_context.batch_size} rows, context has {B}")
    return Context.cat([context, uncond_context])


def guided_logits(model: torch.nn.Module, ids: torch.Tensor, context: Context, joint: Context | None,
                  t: torch.Tensor) -> torch.Tensor:
    """(1 + t)·ℓ_cond − t·ℓ_uncond as float32 (B, N, K), t (B,): one forward of 2B rows over
    `joint` = cfg_context(...); with joint None, one forward of B rows on `context` alone (no guidance)."""
    if joint is None:
        return model(ids, context).float()
    cond, uncond = model(torch.cat([ids, ids]), joint).float().chunk(2)  # (B, N, K) each
    t = t.to(cond.dtype)[:, None, None]
    return (1 + t) * cond - t * uncond


def sample_tokens(logits: torch.Tensor, generators: list[torch.Generator] | torch.Generator,
                  top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One id per position from softmax(logits) (B, N, K) by inverse-CDF sampling (one uniform per
    token, so per-row generators stay cheap). Returns (ids (B, N) long, log p(ids) (B, N))."""
    B, N, K = logits.shape
    logp = logits.float().log_softmax(dim=-1)
    if top_k is not None and top_k < K:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logp.topk(top_k, dim=-1).values[..., -1:]  # (B, N, 1)
        logp = logp.masked_fill(logp < kth, float("-inf")).log_softmax(dim=-1)
    cdf = logp.exp().cumsum(dim=-1)  # (B, N, K)
    total = cdf[..., -1:]
    u = uniform((B, N), generators, logits.device)[..., None]
    # Strictly below the total, so the search lands on an id with non-zero probability.
    target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
    ids = torch.searchsorted(cdf, target, right=True).clamp(max=K - 1).squeeze(-1)  # (B, N)
    return ids, logp.gather(-1, ids[..., None]).squeeze(-1)


def uniform(shape: tuple[int, int], generators: list[torch.Generator] | torch.Generator,
            device: torch.device) -> torch.Tensor:
    """U[0, 1) of shape (B, ...), row b drawn from generators[b] (or all rows from one generator)."""
    if isinstance(generators, torch.Generator):
        return torch.rand(shape, generator=generators, device=generators.device).to(device)
    rows = [torch.rand(shape[1:], generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device)


def gumbel_noise(shape: tuple[int, int], generators: list[torch.Generator] | torch.Generator,
                 device: torch.device) -> torch.Tensor:
    u = uniform(shape, generators, device).clamp(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))


def row_generators(generator: Generators, batch: int) -> list[torch.Generator] | torch.Generator:
    """One shared generator as is, or a checked list of one generator per row."""
    if isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != batch or not all(isinstance(g, torch.Generator) for g in gens):
        raise ValueError(f"generator must be a torch.Generator or a list of {batch} (one per row)")
    return gens


def guidance_scales(guidance_scale: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """A float or (B,) tensor of guidance scales -> (B,) float32 on `device`."""
    scale = torch.as_tensor(guidance_scale, dtype=torch.float32, device=device)
    if scale.dim() == 0:
        scale = scale.expand(batch)
    if scale.shape != (batch,):
        raise ValueError(f"guidance_scale must be a float or a ({batch},) tensor, got shape {tuple(scale.shape)}")
    return scale
