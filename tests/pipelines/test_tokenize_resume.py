"""Tokenization that is interrupted or repeated: crashes and SIGKILLs mid-run, storage errors in a
CPU actor, re-runs against the job spec, and a second driver on an output in use. Every good sample
lands exactly once."""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml

from corpora import good, keys_once, mixed_rows, write_folder, write_parquet
from muse import storage
from muse.checkpoint import component_uri
from muse.config import to_dict
from pipelines import manifest, readers, shards
from pipelines.config import load_config
from pipelines.tokenize import job_spec, main, resolve_models, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def corpus_of_parts(tmp_path, n_files: int = 4, per_file: int = 6) -> tuple[str, set[str], dict]:
    """Parquet files of good rows plus a bad one each, in row groups of 4: rows_per_part 4 cuts each
    in two."""
    bad = {r[0]: r for r in mixed_rows() if r[3]}
    accepted, rejects = set(), Counter()
    folder = tmp_path / "corpus"
    folder.mkdir()
    for f in range(n_files):
        rows = [(f"g{f}-{i}", *good(f * 10 + i, 40), "") for i in range(per_file)]
        rows = [(n, img, cap.encode(), r) for n, img, cap, r in rows]
        rows.insert(2, bad["garbage"] if f % 2 else bad["empty_caption"])
        path = folder / f"c{f}.parquet"
        write_parquet(path, rows, row_group_size=4)
        for i, r in enumerate(rows):
            if r[3]:
                rejects[r[3]] += 1
            else:
                accepted.add(f"{path}#{i}")
    return str(folder), accepted, dict(rejects)


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


def test_the_job_spec_names_models_one_way_and_holds_the_numerics(tiny_root_lo_only, tmp_path, monkeypatch):
    from pipelines.job_spec import _model_uri
    from pipelines.job_spec import check_resumable as _check_resumable

    cfg = load_config(None)
    monkeypatch.chdir(os.path.dirname(tiny_root_lo_only))
    spec = job_spec("/corpus", cfg, resolve_models(tiny_root_lo_only))
    assert job_spec("/corpus", cfg, resolve_models("./" + os.path.basename(tiny_root_lo_only) + "/")) == spec
    assert spec["models"]["vqgan_lo"] == component_uri(tiny_root_lo_only, "vqgan_lo")
    assert _model_uri("google/t5-v1_1-base") == "google/t5-v1_1-base"  # a Hugging Face cache name
    assert spec["device"] == {"vqgan": "cpu", "text": None} and spec["precision"] == {"vqgan": "fp32", "text": None}
    models = resolve_models(tiny_root_lo_only)
    gpu = job_spec("/corpus", load_config(None, ["vqgan_lo.num_gpus=1", "precision=fp16"]), models)
    assert gpu["device"]["vqgan"] == "cuda" and gpu["precision"]["vqgan"] == "fp16"
    # CPU runs fp32 whatever precision says: no reason to refuse that resume.
    assert job_spec("/corpus", load_config(None, ["precision=fp16"]), models) == spec

    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"different device, precision; device\.vqgan: cpu then, cuda now; "
                                         r"precision\.vqgan: fp32 then, fp16 now; re-run with the same settings"):
        _check_resumable(out, gpu, spec, set(), set())
    old = {k: v for k, v in spec.items() if k not in ("device", "precision")}  # written before they were checked
    _check_resumable(out, gpu, old, set(), set())


def test_a_second_driver_on_an_output_in_use_refuses_before_touching_it(tmp_path, tiny_root_lo_only, fast_cfg):
    corpus, _, _ = corpus_of_parts(tmp_path, n_files=1)
    out = str(tmp_path / "tokens")
    manifest.Heartbeat(out, "first").beat()  # a driver that is writing (this process: alive)
    written = storage.join(out, manifest.SHARDS_DIR, "first", "p-0-4.parquet")
    storage.write_bytes(written, b"not committed yet")
    with pytest.raises(manifest.OutputInUse, match="another run is writing to"):
        run(corpus, out, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)
    assert os.listdir(os.path.join(out, manifest.SHARDS_DIR)) == ["first"] and os.path.exists(written)


def test_the_job_spec_tells_weights_apart_by_their_files_not_their_record(tmp_path):
    """A VQGAN trained again under the same run name to the same step has the config, training
    record and weights size of the one before; a text encoder exported again with other weights
    (embeddings) or a refitted tokenizer (caption ids) has the config of the one before. Each makes
    other shards: the spec tells them apart by the files' fingerprint, and the refusal names it. The
    same weights exported again resume."""
    import torch

    from muse.checkpoint import init_model_root, load_component, save_component
    from muse.config import preset
    from muse.text import TextEncoder
    from pipelines.job_spec import ResumeRefused, check_resumable

    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo"))
    lo, te = component_uri(root, "vqgan_lo"), component_uri(root, "text_encoder")
    models = resolve_models(root)
    record = {"finished": True, "stage": "vqgan", "step": 1000, "run": "vqgan_lo"}
    vqgan = load_component(lo)
    save_component(vqgan, lo, extra=record)
    ids, embeddings = load_config(None), load_config(None, ["text_storage=embeddings"])
    spec = job_spec("/corpus", ids, models)
    save_component(load_component(lo), lo, extra=record)
    assert job_spec("/corpus", ids, models) == spec  # the same weights again

    with torch.no_grad():
        next(vqgan.parameters()).add_(0.01)
    save_component(vqgan, lo, extra=record)
    retrained = job_spec("/corpus", ids, models)
    assert retrained["vqgan_lo"] == spec["vqgan_lo"] and retrained["weights"]["vqgan_lo"]["extra"] == record
    with pytest.raises(ResumeRefused, match=r"different weights; weights\.vqgan_lo\.files_sha256\.model\.safetensors: "
                                            r"\w+\.\.\.\w+ then, \w+\.\.\.\w+ now \(vqgan_lo trained or exported again"):
        check_resumable(out, retrained, spec, set(), set())

    # Embeddings: the text encoder's weights.
    before, before_ids = job_spec("/corpus", embeddings, models), job_spec("/corpus", ids, models)
    assert before["weights"]["text_encoder"]["files_sha256"]
    encoder = load_component(te)
    with torch.no_grad():
        next(encoder.parameters()).add_(0.01)
    save_component(encoder, te)
    after = job_spec("/corpus", embeddings, models)
    assert after["text_encoder"] == before["text_encoder"]
    with pytest.raises(ResumeRefused, match=r"different weights; weights\.text_encoder\.files_sha256\.model\.safetensors: "
                                            r".* \(text_encoder trained or exported again"):
        check_resumable(out, after, before, set(), set())
    # Caption ids depend on neither the weights nor the architecture file (which records the
    # transformers version it was written with): an ids output goes on with them.
    assert job_spec("/corpus", ids, models)["weights"] == before_ids["weights"]
    meta_file = tmp_path / "root" / "text_encoder" / "config.json"  # as if exported under another transformers
    meta = json.loads(meta_file.read_text())
    meta["files_sha256"]["t5_config.json"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    assert job_spec("/corpus", ids, models)["weights"] == before_ids["weights"]
    assert job_spec("/corpus", embeddings, models)["weights"] != after["weights"]

    # Caption ids: a "bpe" tokenizer fitted again to other captions (the same weights).
    def bpe(captions: list[str]) -> dict:
        torch.manual_seed(0)
        save_component(TextEncoder.build(preset("t5-tiny-bpe"), captions=captions), te)
        return job_spec("/corpus", ids, models)

    first = bpe(["a red circle", "a blue square"] * 50)
    refitted = bpe(["green triangles on grass"] * 100)
    assert refitted["text_encoder"] == first["text_encoder"] and refitted["weights"] != first["weights"]
    with pytest.raises(ResumeRefused, match=r"weights\.text_encoder\.files_sha256\.tokenizer\.json"):
        check_resumable(out, refitted, first, set(), set())
    assert bpe(["a red circle", "a blue square"] * 50) == first


def test_an_output_from_before_the_text_encoders_weights_were_recorded_resumes(tmp_path):
    """An output whose _job.json records the VQGANs' weights but not the text encoder's resumes, and
    keeps its _job.json; a component saved before fingerprints keeps the version it had (its record
    and weights size), and a reference text encoder records its config alone."""
    from muse.checkpoint import init_model_root
    from muse.components import read_meta
    from pipelines.job_spec import check_resumable, read_job_spec, settings_as_before

    root, out = str(tmp_path / "root"), str(tmp_path / "out")
    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo"))
    models, cfg = resolve_models(root), load_config(None)
    spec = job_spec("/corpus", cfg, models)
    assert set(spec["weights"]) == {"vqgan_lo", "vqgan_hi", "text_encoder"} and spec["weights"]["text_encoder"]
    written = json.loads(json.dumps(spec)) | {"part_ids": "relative", "part_sizes": "as listed"}
    del written["weights"]["text_encoder"]
    storage.write_text(storage.join(out, shards.JOB_FILE), json.dumps(written))

    old = read_job_spec(out)
    again = job_spec("/corpus", cfg, models)
    settings_as_before(again, old, cfg)
    assert check_resumable(out, again, old, {"p"}, {"p"}) == set()
    assert read_job_spec(out) == written
    # Another text encoder config is still refused, naming its field.
    with pytest.raises(ValueError, match=r"different text_encoder; text_encoder\.max_length: 128 then, 32 now"):
        check_resumable(out, again | {"text_encoder": again["text_encoder"] | {"max_length": 32}}, old, set(), set())

    # Components saved before fingerprints: the versions of then.
    for name in ("vqgan_lo", "text_encoder"):
        meta = read_meta(component_uri(root, name))
        del meta["files_sha256"]
        storage.write_text(storage.join(component_uri(root, name), "config.json"), json.dumps(meta))
    legacy = job_spec("/corpus", cfg, models)
    size = os.path.getsize(os.path.join(component_uri(root, "vqgan_lo"), "model.safetensors"))
    assert legacy["weights"]["vqgan_lo"] == {"extra": {}, "weights_bytes": size}
    assert {k: v for k, v in legacy.items() if k != "weights"} == {k: v for k, v in spec.items() if k != "weights"}

    # A reference (a Hugging Face T5 folder named by config.json): its config, no version.
    meta = read_meta(component_uri(root, "text_encoder"))
    meta.update(reference=True)
    meta["config"]["name_or_path"] = str(tmp_path / "t5-folder")
    storage.write_text(storage.join(component_uri(root, "text_encoder"), "config.json"), json.dumps(meta))
    referenced = job_spec("/corpus", cfg, models)
    assert referenced["weights"]["text_encoder"] is None
    assert referenced["text_encoder"]["name_or_path"] == str(tmp_path / "t5-folder")


def test_a_refusal_names_each_field_that_differs_with_both_values(tiny_root_lo_only, tmp_path):
    from pipelines.job_spec import ResumeRefused, check_resumable

    models, out = resolve_models(tiny_root_lo_only), str(tmp_path / "out")
    spec = job_spec("/corpus", load_config(None), models)
    half = job_spec("/corpus", load_config(None, ["reader.rows_per_part=500"]), models)
    with pytest.raises(ResumeRefused, match=r"holds shards made with different reader; reader\.rows_per_part: 1000 "
                                            "then, 500 now; re-run with the same settings to resume"):
        check_resumable(out, half, spec, set(), set())

    # A few fields with their values, then a count; a long value loses its middle.
    many = job_spec("/data/" + "x" * 80 + "/corpus", load_config(None, [
        "reader.rows_per_part=500", "preprocess.min_side=8", "preprocess.max_pixels=10", "text_storage=embeddings"]),
        models)
    with pytest.raises(ResumeRefused) as refused:
        check_resumable(out, many, spec, set(), set())
    message = str(refused.value)
    # (embeddings read the text encoder's weights, which caption ids do not: weights differ too)
    assert "different device, input, precision, preprocess, reader, text_storage, weights;" in message
    assert (f"; device.text: null then, cpu now; input: /corpus then, /data/{'x' * 22}...{'x' * 22}/corpus now; "
            "precision.text: null then, fp32 now; preprocess.max_pixels: 64000000 then, 10 now; and 5 more field(s); "
            "re-run") in message
    assert not os.path.exists(out)


def test_an_output_with_no_finished_part_takes_the_new_settings(tmp_path, tiny_root_lo_only, fast_cfg, monkeypatch):
    """A first run stopped before finishing any part (Ctrl-C, a config mistake) holds no shard: a
    re-run with other settings replaces its _job.json (after the cleanup has deleted what it left
    uncommitted) instead of refusing. Once a part is finished, other settings are refused."""
    import pipelines.tokenize as tokenize

    class Stopped(Exception):
        """Raised where the Ray job would start: the spec is checked and written by then."""

    def stop(todo, *args, **kwargs):
        raise Stopped

    monkeypatch.setattr(tokenize, "_run_parts", stop)
    corpus, _, _ = corpus_of_parts(tmp_path, n_files=1)
    out, models = str(tmp_path / "tokens"), resolve_models(tiny_root_lo_only)
    with pytest.raises(Stopped):
        run(corpus, out, models, fast_cfg, progress=False)
    job = tmp_path / "tokens" / shards.JOB_FILE
    assert json.loads(job.read_text())["reader"]["rows_per_part"] == 4
    left = storage.join(out, manifest.SHARDS_DIR, "20000101T000000-dead00", "p-0-4.parquet")
    storage.write_bytes(left, b"uncommitted")  # what the stopped run's writers had left

    other = replace(fast_cfg, reader=replace(fast_cfg.reader, rows_per_part=8))
    with pytest.raises(Stopped):
        run(corpus, out, models, other, progress=False)
    assert json.loads(job.read_text())["reader"]["rows_per_part"] == 8
    assert not os.path.exists(left)

    manifest.write_entries(out, "log-x-0.parquet", [{"part": "p", "run": "x", "source": "{}", "rows": 1,
                                                      "accepted": 1, "rejects": [], "files": []}])
    with pytest.raises(tokenize.ResumeRefused, match=r"reader\.rows_per_part: 8 then, 4 now"):
        run(corpus, out, models, fast_cfg, progress=False)
    assert json.loads(job.read_text())["reader"]["rows_per_part"] == 8
