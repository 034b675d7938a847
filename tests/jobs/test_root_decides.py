"""Which architecture a transformer stage trains (`jobs.root_fit.transformer_config`): the root's own
component unless a preset is asked for; a mismatch with the tokens is refused. No Ray needed."""

from __future__ import annotations

import pytest

from jobs.root_fit import transformer_config
from muse import checkpoint
from muse.config import preset

INFO = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_dim": 64, "text_storage": "ids"}


def test_a_root_with_a_base_continues_that_base_from_its_weights(tiny_data):
    cfg, init_from = transformer_config("base", None, tiny_data.root, tiny_data.tokens, INFO)
    assert cfg == checkpoint.read_component_config(checkpoint.component_uri(tiny_data.root, "base"))[1]
    assert init_from == checkpoint.component_uri(tiny_data.root, "base")
    sr, sr_from = transformer_config("superres", None, tiny_data.root, tiny_data.tokens, INFO)
    assert sr.hidden == preset("superres-tiny").hidden and sr_from.endswith("superres")


def test_tokens_that_do_not_fit_the_roots_base_are_refused_with_the_way_out(tiny_data):
    with pytest.raises(ValueError, match="--model"):
        transformer_config("base", None, tiny_data.root, tiny_data.tokens, {**INFO, "tokens_lo_side": 16})


def test_an_explicit_preset_trains_from_scratch_and_an_empty_root_gets_the_paper_preset(tiny_data, tmp_path):
    cfg, init_from = transformer_config("base", "base-tiny", tiny_data.root, tiny_data.tokens, INFO)
    assert init_from is None and cfg.layers == preset("base-tiny").layers
    empty = str(tmp_path / "empty")
    paper, init_from = transformer_config("base", None, empty, tiny_data.tokens, INFO)
    assert init_from is None and paper.layers == preset("base-632m").layers and paper.tokens_per_side == 8


def test_a_diffusers_folder_given_as_the_root_says_to_import_it(tiny_data, tmp_path, capsys):
    """The aMUSEd download itself passed where its imported root belongs: one line naming the import
    command, from training as from serving, never a traceback."""
    import json

    from jobs.base import main

    folder = tmp_path / "amused-256"
    (folder / "text_encoder").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "AmusedPipeline"}))
    (folder / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModelWithProjection"]}))
    with pytest.raises(SystemExit) as refused:
        main(["--tokens", tiny_data.tokens, "--checkpoint", str(folder), "--max-steps", "1"])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert f"muse import amused --source {folder} --out ROOT" in err
    from muse.components import check_root

    with pytest.raises(ValueError, match="muse import amused"):  # muse serve and generate check a root so
        check_root(str(folder))
