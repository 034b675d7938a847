"""`muse eval` on a real corpus: FID against the corpus's own images and CLIP score on its captions.

n (image, caption) pairs are drawn from the corpus (Parquet, image folder or WebDataset; local or
s3://), read in-process by the tokenize job's readers. The model draws one image per caption; FID
compares those images with the n corpus images (muse/fid.py), and the CLIP score compares each
image with its caption, next to the same score for the corpus images themselves (what the data
reaches). The report names the feature network, n, and whether n is large enough to compare.
"""

from __future__ import annotations

import math
import random
import tempfile
from dataclasses import dataclass

import torch
from PIL import Image
from tqdm import tqdm

from muse import fid
from muse.data.images import ImageRejected, decode_image, resize_center_crop


def corpus_formats() -> tuple[str, ...]:
    """The formats a real corpus may be read in: the tokenize job's readers' (`muse tokenize --format`)."""
    from pipelines.readers import formats  # the readers import Ray only in their Ray Data wrappers

    return formats()


@dataclass(frozen=True)
class CorpusEvalConfig:
    n: int = fid.DEFAULT_N  # generated images and reference images, each
    allow_small_n: bool = False  # below fid.MIN_N: a smoke run, reported as not comparable
    format: str = "auto"  # corpus format, as `muse tokenize --format`
    batch: int = 16  # prompts per generation call
    seed: int = 0  # which corpus rows, and the generation seeds
    max_caption_chars: int = 1024

    def __post_init__(self):
        if self.n < 2 or self.batch < 1:
            raise ValueError("n must be >= 2 and batch >= 1")
        if self.format not in corpus_formats():
            raise ValueError(f"format must be one of {corpus_formats()}, got {self.format!r}")


def corpus_samples(uri: str, n: int, *, seed: int = 0, format: str = "auto", max_caption_chars: int = 1024,
                   side: int | None = None) -> list[tuple[str, Image.Image]]:
    """n (caption, image) pairs from the corpus at `uri`. Parts are visited in a seeded order and each
    gives a seeded random subset of its usable rows, so the sample spans at least ~32 parts of a
    large corpus without reading all of it. Rows the tokenize job would reject are skipped. With
    `side`, each image is resized and centre-cropped to side x side as it is read."""
    from pipelines.config import ReaderConfig  # the readers import Ray only in their Ray Data wrappers
    from pipelines.readers import plan_parts

    cfg = ReaderConfig()
    with tempfile.TemporaryDirectory(prefix="muse-eval-plan-") as plan:  # a huge folder's part lists, on disk
        try:
            parts = plan_parts(uri, format, cfg, spill=plan)
        except FileNotFoundError as e:  # the readers' NoInput: no such format there, in this command's words
            raise ValueError(str(e).replace("--format", "--corpus-format")) from None
        return _samples(uri, parts, cfg, n, seed, max_caption_chars, side)


def _samples(uri: str, parts: list, cfg, n: int, seed: int, max_caption_chars: int,
             side: int | None) -> list[tuple[str, Image.Image]]:
    """Up to `per_part` rows from each part in a seeded order, then, where that was not n (parts of
    very different sizes), the rest of the parts that had more."""
    parts = list(parts)
    random.Random(f"muse-eval-corpus:{seed}").shuffle(parts)
    per_part = max(math.ceil(1.25 * n / len(parts)), math.ceil(n / 32))
    out: list[tuple[str, Image.Image]] = []
    more: list[tuple] = []  # (part, where its rows go on)
    for part in parts:
        stopped = _take(part, cfg, seed, max_caption_chars, side, out, n, start=0, limit=per_part)
        if len(out) == n:
            return out
        if stopped is not None:
            more.append((part, stopped))
    for part, start in more:
        _take(part, cfg, seed, max_caption_chars, side, out, n, start=start, limit=None)
        if len(out) == n:
            return out
    raise ValueError(f"{uri} gave only {len(out)} usable (image, caption) rows of the {n} asked for; "
                     f"lower --n (FID wants >= {fid.MIN_N})")


def _take(part, cfg, seed: int, max_caption_chars: int, side: int | None, out: list, n: int, *, start: int,
          limit: int | None) -> int | None:
    """Append the part's usable rows, in its seeded order from `start`, to `out` until it holds n or
    `limit` were added; returns where the part's rows go on, or None when none are left."""
    from pipelines.preprocess import clean_caption
    from pipelines.readers import read_part

    rows = [(raw_image, raw_caption) for block in read_part(part, cfg)
            for raw_image, raw_caption, reason, index in zip(
                block["image"].to_pylist(), block["caption"].to_pylist(),
                block["reject_reason"].to_pylist(), block["index"].to_pylist())
            if index >= 0 and not reason]
    random.Random(f"muse-eval-corpus:{seed}:{part.id}").shuffle(rows)
    kept = 0
    for position in range(start, len(rows)):
        raw_image, raw_caption = rows[position]
        text, why = clean_caption(raw_caption, max_caption_chars)
        if why:
            continue
        try:
            image = decode_image(raw_image)
        except ImageRejected:
            continue
        out.append((text, image if side is None else resize_center_crop(image, side)))
        kept += 1
        if len(out) == n:
            return None
        if kept == limit:
            return position + 1 if position + 1 < len(rows) else None
    return None


def generate_images(generate, prompts: list[str], seed: int, batch: int) -> list[Image.Image]:
    """One image per prompt, each seeded by its index (`evaluate.prompt_seeds`), whatever `batch` is."""
    from muse.evaluate import CORPUS_STREAM, prompt_seeds

    images: list[Image.Image] = []
    for start in tqdm(range(0, len(prompts), batch), desc="generating", unit="batch", disable=None):
        chunk = prompts[start:start + batch]
        images.extend(generate(chunk, prompt_seeds(seed, start, len(chunk), CORPUS_STREAM)))
    return images


@torch.no_grad()
def clip_scores(clip, images: list[Image.Image], prompts: list[str], batch: int = 64) -> float:
    """Mean CLIP score over (image, prompt) pairs, `batch` at a time."""
    from muse.evaluate import clip_features, clip_score

    pairs = [clip_features(clip, images[i:i + batch], prompts[i:i + batch]) for i in range(0, len(images), batch)]
    return clip_score(torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))


def evaluate_corpus(generate, uri: str, cfg: CorpusEvalConfig, *, feature_net: fid.FeatureNet | None = None,
                    clip=None, side: int | None = None) -> tuple[dict, list[dict]]:
    """FID and CLIP score of `generate` ((prompts, seed) -> images) against the corpus at `uri`:
    (report, the first 16 prompts with their images for a grid). `side`: the generated images' side;
    the corpus images are resized and centre-cropped to it as they are read, so FID compares images
    of one resolution (a photo larger than the model draws would look sharper to the feature network
    than any generated image can), and n of them fit in memory whatever the corpus's image sizes."""
    fid.check_n(cfg.n, cfg.allow_small_n)
    if feature_net is None and clip is None:
        raise ValueError(f"nothing to measure: FID needs --fid-net ({fid.FEATURE_NET_HELP}); "
                         "CLIP score needs --clip (a local Hugging Face CLIP folder)")
    samples = corpus_samples(uri, cfg.n, seed=cfg.seed, format=cfg.format, max_caption_chars=cfg.max_caption_chars,
                             side=side)
    prompts, reference = [c for c, _ in samples], [im for _, im in samples]
    images = generate_images(generate, prompts, cfg.seed, cfg.batch)
    report: dict = {"corpus": uri, "n": cfg.n, "comparable": cfg.n >= fid.MIN_N, "prompts": "corpus captions",
                    "reference_side": side}
    if not report["comparable"]:
        report["note"] = f"n < {fid.MIN_N} (--allow-small-n): a smoke run; FID at this n is not comparable"
    if feature_net is not None:
        gen_f, ref_f = fid.features(feature_net, images), fid.features(feature_net, reference)
        report["fid"] = {"value": fid.frechet_distance(gen_f, ref_f), "features": feature_net.name,
                         "dim": int(gen_f.shape[1])}
    else:
        report["fid"] = f"skipped: pass --fid-net ({fid.FEATURE_NET_HELP})"
    if clip is not None:
        report["clip_score"] = {"generated": clip_scores(clip, images, prompts),
                                "corpus_images": clip_scores(clip, reference, prompts)}
    else:
        report["clip_score"] = "skipped: pass --clip DIR (a local Hugging Face CLIP folder)"
    return report, [{"prompt": p, "image": im} for p, im in zip(prompts[:16], images[:16])]


def run(generate, uri: str, cfg: CorpusEvalConfig, out: str, *, fid_net: str | None, clip_path: str | None,
        device: torch.device, dtype: torch.dtype, side: int | None = None, settings: dict | None = None) -> dict:
    """Load the user's networks, evaluate (`side`: the generated images' side), and write report.json
    and grid.png into `out`."""
    import io
    import json

    from muse import storage
    from muse.evaluate import image_grid, load_clip

    fid.check_n(cfg.n, cfg.allow_small_n)  # before any loading
    net = fid.load_feature_net(fid_net, device, dtype) if fid_net else None
    clip = load_clip(clip_path, device, dtype)
    report, rows = evaluate_corpus(generate, uri, cfg, feature_net=net, clip=clip, side=side)
    report = ({"settings": settings} if settings else {}) | report | {"device": str(device),
                                                                       "dtype": str(dtype).removeprefix("torch.")}
    storage.makedirs(out)
    storage.write_text(storage.join(out, "report.json"), json.dumps(report, indent=1))
    buf = io.BytesIO()
    image_grid(rows).save(buf, format="PNG")
    storage.write_bytes(storage.join(out, "grid.png"), buf.getvalue())
    return report
