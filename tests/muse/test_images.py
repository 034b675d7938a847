import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from muse.data.images import (
    CORRUPT,
    TOO_MANY_PIXELS,
    TOO_SMALL,
    ImageRejected,
    decode_image,
    decode_image_and_size,
    pil_to_tensor,
    resize_center_crop,
    tensor_to_pil,
    to_uint8_array,
)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height but carries one tiny IDAT: a decompression bomb's header."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    img.putpixel((0, 0), (255, 0, 0, 255))
    out = decode_image(encode(img, "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 0, 0)
    assert out.getpixel((5, 5)) == (255, 255, 255)  # fully transparent -> white, not black


def test_palette_with_transparency_and_la_are_composited():
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    p.info["transparency"] = 1
    assert decode_image(encode(p, "PNG", transparency=1)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 128))
    assert decode_image(encode(la, "PNG")).getpixel((0, 0)) == (127, 127, 127)


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(encode(cmyk, "JPEG", quality=95))
    r, g, b = out.getpixel((8, 8))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_16bit_png_is_scaled_not_clipped():
    a = np.full((8, 8), 32768, dtype=np.uint16)  # mid grey at 16 bits
    out = decode_image(encode(Image.fromarray(a), "PNG"))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied_and_size_is_as_displayed():
    img = Image.new("RGB", (20, 10), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 10, 10))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a quarter turn clockwise
    out, size = decode_image_and_size(encode(img, "JPEG", exif=exif, quality=95))
    assert out.size == (10, 20) and size == (10, 20)
    r, g, b = out.getpixel((5, 2))  # the left half ends up at the top
    assert r > 200 and b < 60


def test_truncated_and_garbage_are_corrupt():
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    for bad in (data[: len(data) // 2], b"not an image at all", b""):
        with pytest.raises(ImageRejected) as e:
            decode_image(bad)
        assert e.value.reason == CORRUPT


def test_small_and_bomb_are_refused_before_decoding():
    with pytest.raises(ImageRejected) as e:
        decode_image(encode(Image.new("RGB", (1, 1)), "PNG"), min_side=16)
    assert e.value.reason == TOO_SMALL
    # Header claims 30000x30000 = 900 Mpx: refused from the header (the body could not even decode).
    with pytest.raises(ImageRejected) as e:
        decode_image(png_header_only(30_000, 30_000), max_pixels=50_000_000)
    assert e.value.reason == TOO_MANY_PIXELS
    assert e.value.detail == "900000000 pixels is over 50000000 pixels"  # the limit set, not Pillow's own
    with pytest.raises(ImageRejected) as e:
        decode_image(encode(Image.new("L", (400, 300)), "PNG"), max_pixels=100_000)
    assert e.value.reason == TOO_MANY_PIXELS


def test_jpeg_draft_keeps_the_shorter_side_and_reports_source_size():
    img = Image.new("RGB", (1600, 800), (40, 80, 220))
    out, size = decode_image_and_size(encode(img, "JPEG"), draft_size=64)
    assert size == (1600, 800)
    assert min(out.size) >= 64 and out.size[0] < 1600  # decoded at a reduced scale
    assert to_uint8_array(out, 64).shape == (64, 64, 3)


def test_resize_center_crop_keeps_the_centre():
    img = Image.new("RGB", (300, 100), (255, 255, 255))
    img.paste((0, 0, 0), (100, 0, 200, 100))  # black centre square
    out = resize_center_crop(img, 50)
    assert out.size == (50, 50)
    assert np.asarray(out).mean() < 5  # only the black centre is left


def test_resize_center_crop_of_a_thin_strip_resamples_only_the_square():
    """A 200000x4 PNG is a few KB and within the pixel limit; scaling all of it to a short side of 256
    before cropping took 3.5 GB. Only the centre square's box is resampled now (a fresh process's peak)."""
    import subprocess
    import sys

    # VmHWM, not ru_maxrss: a child's ru_maxrss starts from its parent's size at fork.
    probe = ("from PIL import Image; from muse.data.images import resize_center_crop; "
             "out = resize_center_crop(Image.new('RGB', (200000, 4), (255, 0, 0)), 256); "
             "assert out.size == (256, 256) and out.getpixel((128, 128)) == (255, 0, 0); "
             "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) // 1024)")
    peak_mb = int(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout)
    assert peak_mb < 300, peak_mb


def test_tensor_round_trip():
    a = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    t = pil_to_tensor(Image.fromarray(a), 32)
    assert t.shape == (3, 32, 32) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(t)), a)
    assert np.array_equal(np.asarray(tensor_to_pil(t[None])), a)
    with pytest.raises(ValueError, match="expected a"):
        tensor_to_pil(torch.zeros(1, 32, 32))
