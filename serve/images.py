"""Image plumbing of the HTTP API's ingress, free of Ray and torch: uploaded images and masks for
/v1/images/edits (`serve.pixels` turns the models' outputs into image bytes).

Edits follow OpenAI's convention: the pixels to regenerate are the transparent ones (alpha < 128) of
the mask, or of the image itself when no mask is sent (the image's own transparency is composited
on white before tokenizing; those tokens are regenerated anyway). An image placed on a larger transparent
canvas therefore asks for outpainting, and a fully opaque image with no transparent pixel anywhere
asks for mask-free editing toward the new prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from muse.data.images import (TOO_MANY_PIXELS, TRANSPARENT_BELOW, ImageRejected, centre_square, decode_image,
                              has_alpha, resized_mask, to_rgb, to_uint8_array)


class UploadError(ValueError):
    """An uploaded image or mask the API refuses; `param` names the form field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def read_upload(data: bytes, param: str, max_pixels: int) -> Image.Image:
    """Encoded bytes -> the image as the library decodes any (`muse.data.images.decode_image`: upright
    by its EXIF orientation, 16-bit grey scaled, size checked before decoding, any codec error a
    rejection) in its own mode, transparency kept; UploadError for anything unreadable or too large."""
    if not data:
        raise UploadError(param, f"'{param}' is empty")
    try:
        return decode_image(data, max_pixels=max_pixels, keep_mode=True)
    except ImageRejected as e:
        if e.reason == TOO_MANY_PIXELS:
            raise UploadError(param, f"'{param}' has too many pixels: {e.detail}") from None
        raise UploadError(param, f"'{param}' is not a readable image ({e.detail})") from None


def transparent_pixels(img: Image.Image) -> np.ndarray:
    """(H, W) bool: the pixels whose alpha is under TRANSPARENT_BELOW (none in an image without alpha)."""
    if not has_alpha(img):
        return np.zeros((img.height, img.width), dtype=bool)
    return np.asarray(img.convert("RGBA").getchannel("A")) < TRANSPARENT_BELOW


@dataclass
class EditInput:
    """An edit request's image at each stage's resolution and the low-res tokens to regenerate."""

    images: dict[str, np.ndarray]  # stage -> (side, side, 3) uint8
    regenerate: np.ndarray | None  # (h, w) bool on the low-res token grid; None = mask-free editing
    # keep_pixels: stage -> (side, side) bool, the pixels the mask regenerates; the image's own go back elsewhere
    kept_outside: dict[str, np.ndarray] | None = None

    def kept(self, stage: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(image, pixel mask) at the stage's side, for the decoder to put the image back outside the mask."""
        return None if self.kept_outside is None else (self.images[stage], self.kept_outside[stage])


def prepare_edit(image_bytes: bytes, mask_bytes: bytes | None, sides: dict[str, int], lo_tokens: int,
                 max_pixels: int, keep_pixels: bool = False) -> EditInput:
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
    transparent = transparent_pixels(alpha_source)  # (H, W)
    if mask_bytes is not None and not transparent.any():
        raise UploadError("mask", f"the mask has no transparent pixels (alpha under {TRANSPARENT_BELOW}), so "
                                  "nothing would be regenerated; make the area to repaint transparent, or send no "
                                  "mask (with an opaque image) for a mask-free edit of the whole image")
    rgb = to_rgb(image)
    images = {stage: to_uint8_array(rgb, side) for stage, side in sides.items()}
    if not transparent.any():
        if keep_pixels:
            raise UploadError("keep_pixels", "keep_pixels needs a mask (or transparent pixels in the image) to "
                                             "keep the pixels outside of; a mask-free edit redraws the whole image")
        return EditInput(images, None)
    square = centre_square(transparent)
    if not square.any():
        side = square.shape[0]
        raise UploadError("mask" if mask_bytes is not None else "image",
                          f"the transparent area lies outside the centre {side}x{side} square of the "
                          f"{image.width}x{image.height} image, which is all the model sees of it; crop the image "
                          "to a square around the area to repaint")
    kept = {stage: resized_mask(square, side) for stage, side in sides.items()} if keep_pixels else None
    return EditInput(images, token_mask(square, lo_tokens), kept)



def token_mask(pixels: np.ndarray, tokens_per_side: int) -> np.ndarray:
    """Pixel mask (H, W) -> token mask (t, t) bool: a token is regenerated when any pixel of its patch
    is (`muse.editing.token_mask_from_pixels` in numpy, with adaptive max pooling's windows, so H and W
    need not divide evenly): rows floor(i*H/t) to ceil((i+1)*H/t) for token row i."""
    h, w = pixels.shape
    t = tokens_per_side
    rows = [(i * h // t, -(-(i + 1) * h // t)) for i in range(t)]
    cols = [(j * w // t, -(-(j + 1) * w // t)) for j in range(t)]
    return np.array([[pixels[r0:r1, c0:c1].any() for c0, c1 in cols] for r0, r1 in rows], dtype=bool)

