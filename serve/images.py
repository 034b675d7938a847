"""Image plumbing of the HTTP API, free of Ray: PNG encoding, uploaded images and masks for
/v1/images/edits, and stream previews of partially decoded token grids.

Edits follow OpenAI's convention: the pixels to regenerate are the transparent ones (alpha < 128) of
the mask, or of the image itself when no mask is sent (the image's own transparency is composited
on white before tokenizing; those tokens are regenerated anyway). An image placed on a larger transparent
canvas therefore asks for outpainting, and a fully opaque image with no transparent pixel anywhere
asks for mask-free editing toward the new prompt.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from muse.data.images import tensor_to_pil, to_rgb, to_uint8_array
from muse.editing import token_mask_from_pixels

TRANSPARENT_BELOW = 128  # alpha under this counts as transparent = regenerate


class UploadError(ValueError):
    """An uploaded image or mask the API refuses; `param` names the form field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Output:
    """How a request wants its images: the side in pixels and the file format (png, jpeg, webp;
    `quality` 0-100 for the lossy ones)."""

    side: int | None = None  # None: the stage's own resolution
    format: str = "png"
    quality: int | None = None


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



def read_upload(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> an RGBA PIL image; UploadError for anything unreadable or too large."""
    if not data:
        raise UploadError(param, f"'{param}' is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > max_pixels:
                raise UploadError(param, f"'{param}' is {img.width}x{img.height}, over {max_pixels} pixels")
            img.load()
            return img.convert("RGBA")
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as e:
        raise UploadError(param, f"'{param}' is not a readable image ({type(e).__name__})") from None


@dataclass
class EditInput:
    """An edit request's image at each stage's resolution and the low-res tokens to regenerate."""

    images: dict[str, np.ndarray]  # stage -> (side, side, 3) uint8
    regenerate: torch.Tensor | None  # (h, w) bool on the low-res token grid; None = mask-free editing


def prepare_edit(image_bytes: bytes, mask_bytes: bytes | None, sides: dict[str, int], lo_tokens: int,
                 max_pixels: int) -> EditInput:
    """sides: stage -> image side, e.g. {"lo": 256, "hi": 512}; lo_tokens: low-res tokens per side.

    The image is prepared exactly as `MusePipeline` prepares one (transparency composited on white,
    shorter side resized, centre square cropped) and the mask is cropped to the same square."""
    image = read_upload(image_bytes, "image", max_pixels)
    alpha_source = image
    if mask_bytes is not None:
        alpha_source = read_upload(mask_bytes, "mask", max_pixels)
        if alpha_source.size != image.size:
            raise UploadError("mask", f"mask is {alpha_source.width}x{alpha_source.height} but image is "
                                      f"{image.width}x{image.height}; they must match")
    transparent = np.asarray(alpha_source.getchannel("A")) < TRANSPARENT_BELOW  # (H, W)
    if mask_bytes is not None and not transparent.any():
        raise UploadError("mask", "the mask has no transparent pixels, so nothing would be regenerated; make the "
                                  "area to repaint transparent, or send no mask (with an opaque image) for a "
                                  "mask-free edit of the whole image")
    rgb = to_rgb(image)
    images = {stage: to_uint8_array(rgb, side) for stage, side in sides.items()}
    if not transparent.any():
        return EditInput(images, None)
    pixels = torch.from_numpy(_centre_square(transparent).copy())[None]  # (1, S, S)
    return EditInput(images, token_mask_from_pixels(pixels, lo_tokens)[0])


def _centre_square(a: np.ndarray) -> np.ndarray:
    """The centre square of (H, W): the crop `to_uint8_array` takes from the image."""
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return a[top:top + side, left:left + side]


def fill_masked(ids: torch.Tensor, mask_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A partially decoded grid (B, h, w) -> (ids with [MASK] replaced by code 0, mask (B, h, w))."""
    masked = ids == mask_id
    return torch.where(masked, torch.zeros_like(ids), ids), masked


def grey_out(images: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Paint the pixel blocks of still-masked tokens grey (0 in [-1, 1]): images (B, 3, H, W),
    masked (B, h, w) with H = h * f."""
    f = images.shape[-1] // masked.shape[-1]
    pixels = masked.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2)[:, None]  # (B, 1, H, W)
    return images.masked_fill(pixels, 0.0)
