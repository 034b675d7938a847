"""An attribute judge for the synthetic corpus: reads a generated image and checks it against its
prompt's colour, shape type, count and placement.

The corpus draws flat shapes of six known colours on white, so the image can be read exactly:
1. label each pixel with its nearest palette colour (or background) when it is close enough;
2. split each colour's pixels into connected components, dropping specks under a minimum area;
3. name each component's shape by how much of its bounding box it fills
   (square ≈ 1.0, circle ≈ π/4 ≈ 0.785, triangle ≈ 0.5);
4. place it by its centroid (left/right of the vertical midline, top/bottom of the horizontal one).

`judge(image, caption)` returns per-attribute verdicts; a scene is correct when all hold.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass

import numpy as np
from PIL import Image

from muse.data.synthetic import COLORS, MAX_SHAPE, Group, Scene, parse_caption

MAX_COLOR_DISTANCE = 60.0  # RGB distance under which a pixel counts as a palette colour
MIN_AREA_FRACTION = 0.25  # a blob smaller than this share of the smallest drawable shape is noise
OVERSIZED = 1.5  # a blob wider or taller than this many times the largest drawable shape names no shape


@dataclass(frozen=True)
class Blob:
    color: str
    shape: str
    area: int
    cx: float  # centroid, as a fraction of the image side
    cy: float


@dataclass(frozen=True)
class Verdict:
    color: bool  # every group's colour is present, and no other colour is
    shape: bool  # every group's blobs have the group's shape
    count: bool  # every group has exactly its number of blobs
    placement: bool  # every group's blobs lie on its side (always true for one-group scenes)

    @property
    def correct(self) -> bool:
        return self.color and self.shape and self.count and self.placement

    def as_dict(self) -> dict:
        return {**asdict(self), "correct": self.correct}


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (n, 2) array of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def _shape_of(pixels: np.ndarray, side: int) -> str:
    ys, xs = pixels[:, 0], pixels[:, 1]
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if max(height, width) > OVERSIZED * MAX_SHAPE * side:  # a flooded canvas or region is no shape drawn
        return "oversized"
    fill = len(pixels) / (height * width)
    if fill > 0.89:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def find_blobs(image: Image.Image) -> list[Blob]:
    """Every palette-coloured blob in the image."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    side = rgb.shape[0]
    palette = np.array(list(COLORS.values()), dtype=np.float32)  # (K, 3)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K)
    nearest = dist.argmin(-1)
    close = dist.min(-1) < MAX_COLOR_DISTANCE
    min_area = MIN_AREA_FRACTION * (side / 8) ** 2 * 0.5  # half: a triangle fills half its box
    blobs = []
    for k, name in enumerate(COLORS):
        for pixels in _components(close & (nearest == k)):
            if len(pixels) < min_area:
                continue
            blobs.append(Blob(name, _shape_of(pixels, side), len(pixels),
                              float(pixels[:, 1].mean() + 0.5) / side, float(pixels[:, 0].mean() + 0.5) / side))
    return blobs


def _on_side(blob: Blob, position: str | None) -> bool:
    return {
        None: True, "left": blob.cx < 0.5, "right": blob.cx >= 0.5,
        "top": blob.cy < 0.5, "bottom": blob.cy >= 0.5,
    }[position]


def judge_scene(image: Image.Image, scene: Scene) -> Verdict:
    return judge_blobs(find_blobs(image), scene)


def judge_blobs(blobs: list[Blob], scene: Scene) -> Verdict:
    """The verdict on an image's blobs (`find_blobs`, read once for any number of scenes)."""
    wanted_colors = {g.color for g in scene.groups}
    color_ok = {b.color for b in blobs} == wanted_colors

    def members(group: Group) -> list[Blob]:
        # Two groups may share a colour (their shapes differ): a blob then belongs to the group on
        # whose side it lies, so a swap of sides fails on shape or count, not on placement.
        same = [b for b in blobs if b.color == group.color]
        if sum(g.color == group.color for g in scene.groups) > 1:
            same = [b for b in same if _on_side(b, group.position)]
        return same

    shape_ok = count_ok = place_ok = True
    for group in scene.groups:
        mine = members(group)
        shape_ok &= bool(mine) and all(b.shape == group.shape for b in mine)
        count_ok &= len(mine) == group.count
        place_ok &= bool(mine) and all(_on_side(b, group.position) for b in mine)
    return Verdict(color_ok, shape_ok, count_ok, place_ok)


def judge(image: Image.Image, caption: str) -> Verdict:
    """Check `image` against a synthetic-corpus caption (ValueError if the caption is not one)."""
    return judge_scene(image, parse_caption(caption))


def summarize(verdicts: list[Verdict]) -> dict[str, float]:
    """Accuracy per attribute and for whole scenes; empty list -> n = 0 and no rates."""
    n = len(verdicts)
    if n == 0:
        return {"n": 0}
    out = {"n": n}
    for attr in ("color", "shape", "count", "placement", "correct"):
        out[attr] = sum(getattr(v, attr) for v in verdicts) / n
    return out
