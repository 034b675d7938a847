"""Tokenization throughput: the Ray Data pipeline against a plain single-process loop, same files.

Both paths run the same code on the same synthetic corpus (PNG at --size px, in Parquet): read,
decode + resize (pipelines.preprocess), VQGAN-lo and VQGAN-hi encode, caption tokenization. The loop
also times each step, which says what the bottleneck is. The Ray figures are end to end, and
without the Ray start (actor start-up stays in), and the bytes per image each stage hands on. On a
GPU (`--device cuda`) each VQGAN actor holds both VQGANs on one GPU and the table adds images/s per
GPU and how busy the GPU was (nvidia-smi samples while the pipeline runs). Model weights are random: throughput does not depend on them.

    python benchmarks/tokenize_throughput.py [--n 512] [--size 256] [--preset tiny] [--results benchmarks/RESULTS.md]
"""

from __future__ import annotations

import os
import sys

# This file shares its name with the standard library's `tokenize` (which `inspect`, `linecache`
# and friends import): run as a script, its folder would shadow it, so take the folder off the path.
if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)
# The repo root, at the end so it shadows nothing, for benchmarks.machine.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import io
import re
import subprocess
import tempfile
import threading
import time
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from benchmarks.machine import describe
from muse.checkpoint import component_uri, init_model_root, load_component, save_component
from muse.config import MODEL_PRESETS, from_dict, preset
from muse.data.images import uint8_to_tensor
from muse.data.synthetic import write_corpus
from muse.text import TextEncoder
from pipelines.config import TokenizeConfig
from pipelines.preprocess import preprocess_batch
from pipelines.readers import plan_parts, read_part
from pipelines.tokenize import load_tokenizer, resolve_models, run

SECTION = "## Tokenization (benchmarks/tokenize_throughput.py)"


def model_root(preset_name: str, root: str) -> None:
    """vqgan_lo, vqgan_hi of the preset; the offline t5-tiny text encoder (T5-XXL needs its files)."""
    init_model_root(preset_name, root, components=("vqgan_lo", "vqgan_hi"))
    save_component(TextEncoder.build(preset("t5-tiny")), component_uri(root, "text_encoder"))


def plain_loop(corpus: str, root: str, out: str, cfg: TokenizeConfig, device: str) -> dict:
    """One process, no Ray: read -> preprocess -> encode -> write, one part at a time."""
    start = time.perf_counter()
    lo = load_component(component_uri(root, "vqgan_lo"), device=device)
    hi = load_component(component_uri(root, "vqgan_hi"), device=device)
    tokenizer, max_length = load_tokenizer(component_uri(root, "text_encoder"))
    lo_size, hi_size = lo.config.resolution, hi.config.resolution
    timing = {"read": 0.0, "decode": 0.0, "vqgan_lo": 0.0, "vqgan_hi": 0.0, "text": 0.0, "write": 0.0}
    n = 0
    os.makedirs(out, exist_ok=True)

    def tick(step: str, t0: float) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        timing[step] += now - t0
        return now

    for part in plan_parts(corpus, "parquet", cfg.reader):
        t = time.perf_counter()
        blocks = list(read_part(part, cfg.reader))
        t = tick("read", t)
        batch = pa.concat_tables([preprocess_batch(b, lo_size=lo_size, hi_size=hi_size, cfg=cfg.preprocess)
                                  for b in blocks])
        batch = batch.filter(pc.equal(batch["part_rows"], -1))
        t = tick("decode", t)
        columns = {}
        for name, model, size, bs in (("lo", lo, lo_size, cfg.vqgan_lo.batch_size),
                                      ("hi", hi, hi_size, cfg.vqgan_hi.batch_size)):
            raw = batch[f"pixels_{name}"].to_pylist()
            ids = []
            for i in range(0, len(raw), bs):
                chunk = raw[i:i + bs]
                pixels = np.frombuffer(b"".join(chunk), np.uint8).reshape(len(chunk), size, size, 3)
                with torch.inference_mode():
                    ids.append(model.encode(uint8_to_tensor(pixels).to(device)).flatten(1).cpu())
            columns[f"tokens_{name}"] = torch.cat(ids).to(torch.int16).numpy().tolist()
            t = tick(f"vqgan_{name}", t)
        columns["text_ids"] = tokenizer(batch["caption"].to_pylist(), truncation=True,
                                        max_length=max_length)["input_ids"]
        t = tick("text", t)
        table = pa.table({"key": batch["key"], "caption": batch["caption"], **columns})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        with open(os.path.join(out, f"{part.id}.parquet"), "wb") as f:
            f.write(buf.getvalue())
        tick("write", t)
        n += table.num_rows
    seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "per_image_ms": {k: 1000 * v / max(n, 1) for k, v in timing.items()}}


class GPUSampler:
    """Mean GPU utilisation (%) from nvidia-smi, sampled every 0.2 s while running."""

    def __init__(self):
        self.samples: list[float] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.2)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def ray_pipeline(corpus: str, root: str, out: str, cfg: TokenizeConfig) -> dict:
    import ray

    start = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False,
                 log_to_driver=False)
    ready = time.perf_counter()
    with GPUSampler() if torch.cuda.is_available() and cfg.vqgan_lo.num_gpus else _Null() as gpu:
        totals = run(corpus, out, resolve_models(root), cfg, progress=False)
    end = time.perf_counter()
    return {"images": totals["accepted"], "seconds": end - start, "ray_init_s": ready - start,
            "gpu_util": getattr(gpu, "mean", None), "bytes_out": bytes_out(totals["stats"])}


def bytes_out(stats: str) -> dict[str, int]:
    """{operator: bytes of the blocks it output} from `Dataset.stats()`: what each stage hands on
    through the object store (the last one, the writers, outputs only small records)."""
    out, name = {}, None
    for line in stats.splitlines():
        head = re.match(r"\s*Operator \d+ (.+?): ", line)
        if head:
            name = head.group(1)
            while name in out:  # two operators of one UDF (one pool per VQGAN)
                name += "'"
            out[name] = 0
        total = re.search(r"Output size bytes per block: .* (\d+) total", line)
        if total and name:
            out[name] += int(total.group(1))
    return {k: v for k, v in out.items() if v}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def bench_config(device: str, cores: int) -> TokenizeConfig:
    if device == "cuda":
        return from_dict(TokenizeConfig, {
            "reader": {"rows_per_part": 256},
            "preprocess": {"num_cpus": 1, "batch_size": 32},
            "vqgan_lo": {"num_gpus": 1, "num_cpus": 1, "batch_size": 128},  # both VQGANs per actor
            "vqgan_hi": {"batch_size": 64},
            "text": {"num_cpus": 1, "batch_size": 256},
        })
    # CPU: half-CPU actors, like configs/tokenize-local.yaml; decode tasks fill the rest. The VQGAN
    # pool (each actor holds both VQGANs) gets the actors two one-model pools would have had.
    return from_dict(TokenizeConfig, {
        "reader": {"rows_per_part": 32},
        "preprocess": {"num_cpus": 0.5, "batch_size": 16},
        "vqgan_lo": {"num_cpus": 0.5, "batch_size": 16, "max_size": 2 * max(1, cores // 4)},
        "vqgan_hi": {"batch_size": 16},
        "text": {"num_cpus": 0.5, "batch_size": 64},
    })


def table(args, mach: str, loop: dict, ray_: dict) -> str:
    loop_rate = loop["images"] / loop["seconds"]
    ray_rate = ray_["images"] / ray_["seconds"]
    after_init = ray_["images"] / (ray_["seconds"] - ray_["ray_init_s"])
    steps = loop["per_image_ms"]
    model_ms = steps["vqgan_lo"] + steps["vqgan_hi"] + steps["text"]
    lines = [
        f"Machine: {mach}. Corpus: {args.n} synthetic PNGs at {args.size}px in Parquet; preset "
        f"`{args.preset}` VQGANs (random weights), t5-tiny tokenizer (ids); device {args.device}.",
        "",
        "| path | images | seconds | images/s |",
        "|---|---:|---:|---:|",
        f"| plain single-process loop | {loop['images']} | {loop['seconds']:.1f} | {loop_rate:.1f} |",
        f"| Ray Data pipeline, end to end | {ray_['images']} | {ray_['seconds']:.1f} | {ray_rate:.1f} |",
        f"| Ray Data pipeline, without the {ray_['ray_init_s']:.1f}s Ray start (actor start-up included) | "
        f"{ray_['images']} | {ray_['seconds'] - ray_['ray_init_s']:.1f} | {after_init:.1f} |",
        "",
        "Bytes per image each pipeline stage hands on (Ray Data's block sizes): "
        + ", ".join(f"{k} {v / max(ray_['images'], 1):,.0f}" for k, v in ray_["bytes_out"].items()) + ".",
        "",
        "Plain loop, ms per image by step: " + ", ".join(f"{k} {v:.1f}" for k, v in steps.items())
        + f". Models take {model_ms / max(sum(steps.values()), 1e-9):.0%} of the time, decoding "
        f"{steps['decode'] / max(sum(steps.values()), 1e-9):.0%}.",
    ]
    if ray_.get("gpu_util") is not None:
        lines.append(f"GPU: {ray_rate:.1f} images/s per GPU end to end; mean utilisation {ray_['gpu_util']:.0f}%.")
    return "\n".join(lines)


def write_section(path: str, body: str) -> None:
    """Replace (or append) only this benchmark's section of RESULTS.md."""
    text = open(path).read() if os.path.exists(path) else "# Benchmark results\n"
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{body}\n"
    else:
        nxt = text.find("\n## ", start + len(SECTION))
        rest = text[nxt:] if nxt != -1 else "\n"
        text = text[:start] + f"{SECTION}\n\n{body}\n" + rest
    with open(path, "w") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=512, help="images in the corpus (default 512)")
    parser.add_argument("--size", type=int, default=256, help="side of the source images (default 256)")
    parser.add_argument("--preset", default="tiny", choices=sorted(MODEL_PRESETS),
                        help="model preset whose VQGANs tokenize (default tiny)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=("cpu", "cuda"))
    parser.add_argument("--results", help="write this section into RESULTS.md at this path")
    args = parser.parse_args(argv)

    mach = describe(args.device)
    cfg = bench_config(args.device, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, root = os.path.join(tmp, "corpus"), os.path.join(tmp, "root")
        write_corpus(corpus, args.n, size=args.size, seed=0, shard_size=256)
        model_root(args.preset, root)
        if args.device == "cpu":
            torch.set_num_threads(os.cpu_count() or 1)
        loop = plain_loop(corpus, root, os.path.join(tmp, "loop"), cfg, args.device)
        ray_ = ray_pipeline(corpus, root, os.path.join(tmp, "ray"), replace(cfg))
    body = table(args, mach, loop, ray_)
    print(body)
    if args.results:
        write_section(args.results, body)


if __name__ == "__main__":
    main()
