"""Load time and peak memory of one model-root component, each load in a fresh process.

    python benchmarks/load.py --preset base-632m --root /tmp/load_bench

Writes a random component of the preset once (kept for reruns), then loads it `--repeats` times with
`muse.checkpoint.load_component`, each in its own Python process, and reports the wall time of the
load and the process's peak RSS above what it held before loading (imports, allocator).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from machine import describe

# Peak RSS from VmHWM: ru_maxrss survives exec, so a child would report its parent's peak.
CHILD = """
import json, sys, time
import torch
from muse import checkpoint
def hwm():
    return int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0])
before = hwm()
t = time.perf_counter()
model = checkpoint.load_component(sys.argv[1])
seconds = time.perf_counter() - t
peak = hwm()
params = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"seconds": seconds, "peak_rss_gb": (peak - before) / 2**20, "weights_gb": params / 2**30}))
"""


def write_component(preset_name: str, uri: str) -> None:
    import torch

    from muse import checkpoint
    from muse.config import preset

    cfg = preset(preset_name)
    kind = checkpoint.kind_of_config(cfg)
    role = checkpoint.KINDS[kind].role
    torch.manual_seed(0)
    model = checkpoint.build_component("vqgan_lo" if role == "vqgan" else role, cfg)
    checkpoint.save_component(model, uri)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="base-632m")
    parser.add_argument("--root", default="/tmp/muse_load_bench")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    print(f"machine: {describe()}", flush=True)
    uri = os.path.join(args.root, args.preset)
    if not os.path.exists(os.path.join(uri, "config.json")):
        t = time.perf_counter()
        write_component(args.preset, uri)
        print(f"wrote {uri} in {time.perf_counter() - t:.1f} s")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = []
    for _ in range(args.repeats):
        out = subprocess.run([sys.executable, "-c", CHILD, uri], capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    best = min(runs, key=lambda r: r["seconds"])
    print(json.dumps({"preset": args.preset, "weights_gb": round(best["weights_gb"], 2),
                      "load_s": [round(r["seconds"], 2) for r in runs],
                      "peak_rss_gb": [round(r["peak_rss_gb"], 2) for r in runs]}))


if __name__ == "__main__":
    main()
