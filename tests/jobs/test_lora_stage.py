"""`muse train base --lora-rank r`: the root's base is fine-tuned through adapters with its weights
frozen, and the export folds them in (same keys, new outputs)."""

from __future__ import annotations

import pytest
import torch
from jobs_helpers import tiny_config
from test_recipes import make_worker, numpy_batch, token_table

from jobs.root_fit import transformer_config
from muse import checkpoint
from muse.lora import LoRALinear

INFO = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_dim": 64, "text_storage": "ids"}


def test_lora_fine_tune_changes_only_adapters_and_exports_merged(tiny_data, tmp_path):
    import shutil

    root = str(tmp_path / "root")
    shutil.copytree(tiny_data.root, root)
    uri = checkpoint.component_uri(root, "base")
    before = {k: v.clone() for k, v in checkpoint.load_component(uri).state_dict().items()}
    cfg = tiny_config("base.lora_rank=4", "base.optim.lr=1e-2", "base.optim.warmup_steps=0",
                      "base.optim.ema_decay=0", "base.run.max_steps=4")
    model_cfg, init_from = transformer_config("base", None, root, tiny_data.tokens, INFO)
    worker = make_worker("base", cfg.base, root, model_cfg, INFO, init_from=init_from)
    model = worker.wrapper.model
    assert any(isinstance(m, LoRALinear) for m in model.modules())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_a", "lora_b")) for n in trainable)
    collated = worker.collate(numpy_batch(token_table(tiny_data), 8))
    for step in range(4):
        worker.train_step(collated, step)
    frozen = {n.replace(".base.", "."): p for n, p in model.named_parameters() if not p.requires_grad}
    for name, value in frozen.items():
        assert torch.equal(value, before[name]), name  # the root's weights were never updated

    worker.export(4)
    exported = checkpoint.load_component(uri).state_dict()
    assert set(exported) == set(before)  # merged: the root's own keys, loadable and servable as before
    changed = [k for k in before if not torch.equal(exported[k], before[k])]
    assert changed and all(k.endswith(("q.weight", "k.weight", "v.weight", "qkv.weight", "out.weight"))
                           for k in changed)


def test_lora_needs_a_component_to_adapt(tiny_data):
    cfg = tiny_config("base.lora_rank=4")
    # --model asked for a fresh architecture: there is nothing to adapt (init_from is None).
    model_cfg, init_from = transformer_config("base", "base-tiny", tiny_data.root, tiny_data.tokens, INFO)
    assert init_from is None
    with pytest.raises(ValueError, match="LoRA adapts the component already in the model root"):
        make_worker("base", cfg.base, tiny_data.root, model_cfg, INFO)


def test_the_command_line_and_config_refuse_a_rank_or_alpha_that_means_something_else(capsys):
    """`--lora-rank 0` ran a full fine-tune that overwrote the root's base: a rank is at least 1, and
    leaving the flag out is how every weight trains."""
    from jobs.base import main
    from jobs.config import load_config

    with pytest.raises(SystemExit) as refused:
        main(["--tokens", "t", "--checkpoint", "r", "--lora-rank", "0"])
    assert refused.value.code == 2 and "leave the flag out to train every weight" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lora_alpha .* must be > 0"):
        load_config(None, ["base.lora_rank=4", "base.lora_alpha=0"])
