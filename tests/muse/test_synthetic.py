import io
import json
import random
import tarfile
from collections import deque

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from muse.data import synthetic as syn
from muse.data.synthetic import COLORS, Group, Scene, caption, parse_caption, render, sample_scene


def components(mask: np.ndarray) -> list[tuple[int, int, int, int]]:
    """Bounding boxes (x0, y0, x1, y1) of the 4-connected components of a boolean mask."""
    seen = np.zeros_like(mask, dtype=bool)
    boxes = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, ys, xs = deque([(y, x)]), [y], [x]
        while queue:
            cy, cx = queue.popleft()
            for ny, nx in ((cy + 1, cx), (cy - 1, cx), (cy, cx + 1), (cy, cx - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
                    ys.append(ny)
                    xs.append(nx)
        boxes.append((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return boxes


def test_captions_read_as_specified():
    assert caption(Scene((Group("red", "circle", 1),))) == "a red circle"
    assert caption(Scene((Group("blue", "square", 3),))) == "three blue squares"
    two = Scene((Group("green", "triangle", 2, "left"), Group("yellow", "square", 1, "right")))
    assert caption(two) == "two green triangles on the left and a yellow square on the right"
    stacked = Scene((Group("purple", "circle", 1, "top"), Group("orange", "square", 3, "bottom")))
    assert caption(stacked) == "a purple circle at the top and three orange squares at the bottom"


def test_parse_caption_inverts_caption():
    rng = random.Random(1)
    for _ in range(300):
        scene = sample_scene(rng)
        assert parse_caption(caption(scene)) == scene
    assert parse_caption("  Two Red Circles. ") == Scene((Group("red", "circle", 2),))


@pytest.mark.parametrize("bad", [
    "a red circles", "two red circle", "a pink circle", "four red circles", "a red hexagon",
    "a red circle on the left and a blue square on the left", "a red circle on the left",
    "a red circle at the top and a blue square on the right", "",
])
def test_parse_caption_refuses_other_text(bad):
    with pytest.raises(ValueError):
        parse_caption(bad)


def test_scene_validation():
    with pytest.raises(ValueError):
        Group("red", "circle", 4)
    with pytest.raises(ValueError):
        Scene((Group("red", "circle", 1, "left"),))
    with pytest.raises(ValueError):
        Scene((Group("red", "circle", 1, "left"), Group("red", "square", 1, "bottom")))


def test_render_draws_exactly_what_the_caption_says():
    size = 128
    rng = random.Random(7)
    for _ in range(40):
        scene = sample_scene(rng)
        a = np.asarray(render(scene, size, rng)).astype(int)
        drawn = 0
        for group in scene.groups:
            mask = (np.abs(a - np.array(COLORS[group.color])).sum(-1) == 0)
            half = size // 2
            region = {"left": np.s_[:, :half], "right": np.s_[:, half:], "top": np.s_[:half, :],
                      "bottom": np.s_[half:, :], None: np.s_[:, :]}[group.position]
            inside = np.zeros_like(mask)
            inside[region] = mask[region]
            mask = inside
            boxes = components(mask)
            assert len(boxes) == group.count, caption(scene)  # none overlap or merge
            for x0, y0, x1, y1 in boxes:
                side = max(x1 - x0, y1 - y0)
                assert size / 8 - 1 <= side <= size / 5 + 1
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                where = {"left": cx < size / 2, "right": cx > size / 2,
                         "top": cy < size / 2, "bottom": cy > size / 2, None: True}
                assert where[group.position], caption(scene)
            drawn += mask.sum()
        white = (a == 255).all(-1).sum()
        assert white + drawn == size * size  # nothing but the groups on a white background


@pytest.mark.parametrize("size", [64, 128])
def test_grid_layout_puts_each_shape_in_one_cell_apart_from_the_others(size):
    """grid=8: every shape fills one cell of the 8x8 lattice (one token of an f8 tokenizer at 64 px),
    no two shapes touch even diagonally, and the judge reads every scene."""
    from muse.judge import judge_scene

    cell = size // 8
    rng = random.Random(3)
    for _ in range(60):
        scene = sample_scene(rng)
        image = render(scene, size, rng, grid=8)
        a = np.asarray(image).astype(int)
        cells = []
        boxes = components((a != 255).any(-1))  # shapes that touched would merge here
        assert len(boxes) == sum(g.count for g in scene.groups), caption(scene)
        for x0, y0, x1, y1 in boxes:
            assert x0 % cell == 0 and y0 % cell == 0 and x1 - x0 == cell, (caption(scene), (x0, y0, x1, y1))
            cells.append((x0 // cell, y0 // cell))
        assert all(max(abs(a[0] - b[0]), abs(a[1] - b[1])) > 1 for i, a in enumerate(cells) for b in cells[i + 1:])
        assert judge_scene(image, scene).correct, caption(scene)


@pytest.mark.parametrize("grid", [8, 16])
def test_lines_layout_gives_a_caption_one_image_on_its_sides_lines(grid):
    """layout="lines": each group is a line of cells one apart, centred in its region, off the outer
    ring, apart from the other group; the image depends on the caption alone, and the judge reads it."""
    from muse.judge import judge_scene

    size = 128
    cell = size // grid
    rng = random.Random(5)
    for _ in range(60):
        scene = sample_scene(rng)
        image = render(scene, size, random.Random(1), grid=grid, layout="lines")
        again = render(scene, size, random.Random(2), grid=grid, layout="lines")
        assert np.array_equal(np.asarray(image), np.asarray(again)), caption(scene)
        a = np.asarray(image).astype(int)
        boxes = components((a != 255).any(-1))
        assert len(boxes) == sum(g.count for g in scene.groups), caption(scene)
        cells = [(x0 // cell, y0 // cell) for x0, y0, _, _ in boxes]
        assert all(0 < cx < grid - 1 and 0 < cy < grid - 1 for cx, cy in cells), caption(scene)
        assert all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) > 1 for i, p in enumerate(cells) for q in cells[i + 1:])
        side = {None: lambda c: True, "left": lambda c: c[0] < grid // 2, "right": lambda c: c[0] >= grid // 2,
                "top": lambda c: c[1] < grid // 2, "bottom": lambda c: c[1] >= grid // 2}
        for group in scene.groups:  # one line per group: one column (left/right) or one row
            mine = [c for c in cells if side[group.position](c)]
            assert len(mine) == group.count, caption(scene)
            assert len({c[0] if group.position in ("left", "right") else c[1] for c in mine}) == 1, caption(scene)
        assert judge_scene(image, scene).correct, caption(scene)


def test_lines_layout_needs_a_grid(tmp_path):
    with pytest.raises(ValueError, match="lattice"):
        render(Scene((Group("red", "circle"),)), 64, random.Random(0), layout="lines")
    with pytest.raises(ValueError, match="layout"):
        syn.write_corpus(str(tmp_path), 1, size=64, grid=8, layout="diagonal")


@pytest.mark.parametrize("grid", [-1, 6, 12, 7])
def test_grid_must_divide_the_side(grid, tmp_path):
    with pytest.raises(ValueError, match="grid"):
        render(Scene((Group("red", "circle"),)), 64, random.Random(0), grid=grid)
    with pytest.raises(ValueError, match="grid"):
        syn.write_corpus(str(tmp_path), 1, size=64, grid=grid)


def test_shapes_are_distinguishable():
    img = np.asarray(render(Scene((Group("red", "circle"),)), 64, random.Random(0)))
    fill = {}
    for shape in syn.SHAPES:
        a = np.asarray(render(Scene((Group("red", shape),)), 200, random.Random(0)))
        mask = (a == COLORS["red"]).all(-1)
        x0, y0, x1, y1 = components(mask)[0]
        fill[shape] = mask.sum() / ((x1 - x0) * (y1 - y0))
    assert fill["square"] > 0.97 and 0.72 < fill["circle"] < 0.84 and 0.4 < fill["triangle"] < 0.6
    assert img.shape == (64, 64, 3)


def test_holdout_pairs_are_deterministic_and_keep_every_color_and_shape():
    held = syn.holdout_pairs(0.25, seed=3)
    assert held == syn.holdout_pairs(0.25, seed=3) and len(held) == round(0.25 * 18)
    assert held != syn.holdout_pairs(0.25, seed=4)
    train = [p for p in syn.all_pairs() if p not in held]
    assert {c for c, _ in train} == set(COLORS) and {s for _, s in train} == set(syn.SHAPES)
    rng = random.Random(0)
    for _ in range(500):
        assert not (sample_scene(rng, train).pairs & set(held))
    assert syn.holdout_pairs(0.0) == ()
    with pytest.raises(ValueError, match="at most"):
        syn.holdout_pairs(0.9)


@pytest.mark.parametrize("fmt", ["parquet", "folder", "webdataset"])
def test_write_corpus_formats(tmp_path, fmt):
    out = tmp_path / fmt
    syn.main(["--out", str(out), "--n", "7", "--size", "32", "--seed", "5", "--format", fmt,
              "--shard-size", "4", "--holdout-fraction", "0.2"])
    pairs: list[tuple[bytes, str]] = []
    if fmt == "parquet":
        files = sorted(out.glob("*.parquet"))
        assert [f.name for f in files] == ["part-00000.parquet", "part-00001.parquet"]
        for f in files:
            t = pq.read_table(f)
            pairs += list(zip(t["image"].to_pylist(), t["caption"].to_pylist()))
    elif fmt == "folder":
        for png in sorted(out.glob("*.png")):
            pairs.append((png.read_bytes(), png.with_suffix(".txt").read_text()))
    else:
        files = sorted(out.glob("*.tar"))
        assert len(files) == 2
        for f in files:
            with tarfile.open(f) as tar:
                members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".png")):
                pairs.append((members[name], members[name[:-4] + ".txt"].decode()))
    assert len(pairs) == 7
    holdout = json.loads((out / "holdout.json").read_text())
    held = {tuple(p) for p in holdout["pairs"]}
    assert len(held) == 4 and holdout["eval_captions"]
    for text in holdout["eval_captions"]:
        assert parse_caption(text).pairs & held
    for i, (image, text) in enumerate(pairs):
        scene = parse_caption(text)
        assert not scene.pairs & held
        expected_scene, expected_img = syn.sample(i, 5, 32, [p for p in syn.all_pairs() if p not in held])
        assert scene == expected_scene  # deterministic per (seed, index)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image))), np.asarray(expected_img))


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit):
        syn.main(["--out", str(tmp_path), "--n", "3", "--holdout-fraction", "1.5"])
    assert "holdout fraction" in capsys.readouterr().err


@pytest.mark.parametrize("fmt", ["parquet", "folder", "webdataset"])
def test_an_output_that_cannot_be_written_is_one_line(read_only_dir, fmt, capsys):
    with pytest.raises(SystemExit) as refused:
        syn.main(["--out", str(read_only_dir / "corpus"), "--n", "3", "--size", "32", "--format", fmt])
    err = capsys.readouterr().err
    assert refused.value.code == 1 and err.startswith(f"muse synth: error: writing {read_only_dir}/corpus: ")
    assert "Read-only file system" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("layout", ["scattered", "lines"])
def test_grid_corpus_records_its_layout_for_evaluation(tmp_path, layout):
    from muse.evaluate import heldout_images

    syn.main(["--out", str(tmp_path), "--n", "3", "--size", "64", "--grid", "8", "--layout", layout])
    holdout = json.loads((tmp_path / "holdout.json").read_text())
    assert holdout["grid"] == 8 and holdout["layout"] == layout
    table = pq.read_table(tmp_path / "part-00000.parquet")
    for i, image in enumerate(table["image"].to_pylist()):
        _, expected = syn.sample(i, 0, 64, syn.all_pairs(), grid=8, layout=layout)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(image))), np.asarray(expected))
    # evaluations render their scenes the same way
    for text, image in heldout_images(5, 64, grid=8, layout=layout):
        a = np.asarray(image).astype(int)
        for x0, y0, x1, y1 in components((a != 255).any(-1)):
            assert x0 % 8 == 0 and y0 % 8 == 0 and x1 - x0 == 8
        if layout == "lines":  # one image per caption
            assert np.array_equal(a, np.asarray(render(parse_caption(text), 64, random.Random(0), 8, layout)))
