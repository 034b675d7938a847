import pytest
import torch

from muse.config import (
    BaseTransformerConfig, MuseConfig, PRESETS, SuperResTransformerConfig, VQGANConfig, from_dict, load,
    model_preset, preset, to_dict,
)
from muse.transformer import MaskedTransformer, SuperResTransformer


@pytest.mark.parametrize("name, expected", [("base-632m", 632e6), ("base-3b", 3e9), ("superres-268m", 268e6)])
def test_paper_presets_match_paper_sizes(name, expected):
    cls = MaskedTransformer if name.startswith("base") else SuperResTransformer
    with torch.device("meta"):
        n = sum(p.numel() for p in cls(preset(name)).parameters())
    assert abs(n - expected) / expected < 0.05, f"{name}: {n:,} parameters vs paper {expected:,.0f}"


def test_paper_tokenizer_presets_shapes():
    assert preset("vqgan-f16-8192").tokens_per_side == 16 and preset("vqgan-f16-8192").codebook_size == 8192
    assert preset("vqgan-f8-8192").tokens_per_side == 64 and preset("vqgan-f8-8192").downsample_factor == 8


def test_tiny_model_preset_is_consistent():
    cfg = model_preset("tiny")
    assert cfg.base.tokens_per_side == cfg.vqgan_lo.tokens_per_side
    assert cfg.base.codebook_size == cfg.vqgan_lo.codebook_size
    assert cfg.superres.hi_tokens_per_side == cfg.vqgan_hi.tokens_per_side
    assert cfg.superres.lo_tokens_per_side == cfg.vqgan_lo.tokens_per_side
    assert cfg.base.text_dim == cfg.text_encoder.d_model == cfg.superres.text_dim


def test_load_yaml_overrides_and_rejects_unknown(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("base:\n  layers: 3\nvqgan_lo:\n  channel_mult: [1, 2]\n")
    cfg = load(MuseConfig, path, ["base.hidden=96", "text_encoder.name_or_path=null"], base=model_preset("tiny"))
    assert cfg.base.layers == 3 and cfg.base.hidden == 96
    assert cfg.vqgan_lo.channel_mult == (1, 2)
    assert cfg.base.heads == model_preset("tiny").base.heads  # untouched keys keep the preset's value
    path.write_text("base:\n  layerz: 3\n")
    with pytest.raises(ValueError, match="layerz"):
        load(MuseConfig, path)
    with pytest.raises(ValueError, match="expected int"):
        from_dict(BaseTransformerConfig, {"layers": "many"})
    with pytest.raises(ValueError, match="expected int"):  # YAML's .inf: int() overflows
        load(MuseConfig, None, ["base.layers=.inf"])
    # Malformed YAML, in the file or an override, is a ValueError naming where (a usage line, not a traceback).
    path.write_text("base: {layers: 3\n")
    with pytest.raises(ValueError, match=f"{path} is not valid YAML"):
        load(MuseConfig, path)
    with pytest.raises(ValueError, match="override 'base.hidden=\\[1' is not valid YAML"):
        load(MuseConfig, None, ["base.hidden=[1"])


def test_round_trip_dict():
    for cfg in PRESETS.values():
        assert from_dict(type(cfg), to_dict(cfg)) == cfg


def test_unknown_preset_lists_known():
    with pytest.raises(ValueError, match="base-tiny"):
        preset("base-9b")


@pytest.mark.parametrize("field", ["heads", "hidden", "kv_heads"])
def test_a_transformer_with_no_heads_is_refused_by_name(field):
    from dataclasses import replace

    from muse.transformer import MaskedTransformer

    with pytest.raises(ValueError, match=rf"{field} 0\b.*must be >= 1"):
        MaskedTransformer(replace(model_preset("tiny").base, **{field: 0}))
