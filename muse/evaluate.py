"""`muse eval`: how good is a model root?

- Synthetic corpus (a `holdout.json` beside it): generate images for prompts built from seen
  (color, shape) pairings and for the held-out ones, and score each with the attribute judge
  (muse/judge.py), separately for seen and held-out prompts.
- VQGAN reconstruction PSNR on images the tokenizers never trained on.
- Masked-token accuracy of the base (and super-res) transformer at a fixed mask rate.
- Real corpora (Parquet, image folder or WebDataset; local or s3://): the model draws one image per
  caption of --n corpus rows (default 2,000; below 500 it refuses: FID is not a measurement there),
  scored by FID against those rows' own images and by CLIP score against their captions
  (muse/eval_corpus.py). FID needs --fid-net: a TorchScript feature network such as NVlabs'
  inception-2015-12-05.pt (Inception FID, the one papers report) or a local Hugging Face CLIP
  folder (FID in CLIP space, not comparable with Inception FID). CLIP score needs --clip, a local
  Hugging Face CLIP folder (a full CLIPModel with its tokenizer). Nothing is ever downloaded.

Writes `report.json` and a PNG grid (prompt -> image) into `--out`.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import random
from typing import Callable, Sequence

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from muse import storage
from muse.data.images import pil_to_tensor
from muse.data.synthetic import all_pairs, caption, parse_caption, render, sample_scene
from muse.fid import clip_pixels
from muse.judge import find_blobs, judge, judge_blobs, summarize
from muse.masking import mask_tokens

# (prompts, one seed per prompt) -> one image per prompt, each drawn as a request of its own with its seed
Generate = Callable[[list[str], list[int]], list[Image.Image]]

# Which evaluation draws a seed stream (`prompt_seeds`): prompts of different sets never share one.
SEEN_STREAM, HELD_OUT_STREAM, CORPUS_STREAM = 1, 2, 3
DEFAULT_N_SEEN = 16  # seen-pairing prompts `muse eval` judges


def prompt_seeds(seed: int, first: int, n: int, stream: int) -> list[int]:
    """The request seeds of prompts first .. first + n - 1 of an evaluation set: derived from (seed,
    index, stream) as `sampling.image_seed` derives an image's, so an image depends on neither how the
    set is cut into calls nor on other seeds' runs, and `muse generate --seed S` redraws it."""
    from muse.sampling import image_seed

    return [image_seed(seed, first + i, stream) % 2**53 for i in range(n)]
DEFAULT_BATCH = 16  # real corpus: prompts per generation call


def read_holdout(corpus: str) -> dict:
    path = storage.join(corpus, "holdout.json")
    if not storage.exists(path):
        raise ValueError(f"{corpus} has no holdout.json: is it a synthetic corpus written by `muse synth`?")
    return json.loads(storage.read_text(path))


def training_pairs(holdout: dict) -> list[tuple[str, str]]:
    """The (color, shape) pairings a corpus with this holdout.json draws: every one not held out."""
    held = {tuple(p) for p in holdout.get("pairs", [])}
    return [p for p in all_pairs() if p not in held]


def seen_prompts(holdout: dict, n: int, seed: int = 0) -> list[str]:
    """n captions that use only training pairings (never a held-out one)."""
    allowed = training_pairs(holdout)
    rng = random.Random(f"muse-eval-seen:{seed}")
    return [caption(sample_scene(rng, allowed)) for _ in range(n)]


def judge_prompts(generate: Generate, prompts: Sequence[str], seed: int, stream: int, batch: int = 8,
                  desc: str = "judging") -> list[dict]:
    """Generate one image per prompt (seeded by `prompt_seeds`) and judge it. Returns rows with prompt,
    seed, verdict and image."""
    rows = []
    for start in tqdm(range(0, len(prompts), batch), desc=desc, unit="batch", disable=None):  # no bar in logs
        chunk = list(prompts[start:start + batch])
        seeds = prompt_seeds(seed, start, len(chunk), stream)
        for prompt, request_seed, image in zip(chunk, seeds, generate(chunk, seeds)):
            rows.append({"prompt": prompt, "seed": request_seed, "image": image, "verdict": judge(image, prompt)})
    return rows


def chance_level(rows: list[dict]) -> dict[str, float]:
    """The same images judged against every other prompt of the set: what images that ignore their
    prompts score, given what this model draws (not against a neighbour: sets list a pairing's
    prompts together, so the next prompt often shares the colour and shape)."""
    scenes = {p: parse_caption(p) for p in dict.fromkeys(r["prompt"] for r in rows)}
    verdicts = []
    for row in rows:
        blobs = find_blobs(row["image"])  # read once, judged against each other prompt
        verdicts += [judge_blobs(blobs, scene) for p, scene in scenes.items() if p != row["prompt"]]
    return summarize(verdicts)


def judge_sets(generate: Generate, holdout: dict, n_seen: int, seed: int, label: str = "",
               n_held_out: int | None = None) -> tuple[dict, list[dict]]:
    """Judge seen-pairing prompts and the held-out ones (all of them, or the first n_held_out):
    (summary for report.json, rows)."""
    seen = judge_prompts(generate, seen_prompts(holdout, n_seen, seed), seed, SEEN_STREAM,
                         desc=f"{label}seen prompts")
    held = judge_prompts(generate, holdout.get("eval_captions", [])[:n_held_out], seed, HELD_OUT_STREAM,
                         desc=f"{label}held-out prompts")
    summary = {
        "seen": summarize([r["verdict"] for r in seen]),
        "held_out": summarize([r["verdict"] for r in held]),
        "chance": {"seen": chance_level(seen), "held_out": chance_level(held)},
        "held_out_pairs": holdout.get("pairs", []),
        "prompts": [{"prompt": r["prompt"], "set": s, "seed": r["seed"], **r["verdict"].as_dict()}
                    for s, group in (("seen", seen), ("held_out", held)) for r in group],
    }
    return summary, seen + held


def image_grid(rows: list[dict], cell: int = 128, columns: int = 4) -> Image.Image:
    """Prompt -> image grid with the prompt and the judge's verdict under each image."""
    text_h = 40
    count = max(len(rows), 1)
    cols = min(columns, count)
    grid = Image.new("RGB", (cols * cell, math.ceil(count / cols) * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, row in enumerate(rows):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(row["image"].convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
        words, lines = row["prompt"].split(), [""]
        for w in words:  # wrap at ~cell/6 characters
            if len(lines[-1]) + len(w) + 1 > cell // 6:
                lines.append("")
            lines[-1] = f"{lines[-1]} {w}".strip()
        mark = "" if "verdict" not in row else " [ok]" if row["verdict"].correct else " [x]"
        draw.text((x + 2, y + cell + 1), "\n".join(lines[:2]) + mark, fill="black")
    return grid


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def heldout_images(n: int, size: int, seed: int = 10_000, grid: int = 0,
                   pairs: Sequence[tuple[str, str]] | None = None,
                   layout: str = "scattered") -> list[tuple[str, Image.Image]]:
    """Fresh synthetic samples (a seed no corpus uses by default) with their captions, laid out as a
    corpus written with `grid` (0: free placement) and `layout`, drawing only `pairs` (default: every
    pairing)."""
    rng = random.Random(f"muse-eval-images:{seed}")
    out = []
    for _ in range(n):
        scene = sample_scene(rng, pairs)
        out.append((caption(scene), render(scene, size, rng, grid, layout)))
    return out


@torch.no_grad()
def tokenizer_ceiling(vqgan, samples: list[tuple[str, Image.Image]], batch: int = 32) -> dict:
    """The attribute judge on the tokenizer's reconstructions (encode, then decode) next to the same
    images resized to the tokenizer's resolution without it: what any transformer trained on these
    tokens can at best draw. samples: (caption, image) pairs."""
    from muse.data.images import tensor_to_pil

    size = vqgan.config.resolution
    originals, recons = [], []
    for start in range(0, len(samples), batch):
        chunk = samples[start:start + batch]
        x = torch.stack([pil_to_tensor(img, size) for _, img in chunk])
        p = next(vqgan.parameters())
        y = vqgan.decode(vqgan.encode(x.to(p.device, p.dtype))).float().cpu()
        for (text, _), a, b in zip(chunk, x, y):
            originals.append(judge(tensor_to_pil(a), text))
            recons.append(judge(tensor_to_pil(b), text))
    return {"resolution": size, "reconstructions": summarize(recons), "originals": summarize(originals)}


@torch.no_grad()
def reconstruction_psnr(vqgan, images: list[Image.Image]) -> float:
    p = next(vqgan.parameters())
    x = torch.stack([pil_to_tensor(img, vqgan.config.resolution) for img in images])
    return psnr(x, vqgan.decode(vqgan.encode(x.to(p.device, p.dtype))).float().cpu())


@torch.no_grad()
def token_accuracy(pipe, samples: list[tuple[str, Image.Image]], mask_rate: float = 0.5, seed: int = 0,
                   hi_samples: list[tuple[str, Image.Image]] | None = None) -> dict:
    """Masked-token accuracy of the base (and super-res) model at a fixed mask rate. Super-res is
    measured on `hi_samples` (default `samples`): images at vqgan_hi's resolution, so its targets are
    tokens of a native render, not of an upsampled one; its low-res tokens are those images
    downsampled, as tokenizing a corpus makes them."""
    from muse.losses import masked_token_accuracy

    g = torch.Generator().manual_seed(seed)

    def ids(vqgan, images: list[tuple[str, Image.Image]]) -> torch.Tensor:  # on the CPU, where `g` lives
        p = next(vqgan.parameters())
        img = torch.stack([pil_to_tensor(im, vqgan.config.resolution) for _, im in images])
        return vqgan.encode(img.to(p.device, p.dtype)).flatten(1).cpu()

    def accuracy(model, ids: torch.Tensor, ctx) -> float:
        masked, mask = mask_tokens(ids, torch.full((len(ids),), mask_rate), model.mask_token_id, g)
        logits = model(masked.to(pipe.device), ctx).float()
        # Copies of a code are one class to a code-vector model; a model without classes (aMUSEd's
        # U-ViT) scores the ids themselves.
        classes = getattr(model.embed, "classes", None)
        targets = ids.to(pipe.device) if classes is None else classes(ids.to(pipe.device))
        return masked_token_accuracy(logits, targets, mask.to(pipe.device)).item()

    def condition(images: list[tuple[str, Image.Image]]) -> tuple[torch.Tensor, torch.Tensor]:
        cond = pipe.encode_prompts([c for c, _ in images])
        return cond.embeddings.to(next(pipe.base.parameters()).dtype), cond.mask

    emb, mask = condition(samples)
    lo = ids(pipe.vqgan_lo, samples)
    out = {"mask_rate": mask_rate, "base": accuracy(pipe.base, lo, pipe.base.encode_context(emb, mask))}
    if pipe.superres is not None and pipe.vqgan_hi is not None:
        if hi_samples is not None:
            emb, mask = condition(hi_samples)
            lo = ids(pipe.vqgan_lo, hi_samples)
        ctx = pipe.superres.encode_context(emb, mask, lo.to(pipe.device))
        out["superres"] = accuracy(pipe.superres, ids(pipe.vqgan_hi, hi_samples or samples), ctx)
    return out


# -- CLIP score (user-supplied CLIP weights only) -------------------------------------------------

def load_clip(path: str | None, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local Hugging Face CLIP directory; None if no path is given."""
    if not path:
        return None
    from transformers import AutoTokenizer, CLIPModel

    try:
        return CLIPModel.from_pretrained(path, local_files_only=True).to(device, dtype).eval(), \
            AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"--clip {path!r} is not a local Hugging Face CLIP model directory ({e})") from e


@torch.no_grad()
def clip_features(clip, images: list[Image.Image], prompts: list[str] | None = None):
    """(image features, text features or None) as float32 on the CPU."""
    model, tokenizer = clip
    p = next(model.parameters())
    pixels = clip_pixels(images, model.config.vision_config.image_size).to(p.device, p.dtype)
    img = model.get_image_features(pixel_values=pixels)
    img = getattr(img, "pooler_output", img).float().cpu()  # some transformers versions return the output object
    if prompts is None:
        return img, None
    tok = tokenizer(list(prompts), padding=True, truncation=True, return_tensors="pt").to(p.device)
    txt = model.get_text_features(**tok)
    return img, getattr(txt, "pooler_output", txt).float().cpu()


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> float:
    """Mean of 100 * max(cos(image, text), 0) (Hessel et al. 2021, w = 1... scaled by 100)."""
    cos = torch.nn.functional.cosine_similarity(image_features, text_features, dim=-1)
    return float((100 * cos.clamp(min=0)).mean())


# -- the command ------------------------------------------------------------------------------------

def evaluate(generate: Generate, pipe, corpus: str | None, out: str, *, n_seen: int = 16, seed: int = 0,
             clip_path: str | None = None, reference_images: int = 32, base_generate: Generate | None = None,
             ceiling_images: int = 200, n_held_out: int | None = None, settings: dict | None = None) -> dict:
    """Run every evaluation that applies and write report.json + grid.png into `out`; `settings` (what
    made the images: the root, steps, guidance, seed, device) head the report.
    `base_generate` (images from the base stage alone) adds `judge_base` and grid_base.png, so a
    weak super-res stage cannot hide what the base model draws. A section that fails still leaves
    report.json with the sections before it (and "error" saying what stopped it), then raises:
    judging is the slow part, and is not lost to a later failure."""
    report: dict = {}
    head = {"settings": settings} if settings else {}
    rows: list[dict] = []
    base_rows: list[dict] = []
    try:
        _measure(report, rows, base_rows, generate, pipe, corpus, n_seen=n_seen, seed=seed, clip_path=clip_path,
                 reference_images=reference_images, base_generate=base_generate, ceiling_images=ceiling_images,
                 n_held_out=n_held_out)
    except Exception as e:
        if report:  # something was measured: keep it, saying what stopped the rest
            report["error"] = f"{type(e).__name__}: {e}"
            write_report(out, head | report, rows, base_rows)
            e.add_note(f"{storage.join(out, 'report.json')} holds the sections measured before it")
        raise
    report = head | report
    write_report(out, report, rows, base_rows)
    return report


def _measure(report: dict, rows: list[dict], base_rows: list[dict], generate: Generate, pipe, corpus: str | None,
             *, n_seen: int, seed: int, clip_path: str | None, reference_images: int, base_generate: Generate | None,
             ceiling_images: int, n_held_out: int | None) -> None:
    """`evaluate`'s sections, each adding its entry to `report` (and the judged images to `rows` and
    `base_rows`, for the grids) as it ends."""
    holdout: dict = {}
    if corpus is not None:
        holdout = read_holdout(corpus)
        report["judge"], judged = judge_sets(generate, holdout, n_seen, seed, n_held_out=n_held_out)
        rows.extend(judged)
        if base_generate is not None:
            report["judge_base"], judged = judge_sets(base_generate, holdout, n_seen, seed, label="base: ",
                                                      n_held_out=n_held_out)
            base_rows.extend(judged)
    # The corpus's layout, so the tokenizers are judged on images like those they learnt.
    corpus_layout = {"grid": holdout.get("grid", 0), "layout": holdout.get("layout", "scattered")}
    if pipe is not None:
        samples = heldout_images(reference_images, pipe.vqgan_lo.config.resolution, **corpus_layout)
        report["psnr_db"] = {"vqgan_lo": reconstruction_psnr(pipe.vqgan_lo, [im for _, im in samples])}
        hi = None
        if pipe.vqgan_hi is not None:
            hi = heldout_images(reference_images, pipe.vqgan_hi.config.resolution, **corpus_layout)
            report["psnr_db"]["vqgan_hi"] = reconstruction_psnr(pipe.vqgan_hi, [im for _, im in hi])
        report["masked_token_accuracy"] = token_accuracy(pipe, samples, seed=seed, hi_samples=hi)
        # Judged on scenes of the pairings the corpus has (what the transformers learn from) and,
        # apart, of the held-out ones, which the tokenizers never saw either.
        held = sorted(tuple(p) for p in holdout.get("pairs", []))
        sets = {"tokenizer_ceiling": training_pairs(holdout)}  # every pairing without a corpus
        if held:
            sets["tokenizer_ceiling_held_out"] = held
        tokenizers = [(n, vq) for n, vq in (("vqgan_lo", pipe.vqgan_lo), ("vqgan_hi", pipe.vqgan_hi)) if vq is not None]
        side = max([128] + [vq.config.resolution for _, vq in tokenizers])  # downsampled for each, never up
        for key, pairs in sets.items():
            judged = heldout_images(ceiling_images, side, seed=seed + 55, pairs=pairs, **corpus_layout)
            report[key] = {name: tokenizer_ceiling(vq, judged) for name, vq in tokenizers}
    # No FID here: a few dozen judged images are far too few (see muse/eval_corpus.py).
    clip = load_clip(clip_path, device=pipe.device if pipe is not None else "cpu")
    if clip is None:
        report["clip"] = "skipped: pass --clip DIR (a local Hugging Face CLIP model) for CLIP score"
    elif rows:
        img_f, txt_f = clip_features(clip, [r["image"] for r in rows], [r["prompt"] for r in rows])
        report["clip"] = {"clip_score": clip_score(img_f, txt_f), "n": len(rows)}


def write_report(out: str, report: dict, rows: list[dict], base_rows: list[dict]) -> None:
    """report.json, and grid.png / grid_base.png for the judged rows there are."""
    storage.makedirs(out)
    storage.write_text(storage.join(out, "report.json"), json.dumps(report, indent=1))
    for name, grid_rows in (("grid.png", rows), ("grid_base.png", base_rows)):
        if grid_rows:
            buf = io.BytesIO()
            image_grid(grid_rows).save(buf, format="PNG")
            storage.write_bytes(storage.join(out, name), buf.getvalue())


def pipeline_generator(pipe, *, steps: int, superres_steps: int, guidance_scale: float, superres: bool) -> Generate:
    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        return pipe(prompts, steps=steps, superres_steps=superres_steps, guidance_scale=guidance_scale,
                    seed=list(seeds), superres=superres)
    return generate


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype]:
    """'auto': CUDA when present; bf16 there, fp32 on the CPU."""
    from muse.devices import checked_device

    dev = checked_device("cuda" if device == "auto" and torch.cuda.is_available() else
                         "cpu" if device == "auto" else device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


def main(argv: list[str] | None = None) -> None:
    from muse.eval_corpus import corpus_formats
    from muse.fid import DEFAULT_N, FEATURE_NET_HELP, MIN_N

    parser = argparse.ArgumentParser(prog="muse eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="model root (local or s3://)")
    parser.add_argument("--corpus", help="a synthetic corpus (with holdout.json) for the attribute judge, "
                                         "or a real corpus for FID / CLIP score")
    parser.add_argument("--corpus-format", choices=("synthetic", *corpus_formats()), default="auto",
                        help="auto: synthetic when the corpus has holdout.json, else detected from its files")
    parser.add_argument("--out", required=True, help="directory for report.json and grid.png")
    parser.add_argument("--n-seen", type=int, default=DEFAULT_N_SEEN,
                        help=f"synthetic: seen-pairing prompts to judge (default {DEFAULT_N_SEEN})")
    parser.add_argument("--n", type=int, default=DEFAULT_N,
                        help=f"real corpus: captions to draw and corpus images to compare with (>= {MIN_N})")
    parser.add_argument("--allow-small-n", action="store_true",
                        help=f"real corpus: run with n < {MIN_N} as a smoke test; the report says not comparable")
    parser.add_argument("--fid-net", help=f"real corpus: FID feature network, {FEATURE_NET_HELP}")
    parser.add_argument("--clip", help="local Hugging Face CLIP folder (CLIPModel + tokenizer) for CLIP score")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help="real corpus: prompts per generation call")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                        help="the model's transformers and VQGANs, and on a real corpus the CLIP and CLIP "
                             "feature networks (auto: bfloat16 on CUDA, float32 on CPU)")
    parser.add_argument("--steps", type=int, default=12,
                        help="base decoding steps (default 12; muse generate and muse serve decode 24, so give "
                             "--steps 24 to score the images they make)")
    parser.add_argument("--superres-steps", type=int, default=8, help="super-res decoding steps (default 8)")
    parser.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (default 3.0; generate and serve use 4)")
    parser.add_argument("--no-superres", action="store_true", help="evaluate base-resolution images")
    parser.add_argument("--seed", type=int, default=0, help="which prompts and images (default 0)")
    args = parser.parse_args(argv)
    try:
        cfg = _checked(args)
        device, dtype = resolve_device(args.device, args.dtype)
        with torch.no_grad():  # scoped: main() also runs inside other programs (tests, notebooks)
            _evaluate_root(args, cfg, device, dtype)
    except ValueError as e:  # bad input (CheckpointError is one): one clear line, not a traceback
        parser.exit(2, f"muse eval: error: {' '.join([str(e), *getattr(e, '__notes__', [])])}\n")
    except OSError as e:  # e.g. the disk filled up while writing
        parser.exit(1, f"muse eval: error: {e}\n")


def _checked(args: argparse.Namespace) -> CorpusEvalConfig | None:
    """The real corpus's config (None for a synthetic one); ValueError on bad arguments, before the
    model is loaded."""
    from muse.eval_corpus import CorpusEvalConfig
    from muse.fid import DEFAULT_N, FEATURE_NET_HELP, check_n

    for name, value in (("--steps", args.steps), ("--superres-steps", args.superres_steps), ("--batch", args.batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not args.guidance >= 0 or args.n_seen < 0:  # `not >=`: NaN too
        raise ValueError(f"--guidance must be a number >= 0 and --n-seen >= 0, got {args.guidance} and {args.n_seen}")
    if args.clip is not None and not storage.exists(args.clip):  # before minutes of judging
        raise ValueError(f"--clip {args.clip}: no such folder (a local Hugging Face CLIP folder)")
    if args.clip is not None and args.corpus is None:
        raise ValueError("--clip scores images against a corpus's captions: give --corpus")
    if args.corpus is not None and not storage.exists(args.corpus):
        raise ValueError(f"--corpus {args.corpus}: no such file or directory")
    fmt = args.corpus_format
    if args.corpus and fmt == "auto" and storage.exists(storage.join(args.corpus, "holdout.json")):
        fmt = "synthetic"
    if args.corpus is None or fmt == "synthetic":
        real_only = [flag for flag, given in (("--fid-net", args.fid_net), ("--allow-small-n", args.allow_small_n),
                                             ("--n", args.n != DEFAULT_N), ("--batch", args.batch != DEFAULT_BATCH))
                     if given]
        if real_only:  # they would be ignored: the synthetic judge reads none of them
            raise ValueError(f"{', '.join(real_only)} apply to a real corpus, and "
                             + (f"{args.corpus} is a synthetic one (it has holdout.json), scored by its attribute "
                                "judge (--n-seen prompts): leave them out, or give --corpus-format with the corpus's "
                                "format to score it as a real corpus" if args.corpus else "no --corpus was given"))
        return None
    if args.n_seen != DEFAULT_N_SEEN:
        raise ValueError("--n-seen applies to a synthetic corpus's attribute judge; a real corpus is scored on --n "
                         "of its captions")
    # A real corpus: fail on a bad n or missing networks before loading the model.
    cfg = CorpusEvalConfig(n=args.n, allow_small_n=args.allow_small_n, format=fmt, batch=args.batch, seed=args.seed)
    check_n(cfg.n, cfg.allow_small_n)
    if not (args.fid_net or args.clip):
        raise ValueError(f"a real corpus needs --fid-net ({FEATURE_NET_HELP}) and/or --clip (a local CLIP folder)")
    return cfg


def _evaluate_root(args, cfg: CorpusEvalConfig | None, device, dtype) -> None:
    """Generate from the root and score it: the real-corpus report when `cfg` is given, else the
    synthetic corpus's attribute judge."""
    from muse.pipeline import MusePipeline

    real = cfg is not None
    pipe = MusePipeline.from_pretrained(args.checkpoint).to(device, dtype)
    superres = not args.no_superres and pipe.superres is not None
    settings = {"checkpoint": args.checkpoint, "seed": args.seed, "steps": args.steps,
                "superres_steps": args.superres_steps if superres else None, "guidance_scale": args.guidance,
                "superres": superres, "device": str(device), "dtype": str(dtype).removeprefix("torch.")}
    gen = pipeline_generator(pipe, steps=args.steps, superres_steps=args.superres_steps,
                             guidance_scale=args.guidance, superres=superres)
    if real:
        from muse.eval_corpus import run

        side = (pipe.vqgan_hi if superres else pipe.vqgan_lo).config.resolution
        report = run(gen, args.corpus, cfg, args.out, fid_net=args.fid_net, clip_path=args.clip,
                     device=device, dtype=dtype, side=side, settings=settings | {"batch": cfg.batch})
        print(json.dumps(report, indent=1))
        print(f"wrote {storage.join(args.out, 'report.json')}")
        return
    base_gen = pipeline_generator(pipe, steps=args.steps, superres_steps=args.superres_steps,
                                  guidance_scale=args.guidance, superres=False) if superres else None
    report = evaluate(gen, pipe, args.corpus, args.out, n_seen=args.n_seen, seed=args.seed, clip_path=args.clip,
                      base_generate=base_gen, settings=settings)
    summary = {k: v for k, v in report.items() if k not in ("judge", "judge_base", "settings")}
    for key in ("judge", "judge_base"):
        if key in report:
            summary[key] = {k: report[key][k] for k in ("seen", "held_out", "chance")}
    print(json.dumps(summary, indent=1))
    print(f"wrote {storage.join(args.out, 'report.json')}")


if __name__ == "__main__":
    main()
