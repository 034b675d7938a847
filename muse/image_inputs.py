"""Images and masks as callers give them to the editing methods of `MusePipeline`.

An image is a PIL image, encoded bytes, a path (local or s3://) or a (3, H, W) float tensor in
[-1, 1]. A mask is read the same way whatever form it comes in:

- an image (PIL, bytes or path) with transparency: the transparent pixels (alpha < 128) are
  regenerated, the HTTP API's (OpenAI's) convention;
- any other image: white regenerates, black keeps (grey >= 128 regenerates, so antialiased or JPEG
  edges do not spread the mask);
- an array or tensor (H, W): non-zero (True) regenerates.

The model draws squares. Inpainting and mask-free editing see the centre square of a non-square
image (as `pil_to_tensor` crops it); outpainting letterboxes the whole image into the square and
draws the bands as well (`letterbox`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from muse import storage
from muse.data.images import (TRANSPARENT_BELOW, ImageRejected, decode_image, has_alpha, tensor_to_pil, to_rgb,
                              uint8_to_tensor)

GREY_REGENERATE_FROM = 128


def load_image(image: Any, name: str, keep_mode: bool = False) -> Image.Image:
    """PIL image, encoded bytes, a local/s3 path or a (3, H, W) tensor in [-1, 1] -> RGB PIL (with
    `keep_mode`, images keep their own mode, alpha included)."""
    if isinstance(image, Image.Image):  # upright as a file's image is (`decode_image`), whatever form it came in
        upright = ImageOps.exif_transpose(image)
        return upright if keep_mode else to_rgb(upright)
    if isinstance(image, torch.Tensor):
        return _tensor_image(image, name)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not path or not storage.exists(path):
            raise ValueError(f"{name}: no file at {path!r}")
        try:
            image = storage.read_bytes(path)
        except OSError as e:
            raise ValueError(f"{name}: cannot read {path!r}: {e}") from None
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            return decode_image(bytes(image), keep_mode=keep_mode)
        except ImageRejected as e:
            raise ValueError(f"{name}: not a readable image ({e})") from None
    raise ValueError(f"{name} must be a PIL image, bytes, a path or a (3, H, W) tensor, got {type(image).__name__}")


def _tensor_image(t: torch.Tensor, name: str) -> Image.Image:
    if not t.is_floating_point():
        raise ValueError(f"{name}: an image tensor must be float in [-1, 1], got {t.dtype} (for 0-255 pixels, "
                         "pass a PIL image or divide by 127.5 and subtract 1)")
    finite = t.detach().float()
    if not bool(torch.isfinite(finite).all()) or float(finite.abs().max()) > 1.5:
        raise ValueError(f"{name}: an image tensor must hold values in [-1, 1], got [{float(finite.min()):.3g}, "
                         f"{float(finite.max()):.3g}]")
    if float(finite.min()) >= 0 and float(finite.max()) > 0:  # every pixel at least mid-grey: likely [0, 1]
        warnings.warn(f"{name}: every value of the image tensor is in [0, 1]; it is read as [-1, 1] (-1 black, 1 "
                      "white), so a [0, 1] image comes out pale: pass 2 * t - 1", stacklevel=4)
    try:
        return tensor_to_pil(t)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


def load_mask(mask: Any, size: tuple[int, int]) -> torch.Tensor:
    """A mask the size (W, H) of the image -> (H, W) bool, True = regenerate (rules above)."""
    if isinstance(mask, (str, os.PathLike, bytes, bytearray, memoryview, Image.Image)):
        mask = load_image(mask, "mask", keep_mode=True)  # upright, as the image is
    if isinstance(mask, Image.Image):
        mask = torch.from_numpy(mask_from_image(mask))
    elif isinstance(mask, np.ndarray):
        mask = torch.from_numpy(np.array(mask))  # a writable copy
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"mask must be a PIL image, an array or a tensor, got {type(mask).__name__}")
    if mask.dim() == 3 and mask.shape[0] == 1:
        mask = mask[0]
    width, height = size
    if tuple(mask.shape) != (height, width):
        got = f"{mask.shape[1]}x{mask.shape[0]}" if mask.dim() == 2 else f"an array of shape {tuple(mask.shape)}"
        raise ValueError(f"mask must have the image's size, {width}x{height} (width x height), got {got}")
    if mask.dtype != torch.bool and bool((mask < 0).any()):  # an image's [-1, 1] range: all of it would be masked
        raise ValueError(f"mask values must be >= 0 (non-zero regenerates), got down to {float(mask.min()):g}: for a "
                         "mask in an image's [-1, 1] range pass `mask > 0`")
    masked = mask.cpu() != 0
    if not masked.any():
        raise ValueError("mask is empty: nothing to regenerate (white or transparent pixels are regenerated)")
    return masked


def mask_from_image(img: Image.Image) -> np.ndarray:
    """(H, W) bool, True = regenerate: transparent pixels when the image has transparency, else white."""
    if has_alpha(img):
        alpha = np.asarray(img.convert("RGBA").getchannel("A"))
        transparent = alpha < TRANSPARENT_BELOW
        if transparent.any():  # a region marked by transparency; faint alpha alone (254) marks none
            return transparent
    return np.asarray(to_rgb(img).convert("L")) >= GREY_REGENERATE_FROM


def letterbox(img: Image.Image, size: int, placed_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole image resized to fit a size x size square and centred on it: ((3, size, size) float
    in [-1, 1], grey where empty; (size, size) bool, True where the image is). `placed_at`: placed as on
    a square of that side (the base stage's), scaled up, so two resolutions' bands agree pixel for pixel
    (`size` a multiple of it)."""
    width, height = img.size
    base = size if placed_at is None else placed_at
    if size % base:
        raise ValueError(f"a {size} px square cannot be placed as one of {base} px: it must be a multiple")
    unit, scale = size // base, base / max(width, height)
    w, h = unit * max(1, round(width * scale)), unit * max(1, round(height * scale))
    canvas = np.full((size, size, 3), 127.5, dtype=np.float32)
    left, top = unit * ((base - w // unit) // 2), unit * ((base - h // unit) // 2)
    resized = to_rgb(img).resize((w, h), Image.BICUBIC, reducing_gap=3.0 if scale < 0.5 else None)
    canvas[top:top + h, left:left + w] = np.asarray(resized, dtype=np.float32)
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    return uint8_to_tensor(canvas.round().astype(np.uint8)), inside
