"""Robust image decoding and the image <-> tensor conventions every stage shares.

`decode_image(bytes)` is what a corpus of billions of web images needs: it never lets a bad file
crash the caller. It raises `ImageRejected(reason)` with one of `REJECT_REASONS` instead, and it

- reads the header first, so an over-limit image (a decompression bomb) is refused before a pixel
  is decoded, and a too-small image before decoding too;
- applies the EXIF orientation;
- turns every Pillow mode into 8-bit RGB: palette and grey with or without alpha, RGBA and LA
  composited on white, CMYK, 16/32-bit integer grey (scaled, not clipped), float grey;
- decodes a JPEG at a reduced scale (`draft`) when only a small output is wanted, which is most of
  the decode cost on large photos.

Images as tensors are float (B,3,H,W) / (3,H,W) in [-1, 1]; as arrays, uint8 (H,W,3).
"""

from __future__ import annotations

import io
import re
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

# Why a sample was refused; counted by reason in rejects.json.
CORRUPT = "corrupt_image"
TOO_SMALL = "too_small"
TOO_MANY_PIXELS = "too_many_pixels"
REJECT_REASONS = (CORRUPT, TOO_SMALL, TOO_MANY_PIXELS)

DEFAULT_MAX_PIXELS = 64_000_000  # 8000x8000; bigger is almost always a bomb or a scan
WHITE = (255, 255, 255)
PILLOW_MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS  # Image.open refuses larger images (DecompressionBombError)
EXIF_ORIENTATION = 0x0112


class ImageRejected(ValueError):
    """The bytes are not an image this pipeline accepts; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
                 draft_size: int | None = None, keep_mode: bool = False) -> Image.Image:
    """Encoded bytes -> an upright 8-bit RGB PIL image, or ImageRejected.

    `min_side`/`max_pixels` are checked on the stored size before decoding. `draft_size` lets a JPEG
    decode at 1/2, 1/4 or 1/8 scale as long as both sides stay >= draft_size (the caller then resizes
    to draft_size), so the result may be smaller than the stored image. `keep_mode` returns the
    decoded mode as stored (alpha kept) instead of RGB: what a mask is read from.
    """
    return decode_image_and_size(data, max_pixels=max_pixels, min_side=min_side, draft_size=draft_size,
                                 keep_mode=keep_mode)[0]


def decode_image_and_size(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
                          draft_size: int | None = None,
                          keep_mode: bool = False) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, plus the source (width, height) as displayed (after EXIF orientation)."""
    if not data:
        raise ImageRejected(CORRUPT, "empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:  # over Pillow's own limit, so over max_pixels too
        found = re.search(r"\((\d+) pixels\)", str(e))
        raise ImageRejected(TOO_MANY_PIXELS, f"{found.group(1) if found else 'more'} pixels is over {max_pixels} "
                                             "pixels") from None
    except UnidentifiedImageError:  # its message is the repr of an in-memory buffer
        raise ImageRejected(CORRUPT, "not an image format Pillow reads") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageRejected(CORRUPT, f"{type(e).__name__}: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise ImageRejected(TOO_MANY_PIXELS, f"{width}x{height} is over {max_pixels} pixels")
    if min(width, height) < min_side:
        raise ImageRejected(TOO_SMALL, f"{width}x{height} has a side under {min_side}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # EXIF, palette-transparency and bomb warnings
            if draft_size is not None and img.format == "JPEG":
                img.draft("RGB", (draft_size, draft_size))
            if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width  # displayed rotated by a quarter turn
            img.load()
            img = ImageOps.exif_transpose(img)
            return (img if keep_mode else to_rgb(img)), (width, height)
    except (ImageRejected, MemoryError):  # out of memory is the worker's state, not the file's fault
        raise
    except Image.DecompressionBombError as e:
        raise ImageRejected(TOO_MANY_PIXELS, str(e)) from None
    except Exception as e:  # noqa: BLE001 - a codec can raise anything on hostile bytes
        raise ImageRejected(CORRUPT, f"{type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I", "I;16", "I;16L", "I;16B", "I;16N", "F"):
        return Image.fromarray(_grey_to_uint8(np.asarray(img), mode)).convert("RGB")
    if has_alpha(img):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def has_alpha(img: Image.Image) -> bool:
    """Whether a Pillow image carries transparency: an alpha band, or a transparent colour."""
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        img.mode in ("P", "L", "RGB") and "transparency" in img.info)


def _grey_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Grey of any depth -> uint8. 16-bit modes scale by 255/65535; 32-bit integer ("I", which is
    how some codecs hand over 16-bit files) by the depth its largest value implies; float ("F") as
    [0, 1] when it fits there, else as [0, 255]."""
    if a.dtype.kind == "f":
        a = np.nan_to_num(a.astype(np.float64))
        hi = float(a.max()) if a.size else 0.0
        return np.clip(a * (255.0 if hi <= 1.0 else 1.0), 0, 255).round().astype(np.uint8)
    a = a.astype(np.int64)
    hi = int(a.max()) if a.size else 0
    if mode.startswith("I;16") or 255 < hi <= 65535:
        a = (a * 255 + 32767) // 65535
    elif hi > 65535:
        a = a * 255 // hi
    return np.clip(a, 0, 255).astype(np.uint8)


TRANSPARENT_BELOW = 128  # in a mask with transparency, alpha under this = regenerate (OpenAI's edits)


def centre_square(a):
    """The centre square of an (H, W, ...) array or tensor: the crop `resize_center_crop` takes from an
    image, applied to its mask."""
    h, w = a.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    return a[top:top + side, left:left + side]


def resized_mask(mask: np.ndarray, side: int) -> np.ndarray:
    """A square pixel mask (S, S) bool at side x side: a pixel is set when any under it is (shrunk), or
    as the nearest one is (enlarged). The library and the HTTP API resize an edit's mask with it alike."""
    if mask.shape == (side, side):
        return mask.astype(bool)
    resample = Image.Resampling.BOX if min(mask.shape) >= side else Image.Resampling.NEAREST
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((side, side), resample)) > 0


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size`, then crop the centre size x size square."""
    width, height = img.size
    if (width, height) != (size, size):
        scale = size / min(width, height)
        new = (max(size, round(width * scale)), max(size, round(height * scale)))
        left, top = (new[0] - size) // 2, (new[1] - size) // 2
        # Only the square's source box is resampled: resizing all of a 60000x32 strip first would
        # take gigabytes for a few kilobytes of PNG.
        box = (left / scale, top / scale, (left + size) / scale, (top + size) / scale)
        img = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0 if scale < 0.5 else None)
    return img


def to_uint8_array(img: Image.Image, size: int) -> np.ndarray:
    """PIL image -> (size, size, 3) uint8, resized on the shorter side and centre-cropped."""
    return np.asarray(resize_center_crop(to_rgb(img), size), dtype=np.uint8)


def uint8_to_tensor(arrays: np.ndarray) -> torch.Tensor:
    """(B,H,W,3) or (H,W,3) uint8 -> (B,3,H,W) or (3,H,W) float in [-1, 1]."""
    import torch  # here, not at the top: decoding tasks use this module without torch

    t = torch.from_numpy(np.require(arrays, dtype=np.uint8, requirements=["C", "W"])).float()
    t = t.permute(0, 3, 1, 2) if t.ndim == 4 else t.permute(2, 0, 1)
    return t / 127.5 - 1.0


def pil_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """PIL image -> (3, size, size) float in [-1, 1] (shorter side resized, centre-cropped)."""
    return uint8_to_tensor(to_uint8_array(img, size))


def tensor_to_pil(t: torch.Tensor) -> Image.Image:
    """(3,H,W) or (1,3,H,W) float in [-1, 1] -> PIL RGB."""
    import torch

    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"expected a (3,H,W) image tensor, got shape {tuple(t.shape)}")
    a = ((t.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy(), mode="RGB")
