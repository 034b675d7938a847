"""Tokenization end to end on real corpora (folder, WebDataset, Parquet, local and S3): what the shards
hold, rejects by reason, the command line and configs (re-runs and faults: test_tokenize_resume.py)."""

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from corpora import expected_counts, good, keys_once, mixed_rows, write_folder, write_tar
from other_user import as_another_user
from muse import storage
from muse.checkpoint import component_uri, load_component
from pipelines import manifest, output_runs, readers, shards
from pipelines.config import PreprocessConfig, load_config
from pipelines.preprocess import preprocess_batch
from pipelines.rows import ROW_SCHEMA
from pipelines.tokenize import decodes_in_actors, main, resolve_models, run, stage_times

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def pixels_of(image: bytes, size: int, hi: int | None = None) -> torch.Tensor:
    """The pipeline's own preprocessing of one image -> (1, 3, size, size) in [-1, 1]."""
    row = pa.table({"key": ["k"], "image": [image], "caption": [b"c"], "part": ["p"], "index": [0],
                    "part_rows": [-1], "reject_reason": [""]}, schema=ROW_SCHEMA)
    out = preprocess_batch(row, lo_size=size, hi_size=hi, cfg=PreprocessConfig(min_side=16))
    a = np.frombuffer(out["pixels_lo"][0].as_py(), np.uint8).reshape(1, size, size, 3)
    return torch.from_numpy(a.copy()).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("placement", ["actors", "tasks"])  # decoding in the VQGAN actors, or a pool of its own
def test_folder_corpus_end_to_end(ray_session, tmp_path, tiny_root, fast_cfg, placement, capsys):
    # Commits once at the end (the default, 10 s, for a run this short), so the bar's last parts come from it.
    fast_cfg = replace(fast_cfg, preprocess=replace(fast_cfg.preprocess, placement=placement), commit_seconds=600)
    rows = mixed_rows()
    write_folder(tmp_path / "corpus", rows)
    (tmp_path / "corpus" / "notes.md").write_text("a file of a type not read")
    out = str(tmp_path / "tokens")
    driver_threads: set[str] = set()

    def published(entry):
        driver_threads.update(t.name for t in threading.enumerate())

    totals = run(str(tmp_path / "corpus"), out, resolve_models(tiny_root), fast_cfg, on_published=published)
    # Ray Data's executor ran in the coordinator actor, not here: the driver only commits records.
    assert driver_threads and not any(t.startswith("StreamingExecutor") for t in driver_threads), driver_threads
    assert totals["coordinator_cpu_s"] > 0
    # In the CPU actors, each part is read, tokenized and written by one actor: no task of its own.
    operators = [line.split(":")[0] for line in totals["stats"].splitlines() if line.startswith("Operator ")]
    assert operators == (["Operator 1 ReadParts->MapBatches(PartTokens)"] if placement == "actors" else
                         ["Operator 1 ReadCorpus", "Operator 2 MapBatches(preprocess_batch)",
                          "Operator 3 MapBatches(ImageTokens)", "Operator 4 MapBatches(write_block)"]), totals["stats"]
    # The command line's summary has a line per operator, from Ray Data's report.
    lines = stage_times(totals["stats"])
    assert [line.split()[0] for line in lines] == [op.split(" ", 2)[2] for op in operators], lines
    assert all(re.search(r" \d+ tasks? ", line) and " s CPU) " in line for line in lines), lines

    rejects = json.loads(storage.read_text(storage.join(out, "rejects.json")))
    assert rejects["by_reason"] == expected_counts(rows) and rejects["total"] == 6
    assert rejects["examples"]["too_many_pixels"][0].endswith("bomb.img.png")
    table = shards.load_token_shards(out)
    good_names = {r[0] for r in rows if not r[3]}
    assert {k.rsplit("/", 1)[-1].split(".")[0] for k in keys_once(table)} == good_names
    parts = len(readers.plan_parts(str(tmp_path / "corpus"), "auto", fast_cfg.reader))
    assert totals["accepted"] == table.num_rows == 9 and totals["parts"] == parts > 1
    assert not [f for f in storage.list_files(out) if f"/{manifest.PLAN_DIR}/" in f]  # the run's part lists went with it
    # The bar ends at every part (the last commit lands before it closes), then the summary line.
    console = capsys.readouterr()
    assert f"| {parts}/{parts} [" in console.err and "tokenize: 9 accepted, 6 rejected" in console.out, console
    # What the listing passed over is said at planning, and again at the end (and in manifest.json).
    passed_over = "1 file(s) of other types (.md 1; reader.image_extensions lists the types read)"
    [summary] = [line for line in console.out.splitlines() if line.startswith("tokenize: 9 accepted")]
    assert f": not read: {passed_over}" in console.out and summary.endswith(f"; not read in the corpus: {passed_over}")

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
    assert summary == {"parts": parts, "rows": 15, "accepted": 9, "rejected": 6,
                       "files": len(shards.token_shard_files(out)), "not_read": passed_over}


def test_embeddings_from_webdataset_load_as_training_input(ray_session, tmp_path, tiny_root,
                                                           tiny_root_lo_only, fast_cfg):
    rows = [(f"w{i}", *good(i, 64), "") for i in range(6)]
    rows = [(n, img, cap.encode(), r) for n, img, cap, r in rows]
    (tmp_path / "corpus").mkdir()
    write_tar(tmp_path / "corpus" / "a.tar", rows[:4])
    write_tar(tmp_path / "corpus" / "b.tar", rows[4:], caption_ext="json")
    out = str(tmp_path / "tokens")
    cfg = replace(fast_cfg, text_storage="embeddings")
    run(f"file://{tmp_path}/corpus", out, resolve_models(tiny_root_lo_only), cfg, format="webdataset",
        progress=False)

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


def test_cli(tmp_path, tiny_root, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    help_text = capsys.readouterr().out
    assert e.value.code == 0 and "--checkpoint" in help_text and "--force-cleanup" in help_text
    assert "--retire-changed" in help_text
    with pytest.raises(SystemExit) as refused:  # a usage error, not a traceback
        main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "out"), "--checkpoint", tiny_root])
    assert refused.value.code == 2 and "muse tokenize: error: no input at" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("vqgan_lo: {num_gpu: 1}\n")
    with pytest.raises(SystemExit):
        main(["--input", ".", "--output", str(tmp_path), "--checkpoint", tiny_root, "--config", str(bad)])
    assert "num_gpu" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--input", ".", "--output", str(tmp_path), "--checkpoint", str(tmp_path)])
    assert "vqgan_lo" in capsys.readouterr().err
    # Refused at planning, in one line: what the corpus is cannot be told; the output is the input, or
    # inside it (a later run, or a VQGAN trained on the corpus, would read its shards as corpus).
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "notes.txt").write_text("no images here")
    (tmp_path / "link").symlink_to(corpus)  # the same folder by another name
    for given, output, said in ((corpus, tmp_path / "out2", "cannot tell the format"),
                                (corpus, corpus, "the output .* is the input"),
                                (corpus, corpus / "tokens", "the output .* lies inside the input"),
                                (tmp_path / "link", corpus / "tokens", "the output .* lies inside the input")):
        with pytest.raises(SystemExit) as refused:
            main(["--input", str(given), "--output", str(output), "--checkpoint", tiny_root, "--no-progress"])
        err = capsys.readouterr().err
        assert refused.value.code == 2 and re.search(said, err) and err.count("\n") == 1, err


def test_a_corpus_this_user_may_not_list_is_refused_in_one_line(tiny_root_lo_only):
    """On a shared filesystem the corpus folder may be another user's: one line and exit status 2, where
    it was a traceback. (A folder below it, or a file, is a skip or a reject: test_reader_inputs.py.)"""
    shared = tempfile.mkdtemp(dir="/tmp")  # not below pytest's folder, which only its owner may enter
    try:
        root, corpus, out = (os.path.join(shared, name) for name in ("root", "corpus", "out"))
        shutil.copytree(tiny_root_lo_only, root)
        for folder in (shared, root, *(os.path.join(root, c) for c in os.listdir(root))):
            os.chmod(folder, 0o755)
        os.makedirs(out, mode=0o777)
        os.chmod(out, 0o777)  # the heartbeat is written before the corpus is listed
        os.makedirs(corpus)
        for i in range(2):
            image, caption = good(i, 40)
            open(os.path.join(corpus, f"{i}.png"), "wb").write(image)
            open(os.path.join(corpus, f"{i}.txt"), "w").write(caption)
        os.chmod(corpus, 0o700)

        def tokenize() -> tuple[int, str]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
                main(["--input", corpus, "--output", out, "--checkpoint", root, "--no-progress"])
            return exited.value.code, err.getvalue()

        code, err = as_another_user(tokenize)
        assert (code, err) == (2, f"muse tokenize: error: [Errno 13] Permission denied: '{corpus}'; the parts "
                                  "published so far stay\n")
    finally:
        shutil.rmtree(shared)


def test_an_output_on_a_read_only_filesystem_is_refused_in_one_line(tmp_path, tiny_root_lo_only, read_only_dir,
                                                                   capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    image, caption = good(0, 40)
    (corpus / "a.png").write_bytes(image)
    (corpus / "a.txt").write_text(caption)
    out = read_only_dir / "tokens"
    with pytest.raises(SystemExit) as refused:
        main(["--input", str(corpus), "--output", str(out), "--checkpoint", tiny_root_lo_only, "--no-progress"])
    assert refused.value.code == 2
    assert capsys.readouterr().err == (f"muse tokenize: error: [Errno 30] Read-only file system: '{out}'; the parts "
                                       "published so far stay\n")


def test_setup_mistakes_are_refused_in_one_line(tmp_path, tiny_root_lo_only, capsys):
    """A captions file that is not there, a VQGAN that is not there, an output written by an older
    muse tokenize and an output that is a file: each one usage line and exit status 2, never a
    traceback, and no job spec or shard written."""
    corpus = tmp_path / "corpus"
    write_folder(corpus, [("good0", good(0, 40)[0], good(0, 40)[1].encode(), "")])
    old = tmp_path / "old"
    (old / manifest.MANIFEST_DIR).mkdir(parents=True)
    (old / manifest.MANIFEST_DIR / "part-0.json").write_text("{}")
    (tmp_path / "file").write_text("not a folder")
    args = ["--input", str(corpus), "--checkpoint", tiny_root_lo_only, "--no-progress"]
    for extra, said in (
            (["--output", str(tmp_path / "o1"), "--set", "reader.captions_file=missing.jsonl"],
             r"reader\.captions_file 'missing\.jsonl': no such file \(.*corpus/missing\.jsonl\)"),
            (["--output", str(tmp_path / "o2"), "--vqgan", str(tmp_path / "nonexistent")],
             r"vqgan_lo: no checkpoint at .*nonexistent"),
            (["--output", str(old)], r".*old was written by an older version of muse tokenize"),
            (["--output", str(tmp_path / "file")], r"the output .*file is a file: name a folder"),
            (["--output", str(tmp_path / "o3"), "--config", str(tmp_path / "typo.yaml")],
             r"config file .*typo\.yaml: no such file"),
            (["--output", str(tmp_path / "o4"), "--checkpoint", ""],
             r"no vqgan_lo: give the model root \(--checkpoint ROOT\)")):
        with pytest.raises(SystemExit) as refused:
            main(args + extra)
        err = capsys.readouterr().err
        assert refused.value.code == 2 and err.count("\n") == 1, err
        assert re.search(f"^muse tokenize: error: {said}", err), err
    assert not (tmp_path / "o1" / shards.JOB_FILE).exists() and not (tmp_path / "o2").exists()
    assert os.listdir(old) == [manifest.MANIFEST_DIR] and (tmp_path / "file").read_text() == "not a folder"


def test_a_pool_no_node_can_hold_is_refused_in_one_line(ray_session, tmp_path, tiny_root_lo_only, capsys,
                                                         monkeypatch):
    """An actor asking more GPUs (or CPUs) than any node has would make Ray Data wait forever without a
    word: refused once Ray is joined, or only a warning where the autoscaler may add nodes."""
    from pipelines.config import PoolConfig, TokenizeConfig
    from pipelines.room import room_problem

    corpus = tmp_path / "corpus"
    write_folder(corpus, [("good0", good(0, 40)[0], good(0, 40)[1].encode(), "")])
    args = ["--input", str(corpus), "--checkpoint", tiny_root_lo_only, "--no-progress",
            "--set", "vqgan_lo.num_gpus=99"]  # more than any test machine has
    with pytest.raises(SystemExit) as refused:
        main(args + ["--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1, err
    assert re.search(r"error: each vqgan_lo actor asks for 99 GPUs and no node .* wait forever", err), err

    class Started(Exception):
        """Raised where the job's bookkeeping starts: past the check."""

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(manifest, "PartAssembler", started)
    monkeypatch.setenv("RAY_ADDRESS", "ray://head:10001")  # a submitted job: the cluster may grow
    with pytest.raises(Started):
        main(args + ["--output", str(tmp_path / "out2")])
    assert "tokenize: warning: each vqgan_lo actor asks for 99 GPUs" in capsys.readouterr().out

    cpu_node, gpu_node = {"CPU": 16.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 1.0}
    assert room_problem(TokenizeConfig(vqgan_lo=PoolConfig(num_gpus=1)), [cpu_node, gpu_node]) is None
    assert "keep vqgan_lo.num_cpus at 16 or less" in room_problem(
        TokenizeConfig(vqgan_lo=PoolConfig(num_cpus=32)), [cpu_node, gpu_node])
    text = TokenizeConfig(text=PoolConfig(num_gpus=0.5))  # the text pool runs only for embeddings
    assert room_problem(text, [cpu_node]) is None
    assert "set text.num_gpus=0" in room_problem(replace(text, text_storage="embeddings"), [cpu_node])


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


def test_a_pixel_limit_over_pillows_own_is_refused():
    """Image.open refuses images past 2 x PIL.Image.MAX_IMAGE_PIXELS whatever max_pixels says."""
    from PIL import Image

    from pipelines.config import PILLOW_MAX_PIXELS

    assert PILLOW_MAX_PIXELS == 2 * Image.MAX_IMAGE_PIXELS
    assert load_config(None, [f"preprocess.max_pixels={PILLOW_MAX_PIXELS}"])
    with pytest.raises(ValueError, match="decompression-bomb limit"):
        load_config(None, ["preprocess.max_pixels=500000000"])


def test_model_flags_override_the_root(tiny_root, tiny_root_lo_only):
    m = resolve_models(tiny_root)
    assert m.vqgan_hi == component_uri(tiny_root, "vqgan_hi")
    assert resolve_models(tiny_root_lo_only).vqgan_hi is None
    m = resolve_models(tiny_root_lo_only, vqgan_hi=component_uri(tiny_root, "vqgan_hi"),
                       text_encoder="/elsewhere/t5")
    assert m.vqgan_hi == component_uri(tiny_root, "vqgan_hi") and m.text_encoder == "/elsewhere/t5"


def test_the_actors_get_absolute_model_paths(tiny_root, monkeypatch):
    """The actors of a joined cluster start in the folder of its `ray start`, where `--checkpoint root`
    named nothing: the job hands them absolute paths (a name that is no path, e.g. a Hugging Face
    cache name, and s3:// stay as they are)."""
    from pipelines.models import Models, for_workers

    monkeypatch.chdir(os.path.dirname(tiny_root))
    models = for_workers(resolve_models(os.path.basename(tiny_root)))
    assert models == resolve_models(tiny_root)
    assert all(os.path.isabs(uri) for uri in (models.vqgan_lo, models.vqgan_hi, models.text_encoder))
    named = Models("s3://bucket/root/vqgan_lo", "google/t5-v1_1-small")
    assert for_workers(named) == named


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
        beats.append(os.path.exists(os.path.join(out, manifest.SHARDS_DIR, entry["run"], output_runs.HEARTBEAT)))

    totals = run(str(tmp_path / "a.tar"), out, resolve_models(tiny_root_lo_only), fast_cfg, on_published=published,
                 progress=False)
    assert totals["accepted"] == 2 and totals["rejects"]["by_reason"] == {"caption_not_text": 1, "caption_not_utf8": 1}
    assert sorted(k.rsplit("#", 1)[1] for k in shards.load_token_shards(out)["key"].to_pylist()) == ["caf\\xe9", "ok"]
    assert beats == [True]  # a heartbeat while it ran, none once it ended
    assert not [f for f in storage.list_files(out) if f.endswith(output_runs.HEARTBEAT)]
