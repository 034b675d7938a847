import random

import pytest
from PIL import Image, ImageOps

from muse.data.synthetic import Group, Scene, caption, render, sample_scene
from muse.judge import find_blobs, judge, judge_scene, summarize


@pytest.mark.parametrize("size", [64, 128, 256])
def test_judge_reads_rendered_scenes(size):
    rng = random.Random(size)
    verdicts = []
    for _ in range(60):
        scene = sample_scene(rng)
        verdicts.append(judge_scene(render(scene, size, rng), scene))
    stats = summarize(verdicts)
    # Ground-truth renders must be read almost perfectly, or the judge's numbers mean nothing.
    assert stats["correct"] >= 0.9, stats
    assert stats["color"] == 1.0 and stats["placement"] >= 0.95


def test_judge_rejects_wrong_attributes():
    rng = random.Random(1)
    scene = Scene((Group("red", "square", 2, "left"), Group("blue", "circle", 1, "right")))
    img = render(scene, 128, rng)
    assert judge(img, caption(scene)).correct
    assert not judge(img, "two green squares on the left and a blue circle on the right").color
    assert not judge(img, "three red squares on the left and a blue circle on the right").count
    assert not judge(img, "two red triangles on the left and a blue circle on the right").shape
    mirrored = ImageOps.mirror(img)  # same shapes, sides swapped
    assert not judge(mirrored, caption(scene)).placement
    assert judge(mirrored, caption(scene)).count


def test_blank_or_noisy_image_is_not_correct():
    assert find_blobs(Image.new("RGB", (64, 64), "white")) == []
    assert not judge(Image.new("RGB", (64, 64), "white"), "a red circle").correct
    noise = Image.effect_noise((64, 64), 120).convert("RGB")
    assert not judge(noise, "a red circle").correct


def test_a_flooded_canvas_or_half_is_no_shape():
    """A model that paints the canvas (or a side) one colour draws no square: shapes are at most a
    fifth of the side, so a blob far larger names no shape."""
    from muse.data.synthetic import COLORS

    assert not judge(Image.new("RGB", (64, 64), COLORS["red"]), "a red square").correct
    halves = Image.new("RGB", (64, 64), COLORS["red"])
    halves.paste(Image.new("RGB", (32, 64), COLORS["blue"]), (32, 0))
    assert not judge(halves, "a red square on the left and a blue square on the right").correct
    assert {b.shape for b in find_blobs(halves)} == {"oversized"}


def test_chance_level_judges_each_image_against_every_other_prompt():
    """Held-out sets list a pairing's prompts together; judged against its neighbour, an oracle's
    image would often share colour and shape with the 'other' prompt and inflate chance."""
    from muse.evaluate import chance_level

    rng = random.Random(0)
    prompts = ["a red circle", "two red circles", "three red circles", "a blue square", "two blue squares"]
    rows = [{"prompt": p, "image": render(parse(p), 64, rng)} for p in prompts]
    chance = chance_level(rows)
    assert chance["n"] == len(prompts) * (len(prompts) - 1)
    assert chance["color"] == chance["shape"] == 8 / 20  # 3*2 red and 2*1 blue ordered pairs share them
    assert chance["count"] == chance["correct"] == 0.0  # a count is read among the colour's blobs


def parse(prompt):
    from muse.data.synthetic import parse_caption

    return parse_caption(prompt)


def test_summarize_empty():
    assert summarize([]) == {"n": 0}
