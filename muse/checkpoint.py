"""Model components on disk: a directory holding `config.json` + `model.safetensors`, local or s3://.

    ROOT/                   a model root, what training writes and sampling/serving load
      text_encoder/         config.json, model.safetensors, t5_config.json, tokenizer files
      vqgan_lo/  vqgan_hi/  config.json, model.safetensors
      base/      superres/  config.json, model.safetensors

config.json is {"kind", "format_version", "config": {dataclass fields}}, plus "extra" (the training
record) and "files_sha256" (the fingerprint of the other files) where `save_component` wrote it, or
"reference" (`save_reference`). Loading never unpickles:
weights are safetensors and configs are JSON validated against the dataclasses (missing keys take
their defaults, so older checkpoints stay loadable; unknown keys are rejected).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from typing import Any

import pyarrow.fs as pafs
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from torch import nn

from muse import node_cache, storage
from muse.components import (  # noqa: F401 - re-exported: muse.checkpoint is where callers look
    COMPONENTS,
    CONFIG_FILE,
    FINGERPRINT,
    FORMAT_VERSION,
    KINDS,
    REQUIRED_COMPONENTS,
    WEIGHTS_FILE,
    CheckpointError,
    Kind,
    check_fit,
    component_extra,
    component_uri,
    config_class,
    config_text_width,
    has_component,
    parse_config,
    read_component_config,
    read_component_meta,
    read_meta,
    read_root_configs,
    register,
    resolve_ref,
)
from muse.config import model_preset, to_dict
from muse.meta import meta_device
from muse.tokenizer import write_tokenizer_json


def _kinds() -> dict[str, tuple[type, type]]:
    """kind -> (config class, model class)."""
    return {name: (resolve_ref(k.config), resolve_ref(k.model)) for name, k in KINDS.items()}


def kind_of(model: nn.Module) -> str:
    for kind, (_, cls) in _kinds().items():
        if type(model) is cls:
            return kind
    for kind, (_, cls) in _kinds().items():
        if isinstance(model, cls):
            return kind
    raise TypeError(f"not a muse component: {type(model).__name__}")


def kind_of_config(config: Any) -> str:
    for kind, (config_cls, _) in _kinds().items():
        if type(config) is config_cls:
            return kind
    raise TypeError(f"not a muse component config: {type(config).__name__}")


def save_component(model: nn.Module, uri: str, extra: dict[str, Any] | None = None) -> None:
    """Write `model` (with its `.config`) as a component directory at a local path or s3:// URI.
    `extra` (JSON-ready) is stored in config.json under "extra" (e.g. training step), and the
    fingerprint of every other file it writes under "files_sha256" (`files_sha256`, of the files as
    written locally, before any upload): what `component_version` tells weights apart by, so that
    token shards notice a tokenizer trained again with the same run name and step.

    Replacing a component is atomic on a local filesystem: the new files are written into a hidden
    sibling directory that then trades places with the old one in one rename, so a crash at any point
    leaves the old component or the new one, whole. S3 has no rename: the files are single PUTs,
    config.json last, so a crash in between leaves the new weights under the old config.json (a
    changed architecture then fails to load with CheckpointError rather than loading half a model)."""
    meta = {"kind": kind_of(model), "format_version": FORMAT_VERSION, "config": to_dict(model.config)}
    if extra:
        meta["extra"] = extra
    if storage.is_s3(uri):
        with tempfile.TemporaryDirectory() as tmp:
            _write_component(model, meta, tmp)
            for name in sorted(os.listdir(tmp), key=lambda n: n == CONFIG_FILE):  # config.json last
                storage.upload_file(os.path.join(tmp, name), storage.join(uri, name))
        return
    path = storage.filesystem(uri)[1]
    parent, name = os.path.split(path.rstrip("/"))
    os.makedirs(parent, exist_ok=True)
    for stale in os.listdir(parent):  # left by an export that was killed
        if stale.startswith(f".{name}.staging-") or stale.startswith(f".{name}.old-"):
            _remove(os.path.join(parent, stale))
    staged = tempfile.mkdtemp(prefix=f".{name}.staging-", dir=parent)
    try:
        _write_component(model, meta, staged)
        _open_as_umask_allows(staged)
        _switch(staged, path)
    finally:
        _remove(staged)  # after a switch: the old component, if there was one


def _remove(path: str) -> None:
    """Remove a directory tree, or the symlink that a component linked from elsewhere was (the switch
    puts the new files in the root; what the link pointed at stays as it was)."""
    if os.path.islink(path):
        os.unlink(path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _open_as_umask_allows(directory: str) -> None:
    """Give the staged folder (mkdtemp makes it 0700) and its files the modes a plain mkdir and open
    would: workers running as another user on a shared mount read the root."""
    umask = _umask()
    os.chmod(directory, 0o777 & ~umask)
    for folder, subfolders, files in os.walk(directory):
        for sub in subfolders:
            os.chmod(os.path.join(folder, sub), 0o777 & ~umask)
        for f in files:
            os.chmod(os.path.join(folder, f), 0o666 & ~umask)


def _umask() -> int:
    """This process's umask, read without setting it (os.umask sets it, for every thread, meanwhile)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        return 0o022


def _write_component(model: nn.Module, meta: dict[str, Any], directory: str) -> None:
    path = os.path.join(directory, WEIGHTS_FILE)
    try:
        save_model(model, path)
    except SafetensorError as e:  # its I/O errors are no OSError: a full disk is said as one
        if "os error 28" not in str(e):
            raise
        raise OSError(errno.ENOSPC, f"No space left on device writing {path}") from None
    if hasattr(model, "save_extra"):
        model.save_extra(directory)
    meta = meta | {FINGERPRINT: files_sha256(directory)}
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(meta, f, indent=2)
    for entry in os.scandir(directory):
        if entry.is_file():
            with open(entry.path, "rb") as f:
                os.fsync(f.fileno())


def files_sha256(directory: str) -> dict[str, str]:
    """{path below it (with "/"): sha256 of its bytes} of every file of a local component directory
    but its config.json, in sorted path order: per file, so that what reads only some of them (caption
    ids read a text encoder's tokenizer, not its weights) compares those. The same model saved again
    gives the same values: safetensors, the architecture's JSON and the tokenizer files are written
    the same way each time. Reads each file once (what was just written: from the page cache)."""
    files = []
    for parent, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(parent, name), directory).replace(os.sep, "/")
            if rel != CONFIG_FILE:
                files.append(rel)
    digests = {}
    for rel in sorted(files):
        with open(os.path.join(directory, rel), "rb") as f:
            digests[rel] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def _switch(staged: str, path: str) -> None:
    """Put the directory `staged` at `path`; the old directory at `path`, if any, ends up at `staged`."""
    if not os.path.exists(path):
        os.rename(staged, path)
        return
    if _exchange(staged, path):
        return
    # No atomic exchange (not Linux, or a filesystem without it): two renames, with a moment between
    # them where `path` is missing (the old component then sits at .<name>.old-*).
    old = f"{os.path.dirname(staged)}/.{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}"
    os.rename(path, old)
    os.rename(staged, path)
    os.rename(old, staged)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def save_reference(config: Any, uri: str) -> None:
    """A component that names the directory its weights live in (config.name_or_path: a Hugging Face
    folder, local or s3://) instead of holding a copy: config.json, and for a T5 folder that ships only
    its sentencepiece model the tokenizer.json converted from it. For pretrained text encoders, so
    that model roots share one T5-XXL (~19 GB in float32) rather than each copying it. A component
    at `uri` that holds its weights is replaced (deleted first)."""
    kind = kind_of_config(config)
    model_cls = _kinds()[kind][1]
    if not getattr(config, "name_or_path", None) or not hasattr(model_cls, "from_reference"):
        raise ValueError(f"a {kind!r} component cannot be saved as a reference (needs name_or_path)")
    model_cls.check_reference(config)
    if storage.exists(storage.join(uri, CONFIG_FILE)) and not read_meta(uri).get("reference"):
        storage.delete(uri)  # its weights would stay beside the reference, unread
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "config": to_dict(config), "reference": True}
    if KINDS[kind].role == "text_encoder":  # its caption ids then load without transformers
        write_tokenizer_json(config.name_or_path, uri)
    storage.write_text(storage.join(uri, CONFIG_FILE), json.dumps(meta, indent=2))  # last: whole or absent


MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on a header


def check_weights(uri: str, expect_kind: str | None = None) -> None:
    """Raise CheckpointError when the component at `uri` has no weights file, or one cut short or
    garbled: its safetensors header, read alone, must parse and account for the file's size. Two small
    reads, so a driver can check what its workers will load before they start, instead of each
    attempt failing on it. With `expect_kind`, a component of another kind is refused as
    `load_component` refuses it."""
    meta = read_meta(uri)
    if not _kind_fits(meta["kind"], expect_kind):
        raise CheckpointError(f"{uri} holds a {meta['kind']!r} component, not a {expect_kind}")
    if meta.get("reference"):
        return
    weights = storage.join(uri, WEIGHTS_FILE)
    fs, path = storage.filesystem(weights)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise CheckpointError(f"no {WEIGHTS_FILE} in {uri}")
    try:
        with fs.open_input_file(path) as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > MAX_HEADER_BYTES:
                raise ValueError(f"a header of {length:,} bytes")
            end = None
            if 8 + length <= info.size:
                header = json.loads(f.read(length))
                end = max((t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, struct.error) as e:
        raise CheckpointError(f"{weights} is corrupt: {type(e).__name__}: {str(e)[:200]}") from None
    if end is None:
        raise CheckpointError(f"{weights} is cut short: its header alone is {length:,} bytes and the file holds "
                              f"{info.size:,}")
    if 8 + length + end != info.size:
        raise CheckpointError(f"{weights} is cut short or corrupt: its header accounts for {8 + length + end:,} "
                              f"bytes and the file holds {info.size:,}")
    _check_shapes(uri, meta, {name: tuple(t["shape"]) for name, t in header.items() if name != "__metadata__"})


def check_root_weights(root: str) -> None:
    """`check_weights` for every component of the model root `root` (CheckpointError naming the
    first bad one): what its loaders (training workers, Serve replicas) would fail on at every attempt."""
    for name in COMPONENTS:
        if has_component(root, name):
            try:
                check_weights(component_uri(root, name))
            except CheckpointError as e:
                raise CheckpointError(f"{name}: {e}") from None


def _kind_fits(kind: str, expect_kind: str | None) -> bool:
    """Whether a component of `kind` is what `expect_kind` names: a kind or a role (a "vqgan" is our
    VQGAN or an imported VQ); None takes any."""
    return expect_kind is None or expect_kind in (kind, KINDS[kind].role)


def _check_shapes(uri: str, meta: dict, stored: dict[str, tuple[int, ...]]) -> None:
    """CheckpointError when the weights file's tensors are not the config's architecture (an S3 write
    cut between the weights and config.json leaves new weights under the old config): the model is
    built on the meta device, so nothing is allocated. Components rebuilt from files beside the
    weights (a text encoder's) are left to their load."""
    config = parse_config(meta, uri)
    _, model_cls = _kinds()[meta["kind"]]
    if hasattr(model_cls, "from_saved"):
        return
    with meta_device():
        model = model_cls(config)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    optional = _non_persistent(model)
    aliases = {name: names for names in _tied_names(model) for name in names}  # safetensors keeps one of each
    wrong = [f"{name} {stored[name]} (config: {shape})" for name, shape in expected.items()
             if name in stored and stored[name] != shape]
    missing = [name for name in expected if name not in stored and name not in optional
               and not any(n in stored for n in aliases.get(name, ()))]
    unexpected = [name for name in stored if name not in expected]
    if wrong or missing or unexpected:
        raise CheckpointError(f"{uri}: weights do not match its config.json (another architecture's weights, e.g. "
                              f"an upload cut before config.json): shapes {wrong[:3]}, missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")


def load_component(uri: str, device: str | torch.device = "cpu", expect_kind: str | None = None) -> nn.Module:
    """Build the component at `uri` and load its weights (safetensors only), in eval mode.

    The model is built on the meta device and its tensors are the loaded ones (`assign=True`): no
    random initialisation, and one copy of the weights in memory (a 3B transformer would otherwise
    hold two, and spend minutes initialising what is then overwritten)."""
    meta = read_meta(uri)
    kind = meta["kind"]
    if not _kind_fits(kind, expect_kind):
        raise CheckpointError(f"{uri} holds a {kind!r} component, expected {expect_kind!r}")
    config = parse_config(meta, uri)
    _, model_cls = _kinds()[kind]
    if meta.get("reference"):  # the weights stay where config.name_or_path says
        if not hasattr(model_cls, "from_reference"):
            raise CheckpointError(f"{uri}: a {kind!r} component cannot be a reference; it holds its weights")
        model = model_cls.from_reference(config, device).eval()
        model.referenced = True  # saved again as the same reference (`MusePipeline.save_pretrained`)
        return model
    with node_cache.local_folder(uri) as local:  # from S3: one download per machine, shared
        weights = os.path.join(local, WEIGHTS_FILE)
        if not os.path.exists(weights):
            raise CheckpointError(f"no {WEIGHTS_FILE} in {uri}")
        try:
            state = load_file(weights)
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            if not os.access(weights, os.R_OK):  # safetensors calls that "No such file or directory"
                raise CheckpointError(f"{weights}: this user may not read it (permission denied)") from e
            raise CheckpointError(f"{weights} in {uri} is corrupt or does not match its config: {e}") from e

        def build() -> nn.Module:
            if not hasattr(model_cls, "from_saved"):
                return model_cls(config)
            try:  # files beside the weights (a text encoder's architecture and tokenizer)
                return model_cls.from_saved(config, local)
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{uri}: the files beside {WEIGHTS_FILE} are missing or unreadable: "
                                      f"{type(e).__name__}: {e}") from e

        with meta_device():
            model = build()
        missing, unexpected = _assign(model, state, uri)
        if missing and all(name in _non_persistent(model) for name in missing):
            # Buffers computed at construction, not saved (CLIP's position ids): the model computes them
            # again where it can, else it is built for real (random init, a second copy of the weights).
            if hasattr(model, "restore_buffers"):
                model.restore_buffers()
                missing = [name for name in missing if model.get_buffer(name).is_meta]
            if missing:
                model = build()
                missing, unexpected = _assign(model, state, uri)
        if missing or unexpected:
            raise CheckpointError(
                f"{uri}: weights do not match the {kind} config "
                f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
            )
    # A component may keep its own precision on a device (the text encoder's config.dtype).
    return (model.place(device) if hasattr(model, "place") else model.to(device)).eval()


def _assign(model: nn.Module, state: dict[str, torch.Tensor], uri: str) -> tuple[list[str], list[str]]:
    """Load `state` into `model` as its own tensors (cast to each parameter's dtype, as a copy would).
    Returns (tensors still unset, keys the model does not have). A tensor the file stores once for
    two tied names (safetensors drops duplicates) is set through either name."""
    own = model.state_dict()
    for key, value in state.items():
        if key in own and value.dtype != own[key].dtype and own[key].is_floating_point():
            state[key] = value.to(own[key].dtype)
    tied = _tied_names(model)
    try:
        _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{uri}: weights do not match its config: {e}") from e
    current = dict(_tensors(model))
    for names in tied:  # assigning one name of a tied pair unties it: tie the rest again
        loaded = [n for n in names if not current[n].is_meta]
        for name in names:
            if loaded and current[name].is_meta:
                prefix, _, leaf = name.rpartition(".")
                module = model.get_submodule(prefix)
                table = module._parameters if leaf in module._parameters else module._buffers
                table[leaf] = current[loaded[0]]
    return [n for n, t in _tensors(model) if t.is_meta], list(unexpected)


def _tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))


def _tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each tensor of the model, grouped: a group of two or more is one tied tensor."""
    groups: dict[int, list[str]] = {}
    for name, t in _tensors(model):
        groups.setdefault(id(t), []).append(name)
    return list(groups.values())


def _non_persistent(model: nn.Module) -> set[str]:
    return {f"{prefix}.{name}" if prefix else name for prefix, m in model.named_modules()
            for name in m._non_persistent_buffers_set}


def slot_role(name: str) -> str:
    """The role a model-root slot holds: "vqgan" for vqgan_lo / vqgan_hi, else the slot's name."""
    return "vqgan" if name.startswith("vqgan") else name


def build_component(name: str, config: Any) -> nn.Module:
    """A randomly initialised component for a model-root slot (its kind follows from the config)."""
    kind = kind_of_config(config)
    if KINDS[kind].role != slot_role(name):
        raise ValueError(f"a {kind!r} config cannot fill the {name!r} slot")
    _, cls = _kinds()[kind]
    return cls.build(config) if hasattr(cls, "build") else cls(config)


def parameter_count(name: str, config: Any) -> int:
    """Parameters of component `name` built from `config` on the meta device (nothing allocated). A
    "bpe" text encoder's vocabulary is fitted only when a root is made; its size is the config's."""
    if getattr(config, "tokenizer", None) == "bpe":
        config = dataclasses.replace(config, tokenizer="byt5")
    with meta_device():
        model = build_component(name, config)
    return sum(p.numel() for p in model.parameters())


def init_model_root(preset_name: str, out: str, seed: int = 0,
                    components: tuple[str, ...] = COMPONENTS, text_encoder: str | None = None) -> dict[str, nn.Module]:
    """Write randomly initialised components of a model preset (e.g. "tiny") into a model root; returns
    the models built. Component i of COMPONENTS is seeded seed + i, whichever are written, as
    `MusePipeline.from_preset` builds them. A pretrained component (T5-XXL) is referenced, neither copied
    nor loaded.
    `text_encoder`: a Hugging Face T5 folder (local or s3://) for the root to reference instead of the
    preset's text encoder; its width must be the transformers' text_dim."""
    config = model_preset(preset_name)
    if text_encoder is not None:
        config = dataclasses.replace(config, text_encoder=referenced_text_encoder(config, text_encoder))
    _check_fits_root(preset_name, config, out, components)
    models = {}
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left as it was
        for name in components:
            part = getattr(config, name)
            if getattr(part, "name_or_path", None):
                save_reference(part, component_uri(out, name))
                continue
            torch.manual_seed(seed + COMPONENTS.index(name))  # by slot: a subset writes what the whole root would
            models[name] = build_component(name, part)
            save_component(models[name], component_uri(out, name))
    return models


def _check_fits_root(preset_name: str, config: Any, out: str, components: tuple[str, ...]) -> None:
    """ValueError when the components about to be written into `out` cannot work with those it keeps."""
    kept = [name for name in COMPONENTS if name not in components and has_component(out, name)]
    if not kept:
        return
    configs, width = read_root_configs(out, kept)
    configs |= {name: getattr(config, name) for name in components}
    if "text_encoder" in components:  # built here, or referenced with the folder's width
        width = config_text_width(config.text_encoder, reference=True)
    try:
        check_fit(configs, width)
    except ValueError as e:
        raise ValueError(f"{preset_name}'s {', '.join(components)} would not fit the "
                         f"{', '.join(kept)} that {out} holds: {e}") from None


def referenced_text_encoder(config: Any, folder: str) -> Any:
    """The preset's text encoder config pointed at `folder`, with the folder's width (its config.json's
    d_model, read without loading any weights); ValueError when the transformers read another width."""
    try:
        d_model = json.loads(storage.read_text(storage.join(folder, "config.json")))["d_model"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"text encoder {folder!r}: no readable T5 config.json with d_model there ({e})") from None
    widths = {name: part.text_dim for name in ("base", "superres") if (part := getattr(config, name, None)) is not None}
    wrong = {name: width for name, width in widths.items() if width != d_model}
    if wrong:
        raise ValueError(f"text encoder {folder!r} gives {d_model}-wide embeddings, but "
                         + ", ".join(f"{name} reads text_dim {width}" for name, width in wrong.items())
                         + ": pick the preset made for that encoder")
    return dataclasses.replace(config.text_encoder, name_or_path=folder, d_model=int(d_model))
