"""Images and masks as the editing methods take them (muse/image_inputs.py): one reading of a mask
whatever form it comes in."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from muse.image_inputs import letterbox, load_image, load_mask


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _forms(img: Image.Image, tmp_path) -> dict:
    path = tmp_path / "mask.png"
    img.save(path)
    return {"pil": img, "bytes": _png(img), "path": str(path)}


def test_transparent_pixels_are_regenerated_in_every_form(tmp_path):
    """An RGBA mask, as OpenAI's edits take it: the transparent square is what is regenerated, read
    the same from a PIL image, bytes or a file."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[8:16, 8:16, 3] = 0
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[8:16, 8:16] = True
    for form, mask in _forms(Image.fromarray(rgba, "RGBA"), tmp_path).items():
        assert torch.equal(load_mask(mask, (32, 32)), expected), form


def test_a_phone_photos_exif_rotation_is_applied_in_every_form(tmp_path):
    """A JPEG stored sideways with EXIF orientation 6 (a quarter turn, as phones write them): the mask
    and the image are upright whether given as a file, bytes or an opened PIL image, so a mask from
    one form matches an image from another."""
    stored = np.zeros((40, 60), np.uint8)  # as stored: 60 wide, 40 high, white band along the top
    stored[:10] = 255
    img = Image.fromarray(stored, "L")
    exif = img.getexif()
    exif[0x0112] = 6
    path = tmp_path / "mask.jpg"
    img.save(path, exif=exif.tobytes(), quality=95)
    forms = {"pil": Image.open(path), "bytes": path.read_bytes(), "path": str(path)}
    masks = {form: load_mask(mask, (40, 60)) for form, mask in forms.items()}  # displayed: 40 wide, 60 high
    for form, mask in masks.items():
        assert mask.shape == (60, 40) and torch.equal(mask, masks["path"]), form
        assert mask[:, -10:].all() and not mask[:, :-10].any(), form  # the band is on the right, upright
    assert {load_image(f, "image").size for f in forms.values()} == {(40, 60)}


def test_opaque_masks_regenerate_white_with_antialiased_edges_thresholded(tmp_path):
    grey = np.zeros((32, 32), np.uint8)
    grey[:, 16:] = 255
    grey[:, 15] = 40  # an antialiased edge: not regenerated
    grey[:, 14] = 200  # mostly white: regenerated
    expected = torch.zeros(32, 32, dtype=torch.bool)
    expected[:, 16:] = expected[:, 14] = True
    for form, mask in _forms(Image.fromarray(grey, "L"), tmp_path).items():
        assert torch.equal(load_mask(mask, (32, 32)), expected), form
    opaque_rgba = Image.fromarray(grey, "L").convert("RGBA")  # alpha all 255: read by its grey
    assert torch.equal(load_mask(opaque_rgba, (32, 32)), expected)
    assert torch.equal(load_mask(grey, (32, 32)), torch.from_numpy(grey != 0))  # arrays: non-zero regenerates


def test_empty_and_wrongly_sized_masks_are_refused():
    with pytest.raises(ValueError, match="empty"):
        load_mask(Image.new("L", (8, 8), 0), (8, 8))
    with pytest.raises(ValueError, match="empty"):
        load_mask(Image.new("RGBA", (8, 8), (0, 0, 0, 255)), (8, 8))  # opaque black: nothing transparent or white
    with pytest.raises(ValueError, match="size"):
        load_mask(np.ones((4, 8)), (8, 8))
    # A mask in an image's [-1, 1] range would regenerate everything: refused, with the way out.
    image_range = torch.full((8, 8), -1.0)
    image_range[:2] = 1.0
    with pytest.raises(ValueError, match=r"mask values must be >= 0 .* pass `mask > 0`"):
        load_mask(image_range, (8, 8))
    assert load_mask(image_range > 0, (8, 8)).sum() == 16


def test_image_tensors_must_be_float_in_minus_one_one():
    assert load_image(torch.zeros(3, 4, 4), "image").size == (4, 4)
    with pytest.raises(ValueError, match="float"):
        load_image(torch.full((3, 4, 4), 200, dtype=torch.uint8), "image")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        load_image(torch.full((3, 4, 4), 200.0), "image")
    # A [0, 1] image (as most loaders give) is read as [-1, 1] and comes out pale: said, not refused.
    with pytest.warns(UserWarning, match=r"every value of the image tensor is in \[0, 1\].*2 \* t - 1"):
        load_image(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)), "image")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_image(torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(0)) * 2 - 1, "image")


def test_letterbox_keeps_the_whole_image_centred():
    img = Image.new("RGB", (200, 100), (255, 0, 0))
    pixels, inside = letterbox(img, 64)
    assert pixels.shape == (3, 64, 64) and inside.shape == (64, 64)
    assert inside[16:48].all() and not inside[:16].any() and not inside[48:].any()
    assert torch.allclose(pixels[:, 16:48], torch.tensor([1.0, -1.0, -1.0])[:, None, None])
    square = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 50, 3), dtype=np.uint8))
    from muse.data.images import pil_to_tensor

    assert torch.equal(letterbox(square, 64)[0], pil_to_tensor(square, 64))  # a square is as before


def test_a_letterbox_placed_at_the_base_side_agrees_with_it_pixel_for_pixel():
    """The super-res canvas keeps the tokens over the base canvas's image: its bands must be the base
    bands scaled, not rounded on their own (a 100x61 image: 39 rows of 64, but 78 or 79 of 128)."""
    for size in [(100, 61), (61, 100), (333, 100), (100, 99), (7, 64)]:
        img = Image.new("RGB", size, (255, 0, 0))
        _, lo = letterbox(img, 64)
        _, hi = letterbox(img, 128, placed_at=64)
        assert torch.equal(hi, torch.nn.functional.interpolate(lo[None, None].float(), size=(128, 128))[0, 0] > 0), size
    with pytest.raises(ValueError, match="must be a multiple"):
        letterbox(img, 100, placed_at=64)


def test_faint_alpha_in_a_mask_does_not_hide_its_white_region():
    """Transparency marks the region only where a pixel is transparent (alpha < 128): a mask opaque but
    for one alpha-254 pixel is read by its white pixels."""
    from muse.image_inputs import mask_from_image

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2:4, 2:6, :3] = 255
    rgba[0, 0, 3] = 254
    assert mask_from_image(Image.fromarray(rgba)).sum() == 8
    rgba[0, 0, 3] = 0  # a transparent pixel: transparency marks the region
    assert mask_from_image(Image.fromarray(rgba)).sum() == 1
