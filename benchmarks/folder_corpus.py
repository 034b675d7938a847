"""Folder corpora at scale: does the driver's memory stay flat as the corpus grows, and how fast
does a part come off a slow S3 prefix?

Planning. A folder corpus laid out as image downloaders write one (folders of 10,000 images, each with a
sidecar caption: `00042/000420017.jpg` + `.txt`; the files are empty, since planning never opens
them) is planned by `pipelines.readers.plan_parts`, each time in a fresh process:

- kept: every part keeps its image list in memory (no spill folder), the naive way and what the
  driver did before plan files;
- spilled: the image lists go to plan files (`pipelines.folder_plan`), what `muse tokenize` does;
- with `--before DIR` (a checkout of an earlier commit, e.g. `git worktree add DIR 1a7a64f`), that
  code's planning too: a whole listing, then every part's list in memory.

Reported per size: the process's peak RSS (VmHWM, which includes the ~100 MB of Python, pyarrow
and the readers' imports), planning seconds, parts, and the plan files' size. Prints the machine and
its load average with the table.

Reading. A part of `--reads` images with sidecar captions on a real S3-compatible server on loopback
(moto), behind a real proxy that holds every request `--latency` seconds (a store's time to first
byte; tests/fault_proxy.py): the part read with one file at a time (the naive way, what the reader
did before) and with `FOLDER_READS_IN_FLIGHT` at once.

    python benchmarks/folder_corpus.py [--sizes 50000 200000 800000] [--work DIR] [--before DIR]
                                       [--reads 200] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.tokenize_scale import load, machine  # noqa: E402

PER_FOLDER = 10_000

PLAN = """
import json, sys, time
from pipelines.config import ReaderConfig
from pipelines.readers import plan_parts
root, spill = sys.argv[1], sys.argv[2] or None
start = time.perf_counter()
parts = plan_parts(root, "folder", ReaderConfig(), **({"spill": spill} if spill else {}))
seconds = time.perf_counter() - start
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "parts": len(parts), "peak_mb": peak / 1024,
                  "images": sum(p.stop - p.start for p in parts)}))
"""


def make_corpus(root: str, n: int) -> None:
    for i in range(n):
        if i % PER_FOLDER == 0:
            folder = os.path.join(root, f"{i // PER_FOLDER:05d}")
            os.makedirs(folder, exist_ok=True)
        for ext in ("jpg", "txt"):
            with open(os.path.join(folder, f"{i:09d}.{ext}"), "wb"):
                pass


def plan(root: str, spill: str | None, code: str = REPO) -> dict:
    out = subprocess.run([sys.executable, "-c", PLAN, root, spill or ""], cwd=code, check=True,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=code))
    return json.loads(out.stdout.strip().splitlines()[-1])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def s3_reads(n: int, latency: float) -> None:
    """The reading table (module docstring)."""
    import boto3
    from moto.server import ThreadedMotoServer

    sys.path.insert(0, os.path.join(REPO, "tests"))
    from fault_proxy import FaultProxy
    from PIL import Image

    from muse import storage
    from pipelines import readers
    from pipelines.config import ReaderConfig

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint, AWS_ENDPOINT_URL_S3=endpoint)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket="folder-bench")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(buf, format="JPEG")
    for i in range(n):
        storage.write_bytes(f"s3://folder-bench/corpus/{i:06d}.jpg", buf.getvalue())
        storage.write_bytes(f"s3://folder-bench/corpus/{i:06d}.txt", f"a red square, number {i}".encode())
    proxy = FaultProxy((host, port), throttle=0.0, drop=0.0, latency=latency)
    os.environ.update(AWS_ENDPOINT_URL=proxy.url, AWS_ENDPOINT_URL_S3=proxy.url)
    cfg = ReaderConfig(rows_per_part=n, block_rows=256)
    (part,) = readers.plan_parts("s3://folder-bench/corpus", "folder", cfg)
    print(f"\n{n} images + {n} captions on S3 (moto on loopback), {latency * 1000:.0f} ms per request:")
    print("| files in flight | seconds | images/s | requests |")
    print("|---:|---:|---:|---:|")
    in_flight = readers.FOLDER_READS_IN_FLIGHT
    try:
        for k in (1, in_flight):
            readers.FOLDER_READS_IN_FLIGHT = k
            before = sum(proxy.counts.values())
            start = time.perf_counter()
            rows = sum(b.num_rows for b in readers.read_part(part, cfg)) - 1
            seconds = time.perf_counter() - start
            assert rows == n
            print(f"| {k} | {seconds:.2f} | {n / seconds:.0f} | {sum(proxy.counts.values()) - before} |", flush=True)
    finally:
        readers.FOLDER_READS_IN_FLIGHT = in_flight
        proxy.close()
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 800_000])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted)")
    parser.add_argument("--before", default=None, help="a checkout of earlier code, planned the same way as a peer")
    parser.add_argument("--reads", type=int, default=200, help="images in the S3 part read (0: skip)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the proxy holds each S3 request")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="folder-planning-")
    print(f"machine: {machine()}; load average {load()} at start")
    before = "| before: peak RSS | before: s " if args.before else ""
    print(f"| images {before}| kept: peak RSS | kept: s | spilled: peak RSS | spilled: s | parts | plan files |")
    print("|---:" * (7 + 2 * bool(args.before)) + "|")
    try:
        for n in args.sizes:
            root = os.path.join(work, f"corpus{n}")
            make_corpus(root, n)
            kept = plan(root, None)
            spill = os.path.join(work, f"plan{n}")
            spilled = plan(root, spill)
            assert kept["images"] == spilled["images"] == n and kept["parts"] == spilled["parts"]
            old = plan(root, None, args.before) if args.before else None
            before = f"| {old['peak_mb']:.0f} MB | {old['seconds']:.1f} " if old else ""
            print(f"| {n:,} {before}| {kept['peak_mb']:.0f} MB | {kept['seconds']:.1f} | {spilled['peak_mb']:.0f} MB | "
                  f"{spilled['seconds']:.1f} | {spilled['parts']:,} | {folder_bytes(spill) / 2**20:.1f} MB |",
                  flush=True)
            shutil.rmtree(root)
            shutil.rmtree(spill)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.reads:
        s3_reads(args.reads, args.latency)
    print(f"load average {load()} at end")


if __name__ == "__main__":
    main()
