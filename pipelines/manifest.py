"""The manifest of a token-shard output: which parts are finished and which files hold their rows.

A part is finished when its entry is in the manifest, and only files named there are published:
training reads the file list from here, never by listing the shard prefix, so a file that a failed
run left behind is never read. The manifest is a few Parquet files under `OUTPUT/_manifest/`, read
in one scan however many parts there are:

    log-<run>-<seq>.parquet   entries a run committed, one file per flush (every `commit_seconds`)
    manifest-<run>.parquet    every entry, written when a run ends; the files it merged are deleted

Entry schema: `part`, `run`, `source` (JSON: format, source URI, row range), `rows` (data rows read),
`accepted`, `rejects` (map reason -> count) and `files` (shard paths relative to OUTPUT). A part
whose input changed after it finished is retired by a tombstone (`retire`, in `retired-<run>.parquet`),
which the merged file of the run leaves out.

Writers run on Ray workers (`pipelines.shards.write_block`) and report one small record per block
and part: the row index ranges it held, the part's row count when the part's end row was in it, its
counts and its file. `PartAssembler` (driver) joins them: a part whose ranges cover all its rows is
committed. Nothing per sample reaches the driver.

Runs on one output (heartbeats, and the cleanup of what a dead run left): `pipelines.output_runs`.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from muse import storage
from pipelines.readers import is_bad_source
from pipelines.rejects import CorpusRefused

MANIFEST_DIR = "_manifest"
SHARDS_DIR = "shards"
CLEAN_MARK = "_clean"  # in a run's shard folder: every file in it is in the manifest
REJECTS_FILE = "rejects.json"
SUMMARY_FILE = "manifest.json"
PLAN_DIR = "_plan"  # in a run's shard folder: a folder corpus's part lists (pipelines.folder_plan)

RETIRED = -1  # `rows` of a tombstone: the entry's run retired the part (`retire`)
SCHEMA = pa.schema([
    ("part", pa.string()), ("run", pa.string()), ("source", pa.string()), ("rows", pa.int64()),
    ("accepted", pa.int64()), ("rejects", pa.map_(pa.string(), pa.int64())), ("files", pa.list_(pa.string())),
])


def new_run_id(out: str | None = None) -> str:
    """Sortable by start time, unique across drivers, and after every run in `out`'s manifest: the
    latest run's entry for a part is the one that counts, so a driver whose clock is behind an
    earlier driver's must not write entries (or tombstones) that sort before those they supersede."""
    stamp = datetime.now(timezone.utc).replace(microsecond=0)
    latest = latest_run(out) if out is not None else None
    try:
        after = datetime.strptime((latest or "")[:15], "%Y%m%dT%H%M%S").replace(tzinfo=timezone.utc)
        stamp = max(stamp, after + timedelta(seconds=1))
    except ValueError:  # no run yet (or an id of another form)
        pass
    return stamp.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def latest_run(out: str) -> str | None:
    """The latest run id in `out`'s manifest, tombstones included; None when it has none."""
    files = _manifest_files(out)
    return pc.max(_entries(files, columns=["run"])["run"]).as_py() if files else None


class OutputRefused(CorpusRefused):
    """An output no run can write into: a file, or one written by an older muse tokenize. Printed as
    a usage error (exit 2), as the corpus's refusals are."""


def _manifest_files(out: str) -> list[str]:
    files = storage.list_files(storage.join(out, MANIFEST_DIR), recursive=False)
    if any(f.endswith(".json") for f in files):
        raise OutputRefused(f"{out} was written by an older version of muse tokenize (one JSON per part); "
                            "tokenize into a new --output")
    return [f for f in files if f.endswith(".parquet")]


def read_manifest(out: str) -> pa.Table:
    """Every finished part of `out`, one row each (empty when nothing is finished). A local `out` that
    is a file is refused: no folder can be made there (on S3 an object beside the prefix is no bar)."""
    if not storage.is_s3(out) and os.path.isfile(storage.filesystem(out)[1]):
        raise OutputRefused(f"the output {out} is a file: name a folder (new or holding shards)")
    return _read(_manifest_files(out))


class DamagedManifest(OutputRefused):
    """A manifest file of an output that does not read as one (damaged after it was written: its
    writes are atomic). What the output holds is then unknown, so nothing reads or resumes it."""


def _entries(files: list[str], columns: list[str] | None = None) -> pa.Table:
    """Every entry of the manifest files, tombstones and superseded ones included."""
    import pyarrow.dataset as pads

    fs, _ = storage.filesystem(files[0])
    try:
        return pads.dataset([storage.filesystem(f)[1] for f in files], schema=SCHEMA, format="parquet",
                            filesystem=fs).to_table(columns=columns)
    except Exception as e:  # a storage error stays itself
        if not (is_bad_source(e) or isinstance(e, (TypeError, ValueError))):
            raise
        raise _damaged(files, e) from None


def _damaged(files: list[str], e: BaseException) -> DamagedManifest:
    """The refusal for manifest `files` that failed to read with `e`, naming the first that does not
    read on its own (the error names none when it is the schema that differs)."""
    for f in files:
        fs, path = storage.filesystem(f)
        try:
            pq.read_schema(path, filesystem=fs).field("part")
        except Exception as bad:  # a storage error meanwhile stays itself: it names no damaged file
            if not (is_bad_source(bad) or isinstance(bad, (KeyError, TypeError, ValueError))):
                raise
            break
    else:
        f = files[0].rsplit("/", 1)[0]  # the manifest folder
    said = " ".join(str(e).split())
    said = said if len(said) <= 300 else said[:300] + "..."
    return DamagedManifest(f"{f} is not a readable manifest file ({type(e).__name__}: {said}): what the "
                           "output holds is unknown without it. Restore it, or tokenize the corpus again into a "
                           "new output")


def _read(files: list[str]) -> pa.Table:
    if not files:
        return SCHEMA.empty_table()
    table = _entries(files)
    rows = table["rows"].to_numpy()
    if pc.count_distinct(table["part"]).as_py() == table.num_rows and not (rows == RETIRED).any():
        return table
    # Per part, the entry of the latest run counts, and a tombstone retires the part. Copies of one
    # entry (a run that died between writing its merged file and deleting the logs) count once.
    parts = table["part"].to_numpy(zero_copy_only=False).astype(str)
    order = np.lexsort((table["run"].to_numpy(zero_copy_only=False).astype(str), parts))
    latest = order[np.r_[parts[order][1:] != parts[order][:-1], True]]
    return table.take(pa.array(np.sort(latest[rows[latest] != RETIRED])))


def retire(out: str, run: str, parts: set[str]) -> tuple[int, int]:
    """Retire finished parts whose input is gone or changed: run `run` commits a tombstone for each
    (an entry with `rows` RETIRED), then deletes their shard files; returns (parts, data rows)
    retired. A crash in between leaves files no manifest names, never a manifest naming deleted
    files, and their run folders unmarked, so the next run's cleanup (`output_runs.remove_stale`) deletes them.
    A later run that finishes a part of the same id again supersedes the tombstone."""
    table = read_manifest(out)
    gone = table.filter(pc.is_in(table["part"], pa.array(sorted(parts), pa.string())))
    if not gone.num_rows:
        return 0, 0
    files = pc.list_flatten(gone["files"]).to_pylist()
    runs = sorted({f.split("/")[1] for f in files if f.startswith(SHARDS_DIR + "/") and f.count("/") >= 2})
    runs = [r for r in runs if storage.exists(storage.join(out, SHARDS_DIR, r, CLEAN_MARK))]
    _delete_all([storage.join(out, SHARDS_DIR, r, CLEAN_MARK) for r in runs])
    write_entries(out, f"retired-{run}.parquet", [
        {"part": part, "run": run, "source": source, "rows": RETIRED, "accepted": 0, "rejects": [], "files": []}
        for part, source in zip(gone["part"].to_pylist(), gone["source"].to_pylist())])
    _delete_all([storage.join(out, f) for f in files])
    for r in runs:
        mark_clean(out, r)
    return gone.num_rows, int(pc.sum(gone["rows"]).as_py())


def write_entries(out: str, name: str, entries: list[dict] | pa.Table) -> None:
    table = entries if isinstance(entries, pa.Table) else pa.Table.from_pylist(entries, schema=SCHEMA)
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd")
    storage.write_bytes(storage.join(out, MANIFEST_DIR, name), buf.getvalue().to_pybytes())


def compact(out: str, run: str) -> pa.Table:
    """Merge the manifest into one file, delete the files it merged; return it."""
    files = _manifest_files(out)
    table = _read(files)
    if len(files) > 1:
        name = f"manifest-{run}.parquet"
        write_entries(out, name, table)
        _delete_all([f for f in files if not f.endswith("/" + name)])
    return table


class ManifestLog:
    """Commits finished parts: buffered, then written as one log file per flush. A crash loses at
    most the entries of one interval, whose parts the next run redoes."""

    def __init__(self, out: str, run: str, flush_seconds: float, fence=None):
        """`fence`: called before each write, raises where this run may no longer commit
        (`output_runs.Heartbeat.check`)."""
        self.out, self.run, self.flush_seconds, self.fence = out, run, flush_seconds, fence
        self.pending: list[dict] = []
        self.seq = 0
        self.last = time.monotonic()

    def add(self, entry: dict) -> list[dict]:
        self.pending.append(entry)
        return self.flush_if_due()

    def flush_if_due(self) -> list[dict]:
        return self.flush() if time.monotonic() - self.last >= self.flush_seconds else []

    def flush(self) -> list[dict]:
        """Write the pending entries; returns them (now durable)."""
        self.last = time.monotonic()
        if not self.pending:
            return []
        if self.fence is not None:
            self.fence()
        done, self.pending = self.pending, []
        write_entries(self.out, f"log-{self.run}-{self.seq:06d}.parquet", done)
        self.seq += 1
        return done


# ---------------------------------------------------------------------------------------------
# Joining the writers' records into finished parts (driver).


@dataclass
class _Open:
    ranges: list[tuple[int, int]] = field(default_factory=list)  # disjoint, sorted
    expected: int | None = None
    rows: int = 0
    accepted: int = 0
    rejects: Counter = field(default_factory=Counter)
    files: list[str] = field(default_factory=list)
    conflict: bool = False


class PartAssembler:
    """Collects the writers' per-block records; `add` returns a part's manifest entry once its rows
    are all written. A record whose rows were already covered (a retried task) is dropped; one that
    overlaps them only in part leaves its part unfinished, so no row is ever committed twice. Either
    way the run is not `clean`: it left a file that the next run removes."""

    def __init__(self, run: str, sources: dict[str, str], examples_per_reason: int):
        self.run, self.sources = run, sources
        self.open: dict[str, _Open] = {}
        self.done: set[str] = set()
        self.clean, self.wrote = True, False
        self.examples: dict[str, list[str]] = {}
        self.max_examples = examples_per_reason

    def add(self, rec: dict) -> dict | None:
        part = rec["part"]
        if part in self.done:  # a retried block of a part already committed
            self.clean = False
            return None
        state = self.open.setdefault(part, _Open())
        flat = rec["ranges"]
        new = [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        if any(a < d and c < b for a, b in new for c, d in state.ranges):
            self.clean = False
            if not all(any(c <= a and b <= d for c, d in state.ranges) for a, b in new):
                state.conflict = True
            return None
        state.ranges = _merge(state.ranges + new)
        if rec["part_rows"] >= 0:
            state.expected = rec["part_rows"]
        state.rows += rec["rows"]
        state.accepted += rec["accepted"]
        state.rejects.update(dict(rec["rejects"] or []))
        if rec["file"]:
            state.files.append(rec["file"])
            self.wrote = True
        for reason, keys in json.loads(rec["examples"] or "{}").items():
            have = self.examples.setdefault(reason, [])
            have.extend(keys[: max(0, self.max_examples - len(have))])
        if state.conflict or state.expected is None or sum(b - a for a, b in state.ranges) < state.expected:
            return None
        del self.open[part]
        self.done.add(part)
        return {"part": part, "run": self.run, "source": self.sources.get(part, ""), "rows": state.rows,
                "accepted": state.accepted, "rejects": sorted(state.rejects.items()),
                "files": sorted(state.files)}

    def incomplete(self) -> list[str]:
        return sorted(self.open)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint ranges with touching ones joined."""
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(b, out[-1][1]))
        else:
            out.append((a, b))
    return out


# ---------------------------------------------------------------------------------------------
# Repair and totals.


def mark_clean(out: str, run: str) -> None:
    storage.write_bytes(storage.join(out, SHARDS_DIR, run, CLEAN_MARK), b"")


def _delete_all(uris: list[str]) -> None:
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(storage.delete, uris))


def summarize(out: str, manifest: pa.Table, examples: dict[str, list[str]], per_reason: int = 5,
              not_read: str = "") -> dict:
    """Write rejects.json (counts of every finished part, example keys of this run and earlier ones)
    and manifest.json (totals, and `not_read`: what this run's listing of the corpus passed over, when
    anything was); return the totals."""
    rejects = manifest["rejects"].combine_chunks()
    by_reason: dict[str, int] = {}
    if len(rejects.keys):
        sums = pa.table({"reason": rejects.keys, "n": rejects.items}).group_by("reason").aggregate(
            [("n", "sum")])
        by_reason = dict(sorted(zip(sums["reason"].to_pylist(), sums["n_sum"].to_pylist())))
    path = storage.join(out, REJECTS_FILE)
    try:
        old = json.loads(storage.read_text(path)).get("examples", {})
    except FileNotFoundError:
        old = {}
    merged = {}
    for reason in sorted(r for r in set(old) | set(examples) if by_reason.get(r)):  # none once retired away
        keys = list(dict.fromkeys(old.get(reason, []) + examples.get(reason, [])))
        merged[reason] = keys[:per_reason]
    rejects = {"total": sum(by_reason.values()), "by_reason": by_reason, "examples": merged}
    storage.write_text(path, json.dumps(rejects, indent=1))
    totals = {
        "parts": manifest.num_rows,
        "rows": pc.sum(manifest["rows"]).as_py() or 0,
        "accepted": pc.sum(manifest["accepted"]).as_py() or 0,
        "rejected": rejects["total"],
        "files": pc.sum(pc.list_value_length(manifest["files"])).as_py() or 0,
    } | ({"not_read": not_read} if not_read else {})
    storage.write_text(storage.join(out, SUMMARY_FILE), json.dumps(totals, indent=1))
    return totals | {"rejects": rejects}
