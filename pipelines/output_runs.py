"""Runs on one token-shard output: which driver is writing, and the cleanup of what a dead one left.

Two drivers on one output: a running driver keeps a heartbeat file in its run's shard folder
(`Heartbeat`, rewritten every HEARTBEAT_SECONDS from its progress loop), and a starting driver's
cleanup (`remove_stale`) refuses to start while another run's heartbeat is fresh, instead of
deleting the shards that run has written but not yet committed. Ages are measured on the store's
clock (file mtime, S3 LastModified) against the starting driver's own new heartbeat, so machines
whose clocks disagree do not matter. A driver taken for dead may only have been silent (stopped with
Ctrl-Z, storage unreachable for minutes): the cleanup leaves a TAKEN_OVER mark in its run folder
before deleting anything, and that driver's next beat finds it and stops (`OutputTakenOver`)
without committing another part, since the files of those parts may be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from muse import storage
from pipelines.manifest import CLEAN_MARK, PLAN_DIR, SHARDS_DIR, mark_clean

HEARTBEAT = "_heartbeat"  # in a running driver's shard folder
TAKEN_OVER = "_taken_over"  # in a run's shard folder: another driver's cleanup took this run for dead
HEARTBEAT_SECONDS = 30.0  # how often a driver rewrites it
HEARTBEAT_FRESH = 4 * HEARTBEAT_SECONDS  # a younger heartbeat: its driver is taken to be alive


class OutputInUse(RuntimeError):
    """Another driver is writing to this output."""


class OutputTakenOver(RuntimeError):
    """Another driver took this driver's run for dead and cleaned it up: this one must stop."""


class Heartbeat:
    """Says that this driver is writing to `out`: a small file in its run's shard folder, rewritten
    by `beat()` at most every `seconds` (from the driver's own loop, no thread of its own). A run
    that ends deletes it; a driver that is killed leaves it to age."""

    def __init__(self, out: str, run: str, seconds: float = HEARTBEAT_SECONDS):
        self.out, self.run, self.seconds = out, run, seconds
        self.uri = storage.join(out, SHARDS_DIR, run, HEARTBEAT)
        self.last: float | None = None

    def beat(self) -> None:
        """Rewrite the heartbeat when due; OutputTakenOver where another driver took this run for dead
        (its mark is read before the write, so a taken-over run never looks alive again)."""
        if self.last is not None and time.monotonic() - self.last < self.seconds:
            return
        self.check()
        storage.write_text(self.uri, json.dumps({"run": self.run, "host": socket.gethostname(), "pid": os.getpid()}))
        self.last = time.monotonic()

    def check(self) -> None:
        """OutputTakenOver where another driver's cleanup has marked this run as taken over."""
        try:
            who = json.loads(storage.read_text(storage.join(self.out, SHARDS_DIR, self.run, TAKEN_OVER)))
        except FileNotFoundError:
            return
        except (OSError, ValueError):
            who = {}
        raise OutputTakenOver(
            f"run {self.run} was taken over by run {who.get('run', '?')} (host {who.get('host', '?')}, pid "
            f"{who.get('pid', '?')}), which found this driver's heartbeat over {HEARTBEAT_FRESH:.0f}s old and "
            f"deleted the shards it had not committed: this driver stops without committing more; the parts it "
            "had committed stay, and that run does the rest")

    def due_in(self) -> float:
        """Seconds until the next beat is due: how long the driver's loop may wait."""
        return 0.0 if self.last is None else max(0.0, self.seconds - (time.monotonic() - self.last))

    def stop(self, remove_run: bool = False) -> None:
        """Delete the heartbeat, or with `remove_run` the run's whole folder (for a run that wrote nothing)."""
        storage.delete(storage.join(self.out, SHARDS_DIR, self.run) if remove_run else self.uri)


def remove_stale(out: str, manifest: pa.Table, run: str | None = None, force: bool = False,
                 fresh: float = HEARTBEAT_FRESH) -> int:
    """Delete the shard files that runs which did not end cleanly left outside the manifest (a part
    they wrote but never committed, a duplicate block); returns how many. Runs that ended cleanly are
    not listed again, nor `run` (this driver's, whose heartbeat is written). A run whose heartbeat
    is younger than `fresh` seconds is a driver still writing: OutputInUse, unless `force`."""
    fs, root = storage.filesystem(storage.join(out, SHARDS_DIR))
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=False, allow_not_found=True))
    dirty = [i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name != run
             and fs.get_file_info(f"{i.path}/{CLEAN_MARK}").type == pafs.FileType.NotFound]
    if not dirty:
        return 0
    live = {} if force else _live_runs(fs, dirty, f"{root}/{run}/{HEARTBEAT}" if run else None, fresh)
    if live:
        (name, (age, who)), *more = sorted(live.items())
        raise OutputInUse(
            f"another run is writing to {out}: run {name.rsplit('/', 1)[-1]} ({who}) beat {age:.0f}s ago"
            + (f", and {len(more)} more" if more else "") + f" (a running driver beats every "
            f"{HEARTBEAT_SECONDS:.0f}s). Wait for it to end; if it is dead (killed under {fresh:.0f}s ago), "
            "re-run with --force-cleanup, which deletes the shards it left uncommitted")
    # A dead-looking driver may only be silent: the mark stops it at its next beat (Heartbeat.check).
    mark = json.dumps({"run": run, "host": socket.gethostname(), "pid": os.getpid()}).encode()
    with_heartbeat = [d for d, info in zip(dirty, fs.get_file_info([f"{d}/{HEARTBEAT}" for d in dirty]))
                      if info.type == pafs.FileType.File]
    for run_dir in with_heartbeat:
        with fs.open_output_stream(f"{run_dir}/{TAKEN_OVER}") as f:
            f.write(mark)
    base = storage.filesystem(out)[1].rstrip("/") + "/"
    referenced = set(pc.list_flatten(manifest["files"]).to_pylist())
    stale, bookkeeping = [], 0
    for run_dir in dirty:
        files = fs.get_file_info(pafs.FileSelector(run_dir, recursive=True))
        stale += [i.path for i in files if i.type == pafs.FileType.File and i.base_name != TAKEN_OVER
                  and i.path.removeprefix(base) not in referenced]
        bookkeeping += sum(i.base_name == HEARTBEAT or f"/{PLAN_DIR}/" in i.path for i in files)

    def delete(path: str) -> None:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass  # a write task of the failed run, still finishing, renamed its temporary file: gone is the goal

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(delete, stale))
    for run_dir in dirty:
        mark_clean(out, run_dir.removeprefix(base).removeprefix(SHARDS_DIR + "/"))
    return len(stale) - bookkeeping  # shard files; a dead driver's heartbeat and plan are not


def _live_runs(fs: pafs.FileSystem, runs: list[str], own: str | None, fresh: float) -> dict[str, tuple[float, str]]:
    """{run folder: (heartbeat age in seconds, its driver)} of the `runs` whose heartbeat is younger
    than `fresh` seconds by the store's clock (`own`, this driver's heartbeat, says what now is), less
    those whose driver is known dead: on this host, a process that is gone."""
    infos = fs.get_file_info([f"{r}/{HEARTBEAT}" for r in runs] + ([own] if own else []))
    mine = infos.pop() if own else None
    now = as_utc(mine.mtime) if mine is not None and mine.mtime is not None else datetime.now(timezone.utc)
    live = {}
    for r, info in zip(runs, infos):
        if info.type != pafs.FileType.File or (age := (now - as_utc(info.mtime)).total_seconds()) >= fresh:
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                who = json.loads(f.read())
        except FileNotFoundError:
            continue  # that run has just ended
        except (OSError, ValueError):
            who = {}
        if driver_gone(who):
            continue
        live[r] = (age, f"host {who.get('host', '?')}, pid {who.get('pid', '?')}")
    return live


def as_utc(t: datetime) -> datetime:
    """A store's file time as an aware UTC time (local files give naive ones)."""
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def driver_gone(who: dict) -> bool:
    """Whether the driver a heartbeat names ({"host", "pid"}) ran on this host and its process is gone:
    its heartbeat need not be waited out. Tokenize's runs and the training run lock read it."""
    pid = who.get("pid")
    if who.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return False  # elsewhere, or unknown: assume the worst
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # someone else's process, but alive
    return False
