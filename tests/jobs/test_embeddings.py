"""Base training from shards that hold text embeddings (`text_storage: embeddings`): the frozen text
encoder is never built on the workers, and the step reads the stored embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from jobs_helpers import tiny_config
from test_recipes import make_worker, numpy_batch, token_table, token_model_config

from muse import checkpoint
from muse.text import TextEncoder


def embedding_batch(tiny_data, rows: int) -> tuple[dict, int]:
    """Shard rows as `muse tokenize --text-storage embeddings` writes them: fp16 text_len x dim, flattened."""
    batch = numpy_batch(token_table(tiny_data), rows)
    text = checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "text_encoder"))
    with torch.no_grad():
        emb, mask = text([str(c) for c in batch.pop("caption")])
    lengths = mask.sum(1).numpy().astype(np.int32)
    flat = [emb[i, :n].numpy().astype(np.float16).reshape(-1) for i, n in enumerate(lengths)]
    batch.pop("text_ids")
    batch["text_emb"] = np.array(flat + [None], dtype=object)[:-1]  # a ragged object column, as Ray gives it
    batch["text_len"] = lengths
    return batch, text.dim


def test_training_from_embedding_shards_never_builds_a_text_encoder(tiny_data, monkeypatch):
    batch, dim = embedding_batch(tiny_data, 12)

    def refuse(*args, **kwargs):
        raise AssertionError("a text encoder was built for a run whose shards hold embeddings")

    monkeypatch.setattr(TextEncoder, "__init__", refuse)
    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "embeddings", "text_dim": dim}
    cfg = tiny_config("base.optim.lr=3e-3", "base.optim.warmup_steps=0", "base.run.max_steps=20")
    model_cfg = token_model_config("base-tiny", tiny_data.root, tiny_data.tokens, info, superres=False)
    worker = make_worker("base", cfg.base, tiny_data.root, model_cfg, info)
    assert worker.text_encoder is None
    collated = worker.collate(batch)
    assert collated["text_emb"].shape[-1] == dim and "text_ids" not in collated
    losses = [float(worker.train_step(collated, step)["loss"]) for step in range(20)]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.3, losses


def test_embeddings_of_the_wrong_width_are_refused(tiny_data):
    batch, dim = embedding_batch(tiny_data, 2)
    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "embeddings", "text_dim": dim + 1}
    cfg = tiny_config()
    model_cfg = token_model_config("base-tiny", tiny_data.root, tiny_data.tokens, info, superres=False)
    worker = make_worker("base", cfg.base, tiny_data.root, model_cfg, info)
    with pytest.raises(ValueError, match="width"):
        worker.collate(batch)
