"""The model replicas' side of image plumbing: decoded images to encoded bytes at the size and format
a request asked for, and stream previews of partially decoded token grids."""

from __future__ import annotations

import io

import torch
from PIL import Image

from muse.data.images import tensor_to_pil
from serve.specs import Output


def image_bytes(image: torch.Tensor, out: Output = Output()) -> bytes:
    """(3, H, W) float in [-1, 1] -> encoded bytes at `out.side` (bicubic resampling when the stage's
    resolution differs: OpenAI clients get the size they asked for)."""
    pil = tensor_to_pil(image)
    if out.side is not None and pil.size != (out.side, out.side):
        pil = pil.resize((out.side, out.side), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if out.format == "png":
        pil.save(buf, format="PNG")
    else:
        pil.save(buf, format=out.format.upper(), quality=100 if out.quality is None else out.quality)
    return buf.getvalue()


def fill_masked(ids: torch.Tensor, codebook_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A partially decoded grid (B, h, w) -> (ids with [MASK] replaced by code 0, mask (B, h, w)).
    Every id past the codebook is [MASK]: Muse's mask id is the codebook size, aMUSEd's is 8255 with
    8192 codes (its embedding table has spare rows)."""
    masked = ids >= codebook_size
    return torch.where(masked, torch.zeros_like(ids), ids), masked


def grey_out(images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Paint the pixel blocks of still-masked tokens grey (0 in [-1, 1]): images (B, 3, H, W),
    masked (B, h, w) with H = h * f."""
    f = images.shape[-1] // masked.shape[-1]
    pixels = masked.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)[:, None]  # (B, 1, H, W)
    return images.masked_fill(pixels, 0.0)
