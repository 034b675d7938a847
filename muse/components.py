"""What a model component is, read without torch: the kinds a component's config.json may name, the
layout of a model root, and reading a component's kind and config (JSON only).

`muse.checkpoint` builds, saves and loads the models themselves; this module is what processes that
only plan or tokenize need (a tokenization job's coordinator, its caption-id tasks, an API front
end), so that they start without importing torch.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from typing import Any

from muse import storage
from muse.config import CLIPTextConfig, from_dict

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
# The key of config.json that fingerprints the component's other files (`component_version`).
FINGERPRINT = "files_sha256"
# What a text encoder saves beside its weights besides its tokenizer: its architecture (which also
# records the transformers version it was written with).
T5_CONFIG_FILE, CLIP_CONFIG_FILE = "t5_config.json", "clip_config.json"
COMPONENTS = ("text_encoder", "vqgan_lo", "vqgan_hi", "base", "superres")
# Components a root must have for text-to-image at base resolution; the rest are optional.
REQUIRED_COMPONENTS = ("text_encoder", "vqgan_lo", "base")


class CheckpointError(ValueError):
    """A component directory is missing, incomplete or corrupt."""


@dataclass(frozen=True)
class Kind:
    """What a component's `kind` (in its config.json) names: its config and model classes, as
    "module:Name" (imported on first use, so this module imports no model code), the model-root slot
    role it fills, and its model family (a root holds one family)."""

    config: str
    model: str
    role: str  # "text_encoder" | "vqgan" | "base" | "superres"
    family: str  # "muse" | "amused"


# Every component kind, registered here and only here (`register` adds one from outside).
KINDS: dict[str, Kind] = {
    "text_encoder": Kind("muse.config:TextEncoderConfig", "muse.text:TextEncoder", "text_encoder", "muse"),
    "vqgan": Kind("muse.config:VQGANConfig", "muse.vqgan:VQGAN", "vqgan", "muse"),
    "base": Kind("muse.config:BaseTransformerConfig", "muse.transformer:MaskedTransformer", "base", "muse"),
    "superres": Kind("muse.config:SuperResTransformerConfig", "muse.transformer:SuperResTransformer",
                     "superres", "muse"),
    "clip_text": Kind("muse.config:CLIPTextConfig", "muse.clip:CLIPTextEncoder", "text_encoder", "amused"),
    "vq": Kind("muse.config:VQConfig", "muse.vq:VQModel", "vqgan", "amused"),
    "uvit": Kind("muse.config:UViTConfig", "muse.uvit:UViT", "base", "amused"),
}


def register(name: str, kind: Kind) -> None:
    KINDS[name] = kind


def resolve_ref(ref: str) -> type:
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def config_class(kind: str) -> type:
    """The config dataclass of a component kind."""
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; known: {sorted(KINDS)}")
    return resolve_ref(KINDS[kind].config)


def read_component_config(uri: str) -> tuple[str, Any]:
    """(kind, config dataclass) of the component at `uri`."""
    return read_component_meta(uri)[:2]


def read_component_meta(uri: str) -> tuple[str, Any, bool]:
    """(kind, config dataclass, whether it names the directory of its weights: `save_reference`), in
    one read of its config.json."""
    meta = read_meta(uri)
    return meta["kind"], parse_config(meta, uri), bool(meta.get("reference"))


def component_extra(uri: str) -> dict[str, Any]:
    return read_meta(uri).get("extra", {})


def diffusers_hint(folder: str) -> str:
    """What to do with `folder` when it is a diffusers pipeline (its model_index.json), else ""."""
    try:
        if not storage.exists(storage.join(folder, "model_index.json")):
            return ""
    except (OSError, ValueError):
        return ""
    return (f": {storage.absolute(folder)} is a diffusers model folder; `muse import amused --source "
            f"{storage.absolute(folder)} --out ROOT` makes a model root of it")


def read_meta(uri: str) -> dict[str, Any]:
    cfg_uri = storage.join(uri, CONFIG_FILE)
    if not storage.exists(cfg_uri):
        raise CheckpointError(f"no checkpoint at {uri}: expected {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        meta = json.loads(storage.read_text(cfg_uri))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_uri} is not valid JSON: {e}") from e
    if not isinstance(meta, dict) or "kind" not in meta or "config" not in meta:
        raise CheckpointError(f"{cfg_uri} is not a muse component config (needs 'kind' and 'config')"
                              + diffusers_hint(uri.rstrip("/").rpartition("/")[0]))
    version = meta.get("format_version", 1)
    if not isinstance(version, int) or isinstance(version, bool):
        raise CheckpointError(f"{cfg_uri}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{cfg_uri}: format_version {meta['format_version']} is newer than this code")
    if not isinstance(meta["kind"], str) or meta["kind"] not in KINDS:
        raise CheckpointError(f"{cfg_uri}: unknown kind {meta['kind']!r}; known {sorted(KINDS)}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(f"{cfg_uri}: 'config' must be an object of the {meta['kind']} config's fields")
    return meta


def parse_config(meta: dict[str, Any], uri: str) -> Any:
    try:
        return from_dict(config_class(meta["kind"]), meta["config"])
    except ValueError as e:
        raise CheckpointError(f"{uri}/{CONFIG_FILE}: {e}") from e


def component_uri(root: str, name: str) -> str:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; components are {COMPONENTS}")
    return storage.join(root, name)


def has_component(root: str, name: str) -> bool:
    return storage.exists(storage.join(component_uri(root, name), CONFIG_FILE))


# "extra" keys that say where a component came from, not what it holds: the same files imported from
# two folders are the same weights.
PROVENANCE = ("imported_from",)


def comparable(version: dict[str, Any] | None) -> dict[str, Any] | None:
    """A recorded `component_version` / `token_version` without its PROVENANCE keys (records written
    before they were left out hold them), so that only what tells weights apart is compared."""
    if not isinstance(version, dict):
        return version
    out = {k: comparable(v) if k == TOKENS_FROM else v for k, v in version.items() if k not in PROVENANCE}
    if isinstance(out.get("extra"), dict):
        out["extra"] = comparable(out["extra"])
    return out


def component_version(uri: str, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Which weights a component holds, cheaply (from its config.json alone): the training record its
    export wrote ("extra": stage, step, run) and the fingerprint of the files it wrote beside
    config.json (FINGERPRINT, see `muse.checkpoint.save_component`). Retraining changes it, even with
    the same run name and step; exporting the same weights again with the same record, or copying the
    component elsewhere, does not. What token shards record of the models that made them. A
    component saved before the fingerprint has the size of its weights file instead (one stat), as
    it was then; a reference (`save_reference`: weights in the folder its config names) gives None,
    its config being all there is to it. `meta`: its config.json when the caller has read it already."""
    meta = read_meta(uri) if meta is None else meta
    if meta.get("reference"):
        return None
    extra = {k: v for k, v in (meta.get("extra") or {}).items() if k not in PROVENANCE}
    if meta.get(FINGERPRINT):
        return {"extra": extra, FINGERPRINT: meta[FINGERPRINT]}
    fs, path = storage.filesystem(storage.join(uri, WEIGHTS_FILE))
    size = fs.get_file_info(path).size
    return {"extra": extra, "weights_bytes": size}


# In a decoder fine-tune's "extra": the `token_version` of the tokenizer whose encoder and codebook it
# kept frozen, so the tokens it makes are that tokenizer's.
TOKENS_FROM = "tokens_from"


def token_version(uri: str, meta: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Which tokens a VQGAN makes: `component_version`, except for a decoder fine-tune (which changes
    only the decoder), whose tokens are those of the tokenizer it started from (TOKENS_FROM)."""
    meta = read_meta(uri) if meta is None else meta
    kept = (meta.get("extra") or {}).get(TOKENS_FROM)
    return comparable(kept) if kept is not None else component_version(uri, meta)


def family_of_config(config: Any) -> str | None:
    """The model family of a component config; None for anything else (a test's stand-in)."""
    for kind in KINDS.values():
        if type(config) is resolve_ref(kind.config):
            return kind.family
    return None


def check_fit(configs: dict[str, Any], text_width: int | None = None) -> None:
    """ValueError naming the first components of a model root that cannot work together. `configs`:
    slot name -> component config, for the slots known (others are skipped); `text_width`: the width of
    the text encoder's embeddings, where known."""
    families = {name: family_of_config(c) for name, c in configs.items()}
    if len(set(families.values()) - {None}) > 1:
        raise ValueError(f"a model root holds one model family; these components mix them: {families}")
    lo, b, hi, s = (configs.get(name) for name in ("vqgan_lo", "base", "vqgan_hi", "superres"))
    for name, reader in (("base", b), ("superres", s)):
        if reader is not None and text_width is not None and text_width != reader.text_dim:
            raise ValueError(f"the text encoder gives {text_width}-wide embeddings but {name} reads text_dim "
                             f"{reader.text_dim}: use the text encoder the transformers were trained with")
    if lo is not None and b is not None and (lo.codebook_size, lo.tokens_per_side) != (b.codebook_size, b.tokens_per_side):
        raise ValueError(f"base expects {b.tokens_per_side}x{b.tokens_per_side} tokens of {b.codebook_size} codes, "
                         f"vqgan_lo gives {lo.tokens_per_side}x{lo.tokens_per_side} of {lo.codebook_size}")
    if s is not None and b is not None and (s.lo_codebook_size, s.lo_tokens_per_side) != (b.codebook_size, b.tokens_per_side):
        raise ValueError(f"superres reads {s.lo_tokens_per_side}x{s.lo_tokens_per_side} low-res tokens of "
                         f"{s.lo_codebook_size} codes, base draws {b.tokens_per_side}x{b.tokens_per_side} of "
                         f"{b.codebook_size}")
    if s is not None and hi is not None and (s.hi_codebook_size, s.hi_tokens_per_side) != (hi.codebook_size, hi.tokens_per_side):
        raise ValueError(f"superres draws {s.hi_tokens_per_side}x{s.hi_tokens_per_side} tokens of "
                         f"{s.hi_codebook_size} codes, vqgan_hi reads {hi.tokens_per_side}x{hi.tokens_per_side} "
                         f"of {hi.codebook_size}")


def config_text_width(config: Any, reference: bool = False) -> int | None:
    """The width of a text encoder's embeddings where its config alone says it: a built encoder or a
    referenced folder (whose width was read when the reference was written); None for a copy of
    pretrained weights, whose width is in its own files."""
    if isinstance(config, CLIPTextConfig):  # its width is always recorded
        return int(config.hidden)
    if getattr(config, "name_or_path", None) is None or reference:
        return int(config.d_model)
    return None


def check_root(root: str) -> None:
    """ValueError when `root` cannot be loaded as a model root, from its config.json files alone (no
    weights read): required components missing, a config unreadable, or components that do not fit."""
    missing = [name for name in REQUIRED_COMPONENTS if not has_component(root, name)]
    if missing:
        hint = diffusers_hint(root) or "; `muse init --out DIR` writes a random one"
        raise ValueError(f"model root {root} lacks {', '.join(missing)}{hint}")
    present = [name for name in COMPONENTS if name in REQUIRED_COMPONENTS or has_component(root, name)]
    configs, width = read_root_configs(root, present)
    try:
        check_fit(configs, width)
    except ValueError as e:
        raise ValueError(f"model root {root}: {e}") from None


def read_root_configs(root: str, names: list[str]) -> tuple[dict[str, Any], int | None]:
    """(name -> config, the text encoder's width where its config says it) of components of `root`."""
    configs, width = {}, None
    for name in names:
        _, configs[name], reference = read_component_meta(component_uri(root, name))
        if name == "text_encoder":
            width = config_text_width(configs[name], reference=reference)
    return configs, width
