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


def test_summarize_empty():
    assert summarize([]) == {"n": 0}
