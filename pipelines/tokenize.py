"""Tokenize an image-caption corpus into Parquet token shards with Ray Data.

    read (one task per part) -> preprocess (CPU tasks) -> VQGAN-lo pool -> [VQGAN-hi pool] -> text pool
        -> driver: collect each part, publish its shard atomically, record it in the manifest

Each model runs in its own actor pool (`compute=ray.data.ActorPoolStrategy`), loaded once per actor
from the model root; pool sizes, CPUs/GPUs per actor and batch sizes come from `TokenizeConfig`, so
a cluster gives the VQGANs whole GPUs while decoding fans out over every CPU. Image sizes come from
the VQGAN configs in the model root. Bad samples never fail the job: they are rejected by reason,
counted in rejects.json and skipped by the model UDFs.

Resumable, exactly once (see pipelines.shards): the output is one shard per input part, named from
the part's source, written whole and then recorded in `_manifest/`; a re-run skips finished parts
without reading them and refuses to mix outputs of different models, settings or inputs. Why not Ray
Data's `CheckpointConfig`: it filters finished rows by id *after* re-reading and re-decoding the
whole corpus, holds every finished id in memory, and has nowhere to record rejected rows (which
are never written), so a re-run would count them again. The manifest skips whole files unopened.

Text storage (`text_storage` in the config):
- "ids" (default): T5/ByT5 token ids trimmed to the true length, ~100-500 bytes per caption.
  Training runs the frozen encoder on them; the text pool needs only the tokenizer.
- "embeddings": the encoder output in fp16 trimmed to the true length, plus the ids. Training skips
  the encoder, but T5-XXL gives 4096 x 2 bytes per token: ~1 MB for a 128-token caption, so a
  billion captions is a petabyte, and every row of it passes through the driver here.

Run: `muse tokenize --input URI --output URI --checkpoint ROOT` or, on a cluster,
`ray job submit --working-dir . -- python -m pipelines.tokenize ...` (Ray 2.60 uses token auth: set
RAY_AUTH_MODE=token for the jobs CLI). Set RAY_ADDRESS to join a running cluster (RAY_ADDRESS=auto
for one started with `ray start`); without it a local Ray is started for the run.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from muse import storage
from muse.config import TextEncoderConfig, to_dict
from pipelines import readers, shards
from pipelines.config import FORMATS, PoolConfig, TokenizeConfig, load_config
from pipelines.preprocess import preprocess_batch

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


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
    from muse.checkpoint import component_uri, has_component

    def pick(flag: str | None, name: str, required: bool) -> str | None:
        if flag:
            return flag
        if checkpoint and has_component(checkpoint, name):
            return component_uri(checkpoint, name)
        if required:
            raise ValueError(f"no {name}: the model root {checkpoint!r} has no {name}/ and no flag names one")
        return None

    return Models(pick(vqgan, "vqgan_lo", True), pick(text_encoder, "text_encoder", True),
                  pick(vqgan_hi, "vqgan_hi", False))


def text_encoder_config(uri: str) -> TextEncoderConfig | None:
    """The TextEncoderConfig of a muse component, or None for a Hugging Face directory/name."""
    from muse.checkpoint import CheckpointError, read_component_config

    try:
        kind, cfg = read_component_config(uri)
    except (CheckpointError, OSError, ValueError):
        return None
    if kind != "text_encoder":
        raise ValueError(f"{uri} holds a {kind!r} component, not a text encoder")
    return cfg


# ---------------------------------------------------------------------------------------------
# Model UDFs: one model per actor, loaded in __init__, called per batch.


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


def _list_column(values: list[np.ndarray], ok: np.ndarray, value_type: pa.DataType) -> pa.Array:
    """A list<value_type> column: values[i] for each row where ok, null elsewhere."""
    lengths = np.zeros(len(ok), np.int64)
    lengths[ok] = [len(v) for v in values]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = np.concatenate(values) if values else np.zeros(0)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, value_type), mask=pa.array(~ok))


def _accepted(batch: pa.Table) -> np.ndarray:
    """Rows to run a model on: data rows that no stage rejected."""
    return pc.and_(pc.equal(batch["part_rows"], -1), pc.equal(batch["reject_reason"], "")).to_numpy(
        zero_copy_only=False)


class VQGANTokens:
    """pixels (raw uint8 RGB, the VQGAN's resolution) -> token ids, int16 flattened row-major."""

    def __init__(self, uri: str, pixels: str, tokens: str, device: str, precision: str, num_cpus: float):
        from muse.checkpoint import load_component

        self.torch = _setup_torch(device, num_cpus)
        self.model = load_component(uri, device=device, expect_kind="vqgan")
        self.size = self.model.config.resolution
        if self.model.config.codebook_size > 32768:
            raise ValueError("token shards store ids as int16: codebook_size must be <= 32768")
        self.pixels, self.tokens, self.device = pixels, tokens, device
        self.dtype = getattr(self.torch, DTYPES[precision])

    def __call__(self, batch: pa.Table) -> pa.Table:
        from muse.data.images import uint8_to_tensor

        ok = _accepted(batch)
        values: list[np.ndarray] = []
        if ok.any():
            raw = batch[self.pixels].filter(pa.array(ok)).to_pylist()
            pixels = np.frombuffer(b"".join(raw), np.uint8).reshape(len(raw), self.size, self.size, 3)
            images = uint8_to_tensor(pixels).to(self.device, non_blocking=True)  # (B, 3, H, W)
            with self.torch.inference_mode(), _autocast(self.torch, self.device, self.dtype):
                ids = self.model.encode(images)  # (B, h, w)
            values = list(ids.flatten(1).to(self.torch.int16).cpu().numpy())
        out = batch.drop_columns([self.pixels])
        return out.append_column(self.tokens, _list_column(values, ok, pa.int16()))


def load_tokenizer(uri: str):
    """(tokenizer, max_length) of a text encoder, without building the encoder (ids need no model).
    `uri`: a muse text_encoder component, or a Hugging Face directory or cache name; local or s3://."""
    import tempfile

    from transformers import AutoTokenizer, ByT5Tokenizer

    cfg = text_encoder_config(uri)
    max_length = (cfg or TextEncoderConfig()).max_length
    tok_config = storage.join(uri, "tokenizer_config.json")
    if cfg is not None and storage.exists(tok_config) and json.loads(storage.read_text(tok_config)).get(
            "tokenizer_class", "").startswith("ByT5"):
        return ByT5Tokenizer(), max_length  # byte-level: no vocabulary files
    with tempfile.TemporaryDirectory() as tmp:
        local = uri
        if storage.is_s3(uri):  # the tokenizer files only, not the weights
            for f in storage.list_files(uri, recursive=False):
                if not f.endswith((".safetensors", ".bin")):
                    storage.write_bytes(os.path.join(tmp, f.rsplit("/", 1)[-1]), storage.read_bytes(f))
            local = tmp
        return AutoTokenizer.from_pretrained(local, local_files_only=True), max_length


class TextTokens:
    """captions -> `text_ids` (list<int32>, true length); with embeddings also `text_emb`
    (list<float16>, text_len x dim flattened) and `text_len`."""

    def __init__(self, uri: str, text_storage: str, device: str, precision: str, num_cpus: float):
        self.torch = _setup_torch(device, num_cpus)
        self.embeddings = text_storage == "embeddings"
        self.device = device
        self.dtype = getattr(self.torch, DTYPES[precision])
        if self.embeddings:
            from muse.checkpoint import load_component
            from muse.text import TextEncoder

            if text_encoder_config(uri) is not None:
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
            out = self.tokenizer(captions, truncation=True, max_length=self.max_length)
            ids = [np.asarray(x, np.int32) for x in out["input_ids"]]
        elif captions:
            torch = self.torch
            with torch.inference_mode(), _autocast(torch, self.device, self.dtype):
                tok, mask = self.encoder.tokenize(captions)  # (B, L)
                hidden = self.encoder.encode_ids(tok, mask)  # (B, L, D)
            lengths = mask.sum(1).tolist()
            tok, hidden = tok.cpu().numpy(), hidden.to(torch.float16).cpu().numpy()
            ids = [tok[i, :n].astype(np.int32) for i, n in enumerate(lengths)]
            emb = [hidden[i, :n].reshape(-1) for i, n in enumerate(lengths)]
        out = batch.append_column("text_ids", _list_column(ids, ok, pa.int32()))
        if self.embeddings:
            lengths = np.zeros(len(ok), np.int32)
            lengths[ok] = [len(x) for x in ids]
            out = out.append_column("text_emb", _list_column(emb, ok, pa.float16()))
            out = out.append_column("text_len", pa.array(lengths, pa.int32()))
        return out


# ---------------------------------------------------------------------------------------------
# The dataset and the job.


def _pool(ds, udf: type, kwargs: dict, pool: PoolConfig):
    import ray

    return ds.map_batches(
        udf, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=pool.batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus,
    )


def _device(pool: PoolConfig) -> str:
    return "cuda" if pool.num_gpus > 0 else "cpu"


def build(cfg: TokenizeConfig, parts: list[readers.Part], models: Models, lo_size: int,
          hi_size: int | None):
    """read -> preprocess -> VQGAN-lo -> [VQGAN-hi] -> text, as one streaming Ray Dataset whose
    rows (plus each part's end row) the driver collects into shards."""
    ds = readers.read_parts(parts, cfg.reader, num_cpus=cfg.preprocess.num_cpus)
    # Decoding is a task pool of its own that fans out over every CPU of the cluster. Its memory
    # reservation also keeps Ray from fusing it into the first model pool (Ray fuses ops with equal
    # remote args, as on CPU-only runs), which would cap decoding at that pool's size.
    ds = ds.map_batches(preprocess_batch, batch_format="pyarrow", batch_size=cfg.preprocess.batch_size,
                        num_cpus=cfg.preprocess.num_cpus, memory=cfg.preprocess.memory_mb * 2**20,
                        fn_kwargs={"lo_size": lo_size, "hi_size": hi_size, "cfg": cfg.preprocess})
    stages = [("pixels_lo", "tokens_lo", models.vqgan_lo, cfg.vqgan_lo)]
    if models.vqgan_hi:
        stages.append(("pixels_hi", "tokens_hi", models.vqgan_hi, cfg.vqgan_hi))
    for pixels, tokens, uri, pool in stages:
        ds = _pool(ds, VQGANTokens, {"uri": uri, "pixels": pixels, "tokens": tokens, "device": _device(pool),
                                     "precision": cfg.precision, "num_cpus": pool.num_cpus}, pool)
    return _pool(ds, TextTokens, {"uri": models.text_encoder, "text_storage": cfg.text_storage,
                                  "device": _device(cfg.text), "precision": cfg.precision,
                                  "num_cpus": cfg.text.num_cpus}, cfg.text)


def job_spec(input_uri: str, cfg: TokenizeConfig, models: Models) -> dict:
    """Everything that decides the content of the shards; a resumed run must match it."""
    from muse.checkpoint import read_component_config

    lo = read_component_config(models.vqgan_lo)[1]
    hi = read_component_config(models.vqgan_hi)[1] if models.vqgan_hi else None
    text = text_encoder_config(models.text_encoder)
    reader = to_dict(cfg.reader)
    reader.pop("block_rows")
    return {
        "input": input_uri, "models": to_dict(models), "text_storage": cfg.text_storage,
        "vqgan_lo": to_dict(lo), "vqgan_hi": to_dict(hi) if hi else None,
        "text_encoder": to_dict(text) if text else None, "reader": reader,
        "preprocess": {k: getattr(cfg.preprocess, k) for k in ("min_side", "max_pixels", "max_caption_chars")},
    }


def _check_resumable(out: str, spec: dict, finished: dict[str, dict], planned: set[str]) -> None:
    path = storage.join(out, shards.JOB_FILE)
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k))
        if changed:
            raise ValueError(f"{out} holds shards made with different {', '.join(changed)}; "
                             "re-run with the same settings to resume, or write to a new --output")
    stale = set(finished) - planned
    if stale:
        raise ValueError(f"{len(stale)} finished part(s) in {out} are not in the input any more (the corpus "
                         "changed since the first run); write to a new --output")
    if not storage.exists(path):
        storage.write_text(path, json.dumps(spec, indent=1))


def run(input_uri: str, output: str, models: Models, cfg: TokenizeConfig | None = None,
        format: str = "auto", on_published: Callable[[dict], None] | None = None,
        progress: bool = True, reporter=None) -> dict:
    """Tokenize every unfinished part of the corpus at `input_uri` into `output`; returns totals.
    `on_published(entry)` is called (on a writer thread) after each part is published. Progress is a
    tqdm bar, or goes to `reporter` (jobs.progress.Reporter: `update(done, metrics)`, `finish(line)`)."""
    import ray
    from tqdm import tqdm

    cfg = cfg or TokenizeConfig()
    input_uri, output = storage.absolute(input_uri), storage.absolute(output)
    spec = job_spec(input_uri, cfg, models)
    lo_size = spec["vqgan_lo"]["resolution"]
    hi_size = spec["vqgan_hi"]["resolution"] if spec["vqgan_hi"] else None
    text_dim = spec["text_encoder"]["d_model"] if spec["text_encoder"] else None
    parts = readers.plan_parts(input_uri, format, cfg.reader)
    finished = shards.finished_parts(output)
    _check_resumable(output, spec, finished, {p.id for p in parts})
    todo = [p for p in parts if p.id not in finished]
    start, rows = time.time(), 0
    if todo:
        _init_ray(cfg, hi_size is not None)
        ray.data.DataContext.get_current().enable_progress_bars = cfg.ray_progress_bars
        meta = {"tokens_lo_side": lo_size // _factor(spec["vqgan_lo"]),
                "tokens_hi_side": hi_size // _factor(spec["vqgan_hi"]) if hi_size else None,
                "text_storage": cfg.text_storage, "text_dim": text_dim}
        schema = shards.shard_schema(has_hi=hi_size is not None, text_storage=cfg.text_storage, meta=meta)
        bar = tqdm(total=len(todo), unit="part", desc="tokenize", disable=not progress or reporter is not None,
                   smoothing=0.1)
        if reporter is not None:
            reporter.total = len(todo)
        lock = threading.Lock()

        def published(entry: dict) -> None:
            nonlocal rows
            with lock:
                rows += entry["rows"]
                bar.update(1)
                bar.set_postfix(images_per_s=f"{rows / max(time.time() - start, 1e-9):.1f}", refresh=False)
                if reporter is not None:
                    reporter.update(bar.n, {"images/s": rows / max(time.time() - start, 1e-9)})
            if on_published is not None:
                on_published(entry)

        writer = shards.ShardWriter(output, schema, {p.id: p.describe() for p in todo},
                                    threads=cfg.write_threads, examples_per_reason=cfg.examples_per_reason,
                                    on_published=published)
        try:
            for batch in build(cfg, todo, models, lo_size, hi_size).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                writer.add(batch)
        except BaseException:
            writer.abort()  # finished publishes stay; unfinished parts are redone by the next run
            raise
        else:
            writer.close()
        finally:
            bar.close()
    seconds = time.time() - start
    totals = shards.summarize(output, list(shards.finished_parts(output).values()), cfg.examples_per_reason)
    reasons = ", ".join(f"{k} {v}" for k, v in totals["rejects"]["by_reason"].items()) or "none"
    line = (f"{totals['accepted']} accepted, {totals['rejected']} rejected ({reasons}) in "
            f"{totals['parts']} parts; this run {len(todo)} parts ({len(parts) - len(todo)} already done), "
            f"{rows} samples in {seconds:.1f}s ({rows / max(seconds, 1e-9):.1f} samples/s) -> {output}")
    if reporter is not None:
        reporter.finish(line)
    else:
        print(f"tokenize: {line}", flush=True)
    return totals | {"run_parts": len(todo), "run_rows": rows, "seconds": seconds}


def _init_ray(cfg: TokenizeConfig, has_hi: bool) -> None:
    """Join the cluster in RAY_ADDRESS (as under `ray job submit`), or start a local Ray with enough
    logical CPUs for one actor of each pool plus read and preprocessing tasks: on a small machine,
    pools that claim every CPU would leave the read tasks unschedulable, a deadlock."""
    import math

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
        return
    pools = [cfg.vqgan_lo, cfg.text] + ([cfg.vqgan_hi] if has_hi else [])
    need = sum(p.min_size * p.num_cpus for p in pools) + 2 * cfg.preprocess.num_cpus
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(need)))


def _factor(vqgan: dict) -> int:
    return 2 ** (len(vqgan["channel_mult"]) - 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="muse tokenize",
        description="Tokenize an image-caption corpus (Parquet, image folder or WebDataset; local, "
                    "file:// or s3://) into Parquet token shards with Ray Data: VQGAN ids for each "
                    "image and T5 ids (or embeddings) for each caption. Killed and run again with the "
                    "same arguments, it finishes the remaining parts and never duplicates a sample.",
        epilog="example: muse tokenize --input data/synth --output data/tokens --checkpoint models/tiny",
    )
    parser.add_argument("--input", required=True, help="corpus file or directory (local, file:// or s3://)")
    parser.add_argument("--output", required=True, help="directory for token shards (local or s3://)")
    parser.add_argument("--checkpoint", help="model root with vqgan_lo/, text_encoder/ and optional vqgan_hi/")
    parser.add_argument("--vqgan", help="low-res VQGAN component directory (overrides ROOT/vqgan_lo)")
    parser.add_argument("--vqgan-hi", help="high-res VQGAN component directory (overrides ROOT/vqgan_hi)")
    parser.add_argument("--text-encoder", help="text encoder component directory, or a local Hugging Face "
                                               "T5 directory/cache name (overrides ROOT/text_encoder)")
    parser.add_argument("--format", choices=FORMATS, default="auto", help="corpus format (default: detect)")
    parser.add_argument("--config", help="YAML with TokenizeConfig fields that differ from the defaults "
                                         "(see configs/tokenize-*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set vqgan_lo.num_gpus=1 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs, CI)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        models = resolve_models(args.checkpoint, args.vqgan, args.vqgan_hi, args.text_encoder)
    except (ValueError, OSError) as e:
        parser.error(str(e))
    run(args.input, args.output, models, cfg, args.format, progress=not args.no_progress)


if __name__ == "__main__":
    main()
