"""What a Ray Train stage costs before and after its train function: seconds per `TorchTrainer.fit()`
of a function that reports once and returns, one worker of one CPU, on a fresh local Ray.

Each setting runs in its own process (Ray Train's controller takes its settings from the driver's
environment when the driver starts it), alternating, `--fits` fits each:
- Ray's defaults (the controller polls its workers every 2 s);
- `jobs.cluster.LOCAL_DRIVER_ENV` (what a local instance of the jobs gets).

Prints the machine and its load average with the table.

    python benchmarks/train_start.py [--fits 3] [--rounds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import describe, load_averages  # noqa: E402

from jobs.cluster import LOCAL_DRIVER_ENV  # noqa: E402


def report_once(config: dict) -> None:
    import ray.train

    ray.train.report({"done": 1})


def fits(n: int) -> list[float]:
    """n fits in this process, on a local Ray of 8 logical CPUs; seconds each."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    seconds = []
    with tempfile.TemporaryDirectory() as storage:
        for i in range(n):
            start = time.perf_counter()
            TorchTrainer(report_once, scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                         run_config=RunConfig(name=f"fit{i}", storage_path=storage)).fit()
            seconds.append(time.perf_counter() - start)
    ray.shutdown()
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fits", type=int, default=3, help="fits per process")
    parser.add_argument("--rounds", type=int, default=1, help="processes per setting, alternating")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(fits(args.child)))
        return

    print(f"machine: {describe()}", flush=True)
    base = {k: v for k, v in os.environ.items() if k not in LOCAL_DRIVER_ENV}
    settings = {"Ray's defaults": base, f"LOCAL_DRIVER_ENV {LOCAL_DRIVER_ENV}": base | LOCAL_DRIVER_ENV}
    times: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.rounds):
        for name, env in settings.items():
            out = subprocess.run([sys.executable, __file__, "--child", str(args.fits)], env=env, cwd=REPO,
                                 capture_output=True, text=True, check=True).stdout
            times[name] += json.loads(out.strip().splitlines()[-1])
    print(f"\nload average {load_averages()} at the end\n")
    print("| driver settings | seconds per fit (the first on a fresh Ray first) | mean of the rest |\n|---|---|---:|")
    for name, t in times.items():
        rest = [x for i, x in enumerate(t) if i % args.fits]
        mean = sum(rest) / len(rest) if rest else float("nan")
        print(f"| {name} | {' / '.join(f'{x:.1f}' for x in t)} | {mean:.1f} |")


if __name__ == "__main__":
    main()
