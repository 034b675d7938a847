"""Tokenization at corpus scale: does the driver stay flat as the corpus grows?

For each corpus size (tiny synthetic PNGs of 32-64 px in Parquet files of 1,000 rows, a random
`tiny` model root with the low-res VQGAN and the ByT5 tokenizer, text ids) it runs, in the same
invocation and on the same local Ray:

- the Ray Data pipeline (`pipelines.tokenize.run`) with whole parts in the VQGAN actors (read,
  decoded, encoded and written there: what CPU actors get) and, with `--placements actors tasks`,
  with read, decoding and write tasks beside the actors (what GPU actors get), each in its own driver process joined to the Ray started here, so the driver's CPU-seconds
  and peak RSS are those of the driver process alone (`getrusage(RUSAGE_SELF)`; workers, raylet and
  GCS are other processes). The CPU-seconds of the coordinator actor that runs Ray Data's streaming
  executor are reported beside them;
- the plain single-process loop as the naive baseline: the same reader, preprocessing, model UDFs
  and shard writer called one after the other in one process, torch on every core.

Goals (issue 12): the 32k run's driver CPU-seconds at most 1.5x the 2k run's, driver RSS flat, the
pipeline faster than the loop. Prints the machine and its load average with the table.

    python benchmarks/tokenize_scale.py [--sizes 2000 8000 32000] [--placements actors tasks] [--work DIR]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.machine import describe, load_averages  # noqa: E402

ROWS_PER_FILE = 1000
CONFIG = {  # sized for throughput on a few cores; see configs/tokenize-*.yaml for real runs
    # One block per part: Ray Data's scheduling costs the driver per task, so per block.
    "reader": {"rows_per_part": 1000, "block_rows": 1000},
    "preprocess": {"num_cpus": 0.5, "batch_size": 250},
    "vqgan_lo": {"num_cpus": 1, "min_size": 2, "max_size": 2, "batch_size": 250},  # one actor per core, from the start
    "text": {"num_cpus": 0.5, "batch_size": 500},
    "write_cpus": 0.25,
}


def write_corpus(folder: str, n: int) -> None:
    """n synthetic images of 32-64 px with captions, ROWS_PER_FILE rows per Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from muse.data import synthetic

    os.makedirs(folder, exist_ok=True)
    pairs = synthetic.all_pairs()
    for start in range(0, n, ROWS_PER_FILE):
        images, captions = [], []
        for i in range(start, min(n, start + ROWS_PER_FILE)):
            scene, img = synthetic.sample(i, seed=7, size=32 + (i * 7) % 33, allowed_pairs=pairs)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            images.append(buf.getvalue())
            captions.append(synthetic.caption(scene))
        pq.write_table(pa.table({"image": images, "caption": captions}),
                       os.path.join(folder, f"c{start // ROWS_PER_FILE:05d}.parquet"))


def corpus_of(work: str, n: int, full: str) -> str:
    """The first n images of the full corpus, as links to its files."""
    folder = os.path.join(work, f"corpus-{n}")
    os.makedirs(folder, exist_ok=True)
    for k in range(-(-n // ROWS_PER_FILE)):
        name = f"c{k:05d}.parquet"
        if not os.path.exists(os.path.join(folder, name)):
            os.symlink(os.path.join(full, name), os.path.join(folder, name))
    return folder


def _rss_mb(field: str = "VmRSS") -> float:
    """This process's resident set (VmRSS) or its peak (VmHWM: unlike ru_maxrss, not inherited from
    the parent's size at fork)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def as_driver(corpus: str, out: str, root: str, placement: str) -> dict:
    """One tokenization job; this process is its driver."""
    from muse.config import from_dict
    from pipelines.config import TokenizeConfig
    from pipelines.tokenize import resolve_models, run

    cfg = from_dict(TokenizeConfig, CONFIG | {"preprocess": CONFIG["preprocess"] | {"placement": placement}})
    models = resolve_models(root)
    cpu0, rss0, start = _cpu_s(), _rss_mb(), time.time()
    totals = run(corpus, out, models, cfg, progress=False)
    return {"seconds": time.time() - start, "accepted": totals["accepted"], "cpu_s": _cpu_s() - cpu0,
            "coordinator_cpu_s": totals["coordinator_cpu_s"],
            "cpu_s_process": _cpu_s(), "rss_start_mb": rss0,
            "rss_peak_mb": _rss_mb("VmHWM")}


def as_loop(corpus: str, out: str, root: str) -> dict:
    """The naive baseline: read -> preprocess -> VQGAN -> text -> write, one batch at a time."""
    from muse.config import from_dict
    from pipelines import readers, shards
    from pipelines.config import TokenizeConfig
    from pipelines.models import TextTokens, VQGANTokens
    from pipelines.preprocess import preprocess_batch
    from pipelines.tokenize import resolve_models

    import torch  # noqa: F401 - imported before the clock starts, as a loop script does at its top

    cfg = from_dict(TokenizeConfig, CONFIG)
    models = resolve_models(root)
    start = time.time()
    cores = os.cpu_count() or 1
    vqgan = VQGANTokens(models.vqgan_lo, "pixels_lo", "tokens_lo", "cpu", "fp32", num_cpus=cores)
    text = TextTokens(models.text_encoder, "ids", "cpu", "fp32", num_cpus=cores)
    size = vqgan.size
    meta = {"tokens_lo_side": size // 2 ** (len(vqgan.model.config.channel_mult) - 1), "tokens_hi_side": None,
            "text_storage": "ids", "text_dim": None}
    schema = shards.shard_schema(has_hi=False, text_storage="ids", meta=meta)
    accepted = 0
    for part in readers.plan_parts(corpus, "auto", cfg.reader):
        for block in readers.read_part(part, cfg.reader):
            batch = preprocess_batch(block, lo_size=size, hi_size=None, cfg=cfg.preprocess)
            batch = text(vqgan(batch))
            records = shards.write_block(batch, out=out, run="loop", schema=schema, examples=5)
            accepted += sum(records["accepted"].to_pylist())
    return {"seconds": time.time() - start, "accepted": accepted}


def child(mode: str, corpus: str, out: str, root: str, env: dict | None = None, placement: str | None = None) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--{mode}", corpus, "--out", out, "--root", root]
    cmd += ["--placement", placement] if placement else []
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000, 32000])
    parser.add_argument("--placements", nargs="+", choices=["actors", "tasks"], default=["actors"],
                        help="preprocess.placement: whole parts in the actors, or tasks beside them; each is "
                             "run at every size")
    parser.add_argument("--work", help="folder for the corpus, model root and outputs (default: a temp dir)")
    parser.add_argument("--driver", metavar="CORPUS", help=argparse.SUPPRESS)
    parser.add_argument("--loop", metavar="CORPUS", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--placement", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver or args.loop:
        result = (as_driver(args.driver, args.out, args.root, args.placement) if args.driver
                  else as_loop(args.loop, args.out, args.root))
        print(json.dumps(result), flush=True)
        return

    import ray

    from muse.checkpoint import init_model_root

    work = args.work or tempfile.mkdtemp(prefix="tokenize_scale-")
    root, full = os.path.join(work, "root"), os.path.join(work, "corpus")
    if not os.path.exists(root):
        init_model_root("tiny", root, seed=0, components=("text_encoder", "vqgan_lo"))
    if not os.path.exists(os.path.join(full, f"c{(max(args.sizes) - 1) // ROWS_PER_FILE:05d}.parquet")):
        t = time.time()
        write_corpus(full, max(args.sizes))
        print(f"corpus of {max(args.sizes)} images written in {time.time() - t:.0f}s", flush=True)
    print(f"machine: {describe()}", flush=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
    env = dict(os.environ, RAY_ADDRESS=ray.get_runtime_context().gcs_address, PYTHONPATH=REPO)
    rows = []
    for n in args.sizes:
        corpus = corpus_of(work, n, full)
        before = load_averages()
        pipes = {p: child("driver", corpus, os.path.join(work, f"tokens-{n}-{p}-{time.time():.0f}"), root, env, p)
                 for p in args.placements}
        loop = child("loop", corpus, os.path.join(work, f"loop-{n}-{time.time():.0f}"), root)
        for placement, pipe in pipes.items():
            assert pipe["accepted"] == loop["accepted"] == n, (pipe, loop)
            rows.append((n, placement, pipe, loop, f"{before} -> {load_averages()}"))
            print(json.dumps({"images": n, "placement": placement, "pipeline": pipe, "loop": loop}), flush=True)
    ray.shutdown()

    print(f"\nmachine at the end: {describe()}\n")
    print("| images | decoding in | pipeline s | pipeline images/s | driver CPU-s (run / process) | driver CPU, % of a core "
          "| coordinator CPU-s | driver ms CPU per image | driver RSS MB (start of run / peak) | plain loop s "
          "| loop images/s | load average (1/5/15 min, before -> after) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for n, placement, pipe, loop, loads in rows:
        print(f"| {n:,} | {placement} | {pipe['seconds']:.1f} | {n / pipe['seconds']:.0f} | {pipe['cpu_s']:.1f} / "
              f"{pipe['cpu_s_process']:.1f} | {100 * pipe['cpu_s'] / pipe['seconds']:.1f} | "
              f"{pipe['coordinator_cpu_s']:.1f} | "
              f"{1000 * pipe['cpu_s'] / n:.3f} | {pipe['rss_start_mb']:.0f} / {pipe['rss_peak_mb']:.0f} | "
              f"{loop['seconds']:.1f} | {n / loop['seconds']:.0f} | {loads} |")
    print()
    for placement in args.placements:
        mine = [(n, pipe, loop) for n, p, pipe, loop, _ in rows if p == placement]
        first = mine[0][1]
        for n, pipe, loop in mine:
            print(f"decoding in {placement}, {n:,} images: pipeline {loop['seconds'] / pipe['seconds']:.2f}x the "
                  f"loop's speed; vs {mine[0][0]:,} images: driver CPU-s of the run "
                  f"{pipe['cpu_s'] / first['cpu_s']:.2f}x, peak RSS {pipe['rss_peak_mb'] / first['rss_peak_mb']:.2f}x")


if __name__ == "__main__":
    main()
