"""The decoding loop as it was before the lean step, kept as the baseline that `benchmarks/sampling.py`
measures the shipped loop against (same model, same run). Not used by the library.

Per step it runs the model over every position, copies the (2B, N, K) logits to float32, forms
(1 + t)·ℓc − t·ℓu out of place, takes a full `log_softmax`, `exp` and `cumsum` over the codebook,
draws 2·B uniforms (one `torch.rand` per row, twice), and its unconditional branch is the padded,
fully masked text context re-encoded per request.
"""

from __future__ import annotations

import torch

from muse.context import Context
from muse.masking import num_masked_after_step


def generate(model, context: Context, uncond_context: Context | None, *, steps: int, guidance_scale: float,
             generators: list[torch.Generator], temperature: float = 4.5) -> torch.Tensor:
    B, N, mask_id = context.batch_size, model.num_tokens, model.mask_token_id
    device = context.mask.device
    scale = torch.full((B,), float(guidance_scale), device=device)
    joint = Context.cat([context, uncond_context]) if guidance_scale != 0 else None
    ids = torch.full((B, N), mask_id, dtype=torch.long, device=device)
    n_remask = torch.tensor([[num_masked_after_step(s, steps, N)] * B for s in range(steps)], device=device)
    with torch.no_grad():
        for step in range(steps):
            masked = ids == mask_id
            ramp = step / (steps - 1) if steps > 1 else 1.0
            if joint is None or ramp == 0:
                logits = model(ids, context).float()
            else:
                cond, uncond = model(torch.cat([ids, ids]), joint).float().chunk(2)
                t = (scale * ramp)[:, None, None]
                logits = (1 + t) * cond - t * uncond
            logp = logits.log_softmax(dim=-1)
            cdf = logp.exp().cumsum(dim=-1)
            total = cdf[..., -1:]
            u = _uniform((B, N), generators, device)[..., None]
            target = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))
            sampled = torch.searchsorted(cdf, target, right=True).clamp(max=logits.shape[-1] - 1).squeeze(-1)
            picked_logp = logp.gather(-1, sampled[..., None]).squeeze(-1)
            sampled = torch.where(masked, sampled, ids)
            noise = -torch.log(-torch.log(_uniform((B, N), generators, device).clamp(1e-20, 1 - 1e-7)))
            confidence = picked_logp + temperature * (1.0 - (step + 1) / steps) * noise
            confidence = torch.where(masked, confidence, torch.full_like(confidence, float("inf")))
            order = confidence.argsort(dim=1, stable=True)
            ranks = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=device).expand(B, N))
            ids = torch.where(ranks < n_remask[step][:, None], torch.full_like(ids, mask_id), sampled)
    return ids


def _uniform(shape, generators, device) -> torch.Tensor:
    return torch.stack([torch.rand(shape[1:], generator=g, device=g.device) for g in generators]).to(device)


def masked_text_context(model, emb: torch.Tensor, mask: torch.Tensor, *extra) -> Context:
    """The old unconditional branch: the prompt's own padded text with every position masked out."""
    return model.encode_context(emb, torch.zeros_like(mask), *extra)
