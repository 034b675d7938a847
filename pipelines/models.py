"""The models of tokenization: where each comes from (`Models`, `resolve_models`), and the UDFs that
load them once per actor in `__init__` and call them per batch.

The image tokenizers share one Ray Data actor pool (`ImageTokens`; on CPU `PartTokens`, which also
reads, decodes and writes whole parts), the text model has its own (`pipelines.tokenize.build`).
Rows that an earlier stage rejected, and the end rows of parts (see `pipelines.readers`), pass
through without a model call and get nulls in the new columns.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from muse import storage
from muse.tokenizer import load_tokenizer, text_encoder_config
from pipelines import readers, rows
from pipelines.job_spec import ModelRefused, embeddings_refusal
from pipelines.preprocess import preprocess_batch, unpack_pixels


@dataclass(frozen=True)
class Models:
    """Where each component comes from: muse component directories (local or s3://); the text
    encoder may also be a Hugging Face T5 directory or cache name."""

    vqgan_lo: str
    text_encoder: str
    vqgan_hi: str | None = None


def resolve_models(checkpoint: str | None, vqgan: str | None = None, vqgan_hi: str | None = None,
                   text_encoder: str | None = None) -> Models:
    """The model root's vqgan_lo/, vqgan_hi/ (when present) and text_encoder/, each overridable."""
    from muse.components import component_uri, has_component

    def pick(flag: str | None, name: str, required: bool) -> str | None:
        if flag:
            return flag
        if checkpoint and has_component(checkpoint, name):
            return component_uri(checkpoint, name)
        if required and not checkpoint:
            raise ValueError(f"no {name}: give the model root (--checkpoint ROOT) or name the {name} itself")
        if required:
            raise ValueError(f"no {name}: the model root {checkpoint!r} has no {name}/ and no flag names one")
        return None

    return Models(pick(vqgan, "vqgan_lo", True), pick(text_encoder, "text_encoder", True),
                  pick(vqgan_hi, "vqgan_hi", False))


def for_workers(models: Models) -> Models:
    """`models` with local paths made absolute: the actors of a joined cluster start in a folder of
    their own (the `ray start` one), where a relative path names another folder or none. A name that
    is no path (a Hugging Face cache name) stays as it is."""
    def absolute(uri: str | None) -> str | None:
        return storage.absolute(uri) if uri and not storage.is_s3(uri) and os.path.exists(uri) else uri

    return Models(absolute(models.vqgan_lo), absolute(models.text_encoder), absolute(models.vqgan_hi))


def check_loadable(models: Models, embeddings: bool) -> None:
    """Refuse (`job_spec.ModelRefused`) a component the actors would fail to load at every attempt: a
    VQGAN that is another kind of component, or whose weights are missing, cut short or garbled; the
    text encoder's weights too when captions are stored as embeddings (ids need only its tokenizer).
    A few small reads each, so one line says so before Ray starts rather than a traceback per actor."""
    from muse.checkpoint import check_weights
    from muse.components import CheckpointError
    from muse.tokenizer import text_component

    named = [("vqgan_lo", models.vqgan_lo, "vqgan"), ("vqgan_hi", models.vqgan_hi, "vqgan")]
    if embeddings and text_component(models.text_encoder)[1] is not None:  # (not a Hugging Face folder)
        named.append(("text_encoder", models.text_encoder, "text_encoder"))
    for name, uri, role in named:
        if uri is None:
            continue
        try:
            check_weights(uri, expect_kind=role)
        except CheckpointError as e:
            raise ModelRefused(f"{name}: {e}") from None


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _setup_torch(device: str, num_cpus: float):
    import torch

    if device == "cpu":
        torch.set_num_threads(max(1, int(num_cpus)))
    return torch


def _autocast(torch, device: str, dtype):
    """Mixed precision on CUDA; CPU runs fp32."""
    import contextlib

    if device == "cpu" or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=dtype)


def list_column(values: list[np.ndarray], ok: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> column: values[i] for each row where ok, null elsewhere."""
    lengths = np.zeros(len(ok), np.int64)
    lengths[ok] = [len(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type), mask=pa.array(~ok))


def _accepted(batch: pa.Table) -> np.ndarray:
    """Rows to run a model on, as a numpy mask."""
    return rows.accepted(batch).to_numpy(zero_copy_only=False)


class VQGANTokens:
    """pixels (uint8 RGB at the VQGAN's resolution, as `pipelines.preprocess.pack_pixels` ships them)
    -> token ids, int16 flattened row-major; the pixel column is dropped. `batch_size` rows per
    model call (default: the whole batch)."""

    def __init__(self, uri: str, pixels: str, tokens: str, device: str, precision: str, num_cpus: float,
                 batch_size: int | None = None):
        from muse.checkpoint import load_component

        self.torch = _setup_torch(device, num_cpus)
        self.model = load_component(uri, device=device, expect_kind="vqgan")
        self.size = self.model.config.resolution
        if self.model.config.codebook_size > 32768:
            raise ValueError("token shards store ids as int16: codebook_size must be <= 32768")
        self.pixels, self.tokens, self.device, self.batch_size = pixels, tokens, device, batch_size
        self.dtype = getattr(self.torch, DTYPES[precision])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from muse.data.images import uint8_to_tensor

        ok = _accepted(batch)
        values: list[np.ndarray] = []
        raw = batch[self.pixels].filter(pa.array(ok)).to_pylist() if ok.any() else []
        step = self.batch_size or max(1, len(raw))
        for start in range(0, len(raw), step):
            pixels = np.stack([unpack_pixels(r, self.size) for r in raw[start:start + step]])
            images = uint8_to_tensor(pixels).to(self.device, non_blocking=True)  # (B, 3, H, W)
            with self.torch.inference_mode(), _autocast(self.torch, self.device, self.dtype):
                ids = self.model.encode(images)  # (B, h, w)
            values += list(ids.flatten(1).to(self.torch.int16).cpu().numpy())
        out = batch.drop_columns([self.pixels])
        return out.append_column(self.tokens, list_column(values, ok, pa.int16()))


class ImageTokens:
    """Every image tokenizer of the root in one actor: vqgan_lo, then vqgan_hi when there is one.
    Each pixel column goes straight to the actor that encodes it and is dropped there, so the large
    high-res pixels never ride through a pool that does not use them (one object-store hop, not two).
    `tokenizers`: VQGANTokens arguments (uri, pixels, tokens, batch_size) per model."""

    def __init__(self, tokenizers: list[dict], device: str, precision: str, num_cpus: float):
        self.stages = [VQGANTokens(**t, device=device, precision=precision, num_cpus=num_cpus) for t in tokenizers]

    def __call__(self, batch: pa.Table) -> pa.Table:
        for stage in self.stages:
            batch = stage(batch)
        return batch


class PartTokens:
    """All of tokenization for whole parts, in one actor: what CPU actors get, where any split only
    moves data between processes on the same cores. For each part (`pipelines.corpus_data.part_list`
    rows) it reads the rows (`readers.read_part`), decodes them (`preprocess_batch` keyword arguments
    in `preprocess`), encodes them with every image tokenizer of the root (`ImageTokens`), the first
    tokenizer's batch_size rows at a time, and with `write` (`shards.write_block` keyword arguments) writes the part's shard and
    returns its record only. Without `write` (a text pool follows) it returns the tokenized rows.

    A storage error that outlasts the filesystem's own retries of each request (a stream broken
    mid-read, an outage of seconds) redoes the part, at most `retries` times with backoff. This is
    the loop Ray would run for a task; Ray Data cannot bound its retries of an actor's task, so a
    lasting error would loop for ever. A redone part writes the same file and returns one record."""

    def __init__(self, tokenizers: list[dict], device: str, precision: str, num_cpus: float,
                 reader, preprocess: dict, write: dict | None = None, retries: int = 4):
        self.tokens = ImageTokens(tokenizers, device, precision, num_cpus)
        self.rows = tokenizers[0]["batch_size"]
        self.reader, self.preprocess, self.write, self.retries = reader, preprocess, write, retries
        if preprocess.get("text_ids"):
            cached_tokenizer(preprocess["text_ids"])  # loaded with the models, not in the first part

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.concat_tables([self._part(readers.Part.from_json(p)) for p in batch["part"].to_pylist()])

    def _part(self, part: readers.Part) -> pa.Table:
        retried = 0
        while True:
            try:
                return self._tokenize(part)
            except OSError as e:
                if retried == self.retries or storage.full_disk(e):  # a full disk stays full
                    raise
                delay = 0.5 * 2 ** retried
                retried += 1
                print(f"[tokenize] part {part.id} ({part.uri}): {type(e).__name__}: {e}; "
                      f"redone in {delay:.1f}s (retry {retried} of {self.retries})", flush=True)
                time.sleep(delay)

    def _tokenize(self, part: readers.Part) -> pa.Table:
        from pipelines.shards import write_block

        out = [self.tokens(preprocess_batch(block.slice(start, self.rows), **self.preprocess))
               for block in readers.read_part(part, self.reader) for start in range(0, block.num_rows, self.rows)]
        rows = pa.concat_tables(out)
        return rows if self.write is None else write_block(rows, **self.write)


@functools.lru_cache(maxsize=4)
def cached_tokenizer(uri: str):
    """`load_tokenizer`, once per worker process: Ray reuses the processes of the preprocessing tasks,
    so a tokenizer on S3 is fetched once per process, not once per block."""
    return load_tokenizer(uri)


def caption_ids(tokenizer, max_length: int, captions: list[str]) -> list[np.ndarray]:
    """Token ids of each caption, truncated to `max_length`, at their true length."""
    out = tokenizer(captions, truncation=True, max_length=max_length)
    return [np.asarray(x, np.int32) for x in out["input_ids"]]


class TextTokens:
    """captions -> `text_ids` (list<int32>, true length); with embeddings also `text_emb`
    (list<float16>, text_len x dim flattened) and `text_len`. Tokenization runs this as an actor pool
    for embeddings only: ids alone need no model, so the preprocessing tasks add them
    (`pipelines.preprocess.preprocess_batch`)."""

    def __init__(self, uri: str, text_storage: str, device: str, precision: str, num_cpus: float):
        self.torch = _setup_torch(device, num_cpus)
        self.embeddings = text_storage == "embeddings"
        self.device = device
        self.dtype = getattr(self.torch, DTYPES[precision])
        if self.embeddings:
            from muse.checkpoint import load_component
            from muse.text import TextEncoder

            config = text_encoder_config(uri)  # one read of the component's config.json
            if (refused := embeddings_refusal(config, uri)) is not None:  # the driver refuses it first
                raise ValueError(refused)
            if config is not None:
                self.encoder = load_component(uri, device=device, expect_kind="text_encoder")
            else:
                self.encoder = TextEncoder.load_pretrained(uri).to(device)
        else:
            self.tokenizer, self.max_length = load_tokenizer(uri)

    def __call__(self, batch: pa.Table) -> pa.Table:
        ok = _accepted(batch)
        captions = [c for c, keep in zip(batch["caption"].to_pylist(), ok) if keep]
        ids: list[np.ndarray] = []
        emb: list[np.ndarray] = []
        if captions and not self.embeddings:
            ids = caption_ids(self.tokenizer, self.max_length, captions)
        elif captions:
            torch = self.torch
            with torch.inference_mode(), _autocast(torch, self.device, self.dtype):
                tok, mask = self.encoder.tokenize(captions)  # (B, L)
                hidden = self.encoder.encode_ids(tok, mask)  # (B, L, D)
            lengths = mask.sum(1).tolist()
            tok, hidden = tok.cpu().numpy(), hidden.to(torch.float16).cpu().numpy()
            ids = [tok[i, :n].astype(np.int32) for i, n in enumerate(lengths)]
            emb = [hidden[i, :n].reshape(-1) for i, n in enumerate(lengths)]
        out = batch.append_column("text_ids", list_column(ids, ok, pa.int32()))
        if self.embeddings:
            lengths = np.zeros(len(ok), np.int32)
            lengths[ok] = [len(x) for x in ids]
            out = out.append_column("text_emb", list_column(emb, ok, pa.float16()))
            out = out.append_column("text_len", pa.array(lengths, pa.int32()))
        return out
