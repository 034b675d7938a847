import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from corpora import expected_counts, good, mixed_rows, write_folder, write_parquet, write_tar
from muse import storage
from muse.checkpoint import component_uri, load_component
from pipelines import manifest, readers, shards
from pipelines.config import PreprocessConfig, load_config
from pipelines.preprocess import preprocess_batch
from pipelines.readers import ROW_SCHEMA
from pipelines.tokenize import decodes_in_actors, job_spec, main, resolve_models, run

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pixels_of(image: bytes, size: int, hi: int | None = None) -> torch.Tensor:
    """The pipeline's own preprocessing of one image -> (1, 3, size, size) in [-1, 1]."""
    row = pa.table({"key": ["k"], "image": [image], "caption": [b"c"], "part": ["p"], "index": [0],
                    "part_rows": [-1], "reject_reason": [""]}, schema=ROW_SCHEMA)
    out = preprocess_batch(row, lo_size=size, hi_size=hi, cfg=PreprocessConfig(min_side=16))
    a = np.frombuffer(out["pixels_lo"][0].as_py(), np.uint8).reshape(1, size, size, 3)
    return torch.from_numpy(a.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1


def keys_once(table: pa.Table) -> Counter:
    counts = Counter(table["key"].to_pylist())
    assert max(counts.values()) == 1, [k for k, n in counts.items() if n > 1][:3]
    return counts


@pytest.mark.parametrize("placement", ["actors", "tasks"])  # decoding in the VQGAN actors, or a pool of its own
def test_folder_corpus_end_to_end(ray_session, tmp_path, tiny_root, fast_cfg, placement):
    fast_cfg = replace(fast_cfg, preprocess=replace(fast_cfg.preprocess, placement=placement))
    rows = mixed_rows()
    write_folder(tmp_path / "corpus", rows)
    out = str(tmp_path / "tokens")
    driver_threads: set[str] = set()

    def published(entry):
        driver_threads.update(t.name for t in threading.enumerate())

    totals = run(str(tmp_path / "corpus"), out, resolve_models(tiny_root), fast_cfg, on_published=published,
                 progress=False)
    # Ray Data's executor ran in the coordinator actor, not here: the driver only commits records.
    assert driver_threads and not any(t.startswith("StreamingExecutor") for t in driver_threads), driver_threads
    assert totals["coordinator_cpu_s"] > 0
    # In the CPU actors, each part is read, tokenized and written by one actor: no task of its own.
    operators = [line.split(":")[0] for line in totals["stats"].splitlines() if line.startswith("Operator ")]
    assert operators == (["Operator 1 ReadParts->MapBatches(PartTokens)"] if placement == "actors" else
                         ["Operator 1 ReadCorpus", "Operator 2 MapBatches(preprocess_batch)",
                          "Operator 3 MapBatches(ImageTokens)", "Operator 4 MapBatches(write_block)"]), totals["stats"]

    rejects = json.loads(storage.read_text(storage.join(out, "rejects.json")))
    assert rejects["by_reason"] == expected_counts(rows) and rejects["total"] == 6
    assert rejects["examples"]["too_many_pixels"][0].endswith("bomb.img.png")
    table = shards.load_token_shards(out)
    good_names = {r[0] for r in rows if not r[3]}
    assert {k.rsplit("/", 1)[-1].split(".")[0] for k in keys_once(table)} == good_names
    assert totals["accepted"] == table.num_rows == 9 and totals["parts"] == 4

    info = shards.shard_info(out)
    assert info == {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "ids", "text_dim": 64,
                    "format_version": 2}
    assert table.schema.field("tokens_lo").type == pa.list_(pa.int16())
    assert table.schema.field("text_ids").type == pa.list_(pa.int32())
    assert "text_emb" not in table.column_names

    # Every row carries the tokens of its own image and caption (no row misalignment in batches).
    lo = load_component(component_uri(tiny_root, "vqgan_lo"))
    hi = load_component(component_uri(tiny_root, "vqgan_hi"))
    text = load_component(component_uri(tiny_root, "text_encoder"))
    by_name = {r[0]: r for r in rows if not r[3]}
    expect_lo = {n: lo.encode(pixels_of(r[1], 64)).flatten().numpy() for n, r in by_name.items()}
    expect_hi = {n: hi.encode(pixels_of(r[1], 128)).flatten().numpy() for n, r in by_name.items()}
    for row in table.to_pylist():
        name = row["key"].rsplit("/", 1)[-1].split(".")[0]
        caption = by_name[name][2].decode()
        assert row["caption"] == caption
        # A random VQGAN has near-tie codes that a different batch composition can flip (float
        # sums differ with batch shape), so ids agree only mostly; alignment must be exact: each
        # row matches its own image's tokens, and where two images' tokens differ (the white
        # background often gives them the same ids) it follows its own image far more than the other.
        for got, expect in ((np.asarray(row["tokens_lo"]), expect_lo), (np.asarray(row["tokens_hi"]), expect_hi)):
            assert (got == expect[name]).mean() >= 0.8, name
            for other, theirs in expect.items():
                differ = expect[name] != theirs
                if other != name and differ.sum() >= 4:
                    own, swapped = (got[differ] == expect[name][differ]).mean(), (got[differ] == theirs[differ]).mean()
                    assert own >= swapped + 0.3, (name, other, own, swapped)
        ids, mask = text.tokenize([caption])
        assert row["text_ids"] == ids[0][mask[0]].tolist()
        assert (row["width"], row["height"]) == ((72, 72) if name in ("cmyk", "png16", "rgba") else (80, 80))

    assert shards.read_token_shards(out).count() == table.num_rows
    summary = json.loads(storage.read_text(storage.join(out, "manifest.json")))
    assert summary == {"parts": 4, "rows": 15, "accepted": 9, "rejected": 6,
                       "files": len(shards.token_shard_files(out))}


def test_embeddings_from_webdataset_load_as_training_input(ray_session, tmp_path, tiny_root,
                                                           tiny_root_lo_only, fast_cfg):
    rows = [(f"w{i}", *good(i, 64), "") for i in range(6)]
    rows = [(n, img, cap.encode(), r) for n, img, cap, r in rows]
    write_tar(tmp_path / "a.tar", rows[:4])
    write_tar(tmp_path / "b.tar", rows[4:], caption_ext="json")
    out = str(tmp_path / "tokens")
    cfg = replace(fast_cfg, text_storage="embeddings")
    run(f"file://{tmp_path}", out, resolve_models(tiny_root_lo_only), cfg, format="webdataset", progress=False)

    table = shards.load_token_shards(out)
    keys_once(table)
    assert table.num_rows == 6 and "tokens_hi" not in table.column_names
    assert table.schema.field("text_emb").type == pa.list_(pa.float16())
    text = load_component(component_uri(tiny_root_lo_only, "text_encoder"))
    for row in table.to_pylist():
        with torch.no_grad():
            emb, mask = text([row["caption"]])
        n = int(mask.sum())
        assert row["text_len"] == n == len(row["text_ids"])
        got = np.asarray(row["text_emb"], np.float32).reshape(n, text.dim)
        np.testing.assert_allclose(got, emb[0, :n].numpy(), rtol=1e-2, atol=1e-2)

    # What a training step does with a batch of shard rows: token grid + text -> masked-token loss.
    from muse.losses import masked_token_loss
    from muse.masking import mask_tokens, sample_mask_rates

    info = shards.shard_info(out)
    base = load_component(component_uri(tiny_root, "base"))
    tokens = torch.tensor(table["tokens_lo"].to_pylist(), dtype=torch.long)  # (B, h*w)
    assert tokens.shape == (6, info["tokens_lo_side"] ** 2)
    lengths = table["text_len"].to_pylist()
    emb = torch.zeros(6, max(lengths), info["text_dim"])
    text_mask = torch.zeros(6, max(lengths), dtype=torch.bool)
    for i, (flat, n) in enumerate(zip(table["text_emb"].to_pylist(), lengths)):
        emb[i, :n] = torch.tensor(flat).view(n, -1)
        text_mask[i, :n] = True
    g = torch.Generator().manual_seed(0)
    masked, mask = mask_tokens(tokens, sample_mask_rates(6, generator=g), base.mask_token_id, generator=g)
    loss = masked_token_loss(base(masked, base.encode_context(emb, text_mask)), tokens, mask)
    assert torch.isfinite(loss) and loss > 0


def test_s3_input_and_output_and_trailing_slashes(ray_session, s3_bucket, tiny_root_lo_only, fast_cfg):
    import io

    rows = [r for r in mixed_rows() if r[0] in ("good0", "good1", "good2", "rgba", "garbage", "tiny")]
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": [r[1] for r in rows], "caption": [r[2] for r in rows]}), buf)
    storage.write_bytes(f"{s3_bucket}/corpus/part-0.parquet", buf.getvalue())
    out = f"{s3_bucket}/tokens"
    run(f"{s3_bucket}/corpus", out, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)

    files = storage.list_files(out)
    assert storage.join(out, "rejects.json") in files and storage.join(out, shards.JOB_FILE) in files
    rejects = json.loads(storage.read_text(storage.join(out, "rejects.json")))
    assert rejects["by_reason"] == {"corrupt_image": 1, "too_small": 1}
    table = shards.load_token_shards(out)
    assert sorted(keys_once(table)) == sorted(f"{s3_bucket}/corpus/part-0.parquet#{i}" for i in (0, 1, 2, 3))
    assert shards.read_token_shards(out, columns=["key"]).count() == 4

    # The same job spelled with trailing slashes resumes it: nothing to do, nothing refused.
    for corpus, tokens in ((f"{s3_bucket}/corpus/", out), (f"{s3_bucket}/corpus", f"{out}/"),
                           (f"{s3_bucket}/corpus//", f"{out}/")):
        again = run(corpus, tokens, resolve_models(tiny_root_lo_only), fast_cfg, progress=False)
        assert again["run_parts"] == 0 and again["accepted"] == 4
    assert json.loads(storage.read_text(storage.join(out, shards.JOB_FILE)))["input"] == f"{s3_bucket}/corpus"


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
                                                            fast_cfg):
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
    with pytest.raises(ValueError, match="not in the input"):
        run(corpus, out, models, fast_cfg, progress=False)


def test_output_written_before_relative_part_ids_resumes_with_its_own(ray_session, tmp_path, tiny_root_lo_only,
                                                                     fast_cfg):
    """An output whose _job.json predates relative part ids keeps hashing full paths, so its finished
    parts stay finished; a new output names parts by their paths below the corpus."""
    corpus, accepted, _ = corpus_of_parts(tmp_path, n_files=1)
    models = resolve_models(tiny_root_lo_only)
    legacy, fresh = str(tmp_path / "legacy"), str(tmp_path / "fresh")
    spec = job_spec(corpus, fast_cfg, models) | {"parquet_parts": "whole row groups"}
    storage.write_text(storage.join(legacy, shards.JOB_FILE), json.dumps(spec))
    run(corpus, legacy, models, fast_cfg, progress=False)
    run(corpus, fresh, models, fast_cfg, progress=False)
    for out, ids in ((legacy, "absolute"), (fresh, "relative")):
        planned = {p.id for p in readers.plan_parts(corpus, "auto", fast_cfg.reader, ids=ids)}
        assert set(manifest.read_manifest(out)["part"].to_pylist()) == planned
        assert set(keys_once(shards.load_token_shards(out))) == accepted
        assert run(corpus, out, models, fast_cfg, progress=False)["run_parts"] == 0
    assert "part_ids" not in json.loads(storage.read_text(storage.join(legacy, shards.JOB_FILE)))


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


def test_cli(tmp_path, tiny_root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and "--checkpoint" in help_text and "--force-cleanup" in help_text
    bad = tmp_path / "bad.yaml"
    bad.write_text("vqgan_lo: {num_gpu: 1}\n")
    with pytest.raises(SystemExit):
        main(["--input", ".", "--output", str(tmp_path), "--checkpoint", tiny_root, "--config", str(bad)])
    assert "num_gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", ".", "--output", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert "vqgan_lo" in capsys.readouterr().err


def test_decoding_runs_in_cpu_actors_and_beside_gpu_actors():
    cfg = load_config(None)
    assert cfg.preprocess.placement == "auto" and decodes_in_actors(cfg)
    assert not decodes_in_actors(load_config(os.path.join(REPO, "configs", "tokenize-gpu.yaml")))
    assert not decodes_in_actors(load_config(None, ["preprocess.placement=tasks"]))
    assert decodes_in_actors(load_config(None, ["preprocess.placement=actors", "vqgan_lo.num_gpus=1"]))
    with pytest.raises(ValueError, match="placement"):
        load_config(None, ["preprocess.placement=driver"])


def test_vqgan_hi_shares_the_vqgan_lo_actors():
    assert load_config(None, ["vqgan_hi.batch_size=4"]).vqgan_hi.batch_size == 4
    with pytest.raises(ValueError, match="vqgan_hi sets only batch_size"):
        load_config(None, ["vqgan_hi.num_gpus=1"])


def test_model_flags_override_the_root(tiny_root, tiny_root_lo_only):
    m = resolve_models(tiny_root)
    assert m.vqgan_hi == component_uri(tiny_root, "vqgan_hi")
    assert resolve_models(tiny_root_lo_only).vqgan_hi is None
    m = resolve_models(tiny_root_lo_only, vqgan_hi=component_uri(tiny_root, "vqgan_hi"),
                       text_encoder="/elsewhere/t5")
    assert m.vqgan_hi == component_uri(tiny_root, "vqgan_hi") and m.text_encoder == "/elsewhere/t5"


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(os.path.join(REPO, "configs"))
                                        if f.startswith("tokenize")))
def test_shipped_configs_load(name):
    load_config(os.path.join(REPO, "configs", name))


def test_planning_and_caption_ids_never_import_torch(tiny_root, tmp_path):
    """The driver, the coordinator that runs Ray Data's executor and the caption-id tasks plan, read
    model configs and make ids: none of that needs torch, whose import is most of a Ray worker's start
    (~0.8 s) and ~200 MB of its memory."""
    write_folder(tmp_path / "corpus", [(f"good{i}", *good(i)[:1], good(i)[1].encode(), "") for i in range(2)])
    probe = f"""
import sys
from pipelines import readers
from pipelines.config import TokenizeConfig
from pipelines.models import cached_tokenizer, caption_ids
from pipelines.tokenize import Coordinator, job_spec, resolve_models
models = resolve_models({tiny_root!r})
cfg = TokenizeConfig()
spec = job_spec({str(tmp_path / "corpus")!r}, cfg, models)
parts = readers.plan_parts({str(tmp_path / "corpus")!r}, "auto", cfg.reader)
tokenizer, max_length = cached_tokenizer(models.text_encoder)
ids = caption_ids(tokenizer, max_length, ["a red circle"])
assert spec["vqgan_lo"]["resolution"] > 0 and len(parts) == 1 and ids[0][-1] == 1, (spec, parts, ids)
assert "torch" not in sys.modules and "transformers" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", probe], check=True)


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


def test_bad_text_is_counted_end_to_end_and_the_driver_beats_while_it_runs(ray_session, tmp_path, tiny_root_lo_only,
                                                                          fast_cfg):
    import io
    import tarfile

    samples = [("ok", b"a red circle"), ("surrogate", json.dumps({"caption": "bad \ud800"}).encode()),
               ("caf\xe9", b"a cafe"), ("listed", json.dumps({"caption": ["x", "y"]}).encode())]
    with tarfile.open(tmp_path / "a.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for i, (name, caption) in enumerate(samples):
            ext = "json" if caption.startswith(b"{") else "txt"
            for member, data in ((f"{name}.png", good(i, 40)[0]), (f"{name}.{ext}", caption)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    out = str(tmp_path / "tokens")
    beats = []

    def published(entry):
        beats.append(os.path.exists(os.path.join(out, manifest.SHARDS_DIR, entry["run"], manifest.HEARTBEAT)))

    totals = run(str(tmp_path / "a.tar"), out, resolve_models(tiny_root_lo_only), fast_cfg, on_published=published,
                 progress=False)
    assert totals["accepted"] == 2 and totals["rejects"]["by_reason"] == {"caption_not_text": 1, "caption_not_utf8": 1}
    assert sorted(k.rsplit("#", 1)[1] for k in shards.load_token_shards(out)["key"].to_pylist()) == ["caf\\xe9", "ok"]
    assert beats == [True]  # a heartbeat while it ran, none once it ended
    assert not [f for f in storage.list_files(out) if f.endswith(manifest.HEARTBEAT)]


def test_the_job_spec_names_models_one_way_and_holds_the_numerics(tiny_root_lo_only, tmp_path, monkeypatch):
    from pipelines.tokenize import _check_resumable, _model_uri

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
    with pytest.raises(ValueError, match=r"different device, precision; device: \{'vqgan': 'cpu'.*'cuda'"):
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
