"""What the tiny super-res model learns from a demo's tokens: the stage's own step
(`jobs.superres.SuperResWorker`) in one process, judged on what it draws from true low-res tokens.

    python benchmarks/superres_recipe.py --demo demo_output                         # the demo's recipe
    python benchmarks/superres_recipe.py --demo demo_output --model-set pixel_prior=false --eval-at 800
    python benchmarks/superres_recipe.py --demo demo_output --model superres-tiny --seed 1

A `make demo` output holds what this needs: the corpus (its held-out pairings), the token shards and
the root's tokenizers, text encoder and base. Training follows `configs/demo.yaml`'s superres section
(overridable with --set) on stored text embeddings.

At each --eval-at step, and at the end, the EMA weights are judged (`muse.judge`) three ways:
- "seen" / "held-out": scenes of the corpus's pairings / with a held-out pairing, rendered at 128 px;
  their low-res tokens (the 64 px tokenizer's) go through super-res with the caption and the served
  sampling, and the 128 px image is judged. This isolates super-res: the base is not involved.
- "chain held-out": the demo root's own base, then this super-res, on `holdout.json`'s prompts.
Beside them, the 128 px tokenizer's own reconstructions of the same scenes: what super-res can reach.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from dataclasses import replace

import numpy as np
import torch

from jobs.config import load_config
from jobs.data import collate_tokens
from jobs.parallel import WorkerEnv, configure_cpu_worker, uses_bf16
from jobs.superres import SuperResWorker
from jobs.train_job import TrainJob
from muse import checkpoint, judge, sampling
from muse.config import preset, to_dict
from muse.data import synthetic
from muse.data.images import pil_to_tensor, tensor_to_pil
from muse.evaluate import read_holdout, training_pairs
from muse.pipeline import MusePipeline
from muse.token_stages import superres_tokens
from pipelines import shards
from base_recipe import demo_links, export_root, train_in_process  # benchmarks/base_recipe.py
from machine import describe  # benchmarks/machine.py

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
SERVED = {"superres_steps": 8, "guidance_scale": 1.0, "choice_temperature": 4.5,  # configs/demo.yaml's sampling, its part
          "superres_top_k": 1}
SCENE_SIZE, GRID = 128, 8


def load_rows(table, encoder) -> dict[str, torch.Tensor]:
    data = collate_tokens({k: np.asarray(table.column(k).to_pylist(), dtype=object)
                           for k in ("tokens_lo", "tokens_hi", "text_ids")})
    with torch.no_grad():
        data["text_emb"] = encoder.encode_ids(data["text_ids"], data["text_mask"]).float()
    return data


def probe_scenes(holdout: dict, n: int, held_out: bool) -> list[tuple[str, object]]:
    """n (caption, 128 px image) of the corpus's layout: every group of a seen pairing, or at least
    one group of a held-out pairing."""
    held = {tuple(p) for p in holdout["pairs"]}
    pairs = synthetic.all_pairs() if held_out else training_pairs(holdout)
    rng, out = random.Random(f"superres-probe:{held_out}"), []
    while len(out) < n:
        scene = synthetic.sample_scene(rng, pairs)
        if held_out and not any(g.pair in held for g in scene.groups):
            continue
        image = synthetic.render(scene, SCENE_SIZE, rng, grid=GRID, layout=holdout.get("layout", "lines"))
        out.append((synthetic.caption(scene), image))
    return out


@torch.no_grad()
def judge_superres(pipe: MusePipeline, scenes, served: dict) -> tuple[dict, dict]:
    """Super-res from each scene's true low-res tokens, and the 128 px tokenizer's reconstruction."""
    drawn, recon = [], []
    lo_size = pipe.vqgan_lo.config.resolution
    for i, (caption, image) in enumerate(scenes):
        lo = pipe.vqgan_lo.encode(pil_to_tensor(image, lo_size)[None])
        ids = superres_tokens(pipe.superres, pipe.encode_prompts([caption]), lo, steps=served["superres_steps"],
                              guidance_scale=served["guidance_scale"], generator=sampling.image_generators(i, 1),
                              choice_temperature=served["choice_temperature"], top_k=served["superres_top_k"])
        drawn.append(judge.judge(tensor_to_pil(pipe.vqgan_hi.decode(ids)[0]), caption))
        hi = pipe.vqgan_hi.encode(pil_to_tensor(image, pipe.vqgan_hi.config.resolution)[None])
        recon.append(judge.judge(tensor_to_pil(pipe.vqgan_hi.decode(hi)[0]), caption))
    return judge.summarize(drawn), judge.summarize(recon)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a `make demo` output directory")
    parser.add_argument("--out", default=None, help="where the judged roots go (default: DEMO/superres_recipe)")
    parser.add_argument("--model", default=None, help="super-res preset (default: demo.yaml's)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further override of demo.yaml, e.g. superres.run.max_steps=800 (repeatable)")
    parser.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a change to the preset's architecture, JSON values, e.g. pixel_prior=false")
    parser.add_argument("--eval-at", default="", help="comma-separated steps to judge at besides the last")
    parser.add_argument("--scenes", type=int, default=32, help="seen and held-out scenes judged (each)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, masks and data order")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    configure_cpu_worker(args.threads)
    print(f"machine: {describe()}", flush=True)
    demo_root, corpus = os.path.join(args.demo, "checkpoint"), os.path.join(args.demo, "corpus")
    out = args.out or os.path.join(args.demo, "superres_recipe")
    os.makedirs(out, exist_ok=True)
    section = load_config(DEMO_CONFIG, args.set).superres
    steps, batch = section.run.max_steps, section.run.batch_size
    encoder = checkpoint.load_component(checkpoint.component_uri(demo_root, "text_encoder"),
                                        expect_kind="text_encoder").eval()
    table = shards.load_token_shards(os.path.join(args.demo, "tokens"), columns=["tokens_lo", "tokens_hi", "text_ids"])
    data = load_rows(table, encoder)
    rows = len(data["tokens_lo"])
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.model_set)}
    name = args.model or section.model or "superres-tiny"
    model_cfg = replace(preset(name), text_dim=encoder.dim, **changes)
    job = TrainJob(root=demo_root, component="superres", model_config=to_dict(model_cfg),
                   run_name="superres_recipe", data_meta={"text_storage": "embeddings", "text_dim": encoder.dim})
    torch.manual_seed(args.seed)
    worker = SuperResWorker(section, job, WorkerEnv(bf16=uses_bf16(torch.device("cpu"), bf16=False,
                                                                   cpu_bf16=section.run.cpu_bf16)))
    worker.reseed(args.seed)
    holdout = read_holdout(corpus)
    scenes = {"seen": probe_scenes(holdout, args.scenes, False), "held-out": probe_scenes(holdout, args.scenes, True)}
    print(f"{name} {changes or ''}: {rows} rows, {steps} steps of {batch}, seed {args.seed}", flush=True)

    evals = sorted({int(s) for s in args.eval_at.split(",") if s} | {steps})
    results, links = [], demo_links(demo_root, ("text_encoder", "vqgan_lo", "vqgan_hi", "base"))

    def on_eval(step: int, train_s: float) -> None:
        pipe = MusePipeline.from_pretrained(export_root(worker, demo_root, os.path.join(out, f"step{step}"),
                                                        "superres", links))
        row = {"step": step, "train_s": round(train_s)}
        for kind, judged in scenes.items():
            row[kind], row[f"{kind} tokenizer"] = judge_superres(pipe, judged, SERVED)
        held = holdout.get("eval_captions", [])
        chain = [judge.judge(image, prompt) for i in range(0, len(held), 8)
                 for prompt, image in zip(held[i:i + 8], pipe(held[i:i + 8], seed=1000 + i, steps=24, **SERVED))]
        row["chain held-out"] = judge.summarize(chain)
        if pipe.superres.pixel_prior is not None:
            row["prior scale"] = round(pipe.superres.pixel_prior.scale.item(), 2)
        results.append(row)
        print(json.dumps(row), flush=True)

    train_in_process(worker, data, ("tokens_lo", "tokens_hi", "text_emb", "text_mask"), steps, batch, args.seed,
                     evals, on_eval)

    print(f"\nsuper-res {name} {changes or ''} on {args.demo}'s tokens, batch {batch}, seed {args.seed}, "
          f"{args.threads} torch thread(s); sampling {SERVED}\n")
    print("| step | train s | seen colour / shape / whole | held-out colour / shape / whole | tokenizer held-out whole "
          "| chain held-out whole |")
    print("|---:|---:|---|---|---:|---:|")
    for r in results:
        cells = [" / ".join(f"{r[k][a]:.2f}" for a in ("color", "shape", "correct")) for k in ("seen", "held-out")]
        print(f"| {r['step']} | {r['train_s']} | {cells[0]} | {cells[1]} | {r['held-out tokenizer']['correct']:.2f} "
              f"| {r['chain held-out']['correct']:.2f} |")


if __name__ == "__main__":
    main()
