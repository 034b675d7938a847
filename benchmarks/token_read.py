"""Reading token shards for training: seconds per pass over the data (one epoch), streamed.

Writes FILES published token shards (ROWS rows each, the `tiny` shapes) and reads them, on one local
Ray, several passes each way, alternating:

- Ray Data's `read_parquet` over the manifest's files with a seeded file shuffle (what training
  used before): each pass plans through Ray Data's Parquet footer reader;
- `pipelines.shards.read_token_shards` (what training uses): one read task per file, the file list
  and the permutation taken from the manifest and the seed, no footer pass.

Prints the machine and its load average with the table.

    python benchmarks/token_read.py [--files 16] [--rows 2000] [--passes 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from machine import describe, load_averages  # noqa: E402

from pipelines import shards  # noqa: E402


def write_shards(out: str, files: int, rows: int) -> None:
    schema = shards.shard_schema(has_hi=False, text_storage="ids",
                                 meta={"tokens_lo_side": 8, "tokens_hi_side": None, "text_dim": None})
    rng = np.random.default_rng(0)
    for part in range(files):
        table = pa.table({"key": [f"p{part}/{i}" for i in range(rows)], "caption": ["a red circle"] * rows,
                          "tokens_lo": [rng.integers(0, 512, 64, dtype=np.int16) for _ in range(rows)],
                          "text_ids": [rng.integers(0, 256, 12, dtype=np.int32) for _ in range(rows)],
                          "width": [64] * rows, "height": [64] * rows}, schema=schema)
        shards.write_table(out, table, part=f"part{part:04d}")


def parquet_pass_reader(out: str, seed: int):
    import ray.data
    from ray.data import FileShuffleConfig

    from muse import storage

    files = shards.token_shard_files(out)
    fs, _ = storage.filesystem(files[0])
    ds = ray.data.read_parquet([storage.filesystem(f)[1] for f in files], filesystem=fs,
                               shuffle=FileShuffleConfig(seed=seed, reseed_after_execution=True))
    return ds.select_columns(["tokens_lo", "text_ids"])


def timed_pass(ds) -> tuple[float, int]:
    start = time.perf_counter()
    rows = sum(len(b["tokens_lo"]) for b in ds.iter_batches(batch_size=256, batch_format="pyarrow"))
    return time.perf_counter() - start, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2000, help="rows per shard file")
    parser.add_argument("--passes", type=int, default=3, help="passes (epochs) over the data per reader")
    args = parser.parse_args(argv)

    import ray

    print(f"machine: {describe()}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        out = os.path.join(work, "tokens")
        write_shards(out, args.files, args.rows)
        ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        readers = {"Ray Data read_parquet (footer pass)": parquet_pass_reader(out, seed=0),
                   "read_token_shards (manifest)": shards.read_token_shards(out, ["tokens_lo", "text_ids"], 0)}
        times: dict[str, list[float]] = {name: [] for name in readers}
        for _ in range(args.passes):
            for name, ds in readers.items():
                seconds, rows = timed_pass(ds)
                if rows != args.files * args.rows:
                    raise SystemExit(f"{name} read {rows} rows, expected {args.files * args.rows}")
                times[name].append(seconds)
        ray.shutdown()
    print(f"\n{args.files} files x {args.rows} rows, {args.passes} passes each, alternating; "
          f"load average {load_averages()} at the end\n")
    print("| reader | seconds per pass (each) | median |\n|---|---|---:|")
    for name, t in times.items():
        print(f"| {name} | {' / '.join(f'{x:.2f}' for x in t)} | {float(np.median(t)):.2f} |")


if __name__ == "__main__":
    main()
