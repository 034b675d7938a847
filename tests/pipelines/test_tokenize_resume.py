"""Tokenization that is interrupted or repeated: crashes and SIGKILLs mid-run, storage errors in a
CPU actor, a corpus that grew, and a second driver on an output in use (the job spec a re-run is
checked against: test_job_spec.py). Every good sample lands exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from corpora import corpus_of_parts, good, keys_once, write_folder
from muse import storage
from muse.config import to_dict
from pipelines import manifest, output_runs, readers, shards
from pipelines.config import load_config
from pipelines.tokenize import job_spec, main, resolve_models, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_crash_after_some_parts_then_rerun_is_exactly_once(ray_session, tmp_path, tiny_root_lo_only,
                                                            fast_cfg, capsys):
    # 24 parts: enough that the crash after the second publish stops the run before it could
    # publish them all (with 8, the tiny tokenizer was sometimes fast enough to finish every part).
    corpus, accepted, rejects = corpus_of_parts(tmp_path, n_files=12)
    out = str(tmp_path / "tokens")
    models = resolve_models(tiny_root_lo_only)
    seen = []

    def crash_after_two(entry):
        seen.append(entry)
        if len(seen) == 2:
            raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        run(corpus, out, models, fast_cfg, on_published=crash_after_two, progress=False)
    finished = manifest.read_manifest(out).num_rows
    assert 2 <= finished < 24

    totals = run(corpus, out, models, fast_cfg, progress=False)
    assert totals["run_parts"] == 24 - finished and totals["parts"] == 24
    assert set(keys_once(shards.load_token_shards(out))) == accepted
    assert json.loads(storage.read_text(storage.join(out, "rejects.json")))["by_reason"] == rejects

    # Finished: a third run does nothing (and needs no Ray).
    again = run(corpus, out, models, fast_cfg, progress=False)
    assert again["run_parts"] == 0 and again["accepted"] == len(accepted)

    # A resumed run must match what produced the shards.
    with pytest.raises(ValueError, match="text_storage"):
        run(corpus, out, models, replace(fast_cfg, text_storage="embeddings"), progress=False)
    with pytest.raises(ValueError, match="preprocess"):
        run(corpus, out, models, replace(fast_cfg, preprocess=replace(fast_cfg.preprocess, max_pixels=10)),
            progress=False)
    os.remove(os.path.join(corpus, "c3.parquet"))
    with pytest.raises(ValueError, match="not in the input any more.*--retire-changed"):
        run(corpus, out, models, fast_cfg, progress=False)
    # The command line says it as a usage error, without a traceback.
    settings = tmp_path / "fast.yaml"
    settings.write_text(yaml.safe_dump(to_dict(fast_cfg)))
    with pytest.raises(SystemExit) as refused:
        main(["--input", corpus, "--output", out, "--checkpoint", tiny_root_lo_only, "--config", str(settings)])
    assert refused.value.code == 2
    assert "muse tokenize: error: 2 finished part(s)" in capsys.readouterr().err
    # Retired: c3's two parts and their shards go, and nothing else is tokenized again.
    shrunk = run(corpus, out, models, fast_cfg, progress=False, retire_changed=True)
    assert shrunk["retired"] == 2 and shrunk["run_parts"] == 0 and shrunk["parts"] == 22
    said = capsys.readouterr().out  # no bar (`--no-progress`), but the plan's line and the summary
    assert re.search(r"tokenize: planned \d+ parts .*retired 2 finished parts", said), said
    assert re.search(r"tokenize: \d+ accepted, .*\(22 already done\)", said), said
    assert set(keys_once(shards.load_token_shards(out))) == {k for k in accepted if "/c3.parquet#" not in k}
    assert not any("/c3.parquet" in s for s in manifest.read_manifest(out)["source"].to_pylist())


def run_as_before(monkeypatch, *args, **kwargs) -> dict:
    """`run` into an output whose _job.json an older muse tokenize wrote: that version's first run kept
    the spec it found there before any part was finished (this one replaces such a spec), and every
    later run resumes with it, as the finished parts now make it."""
    import pipelines.tokenize as tokenize
    from pipelines.job_spec import read_job_spec

    with monkeypatch.context() as patched:
        patched.setattr(tokenize, "resumed_spec", lambda out, finished: read_job_spec(out))
        return run(*args, **kwargs)


def test_a_grown_folder_corpus_retires_the_parts_that_changed(ray_session, tmp_path, tiny_root_lo_only, fast_cfg,
                                                              monkeypatch):
    """A downloader adds a folder after the first run: the last part, cut at the corpus's end, now
    goes on into it (a new id). It is refused, then retired with --retire-changed, and every image is
    in the output exactly once; the other parts are not tokenized again. So is an image replaced
    under its name. An output tokenized before parts were cut by names and covered sizes (its
    _job.json has no "folder_cuts" nor "part_sizes") keeps its count cuts and ids."""
    corpus, out, legacy = tmp_path / "corpus", str(tmp_path / "tokens"), str(tmp_path / "legacy")
    models = resolve_models(tiny_root_lo_only)

    def add_folder(name: str, first: int, n: int) -> None:
        write_folder(corpus / name, [(f"g{i}", good(i, 40)[0], good(i, 40)[1].encode(), "")
                                     for i in range(first, first + n)])

    def planned(cuts: str = "names", sizes: bool = True) -> set[str]:
        return {p.id for p in readers.plan_parts(str(corpus), "auto", fast_cfg.reader, folder_cuts=cuts, sizes=sizes)}

    add_folder("00", 0, 5)
    add_folder("01", 5, 5)
    old = planned()
    assert run(str(corpus), out, models, fast_cfg, progress=False)["accepted"] == 10
    spec = job_spec(str(corpus), fast_cfg, models) | {"part_ids": "relative"}
    storage.write_text(storage.join(legacy, shards.JOB_FILE), json.dumps(spec))
    run_as_before(monkeypatch, str(corpus), legacy, models, fast_cfg, progress=False)
    assert set(manifest.read_manifest(legacy)["part"].to_pylist()) == planned("count", sizes=False) != old
    assert run(str(corpus), legacy, models, fast_cfg, progress=False)["run_parts"] == 0  # resumed as made

    add_folder("02", 10, 3)
    new = planned()
    assert 1 <= len(old - new) <= 2 and len(old & new) >= 1
    with pytest.raises(ValueError, match=f"{len(old - new)} finished part"):
        run(str(corpus), out, models, fast_cfg, progress=False)
    grown = run(str(corpus), out, models, fast_cfg, progress=False, retire_changed=True)
    assert grown["retired"] == len(old - new) and grown["run_parts"] == len(new - old) and grown["parts"] == len(new)
    keys = keys_once(shards.load_token_shards(out))
    assert sorted(k.rsplit("/", 1)[1] for k in keys) == sorted(f"g{i}.img.png" for i in range(13))
    assert set(manifest.read_manifest(out)["part"].to_pylist()) == new
    assert run(str(corpus), out, models, fast_cfg, progress=False)["run_parts"] == 0

    # An image replaced under its name (another size): its part alone is retired and tokenized again.
    def tokens_of(name: str) -> list:
        table = shards.load_token_shards(out)
        return next(t for k, t in zip(table["key"].to_pylist(), table["tokens_lo"].to_pylist()) if k.endswith(name))

    replaced = corpus / "01" / "g7.img.png"
    before = tokens_of("g7.img.png")
    replaced.write_bytes(good(99, 40)[0])
    with pytest.raises(ValueError, match="1 finished part"):
        run(str(corpus), out, models, fast_cfg, progress=False)
    again = run(str(corpus), out, models, fast_cfg, progress=False, retire_changed=True)
    assert again["retired"] == 1 and again["run_parts"] == 1 and again["accepted"] == 13
    assert len(keys_once(shards.load_token_shards(out))) == 13 and tokens_of("g7.img.png") != before


def test_output_written_before_relative_part_ids_resumes_with_its_own(ray_session, tmp_path, tiny_root_lo_only,
                                                                     fast_cfg, monkeypatch):
    """An output whose _job.json predates relative part ids (and the file size limit) keeps hashing
    full paths, so its finished parts stay finished; a new output names parts by their paths below
    the corpus."""
    corpus, accepted, _ = corpus_of_parts(tmp_path, n_files=1)
    models = resolve_models(tiny_root_lo_only)
    legacy, fresh = str(tmp_path / "legacy"), str(tmp_path / "fresh")
    spec = job_spec(corpus, fast_cfg, models) | {"parquet_parts": "whole row groups"}
    del spec["reader"]["max_file_bytes"]  # written before files had a size limit, too
    storage.write_text(storage.join(legacy, shards.JOB_FILE), json.dumps(spec))
    run_as_before(monkeypatch, corpus, legacy, models, fast_cfg, progress=False)
    run(corpus, fresh, models, fast_cfg, progress=False)
    for out, ids in ((legacy, "absolute"), (fresh, "relative")):
        planned = {p.id for p in readers.plan_parts(corpus, "auto", fast_cfg.reader, ids=ids, sizes=ids == "relative")}
        assert set(manifest.read_manifest(out)["part"].to_pylist()) == planned
        assert set(keys_once(shards.load_token_shards(out))) == accepted
        assert run(corpus, out, models, fast_cfg, progress=False)["run_parts"] == 0
    written = json.loads(storage.read_text(storage.join(legacy, shards.JOB_FILE)))
    assert "part_ids" not in written and "max_file_bytes" not in written["reader"]


def test_sigkill_mid_run_then_rerun_is_exactly_once(ray_session, tmp_path, tiny_root_lo_only, fast_cfg):
    corpus, accepted, rejects = corpus_of_parts(tmp_path, n_files=6)
    out = str(tmp_path / "tokens")
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text("reader: {rows_per_part: 4, block_rows: 4}\n"
                        "preprocess: {num_cpus: 0.5, batch_size: 8, min_side: 16}\n"
                        "vqgan_lo: {num_cpus: 0.5, batch_size: 8}\nvqgan_hi: {batch_size: 4}\n"
                        "text: {num_cpus: 0.5, batch_size: 16}\nwrite_cpus: 0.25\ncommit_seconds: 0\n")
    assert load_config(cfg_file) == fast_cfg
    env = dict(os.environ, RAY_ADDRESS=ray_session.get_runtime_context().gcs_address,
               PYTHONPATH=REPO)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.tokenize", "--input", corpus, "--output", out,
         "--checkpoint", tiny_root_lo_only, "--config", str(cfg_file), "--no-progress"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    logs = os.path.join(out, manifest.MANIFEST_DIR)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(logs) and any(f.endswith(".parquet") for f in os.listdir(logs)):
            break  # (a .parquet.tmp-* file is a commit in progress)
        time.sleep(0.02)
    assert proc.poll() is None, "the job ended before a part was published"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = manifest.read_manifest(out)
    assert 1 <= finished.num_rows < 12, "killed mid-run"

    # Also a kill after a part's shards were written but before its entry was committed: the
    # shard files are there, the entry is not. The re-run removes them and redoes the part.
    first = os.path.join(logs, sorted(f for f in os.listdir(logs) if f.endswith(".parquet"))[0])
    lost = pq.read_table(first)
    os.remove(first)
    lost_files = [os.path.join(out, f) for f in pc.list_flatten(lost["files"]).to_pylist()]
    assert lost_files and all(os.path.exists(f) for f in lost_files)

    totals = run(corpus, out, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)
    assert totals["run_parts"] == 12 - finished.num_rows + lost.num_rows
    assert totals["removed"] >= len(lost_files) and not any(os.path.exists(f) for f in lost_files)
    assert set(keys_once(shards.load_token_shards(out))) == accepted
    assert totals["rejects"]["by_reason"] == rejects


def _kill_a_vqgan_actor_mid_task(job_id: str, stop: threading.Event, killed: list) -> None:
    """SIGKILL a VQGAN actor of this job while it runs a part (its process title then ends in
    `.submit`). Only this session's GCS is asked for actors, so no process of another Ray on the
    machine can be picked; the state API would need the dashboard."""
    from ray._private import state

    actor = None
    while not stop.is_set() and not killed:
        if actor is None:
            actor = next(((a, i["Pid"]) for a, i in state.actors(actor_state_name="ALIVE").items()
                          if i["JobID"] == job_id and "(PartTokens)" in i["ActorClassName"] and i["Pid"]), None)
        elif b"PartTokens" in (title := _title(actor[1])) and title.rstrip(b"\0").endswith(b".submit"):
            os.kill(actor[1], signal.SIGKILL)
            killed.append(actor)
        elif not title:
            actor = None  # gone (the pool scaled down or was restarted): look again
        time.sleep(0.005)


def _title(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except FileNotFoundError:
        return b""


def test_sigkill_of_a_worker_mid_run_is_exactly_once(ray_session, tmp_path, tiny_root_lo_only, fast_cfg):
    # Ray Data restarts a dead pool actor (max_restarts=-1) and retries its part on the new one
    # (max_task_retries=-1); a retried part is written to the same file name. The run itself must
    # finish, with every sample once.
    from ray._private import state

    corpus, accepted, rejects = corpus_of_parts(tmp_path, n_files=3)
    out = str(tmp_path / "tokens")
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_a_vqgan_actor_mid_task, daemon=True,
                              args=(ray_session.get_runtime_context().get_job_id(), stop, killed))
    killer.start()
    try:
        totals = run(corpus, out, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)
    finally:
        stop.set()
        killer.join()
    assert killed, "no VQGAN actor was caught running a batch"
    assert state.actors(killed[0][0])["NumRestarts"] >= 1
    assert totals["run_parts"] == totals["parts"] == 6
    assert set(keys_once(shards.load_token_shards(out))) == accepted
    assert totals["rejects"]["by_reason"] == rejects


def _part_tokens(root: str, cfg, out: str, retries: int):
    from pipelines.models import PartTokens

    models = resolve_models(root)
    schema = shards.shard_schema(has_hi=False, text_storage="ids",
                                 meta={"tokens_lo_side": 8, "tokens_hi_side": None, "text_storage": "ids", "text_dim": 64})
    tokenizers = [{"uri": models.vqgan_lo, "pixels": "pixels_lo", "tokens": "tokens_lo", "batch_size": 2}]
    return PartTokens(tokenizers, "cpu", "fp32", 1, reader=cfg.reader,
                      preprocess={"lo_size": 64, "hi_size": None, "text_ids": models.text_encoder, "cfg": cfg.preprocess},
                      write={"out": out, "run": "r", "schema": schema, "examples": 2}, retries=retries)


def test_a_cpu_actor_redoes_a_part_after_a_storage_error_and_gives_up_after_its_retries(tmp_path, tiny_root_lo_only,
                                                                                       fast_cfg, capsys):
    rows = [(f"good{i}", *good(i)[:1], good(i)[1].encode(), "") for i in range(5)]
    write_folder(tmp_path / "corpus", rows)
    cfg = replace(fast_cfg, reader=replace(fast_cfg.reader, rows_per_part=5))
    (part,) = readers.plan_parts(str(tmp_path / "corpus"), "auto", cfg.reader)
    assert readers.Part.from_json(part.to_json()) == part
    batch = pa.table({"part": [part.to_json()]})
    image = tmp_path / "corpus" / "good3.img.png"
    away = tmp_path / "away.png"

    # The image is gone when the part is first read (a storage error, not a bad image), and back
    # before the retry: the part is redone once, and its one record counts every row once.
    image.rename(away)
    threading.Timer(0.2, away.rename, [image]).start()
    record = _part_tokens(tiny_root_lo_only, cfg, str(tmp_path / "out"), retries=2)(batch).to_pylist()
    assert "retry 1 of 2" in capsys.readouterr().out
    assert len(record) == 1 and record[0]["accepted"] == 5 and record[0]["part_rows"] == 5
    shard = pq.read_table(tmp_path / "out" / record[0]["file"])
    assert sorted(k.rsplit("/", 1)[-1] for k in shard["key"].to_pylist()) == [f"good{i}.img.png" for i in range(5)]

    # A lasting storage error is raised after the retries, never counted as a reject.
    image.rename(away)
    start = time.time()
    with pytest.raises(FileNotFoundError):
        _part_tokens(tiny_root_lo_only, cfg, str(tmp_path / "out2"), retries=1)(batch)
    assert time.time() - start >= 0.5 and "retry 1 of 1" in capsys.readouterr().out
    assert not (tmp_path / "out2").exists()


def test_a_second_driver_on_an_output_in_use_refuses_before_touching_it(tmp_path, tiny_root_lo_only, fast_cfg):
    corpus, _, _ = corpus_of_parts(tmp_path, n_files=1)
    out = str(tmp_path / "tokens")
    output_runs.Heartbeat(out, "first").beat()  # a driver that is writing (this process: alive)
    written = storage.join(out, manifest.SHARDS_DIR, "first", "p-0-4.parquet")
    storage.write_bytes(written, b"not committed yet")
    with pytest.raises(output_runs.OutputInUse, match="another run is writing to"):
        run(corpus, out, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)
    assert os.listdir(os.path.join(out, manifest.SHARDS_DIR)) == ["first"] and os.path.exists(written)


def test_a_full_disk_is_one_line_not_retried_and_the_same_command_finishes_once_there_is_room(
        small_disk, tmp_path, tiny_root_lo_only, fast_cfg, capsys):
    corpus, accepted, rejects = corpus_of_parts(tmp_path, n_files=2)
    settings = tmp_path / "fast.yaml"
    settings.write_text(yaml.safe_dump(to_dict(fast_cfg)))
    out = str(small_disk / "tokens")
    command = ["--input", corpus, "--output", out, "--checkpoint", tiny_root_lo_only, "--config", str(settings),
               "--no-progress"]
    with pytest.raises(SystemExit) as failed:
        main(command)
    said = capsys.readouterr()
    assert failed.value.code == 1
    assert said.err == (f"muse tokenize: error: writing to {out}: No space left on device: free space there, or give "
                        "another --output; the parts published so far stay, and the same command tokenizes the rest\n")
    assert "redone in" not in said.out  # a full disk stays full: no part is redone for it
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    totals = run(corpus, out, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)
    assert set(keys_once(shards.load_token_shards(out))) == accepted  # every sample once
    assert totals["rejects"]["by_reason"] == rejects


def test_a_full_disk_is_found_through_ray_and_a_cleanups_error():
    from ray.exceptions import RayTaskError

    with pytest.raises(OSError) as full:
        with open("/dev/full", "wb") as f:  # a real ENOSPC
            f.write(b"x" * 65536)
            f.flush()
    assert storage.full_disk(full.value) is full.value
    wrapped = RayTaskError("PartTokens.submit", "Traceback ...", full.value).as_instanceof_cause()
    assert storage.full_disk(wrapped) is full.value
    try:
        try:
            raise wrapped
        except OSError:
            raise RuntimeError("a cleanup that failed too")
    except RuntimeError as e:
        assert storage.full_disk(e) is full.value
    assert storage.full_disk(ConnectionResetError(104, "Connection reset by peer")) is None
    assert storage.full_disk(OSError("AWS Error SLOW_DOWN during PutObject")) is None
