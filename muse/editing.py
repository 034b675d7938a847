"""Image editing with a masked token model (Muse arXiv 2301.00704 §3.3), on top of `sampling.generate`.

Inpainting: a pixel mask becomes a token mask (a token is regenerated if any pixel of its patch is
masked); the other tokens are fixed and visible while the masked ones are decoded under the prompt.
Outpainting is inpainting on a canvas: the image is shrunk into the middle of the canvas, or shifted
toward one side, and everything outside it is regenerated.
Mask-free editing starts from the image's own tokens and, for ~100 iterations, resamples a random ~8%
of them under the new prompt (guidance ≈ 4, top-k ≈ 3), so the image drifts toward the prompt while
keeping its layout.

`keep_pixels` puts the input's own pixels back outside the mask once the tokens are decoded.

Through the super-res stage, the same token mask is upsampled to the high-res grid: high-res tokens of
known regions stay fixed and the rest are decoded conditioned on the edited low-res tokens.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from muse import sampling
from muse.config import SAMPLING
from muse.context import Context
from muse.data.images import resized_mask

DIRECTIONS = ("all", "left", "right", "up", "down")


def token_mask_from_pixels(mask: torch.Tensor, tokens_per_side: int) -> torch.Tensor:
    """Pixel mask (B, H, W) or (B, 1, H, W), True/non-zero = regenerate -> token mask (B, h, w) bool.
    A token is regenerated when any pixel of its patch is masked (H, W need not divide evenly)."""
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask must be (B, H, W) or (B, 1, H, W), got shape {tuple(mask.shape)}")
    pooled = F.adaptive_max_pool2d((mask != 0).float(), tokens_per_side)  # (B, 1, h, w)
    return pooled[:, 0] > 0


def upsample_token_mask(mask: torch.Tensor, tokens_per_side: int) -> torch.Tensor:
    """Token mask (B, h, w) -> (B, H, W) on a finer grid (each coarse token covers a block)."""
    return F.interpolate(mask[:, None].float(), size=(tokens_per_side, tokens_per_side), mode="nearest")[:, 0] > 0


FEATHER_PER_SIDE = 1 / 128  # the blend band around a kept mask: 2 px at 256, 4 at 512


def keep_pixels(images: torch.Tensor, original: torch.Tensor, regenerated: torch.Tensor) -> torch.Tensor:
    """Decoded images (n, 3, R, R) with the `original`'s pixels (1 or n, 3, R, R) back wherever the
    pixel mask `regenerated` ((S, S) bool, resized to R by `muse.data.images.resized_mask`) asked for
    nothing new: there the decoding of the kept tokens is only as close to the input as a round trip
    through the tokenizer. A band of FEATHER_PER_SIDE of the side outside the mask blends the two, so
    no seam shows."""
    side = images.shape[-1]
    if tuple(regenerated.shape) != (side, side):
        regenerated = torch.from_numpy(resized_mask(regenerated.cpu().numpy(), side))
    mask = regenerated[None, None].to(images.device, torch.float32)
    band = max(1, round(side * FEATHER_PER_SIDE))
    soft = F.avg_pool2d(mask, 2 * band + 1, stride=1, padding=band, count_include_pad=False)
    alpha = torch.maximum(mask, soft).to(images.dtype)  # the masked pixels stay wholly new
    return alpha * images + (1 - alpha) * original.to(images.device, images.dtype)


def outpaint_canvas(images: torch.Tensor, direction: str = "all", scale: float = 0.5,
                    known: torch.Tensor | None = None, placed_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Place images (B, 3, H, W) on a canvas of the same size and mark what to generate.

    direction "all": the image is shrunk to `scale` of the side and centred; the border is new.
    "left" / "right" / "up" / "down": the image keeps its size and is shifted away from that side so
    that it covers `scale` of the canvas; the uncovered strip on that side is new.
    known (B, H, W) bool: where the images hold a picture (default everywhere; a letterboxed image's
    bands are not), moved with it, so the rest is new as well.
    placed_at: place the image as on a canvas of this side (the base stage's), scaled up to this one's,
        so that the high-res canvas is the low-res one pixel for pixel: rounded apart, a high-res token
        kept under a kept low-res token could hold a strip of the grey canvas. H must be a multiple.
    Returns (canvas (B, 3, H, W) with 0 = grey where new, pixel mask (B, H, W) bool, True = new).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if not 0 < scale < 1:
        raise ValueError(f"scale must be in (0, 1), got {scale}")
    B, C, H, W = images.shape
    if placed_at is not None and (H != W or H % placed_at):
        raise ValueError(f"a {H}x{W} canvas cannot be placed as one of side {placed_at}: it must be square and a "
                         "multiple of it")
    unit, (H0, W0) = (1, (H, W)) if placed_at is None else (H // placed_at, (placed_at, placed_at))
    source = torch.ones(B, H, W, dtype=torch.bool, device=images.device) if known is None else known.bool()
    canvas = images.new_zeros(B, C, H, W)
    placed = torch.zeros(B, H, W, dtype=torch.bool, device=images.device)
    if direction == "all":
        h, w = unit * max(1, round(H0 * scale)), unit * max(1, round(W0 * scale))
        top, left = unit * ((H0 - h // unit) // 2), unit * ((W0 - w // unit) // 2)
        canvas[:, :, top:top + h, left:left + w] = F.interpolate(  # float32: no low-precision kernel on CPU
            images.float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False
        ).to(images.dtype)
        placed[:, top:top + h, left:left + w] = F.interpolate(source[:, None].float(), size=(h, w))[:, 0] > 0.5
    elif direction in ("left", "right"):
        keep = unit * max(1, round(W0 * scale))
        if direction == "left":  # new content on the left: the image's left part moves right
            canvas[..., W - keep:], placed[..., W - keep:] = images[..., :keep], source[..., :keep]
        else:
            canvas[..., :keep], placed[..., :keep] = images[..., W - keep:], source[..., W - keep:]
    else:
        keep = unit * max(1, round(H0 * scale))
        if direction == "up":
            canvas[..., H - keep:, :], placed[:, H - keep:, :] = images[..., :keep, :], source[:, :keep, :]
        else:
            canvas[..., :keep, :], placed[:, :keep, :] = images[..., H - keep:, :], source[:, H - keep:, :]
    return canvas, ~placed


def inpaint_tokens(
    model: torch.nn.Module,
    context: Context,
    uncond_context: Context | None,
    ids: torch.Tensor,
    regenerate: torch.Tensor,
    *,
    steps: int,
    guidance_scale: float | torch.Tensor = 0.0,
    generator: sampling.Generators,
    choice_temperature: float = SAMPLING.choice_temperature,
    top_k: int | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """ids (B, h, w) or (B, N) of the source image; regenerate (same shape) bool, True = decode anew.
    Known tokens are fixed (and seen by the model at every step). Returns ids in the shape of `ids`.
    `top_k`: each token drawn among the k likeliest codes (None: the whole codebook)."""
    if regenerate.shape != ids.shape:
        raise ValueError(f"regenerate mask {tuple(regenerate.shape)} must match ids {tuple(ids.shape)}")
    B = ids.shape[0]
    out = sampling.generate(
        model, context, uncond_context, steps=steps, guidance_scale=guidance_scale, generator=generator,
        choice_temperature=choice_temperature, init_ids=ids.reshape(B, -1), fixed=~regenerate.reshape(B, -1).bool(),
        top_k=top_k, callback=callback,
    )
    return out.view(ids.shape)


def edit_tokens(
    model: torch.nn.Module,
    context: Context,
    uncond_context: Context | None,
    ids: torch.Tensor,
    *,
    iterations: int = SAMPLING.edit_iterations,
    fraction: float = SAMPLING.edit_fraction,
    guidance_scale: float | torch.Tensor = SAMPLING.guidance_scale,
    top_k: int | None = 3,
    generator: sampling.Generators,
    editable: torch.Tensor | None = None,
    callback: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Mask-free editing: each iteration masks a random `fraction` of the tokens of each row (among
    `editable` positions, default all), predicts them under the prompt with constant guidance, and
    writes back samples from the top-k. ids (B, h, w) or (B, N) -> edited ids of the same shape.
    callback(iteration, ids (B, N)) after each iteration. Uniforms are drawn per iteration (B, 2, N), so
    memory does not grow with `iterations`."""
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    shape, B = ids.shape, ids.shape[0]
    cur = ids.reshape(B, -1).long().to(context.mask.device)
    N, mask_id = cur.shape[1], model.mask_token_id
    gens = sampling.row_generators(generator, B)
    scale = sampling.guidance_scales(guidance_scale, B, cur.device)
    guided = bool((scale != 0).any())
    if guided and uncond_context is None:
        raise ValueError("guidance_scale != 0 needs an uncond_context")
    joint = sampling.cfg_context(context, uncond_context) if guided else None
    allowed = torch.ones_like(cur, dtype=torch.bool) if editable is None else editable.reshape(B, N).bool()
    allowed = allowed.to(cur.device)
    n_allowed = allowed.sum(dim=1)
    # At least one position per row, and none in a row with nothing editable.
    n_pick = torch.minimum((n_allowed.float() * fraction).round().clamp(min=1).long(), n_allowed)  # (B,)
    if not bool(n_allowed.any()):
        return ids.clone()

    with torch.no_grad():
        for it in range(iterations):
            # Drawn per iteration, so many iterations cost no memory; from per-row generators these are
            # the values one draw of (B, iterations, 2, N) would give. [which positions, token sample]
            draw = sampling.row_uniforms(gens, (B, 2, N), cur.device)
            # A random subset of n_pick allowed positions per row: the lowest random scores.
            scores = draw[:, 0].masked_fill(~allowed, 2.0)
            ranks = scores.argsort(dim=1).argsort(dim=1)
            pick = (ranks < n_pick[:, None]) & allowed  # (B, N)
            inputs = torch.where(pick, torch.full_like(cur, mask_id), cur)
            logits = sampling.guided_logits(model, inputs, context, joint, scale, pick)
            sampled, _ = sampling.sample_tokens(logits, draw[:, 1][pick], top_k=top_k)
            cur = cur.masked_scatter(pick, sampled)
            if callback is not None:
                callback(it, cur)
    return cur.view(shape)
