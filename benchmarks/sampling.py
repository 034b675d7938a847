"""Sampling speed and memory: the shipped (lean) loop against the previous loop and against aMUSEd, in one run.

"lean" is `muse.sampling.generate` as shipped: logits only at masked positions, guidance applied in
place, blockwise inverse-CDF sampling, uniforms drawn once per request, the cached one-token null
context. "legacy" is the loop it replaced (`benchmarks/legacy_sampling.py`): full (2B, N, K) float32
logits, guidance, log-softmax, exp and cumsum over the whole codebook every step, two `torch.rand`
per row per step, and a padded, fully masked text as the unconditional context. "compiled" is the
lean loop with `torch.compile`d steps (CUDA graphs on GPU). Same weights, same inputs, runs taking turns.

    python benchmarks/sampling.py                                  # tiny preset on CPU, batch 1 and 8
    python benchmarks/sampling.py --paper --peer --memory --batches ''   # paper sizes on CPU (~10 min)
    python benchmarks/sampling.py --device cuda --dtype bf16 --model muse-632m --batches 1,8 --compile both
                                      # 512x512 through base-632m + superres-268m, 24 + 8 steps, CFG

--paper: base-632m at 256 px, batch 1, one guided step, legacy vs lean.
--peer: diffusers' AmusedPipeline with random weights (benchmarks/amused_peer.py) against ours at
    16x16 tokens, 8192 codes, 256 px, 12 steps, CFG 10, batch 1: an equal-size pair (aMUSEd-256's
    604M U-ViT vs our base-632m) and a small pair; also each transformer's GFLOP per guided step.
--imported: aMUSEd-256 at its released size (random weights) run by diffusers' AmusedPipeline and by
    our pipeline on the same weights imported (`muse.amused`), 12 steps, CFG 10, batch 1 and 8.
--memory: peak memory of one guided super-res-268m step at batch 1 (512 px: 64x64 tokens, 8192
    codes), legacy vs lean: on GPU from the allocator, on CPU as the peak RSS over the RSS before the
    step (the peak is reset just before it), each loop in its own process.
Random weights throughout (speed does not depend on them). Paper presets skip the T5-XXL encoder:
random 4096-d text embeddings of --text-len tokens stand in.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import legacy_sampling  # noqa: E402
from machine import describe  # noqa: E402

from muse import sampling  # noqa: E402
from muse.checkpoint import build_component  # noqa: E402
from muse.config import model_preset, preset  # noqa: E402
from muse.pipeline import MusePipeline  # noqa: E402
from muse.token_stages import TextCondition, stage_contexts  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


@contextlib.contextmanager
def compiled(models: list[torch.nn.Module], on: bool):
    """Run `models` with their compiled step (compiled once, on first use) or eagerly."""
    for m in models:
        if on and getattr(m, "_bench_compiled", None) is None:
            m._bench_compiled = m.compile_step()._compiled
        m._compiled = m._bench_compiled if on else None
    try:
        yield
    finally:
        for m in models:
            m._compiled = None


def compiled_runner(models: list[torch.nn.Module], run: Callable[[], object]) -> Callable[[], object]:
    """`run` with the compiled step of `models` on."""
    def run_compiled():
        with compiled(models, True):
            return run()
    return run_compiled


def stage(model, cond: TextCondition, steps: int, scale: float, seed: int, loop: str,
          lo_ids: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding stage (base when lo_ids is None, else super-res) with per-image generators."""
    B = cond.batch_size if lo_ids is None else lo_ids.shape[0]
    gens = sampling.image_generators(seed, B, cond.embeddings.device)
    if loop != "legacy":
        ctx, uncond = stage_contexts(model, cond, None, guided=scale != 0, lo_ids=lo_ids)
        return sampling.generate(model, ctx, uncond, steps=steps, guidance_scale=scale, generator=gens)
    dtype = next(model.parameters()).dtype
    rows = cond if lo_ids is None else cond.repeat(B // cond.batch_size)
    extra = () if lo_ids is None else (lo_ids,)
    emb = rows.embeddings.to(dtype)
    ctx = model.encode_context(emb, rows.mask, *extra)
    uncond = legacy_sampling.masked_text_context(model, emb, rows.mask, *extra) if scale != 0 else None
    return legacy_sampling.generate(model, ctx, uncond, steps=steps, guidance_scale=scale, generators=gens)


def bench_pipeline(pipe: MusePipeline, cond_fn: Callable[[int], TextCondition], batch: int, steps: int,
                   sr_steps: int, scale: float, device: str, repeats: int,
                   loops: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Seconds for text, base, super-res and decode at one batch size, per loop (the loops decode the
    same inputs; text encoding and VQGAN decoding are shared)."""
    models = [pipe.base, pipe.superres]

    def run(loop: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call():
            with compiled(models, loop == "compiled"):
                return fn()
        return call

    side = pipe.superres.config.hi_tokens_per_side
    with torch.inference_mode():
        t_text, out = timed({"text": lambda: cond_fn(batch)}, device, repeats)
        cond = out["text"]
        t_base, lo = timed({m: run(m, lambda m=m: stage(pipe.base, cond, steps, scale, 0, m)) for m in loops},
                           device, repeats)
        lo_ids = lo["lean"].view(batch, pipe.base.config.tokens_per_side, -1)
        t_sr, hi = timed({m: run(m, lambda m=m: stage(pipe.superres, cond, sr_steps, scale, 0, m, lo_ids))
                          for m in loops}, device, repeats)
        t_dec, _ = timed({"decode": lambda: pipe.vqgan_hi.decode(hi["lean"].view(batch, side, side))},
                         device, repeats)
    common = t_text["text"] + t_dec["decode"]
    return {m: dict(text=t_text["text"], base=t_base[m], superres=t_sr[m], decode=t_dec["decode"],
                    total=common + t_base[m] + t_sr[m]) for m in loops}


def paper_condition(dim: int, text_len: int, device: str, dtype: torch.dtype, batch: int = 1) -> TextCondition:
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, text_len, dim, generator=g).to(device, dtype)
    return TextCondition(emb, torch.ones(batch, text_len, dtype=torch.bool, device=device))


def bench_paper_base(device: str, dtype: torch.dtype, repeats: int, scale: float, text_len: int) -> dict[str, float]:
    """base-632m at 256 px (16x16 tokens), batch 1: seconds for one guided step (a 1-step decode, so
    t = scale and both branches run), legacy and lean."""
    torch.manual_seed(0)
    base = build_component("base", preset("base-632m")).to(device=device, dtype=dtype).eval()
    cond = paper_condition(base.config.text_dim, text_len, device, dtype)
    with torch.inference_mode():
        times, _ = timed({m: (lambda m=m: stage(base, cond, 1, scale, 0, m)) for m in ("legacy", "lean")},
                         device, repeats)
    return times


def build_paper_pipeline(name: str, device: str, dtype: torch.dtype) -> MusePipeline:
    """Random-weight components of a paper model preset, without the text encoder."""
    config = model_preset(name)
    torch.manual_seed(0)
    parts = {part: build_component(part, getattr(config, part)).to(device=device, dtype=dtype).eval()
             for part in ("vqgan_lo", "base", "vqgan_hi", "superres")}
    return MusePipeline(text_encoder=None, **parts)


def bench_peer(device: str, dtype: torch.dtype, steps: int, guidance: float, repeats: dict[str, int],
               compile_too: bool = False) -> None:
    """With `compile_too`, each side also runs compiled (aMUSEd's transformer through `torch.compile`,
    ours through `compile_step`), taking turns with the eager runs; the first call of each compiles."""
    import amused_peer as peer
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its deprecation and dtype notices, once per model

    print(f"\nagainst aMUSEd (diffusers AmusedPipeline, random weights): 16x16 tokens, 8192 codes, 256 px, "
          f"{steps} steps, CFG {guidance}, batch 1, VQ decode included, text encoding excluded")
    header = (f"{'pair':<14} {'aMUSEd params':>13} {'ours params':>11} {'aMUSEd GFLOP/step':>17} {'ours GFLOP/step':>15} "
              f"{'aMUSEd s/img':>12} {'ours s/img':>10} {'speed-up':>8} {'per FLOP':>8}")
    print(header + "\n" + "-" * len(header))
    for kind in ("small", "equal"):
        pipe = peer.amused(kind, device, dtype)
        base, vqgan = peer.ours(kind, device, dtype)
        flops_peer, flops_ours = peer.flops_per_step(kind, pipe, base)
        fns = {"aMUSEd": peer.amused_runner(pipe, steps, guidance, device, dtype),
               "ours": peer.ours_runner(base, vqgan, steps, guidance, device, dtype)}
        if compile_too:
            fns["aMUSEd compiled"] = peer.amused_runner(peer.compiled_amused(pipe), steps, guidance, device, dtype)
            fns["ours compiled"] = compiled_runner([base], fns["ours"])
        times, _ = timed(fns, device, repeats[kind], warmup=kind == "small" or compile_too)
        n_peer = sum(p.numel() for p in pipe.transformer.parameters()) / 1e6
        n_ours = sum(p.numel() for p in base.parameters()) / 1e6
        for suffix in ("", " compiled") if compile_too else ("",):
            t_peer, t_ours = times["aMUSEd" + suffix], times["ours" + suffix]
            speed = t_peer / t_ours
            print(f"{(kind + suffix):<14} {n_peer:>12.1f}M {n_ours:>10.1f}M {flops_peer:>17.1f} {flops_ours:>15.1f} "
                  f"{t_peer:>12.2f} {t_ours:>10.2f} {speed:>7.2f}x {speed * flops_ours / flops_peer:>7.2f}x", flush=True)
        del pipe, base, vqgan


def bench_imported(device: str, dtype: torch.dtype, steps: int, guidance: float, batches: list[int],
                   repeats: int, size: str = "equal") -> None:
    """aMUSEd-256 (603.5M U-ViT + 146M VQ; "small": a 13M U-ViT) as diffusers runs it and as our
    pipeline runs it after import."""
    import amused_peer as peer

    pipe = peer.amused(size, device, dtype)
    uvit, vq = peer.imported(pipe, device, dtype)
    print(f"\naMUSEd-256 ({size}) imported vs diffusers, {device} {str(dtype).split('.')[-1]}, {steps} steps, CFG {guidance}, "
          f"text encoding left out, median of {repeats}:")
    header = f"{'batch':>5} {'diffusers s':>11} {'ours s':>8} {'diffusers ms/step':>17} {'ours ms/step':>12} " \
             f"{'ours s/image':>12} {'speedup':>8}"
    print(header + "\n" + "-" * len(header))
    for batch in batches:
        fns = {"diffusers": peer.amused_batch_runner(pipe, batch, steps, guidance, device, dtype),
               "ours": peer.imported_runner(uvit, vq, batch, steps, guidance, device, dtype)}
        t, outs = timed(fns, device, repeats)
        assert tuple(outs["ours"].shape) == tuple(outs["diffusers"].shape), (outs["ours"].shape, outs["diffusers"].shape)
        print(f"{batch:>5} {t['diffusers']:>11.2f} {t['ours']:>8.2f} {1e3 * t['diffusers'] / steps:>17.1f} "
              f"{1e3 * t['ours'] / steps:>12.1f} {t['ours'] / batch:>12.3f} {t['diffusers'] / t['ours']:>7.2f}x", flush=True)


def memory_step(loop: str, device: str, dtype: torch.dtype, text_len: int) -> dict[str, float]:
    """One guided super-res-268m step at batch 1 with `loop`: extra peak memory in MiB."""
    torch.manual_seed(0)
    model = build_component("superres", preset("superres-268m")).to(device=device, dtype=dtype).eval()
    cond = paper_condition(model.config.text_dim, text_len, device, dtype)
    lo = torch.randint(0, model.config.lo_codebook_size, (1, model.config.lo_tokens_per_side ** 2), device=device)
    with torch.inference_mode():
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            stage(model, cond, 1, 4.0, 0, loop, lo)
            torch.cuda.synchronize()
            return {"peak_extra_mib": (torch.cuda.max_memory_allocated() - before) / 2**20}
        reset = _reset_peak_rss()
        before = _rss_kib("VmRSS")
        start = time.perf_counter()
        stage(model, cond, 1, 4.0, 0, loop, lo)
        return {"peak_extra_mib": (_rss_kib("VmHWM") - before) / 1024, "exact": reset,
                "seconds": time.perf_counter() - start}


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def bench_memory(device: str, dtype_name: str, text_len: int) -> None:
    cfg = preset("superres-268m")
    rows, n, k = 2, cfg.hi_tokens_per_side ** 2, cfg.hi_codebook_size
    unit = rows // 2 * n * k * torch.finfo(DTYPES[dtype_name]).bits / 8 / 2**20
    print(f"\npeak memory, one guided super-res-268m step, batch 1 ({n} tokens x {k} codes; one (B, N, K) "
          f"{dtype_name} tensor = {unit:.0f} MiB, float32 = {rows // 2 * n * k * 4 / 2**20:.0f} MiB):")
    for loop in ("legacy", "lean"):
        if device.startswith("cuda"):
            result = memory_step(loop, device, DTYPES[dtype_name], text_len)
        else:  # a fresh process per loop: RSS peaks cannot be reset
            # glibc: every block of 64 KiB or more is its own mapping, returned on free, so the peak
            # RSS follows the live tensors instead of what the heap kept from earlier steps.
            env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            out = subprocess.run([sys.executable, __file__, "--memory-child", loop, "--device", device,
                                  "--dtype", dtype_name, "--text-len", str(text_len), "--threads",
                                  str(torch.get_num_threads())], capture_output=True, text=True, check=True, env=env)
            result = json.loads(out.stdout.strip().splitlines()[-1])
        note = "" if result.get("exact", True) else " (peak RSS could not be reset: includes the model build)"
        print(f"  {loop:<7} {result['peak_extra_mib']:8.0f} MiB above the model and inputs "
              f"= {result['peak_extra_mib'] / unit:.1f} (B, N, K) tensors{note}", flush=True)


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
    parser.add_argument("--compile", default="off", choices=["off", "on", "both"],
                        help="the end-to-end table with the compiled step: instead of ('on') or beside ('both') eager")
    parser.add_argument("--paper", action="store_true", help="base-632m at 256 px, one guided step, legacy vs lean")
    parser.add_argument("--paper-repeats", type=int, default=2, help="timed guided steps per loop (median)")
    parser.add_argument("--peer", action="store_true", help="aMUSEd (diffusers) vs ours, small and equal size")
    parser.add_argument("--peer-steps", type=int, default=12)
    parser.add_argument("--peer-guidance", type=float, default=10.0)
    parser.add_argument("--peer-repeats", default="small=3,equal=2", help="timed runs per pair")
    parser.add_argument("--peer-compile", action="store_true",
                        help="--peer also with both transformers compiled (torch.compile), beside eager")
    parser.add_argument("--imported", action="store_true",
                        help="aMUSEd-256 at its real size: diffusers vs our pipeline on the imported weights")
    parser.add_argument("--imported-batches", default="1,8")
    parser.add_argument("--imported-repeats", type=int, default=2)
    parser.add_argument("--imported-size", default="equal", choices=["equal", "small"],
                        help="equal: aMUSEd-256's released size; small: a 13M U-ViT (a quick check)")
    parser.add_argument("--memory", action="store_true", help="peak memory of one super-res-268m step")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    if args.memory_child:
        print(json.dumps(memory_step(args.memory_child, args.device, dtype, args.text_len)))
        return

    print(f"machine: {describe(args.device)}")
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    if batches:
        if args.model == "tiny":
            pipe = MusePipeline.from_preset("tiny", seed=0).to(args.device, dtype)
            cond_fn = lambda b: pipe.encode_prompts(["two green triangles on the left"] * b)  # noqa: E731
        else:
            pipe = build_paper_pipeline(args.model, args.device, dtype)
            cond_fn = lambda b: paper_condition(pipe.base.config.text_dim, args.text_len, args.device, dtype, b)  # noqa: E731
        loops = {"off": ("legacy", "lean"), "on": ("legacy", "compiled"), "both": ("legacy", "lean", "compiled")}[args.compile]
        print(f"model {args.model} ({pipe.resolution}x{pipe.resolution}), {args.device} {args.dtype}, "
              f"{args.steps} base + {args.superres_steps} super-res steps, guidance {args.guidance}, "
              f"median of {args.repeats} (compiled: after one warm-up decode that compiles)\n")
        header = (f"{'batch':>5} {'loop':<9} {'base ms/step':>12} {'sr ms/step':>10} {'text ms':>8} {'decode ms':>9} "
                  f"{'s/batch':>8} {'s/image':>8} {'legacy/this':>11}")
        print(header + "\n" + "-" * len(header))
        for batch in batches:
            rows = bench_pipeline(pipe, cond_fn, batch, args.steps, args.superres_steps, args.guidance, args.device,
                                  args.repeats, loops)
            for mode, r in rows.items():
                ratio = rows["legacy"]["total"] / r["total"]
                print(f"{batch:>5} {mode:<9} {1e3 * r['base'] / args.steps:>12.2f} "
                      f"{1e3 * r['superres'] / args.superres_steps:>10.2f} {1e3 * r['text']:>8.1f} "
                      f"{1e3 * r['decode']:>9.1f} {r['total']:>8.3f} {r['total'] / batch:>8.3f} {ratio:>10.2f}x",
                      flush=True)

    if args.paper:
        result = bench_paper_base(args.device, dtype, args.paper_repeats, args.guidance, args.text_len)
        print(f"\nbase-632m, 256x256 (16x16 tokens), batch 1, one guided step (cond + uncond), "
              f"{args.text_len} text tokens, median of {args.paper_repeats}:")
        for mode, sec in result.items():
            print(f"  {mode:<7} {sec:8.2f} s/step")
        print(f"  legacy/lean {result['legacy'] / result['lean']:.2f}x", flush=True)
    if args.peer:
        repeats = {k: int(v) for k, v in (kv.split("=") for kv in args.peer_repeats.split(","))}
        bench_peer(args.device, dtype, args.peer_steps, args.peer_guidance, repeats, args.peer_compile)
    if args.imported:
        bench_imported(args.device, dtype, args.peer_steps, args.peer_guidance,
                       [int(b) for b in args.imported_batches.split(",")], args.imported_repeats, args.imported_size)
    if args.memory:
        bench_memory(args.device, args.dtype, args.text_len)


if __name__ == "__main__":
    main()
