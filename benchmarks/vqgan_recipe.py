"""How fast a tiny tokenizer learns the demo's corpus: time per step and what its reconstructions keep,
for tokenizer forms side by side in one run, trained by the stage's own step (`jobs.vqgan.VQGANWorker`).

    python benchmarks/vqgan_recipe.py                          # 64 px: patch, patch-unseeded, plain
    python benchmarks/vqgan_recipe.py --size 128 --steps 2000 --forms patch
    python benchmarks/vqgan_recipe.py --grid 0 --forms plain   # shapes placed freely
    python benchmarks/vqgan_recipe.py --forms patch --set vqgan.optim.lr=1e-2

Forms (every one is 512 codes of 16 dims, f8, misfit-drawn restarts at threshold 0.3, no GAN; each
starts from `configs/demo.yaml`'s `vqgan` section and changes only what is listed):
  patch           the shipped `vqgan-tiny`/`vqgan-hi-tiny`: each 8x8 patch read and drawn on its own,
                  demo.yaml's schedule (lr, warm-up, cosine) and its autoencoder warm-up with
                  k-means++ seeding of the codebook (`quantizer_warmup_steps`)
  patch-unseeded  the same without the autoencoder warm-up and seeding
  plain           the tokenizer shipped before: strided conv stacks (width 32, no residual or
                  bottleneck blocks), whose tokens also see the neighbouring cells; lr 1e-3, no seeding
  resnet          the paper-size presets' form at tiny width (one residual block per level,
                  residual-attention-residual bottleneck), lr 1e-3, no seeding

Images are the demo corpus's: scenes rendered at --render px (128, as `make demo` writes them) and
reduced to the tokenizer's size as the pipeline does (`muse.data.images.pil_to_tensor`). Every
--every steps the attribute judge (`muse.judge`) reads reconstructions of 64 held-out scenes, upscaled
to 128 px when smaller: "colour", "shape" and "whole" (the share right in every attribute). The
ground-truth images score 1.00.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

import torch

from jobs.config import load_config
from jobs.parallel import WorkerEnv
from jobs.train_job import TrainJob
from jobs.vqgan import VQGANWorker
from muse.config import preset, to_dict
from muse.data.images import pil_to_tensor, tensor_to_pil
from muse.data.synthetic import GRID_LAYOUTS, all_pairs, caption, holdout_pairs, sample
from muse.judge import judge, summarize
from machine import describe  # benchmarks/machine.py

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
CONV = {"form": "conv", "base_channels": 32, "num_res_blocks": 0, "mid_block": False}
# form -> (model overrides, vqgan section overrides)
FORMS = {
    "patch": ({}, []),
    "patch-unseeded": ({}, ["vqgan.quantizer_warmup_steps=0"]),
    "plain": (CONV, ["vqgan.quantizer_warmup_steps=0", "vqgan.optim.lr=1e-3"]),
    "resnet": (CONV | {"num_res_blocks": 1, "mid_block": True},
               ["vqgan.quantizer_warmup_steps=0", "vqgan.optim.lr=1e-3"]),
}


def load_images(first: int, n: int, size: int, render: int, grid: int,
                pairs: list, layout: str = "scattered") -> tuple[list[str], torch.Tensor]:
    captions, images = [], []
    for i in range(first, first + n):
        scene, img = sample(i, 0, render, pairs, grid, layout)
        captions.append(caption(scene))
        images.append(pil_to_tensor(img, size))
    return captions, torch.stack(images)


def evaluate(worker: VQGANWorker, captions: list[str], images: torch.Tensor) -> dict[str, float]:
    model = worker.eval_vqgan()
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    mse = float(((recon - images) ** 2).mean())
    view = max(128, images.shape[-1])
    s = summarize([judge(tensor_to_pil(r).resize((view, view), 0), c) for r, c in zip(recon, captions)])
    return {"psnr": 10 * math.log10(4.0 / mse), "colour": s["color"], "shape": s["shape"], "whole": s["correct"]}


def run_form(form: str, args, train: torch.Tensor, held: tuple[list[str], torch.Tensor]) -> list[dict]:
    model_overrides, section_overrides = FORMS[form]
    name = "vqgan-tiny" if args.size == 64 else "vqgan-hi-tiny"
    model_cfg = replace(preset(name), resolution=args.size, **model_overrides)
    cfg = load_config(DEMO_CONFIG, section_overrides + args.set + [f"vqgan.run.max_steps={args.steps}",
                                                                   f"vqgan.run.batch_size={args.batch}"])
    section = cfg.vqgan
    job = TrainJob(root="", component="vqgan_lo" if args.size == 64 else "vqgan_hi", stage="vqgan",
                   model_config=to_dict(model_cfg), run_name=form)
    torch.manual_seed(args.seed)
    worker = VQGANWorker(section, job, WorkerEnv())
    gen = torch.Generator().manual_seed(args.seed + 1)
    rows, train_time = [], 0.0
    for step in range(args.steps):
        start = time.perf_counter()
        worker.reseed(step)
        worker.train_step({"images": train[torch.randint(len(train), (args.batch,), generator=gen)]}, step)
        train_time += time.perf_counter() - start
        done = step + 1
        if done % args.every == 0 or done == args.steps:
            row = {"form": form, "step": done, "s_per_step": train_time / done, "train_s": train_time,
                   **evaluate(worker, *held)}
            rows.append(row)
            print(f"  {form:15s} step {done:5d}  {row['s_per_step']:.3f} s/step  PSNR {row['psnr']:.2f}  "
                  f"colour {row['colour']:.2f}  shape {row['shape']:.2f}  whole {row['whole']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", default="patch,patch-unseeded,plain", help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--size", type=int, default=64, choices=(64, 128), help="the tokenizer's resolution")
    parser.add_argument("--render", type=int, default=128, help="render size of the scenes (default 128, as the demo)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=2000, help="training images")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further override of demo.yaml for every form, e.g. vqgan.optim.lr=1e-2 (repeatable)")
    parser.add_argument("--grid", type=int, default=8,
                        help="corpus layout: shapes on a GRID x GRID lattice (default 8, the demo's corpus), 0 free")
    parser.add_argument("--layout", choices=GRID_LAYOUTS, default="lines",
                        help="where on the lattice: lines (default, the demo's corpus) or scattered")
    parser.add_argument("--holdout-fraction", type=float, default=0.0,
                        help="keep this share of colour-shape pairings out of training and judging, as the demo's "
                             "corpus does (its default 0.2); 0: every pairing")
    args = parser.parse_args(argv)
    forms = args.forms.split(",")
    unknown = set(forms) - set(FORMS)
    if unknown:
        parser.error(f"unknown forms {sorted(unknown)}; known: {', '.join(FORMS)}")
    torch.set_num_threads(args.threads)
    print(f"machine: {describe()}")
    held_out = set(holdout_pairs(args.holdout_fraction))
    pairs = [p for p in all_pairs() if p not in held_out]
    _, train = load_images(0, args.images, args.size, args.render, args.grid, pairs, args.layout)
    held = load_images(100_000, 64, args.size, args.render, args.grid, pairs, args.layout)
    rows = [row for form in forms for row in run_form(form, args, train, held)]

    print(f"\ntiny tokenizers at {args.size} px on the demo corpus (rendered at {args.render} px, grid {args.grid} "
          f"{args.layout}, "
          f"{len(pairs)} of {len(all_pairs())} pairings), batch {args.batch}, {args.threads} torch threads\n")
    print("| form | step | s/step | train s | PSNR dB | colour | shape | whole |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['form']} | {r['step']} | {r['s_per_step']:.3f} | {r['train_s']:.0f} | {r['psnr']:.2f} | "
              f"{r['colour']:.2f} | {r['shape']:.2f} | {r['whole']:.2f} |")


if __name__ == "__main__":
    main()
