"""`train all` gives a model root its frozen text encoder when it has none: a pretrained one (T5-XXL)
is referenced where it lies, never copied or downloaded; a small one is built."""

from __future__ import annotations

import pytest

from jobs.all import ensure_text_encoder
from jobs.config import TrainConfig
from jobs.preflight import RunRefused
from muse import checkpoint


def test_a_pretrained_text_encoder_missing_here_is_refused_with_the_way_out(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # no T5-XXL on this machine
    root = str(tmp_path / "root")
    with pytest.raises(RunRefused, match="--components text_encoder --text-encoder DIR"):
        ensure_text_encoder(TrainConfig(text_encoder="t5-xxl"), root, str(tmp_path / "corpus"))
    assert not checkpoint.has_component(root, "text_encoder")


def test_a_root_that_has_one_keeps_it_and_a_small_one_is_built(tmp_path):
    root = str(tmp_path / "root")
    ensure_text_encoder(TrainConfig(text_encoder="t5-tiny"), root, str(tmp_path / "corpus"))
    uri = checkpoint.component_uri(root, "text_encoder")
    assert checkpoint.has_component(root, "text_encoder") and not checkpoint.read_meta(uri).get("reference")
    written = (tmp_path / "root" / "text_encoder" / "model.safetensors").read_bytes()
    ensure_text_encoder(TrainConfig(text_encoder="t5-xxl"), root, str(tmp_path / "corpus"))  # kept, not replaced
    assert (tmp_path / "root" / "text_encoder" / "model.safetensors").read_bytes() == written
