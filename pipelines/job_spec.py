"""The job spec of a token-shard output (`OUTPUT/_job.json`): everything that decides the shards'
content, written by the first run; a later run resumes only with the same spec."""

from __future__ import annotations

import json
import os
from dataclasses import replace

from muse import storage
from muse.components import PROVENANCE
from muse.config import to_dict
from pipelines import manifest, readers, shards
from pipelines.config import PoolConfig, TokenizeConfig
from pipelines.rejects import CorpusRefused


class ModelRefused(CorpusRefused):
    """A model component that is missing or unreadable (`muse.components.CheckpointError`), found
    before any work: printed as a usage error, as the corpus's refusals are."""


class ResumeRefused(ValueError):
    """An output that this run may not resume as asked: made with other settings, or holding parts
    of a corpus that changed. The command line prints it as a usage error (exit 2)."""


def device_of(pool: PoolConfig) -> str:
    return "cuda" if pool.num_gpus > 0 else "cpu"


def job_spec(input_uri: str, cfg: TokenizeConfig, models) -> dict:
    """Everything that decides the content of the shards; a resumed run must match it."""
    from muse.components import CheckpointError, parse_config, read_meta, token_version

    def tokenizer(name: str, uri: str | None) -> tuple[dict | None, dict | None]:
        """(config, version of its tokens) of a VQGAN, from one read of its config.json: a decoder
        fine-tune makes the tokens of the tokenizer it started from (`token_version`)."""
        if uri is None:
            return None, None
        try:
            meta = read_meta(uri)
        except CheckpointError as e:  # a wrong --vqgan or model root
            raise ModelRefused(f"{name}: {e}") from None
        return to_dict(parse_config(meta, uri)), token_version(uri, meta)

    embeddings = cfg.text_storage == "embeddings"  # ids need no model: no text device
    (lo, lo_weights), (hi, hi_weights) = (tokenizer("vqgan_lo", models.vqgan_lo),
                                          tokenizer("vqgan_hi", models.vqgan_hi))
    text, text_weights = text_encoder_record(models.text_encoder, embeddings)
    reader = to_dict(cfg.reader)
    reader.pop("block_rows")  # how rows are cut into blocks: not what the shards hold
    reader.pop("block_bytes")
    return {
        "input": input_uri, "models": {k: _model_uri(v) for k, v in to_dict(models).items()},
        "text_storage": cfg.text_storage,
        # The numerics of the token ids (and embeddings): CPU always runs fp32.
        "device": {"vqgan": device_of(cfg.vqgan_lo), "text": device_of(cfg.text) if embeddings else None},
        "precision": {"vqgan": _precision(cfg, cfg.vqgan_lo),
                      "text": _precision(cfg, cfg.text) if embeddings else None},
        "vqgan_lo": lo, "vqgan_hi": hi,
        # Which weights: a retrained tokenizer with the same config makes other tokens, a text
        # encoder exported again other embeddings (or, refitted, other caption ids).
        "weights": {"vqgan_lo": lo_weights, "vqgan_hi": hi_weights, "text_encoder": text_weights},
        "text_encoder": text, "reader": reader,
        "preprocess": {k: getattr(cfg.preprocess, k) for k in ("min_side", "max_pixels", "max_caption_chars")},
        "format_version": shards.FORMAT_VERSION,
    }


def embeddings_refusal(config, uri: str) -> str | None:
    """Why the text encoder at `uri` (its component config, None for a Hugging Face T5) cannot store
    embeddings, or None."""
    from muse.config import TextEncoderConfig

    if config is not None and not isinstance(config, TextEncoderConfig):
        return (f"text_storage 'embeddings' stores T5 encoders' outputs; {uri} is another text encoder (CLIP, "
                "an imported aMUSEd root): tokenize with text_storage 'ids'")
    return None


def text_encoder_record(uri: str, embeddings: bool) -> tuple[dict | None, dict | None]:
    """(config, version) of a muse text-encoder component, from one read of its config.json; (None,
    None) for a Hugging Face folder or name. A reference to a Hugging Face folder (`save_reference`)
    has its config only: its folder is not hashed. Caption ids depend on its tokenizer's files, not its
    weights nor its architecture: for ids (not `embeddings`) the version holds the fingerprints of the
    tokenizer's files alone."""
    from muse.components import CLIP_CONFIG_FILE, FINGERPRINT, T5_CONFIG_FILE, WEIGHTS_FILE, component_version
    from muse.tokenizer import text_component

    config, meta = text_component(uri)
    if embeddings and (refused := embeddings_refusal(config, uri)):  # before Ray and the actors that load it
        raise ModelRefused(refused)
    if meta is None:
        return None, None
    version = component_version(uri, meta)
    if version is not None and not embeddings:
        version = {k: v for k, v in version.items() if k != "weights_bytes"}
        if FINGERPRINT in version:
            model_files = (WEIGHTS_FILE, T5_CONFIG_FILE, CLIP_CONFIG_FILE)
            version[FINGERPRINT] = {name: digest for name, digest in version[FINGERPRINT].items()
                                    if name not in model_files}
    return to_dict(config), version


def text_ids_mismatch(spec: dict, root_text_encoder: str) -> str | None:
    """Why caption ids an output holds (`spec`, its job spec) are not the ids `root_text_encoder`'s
    tokenizer gives, or None: another tokenizer kind or vocabulary, or other tokenizer files."""
    if spec.get("text_storage", "ids") != "ids" or not spec.get("text_encoder"):
        return None
    from muse.components import FINGERPRINT

    config, version = text_encoder_record(root_text_encoder, embeddings=False)
    made, made_version = spec["text_encoder"], (spec.get("weights") or {}).get("text_encoder") or {}
    if config is None:
        return None
    differ = [f"{k} {made[k]!r} vs {config.get(k)!r}" for k in ("tokenizer", "vocab_size")
              if k in made and made[k] != config.get(k)]
    if not differ and version and FINGERPRINT in made_version and \
            made_version[FINGERPRINT] != version.get(FINGERPRINT):
        differ = ["other tokenizer files"]
    return ", ".join(differ) or None


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


# Spec fields added later, as paths: an output whose _job.json lacks one resumes as if it matched.
_LATER_FIELDS = (("device",), ("precision",), ("weights",),
                 ("weights", "text_encoder"))  # before the text encoder's weights were recorded
# A VQGAN's decoder widths: the decoder fine-tune widens them, and tokens depend on its encoder and codebook.
_DECODER_ONLY = {(name, field) for name in ("vqgan_lo", "vqgan_hi")
                 for field in ("decoder_base_channels", "decoder_num_res_blocks")}
_SHOWN_FIELDS = 4  # differing fields a refusal names with their values; the rest are counted
_SHOWN_CHARS = 60  # a value longer than this loses its middle (paths differ at either end)
_ABSENT = object()


def spec_differences(old: dict, new: dict, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object, object]]:
    """(path, old value, new value) of each leaf field that differs between two job specs, nested
    dicts compared field by field. A field missing on one side is `_ABSENT` there (None at the top,
    where a missing section has always matched a null one), and a later field (`_LATER_FIELDS`)
    missing from `old` does not count."""
    differences = []
    missing = _ABSENT if path else None
    for key in sorted(set(old) | set(new)):
        at = (*path, key)
        if key not in old and at in _LATER_FIELDS or at in _DECODER_ONLY or key in PROVENANCE:
            continue
        was, now = old.get(key, missing), new.get(key, missing)
        if isinstance(was, dict) and isinstance(now, dict):
            differences += spec_differences(was, now, at)
        elif was != now:
            differences.append((at, was, now))
    return differences


def _shown(value: object) -> str:
    if value is _ABSENT:
        return "absent"
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if len(text) <= _SHOWN_CHARS:
        return text
    head = (_SHOWN_CHARS - 3) // 2
    return f"{text[:head]}...{text[head + 3 - _SHOWN_CHARS:]}"


def read_job_spec(out: str) -> dict | None:
    """The job spec an earlier run wrote to `out`, or None. One damaged since (its write is atomic)
    is refused: the settings the output's shards were made with are then unknown."""
    uri = storage.join(out, shards.JOB_FILE)
    try:
        spec = json.loads(storage.read_text(uri))
        why = None if isinstance(spec, dict) else "not a JSON object"
    except FileNotFoundError:
        return None
    except ValueError as e:  # not UTF-8, or not JSON
        why = f"{type(e).__name__}: {e}"
    if why is not None:
        raise manifest.DamagedManifest(f"{uri} is not a readable job spec ({why}): the settings the output's "
                                       "shards were made with are unknown without it. Restore it, or tokenize the "
                                       "corpus again into a new output")
    return spec


def resumed_spec(out: str, finished: set[str]) -> dict | None:
    """The job spec a run into `out` must match: the one there, or None while no part is finished. A
    run that finished none (stopped at once, or set up wrong) left no shard made with its settings
    (the start-up cleanup deletes its uncommitted files before `check_resumable` writes), so the new
    run's spec replaces its _job.json instead of being refused."""
    return read_job_spec(out) if finished else None


def check_resumable(out: str, spec: dict, old: dict | None, finished: set[str], planned: set[str],
                    retire_changed: bool = False) -> set[str]:
    """Refuse an output made with other settings. Returns the finished parts that are not in the
    input any more (the corpus changed: files added, removed, renamed or resized), to retire with
    `retire_changed`; without it, they are refused too."""
    if old is not None:
        differences = spec_differences(old, spec)
        if differences:
            changed = list(dict.fromkeys(path[0] for path, _, _ in differences))
            detail = "".join(f"; {'.'.join(path)}: {_shown(was)} then, {_shown(now)} now"
                             for path, was, now in differences[:_SHOWN_FIELDS])
            if len(differences) > _SHOWN_FIELDS:
                detail += f"; and {len(differences) - _SHOWN_FIELDS} more field(s)"
            retrained = sorted({path[1] for path, was, now in differences  # the same files, other bytes
                                if path[0] == "weights" and len(path) > 2 and _ABSENT not in (was, now)})
            hint = (f" ({' and '.join(retrained)} trained or exported again since: shards made now would not "
                    "match the ones there)" if retrained else "")
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
