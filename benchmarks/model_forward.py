"""Parameter counts of every preset and forward throughput (image tokens/s) of the transformers.

Compares, in the same run, the forward with the text K/V precomputed once (what sampling does)
against the naive forward that re-encodes the context every call. CPU by default; on a GPU pass
`--device cuda --dtype bf16`.

    python benchmarks/model_forward.py [--presets base-tiny,superres-tiny,base-632m] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from machine import describe
from muse.checkpoint import KINDS, kind_of_config, parameter_count
from muse.config import PRESETS, BaseTransformerConfig, SuperResTransformerConfig
from muse.transformer import MaskedTransformer, SuperResTransformer


def parameter_table() -> list[tuple[str, str, int]]:
    rows = []
    for name, cfg in PRESETS.items():
        if getattr(cfg, "name_or_path", None):  # pretrained: its size comes from its files
            continue
        kind = kind_of_config(cfg)
        role = KINDS[kind].role
        rows.append((name, kind, parameter_count("vqgan_lo" if role == "vqgan" else role, cfg)))
    return rows


def _once(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _paired_medians(a, b, device: str, repeats: int) -> tuple[float, float]:
    """Median seconds of a and b, run in turns so load changes on a shared machine hit both alike."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_once(a, device))
        tb.append(_once(b, device))
    return statistics.median(ta), statistics.median(tb)


@torch.inference_mode()
def throughput(name: str, batch: int, device: str, dtype: torch.dtype, repeats: int, text_len: int = 32):
    cfg = PRESETS[name]
    model = (MaskedTransformer if isinstance(cfg, BaseTransformerConfig) else SuperResTransformer)(cfg)
    model = model.to(device=device, dtype=dtype).eval()
    text = torch.randn(batch, text_len, cfg.text_dim, device=device, dtype=dtype)
    mask = torch.ones(batch, text_len, dtype=torch.bool, device=device)
    extra = ()
    if isinstance(cfg, SuperResTransformerConfig):
        extra = (torch.randint(0, cfg.lo_codebook_size, (batch, cfg.lo_tokens_per_side**2), device=device),)
    ids = torch.randint(0, model.codebook_size, (batch, model.num_tokens), device=device)
    ctx = model.encode_context(text, mask, *extra)
    cached, naive = _paired_medians(lambda: model(ids, ctx),
                                    lambda: model(ids, model.encode_context(text, mask, *extra)), device, repeats)
    tokens = batch * model.num_tokens
    return tokens / cached, tokens / naive


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="base-tiny,superres-tiny,base-632m,superres-268m")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args(argv)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    print(f"machine: {describe(args.device)}\n")
    print(f"| {'preset':<16} | {'kind':<12} | {'parameters':>15} |")
    print(f"|{'-' * 18}|{'-' * 14}|{'-' * 17}|")
    for name, kind, n in parameter_table():
        print(f"| {name:<16} | {kind:<12} | {n:>15,} |")

    print(f"\nforward throughput, batch {args.batch}, {args.device} {args.dtype}"
          " (image tokens/s; cached = text K/V computed once, naive = re-encoded every call)\n")
    print(f"| {'preset':<16} | {'cached tok/s':>13} | {'naive tok/s':>12} | {'speed-up':>8} |")
    print(f"|{'-' * 18}|{'-' * 15}|{'-' * 14}|{'-' * 10}|")
    for name in args.presets.split(","):
        cached, naive = throughput(name, args.batch, args.device, dtype, args.repeats)
        print(f"| {name:<16} | {cached:>13,.0f} | {naive:>12,.0f} | {cached / naive:>7.2f}x |")


if __name__ == "__main__":
    main()
