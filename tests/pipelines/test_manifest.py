"""Exactly once, piece by piece: the writers' records joined into parts, stale shards of failed runs
never read and removed, a re-run that accepts no row of a part."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pytest

from corpora import good, write_parquet
from muse import storage
from pipelines import manifest, output_runs, shards
from pipelines.rejects import CorpusRefused
from pipelines.tokenize import resolve_models, run


def record(part, start, stop, part_rows=-1, file=None, rejects=()):
    return {"part": part, "ranges": [start, stop] if stop > start else [], "part_rows": part_rows,
            "rows": stop - start, "accepted": stop - start - sum(n for _, n in rejects),
            "rejects": list(rejects), "examples": "{}", "file": file}


def test_a_part_is_committed_once_all_its_rows_are_written():
    parts = manifest.PartAssembler("r", {"p": "{}"}, examples_per_reason=2)
    assert parts.add(record("p", 4, 8, file="b")) is None
    assert parts.add(record("p", 0, 0, part_rows=10)) is None  # the end row came early
    assert parts.add(record("p", 0, 4, file="a", rejects=[("too_small", 1)])) is None
    entry = parts.add(record("p", 8, 10))  # rejected rows only: no file
    assert entry == {"part": "p", "run": "r", "source": "{}", "rows": 10, "accepted": 9,
                     "rejects": [("too_small", 1)], "files": ["a", "b"]}
    assert parts.incomplete() == [] and parts.clean
    empty = parts.add(record("q", 0, 0, part_rows=0))  # a part with no rows at all
    assert empty["rows"] == 0 and empty["files"] == []


def test_rows_delivered_twice_are_never_committed_twice():
    parts = manifest.PartAssembler("r", {}, examples_per_reason=2)
    parts.add(record("p", 0, 4, file="a"))
    assert parts.add(record("p", 0, 4, file="a2")) is None and not parts.clean  # a retried block
    entry = parts.add(record("p", 4, 6, part_rows=6, file="b"))
    assert entry["files"] == ["a", "b"] and entry["rows"] == 6
    assert parts.add(record("p", 4, 6, part_rows=6, file="b")) is None and parts.incomplete() == []
    # Rows that overlap only in part cannot be split out of their file: the part stays unfinished.
    parts.add(record("q", 0, 4, file="c"))
    assert parts.add(record("q", 2, 6, part_rows=6, file="d")) is None
    assert parts.add(record("q", 4, 6, file="e")) is None and parts.incomplete() == ["q"]


def entry(part, run, files=(), rows=2):
    return {"part": part, "run": run, "source": "{}", "rows": rows, "accepted": rows, "rejects": [],
            "files": list(files)}


def test_a_retired_part_leaves_the_manifest_and_its_files_go(tmp_path):
    """A tombstone retires a part however the manifest's files are merged or left behind, and a later
    run that finishes a part of the same id again supersedes it."""
    out = str(tmp_path)
    for name in ("a", "b", "c"):
        storage.write_bytes(f"{out}/shards/r1/{name}.parquet", b"x")
    manifest.write_entries(out, "manifest-r1.parquet", [entry("a", "r1", ["shards/r1/a.parquet"]),
                                                        entry("b", "r1", ["shards/r1/b.parquet", "shards/r1/c.parquet"])])
    assert manifest.retire(out, "r2", {"b", "not-finished"}) == (1, 2)
    assert manifest.read_manifest(out)["part"].to_pylist() == ["a"]
    assert sorted(os.listdir(f"{out}/shards/r1")) == ["a.parquet"]
    # A run that died after writing its merged file but before deleting the files it merged.
    before = set(os.listdir(f"{out}/_manifest"))
    merged = manifest.compact(out, "r2")
    assert merged["part"].to_pylist() == ["a"] and os.listdir(f"{out}/_manifest") == ["manifest-r2.parquet"]
    for name in before:
        manifest.write_entries(out, name, [entry("a", "r1", ["shards/r1/a.parquet"]), entry("b", "r1")]
                               if name.startswith("manifest") else
                               [entry("b", "r2", rows=manifest.RETIRED)])
    assert manifest.read_manifest(out)["part"].to_pylist() == ["a"]
    manifest.write_entries(out, "log-r3-000000.parquet", [entry("b", "r3", ["shards/r3/b.parquet"], rows=5)])
    table = manifest.read_manifest(out)
    assert sorted(zip(table["part"].to_pylist(), table["rows"].to_pylist())) == [("a", 2), ("b", 5)]


def test_rejects_json_keeps_examples_only_of_reasons_still_counted(tmp_path):
    """A part whose missing caption was fixed and retired counts no reject any more: its old example
    key leaves rejects.json with its count, and other reasons' examples stay."""
    out = str(tmp_path)
    rejected = entry("a", "r1") | {"accepted": 1, "rejects": [("missing_caption", 1)]}
    table = pa.Table.from_pylist([rejected, entry("b", "r1") | {"rejects": [("corrupt_image", 1)]}],
                                 schema=manifest.SCHEMA)
    manifest.summarize(out, table, {"missing_caption": ["a#x"], "corrupt_image": ["b#y"]})
    fixed = pa.Table.from_pylist([entry("a", "r2"), entry("b", "r1") | {"rejects": [("corrupt_image", 1)]}],
                                 schema=manifest.SCHEMA)
    totals = manifest.summarize(out, fixed, {})
    saved = json.loads(storage.read_text(f"{out}/{manifest.REJECTS_FILE}"))
    assert saved == totals["rejects"] == {"total": 1, "by_reason": {"corrupt_image": 1},
                                          "examples": {"corrupt_image": ["b#y"]}}


def test_a_run_started_on_a_clock_behind_the_last_runs_still_supersedes_it(tmp_path):
    """The latest run's entry for a part counts: a driver whose clock is behind the one that wrote the
    manifest (another machine) takes a run id after it, so its tombstone retires the part instead of
    losing to the entry it retires (which would then name deleted files)."""
    out = str(tmp_path)
    ahead = "20991231T235958-aaaaaa"  # written by a driver whose clock is far ahead of this one
    storage.write_bytes(f"{out}/shards/{ahead}/x.parquet", b"x")
    manifest.write_entries(out, f"manifest-{ahead}.parquet", [entry("x", ahead, [f"shards/{ahead}/x.parquet"])])
    run = manifest.new_run_id(out)
    assert run > ahead and run.startswith("20991231T235959-")
    manifest.write_entries(out, f"log-{run}-000000.parquet", [entry("y", run)])
    assert manifest.new_run_id(out) > run  # the next one after that again
    assert manifest.retire(out, run, {"x"}) == (1, 2)
    assert manifest.compact(out, run)["part"].to_pylist() == ["y"]  # x stays retired once merged
    assert manifest.new_run_id(str(tmp_path / "empty")) < ahead  # an output with no runs: this clock


def test_a_crash_after_a_tombstone_leaves_files_the_next_cleanup_removes(tmp_path, monkeypatch):
    out = str(tmp_path)
    for name in ("a", "b"):
        storage.write_bytes(f"{out}/shards/r1/{name}.parquet", b"x")
    manifest.mark_clean(out, "r1")
    manifest.write_entries(out, "manifest-r1.parquet", [entry("a", "r1", ["shards/r1/a.parquet"]),
                                                        entry("b", "r1", ["shards/r1/b.parquet"])])
    delete_all, calls = manifest._delete_all, []

    def dies_before_the_shards(uris):
        calls.append(uris)
        if len(calls) == 2:  # the run folder's clean mark went; the shards never do
            raise KeyboardInterrupt
        delete_all(uris)

    monkeypatch.setattr(manifest, "_delete_all", dies_before_the_shards)
    with pytest.raises(KeyboardInterrupt):
        manifest.retire(out, "r2", {"b"})
    monkeypatch.setattr(manifest, "_delete_all", delete_all)
    table = manifest.read_manifest(out)
    assert table["part"].to_pylist() == ["a"] and os.path.exists(f"{out}/shards/r1/b.parquet")
    assert output_runs.remove_stale(out, table, run="r3") == 1
    assert sorted(os.listdir(f"{out}/shards/r1")) == [manifest.CLEAN_MARK, "a.parquet"]


def stale_block(part: str, n: int, schema: pa.Schema) -> pa.Table:
    """Tokenized rows of `part` as the writer stage receives them."""
    return pa.table({
        "key": [f"stale-{i}" for i in range(n)] + [""], "caption": ["old"] * (n + 1),
        "tokens_lo": [np.zeros(64, np.int16)] * (n + 1), "text_ids": [np.ones(3, np.int32)] * (n + 1),
        "width": [40] * (n + 1), "height": [40] * (n + 1), "part": [part] * (n + 1),
        "index": list(range(n)) + [-1], "part_rows": [-1] * n + [n], "reject_reason": [""] * (n + 1),
    }).cast(pa.schema([*schema, ("part", pa.string()), ("index", pa.int64()), ("part_rows", pa.int64()),
                       ("reject_reason", pa.string())]))


def test_stale_shard_of_a_failed_run_is_never_read_and_a_rerun_removes_it(ray_session, tmp_path,
                                                                          tiny_root_lo_only, fast_cfg):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rows = [(f"g{i}", *good(i, 40), "") for i in range(4)]
    write_parquet(corpus / "a.parquet", [(n, img, cap.encode(), r) for n, img, cap, r in rows])
    write_parquet(corpus / "b.parquet", [(f"bad{i}", b"not an image", b"a caption", "corrupt_image")
                                         for i in range(4)])
    out = str(tmp_path / "tokens")
    models = resolve_models(tiny_root_lo_only)
    from pipelines.readers import plan_parts

    part_b = next(p.id for p in plan_parts(str(corpus), "auto", fast_cfg.reader) if p.uri.endswith("b.parquet"))
    meta = {"tokens_lo_side": 8, "tokens_hi_side": None, "text_storage": "ids", "text_dim": 64}
    schema = shards.shard_schema(has_hi=False, text_storage="ids", meta=meta)
    # A failed run's worker wrote a shard of part b (from rows it had then), and the run died before
    # committing it: training must not read it, whether or not anything else is published.
    rec = shards.write_block(stale_block(part_b, 3, schema), out=out, run="failed", schema=schema,
                             examples=5).to_pylist()[0]
    stale = os.path.join(out, rec["file"])
    assert os.path.exists(stale) and rec["accepted"] == 3
    with pytest.raises(FileNotFoundError, match="no published token shards"):
        shards.token_shard_files(out)

    # The re-run accepts no row of part b: no shard of b is left, old or new.
    totals = run(str(corpus), out, models, fast_cfg, progress=False)
    assert totals["removed"] == 1 and not os.path.exists(stale)
    assert totals["accepted"] == 4 and totals["rejects"]["by_reason"] == {"corrupt_image": 4}
    entry = next(e for e in manifest.read_manifest(out).to_pylist() if e["part"] == part_b)
    assert entry["files"] == [] and entry["accepted"] == 0 and entry["rows"] == 4
    assert sorted(shards.load_token_shards(out)["key"].to_pylist()) == [f"{corpus}/a.parquet#{i}" for i in range(4)]

    # Written after the manifest exists: still not read, by any reader training uses.
    shards.write_block(stale_block(part_b, 2, schema), out=out, run="failed-again", schema=schema, examples=5)
    assert not any(k.startswith("stale-") for k in shards.load_token_shards(out)["key"].to_pylist())
    assert shards.read_token_shards(out, columns=["key"]).count() == 4
    from jobs.data import token_dataset

    assert token_dataset(out, hi=False)[0].count() == 4
    summary = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert summary["parts"] == 2 and summary["accepted"] == 4


def shard_file(out: str, run: str, name: str) -> str:
    path = storage.join(out, manifest.SHARDS_DIR, run, name)
    storage.write_bytes(path, b"rows not yet committed")
    return path


def age(out: str, run: str, seconds: float) -> None:
    path = os.path.join(out, manifest.SHARDS_DIR, run, output_runs.HEARTBEAT)
    os.utime(path, (time.time() - seconds, time.time() - seconds))


def test_a_running_drivers_heartbeat_keeps_its_shards_from_a_second_drivers_cleanup(tmp_path):
    out = str(tmp_path / "tokens")
    empty = manifest.SCHEMA.empty_table()
    for run in ("running", "dead"):
        output_runs.Heartbeat(out, run).beat()
    running, dead = shard_file(out, "running", "p-0-4.parquet"), shard_file(out, "dead", "q-0-4.parquet")
    plan = shard_file(out, "running", f"{manifest.PLAN_DIR}/plan-000000.parquet")  # a folder corpus's part lists
    age(out, "dead", 10 * 60)
    age(out, "running", output_runs.HEARTBEAT_SECONDS)  # one beat ago: alive
    me = output_runs.Heartbeat(out, "me")
    me.beat()
    in_use = r"run running \(host .*, pid \d+\) beat 3\ds ago.*--force-cleanup"
    with pytest.raises(output_runs.OutputInUse, match=in_use):
        output_runs.remove_stale(out, empty, run="me")
    assert os.path.exists(running) and os.path.exists(dead) and os.path.exists(plan)  # refused: nothing touched

    age(out, "running", output_runs.HEARTBEAT_FRESH + 1)  # its driver stopped beating
    assert output_runs.remove_stale(out, empty, run="me") == 2  # shard files: a plan is not one
    assert not any(map(os.path.exists, (running, dead, plan))) and os.path.exists(me.uri)
    assert all(os.path.exists(os.path.join(out, manifest.SHARDS_DIR, r, manifest.CLEAN_MARK)) for r in ("running", "dead"))

    # Forced: a fresh heartbeat is taken for a dead driver's.
    output_runs.Heartbeat(out, "killed").beat()
    killed = shard_file(out, "killed", "r-0-4.parquet")
    with pytest.raises(output_runs.OutputInUse):
        output_runs.remove_stale(out, empty, run="me")
    assert output_runs.remove_stale(out, empty, run="me", force=True) == 1 and not os.path.exists(killed)


def test_heartbeat_ages_are_read_on_the_stores_clock_not_this_machines(tmp_path):
    """The store's clock is what this driver's own new heartbeat says; here it is an hour off ours."""
    out = str(tmp_path / "tokens")
    empty = manifest.SCHEMA.empty_table()
    output_runs.Heartbeat(out, "running").beat()
    left = shard_file(out, "running", "p-0-4.parquet")
    me = output_runs.Heartbeat(out, "me")
    me.beat()
    # A store an hour behind: 30 s old by its clock (alive), an hour old by ours.
    age(out, "me", 3600)
    age(out, "running", 3600 + 30)
    with pytest.raises(output_runs.OutputInUse, match=r"run running .* beat 30s ago"):
        output_runs.remove_stale(out, empty, run="me")
    assert os.path.exists(left)
    # A store an hour ahead: an hour old by its clock (dead), just written by ours.
    age(out, "me", -3600)
    age(out, "running", 0)
    assert output_runs.remove_stale(out, empty, run="me") == 1 and not os.path.exists(left)


def test_a_fresh_heartbeat_of_a_process_gone_from_this_host_is_stale(tmp_path):
    """A driver killed on this machine (SIGKILL, then re-run at once) does not block its re-run."""
    out = str(tmp_path / "tokens")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    beat = output_runs.Heartbeat(out, "killed")
    beat.beat()
    storage.write_text(beat.uri, json.dumps({"run": "killed", "host": socket.gethostname(), "pid": gone.pid}))
    left = shard_file(out, "killed", "p-0-4.parquet")
    assert output_runs.remove_stale(out, manifest.SCHEMA.empty_table()) == 1 and not os.path.exists(left)


def test_heartbeats_on_s3_by_the_stores_clock(s3_bucket):
    out = f"{s3_bucket}/tokens"
    output_runs.Heartbeat(out, "other").beat()
    left = shard_file(out, "other", "p-0-4.parquet")
    time.sleep(1.2)  # LastModified has whole seconds
    me = output_runs.Heartbeat(out, "me")
    me.beat()
    with pytest.raises(output_runs.OutputInUse, match="run other"):
        output_runs.remove_stale(out, manifest.SCHEMA.empty_table(), run="me")
    assert output_runs.remove_stale(out, manifest.SCHEMA.empty_table(), run="me", fresh=1.0) == 1
    assert not storage.exists(left) and storage.exists(me.uri)
    me.stop(remove_run=True)
    assert not storage.list_files(storage.join(out, manifest.SHARDS_DIR, "me"))


def test_a_driver_taken_for_dead_while_only_silent_stops_at_its_next_commit_or_beat(tmp_path):
    """A driver stopped with Ctrl-Z (or cut off from storage) for longer than HEARTBEAT_FRESH looks dead,
    and a second driver's cleanup deletes its uncommitted shards. When it wakes, committing the parts of
    those shards would name files that are gone: its commit and its beat refuse, and a later cleanup
    leaves the mark that says so."""
    out = str(tmp_path / "tokens")
    silent = output_runs.Heartbeat(out, "silent", seconds=0.0)
    silent.beat()
    uncommitted = shard_file(out, "silent", "p-0-4.parquet")
    log = manifest.ManifestLog(out, "silent", flush_seconds=0.0, fence=silent.check)
    age(out, "silent", output_runs.HEARTBEAT_FRESH + 1)
    me = output_runs.Heartbeat(out, "me")
    me.beat()
    assert output_runs.remove_stale(out, manifest.SCHEMA.empty_table(), run="me") == 1
    assert not os.path.exists(uncommitted)

    log.pending.append(entry("p", "silent", ["shards/silent/p-0-4.parquet"]))
    with pytest.raises(output_runs.OutputTakenOver, match=r"run silent was taken over by run me \(host .*, pid \d+\)"):
        log.flush()
    with pytest.raises(output_runs.OutputTakenOver, match="stops without committing more"):
        silent.beat()
    assert manifest.read_manifest(out).num_rows == 0 and not os.path.exists(silent.uri)
    assert sorted(os.listdir(os.path.join(out, manifest.SHARDS_DIR, "silent"))) == [
        manifest.CLEAN_MARK, output_runs.TAKEN_OVER]
    me.check()  # the driver that took over is not stopped by its own cleanup


def test_a_damaged_token_shard_is_named_and_a_storage_error_stays_itself(tmp_path, monkeypatch):
    """Training's read of a shard that is no Parquet any more raises CorruptShard naming the file and
    the way out (every attempt would fail on it); a storage error is not mistaken for one, so Ray
    retries its read task."""
    import pyarrow.parquet as pq

    good, bad = str(tmp_path / "good.parquet"), str(tmp_path / "bad.parquet")
    pq.write_table(pa.table({"key": ["a", "b"]}), good)
    with open(bad, "wb") as f:
        f.write(b"PAR1" + b"\0" * 64)  # cut short: no footer
    tasks = shards.token_shard_datasource([good, bad], ["key"], None).get_read_tasks(1)
    assert [row for block in tasks[0]() for row in block.column("key").to_pylist()] == ["a", "b"]
    with pytest.raises(shards.CorruptShard, match=r"bad\.parquet is not a readable token shard .*new output"):
        list(tasks[1]())
    monkeypatch.setattr(shards, "token_shard_files", lambda uri: [good, bad])
    with pytest.raises(shards.CorruptShard, match=r"bad\.parquet is not a readable token shard"):
        list(shards.iter_token_shards(str(tmp_path)))  # what run.cache_data reads on the driver
    monkeypatch.setattr(shards, "token_shard_files", lambda uri: [bad])  # the first shard: read for its metadata
    with pytest.raises(shards.CorruptShard, match=r"bad\.parquet is not a readable token shard"):
        shards.shard_info(str(tmp_path))
    monkeypatch.setattr(shards.storage, "filesystem", lambda uri: (_Unreachable(), uri))
    with pytest.raises(OSError, match="AWS Error NETWORK_CONNECTION"):
        list(tasks[0]())


def test_a_damaged_manifest_file_is_named_and_nothing_reads_or_resumes_the_output(tmp_path):
    """A manifest file cut short (a copy of the output that stopped half way) leaves what the output
    holds unknown: reading it (a resumed tokenization, training's file list) is one refusal naming
    the file, not pyarrow's traceback."""
    out = str(tmp_path / "tokens")
    for part in ("p1", "p2"):
        manifest.write_entries(out, f"manifest-{part}.parquet", [
            {"part": part, "run": "r", "source": "", "rows": 1, "accepted": 1, "rejects": [],
             "files": [f"shards/{part}.parquet"]}])
    assert manifest.read_manifest(out).num_rows == 2
    damaged = tmp_path / "tokens" / manifest.MANIFEST_DIR / "manifest-p2.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])
    for read in (manifest.read_manifest, manifest.latest_run, shards.token_shard_files):
        with pytest.raises(manifest.DamagedManifest, match=rf"{damaged} is not a readable manifest file "
                                                           r"\(ArrowInvalid: .*\): .* tokenize the corpus again"):
            read(out)
    assert issubclass(manifest.DamagedManifest, CorpusRefused)  # a usage error's one line, exit status 2


class _Unreachable:
    def open_input_file(self, path):
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: curlCode: 7")
