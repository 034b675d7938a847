"""Helpers for the training tests: token shards encoded in-process, tree copies, tiny configs."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from muse import storage

REPO = Path(__file__).resolve().parents[2]
TINY_CONFIG = str(REPO / "configs" / "train_tiny.yaml")


def write_token_shards(root: str, corpus: str, out: str) -> None:
    """Encode the corpus with the root's VQGANs and text tokenizer into one token shard."""
    from PIL import Image

    from muse.checkpoint import component_uri, load_component
    from muse.data.images import pil_to_tensor
    from pipelines.shards import shard_schema, write_table

    table = pa.concat_tables([pq.read_table(f) for f in storage.list_files(corpus) if f.endswith(".parquet")])
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in table["image"].to_pylist()]
    captions = table["caption"].to_pylist()
    lo, hi = (load_component(component_uri(root, n)) for n in ("vqgan_lo", "vqgan_hi"))
    text = load_component(component_uri(root, "text_encoder"))
    with torch.no_grad():
        lo_ids = lo.encode(torch.stack([pil_to_tensor(im, lo.config.resolution) for im in images])).flatten(1)
        hi_ids = hi.encode(torch.stack([pil_to_tensor(im, hi.config.resolution) for im in images])).flatten(1)
    ids, mask = text.tokenize(captions)
    meta = {"tokens_lo_side": lo.config.tokens_per_side, "tokens_hi_side": hi.config.tokens_per_side,
            "text_storage": "ids", "text_dim": text.config.d_model}
    schema = shard_schema(has_hi=True, text_storage="ids", meta=meta)
    rows = pa.table({
        "key": [f"k{i}" for i in range(len(captions))], "caption": captions,
        "tokens_lo": [r.astype(np.int16) for r in lo_ids.numpy()],
        "tokens_hi": [r.astype(np.int16) for r in hi_ids.numpy()],
        "text_ids": [r[m].astype(np.int32) for r, m in zip(ids.numpy(), mask.numpy())],
        "width": [128] * len(captions), "height": [128] * len(captions),
    }).cast(schema)
    write_table(out, rows)


def copy_tree(src: str, dst: str) -> str:
    """Copy a local directory to a local path or an s3:// prefix; returns dst."""
    if not storage.is_s3(dst):
        shutil.copytree(src, dst)
        return dst
    for path in Path(src).rglob("*"):
        if path.is_file():
            storage.write_bytes(storage.join(dst, str(path.relative_to(src))), path.read_bytes())
    return dst


def tiny_config(*overrides: str):
    """configs/train_tiny.yaml with test overrides."""
    from jobs.config import load_config

    return load_config(TINY_CONFIG, list(overrides))


def ray_test_config(stage: str, *overrides: str):
    """The tiny config for a few-step Ray run of `stage`: 2 workers of half a CPU, gloo, no bars."""
    common = {"scaling.num_workers": 2, "scaling.cpus_per_worker": 0.5, "run.progress": False,
              "run.log_every": 2, "run.checkpoint_every": 2, "run.sample_every": 0, "run.max_failures": 0,
              "optim.warmup_steps": 1}
    return tiny_config(*[f"{stage}.{k}={v}" for k, v in common.items()], *overrides)
