"""The job spec of a token-shard output (`OUTPUT/_job.json`): everything that decides the shards'
content, written by the first run; a later run resumes only with the same spec."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from muse import storage
from muse.config import to_dict
from pipelines import readers, shards
from pipelines.config import PoolConfig, TokenizeConfig
from pipelines.models import text_encoder_config


class ResumeRefused(ValueError):
    """An output that this run may not resume as asked: made with other settings, or holding parts
    of a corpus that changed. The command line prints it as a usage error (exit 2)."""


def device_of(pool: PoolConfig) -> str:
    return "cuda" if pool.num_gpus > 0 else "cpu"


def job_spec(input_uri: str, cfg: TokenizeConfig, models) -> dict:
    """Everything that decides the content of the shards; a resumed run must match it."""
    from muse.components import component_version, parse_config, read_meta

    def tokenizer(uri: str | None) -> tuple[dict | None, dict | None]:
        """(config, weights version) of a VQGAN, from one read of its config.json."""
        if uri is None:
            return None, None
        meta = read_meta(uri)
        return to_dict(parse_config(meta, uri)), component_version(uri, meta)

    (lo, lo_weights), (hi, hi_weights) = tokenizer(models.vqgan_lo), tokenizer(models.vqgan_hi)
    text = text_encoder_config(models.text_encoder)
    reader = to_dict(cfg.reader)
    reader.pop("block_rows")
    embeddings = cfg.text_storage == "embeddings"  # ids need no model: no text device
    return {
        "input": input_uri, "models": {k: _model_uri(v) for k, v in to_dict(models).items()},
        "text_storage": cfg.text_storage,
        # The numerics of the token ids (and embeddings): CPU always runs fp32.
        "device": {"vqgan": device_of(cfg.vqgan_lo), "text": device_of(cfg.text) if embeddings else None},
        "precision": {"vqgan": _precision(cfg, cfg.vqgan_lo),
                      "text": _precision(cfg, cfg.text) if embeddings else None},
        "vqgan_lo": lo, "vqgan_hi": hi,
        # Which weights: a retrained tokenizer with the same config makes other tokens.
        "weights": {"vqgan_lo": lo_weights, "vqgan_hi": hi_weights},
        "text_encoder": to_dict(text) if text else None, "reader": reader,
        "preprocess": {k: getattr(cfg.preprocess, k) for k in ("min_side", "max_pixels", "max_caption_chars")},
        "format_version": shards.FORMAT_VERSION,
    }


def _model_uri(uri: str | None) -> str | None:
    """`readers.canonical` for a component's path or URI (`./root/x` and `/abs/root/x` are one
    model); a Hugging Face cache name, which is no local path, stays as it is."""
    if uri is None or not (storage.is_s3(uri) or uri.startswith("file://") or os.path.exists(uri)):
        return uri
    return readers.canonical(uri)


def _precision(cfg: TokenizeConfig, pool: PoolConfig) -> str:
    return cfg.precision if pool.num_gpus > 0 else "fp32"


def settings_as_before(spec: dict, old: dict | None, cfg: TokenizeConfig) -> tuple[TokenizeConfig, str, str, bool]:
    """(cfg, part ids, folder cuts, sizes in part ids) for a run into an output whose _job.json is
    `old`: an output tokenized before one of these existed goes on as its start was made, and a new
    output records them in `spec`. Folder cuts are recorded once planning has met a folder."""
    new = old is None
    # Part ids hashing full paths, before ids were relative to the corpus.
    part_ids = "relative" if new or "part_ids" in old else "absolute"
    # Folder parts cut every rows_per_part images, before parts were cut by names.
    folder_cuts = "names" if new or "folder_cuts" in old else "count"
    # Part ids of names alone, before they covered the files' sizes.
    sizes = new or "part_sizes" in old
    if part_ids == "relative":
        spec["part_ids"] = part_ids
    if sizes:
        spec["part_sizes"] = "as listed"
    if not new and "max_file_bytes" not in old.get("reader", {}):  # before files had a size limit
        cfg = replace(cfg, reader=replace(cfg.reader, max_file_bytes=None))
        spec["reader"].pop("max_file_bytes")
    return cfg, part_ids, folder_cuts, sizes


# Spec fields added later: an output whose _job.json lacks one resumes as if it matched.
_LATER_FIELDS = ("device", "precision", "weights")


def read_job_spec(out: str) -> dict | None:
    """The job spec an earlier run wrote to `out`, or None."""
    try:
        return json.loads(storage.read_text(storage.join(out, shards.JOB_FILE)))
    except FileNotFoundError:
        return None


def check_resumable(out: str, spec: dict, old: dict | None, finished: set[str], planned: set[str],
                    retire_changed: bool = False) -> set[str]:
    """Refuse an output made with other settings. Returns the finished parts that are not in the
    input any more (the corpus changed: files added, removed, renamed or resized), to retire with
    `retire_changed`; without it, they are refused too."""
    if old is not None:
        changed = sorted(k for k in set(old) | set(spec) if old.get(k) != spec.get(k)
                         and not (k in _LATER_FIELDS and k not in old))
        if changed:
            detail = "".join(f"; {k}: {old.get(k)} then, {spec.get(k)} now" for k in changed
                             if k in ("models", "device", "precision"))
            hint = (" (the tokenizer was trained again since: its tokens would not match the new ones)"
                    if "weights" in changed else "")
            raise ResumeRefused(f"{out} holds shards made with different {', '.join(changed)}{detail}{hint}; "
                                "re-run with the same settings to resume, or write to a new --output")
    stale = finished - planned
    if stale and not retire_changed:
        raise ResumeRefused(
            f"{len(stale)} finished part(s) in {out} are not in the input any more: the corpus changed since "
            "they were tokenized (files added, removed, renamed, or written again with another size). Re-run "
            "with --retire-changed to delete their shards and tokenize the parts that replace them, or write "
            "to a new --output")
    if old is None:
        storage.write_text(storage.join(out, shards.JOB_FILE), json.dumps(spec, indent=1))
    return stale
