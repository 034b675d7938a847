import json
import os
from dataclasses import replace

import pytest
import torch

from muse import storage
from muse.checkpoint import (
    COMPONENTS, CheckpointError, check_weights, component_uri, has_component, init_model_root, load_component,
    read_component_config, save_component,
)
from muse.config import preset
from muse.transformer import MaskedTransformer


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_component_round_trip_local(tmp_path):
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny"))
    save_component(model, str(tmp_path / "base"))
    assert sorted(p.name for p in (tmp_path / "base").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_component(str(tmp_path / "base"))
    assert isinstance(loaded, MaskedTransformer) and loaded.config == model.config
    assert _same_weights(model, loaded)
    kind, cfg = read_component_config(str(tmp_path / "base"))
    assert kind == "base" and cfg == preset("base-tiny")


def test_model_root_round_trip_on_s3(s3_bucket):
    root = f"{s3_bucket}/models/tiny"
    models = init_model_root("tiny", root, seed=3)
    assert all(has_component(root, c) for c in COMPONENTS)
    for name in COMPONENTS:
        loaded = load_component(component_uri(root, name))
        assert _same_weights(models[name], loaded), name
    # The text encoder comes back with its tokenizer and encodes identically.
    te = load_component(component_uri(root, "text_encoder"))
    a, _ = models["text_encoder"](["a red circle"])
    b, _ = te(["a red circle"])
    assert torch.allclose(a, b)


def test_missing_checkpoint_is_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_component(str(tmp_path / "nothing"))


def test_corrupt_weights_are_clear(tmp_path):
    model = MaskedTransformer(preset("base-tiny"))
    save_component(model, str(tmp_path / "base"))
    (tmp_path / "base" / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_component(str(tmp_path / "base"))


@pytest.mark.parametrize("where", ["local", "s3"])
def test_weights_cut_short_or_garbled_are_found_from_their_header_alone(tmp_path, s3_bucket, where):
    """check_weights: what a driver checks before its workers load a component (two small reads)."""
    torch.manual_seed(0)
    uri = str(tmp_path / "base") if where == "local" else f"{s3_bucket}/check/base"
    save_component(MaskedTransformer(preset("base-tiny")), uri)
    check_weights(uri)  # whole: passes
    weights = storage.join(uri, "model.safetensors")
    whole = storage.read_bytes(weights)
    for damaged, said in ((whole[:-1], "cut short or corrupt"), (whole[:1000], "cut short: its header alone"),
                          (b"\x00garbage" * 10, "corrupt"), (whole + b"x", "the file holds")):
        storage.write_bytes(weights, damaged)
        with pytest.raises(CheckpointError, match=said):
            check_weights(uri)
    storage.delete(weights)
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        check_weights(uri)
    # An S3 export cut between its two uploads: new weights (a wider model) under the old config.json.
    old_config = storage.read_bytes(storage.join(uri, "config.json"))
    save_component(MaskedTransformer(replace(preset("base-tiny"), hidden=96, heads=4)), uri)
    check_weights(uri)
    storage.write_bytes(storage.join(uri, "config.json"), old_config)
    with pytest.raises(CheckpointError, match=r"weights do not match its config.json .*shapes \['"):
        check_weights(uri)


def test_corrupt_and_mismatched_configs_are_clear(tmp_path):
    model = MaskedTransformer(preset("base-tiny"))
    path = tmp_path / "base"
    save_component(model, str(path))
    good = (path / "config.json").read_text()
    meta = json.loads(good)
    meta["config"]["hidden"] = 64  # weights no longer fit
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError):
        load_component(str(path))
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_component(str(path))
    meta["config"] = {"hidden": 128, "no_such_key": 1}
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="no_such_key"):
        load_component(str(path))
    for edit, message in (({"kind": ["base"]}, "unknown kind"), ({"config": [128]}, "must be an object"),
                          ({"reference": True}, "cannot be a reference")):
        (path / "config.json").write_text(json.dumps(json.loads(good) | edit))
        with pytest.raises(CheckpointError, match=message):
            load_component(str(path))


def test_muse_init_never_overwrites_a_root_unless_forced(tmp_path, capsys):
    from muse.cli import init_main

    root = str(tmp_path / "root")
    init_main(["--preset", "tiny", "--out", root, "--seed", "1"])
    trained = (tmp_path / "root" / "base" / "model.safetensors").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        init_main(["--preset", "tiny", "--out", root])
    assert exit_.value.code == 2 and "already holds a model root" in capsys.readouterr().err
    assert (tmp_path / "root" / "base" / "model.safetensors").read_bytes() == trained
    init_main(["--preset", "tiny", "--out", root, "--force"])
    assert (tmp_path / "root" / "base" / "model.safetensors").read_bytes() != trained


def test_a_full_disk_is_one_line_naming_the_file_and_leaves_no_half_written_component(small_disk, capsys):
    """safetensors says a full disk as its own error, not an OSError: a component write says it as one."""
    from muse.cli import init_main

    with pytest.raises(SystemExit) as exit_:
        init_main(["--preset", "tiny", "--out", str(small_disk / "root")])
    err = capsys.readouterr().err
    assert exit_.value.code != 0 and err.count("\n") == 1, err
    assert "No space left on device writing " in err and "model.safetensors" in err, err
    left = [p.name for p in (small_disk / "root").iterdir()]
    assert not [name for name in left if "staging" in name], left  # whole components or none


def test_weights_this_user_may_not_read_are_said_so(tmp_path):
    """A model root shared by users where one file is not readable by all: safetensors calls that
    "No such file or directory", which sent users looking for a missing file."""
    import shutil
    import tempfile

    from other_user import as_another_user

    shared = tempfile.mkdtemp(dir="/tmp")  # not below pytest's folder, which only its owner may enter
    try:
        uri = os.path.join(shared, "base")
        save_component(MaskedTransformer(preset("base-tiny")), uri)
        for path in (shared, uri, *(os.path.join(uri, name) for name in os.listdir(uri))):
            os.chmod(path, 0o755 if os.path.isdir(path) else 0o644)
        os.chmod(os.path.join(uri, "model.safetensors"), 0o600)

        def load() -> str:
            try:
                load_component(uri)
            except CheckpointError as e:
                return str(e)
            return "loaded"

        said = as_another_user(load)
        assert said == f"{uri}/model.safetensors: this user may not read it (permission denied)", said
    finally:
        shutil.rmtree(shared)


def test_wrong_kind_is_rejected(tmp_path):
    save_component(MaskedTransformer(preset("base-tiny")), str(tmp_path / "base"))
    with pytest.raises(CheckpointError, match="expected 'superres'"):
        load_component(str(tmp_path / "base"), expect_kind="superres")


def test_no_pickle_files_written(tmp_path):
    init_model_root("tiny", str(tmp_path / "root"))
    for f in storage.list_files(str(tmp_path / "root")):
        assert not f.endswith((".bin", ".pt", ".pth", ".pkl")), f


def test_loading_a_component_skips_random_init_and_the_compiler_import(tmp_path):
    """`normal_` on a meta tensor imports torch's compiler (seconds in each tokenizer actor or Serve
    replica that loads a model); `meta_device` skips it, and random init off the meta device still draws."""
    import subprocess
    import sys

    from muse.meta import meta_device

    root = str(tmp_path / "root")
    init_model_root("tiny", root, components=("vqgan_lo", "base", "superres"))
    probe = f"""
import sys
from muse.checkpoint import component_uri, load_component
for name in ("vqgan_lo", "base", "superres"):  # (a T5 text encoder imports it with transformers)
    model = load_component(component_uri({root!r}, name))
    assert not any(t.is_meta for t in model.state_dict().values()), name
assert "torch._dynamo" not in sys.modules, "loading imported torch._dynamo"
"""
    subprocess.run([sys.executable, "-c", probe], check=True)
    with meta_device():
        embedding = torch.nn.Embedding(4, 3)
        drawn = torch.nn.init.normal_(torch.empty(64, device="cpu"))
    assert embedding.weight.is_meta and drawn.std() > 0.5


def test_storage_absolute_pins_relative_local_paths(tmp_path, monkeypatch):
    from muse import storage

    monkeypatch.chdir(tmp_path)
    assert storage.absolute("out/root") == str(tmp_path / "out" / "root")
    assert storage.absolute("file://out") == f"file://{tmp_path / 'out'}"
    assert storage.absolute("s3://bucket/root") == "s3://bucket/root"
    assert storage.absolute("/already/absolute") == "/already/absolute"


def test_components_are_built_on_the_meta_device_and_filled_from_the_file(tmp_path, monkeypatch):
    """No random initialisation before loading: the model is built on the meta device and its
    tensors are the file's; weights tied in the model (T5's embeddings) stay tied."""
    from muse.checkpoint import component_uri, init_model_root, load_component
    from muse.transformer import MaskedTransformer

    root = str(tmp_path / "root")
    saved = init_model_root("tiny", root, components=("text_encoder", "base"))
    built_on = []
    real_init = MaskedTransformer.__init__

    def spy(self, config):
        real_init(self, config)
        built_on.append(self.head.weight.device.type)

    monkeypatch.setattr(MaskedTransformer, "__init__", spy)
    base = load_component(component_uri(root, "base"))
    assert built_on == ["meta"]
    assert not any(t.is_meta for t in list(base.parameters()) + list(base.buffers()))
    for (name, ours), theirs in zip(base.state_dict().items(), saved["base"].state_dict().values()):
        assert torch.equal(ours, theirs), name
    text = load_component(component_uri(root, "text_encoder"))
    t5 = text.model
    assert t5.shared.weight is t5.encoder.embed_tokens.weight and not t5.shared.weight.is_meta
    assert torch.equal(t5.shared.weight, saved["text_encoder"].model.shared.weight)


def test_save_component_fingerprints_the_files_it_writes(tmp_path):
    """config.json records a sha256 of the other files, so a component holding other weights under
    the same training record (a tokenizer trained again to the same step of the same run) has
    another version; the same weights saved again have the same one. A component saved before the
    fingerprint keeps the version it had, and a reference has none beyond its config."""
    from muse.checkpoint import files_sha256
    from muse.components import component_version

    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny"))
    record = {"finished": True, "stage": "base", "step": 10, "run": "base"}
    a, b, c = (str(tmp_path / n) for n in "abc")
    save_component(model, a, extra=record)
    save_component(load_component(a), b, extra=record)  # exported again: byte for byte the same
    meta = json.loads((tmp_path / "a" / "config.json").read_text())
    again = json.loads((tmp_path / "b" / "config.json").read_text())
    assert meta["files_sha256"] == files_sha256(a) == again["files_sha256"]
    assert component_version(a) == component_version(b) == {"extra": record, "files_sha256": meta["files_sha256"]}
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # trained again: same size, same record
    save_component(model, c, extra=record)
    assert component_version(c) != component_version(a)

    # Saved before fingerprints: the record and the weights' size, as then.
    del meta["files_sha256"]
    (tmp_path / "a" / "config.json").write_text(json.dumps(meta))
    size = (tmp_path / "a" / "model.safetensors").stat().st_size
    assert component_version(a) == {"extra": record, "weights_bytes": size}
    # A reference to a Hugging Face folder: its config is all there is (the folder is not read).
    reference = tmp_path / "ref"
    reference.mkdir()
    (reference / "config.json").write_text(json.dumps({"kind": "text_encoder", "format_version": 1, "reference": True,
                                                       "config": {"name_or_path": str(tmp_path / "no-t5")}}))
    assert component_version(str(reference)) is None


def test_a_text_encoders_fingerprint_covers_its_tokenizer(tmp_path):
    """A "bpe" text encoder fitted again to other captions has the same weights (same seed) and
    config, but other caption ids: its fingerprint differs."""
    from muse.components import component_version
    from muse.text import TextEncoder

    versions = []
    for i, captions in enumerate((["a red circle", "a blue square"] * 50, ["green triangles on grass"] * 100,
                                  ["a red circle", "a blue square"] * 50)):
        torch.manual_seed(0)
        encoder = TextEncoder.build(preset("t5-tiny-bpe"), captions=captions)
        save_component(encoder, str(tmp_path / f"te{i}"))
        versions.append(component_version(str(tmp_path / f"te{i}")))
    assert (tmp_path / "te0" / "tokenizer.json").exists()
    weights = [(tmp_path / f"te{i}" / "model.safetensors").read_bytes() for i in (0, 1)]
    assert weights[0] == weights[1]
    assert versions[0] != versions[1] and versions[0] == versions[2]


def test_a_component_on_s3_has_the_fingerprint_of_the_files_it_uploaded(s3_bucket, tmp_path):
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny"))
    save_component(model, f"{s3_bucket}/base")
    save_component(model, str(tmp_path / "base"))
    remote = json.loads(storage.read_text(f"{s3_bucket}/base/config.json"))
    assert remote["files_sha256"] == json.loads((tmp_path / "base" / "config.json").read_text())["files_sha256"]
    assert storage.read_bytes(f"{s3_bucket}/base/model.safetensors") == (tmp_path / "base" / "model.safetensors").read_bytes()


def test_a_file_larger_than_a_part_uploads_whole(s3_bucket, tmp_path, monkeypatch):
    """Component weights go up in parts (streamed from the file, not read whole into memory): every
    byte arrives, in order."""
    monkeypatch.setattr(storage, "READ_CHUNK_BYTES", 1 << 20)
    data = os.urandom(3 << 20) + b"tail"
    (tmp_path / "big.bin").write_bytes(data)
    storage.upload_file(str(tmp_path / "big.bin"), f"{s3_bucket}/big.bin")
    assert storage.read_bytes(f"{s3_bucket}/big.bin") == data


def test_the_same_weights_imported_from_two_folders_are_the_same_version(tmp_path):
    """Where a component was imported from is provenance, not content: tokens made with one import
    are the other's too. Versions recorded before it was left out still compare equal."""
    from muse.components import TOKENS_FROM, comparable, component_version, token_version

    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny"))
    for name, source in (("a", "/downloads/amused-256"), ("b", "/elsewhere/amused-256")):
        save_component(model, str(tmp_path / name), extra={"imported_from": source, "format": "diffusers"})
    a, b = component_version(str(tmp_path / "a")), component_version(str(tmp_path / "b"))
    assert a == b and "imported_from" not in a["extra"]
    recorded = {**a, "extra": {**a["extra"], "imported_from": "/downloads/amused-256"}}  # an older output's record
    assert comparable(recorded) == b
    save_component(model, str(tmp_path / "tuned"), extra={TOKENS_FROM: recorded})  # a decoder fine-tune's record
    assert token_version(str(tmp_path / "tuned")) == b
    torch.manual_seed(1)
    save_component(MaskedTransformer(preset("base-tiny")), str(tmp_path / "c"), extra={"imported_from": "/downloads/amused-256"})
    assert component_version(str(tmp_path / "c")) != a  # other weights still differ


def test_a_saved_component_is_readable_as_the_umask_allows(tmp_path):
    """The staging folder mkdtemp made (0700) becomes what mkdir and open would make: another user
    (a worker on a shared mount) can read the root."""
    old = os.umask(0o022)
    try:
        torch.manual_seed(0)
        save_component(MaskedTransformer(preset("base-tiny")), str(tmp_path / "base"))
    finally:
        os.umask(old)
    assert (tmp_path / "base").stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in (tmp_path / "base").iterdir()} == {0o644}


def test_a_subset_of_a_root_is_seeded_as_the_whole_root_and_the_global_rng_is_left_alone(tmp_path):
    """`muse init --components base --seed 0` writes the base a whole `init --seed 0` writes, whatever
    else is named and in which order; the caller's torch RNG is not reseeded."""
    import torch

    from muse.checkpoint import init_model_root
    from muse.pipeline import MusePipeline

    whole = MusePipeline.from_preset("tiny", seed=0)
    before = torch.get_rng_state()
    subset = init_model_root("tiny", str(tmp_path / "a"), seed=0, components=("superres", "base"))
    assert torch.equal(torch.get_rng_state(), before)
    for name in ("base", "superres"):
        ours, theirs = subset[name].state_dict(), getattr(whole, name).state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), name


def test_init_with_an_empty_component_list_is_refused(tmp_path, capsys):
    import pytest

    from muse.cli import init_main

    with pytest.raises(SystemExit) as exit_:
        init_main(["--preset", "tiny", "--out", str(tmp_path / "r"), "--components", ""])
    assert exit_.value.code == 2 and "--components names no component" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
