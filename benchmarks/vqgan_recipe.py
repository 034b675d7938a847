"""How fast the tiny VQGAN learns the synthetic corpus: time per step and what its reconstructions
keep, for the tokenizer forms side by side in one run.

    python benchmarks/vqgan_recipe.py                      # 1,500 steps each, 2 torch threads
    python benchmarks/vqgan_recipe.py --steps 600 --forms plain,resnet

Forms (everything else is vqgan-tiny: 64 px, f8, 512 codes):
  plain       strided conv stacks, no residual or bottleneck blocks, 16-d codes, dead-code restarts
              drawn by misfit after ~120 idle steps (threshold 0.3): the form RESULTS.md records
  shipped     vqgan-tiny as it is now: the plain form with 8-d codes and threshold 1e-3
  resnet      the paper-size presets' form at tiny width (one residual block per level,
              residual-attention-residual bottleneck) with the old restarts (threshold 1e-3, uniform
              draws: a restarted code waits ~690 steps)
  resnet-new  the ResNet form with the plain form's restarts, to separate the two changes

Each trains on the same synthetic images (`muse.data.synthetic`, all pairings) with AdamW
(lr 1e-3, betas 0.9/0.99), reconstruction + codebook + commitment losses, no GAN, batch 8. Every
--every steps it reconstructs 64 held-out images and the attribute judge (`muse.judge`) reads them,
upscaled to 128 px: "colour" is the share of images whose palette colours all come back (and no
other), "scene" the share judged right in colour, shape, count and placement. The ground-truth
images score 1.00 on both.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import numpy as np
import torch

from muse.config import preset
from muse.data.images import tensor_to_pil
from muse.data.synthetic import all_pairs, caption, sample
from muse.judge import judge, summarize
from muse.losses import reconstruction_loss
from muse.vqgan import VQGAN, VectorQuantizer
from sampling import machine  # benchmarks/sampling.py: the same machine line as the other scripts

FORMS = {
    "plain": {"codebook_dim": 16, "dead_code_threshold": 0.3},
    "shipped": {},
    "resnet": {"num_res_blocks": 1, "mid_block": True, "dead_code_threshold": 1e-3},
    "resnet-new": {"num_res_blocks": 1, "mid_block": True, "codebook_dim": 16, "dead_code_threshold": 0.3},
    "codes-64": {"codebook_size": 64, "dead_code_threshold": 0.01},
    "rare-codes": {"dead_code_threshold": 0.01},
}


def load_images(first: int, n: int, size: int, grid: int = 0) -> tuple[list[str], torch.Tensor]:
    captions, images = [], []
    for i in range(first, first + n):
        scene, img = sample(i, 0, size, all_pairs(), grid)
        captions.append(caption(scene))
        images.append(torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1).permute(2, 0, 1))
    return captions, torch.stack(images)


def uniform_restarts(quantizer: VectorQuantizer) -> None:
    """The earlier restart rule: candidates drawn uniformly from the batch."""
    def restart(candidates: torch.Tensor) -> int:
        dead = (quantizer.usage < quantizer.dead_code_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return 0
        pick = torch.randint(candidates.shape[0], (dead.numel(),))
        fresh = candidates[pick] + 1e-3 * torch.randn_like(candidates[pick])
        quantizer.codebook.data[dead] = torch.nn.functional.normalize(fresh, dim=-1)
        quantizer.usage[dead] = 1.0
        return dead.numel()
    quantizer.restart_dead_codes = restart


def evaluate(model: VQGAN, captions: list[str], images: torch.Tensor) -> dict[str, float]:
    model.eval()
    with torch.no_grad():
        recon = model.decode(model.encode(images))
    model.train()
    mse = float(((recon - images) ** 2).mean())
    verdicts = [judge(tensor_to_pil(r).resize((128, 128), 0), c) for r, c in zip(recon, captions)]
    s = summarize(verdicts)
    return {"psnr": 10 * math.log10(4.0 / mse), "colour": s["color"], "scene": s["correct"]}


def run_form(form: str, args, train: torch.Tensor, held: tuple[list[str], torch.Tensor]) -> list[dict]:
    torch.manual_seed(0)
    model = VQGAN(replace(preset("vqgan-tiny"), **FORMS[form])).train()
    if form == "resnet":
        uniform_restarts(model.quantizer)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = torch.Generator().manual_seed(1)
    rows, train_time = [], 0.0
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        images = train[torch.randint(len(train), (args.batch,), generator=gen)]
        out = model(images)
        loss = reconstruction_loss(images, out.recon) + out.codebook_loss + out.commitment_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_time += time.perf_counter() - start
        if step % args.every == 0 or step == args.steps:
            row = {"form": form, "step": step, "s_per_step": train_time / step, "train_s": train_time,
                   **evaluate(model, *held)}
            rows.append(row)
            print(f"  {form:10s} step {step:5d}  {row['s_per_step']:.3f} s/step  PSNR {row['psnr']:.2f}  "
                  f"colour {row['colour']:.2f}  scene {row['scene']:.2f}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forms", default="plain,resnet", help=f"comma-separated, of {', '.join(FORMS)}")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=250, help="evaluate every N steps")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--images", type=int, default=2000, help="training images (64 px)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--grid", type=int, default=0,
                        help="corpus layout: shapes on a GRID x GRID lattice (8: the demo's corpus), 0 free")
    args = parser.parse_args(argv)
    forms = args.forms.split(",")
    unknown = set(forms) - set(FORMS)
    if unknown:
        parser.error(f"unknown forms {sorted(unknown)}; known: {', '.join(FORMS)}")
    torch.set_num_threads(args.threads)
    print(f"machine: {machine('cpu')}")
    _, train = load_images(0, args.images, 64, args.grid)
    held = load_images(100_000, 64, 64, args.grid)
    rows = [row for form in forms for row in run_form(form, args, train, held)]

    print(f"\nvqgan-tiny on the synthetic corpus, batch {args.batch}, {args.threads} torch threads\n")
    print("| form | step | s/step | train s | PSNR dB | colour | scene |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['form']} | {r['step']} | {r['s_per_step']:.3f} | {r['train_s']:.0f} | {r['psnr']:.2f} | "
              f"{r['colour']:.2f} | {r['scene']:.2f} |")


if __name__ == "__main__":
    main()
