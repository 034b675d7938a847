"""The built-in synthetic corpus: flat shapes on white, with captions that say exactly what is drawn.

A scene is one or two groups; a group is 1-3 shapes of one color and one shape type:

    "a red circle"                      one group, anywhere
    "three blue squares"
    "two green triangles on the left and a yellow square on the right"     side by side
    "a purple circle at the top and three orange squares at the bottom"    stacked

Shapes never overlap and each is 1/8-1/5 of the image side. With `grid` (the demo uses 8) every
shape instead fills one cell of a grid x grid lattice, no two in touching cells: at a tokenizer's
token grid each shape is then exactly one token, which lifts the bound that a per-patch code puts on
reconstructions (free placement at f8: at most 0.11 whole scene with 512 codes, benchmarks/RESULTS.md).

`layout` says where on the lattice: "scattered" (default) picks random free cells of the group's
region; "lines" draws each group as a line of cells one apart, centred in its region (a column for
left/right, a row otherwise), so a caption has exactly one image. Parallel decoding samples cells
independently given the caption, so scattered layouts ask a model to agree across cells on which few
hold the shapes; a small model trained briefly miscounts there (benchmarks/RESULTS.md, "One image per
caption").

Every caption parses back into its `Scene` (`parse_caption`), which is what an evaluation judge
compares a generated image against.

`holdout_pairs(fraction, seed)` keeps a deterministic share of (color, shape) pairings out of
training while every color and every shape still appears in training with some other partner, so a
model can be asked for, say, "a blue triangle" it has never seen: compositional generalisation.
`write_corpus` writes `holdout.json` with those pairs and evaluation captions beside the corpus.

Everything is pure Python + Pillow and deterministic: sample i of seed s is the same image on every
machine, so the corpus can be written in any order or in parallel.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import re
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

from muse import storage

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
LAYOUTS: dict[str, tuple[str, str]] = {"horizontal": ("left", "right"), "vertical": ("top", "bottom")}
POSITION_PHRASES: dict[str, str] = {
    "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
}
BACKGROUND = (255, 255, 255)
MIN_SHAPE, MAX_SHAPE = 1 / 8, 1 / 5  # shape size as a fraction of the image side
FORMATS = ("parquet", "folder", "webdataset")  # as it can be written; the tokenize job reads each
GRID_LAYOUTS = ("scattered", "lines")  # where shapes go on the lattice (`grid` > 0)

Pair = tuple[str, str]  # (color, shape)


@dataclass(frozen=True)
class Group:
    """`count` shapes of one `color` and one `shape`; `position` is None when the scene has one group."""

    color: str
    shape: str
    count: int = 1
    position: str | None = None

    def __post_init__(self):
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}; colors are {sorted(COLORS)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; shapes are {list(SHAPES)}")
        if self.count not in COUNT_WORDS:
            raise ValueError(f"count must be 1, 2 or 3, got {self.count!r}")
        if self.position is not None and self.position not in POSITION_PHRASES:
            raise ValueError(f"position must be None or one of {sorted(POSITION_PHRASES)}")

    @property
    def pair(self) -> Pair:
        return (self.color, self.shape)

    def phrase(self) -> str:
        noun = self.shape if self.count == 1 else self.shape + "s"
        return f"{COUNT_WORDS[self.count]} {self.color} {noun}"


@dataclass(frozen=True)
class Scene:
    """One group anywhere, or two groups: (left, right) side by side or (top, bottom) stacked."""

    groups: tuple[Group, ...]

    def __post_init__(self):
        object.__setattr__(self, "groups", tuple(self.groups))
        positions = tuple(g.position for g in self.groups)
        if positions != (None,) and positions not in LAYOUTS.values():
            raise ValueError(
                f"a scene is one group with no position or two groups at (left, right) or "
                f"(top, bottom); got positions {positions}"
            )

    @property
    def layout(self) -> str:
        if len(self.groups) == 1:
            return "single"
        return "horizontal" if self.groups[0].position == "left" else "vertical"

    @property
    def pairs(self) -> frozenset[Pair]:
        return frozenset(g.pair for g in self.groups)


def all_pairs() -> list[Pair]:
    return [(c, s) for c in COLORS for s in SHAPES]


def caption(scene: Scene) -> str:
    if len(scene.groups) == 1:
        return scene.groups[0].phrase()
    return " and ".join(f"{g.phrase()} {POSITION_PHRASES[g.position]}" for g in scene.groups)


_NOUNS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES}
_COUNTS = {w: n for n, w in COUNT_WORDS.items()} | {"an": 1, "one": 1}
_GROUP = r"(a|an|one|two|three) (\w+) (\w+)"
_PLACES = "|".join(re.escape(p) for p in POSITION_PHRASES.values())
_SINGLE_RE = re.compile(rf"^{_GROUP}$")
_DOUBLE_RE = re.compile(rf"^{_GROUP} ({_PLACES}) and {_GROUP} ({_PLACES})$")


def parse_caption(text: str) -> Scene:
    """The structured scene a caption describes (the inverse of `caption`); ValueError otherwise."""
    norm = " ".join(text.lower().replace(",", " ").split()).rstrip(".")
    if m := _SINGLE_RE.match(norm):
        return Scene((_group(*m.groups(), None, text),))
    if m := _DOUBLE_RE.match(norm):
        where = {v: k for k, v in POSITION_PHRASES.items()}
        a = _group(*m.groups()[0:3], where[m.group(4)], text)
        b = _group(*m.groups()[4:7], where[m.group(8)], text)
        try:
            return Scene((a, b))
        except ValueError as e:
            raise ValueError(f"not a synthetic-corpus caption: {text!r} ({e})") from None
    raise ValueError(f"not a synthetic-corpus caption: {text!r}")


def _group(count: str, color: str, noun: str, position: str | None, text: str) -> Group:
    n = _COUNTS[count]
    if color not in COLORS or noun not in _NOUNS or (noun in SHAPES) != (n == 1):
        raise ValueError(f"not a synthetic-corpus caption: {text!r}")
    return Group(color, _NOUNS[noun], n, position)


def holdout_pairs(fraction: float, seed: int = 0) -> tuple[Pair, ...]:
    """round(fraction * 18) (color, shape) pairs kept out of training, chosen deterministically so
    that every color and every shape keeps at least one pairing in training."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"holdout fraction must be in [0, 1), got {fraction}")
    pairs = all_pairs()
    want = round(fraction * len(pairs))
    random.Random(f"muse-holdout:{seed}").shuffle(pairs)
    held: list[Pair] = []
    for color, shape in pairs:
        if len(held) == want:
            break
        kept = [p for p in all_pairs() if p not in held and p != (color, shape)]
        if any(c == color for c, _ in kept) and any(s == shape for _, s in kept):
            held.append((color, shape))
    if len(held) < want:
        raise ValueError(
            f"can hold out at most {len(held)} of {len(all_pairs())} pairs while every color and "
            f"shape stays in training (fraction <= {len(held) / len(all_pairs()):.2f}); asked for {want}"
        )
    return tuple(sorted(held))


def sample_scene(rng: random.Random, allowed_pairs: Iterable[Pair] | None = None) -> Scene:
    """A random scene whose groups use only `allowed_pairs` (default: every pair). Half the scenes
    have one group; two-group scenes use two different pairs, side by side or stacked."""
    allowed = sorted(set(allowed_pairs) if allowed_pairs is not None else all_pairs())
    if not allowed:
        raise ValueError("no (color, shape) pairs allowed")
    layout = rng.choice(["single", "single", "horizontal", "vertical"])
    if layout == "single" or len(allowed) < 2:
        color, shape = rng.choice(allowed)
        return Scene((Group(color, shape, rng.randint(1, 3)),))
    first, second = rng.sample(allowed, 2)
    pos = LAYOUTS[layout]
    return Scene(tuple(Group(c, s, rng.randint(1, 3), p) for (c, s), p in zip((first, second), pos)))


def render(scene: Scene, size: int = 256, rng: random.Random | None = None, grid: int = 0,
           layout: str = "scattered") -> Image.Image:
    """Draw `scene` as a size x size RGB image. Shape sizes and places come from `rng`.

    grid > 0 draws every shape in one cell of a grid x grid lattice, no two shapes in touching cells
    (diagonals included): with grid = a tokenizer's tokens per side, each shape is exactly one token.
    layout "lines" (grid > 0 only) puts each group on its fixed line of cells instead of random ones."""
    if size < 16:
        raise ValueError(f"size must be at least 16 pixels, got {size}")
    _check_grid(grid, size, layout)
    rng = rng or random.Random(0)
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    half = size // 2
    regions = {
        None: (0, 0, size, size), "left": (0, 0, half, size), "right": (half, 0, size, size),
        "top": (0, 0, size, half), "bottom": (0, half, size, size),
    }
    taken: list[tuple[int, int]] = []
    for group in scene.groups:
        if layout == "lines":
            boxes = _place_in_line(group.count, group.position, size, grid)
        elif grid:
            boxes = _place_on_grid(group.count, regions[group.position], size, grid, taken, rng)
        else:
            boxes = _place(group.count, regions[group.position], size, rng)
        for box in boxes:
            _draw_shape(draw, group.shape, box, COLORS[group.color])
    return img


def _check_grid(grid: int, size: int, layout: str = "scattered") -> None:
    if grid < 0 or (grid and (grid < 8 or grid % 2 or size % grid)):
        raise ValueError(f"grid must be 0 (free placement) or an even number >= 8 that divides the image "
                         f"side {size}, got {grid}")
    if layout not in GRID_LAYOUTS:
        raise ValueError(f"layout must be one of {GRID_LAYOUTS}, got {layout!r}")
    if layout != "scattered" and not grid:
        raise ValueError(f"layout {layout!r} places shapes on a lattice: give a grid (e.g. 8)")


def _place_in_line(count: int, position: str | None, size: int, grid: int) -> list[tuple]:
    """`count` cells one apart on the group's line, centred along it, as boxes: a column two cells from
    the middle for left/right (so the two groups never touch), a row two cells from it for top/bottom,
    the row above the middle for a lone group. Inside the outer ring for every count."""
    cell, mid = size // grid, grid // 2
    across = {None: mid - 1, "left": mid - 2, "right": mid + 1, "top": mid - 2, "bottom": mid + 1}[position]
    first = (grid - (2 * count - 1)) // 2
    along = [first + 2 * i for i in range(count)]
    cells = [(across, a) if position in ("left", "right") else (a, across) for a in along]
    return [(cx * cell, cy * cell, (cx + 1) * cell, (cy + 1) * cell) for cx, cy in cells]


def _place_on_grid(count: int, region: tuple[int, int, int, int], size: int, grid: int,
                   taken: list[tuple[int, int]], rng: random.Random) -> list[tuple]:
    """`count` cells of the grid inside `region`, none touching another shape's cell, as boxes.
    Greedy in random order always succeeds for grid >= 8: a half has >= 32 cells, and the 5 shapes
    already drawn block at most 27 of them."""
    cell = size // grid
    x0, y0, x1, y1 = (v // cell for v in region)
    cells = [(cx, cy) for cy in range(y0, y1) for cx in range(x0, x1)]
    chosen: list[tuple[int, int]] = []
    for cx, cy in rng.sample(cells, len(cells)):
        if len(chosen) < count and all(max(abs(cx - ox), abs(cy - oy)) > 1 for ox, oy in taken + chosen):
            chosen.append((cx, cy))
    taken.extend(chosen)
    return [(cx * cell, cy * cell, (cx + 1) * cell, (cy + 1) * cell) for cx, cy in chosen]


def _place(count: int, region: tuple[int, int, int, int], size: int, rng: random.Random) -> list[tuple]:
    """`count` non-overlapping square boxes of side in [size/8, size/5] inside `region`."""
    x0, y0, x1, y1 = region
    lo, hi = max(2, round(size * MIN_SHAPE)), max(2, int(size * MAX_SHAPE))
    gap = max(1, size // 64)
    for _ in range(100):
        boxes: list[tuple[int, int, int, int]] = []
        for _ in range(count):
            for _ in range(50):
                s = rng.randint(lo, hi)
                bx = rng.randint(x0 + gap, x1 - gap - s)
                by = rng.randint(y0 + gap, y1 - gap - s)
                box = (bx, by, bx + s, by + s)
                if all(_apart(box, other, gap) for other in boxes):
                    boxes.append(box)
                    break
        if len(boxes) == count:
            return boxes
    # A row of smallest shapes always fits (3 * size/8 + gaps < size/2): the guaranteed fallback.
    step = (x1 - x0) // count
    return [(x0 + i * step + gap, (y0 + y1 - lo) // 2, x0 + i * step + gap + lo, (y0 + y1 + lo) // 2)
            for i in range(count)]


def _apart(a: tuple, b: tuple, gap: int) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple, color: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=color)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=color)
    else:
        draw.polygon([(x0, y1 - 1), (x1 - 1, y1 - 1), ((x0 + x1 - 1) / 2, y0)], fill=color)


# ---------------------------------------------------------------------------------------------
# Writing a corpus.


def sample(index: int, seed: int, size: int, allowed_pairs: Sequence[Pair],
           grid: int = 0, layout: str = "scattered") -> tuple[Scene, Image.Image]:
    """Sample `index` of the corpus with `seed`: the same scene and image on every machine."""
    rng = random.Random(f"muse-synth:{seed}:{index}")
    scene = sample_scene(rng, allowed_pairs)
    return scene, render(scene, size, rng, grid, layout)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def eval_captions(held: Sequence[Pair], seed: int = 0) -> list[str]:
    """Prompts that use held-out pairs: each pair alone at every count, and beside a training pair."""
    train = [p for p in all_pairs() if p not in set(held)]
    rng = random.Random(f"muse-holdout-eval:{seed}")
    prompts = []
    for color, shape in held:
        prompts += [caption(Scene((Group(color, shape, n),))) for n in COUNT_WORDS]
        other = rng.choice(train)
        first, second = LAYOUTS[rng.choice(sorted(LAYOUTS))]
        prompts.append(caption(Scene((Group(color, shape, rng.randint(1, 3), first),
                                      Group(*other, rng.randint(1, 3), second)))))
    return prompts


def write_corpus(out: str, n: int, size: int = 256, seed: int = 0, holdout_fraction: float = 0.0,
                 format: str = "parquet", shard_size: int = 1000, grid: int = 0,
                 layout: str = "scattered") -> dict:
    """Write n samples to `out` (local or s3://) as Parquet shards (image, caption), a folder of
    PNGs with sidecar .txt captions, or WebDataset tar shards; plus holdout.json (which records
    `grid` and `layout`, so evaluations render their scenes the same way). Returns a summary."""
    _check_grid(grid, size, layout)
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if n < 1 or shard_size < 1:
        raise ValueError("n and shard_size must be positive")
    held = holdout_pairs(holdout_fraction, seed)
    allowed = [p for p in all_pairs() if p not in set(held)]
    storage.makedirs(out)
    for start in range(0, n, shard_size):
        rows = []
        for i in range(start, min(n, start + shard_size)):
            scene, img = sample(i, seed, size, allowed, grid, layout)
            rows.append((f"{i:07d}", png_bytes(img), caption(scene)))
        _write_shard(out, format, start // shard_size, rows)
    info = {
        "n": n, "size": size, "fraction": holdout_fraction, "seed": seed, "grid": grid, "layout": layout,
        "pairs": [list(p) for p in held], "eval_captions": eval_captions(held, seed),
    }
    storage.write_text(storage.join(out, "holdout.json"), json.dumps(info, indent=1))
    return {"out": out, "n": n, "size": size, "format": format, "holdout_pairs": len(held), "grid": grid,
            "layout": layout}


def _write_shard(out: str, format: str, shard: int, rows: list[tuple[str, bytes, str]]) -> None:
    if format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"image": pa.array([r[1] for r in rows], pa.binary()),
                          "caption": pa.array([r[2] for r in rows], pa.string())})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(out, f"part-{shard:05d}.parquet"), buf.getvalue())
    elif format == "folder":
        for name, image, text in rows:
            storage.write_bytes(storage.join(out, f"{name}.png"), image)
            storage.write_text(storage.join(out, f"{name}.txt"), text)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name, image, text in rows:
                for member, data in ((f"{name}.png", image), (f"{name}.txt", text.encode())):
                    info = tarfile.TarInfo(member)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        storage.write_bytes(storage.join(out, f"shard-{shard:05d}.tar"), buf.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="muse synth",
        description="Write the built-in synthetic corpus: flat colored shapes on white with captions "
                    "that say exactly what is drawn (e.g. 'two green triangles on the left and a "
                    "yellow square on the right'). Deterministic for a given --seed.",
    )
    parser.add_argument("--out", required=True, help="output directory, local path or s3:// URI")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="corpus seed (default 0)")
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="share of the 18 (color, shape) pairings kept out of training and listed "
                             "in holdout.json for evaluation (default 0)")
    parser.add_argument("--format", choices=FORMATS, default="parquet",
                        help="parquet shards (image, caption), a folder of PNG + .txt, or WebDataset "
                             "tar shards (default parquet)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="images per Parquet/tar shard (default 1000)")
    parser.add_argument("--grid", type=int, default=0,
                        help="draw each shape in one cell of a GRID x GRID lattice (e.g. a tokenizer's "
                             "tokens per side), no two in touching cells; 0 places them freely (default)")
    parser.add_argument("--layout", choices=GRID_LAYOUTS, default="scattered",
                        help="with --grid: random cells of each group's region (scattered, default), or each "
                             "group on its fixed line of cells (lines: one image per caption)")
    args = parser.parse_args(argv)
    try:
        summary = write_corpus(args.out, args.n, args.size, args.seed, args.holdout_fraction,
                               args.format, args.shard_size, args.grid, args.layout)
    except ValueError as e:
        parser.error(str(e))
    except OSError as e:  # the output cannot be written (read-only, full, S3 refusing): the cause in one line
        parser.exit(1, f"{parser.prog}: error: writing {args.out}: {' '.join(str(e).split())}\n")
    print(f"wrote {summary['n']} {args.size}px images ({args.format}) to {args.out}; "
          f"{summary['holdout_pairs']} (color, shape) pairs held out in holdout.json")


if __name__ == "__main__":
    main()
