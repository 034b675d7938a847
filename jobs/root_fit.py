"""Whether a masked stage's token shards and architecture fit the model root it trains into, decided
on the driver before any shard is read: the tokens' makers (`foreign_tokens_problem`,
`stale_tokens_problem`), the caption ids' tokenizer, and the architecture the root decides
(`transformer_config`), of the root's own family and grid.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from jobs.config import PAPER_PRESETS
from jobs.preflight import RunRefused
from jobs.progress import say
from muse import checkpoint
from muse.components import COMPONENTS, KINDS, check_fit, family_of_config, read_root_configs
from muse.config import (PRESETS, BaseTransformerConfig, SuperResTransformerConfig, VQGANConfig, from_dict, preset,
                         to_dict)
from muse.code_vectors import pixel_code_dim


def retrained_tokenizers(root: str, spec: dict) -> list[str]:
    """The root's tokenizers that are not the ones that made the token shards of job spec `spec` (trained
    again since): their codes would be read differently."""
    from muse.components import comparable, token_version

    made_with = spec.get("weights") or {}
    return [name for name in ("vqgan_lo", "vqgan_hi") if made_with.get(name) is not None
            and checkpoint.has_component(root, name)
            and token_version(checkpoint.component_uri(root, name)) != comparable(made_with[name])]


def _made_elsewhere(root: str, spec: dict, name: str) -> str | None:
    """Where the tokenizer `name` that made the shards of job spec `spec` lies, when that is known and
    is not this root's `name`/ (another root, or a --vqgan folder); else None."""
    from pipelines.readers import canonical

    where = (spec.get("models") or {}).get(name)
    if where is None or not checkpoint.has_component(root, name):
        return None
    return None if canonical(where) == canonical(checkpoint.component_uri(root, name)) else where


def _tokenizers_read(stage: str) -> tuple[str, ...]:
    return ("vqgan_lo", "vqgan_hi") if stage == "superres" else ("vqgan_lo",)


def foreign_tokens_problem(stage: str, root: str, data: str, spec: dict) -> str | None:
    """Why `stage` may not learn the token shards under `data` (job spec `spec`) into `root`: a tokenizer
    it reads made them that lies elsewhere and has other weights than the root's own (another root's,
    of the same grid perhaps), so the root's VQGAN would decode the learnt codes as other images. A copy
    of this root's tokenizer (the same weights elsewhere) is accepted; this root's own tokenizer trained
    again since is `stale_tokens_problem`'s."""
    foreign = foreign_makers(root, spec, _tokenizers_read(stage))
    if not foreign:
        return None
    names = " and ".join(foreign)
    return (f"the token shards under {data} were made by another tokenizer than the model root {root}'s "
            f"({makers_text(foreign)}): its {names} has other weights and would decode those codes as other images; "
            f"tokenize the corpus with this root (`muse tokenize --checkpoint {root}`, a new --output) and "
            "train on those tokens")


def foreign_makers(root: str, spec: dict, names: tuple[str, ...] = ("vqgan_lo", "vqgan_hi")) -> dict[str, str]:
    """{tokenizer: where it lies} for those of `names` that made the shards of job spec `spec`, lie
    elsewhere than `root` and hold other weights than the root's own (another root's)."""
    retrained = retrained_tokenizers(root, spec)
    return {name: where for name in names if name in retrained
            and (where := _made_elsewhere(root, spec, name)) is not None}


def makers_text(foreign: dict[str, str]) -> str:
    return ", ".join(f"{name} of {_owner(where, name)}" for name, where in foreign.items())


def _owner(where: str, name: str) -> str:
    """The model root a component folder `where` is the `name`/ of, else the folder itself."""
    parent, _, base = where.rstrip("/").rpartition("/")
    return f"model root {parent}" if base == name and parent else where


def stale_tokens_problem(stage: str, root: str, data: str, spec: dict) -> str | None:
    """Why `stage` may not learn the token shards under `data` (job spec `spec`): a tokenizer it reads is
    this root's own, trained again since they were made, so its codes now draw other images and the
    model would learn codes its VQGAN no longer makes. Tokens made elsewhere are `foreign_tokens_problem`'s."""
    changed = [name for name in retrained_tokenizers(root, spec)
               if name in _tokenizers_read(stage) and _made_elsewhere(root, spec, name) is None]
    if not changed:
        return None
    names = " and ".join(changed)
    return (f"the token shards under {data} hold the codes of the model root's {names} as it was before it was "
            f"trained again: its codes now draw other images; tokenize the corpus again (`muse tokenize "
            f"--checkpoint {root}`, a new --output) and train on those tokens")


def codes_version(stage: str, root: str) -> str:
    """Which codes `stage` learns in `root`: a hash of the `token_version` of each tokenizer it reads.
    Its runs' checkpoints and its export record it, so neither is resumed or kept as finished once a
    tokenizer was trained again."""
    from jobs.preflight import model_hash
    from muse.components import token_version

    return model_hash({name: token_version(checkpoint.component_uri(root, name)) if checkpoint.has_component(root, name)
                       else None for name in _tokenizers_read(stage)})


def _ids_difference(spec: dict, text_uri: str, mismatch: str) -> str:
    """`text_ids_mismatch`'s reason, or, where the two text encoders are of other kinds (a field of one
    that the other lacks reads as None there), what tokenizer each side is."""
    from muse.tokenizer import text_component

    config, meta = text_component(text_uri)
    made = spec.get("text_encoder") or {}
    ours = to_dict(config) if config is not None else {}
    if all((k in made) == (k in ours) for k in ("tokenizer", "vocab_size")):
        return mismatch
    return f"made with {_text_tokenizer(made)}, the root's is {_text_tokenizer(ours, meta and meta['kind'])}"


def _text_tokenizer(config: dict, kind: str | None = None) -> str:
    """A text encoder's tokenizer in words, from its config's fields (and its component kind, when known)."""
    if kind == "clip_text" or (kind is None and "tokenizer" not in config and "hidden" in config):
        return f"CLIP's tokenizer ({config.get('name_or_path') or 'clip_text'})"
    if config.get("name_or_path"):
        return f"the tokenizer of {config['name_or_path']}"
    if "tokenizer" in config:
        return f"a T5 encoder's {config['tokenizer']} tokenizer (vocab_size {config.get('vocab_size')})"
    return f"a {kind or 'text encoder'} tokenizer"


def _component_config(root: str, name: str) -> dict | None:
    if not checkpoint.has_component(root, name):
        return None
    return to_dict(checkpoint.read_component_config(checkpoint.component_uri(root, name))[1])


def _tokenize_spec(data: str) -> dict:
    """What produced the token shards (`_job.json` of pipelines.tokenize), or {}."""
    from pipelines.job_spec import read_job_spec

    return read_job_spec(data) or {}


def _code_dim(cfg, field: str, tokenizer: dict | None) -> dict:
    """A preset that reads codes through code vectors takes their width from the tokenizer: its
    codebook's width, or for "pixels" that of `pixel_code_vectors` ((in_channels + 1) * f * f)."""
    if not getattr(cfg, field, 0) or not tokenizer:  # aMUSEd's U-ViT has no code vectors
        return {}
    if cfg.code_vectors == "pixels":
        try:
            return {field: pixel_code_dim(from_dict(VQGANConfig, tokenizer))}
        except ValueError as e:
            raise ValueError(f"{field}: the preset reads codes as the patches they decode to (code_vectors "
                             f"pixels): {e}") from None
    if not tokenizer.get("codebook_dim"):
        raise ValueError(f"{field}: the preset reads codes through its tokenizer's code vectors, but that "
                         f"tokenizer's config names no codebook_dim")
    return {field: int(tokenizer["codebook_dim"])}


def token_model_config(name: str, root: str, data: str, info: dict, superres: bool, quiet: bool = False,
                       notes: list[str] | None = None):
    """The transformer preset `name`, with codebook sizes, token grids and text width taken from the
    token shards (and the tokenizers that made them, else the root's), so model and data agree. `notes`:
    where its console line goes instead of the console (the caller prints it once nothing refuses)."""
    cfg = preset(name)
    spec = _tokenize_spec(data)
    lo = spec.get("vqgan_lo") or _component_config(root, "vqgan_lo")
    hi = spec.get("vqgan_hi") or _component_config(root, "vqgan_hi")
    text = _component_config(root, "text_encoder")
    changes: dict[str, Any] = {}
    text_dim = info.get("text_dim") or (text or {}).get("d_model")
    if text_dim:
        changes["text_dim"] = int(text_dim)
    if superres:
        changes |= {"lo_tokens_per_side": info["tokens_lo_side"], "hi_tokens_per_side": info["tokens_hi_side"]}
        changes |= {"lo_codebook_size": lo["codebook_size"]} if lo else {}
        changes |= {"hi_codebook_size": hi["codebook_size"]} if hi else {}
        changes |= _code_dim(cfg, "lo_code_dim", lo) | _code_dim(cfg, "code_dim", hi)
    else:
        changes["tokens_per_side"] = info["tokens_lo_side"]
        changes |= {"codebook_size": lo["codebook_size"]} if lo else {}
        changes |= _code_dim(cfg, "code_dim", lo)
    adapted = replace(cfg, **changes)
    diff = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
    if diff and not quiet:
        (say if notes is None else notes.append)(
            f"[{'superres' if superres else 'base'}] preset {name} adapted to the data: {diff}")
    return adapted


def transformer_config(stage: str, model: str | None, root: str, data: str, info: dict,
                       notes: list[str] | None = None):
    """(model config, component URI to start from or None). The root decides: without an explicit
    preset, a root that already holds the stage's component is continued in that architecture from its
    weights, and a mismatch with the tokens is refused; an empty root gets the paper's preset. An
    explicit preset is trained from scratch and replaces what the root holds, said out loud (into
    `notes` when given, for the caller to print once nothing refuses the run); one that would leave a
    root that does not load (another model family, another grid than its tokenizer's) is refused."""
    said: list[str] = []  # printed (or handed to `notes`) once nothing here refuses
    tell = said.append
    superres = stage == "superres"
    uri = checkpoint.component_uri(root, stage)
    existing = checkpoint.read_component_config(uri)[1] if checkpoint.has_component(root, stage) else None
    if model is None and existing is not None:
        cfg = existing
        wanted = token_model_config(PAPER_PRESETS[stage], root, data, info, superres=superres, quiet=True)
        fields = (("lo_tokens_per_side", "hi_tokens_per_side", "lo_codebook_size", "hi_codebook_size")
                  if superres else ("tokens_per_side", "codebook_size")) + ("text_dim",)
        diff = {f: (getattr(cfg, f), getattr(wanted, f)) for f in fields if getattr(cfg, f) != getattr(wanted, f)}
        if diff:
            family = family_of_config(cfg)
            presets = ", ".join(_family_presets(stage, family))
            # --model only helps where the root's own tokenizer makes these tokens, and only in its family.
            new = (f"; only if the root's own tokenizer now makes this grid, give --model PRESET (or {stage}.model "
                   f"in the config) of the root's {family} family ({presets}) to train a new {stage} that "
                   "replaces it" if presets else f" (no --model preset is of the root's {family} family)")
            raise RunRefused(
                f"the model root's {stage} does not fit these tokens (root vs data: {diff}): tokenize the corpus "
                f"with this root (`muse tokenize --checkpoint {root}`, a new --output) and train on those "
                f"tokens{new}")
        tell(f"[{stage}] continues the model root's {stage} ({_describe(cfg)}) from its weights")
        return cfg, _said(said, notes, uri)
    name = model or PAPER_PRESETS[stage]
    _refuse_another_family(stage, name, root, model is None)
    cfg = token_model_config(name, root, data, info, superres=superres, notes=said)
    _refuse_unloadable(stage, name, cfg, root)
    if existing is not None and existing != cfg:
        tell(f"[{stage}] trains {model} ({_describe(cfg)}) from scratch; it replaces the root's {stage} when done")
    return cfg, _said(said, notes, None)


def _said(lines: list[str], notes: list[str] | None, value):
    """`value`, once `lines` are printed, or handed to the caller's `notes`."""
    if notes is None:
        for line in lines:
            say(line)
    else:
        notes.extend(lines)
    return value


def _family_presets(stage: str, family: str | None) -> list[str]:
    """The presets `--model` takes for `stage` (those jobs.config accepts as {stage}.model) that are of
    model family `family` (any when None)."""
    accepted = {"base": BaseTransformerConfig, "superres": SuperResTransformerConfig}[stage]
    classes = {checkpoint.config_class(kind) for kind, k in KINDS.items()
               if k.role == stage and family in (None, k.family)}
    return sorted(name for name, cfg in PRESETS.items() if type(cfg) in classes and isinstance(cfg, accepted))


def _root_families(root: str, but: str) -> dict[str, str]:
    """Slot -> model family of the components of `root` other than `but`."""
    families = {}
    for name in COMPONENTS:
        if name != but and checkpoint.has_component(root, name):
            family = family_of_config(checkpoint.read_component_config(checkpoint.component_uri(root, name))[1])
            if family is not None:
                families[name] = family
    return families


def _refuse_another_family(stage: str, name: str, root: str, default: bool) -> None:
    """RunRefused for a preset of another model family than the root's other components: the export
    would leave a root that `muse.components.check_fit` refuses to load (a root holds one family)."""
    family = family_of_config(preset(name))
    others = _root_families(root, stage)
    theirs = sorted(set(others.values()) - {family})
    if family is None or not theirs:
        return
    slots = ", ".join(slot for slot, f in others.items() if f != family)
    presets = ", ".join(_family_presets(stage, theirs[0])) if len(theirs) == 1 else ""
    asked = f"the paper's {stage} preset {name} (the default in a root without a {stage})" if default else \
        f"--model {name}"
    ways = ([f"give --model with a {theirs[0]} {stage} preset ({presets})"] if presets else []) + \
        ([f"continue the root's {stage} (no --model; --lora-rank to fine-tune it)"]
         if checkpoint.has_component(root, stage) else []) + \
        [f"train the {family} {stage} in a model root of its own"]
    raise RunRefused(f"{asked} is of the {family} model family, but the model root {root} holds "
                     f"{' and '.join(theirs)} components ({slots}): a model root holds one model family, and this "
                     "one would no longer load; "
                     + ", or ".join(ways))


def _refuse_unloadable(stage: str, name: str, cfg, root: str) -> None:
    """RunRefused for a new model that the root's text encoder and tokenizers (which this run keeps)
    cannot load with: the same check as loading the root (`muse.components.check_fit`)."""
    kept = [n for n in ("text_encoder", "vqgan_lo", "vqgan_hi") if checkpoint.has_component(root, n)]
    configs, width = read_root_configs(root, kept)
    try:
        check_fit({**configs, stage: cfg}, width)
    except ValueError as e:
        raise RunRefused(f"{stage} preset {name} adapted to these tokens would leave the model root {root} "
                         f"unloadable: {e}; tokenize the corpus with this root (`muse tokenize --checkpoint "
                         f"{root}`, a new --output) and train on those tokens") from None


def _describe(cfg) -> str:
    layers = getattr(cfg, "layers", None) or getattr(cfg, "hi_layers", None)
    return f"{layers} layers, hidden {cfg.hidden}"
