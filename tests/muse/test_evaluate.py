import json

import numpy as np
import pytest
import torch
from PIL import Image

from muse.data.synthetic import render, sample_scene, parse_caption, write_corpus
from muse.evaluate import evaluate, frechet_distance, psnr, seen_prompts
from muse.pipeline import MusePipeline


def test_frechet_distance_and_psnr():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 3.0) == pytest.approx(36.0, rel=0.05)  # |Δμ|² = 4·3²
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x, x) == float("inf")
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=0.01)  # mse of 0.1 in [0,1] units


def test_seen_prompts_never_use_held_out_pairs():
    holdout = {"pairs": [["red", "circle"], ["blue", "square"]]}
    for p in seen_prompts(holdout, 50):
        assert not parse_caption(p).pairs & {("red", "circle"), ("blue", "square")}


def _oracle(prompts, seed):
    """A perfect 'model': draws exactly what the prompt says."""
    import random

    return [render(parse_caption(p), 64, random.Random(seed + i)) for i, p in enumerate(prompts)]


def test_evaluate_scores_an_oracle_high_and_a_blank_model_low(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=4, size=64, holdout_fraction=0.2)
    report = evaluate(_oracle, None, str(corpus), str(tmp_path / "oracle"), n_seen=12)
    assert report["judge"]["seen"]["correct"] >= 0.9 and report["judge"]["held_out"]["correct"] >= 0.9
    # Chance level: the oracle's images judged against other prompts of the set mostly fail.
    chance = report["judge"]["chance"]
    assert chance["seen"]["n"] == 12 and chance["seen"]["correct"] <= 0.25, chance
    assert (tmp_path / "oracle" / "grid.png").exists() and not (tmp_path / "oracle" / "grid_base.png").exists()
    # A separate base-stage generator gets its own judgement and grid.
    report = evaluate(_oracle, None, str(corpus), str(tmp_path / "both"), n_seen=4,
                      base_generate=lambda prompts, seed: [Image.new("RGB", (64, 64), "white") for _ in prompts])
    assert report["judge"]["seen"]["correct"] >= 0.9 and report["judge_base"]["seen"]["correct"] == 0.0
    assert (tmp_path / "both" / "grid_base.png").exists()
    assert "skipped" in report["clip"]

    blank = lambda prompts, seed: [Image.new("RGB", (64, 64), "white") for _ in prompts]  # noqa: E731
    report = evaluate(blank, None, str(corpus), str(tmp_path / "blank"), n_seen=12)
    assert report["judge"]["seen"]["correct"] == 0.0
    saved = json.loads((tmp_path / "blank" / "report.json").read_text())
    assert saved["judge"]["seen"]["n"] == 12


def test_evaluate_with_tiny_pipeline_and_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    pipe = MusePipeline.from_preset("tiny", seed=0)
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=4, size=64, holdout_fraction=0.2)
    # A tiny random CLIP saved locally stands in for user-supplied weights.
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    cfg = CLIPConfig(text_config={"vocab_size": 4, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                    "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
                     projection_dim=8)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")

    def generate(prompts, seed):
        return pipe(prompts, steps=2, guidance_scale=2.0, seed=seed, superres=False)

    report = evaluate(generate, pipe, str(corpus), str(tmp_path / "out"), n_seen=4, clip_path=str(tmp_path / "clip"),
                      reference_images=4)
    assert set(report["psnr_db"]) == {"vqgan_lo", "vqgan_hi"}
    assert all(np.isfinite(v) for v in report["psnr_db"].values())
    assert 0.0 <= report["masked_token_accuracy"]["base"] <= 1.0 and "superres" in report["masked_token_accuracy"]
    assert report["clip"]["n"] == 4 + len(json.loads((corpus / "holdout.json").read_text())["eval_captions"])
    assert np.isfinite(report["clip"]["clip_score"]) and np.isfinite(report["clip"]["fid_clip_features"])


def test_missing_holdout_is_clear(tmp_path):
    with pytest.raises(ValueError, match="holdout.json"):
        evaluate(_oracle, None, str(tmp_path), str(tmp_path / "o"))


class _PixelTokenizer(torch.nn.Module):
    """A 'tokenizer' whose round trip is exact (or blank): the ceiling must read the images as they are."""

    def __init__(self, blank: bool):
        super().__init__()
        from muse.config import preset

        self.config = preset("vqgan-tiny")
        self.blank = blank
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    def encode(self, x):
        return x

    def decode(self, x):
        return torch.ones_like(x) if self.blank else x


def test_tokenizer_ceiling_judges_reconstructions_beside_the_originals():
    from muse.evaluate import heldout_images, tokenizer_ceiling

    samples = heldout_images(24, 128)
    exact = tokenizer_ceiling(_PixelTokenizer(blank=False), samples)
    assert exact["resolution"] == 64 and exact["originals"]["n"] == 24
    assert exact["originals"]["correct"] >= 0.9  # the judge reads 64 px renders
    assert exact["reconstructions"] == exact["originals"]
    blank = tokenizer_ceiling(_PixelTokenizer(blank=True), samples)
    assert blank["reconstructions"]["color"] == 0.0 and blank["originals"] == exact["originals"]
