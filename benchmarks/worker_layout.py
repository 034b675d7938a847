"""How to lay out a CPU node's cores for one training stage: one worker with several torch threads, or
several one-thread workers under DDP. Runs a stage of `configs/demo.yaml` in Ray Train on a `make demo`
output's tokens for each layout "WORKERSxCPUSxBATCH" (batch per worker, so keep WORKERS x BATCH equal to
compare the same global batch), alternating, and reports steps/s over the last `--log-every` steps and
each fit's seconds.

Each worker gets one torch thread per CPU (`jobs.parallel.configure_cpu_worker`). The run's checkpoint
goes to a scratch copy of the demo's model root, so the demo output is not changed.

    python benchmarks/worker_layout.py --demo demo_output                      # base: 1x1x32, 1x2x32, 2x1x16
    python benchmarks/worker_layout.py --demo demo_output --stage superres --layouts 1x1x16,2x1x8
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe, load_averages  # noqa: E402

DEFAULT_LAYOUTS = {"base": "1x1x32,1x2x32,2x1x16", "superres": "1x1x16,1x2x16,2x1x8"}


def parse_layout(text: str) -> tuple[int, float, int]:
    workers, cpus, batch = text.lower().split("x")
    return int(workers), float(cpus), int(batch)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", required=True, help="a `make demo` output directory (tokens/ and checkpoint/)")
    parser.add_argument("--stage", choices=sorted(DEFAULT_LAYOUTS), default="base")
    parser.add_argument("--layouts", default=None, help="comma-separated WORKERSxCPUSxBATCH (batch per worker)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--log-every", type=int, default=100, help="steps/s is taken over the last window")
    parser.add_argument("--rounds", type=int, default=1, help="passes over the layouts, alternating")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray")
    args = parser.parse_args(argv)

    import ray

    from jobs.cluster import join_ray
    from jobs.config import load_config
    from jobs.demo import DEFAULT_CONFIG
    from jobs.fit import worker_env
    from jobs.stages import run_stage

    layouts = [parse_layout(t) for t in (args.layouts or DEFAULT_LAYOUTS[args.stage]).split(",")]
    print(f"machine: {describe()}", flush=True)
    # As the jobs join Ray; the workers import this checkout, as this process does.
    started_ray = join_ray(worker_env(), num_cpus=args.num_cpus, include_dashboard=False,
                           local_env={"OMP_NUM_THREADS": "1", "PYTHONPATH": REPO})
    try:
        s, tokens, rows = args.stage, os.path.join(args.demo, "tokens"), []
        with tempfile.TemporaryDirectory() as scratch:
            root = os.path.join(scratch, "root")
            shutil.copytree(os.path.join(args.demo, "checkpoint"), root, ignore=shutil.ignore_patterns("runs", "samples"))
            for round_ in range(args.rounds):
                for i, (workers, cpus, batch) in enumerate(layouts):
                    cfg = load_config(DEFAULT_CONFIG, [
                        f"{s}.run.max_steps={args.steps}", f"{s}.run.checkpoint_every={args.steps}",
                        f"{s}.run.sample_every=0", f"{s}.run.log_every={args.log_every}", f"{s}.run.progress=false",
                        f"{s}.run.name=layout{round_}_{i}", f"{s}.scaling.num_workers={workers}",
                        f"{s}.scaling.cpus_per_worker={cpus}", f"{s}.run.batch_size={batch}"])
                    start = time.perf_counter()
                    [result] = run_stage(s, cfg, tokens, root)
                    fit_s = time.perf_counter() - start
                    steps_per_s = result.metrics["samples_per_s_per_worker"] / batch
                    rows.append((f"{workers}x{cpus:g}x{batch}", steps_per_s, fit_s))
                    print(f"{rows[-1][0]}: {steps_per_s:.2f} step/s, fit {fit_s:.0f} s", flush=True)
    finally:
        if started_ray:  # a failed fit must not leave the Ray this script started behind
            ray.shutdown()
    print(f"\nload average {load_averages()} at the end\n")
    print(f"{s}, {args.steps} steps per fit, steps/s over the last {args.log_every}\n")
    print("| workers x CPUs x batch per worker | step/s | fit s |\n|---|---:|---:|")
    for name, rate, fit_s in rows:
        print(f"| {name} | {rate:.2f} | {fit_s:.0f} |")


if __name__ == "__main__":
    main()
