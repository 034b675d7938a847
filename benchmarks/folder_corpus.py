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

The same corpora again with one `captions.jsonl` instead of sidecars (what a caption table exported
from a database looks like), planned spilled: the captions file is indexed on local disk
(`pipelines.captions_file`); with `--before`, the earlier code's planning of it too.

Then the captions index alone, at sizes past the corpora (`--index-sizes`): its peak RSS is bounded
by SQLite's page cache (64 MB), not the file.

Then how many finished parts a change to a corpus retires, cut by names (what new outputs get) and by
count (what outputs tokenized before keep): one image deleted from the middle, then a folder added.

Reported per size: the process's peak RSS (VmHWM, which includes the ~100 MB of Python, pyarrow
and the readers' imports), planning seconds, parts, and the plan files' size. Prints the machine and
its load average with the table.

Reading. A part of `--reads` images with sidecar captions on a real S3-compatible server on loopback
(moto), behind a real proxy that holds every request `--latency` seconds (a store's time to first
byte; tests/fault_proxy.py): the part read with one file at a time (the naive way, what the reader
did before) and with `FOLDER_READS_IN_FLIGHT` at once.

    python benchmarks/folder_corpus.py [--sizes 50000 200000 800000] [--work DIR] [--before DIR]
                                       [--index-sizes 800000 3200000] [--changing 200000]
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

from benchmarks.machine import describe, load_averages  # noqa: E402

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


def make_corpus(root: str, n: int, captions_file: bool = False) -> None:
    """Sidecar captions (empty), or one `captions.jsonl` with a caption of ~60 characters per image."""
    lines = open(os.path.join(root, "captions.jsonl"), "w") if captions_file else None
    for i in range(n):
        if i % PER_FOLDER == 0:
            folder = os.path.join(root, f"{i // PER_FOLDER:05d}")
            os.makedirs(folder, exist_ok=True)
        for ext in ("jpg",) if captions_file else ("jpg", "txt"):
            with open(os.path.join(folder, f"{i:09d}.{ext}"), "wb"):
                pass
        if lines:
            lines.write(json.dumps({"file": f"{i // PER_FOLDER:05d}/{i:09d}.jpg",
                                    "caption": f"a photograph, number {i}, of a red square on a grey ground"}) + "\n")
    if lines:
        lines.close()


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


def captions_file_table(work: str, sizes: list[int], before: str | None) -> None:
    """The same corpora with one `captions.jsonl` instead of sidecars, planned spilled."""
    print("\nWith a captions file (`captions.jsonl`, ~110 bytes per image) instead of sidecars, spilled:")
    head = "| before: peak RSS | before: s " if before else ""
    print(f"| images | captions file {head}| peak RSS | s |")
    print("|---:" * (4 + 2 * bool(before)) + "|")
    for n in sizes:
        root = os.path.join(work, f"captioned{n}")
        os.makedirs(root)
        make_corpus(root, n, captions_file=True)
        size = os.path.getsize(os.path.join(root, "captions.jsonl")) / 2**20
        now = plan(root, os.path.join(work, f"plan{n}"))
        old = plan(root, os.path.join(work, f"plan-before{n}"), before) if before else None
        assert now["images"] == n and (old is None or old["images"] == n)
        head = f"| {old['peak_mb']:.0f} MB | {old['seconds']:.1f} " if old else ""
        print(f"| {n:,} | {size:.0f} MB {head}| {now['peak_mb']:.0f} MB | {now['seconds']:.1f} |", flush=True)
        for path in (root, os.path.join(work, f"plan{n}"), os.path.join(work, f"plan-before{n}")):
            shutil.rmtree(path, ignore_errors=True)


INDEX = """
import json, sys, time
from pipelines.captions_file import CaptionsIndex
from pipelines.config import ReaderConfig
path, n = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
with CaptionsIndex(path, ReaderConfig()) as index:
    indexed = time.perf_counter() - start
    found = sum(c is not None for step in range(0, n, 1000)
                for c, _ in index.lookup([f"{i // 10000:05d}/{i:09d}.jpg" for i in range(step, min(step + 1000, n))]))
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"indexed": indexed, "looked_up": time.perf_counter() - start - indexed, "found": found,
                  "peak_mb": peak / 1024}))
"""


def captions_index_table(work: str, sizes: list[int]) -> None:
    """The captions file's index alone (no image files), past the corpora above: a fresh process
    indexes a `captions.jsonl` of n records and looks every image up, a part of 1,000 at a time."""
    print("\nThe captions index alone (`pipelines.captions_file.CaptionsIndex`), fresh process each:")
    print("| records | file | index s | lookups s | peak RSS |")
    print("|---:|---:|---:|---:|---:|")
    for n in sizes:
        path = os.path.join(work, "captions.jsonl")
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"file": f"{i // PER_FOLDER:05d}/{i:09d}.jpg",
                                    "caption": f"a photograph, number {i}, of a red square on a grey ground"}) + "\n")
        out = subprocess.run([sys.executable, "-c", INDEX, path, str(n)], cwd=REPO, check=True,
                             capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO))
        got = json.loads(out.stdout.strip().splitlines()[-1])
        assert got["found"] == n, got
        print(f"| {n:,} | {os.path.getsize(path) / 2**20:.0f} MB | {got['indexed']:.1f} | {got['looked_up']:.1f} | "
              f"{got['peak_mb']:.0f} MB |", flush=True)
        os.remove(path)


def stability_table(work: str, n: int) -> None:
    """How many finished parts a change to the corpus retires (`--retire-changed`), by cut: one image
    (and its sidecar) deleted from the middle, then a folder of 1,000 added at the end."""
    from pipelines.config import ReaderConfig
    from pipelines.readers import plan_parts

    root = os.path.join(work, f"changing{n}")
    os.makedirs(root)
    make_corpus(root, n)
    cfg = ReaderConfig()

    def ids() -> dict[str, set[str]]:
        return {cuts: {p.id for p in plan_parts(root, "folder", cfg, folder_cuts=cuts)} for cuts in ("count", "names")}

    first = ids()
    middle = n // 2
    for ext in ("jpg", "txt"):
        os.remove(os.path.join(root, f"{middle // PER_FOLDER:05d}", f"{middle:09d}.{ext}"))
    deleted = ids()
    extra = os.path.join(work, "extra")
    os.makedirs(extra)
    make_corpus(extra, 1_000)
    os.rename(os.path.join(extra, "00000"), os.path.join(root, "99999"))
    grown = ids()
    print(f"\nParts retired by a change to a corpus of {n:,} images (`rows_per_part` {cfg.rows_per_part}):")
    print("| cut | parts | one image deleted in the middle | then a folder of 1,000 added at the end |")
    print("|---|---:|---:|---:|")
    for cuts in ("count", "names"):
        print(f"| {cuts} | {len(first[cuts]):,} | {len(first[cuts] - deleted[cuts]):,} | "
              f"{len(deleted[cuts] - grown[cuts]):,} |", flush=True)
    shutil.rmtree(root)
    shutil.rmtree(extra)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000, 800_000])
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one, deleted)")
    parser.add_argument("--before", default=None, help="a checkout of earlier code, planned the same way as a peer")
    parser.add_argument("--index-sizes", type=int, nargs="*", default=[800_000, 3_200_000],
                        help="captions-file records for the index-alone table (none: skip)")
    parser.add_argument("--changing", type=int, default=200_000,
                        help="images of the corpus that changes, for the parts-retired table (0: skip)")
    parser.add_argument("--reads", type=int, default=200, help="images in the S3 part read (0: skip)")
    parser.add_argument("--latency", type=float, default=0.05, help="seconds the proxy holds each S3 request")
    args = parser.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="folder-planning-")
    print(f"machine: {describe()}")
    before = "| before: peak RSS | before: s " if args.before else ""
    print(f"| images {before}| kept: peak RSS | kept: s | spilled: peak RSS | spilled: s | parts | plan files |")
    print("|---:" * (7 + 2 * bool(args.before)) + "|")
    try:
        for n in args.sizes:
            root = os.path.join(work, f"corpus{n}")
            os.makedirs(root)
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
        captions_file_table(work, args.sizes, args.before)
        if args.index_sizes:
            captions_index_table(work, args.index_sizes)
        if args.changing:
            stability_table(work, args.changing)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    if args.reads:
        s3_reads(args.reads, args.latency)
    print(f"load average {load_averages()} at end")


if __name__ == "__main__":
    main()
