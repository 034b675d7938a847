"""The weight files an aMUSEd download may hold: one safetensors file, a sharded one, .bin files
(sharded or not), and a precision variant beside the plain files or alone."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("diffusers")

from muse.amused import AmusedImportError, main as import_main  # noqa: E402
from muse.pipeline import MusePipeline  # noqa: E402
from test_amused_import import PROMPTS, build_amused  # noqa: E402


def test_weights_are_read_from_sharded_variant_and_bin_folders(tmp_path):
    from safetensors.torch import save_file

    from muse.amused import read_weights

    a, b = {"x": torch.ones(2)}, {"y": torch.zeros(3, dtype=torch.float16)}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file(a, str(sharded / "m-00001-of-00002.safetensors"))
    save_file(b, str(sharded / "m-00002-of-00002.safetensors"))
    (sharded / "m.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"x": "m-00001-of-00002.safetensors", "y": "m-00002-of-00002.safetensors"}}))
    state = read_weights(str(sharded))
    assert set(state) == {"x", "y"} and state["y"].dtype == torch.float32
    variant = tmp_path / "variant"
    variant.mkdir()
    save_file(b, str(variant / "m.fp16.safetensors"))
    assert set(read_weights(str(variant))) == {"y"}
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    torch.save(a, legacy / "m.bin")
    assert torch.equal(read_weights(str(legacy))["x"], torch.ones(2))
    with pytest.raises(AmusedImportError, match="no weights"):
        read_weights(str(tmp_path))
    # Both precisions sharded side by side: the plain index wins, as the plain single file does.
    (sharded / "m-00001-of-00001.fp16.safetensors").write_bytes(b"")
    (sharded / "m.safetensors.index.fp16.json").write_text(
        json.dumps({"weight_map": {"x": "m-00001-of-00001.fp16.safetensors"}}))
    assert set(read_weights(str(sharded))) == {"x", "y"}
    sharded_bin = tmp_path / "sharded_bin"
    sharded_bin.mkdir()
    torch.save(a, sharded_bin / "m-00001-of-00002.bin")
    torch.save(b, sharded_bin / "m-00002-of-00002.bin")
    (sharded_bin / "m.bin.index.json").write_text(json.dumps(
        {"weight_map": {"x": "m-00001-of-00002.bin", "y": "m-00002-of-00002.bin"}}))
    assert set(read_weights(str(sharded_bin))) == {"x", "y"}


def test_a_download_of_the_fp16_variant_alone_imports(tmp_path):
    """`save_pretrained(variant="fp16")`, as a download of the `*fp16*` files only: every component,
    the CLIP text encoder included, is read from its variant files."""
    pipe = build_amused("amused-256")
    pipe.save_pretrained(tmp_path / "src", variant="fp16")
    assert not (tmp_path / "src" / "text_encoder" / "model.safetensors").exists()
    assert import_main(["amused", "--source", str(tmp_path / "src"), "--out", str(tmp_path / "root")]) == 0
    assert MusePipeline.from_pretrained(str(tmp_path / "root"))(PROMPTS[0], steps=2, seed=0, superres=False)
