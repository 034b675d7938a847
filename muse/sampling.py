"""Iterative parallel decoding (MaskGIT, Chang et al. 2022; Muse arXiv 2301.00704 §2.8).

Start from a grid in which every free token is [MASK]. At step s of S:

    logits = model(ids, context)[masked]               one forward, logits only where still masked (M, K)
    logits = (1 + t_s)·ℓ_cond − t_s·ℓ_uncond           classifier-free guidance, t_s = scale·s/(S−1)
    x ~ softmax(logits)                                 (optionally only among the top-k ids)
    confidence = log p(x) + τ·(1 − (s+1)/S)·Gumbel      annealed noise; decoded tokens get +inf
    re-mask the least confident, keeping              γ = cosine (or linear) schedule, 0 at s = S−1
        min(⌊N_free·γ((s+1)/S)⌋, masked − 1) masked    (MaskGIT's clamp: every step decodes a token)

so after the last step no [MASK] is left. A grid with fewer free tokens than steps (a small inpainting
region) is decoded in as many steps as it has free tokens, and the loop stops once nothing is masked.

What each step costs is the forward pass: the conditional and unconditional branches run as one
batched forward (the unconditional one over the model's cached one-token null context, or a negative
prompt's), logits come out only at masked positions, guidance is applied in place (a `lerp_` into the
unconditional half), and softmax, sampling and log p work in that same buffer. Sampling inverts the
CDF blockwise (√K blocks, then one block), so no cumulative sum over the whole codebook is formed,
and log p comes from the normaliser. No (M, K) tensor is allocated besides the forward's own output
(two of them with guidance); logits stay in the model's dtype (bf16 on GPU), reductions in float32.

Randomness comes only from the explicit `generator`: one `torch.Generator` for the whole batch, or one
per row. Each row's uniforms for the whole request (one per token per step to sample, one for the
confidence noise) are drawn from its own generator up front, so a batched server gives a request the
same tokens as running it by itself (given the same logits), and the loop makes no per-row calls.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from muse.config import RENAMED_TEMPERATURE
from muse.context import Context, ContextStack
from muse.masking import num_masked_after_step

Generators = torch.Generator | Sequence[torch.Generator]


def generate(
    model: torch.nn.Module,
    context: Context,
    uncond_context: Context | None = None,
    *,
    steps: int,
    guidance_scale: float | torch.Tensor = 0.0,
    generator: Generators,
    choice_temperature: float = 4.5,
    schedule: str = "cosine",
    init_ids: torch.Tensor | None = None,
    fixed: torch.Tensor | None = None,
    top_k: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
    temperature: float | None = None,
) -> torch.Tensor:
    """Decode token ids (B, N) long with no [MASK] left.

    model: `model(ids (B, N), context, select=(B, N) bool) -> logits (M, K)` at the selected
        positions, with `.mask_token_id` and `.num_tokens` (a `TokenTransformer`).
    context / uncond_context: from `model.encode_context` / `model.null_context`, B rows each (an
        uncond_context of one row serves every row). Guidance needs `uncond_context`; a guidance
        scale of 0 never runs it.
    guidance_scale: target t (float or (B,) tensor), reached on the last step.
    generator: one torch.Generator or a list of B (one per row).
    choice_temperature: τ, the scale of the Gumbel noise on the confidence, annealed linearly to 0
        (MaskGIT's choice temperature; `temperature` is its old name, still accepted with a warning).
    init_ids (B, N) and fixed (B, N) bool: positions where `fixed` is True keep `init_ids` and are
        never resampled (inpainting); without `fixed`, every non-[MASK] id of init_ids is kept.
    top_k: sample only among the k most likely ids at each position (None = the full codebook).
    callback(step, ids): after each step, with the current ids ([MASK] where still undecided).
    """
    choice_temperature = check_choice_temperature(renamed_temperature(choice_temperature, temperature))
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
    ids = initial_ids(B, N, mask_id, device, init_ids, fixed)
    draws = decode_uniforms(gens, B, steps, N, device)

    plan = decode_plan((ids == mask_id).sum(dim=1).tolist(), steps, choice_temperature, (scale != 0).tolist(),
                       schedule, device)

    with torch.no_grad():
        for step in range(plan.steps):
            masked = ids == mask_id  # (B, N)
            if not bool(masked.any()):
                break
            logits = guided_logits(model, ids, context, joint if plan.guided[step] else None,
                                   scale * plan.ramps[step], masked)
            picked, logp = sample_tokens(logits, draws[:, step, 0][masked], top_k=top_k)  # (M,), (M,)
            ids = remask(ids, masked, picked, logp, draws[:, step, 1][masked], plan, step, mask_id)
            if callback is not None:
                callback(step, ids)
    return ids


@dataclass(frozen=True)
class DecodePlan:
    """Each row's schedule for one decode. A row runs min(steps, its tokens to decode) steps (each
    step decodes one or more), and its mask schedule, guidance ramp and choice noise follow its own
    step count, so a row decodes the same whatever rows are batched beside it."""

    steps: int  # steps the loop runs: the most any row needs
    keep: torch.Tensor  # (steps, B) long: tokens still masked after each step
    ramps: torch.Tensor  # (steps, B): guidance ramp, 0 on a row's first step -> 1 on its last
    noise: torch.Tensor  # (steps, B): the choice noise's scale, annealed to 0
    guided: list[bool]  # per step: whether any guided row's ramp is above 0 (the unconditional branch runs)


def decode_plan(n_free: list[int], steps: int, choice_temperature: float, guided_rows: list[bool],
                schedule: str = "cosine", device: torch.device | str | None = None) -> DecodePlan:
    """The plan for rows with `n_free` tokens to decode, asked for `steps`; made once per decode, so the
    loop copies nothing to the device."""
    row_steps = [min(steps, n) for n in n_free]
    loop = max(row_steps, default=0)
    keep = [[num_masked_after_step(s, rs, n, schedule) if s < rs else 0 for rs, n in zip(row_steps, n_free)]
            for s in range(loop)]
    ramps = [[min(s / (rs - 1), 1.0) if rs > 1 else float(rs == 1) for rs in row_steps] for s in range(loop)]
    noise = [[choice_temperature * max(0.0, 1.0 - (s + 1) / rs) if rs else 0.0 for rs in row_steps]
             for s in range(loop)]
    B = len(n_free)
    return DecodePlan(
        steps=loop,
        keep=torch.tensor(keep, device=device, dtype=torch.long).reshape(loop, B),
        ramps=torch.tensor(ramps, device=device).reshape(loop, B),
        noise=torch.tensor(noise, device=device).reshape(loop, B),
        guided=[any(g and r > 0 for g, r in zip(guided_rows, row)) for row in ramps],
    )


def remask(ids: torch.Tensor, masked: torch.Tensor, picked: torch.Tensor, logp: torch.Tensor,
           noise_u: torch.Tensor, plan: DecodePlan, step: int, mask_id: int) -> torch.Tensor:
    """The ids after `step`: the samples `picked` (with log p `logp`) fill the `masked` positions, and
    the least confident of them are masked again, as many as the plan keeps (MaskGIT's clamp: at least
    one is decoded). Confidence is log p plus the plan's annealed Gumbel noise from the uniforms
    `noise_u`; everything decoded earlier (or fixed) is kept."""
    B, N = ids.shape
    sampled = ids.masked_scatter(masked, picked)
    confidence = torch.full((B, N), float("inf"), device=ids.device)
    score = logp + plan.noise[step][:, None].expand(B, N)[masked] * gumbel(noise_u)
    # Kept tokens alone stay at +inf: a NaN or infinite score (NaN noise sorts last) must never rank a
    # masked position above a fixed one, which would then be masked and resampled.
    confidence[masked] = score.nan_to_num(nan=float("-inf"), posinf=torch.finfo(confidence.dtype).max)
    order = confidence.argsort(dim=1, stable=True)  # least confident first
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=ids.device).expand(B, N))
    remain = torch.minimum(plan.keep[step], masked.sum(dim=1) - 1).clamp(min=0)
    return torch.where(ranks < remain[:, None], torch.full_like(ids, mask_id), sampled)


def check_choice_temperature(value: float) -> float:
    """`value` if it is a finite number >= 0; else ValueError (the noise scale of the re-masking
    confidence: NaN or inf make it meaningless, and a negative one is not a Gumbel-max ordering)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value < math.inf:
        raise ValueError(f"choice_temperature must be a finite number >= 0, got {value!r}")
    return float(value)


def renamed_temperature(choice_temperature: float, temperature: float | None, stacklevel: int = 3) -> float:
    """`temperature`, the old name of `choice_temperature`, when given (with a DeprecationWarning
    pointing at the caller's caller)."""
    if temperature is None:
        return choice_temperature
    warnings.warn(RENAMED_TEMPERATURE, DeprecationWarning, stacklevel=stacklevel)
    return temperature


def initial_ids(B: int, N: int, mask_id: int, device: torch.device, init_ids: torch.Tensor | None,
                fixed: torch.Tensor | None) -> torch.Tensor:
    """The starting grid: all [MASK], or `init_ids` kept where `fixed` (default: where not [MASK])."""
    if init_ids is None:
        if fixed is not None:
            raise ValueError("fixed needs init_ids")
        return torch.full((B, N), mask_id, dtype=torch.long, device=device)
    init_ids = init_ids.reshape(B, N).to(device=device, dtype=torch.long)
    fixed = (init_ids != mask_id) if fixed is None else fixed.reshape(B, N).to(device=device, dtype=torch.bool)
    if bool((init_ids[fixed] == mask_id).any()):
        raise ValueError("fixed positions of init_ids must not be [MASK]")
    return torch.where(fixed, init_ids, torch.full_like(init_ids, mask_id))


def cfg_context(context: Context, uncond_context: Context | None) -> ContextStack | None:
    """[cond ; uncond] along the batch for the batched guided forward, without padding: each part
    attends to its own keys, and a one-row uncond_context (the null text) serves every row."""
    if uncond_context is None:
        return None
    B = context.batch_size
    if uncond_context.batch_size not in (1, B):
        raise ValueError(f"uncond_context has {uncond_context.batch_size} rows, context has {B}")
    return ContextStack([context, uncond_context], [B, B])


def guided_logits(model: torch.nn.Module, ids: torch.Tensor, context: Context, joint: ContextStack | None,
                  t: torch.Tensor, select: torch.Tensor | None = None) -> torch.Tensor:
    """(1 + t)·ℓ_cond − t·ℓ_uncond, t (B,), in the model's dtype (float32 for fp16): one forward of 2B rows over `joint`
    = cfg_context(...); with joint None, one forward of B rows on `context` alone (no guidance).
    With `select` ((B, N) bool) only the selected positions' logits (M, K), else (B, N, K)."""
    if joint is None:
        return model(ids, context, select=select)
    both = model(torch.cat([ids, ids]), joint, select=None if select is None else torch.cat([select, select]))
    if both.dtype == torch.float16:  # fp16 tops out at 65504: a large guidance would make every logit inf
        both = both.float()
    cond, uncond = both.chunk(2)
    weight = (1 + t).to(both.dtype)
    weight = weight[:, None, None] if select is None else weight[:, None].expand_as(select)[select][:, None]
    return uncond.lerp_(cond, weight)  # uncond + (1 + t)(cond − uncond), written over uncond


def sample_tokens(logits: torch.Tensor, u: torch.Tensor, top_k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One id per row of `logits` (M, K), which is overwritten (it ends as unnormalised
    probabilities), by inverting the CDF at the uniforms `u` (M,). Returns (ids (M,) long,
    log p(ids) (M,) float32)."""
    M, K = logits.shape
    if top_k is not None and top_k < K:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (M, 1)
        logits.masked_fill_(logits < kth, float("-inf"))
    # Softmax in place (logsumexp would allocate an (M, K) temporary): p ∝ exp(ℓ − max ℓ).
    probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()
    total = probs.sum(dim=-1, dtype=torch.float32)
    ids = inverse_cdf(probs, u)
    return ids, probs.gather(1, ids[:, None]).squeeze(1).float().log() - total.log()


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The id whose CDF interval holds u·total, per row of probs (M, K) >= 0: first among ~√K blocks
    by their mass, then within the one block, so only (M, √K) cumulative sums are formed. An id of
    zero probability is never returned."""
    M, K = probs.shape
    size = 1 << (max(K - 1, 1).bit_length() + 1) // 2  # block size, a power of two near √K
    if K % size:
        probs = torch.nn.functional.pad(probs, (0, size - K % size))  # zero mass, never picked
    blocks = probs.view(M, -1, size)  # (M, G, size)
    cdf = blocks.sum(-1, dtype=torch.float32).cumsum(-1)  # (M, G)
    total = cdf[:, -1:]
    target = torch.minimum(u.float()[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    g = torch.searchsorted(cdf, target, right=True).clamp(max=cdf.shape[1] - 1)  # (M, 1)
    before = torch.where(g > 0, cdf.gather(1, (g - 1).clamp(min=0)), torch.zeros_like(target))
    inner = blocks[torch.arange(M, device=probs.device), g[:, 0]].float().cumsum(-1)  # (M, size)
    rest = torch.minimum(target - before, torch.nextafter(inner[:, -1:], torch.zeros_like(target)))
    j = torch.searchsorted(inner, rest, right=True).clamp(max=size - 1)
    return (g * size + j)[:, 0]


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise from uniforms."""
    u = u.clamp(min=1e-20, max=1 - 1e-7)
    return -torch.log(-torch.log(u))


def row_uniforms(generators: list[torch.Generator] | torch.Generator, shape: tuple[int, ...],
                 device: torch.device) -> torch.Tensor:
    """U[0, 1) of shape (B, ...), row b drawn from generators[b] in one call (or all rows from one
    generator)."""
    if isinstance(generators, torch.Generator):
        return torch.rand(shape, generator=generators, device=generators.device).to(device)
    rows = [torch.rand(shape[1:], generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device)


def decode_uniforms(generators: list[torch.Generator] | torch.Generator, batch: int, steps: int, tokens: int,
                    device: torch.device) -> torch.Tensor:
    """A decode's uniforms, (B, steps, 2, N): [token sample, confidence noise] per step. At most N steps
    ever run (each decodes one token or more), so no more are drawn: a huge `steps` costs no memory.
    The first steps' draws are the same either way."""
    return row_uniforms(generators, (batch, min(steps, tokens), 2, tokens), device)


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


def image_seed(seed: int, index: int, prompt: int = 0) -> int:
    """The seed of image `index` of prompt `prompt` of a request with `seed`: derived from (seed,
    index, prompt) (numpy's SeedSequence spawn key), so no two requests share an image stream, and an
    image is the same whatever the number of images or of prompts asked for. The first prompt's key
    is (index,) alone, which keeps the seeds of one-prompt requests as they were."""
    key = (index,) if prompt == 0 else (index, prompt)
    state = np.random.SeedSequence(entropy=seed, spawn_key=key).generate_state(1, np.uint64)[0]
    return int(state) & (2**63 - 1)


def image_generators(seed: int, n: int, device: torch.device | str = "cpu", prompts: int = 1,
                     first: int = 0) -> list[torch.Generator]:
    """One generator per image of a request, prompt-major: image i of prompt p seeded
    `image_seed(seed, i, p)`, for i from `first` (a batch of a longer run) to first + n - 1."""
    return [torch.Generator(device=device).manual_seed(image_seed(seed, i, p))
            for p in range(prompts) for i in range(first, first + n)]
