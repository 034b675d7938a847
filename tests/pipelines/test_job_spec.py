"""The job spec of a tokenization output (`pipelines.job_spec`): what decides the shards' content,
recorded in `_job.json`, and how a re-run is checked against it: models named one way, weights told
apart by their files, a refusal that names each field, and an output that finished nothing taking
the new settings."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest

from corpora import corpus_of_parts
from muse import storage
from muse.checkpoint import component_uri
from pipelines import manifest, shards
from pipelines.config import load_config
from pipelines.tokenize import job_spec, resolve_models, run


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


def test_where_a_model_was_imported_from_is_no_difference_between_job_specs():
    """An output tokenized when an import's source folder was part of its tokenizer's version resumes
    with the same weights imported from elsewhere; other weights are still a difference."""
    from pipelines.job_spec import spec_differences

    version = {"extra": {"format": "diffusers"}, "files_sha256": {"model.safetensors": "ab"}}
    old = {"weights": {"vqgan_lo": {**version, "extra": {**version["extra"], "imported_from": "/downloads/a"}}}}
    assert spec_differences(old, {"weights": {"vqgan_lo": version}}) == []
    other = {**version, "files_sha256": {"model.safetensors": "cd"}}
    assert [path for path, _, _ in spec_differences(old, {"weights": {"vqgan_lo": other}})] == \
        [("weights", "vqgan_lo", "files_sha256", "model.safetensors")]


def test_a_component_the_actors_could_not_load_is_refused_before_any_work(tiny_root_lo_only, tmp_path, capsys):
    """A VQGAN whose weights are cut short, or that is another kind of component, is one usage line
    before Ray starts (the actors would each fail on it with a traceback); the text encoder's weights
    count only when captions are stored as embeddings."""
    import shutil

    from pipelines.models import check_loadable
    from pipelines.tokenize import main

    root = str(tmp_path / "root")
    shutil.copytree(tiny_root_lo_only, root)
    corpus = corpus_of_parts(tmp_path, 1, 2)[0]
    weights = os.path.join(root, "text_encoder", "model.safetensors")
    whole = open(weights, "rb").read()
    with open(weights, "wb") as f:  # cut short, as an interrupted copy leaves it
        f.write(whole[:len(whole) // 2])

    def refusal(*args: str) -> str:
        with pytest.raises(SystemExit) as stop:
            main(["--input", corpus, "--output", str(tmp_path / "out"), "--checkpoint", root, "--no-progress", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.count("\n") == 1, err
        return err

    err = refusal("--set", "text_storage=embeddings")
    assert "text_encoder: " in err and "model.safetensors is cut short" in err
    check_loadable(resolve_models(root), embeddings=False)  # caption ids need the tokenizer alone
    assert "holds a 'text_encoder' component, not a vqgan" in refusal("--vqgan", os.path.join(root, "text_encoder"))
    vqgan = os.path.join(root, "vqgan_lo", "model.safetensors")
    with open(vqgan, "r+b") as f:
        f.write(b"\xff" * 8)  # a garbled header length
    assert "vqgan_lo: " in refusal() and "is corrupt" in refusal()
    assert not os.path.exists(tmp_path / "out" / "shards")


def test_a_damaged_job_spec_is_refused_naming_the_file(tmp_path):
    """`_job.json` cut short or garbled after it was written (its write is atomic): what made the
    shards is unknown, so a resumed tokenization and training both refuse it in one line."""
    from jobs.root_fit import _tokenize_spec
    from pipelines.job_spec import read_job_spec

    out = str(tmp_path / "tokens")
    assert read_job_spec(out) is None and _tokenize_spec(out) == {}  # none yet: a new output
    path = storage.join(out, shards.JOB_FILE)
    storage.write_text(path, json.dumps({"spec": 1}))
    assert read_job_spec(out) == {"spec": 1}
    for damaged, why in (('{"spec": ', "JSONDecodeError"), ("[1, 2]", "not a JSON object")):
        storage.write_text(path, damaged)
        for read in (read_job_spec, _tokenize_spec):
            with pytest.raises(manifest.DamagedManifest, match=rf"_job\.json is not a readable job spec \({why}.*"
                                                               r"tokenize the corpus again into a new output"):
                read(out)
