import json

import numpy as np
import pytest
import torch
from PIL import Image

from muse.data.synthetic import render, parse_caption, write_corpus
from muse.evaluate import evaluate, psnr, seen_prompts
from muse.fid import frechet_distance
from muse.pipeline import MusePipeline


def test_frechet_distance_and_psnr():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 4))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 3.0) == pytest.approx(36.0, rel=0.05)  # |Δμ|² = 4·3²
    wide = rng.normal(size=(40, 64))  # fewer samples than dimensions: rounding goes below 0 unclamped
    assert 0.0 <= frechet_distance(wide, wide) < 1e-2
    x = torch.zeros(1, 3, 4, 4)
    assert psnr(x, x) == float("inf")
    assert psnr(x, x + 0.2) == pytest.approx(20.0, abs=0.01)  # mse of 0.1 in [0,1] units


def test_seen_prompts_never_use_held_out_pairs():
    holdout = {"pairs": [["red", "circle"], ["blue", "square"]]}
    for p in seen_prompts(holdout, 50):
        assert not parse_caption(p).pairs & {("red", "circle"), ("blue", "square")}


def _oracle(prompts, seeds):
    """A perfect 'model': draws exactly what the prompt says."""
    import random

    return [render(parse_caption(p), 64, random.Random(seed)) for p, seed in zip(prompts, seeds)]


def test_evaluate_scores_an_oracle_high_and_a_blank_model_low(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=4, size=64, holdout_fraction=0.2)
    report = evaluate(_oracle, None, str(corpus), str(tmp_path / "oracle"), n_seen=12)
    assert report["judge"]["seen"]["correct"] >= 0.9 and report["judge"]["held_out"]["correct"] >= 0.9
    # Chance level: the oracle's images judged against other prompts of the set mostly fail.
    chance = report["judge"]["chance"]
    distinct = len({p["prompt"] for p in report["judge"]["prompts"] if p["set"] == "seen"})
    assert chance["seen"]["n"] == 12 * (distinct - 1) and chance["seen"]["correct"] <= 0.25, chance
    assert (tmp_path / "oracle" / "grid.png").exists() and not (tmp_path / "oracle" / "grid_base.png").exists()
    # A separate base-stage generator gets its own judgement and grid.
    report = evaluate(_oracle, None, str(corpus), str(tmp_path / "both"), n_seen=4, n_held_out=3,
                      base_generate=lambda prompts, seed: [Image.new("RGB", (64, 64), "white") for _ in prompts])
    assert report["judge"]["seen"]["correct"] >= 0.9 and report["judge_base"]["seen"]["correct"] == 0.0
    assert report["judge"]["held_out"]["n"] == report["judge_base"]["held_out"]["n"] == 3  # the first 3 of 16
    assert (tmp_path / "both" / "grid_base.png").exists()
    assert "skipped" in report["clip"]

    blank = lambda prompts, seed: [Image.new("RGB", (64, 64), "white") for _ in prompts]  # noqa: E731
    report = evaluate(blank, None, str(corpus), str(tmp_path / "blank"), n_seen=12)
    assert report["judge"]["seen"]["correct"] == 0.0
    saved = json.loads((tmp_path / "blank" / "report.json").read_text())
    assert saved["judge"]["seen"]["n"] == 12


VISION = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}


def _tiny_clip(path) -> str:
    """A tiny random CLIP (model + tokenizer) saved locally: it stands in for user-supplied weights."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    torch.manual_seed(0)
    path.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3}
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    cfg = CLIPConfig(text_config={"vocab_size": 4, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                                  "num_attention_heads": 2, "max_position_embeddings": 77},
                     vision_config=VISION, projection_dim=8)
    CLIPModel(cfg).save_pretrained(path / "clip")
    tok.save_pretrained(path / "clip")
    return str(path / "clip")


def _tiny_clip_vision(path) -> str:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(**VISION)).save_pretrained(path / "vision")
    return str(path / "vision")


def test_an_evaluation_image_does_not_depend_on_the_batch_it_was_drawn_in():
    """Prompt k of a set draws with its own request seed, so `--batch` changes speed only, no two
    sets or seeds share a stream, and the report's seed redraws the image alone."""
    from muse.evaluate import HELD_OUT_STREAM, SEEN_STREAM, judge_prompts, pipeline_generator, prompt_seeds

    pipe = MusePipeline.from_preset("tiny", seed=0)
    gen = pipeline_generator(pipe, steps=2, superres_steps=1, guidance_scale=2.0, superres=False)
    prompts = ["a red circle", "two blue squares", "a green triangle", "a red circle"]
    whole = judge_prompts(gen, prompts, 7, SEEN_STREAM, batch=4)
    cut = judge_prompts(gen, prompts, 7, SEEN_STREAM, batch=3)
    assert [np.asarray(r["image"]).tolist() for r in whole] == [np.asarray(r["image"]).tolist() for r in cut]
    assert whole[0]["seed"] != whole[3]["seed"]  # the same prompt twice: two draws
    alone = pipe([prompts[1]], steps=2, guidance_scale=2.0, seed=whole[1]["seed"], superres=False)[0]
    assert np.array_equal(np.asarray(alone), np.asarray(whole[1]["image"]))
    assert not set(prompt_seeds(7, 0, 4, SEEN_STREAM)) & set(prompt_seeds(7, 0, 4, HELD_OUT_STREAM))
    assert not set(prompt_seeds(7, 0, 4, SEEN_STREAM)) & set(prompt_seeds(8, 0, 4, SEEN_STREAM))


def test_evaluate_with_tiny_pipeline_and_clip(tmp_path):
    torch.manual_seed(0)
    pipe = MusePipeline.from_preset("tiny", seed=0)
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=4, size=64, holdout_fraction=0.2)
    _tiny_clip(tmp_path)

    def generate(prompts, seed):
        return pipe(prompts, steps=2, guidance_scale=2.0, seed=seed, superres=False)

    report = evaluate(generate, pipe, str(corpus), str(tmp_path / "out"), n_seen=4, clip_path=str(tmp_path / "clip"),
                      reference_images=4, ceiling_images=8)
    assert set(report["psnr_db"]) == {"vqgan_lo", "vqgan_hi"}
    # The tokenizers judged on scenes of the corpus's pairings and, apart, of its held-out ones.
    for key in ("tokenizer_ceiling", "tokenizer_ceiling_held_out"):
        assert set(report[key]) == {"vqgan_lo", "vqgan_hi"}
        assert report[key]["vqgan_lo"]["reconstructions"]["n"] == 8
    assert all(np.isfinite(v) for v in report["psnr_db"].values())
    assert 0.0 <= report["masked_token_accuracy"]["base"] <= 1.0 and "superres" in report["masked_token_accuracy"]
    assert report["clip"]["n"] == 4 + len(json.loads((corpus / "holdout.json").read_text())["eval_captions"])
    assert np.isfinite(report["clip"]["clip_score"]) and "fid_clip_features" not in report["clip"]


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


def test_ceiling_images_can_be_limited_to_some_pairings():
    """report.json judges the tokenizers on scenes of the corpus's pairings and of the held-out ones apart."""
    from muse.data.synthetic import parse_caption
    from muse.evaluate import heldout_images

    pairs = [("red", "circle"), ("blue", "square")]
    samples = heldout_images(30, 64, grid=8, pairs=pairs)
    drawn = {(g.color, g.shape) for text, _ in samples for g in parse_caption(text).groups}
    assert drawn == set(pairs)
    assert [t for t, _ in heldout_images(5, 64)] == [t for t, _ in heldout_images(5, 64, pairs=None)]


# -- FID and CLIP score on real corpora ----------------------------------------------------------

def test_frechet_distance_matches_the_closed_form_for_non_commuting_covariances():
    rng = np.random.default_rng(1)
    d = 3
    qa, qb = np.linalg.qr(rng.normal(size=(d, d)))[0], np.linalg.qr(rng.normal(size=(d, d)))[0]
    sa, sb = qa @ np.diag([1.0, 2.0, 3.0]) @ qa.T, qb @ np.diag([0.5, 4.0, 1.5]) @ qb.T
    a = rng.multivariate_normal(np.zeros(d), sa, size=20_000)
    b = rng.multivariate_normal(np.ones(d), sb, size=20_000)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Ca Cb)^1/2) from the eigenvalues of the product (real and >= 0 for PSD matrices).
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(ca + cb) - 2 * np.sqrt(
        np.linalg.eigvals(ca @ cb).real).sum()
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def _noise_images(n, seed, shift=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(np.clip(rng.integers(0, 160, (32, 32, 3)) + shift, 0, 255).astype(np.uint8))
            for _ in range(n)]


def test_fid_with_a_local_clip_vision_model(tmp_path):
    from muse.fid import features, load_feature_net

    net = load_feature_net(_tiny_clip_vision(tmp_path))
    images = _noise_images(48, seed=0)
    f = features(net, images, batch=16)
    assert f.shape == (48, 16) and net.name == "clip:vision"
    assert abs(frechet_distance(f, features(net, images))) < 1e-6
    other = frechet_distance(f, features(net, _noise_images(48, seed=1)))  # same distribution
    shifted = frechet_distance(f, features(net, _noise_images(48, seed=1, shift=90)))
    assert shifted > 3 * other > 0


def test_torchscript_feature_net_gets_uint8_images_and_return_features(tmp_path):
    from muse.fid import features, load_feature_net

    class Inceptionish(torch.nn.Module):
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            assert x.dtype == torch.uint8 and return_features
            return x.float().mean(dim=(2, 3))

    torch.jit.script(Inceptionish()).save(str(tmp_path / "net.pt"))
    net = load_feature_net(str(tmp_path / "net.pt"))
    assert features(net, _noise_images(4, seed=0)).shape == (4, 3)
    with pytest.raises(ValueError, match="TorchScript"):
        load_feature_net(str(tmp_path / "missing.pt"))


def test_fid_refuses_small_n_and_says_why(tmp_path):
    from muse.evaluate import main
    from muse.fid import check_n

    with pytest.raises(ValueError, match=r"n=100 is below 500: .*rank-deficient.*--allow-small-n"):
        check_n(100)
    check_n(100, allow_small_n=True)
    check_n(500)
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=4, size=32, holdout_fraction=0.0)
    # Refused before the model root is even opened (a missing root would be another message).
    with pytest.raises(SystemExit) as exit_:
        main(["--checkpoint", str(tmp_path / "nowhere"), "--corpus", str(corpus), "--corpus-format", "parquet",
              "--out", str(tmp_path / "out"), "--n", "100", "--clip", "x"])
    assert exit_.value.code == 2


@pytest.mark.parametrize("format", ["parquet", "folder"])
def test_corpus_eval_prompts_are_corpus_captions_and_scores_are_finite(tmp_path, format, monkeypatch):
    import pyarrow.parquet as pq

    from muse import fid
    from muse.eval_corpus import CorpusEvalConfig, evaluate_corpus
    from muse.evaluate import load_clip
    from muse.fid import load_feature_net

    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=12, size=32, format=format)
    if format == "parquet":
        captions = {c for f in corpus.glob("*.parquet") for c in pq.read_table(f)["caption"].to_pylist()}
    else:
        captions = {f.read_text() for f in corpus.rglob("*.txt")}
    seen = []

    side = 16  # what the model draws; the corpus's images are 32 px

    def generate(prompts, seed):
        seen.extend(prompts)
        return [im.resize((side, side)) for im in _noise_images(len(prompts), seed[0])]

    cfg = CorpusEvalConfig(n=10, allow_small_n=True, batch=4)
    net = load_feature_net(_tiny_clip_vision(tmp_path))
    sizes = []
    features = fid.features

    def recording(net, images):  # the images the feature network sees, generated and corpus
        sizes.append({im.size for im in images})
        return features(net, images)

    monkeypatch.setattr(fid, "features", recording)
    report, rows = evaluate_corpus(generate, str(corpus), cfg, feature_net=net, clip=load_clip(_tiny_clip(tmp_path)),
                                   side=side)
    assert sizes == [{(side, side)}, {(side, side)}]  # the corpus's images at the generated side
    assert len(seen) == 10 and len(set(seen)) == 10 and set(seen) <= captions
    assert [r["prompt"] for r in rows] == seen
    assert report["n"] == 10 and report["comparable"] is False and "not comparable" in report["note"]
    assert np.isfinite(report["fid"]["value"]) and report["fid"]["dim"] == 16
    assert all(np.isfinite(v) for v in report["clip_score"].values())
    with pytest.raises(ValueError, match="gave only 12 usable"):
        evaluate_corpus(generate, str(corpus), CorpusEvalConfig(n=20, allow_small_n=True),
                        clip=load_clip(str(tmp_path / "clip")))
    with pytest.raises(ValueError, match="--fid-net"):
        evaluate_corpus(generate, str(corpus), cfg)


def test_muse_eval_cli_on_a_real_corpus(tmp_path):
    from muse.evaluate import main

    MusePipeline.from_preset("tiny", seed=0).save_pretrained(str(tmp_path / "root"))
    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=6, size=32, holdout_fraction=0.0)
    main(["--checkpoint", str(tmp_path / "root"), "--corpus", str(corpus), "--corpus-format", "parquet",
          "--out", str(tmp_path / "out"), "--n", "6", "--allow-small-n", "--clip", _tiny_clip(tmp_path),
          "--fid-net", _tiny_clip_vision(tmp_path), "--device", "cpu", "--dtype", "float32",
          "--steps", "2", "--no-superres", "--batch", "3"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["n"] == 6 and report["comparable"] is False and report["device"] == "cpu"
    assert report["settings"] | {"checkpoint": None} == {  # what made the images, to compare runs by
        "checkpoint": None, "seed": 0, "steps": 2, "superres_steps": None, "guidance_scale": 3.0, "superres": False,
        "device": "cpu", "dtype": "float32", "batch": 3}
    assert report["fid"]["features"] == "clip:vision" and np.isfinite(report["fid"]["value"])
    assert np.isfinite(report["clip_score"]["generated"]) and (tmp_path / "out" / "grid.png").exists()
    assert torch.is_grad_enabled()  # main() leaves the calling program's autograd as it found it


def test_a_corpus_of_uneven_parts_gives_every_row_asked_for(tmp_path):
    """Parts of 12 and 2 rows hold 14: n = 12 is drawn (the first pass takes up to a share per part,
    the second the rest of the big one), and the draw does not depend on anything but the seed."""
    from muse.eval_corpus import corpus_samples

    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=14, size=32, holdout_fraction=0.0, shard_size=12)
    drawn = corpus_samples(str(corpus), 12, seed=3)
    assert len(drawn) == 12 and len({c for c, _ in drawn}) >= 8
    assert [c for c, _ in corpus_samples(str(corpus), 12, seed=3)] == [c for c, _ in drawn]
    with pytest.raises(ValueError, match="gave only 14 usable"):
        corpus_samples(str(corpus), 15)


def test_token_accuracy_counts_copies_of_a_code_as_one_class():
    """A model that reads codes through code vectors draws one code per class; a target that is a copy
    of it is a hit, as in training."""
    import random
    from dataclasses import replace

    from muse.evaluate import token_accuracy
    from muse.transformer import MaskedTransformer

    pipe = MusePipeline.from_preset("tiny", seed=0)
    cfg = replace(pipe.base.config, code_dim=4)
    pipe.base = MaskedTransformer(cfg).eval()
    pipe.base.embed.set_code_vectors(torch.ones(cfg.codebook_size, 4))  # every code a copy of code 0
    captions = ("a red circle", "two blue squares on the left and a green triangle on the right")
    samples = [(c, render(parse_caption(c), 64, random.Random(i))) for i, c in enumerate(captions)]
    assert token_accuracy(pipe, samples)["base"] == 1.0  # it can only draw code 0, the class of every target


def test_muse_eval_bad_input_is_one_line_and_exit_code_2(tmp_path, capsys):
    """Ordinary mistakes say what is wrong in one line, with no traceback, and nothing is written
    (a CLIP folder being loaded may log beside it)."""
    from muse.evaluate import main

    root = tmp_path / "root"
    MusePipeline.from_preset("tiny", seed=0).save_pretrained(str(root))
    synthetic, real = tmp_path / "synthetic", tmp_path / "real"
    write_corpus(str(synthetic), n=4, size=32, holdout_fraction=0.2)
    write_corpus(str(real), n=4, size=32, holdout_fraction=0.0)
    small = ["--corpus", str(real), "--corpus-format", "parquet", "--allow-small-n"]
    clip = _tiny_clip(tmp_path)
    capsys.readouterr()  # what building the tiny CLIP logs
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--corpus", str(synthetic)], "no checkpoint at"),
        (["--checkpoint", str(root), "--corpus", str(tmp_path / "missing")], "no such file or directory"),
        (["--checkpoint", str(root), *small, "--n", "4", "--fid-net", "/nonexistent.pt"], "no feature network"),
        (["--checkpoint", str(root), *small, "--n", "1", "--clip", clip], "n must be >= 2"),
        (["--checkpoint", str(root), *small, "--n", "4", "--clip", "x"], "--clip x: no such folder"),
        (["--checkpoint", str(root), "--corpus", str(synthetic), "--clip", "x"], "--clip x: no such folder"),
        (["--checkpoint", str(root), "--clip", clip], "--clip scores images against a corpus's captions"),
        (["--checkpoint", str(root), *small, "--n", "4", "--clip", clip, "--batch", "0"], "--batch must be >= 1"),
        (["--checkpoint", str(root), "--corpus", str(synthetic), "--guidance", "-2"], "--guidance must be"),
        (["--checkpoint", str(root), *small, "--n", "4", "--clip", clip, "--n-seen", "3"],
         "--n-seen applies to a synthetic corpus"),
        (["--checkpoint", str(root), "--corpus", str(real), "--corpus-format", "folder", "--allow-small-n",
          "--n", "4", "--clip", clip], "--corpus-format folder"),
        (["--checkpoint", str(root), *small, "--n", "6", "--clip", clip], "gave only 4 usable"),
        (["--checkpoint", str(root), "--corpus", str(synthetic), "--steps", "0"], "--steps must be >= 1"),
        # Real-corpus flags on the synthetic corpus would be ignored: refused, naming them.
        (["--checkpoint", str(root), "--corpus", str(synthetic), "--fid-net", "/nonexistent.pt", "--n", "16"],
         "--fid-net, --n apply to a real corpus, and " + str(synthetic) + " is a synthetic one"),
        (["--checkpoint", str(root), "--corpus", str(real), "--allow-small-n"], "--allow-small-n apply to a real"),
    ]
    for argv, said in cases:
        with pytest.raises(SystemExit) as exit_:
            main([*argv, "--out", str(tmp_path / "out"), "--device", "cpu"])
        err = capsys.readouterr().err
        assert exit_.value.code == 2, (argv, err)
        said_lines = [line for line in err.splitlines() if line.startswith("muse eval: error: ")]
        assert len(said_lines) == 1 and said in said_lines[0] and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as exit_:  # a device this PyTorch cannot use: before the root loads
        main(["--checkpoint", str(root), "--corpus", str(synthetic), "--out", str(tmp_path / "out"),
              "--device", "cuda:7"])
    assert exit_.value.code == 2 and "--device cuda:7" in capsys.readouterr().err


def test_a_late_failure_keeps_the_sections_measured_before_it(tmp_path, monkeypatch):
    """The judge's verdicts (the slow part) survive a section after them that fails."""
    import muse.evaluate as ev

    corpus = tmp_path / "corpus"
    write_corpus(str(corpus), n=4, size=64, holdout_fraction=0.2)

    def broken(*args, **kwargs):
        raise RuntimeError("the CLIP folder is broken")

    monkeypatch.setattr(ev, "load_clip", broken)
    with pytest.raises(RuntimeError, match="broken") as raised:
        evaluate(_oracle, None, str(corpus), str(tmp_path / "out"), n_seen=4)
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["judge"]["seen"]["n"] == 4 and saved["error"] == "RuntimeError: the CLIP folder is broken"
    assert (tmp_path / "out" / "grid.png").exists()
    assert any("report.json holds the sections" in note for note in raised.value.__notes__)


def test_superres_token_accuracy_reads_native_renders_and_nothing_is_upsampled(tmp_path, monkeypatch):
    """Every image a tokenizer encodes is drawn at its resolution or above: super-res's targets are
    tokens of a 128 px render, not of a 64 px one upsampled."""
    import muse.evaluate as ev

    pipe = MusePipeline.from_preset("tiny", seed=0)
    sizes: list[tuple[int, int]] = []
    real = ev.pil_to_tensor

    def spy(image, size):
        sizes.append((image.size[0], size))
        return real(image, size)

    monkeypatch.setattr(ev, "pil_to_tensor", spy)
    report = evaluate(_oracle, pipe, None, str(tmp_path / "out"), reference_images=2, ceiling_images=2)
    assert "superres" in report["masked_token_accuracy"]
    assert (128, 128) in sizes and not [s for s in sizes if s[0] < s[1]], sizes
