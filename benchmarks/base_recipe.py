"""What the tiny base model learns from a demo's tokens: the stage's own step (`jobs.base.BaseWorker`)
in one process, judged on served-style images and probed for whether it counts what is on its canvas.

    python benchmarks/base_recipe.py --demo demo_output                       # the demo's recipe
    python benchmarks/base_recipe.py --demo demo_output --text-encoder bpe    # a BPE vocabulary over the same T5
    python benchmarks/base_recipe.py --demo demo_output --set base.run.max_steps=4800 --eval-at 2400
    python benchmarks/base_recipe.py --demo demo_output --mask-rates uniform
    python benchmarks/base_recipe.py --demo demo_output --model-set heads=8 --seed 1 --trace
    python benchmarks/base_recipe.py --demo demo_output --canonical-codes --trace

A `make demo` output holds what this needs: the corpus (captions and held-out pairings), the token
shards, and the root's tokenizers and text encoder. Training follows `configs/demo.yaml`'s base section
(overridable with --set) on stored text embeddings, so the frozen encoder runs once, not every step.
`--text-encoder bpe` fits a `t5-tiny-bpe` vocabulary to the shards' captions and re-encodes them.

At each --eval-at step, and at the end, the EMA weights go into a root beside the demo's other
components, and that root draws --prompts seen-type prompts through the base stage with the sampling
given (--sampling, JSON), judged by `muse.judge`: colour, shape, count, placement, whole scene, and
how many images have fewer ("under") or more ("over") shapes than the prompt asks for.

The canvas probe: rows of the shards with a share r of their tokens masked at random. The model's
expected number of shapes among the masked cells (the sum of 1 - p(background) there) is compared with
the true number. A model that reads the caption's counts and the shapes already visible is exact; one
that ignores the canvas does no better than "blind" (the caption's total times r, told the total).

`--trace` follows the judged decoding itself: after each sampling step, the shapes a prompt still
needs (its total minus the shapes decoded so far) against the model's expected number among the cells
still masked. A model that counts keeps the two equal while background is decoded around the shapes.
"""

from __future__ import annotations

import argparse
import collections
import functools
import json
import os
import shutil
import time
from dataclasses import replace

import numpy as np
import torch

import jobs.masked
from jobs.base import BaseWorker
from jobs.config import load_config
from jobs.data import collate_tokens
from jobs.parallel import WorkerEnv, configure_cpu_worker, uses_bf16
from jobs.train_job import TrainJob
from muse import checkpoint, masking
from muse.config import preset, to_dict
from pipelines import shards
from machine import describe  # benchmarks/machine.py

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")
SERVED = {"steps": 24, "guidance_scale": 1.0, "choice_temperature": 4.5}  # configs/demo.yaml's sampling, its base part


def shard_captions(table, tokenizer) -> list[str]:
    """The captions back from the shards' ids, through the tokenizer that made them."""
    return tokenizer.batch_decode(table.column("text_ids").to_pylist(), skip_special_tokens=True)


def load_rows(table, encoder, captions: list[str] | None) -> dict[str, torch.Tensor]:
    """Training rows of the shards; `captions` re-encoded by `encoder` when given (a new vocabulary)."""
    data = collate_tokens({k: np.asarray(table.column(k).to_pylist(), dtype=object) for k in ("tokens_lo", "text_ids")})
    if captions is not None:
        data["text_ids"], data["text_mask"] = encoder.tokenize(captions)
    with torch.no_grad():
        data["text_emb"] = encoder.encode_ids(data["text_ids"], data["text_mask"]).float()
    return data


def background_id(ids: torch.Tensor) -> int:
    """The most frequent token of the grids: the empty canvas."""
    return torch.mode(ids.flatten()).values.item()


@torch.no_grad()
def canvas_probe(model, data: dict, background: int, rows: int = 512, rates=(0.1, 0.3, 0.6, 1.0)) -> list[dict]:
    ids, emb, mask_t = data["tokens_lo"][:rows], data["text_emb"][:rows], data["text_mask"][:rows]
    # A model that reads codes through their vectors draws one code per class: count in classes.
    ids, background = model.embed.classes(ids), int(model.embed.classes(torch.tensor(background)))
    context = model.encode_context(emb, mask_t)
    gen = torch.Generator().manual_seed(0)
    out = []
    for r in rates:
        masked, mask = masking.mask_tokens(ids, torch.full((len(ids),), r), model.mask_token_id, generator=gen)
        p_shape = 1 - model(masked, context).float().softmax(-1)[..., background]
        expected = (p_shape * mask).sum(1)
        true = ((ids != background) & mask).sum(1).float()
        blind = (ids != background).sum(1).float() * mask.float().mean(1)
        out.append({"rate": r, "model_error": (expected - true).abs().mean().item(),
                    "blind_error": (blind - true).abs().mean().item(),
                    "rounded_exact": (expected.round() == true).float().mean().item()})
    return out


def canonical_codes(ids: torch.Tensor, captions: list[str], background: int) -> tuple[torch.Tensor, int, int]:
    """Every colour-shape pair's codes (read off the one-group rows) replaced by its most frequent
    one: what the base model would see from a tokenizer with one code per pair. The tiny tokenizers
    give a pair 2-5 codes, one for inner cells and others for cells on the image's border, which the
    resize to 64 px draws differently. Returns (ids, codes before, codes after)."""
    from muse.data.synthetic import parse_caption

    seen: dict[tuple, collections.Counter] = collections.defaultdict(collections.Counter)
    for row, caption in zip(ids, captions):
        groups = parse_caption(caption).groups
        if len(groups) == 1:
            seen[groups[0].pair].update(row[row != background].tolist())
    lookup = torch.arange(int(ids.max()) + 1)
    for counts in seen.values():
        lookup[list(counts)] = counts.most_common(1)[0][0]
    return lookup[ids], sum(len(c) for c in seen.values()), len(seen)


def content_biased_masks(ids: torch.Tensor, rates: torch.Tensor, mask_id: int, generator=None, share: float = 1.0):
    """`masking.mask_tokens` with round(rate * N) positions per row drawn without replacement in
    proportion to 1 / (their token's count in the row) for a `share` of the rows (uniform for the rest):
    an exponential race, the smallest of -log(u) / weight masked first."""
    B, N = ids.shape
    weight = (ids[:, :, None] == ids[:, None, :]).sum(-1).float().reciprocal()  # (B, N)
    biased = torch.rand(B, generator=generator, device=ids.device) < share
    weight = torch.where(biased[:, None], weight, torch.ones_like(weight))
    race = -torch.rand(B, N, generator=generator, device=ids.device).clamp(min=1e-12).log() / weight
    return masking.mask_tokens(ids, rates, mask_id, priority=race)


def judge_base(root: str, corpus: str, prompts: int, sampling: dict, background: int | None = None) -> dict:
    """The judge on base-stage images of `prompts` seen-type prompts. With `background` (the
    background token id), also a decoding trace: after each step, the mean number of shapes still
    needed (the caption's total minus the shapes decoded so far) and the model's expected number
    among the cells still masked (conditional logits, the sum of 1 - p(background))."""
    from muse.data.synthetic import parse_caption
    from muse.evaluate import read_holdout, seen_prompts
    from muse.judge import find_blobs, judge, summarize
    from muse.pipeline import MusePipeline

    pipe = MusePipeline.from_pretrained(root)
    holdout = read_holdout(corpus)
    chosen = seen_prompts(holdout, prompts, 0)
    if background is not None:  # the class the model draws for the background (itself, without code vectors)
        background = int(pipe.base.embed.classes(torch.tensor(background)))
    verdicts, surplus, trace = [], [], {}
    for i in range(0, len(chosen), 8):
        chunk = chosen[i:i + 8]
        totals = torch.tensor([sum(g.count for g in parse_caption(p).groups) for p in chunk])
        follow = None
        if background is not None:
            text = pipe.encode_prompts(chunk)
            context = pipe.base.encode_context(text.embeddings, text.mask)

            def follow(stage: str, step: int, ids: torch.Tensor) -> None:
                masked = ids == pipe.base.mask_token_id
                with torch.no_grad():  # logits only where still masked, as the sampler computes them
                    p_shape = 1 - pipe.base(ids, context, select=masked).float().softmax(-1)[:, background]
                row = trace.setdefault(step, {"masked": 0.0, "needed": 0.0, "expected": 0.0, "n": 0})
                row["masked"] += masked.sum().item()
                row["needed"] += (totals - ((ids != background) & ~masked).sum(1)).sum().item()
                row["expected"] += p_shape.sum().item()
                row["n"] += len(ids)

        images = pipe(chunk, superres=False, seed=i, callback=follow, **sampling)
        for prompt, image, total in zip(chunk, images, totals.tolist()):
            verdicts.append(judge(image, prompt))
            surplus.append(len(find_blobs(image)) - total)
    out = summarize(verdicts) | {"under": sum(s < 0 for s in surplus), "over": sum(s > 0 for s in surplus)}
    held = holdout.get("eval_captions", [])
    if held:  # the held-out pairings' prompts (each pair alone at every count, and beside a seen pair)
        held_verdicts = [judge(image, prompt) for i in range(0, len(held), 8)
                         for prompt, image in zip(held[i:i + 8], pipe(held[i:i + 8], superres=False, seed=1000 + i,
                                                                      **sampling))]
        out["held_out"] = summarize(held_verdicts)
    if trace:
        out["trace"] = [{"step": step, **{k: round(v / row["n"], 2) for k, v in row.items() if k != "n"}}
                        for step, row in sorted(trace.items())]
    return out


def export_root(worker, demo_root: str, out: str, component: str, links: dict[str, str]) -> str:
    """A root beside the demo's: `links` (component -> directory) linked in, the worker's EMA model
    saved as `component`."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for name, path in links.items():
        os.symlink(os.path.abspath(path), os.path.join(out, name))
    checkpoint.save_component(worker.eval_model(), checkpoint.component_uri(out, component))
    return out


def demo_links(demo_root: str, names) -> dict[str, str]:
    """The demo root's components among `names`, to link into a root (`export_root`)."""
    return {n: checkpoint.component_uri(demo_root, n) for n in names if checkpoint.has_component(demo_root, n)}


def train_in_process(worker, data: dict[str, torch.Tensor], keys, steps: int, batch: int, seed: int, evals,
                     on_eval) -> None:
    """The stage's own train_step over shuffled rows of `data` (a new permutation each epoch), a loss
    line every 200 steps, and on_eval(step, train seconds) at each step in `evals`."""
    rows = len(data[keys[0]])
    gen = torch.Generator().manual_seed(seed + 1)
    order, at, train_s, recent = torch.randperm(rows, generator=gen), 0, 0.0, []
    for step in range(steps):
        if at + batch > rows:
            order, at = torch.randperm(rows, generator=gen), 0
        idx = order[at:at + batch]
        at += batch
        start = time.perf_counter()
        metrics = worker.train_step({k: data[k][idx] for k in keys}, step)
        recent.append(float(metrics["loss"]))
        train_s += time.perf_counter() - start
        if (step + 1) % 200 == 0:
            print(f"  step {step + 1}  loss {np.mean(recent):.4f}  {train_s / (step + 1):.3f} s/step", flush=True)
            recent = []
        if step + 1 in evals:
            on_eval(step + 1, train_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a `make demo` output directory")
    parser.add_argument("--out", default=None, help="where the judged roots go (default: DEMO/base_recipe)")
    parser.add_argument("--text-encoder", choices=("root", "bpe"), default="root",
                        help="the demo root's text encoder, or a t5-tiny-bpe fitted to the shards' captions")
    parser.add_argument("--mask-rates", choices=("arccos", "uniform"), default="arccos",
                        help="training mask rates: Muse's arccos density or uniform on (0, 1]")
    parser.add_argument("--content-masking", type=float, default=0.0, metavar="SHARE",
                        help="share of training rows whose masks favour rare tokens (a position's weight is 1 / "
                             "the count of its token in its row): the decoder's states, background shown, shapes hidden")
    parser.add_argument("--canonical-codes", action="store_true",
                        help="train on tokens with one code per colour-shape pair (its most frequent)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a further override of demo.yaml, e.g. base.run.max_steps=4800 (repeatable)")
    parser.add_argument("--model-set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a change to the base preset's architecture, e.g. layers=8 (repeatable)")
    parser.add_argument("--eval-at", default="", help="comma-separated steps to judge at besides the last")
    parser.add_argument("--prompts", type=int, default=96, help="seen-type prompts judged")
    parser.add_argument("--sampling", default=json.dumps(SERVED), help="base sampling, JSON")
    parser.add_argument("--seed", type=int, default=0, help="initial weights, masks and data order")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trace", action="store_true",
                        help="also trace decoding: shapes still needed against the model's expectation, per step")
    args = parser.parse_args(argv)

    configure_cpu_worker(args.threads)
    print(f"machine: {describe()}", flush=True)
    demo_root = os.path.join(args.demo, "checkpoint")
    out = args.out or os.path.join(args.demo, "base_recipe")
    os.makedirs(out, exist_ok=True)
    section = load_config(DEMO_CONFIG, args.set).base
    steps = section.run.max_steps
    # The worker looks its masking functions up in jobs.masked at each step, so they are replaced there.
    if args.mask_rates == "uniform":
        jobs.masked.sample_mask_rates = lambda b, generator=None, device=None: torch.rand(
            b, generator=generator, device=device).clamp(min=1e-6)

    if args.content_masking:
        jobs.masked.mask_tokens = functools.partial(content_biased_masks, share=args.content_masking)

    table = shards.load_token_shards(os.path.join(args.demo, "tokens"), columns=["tokens_lo", "text_ids"])
    encoder_dir = checkpoint.component_uri(demo_root, "text_encoder")
    captions = None
    if args.text_encoder == "bpe":
        from muse.text import TextEncoder

        root_encoder = checkpoint.load_component(encoder_dir, expect_kind="text_encoder")
        captions = shard_captions(table, root_encoder.tokenizer)
        torch.manual_seed(0)
        encoder_dir = os.path.join(out, "text_encoder_bpe")
        checkpoint.save_component(TextEncoder.build(preset("t5-tiny-bpe"), captions), encoder_dir)
    encoder = checkpoint.load_component(encoder_dir, expect_kind="text_encoder").eval()
    data = load_rows(table, encoder, captions)
    background = background_id(data["tokens_lo"])
    if args.canonical_codes:
        texts = captions or shard_captions(table, encoder.tokenizer)
        data["tokens_lo"], before, after = canonical_codes(data["tokens_lo"], texts, background)
        print(f"canonical codes: {before} codes of {after} colour-shape pairs -> one each", flush=True)
    rows = len(data["tokens_lo"])
    changes = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.model_set)}
    model_cfg = replace(preset(section.model or "base-tiny"), text_dim=encoder.dim, **changes)
    job = TrainJob(root=demo_root, component="base", model_config=to_dict(model_cfg), run_name="base_recipe",
                   data_meta={"text_storage": "embeddings", "text_dim": encoder.dim})
    torch.manual_seed(args.seed)
    cpu_bf16 = uses_bf16(torch.device("cpu"), bf16=False, cpu_bf16=section.run.cpu_bf16)
    worker = BaseWorker(section, job, WorkerEnv(bf16=cpu_bf16))
    worker.reseed(args.seed)
    print(f"{rows} rows, captions of {data['text_mask'].sum(1).float().mean():.1f} tokens on average "
          f"({args.text_encoder} text encoder); {steps} steps of {section.run.batch_size}", flush=True)

    evals = sorted({int(s) for s in args.eval_at.split(",") if s} | {steps})
    sampling, results, batch = json.loads(args.sampling), [], section.run.batch_size
    links = demo_links(demo_root, ("vqgan_lo", "vqgan_hi", "superres")) | {"text_encoder": encoder_dir}

    def on_eval(step: int, train_s: float) -> None:
        root = export_root(worker, demo_root, os.path.join(out, f"step{step}"), "base", links)
        judged = judge_base(root, os.path.join(args.demo, "corpus"), args.prompts, sampling,
                            background if args.trace else None)
        probe = canvas_probe(worker.eval_model(), data, background)
        results.append({"step": step, "train_s": train_s, **judged, "probe": probe})
        print(json.dumps(results[-1]), flush=True)

    train_in_process(worker, data, ("tokens_lo", "text_emb", "text_mask"), steps, batch, args.seed, evals, on_eval)

    print(f"\nbase on {args.demo}'s tokens, {args.text_encoder} text encoder, {args.mask_rates} mask rates"
          f"{f' ({args.content_masking:.0%} of rows content-biased)' if args.content_masking else ''}, "
          f"batch {batch}, {args.threads} torch thread(s); {args.prompts} seen prompts, sampling {sampling}\n")
    print("| step | train s | colour | shape | count | placement | whole | under | over | probe error r=0.1 / 0.3 / 0.6 / 1.0 (blind) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        probe = " / ".join(f"{p['model_error']:.2f}" for p in r["probe"])
        blind = " / ".join(f"{p['blind_error']:.2f}" for p in r["probe"])
        print(f"| {r['step']} | {r['train_s']:.0f} | {r['color']:.2f} | {r['shape']:.2f} | {r['count']:.2f} | "
              f"{r['placement']:.2f} | {r['correct']:.2f} | {r['under']} | {r['over']} | {probe} ({blind}) |")
    if "held_out" in results[-1]:
        print("\nheld-out pairings' prompts (`holdout.json` eval_captions):\n")
        print("| step | n | colour | shape | count | placement | whole |\n|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            h = r["held_out"]
            print(f"| {r['step']} | {h['n']} | {h['color']:.2f} | {h['shape']:.2f} | {h['count']:.2f} | "
                  f"{h['placement']:.2f} | {h['correct']:.2f} |")
    if "trace" in results[-1]:
        print(f"\ndecoding trace at step {results[-1]['step']}, means over the prompts after each decoding step:\n")
        print("| decoding step | cells masked | shapes still needed | expected among masked |")
        print("|---:|---:|---:|---:|")
        for t in results[-1]["trace"]:
            print(f"| {t['step'] + 1} | {t['masked']:.1f} | {t['needed']:.2f} | {t['expected']:.2f} |")


if __name__ == "__main__":
    main()
