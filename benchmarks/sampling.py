"""Sampling latency: per decoding step and per image, against the naive loop, in one run.

"optimized" is what muse ships: text K/V encoded once per request (`encode_context` before the loop)
and classifier-free guidance as one batched forward of [cond ; uncond]. "naive" runs the very same
`sampling.generate` through a wrapper model that re-encodes both contexts inside every step and runs
cond and uncond as two separate forwards, so the difference is only those two choices.

    python benchmarks/sampling.py                           # tiny preset on CPU, batch 1 and 8
    python benchmarks/sampling.py --paper                   # + base-632m at 256 px, one guided step
    python benchmarks/sampling.py --device cuda --dtype bf16 --model muse-632m --batches 1
                                      # 512x512 through base-632m + superres-268m, 24 + 8 steps, CFG

Random weights throughout (speed does not depend on them). For muse-632m the T5-XXL encoder is not
run (its weights are not shipped); random 4096-d text embeddings of --text-len tokens stand in.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Callable

import torch

from muse import sampling
from muse.checkpoint import build_component
from muse.config import model_preset
from muse.pipeline import MusePipeline, TextCondition, stage_contexts
from muse.transformer import Context

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def machine(device: str) -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if device.startswith("cuda") else "no GPU used"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{cpu}; {os.cpu_count()} logical cores; {torch.get_num_threads()} torch threads; {gpu}; "
            f"torch {torch.__version__}; load average {load:.1f} at start")


class NaiveModel(torch.nn.Module):
    """Ignores the context it is given: re-encodes cond and uncond every call, two forwards for CFG."""

    def __init__(self, model: torch.nn.Module, encode: Callable[[bool], Context], batch: int):
        super().__init__()
        self.model, self.encode, self.batch = model, encode, batch
        self.num_tokens, self.mask_token_id = model.num_tokens, model.mask_token_id

    def forward(self, ids: torch.Tensor, context: Context) -> torch.Tensor:
        B = self.batch
        cond = self.model(ids[:B], self.encode(True))
        if ids.shape[0] == B:
            return cond
        return torch.cat([cond, self.model(ids[B:], self.encode(False))])


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fns: dict[str, Callable[[], object]], device: str, repeats: int,
          warmup: bool = True) -> tuple[dict[str, float], dict]:
    """Median seconds of each fn over `repeats` (after one warm-up call each), and each fn's last
    result. The fns take turns within every repeat, so a load change on a shared machine hits them alike."""
    outs = {name: fn() for name, fn in fns.items()} if warmup else {}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            outs[name] = fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, outs


def stage(model, cond: TextCondition, steps: int, scale: float, seed: int, naive: bool,
          lo_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding stage (base when lo_ids is None, else super-res) with per-row generators."""
    B = cond.batch_size if lo_ids is None else lo_ids.shape[0]
    gens = [torch.Generator(device=cond.embeddings.device).manual_seed(seed + i) for i in range(B)]
    ctx, uncond = stage_contexts(model, cond, None, guided=scale != 0, lo_ids=lo_ids)
    runner = model
    if naive:
        dtype = next(model.parameters()).dtype
        rows = cond if lo_ids is None else cond.repeat(B // cond.batch_size)

        def encode(conditional: bool) -> Context:
            mask = rows.mask if conditional else torch.zeros_like(rows.mask)
            extra = () if lo_ids is None else (lo_ids,)
            return model.encode_context(rows.embeddings.to(dtype), mask, *extra)

        runner = NaiveModel(model, encode, B)
    return sampling.generate(runner, ctx, uncond, steps=steps, guidance_scale=scale, generator=gens)


def bench_pipeline(pipe: MusePipeline, cond_fn: Callable[[int], TextCondition], batch: int, steps: int,
                   sr_steps: int, scale: float, device: str, repeats: int) -> dict[str, dict[str, float]]:
    """Seconds for text, base, super-res and decode at one batch size, optimized and naive (the two
    loops decode the same inputs; text encoding and VQGAN decoding are shared)."""
    modes = ("optimized", "naive")
    side = pipe.superres.config.hi_tokens_per_side
    with torch.inference_mode():
        t_text, out = timed({"text": lambda: cond_fn(batch)}, device, repeats)
        cond = out["text"]
        t_base, lo = timed({m: (lambda m=m: stage(pipe.base, cond, steps, scale, 0, m == "naive")) for m in modes},
                           device, repeats)
        lo_ids = lo["optimized"].view(batch, pipe.base.config.tokens_per_side, -1)
        t_sr, hi = timed({m: (lambda m=m: stage(pipe.superres, cond, sr_steps, scale, 0, m == "naive", lo_ids))
                          for m in modes}, device, repeats)
        t_dec, _ = timed({"decode": lambda: pipe.vqgan_hi.decode(hi["optimized"].view(batch, side, side))},
                         device, repeats)
    common = t_text["text"] + t_dec["decode"]
    return {m: dict(text=t_text["text"], base=t_base[m], superres=t_sr[m], decode=t_dec["decode"],
                    total=common + t_base[m] + t_sr[m]) for m in modes}


def bench_paper_base(device: str, dtype: torch.dtype, repeats: int, scale: float, text_len: int,
                     budget_s: float) -> dict[str, float] | str:
    """base-632m at 256 px (16x16 tokens), batch 1: seconds for one guided step (a 1-step decode, so
    t = scale and both branches run), optimized and naive. Skipped when a step exceeds the budget."""
    torch.manual_seed(0)
    cfg = model_preset("muse-632m").base
    base = build_component("base", cfg).to(device=device, dtype=dtype).eval()
    text = torch.randn(1, text_len, cfg.text_dim, device=device)
    cond = TextCondition(text, torch.ones(1, text_len, dtype=torch.bool, device=device))
    with torch.inference_mode():
        start = time.perf_counter()
        stage(base, cond, 1, scale, 0, False)  # warm-up, and a guard on the budget
        _sync(device)
        if time.perf_counter() - start > budget_s:
            return f"skipped: one step took {time.perf_counter() - start:.1f} s, over the {budget_s:.0f} s budget"
        times, _ = timed({m: (lambda m=m: stage(base, cond, 1, scale, 0, m == "naive"))
                          for m in ("optimized", "naive")}, device, repeats, warmup=False)
    return times


def build_paper_pipeline(name: str, device: str, dtype: torch.dtype) -> MusePipeline:
    """Random-weight components of a paper model preset, without the text encoder."""
    config = model_preset(name)
    torch.manual_seed(0)
    parts = {part: build_component(part, getattr(config, part)).to(device=device, dtype=dtype).eval()
             for part in ("vqgan_lo", "base", "vqgan_hi", "superres")}
    return MusePipeline(text_encoder=None, **parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", choices=["tiny", "muse-632m", "muse-3b"],
                        help="model preset for the end-to-end table (paper presets need a GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes ('' skips the table)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--superres-steps", type=int, default=8)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per number (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--text-len", type=int, default=64, help="text tokens for random embeddings")
    parser.add_argument("--paper", action="store_true", help="also time base-632m at 256 px per step")
    parser.add_argument("--paper-repeats", type=int, default=1, help="timed guided steps per loop (median)")
    parser.add_argument("--budget", type=float, default=60.0, help="skip the paper base above this many seconds")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]

    print(f"machine: {machine(args.device)}")
    if args.model == "tiny":
        pipe = MusePipeline.from_preset("tiny", seed=0).to(args.device, dtype)
        cond_fn = lambda b: pipe.encode_prompts(["two green triangles on the left"] * b)  # noqa: E731
    else:
        pipe = build_paper_pipeline(args.model, args.device, dtype)
        dim = pipe.base.config.text_dim

        def cond_fn(b: int) -> TextCondition:
            emb = torch.randn(b, args.text_len, dim, device=args.device)
            return TextCondition(emb, torch.ones(b, args.text_len, dtype=torch.bool, device=args.device))

    print(f"model {args.model} ({pipe.resolution}x{pipe.resolution}), {args.device} {args.dtype}, "
          f"{args.steps} base + {args.superres_steps} super-res steps, guidance {args.guidance}, "
          f"median of {args.repeats}\n")
    header = (f"{'batch':>5} {'loop':<9} {'base ms/step':>12} {'sr ms/step':>10} {'text ms':>8} {'decode ms':>9} "
              f"{'s/batch':>8} {'s/image':>8} {'naive/opt':>9}")
    print(header)
    print("-" * len(header))
    for batch in [int(b) for b in args.batches.split(",") if b.strip()]:
        rows = bench_pipeline(pipe, cond_fn, batch, args.steps, args.superres_steps, args.guidance, args.device,
                              args.repeats)
        for mode, r in rows.items():
            ratio = r["total"] / rows["optimized"]["total"]
            print(f"{batch:>5} {mode:<9} {1e3 * r['base'] / args.steps:>12.2f} "
                  f"{1e3 * r['superres'] / args.superres_steps:>10.2f} {1e3 * r['text']:>8.1f} "
                  f"{1e3 * r['decode']:>9.1f} {r['total']:>8.3f} {r['total'] / batch:>8.3f} {ratio:>8.2f}x")

    if args.paper:
        result = bench_paper_base(args.device, dtype, args.paper_repeats, args.guidance, args.text_len, args.budget)
        print(f"\nbase-632m, 256x256 (16x16 tokens), batch 1, one guided step (cond + uncond), "
              f"{args.text_len} text tokens, median of {args.paper_repeats}:")
        if isinstance(result, str):
            print(f"  {result}")
        else:
            for mode, sec in result.items():
                print(f"  {mode:<9} {sec:8.2f} s/step")
            print(f"  naive/optimized {result['naive'] / result['optimized']:.2f}x")


if __name__ == "__main__":
    main()
