"""The frozen text encoder: a T5-family encoder and its tokenizer -> (embeddings (B,L,D), mask (B,L)).

Muse conditions on frozen T5-XXL embeddings (§2.1). Real weights load from a Hugging Face model
directory, local or s3://, or from a local Hugging Face cache; nothing is ever downloaded. Weights
are safetensors or, as several official T5 folders ship them, pytorch_model.bin read with
`weights_only=True`; they load in `TextEncoderConfig.dtype` (bfloat16 on a GPU by default: T5-XXL is
~19 GB in float32; never float16, in which T5 v1.1 overflows). With no
`name_or_path`, a small T5 encoder is built from `TextEncoderConfig` with the byte-level ByT5
tokenizer, which needs no vocabulary files (the offline default), or with a byte-level BPE vocabulary
fitted to the corpus's captions (`fit_bpe_tokenizer`), saved beside the weights as tokenizer.json.
Caption ids without the encoder (and without torch) come from `muse.tokenizer`. The encoder stack is
`muse.t5` (transformers' T5 names and forward, without importing its modeling); a new random one takes
transformers' T5 initialisation, so roots made before and after it match.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from muse import node_cache, storage
from muse.components import T5_CONFIG_FILE
from muse.config import TextEncoderConfig
from muse.meta import meta_device
from muse.t5 import T5Encoder, T5EncoderConfig
from muse.tokenizer import fit_bpe_tokenizer, load_saved_tokenizer

T5_MODEL_TYPES = ("t5", "mt5")  # config.json model types whose encoder is muse.t5's
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """A config's dtype name -> torch dtype; "auto" is bfloat16 on a GPU and float32 elsewhere.
    float16 is refused: T5 v1.1 (and its XXL) overflows in it."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"text encoder dtype must be one of {sorted(DTYPES)} or 'auto', got {name!r} "
                         "(float16 is not offered: T5 v1.1 overflows in it)")
    return DTYPES[name]


def _local_folder(name_or_path: str) -> str:
    """A local directory, or a hub name already in the local Hugging Face cache (never downloads)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any lookup failure means: not here
        raise ValueError(f"text encoder {name_or_path!r} is neither a local directory nor in the local Hugging "
                         f"Face cache (nothing is downloaded): give a local or s3:// directory ({e})") from e


def read_state_dict(folder: str) -> dict[str, torch.Tensor]:
    """The weights in a Hugging Face folder: safetensors (single or sharded), else pytorch_model.bin
    (single or sharded) through `torch.load(weights_only=True)`, which runs no pickled code."""
    from safetensors.torch import load_file

    for weights, index, load in (
        ("model.safetensors", "model.safetensors.index.json", load_file),
        ("pytorch_model.bin", "pytorch_model.bin.index.json",
         lambda f: torch.load(f, map_location="cpu", weights_only=True)),
    ):
        if os.path.exists(os.path.join(folder, weights)):
            return load(os.path.join(folder, weights))
        if os.path.exists(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            state: dict[str, torch.Tensor] = {}
            for shard in shards:
                state.update(load(os.path.join(folder, shard)))
            return state
    raise ValueError(f"no weights in {folder}: expected model.safetensors or pytorch_model.bin (or their "
                     "sharded index)")


def load_t5_encoder(folder: str, dtype: torch.dtype) -> T5Encoder:
    """The T5 encoder of a Hugging Face folder's config.json and weights (an encoder-only or a full
    T5 checkpoint: the decoder's weights are skipped), built on the meta device and filled in place,
    so only one copy of the weights is ever in memory."""
    if not os.path.exists(os.path.join(folder, "config.json")):
        raise ValueError(f"no config.json in {folder}: not a Hugging Face T5 directory")
    with open(os.path.join(folder, "config.json")) as f:
        values = json.load(f)
    if values.get("model_type", "t5") not in T5_MODEL_TYPES:  # umT5 has a position bias in every block
        raise ValueError(f"{folder} holds a {values['model_type']!r} model; the text encoder loads T5-family "
                         f"encoders of the T5 architecture ({', '.join(T5_MODEL_TYPES)})")
    t5 = T5EncoderConfig.from_dict(values)
    state = read_state_dict(folder)
    with meta_device():
        model = T5Encoder(t5)
    wanted = model.state_dict()
    state = {k: v for k, v in state.items() if k in wanted}
    if "shared.weight" not in state and "encoder.embed_tokens.weight" in state:
        state["shared.weight"] = state["encoder.embed_tokens.weight"]
    state.setdefault("encoder.embed_tokens.weight", state.get("shared.weight"))
    missing = sorted(k for k in wanted if state.get(k) is None)
    if missing:
        raise ValueError(f"{folder}: the weights are not a T5 encoder's (missing {missing[:5]})")
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True)
    model.encoder.embed_tokens = model.shared  # tied again: assigning each name set its own tensor
    return model.eval()


def warn_if_cut(tokenizer, prompts: list[str], max_length: int, **call: Any) -> None:
    """Warn when a prompt is longer than the text encoder reads, so that its end is silently ignored.
    Only prompts that could be too long are tokenized again (a token covers a byte or more); `call`:
    more arguments for the tokenizer (a Hugging Face one's `verbose=False`: this is the warning)."""
    long = [p for p in prompts if len(p.encode("utf-8")) + 2 > max_length]
    if not long:
        return
    cut = [p for p, row in zip(long, tokenizer(long, truncation=False, **call)["input_ids"]) if len(row) > max_length]
    if cut:  # one message per encoder length, so Python's filter shows it once per process, not per batch
        warnings.warn(f"prompts longer than the text encoder's {max_length} tokens are cut: only their start is read",
                      UserWarning, stacklevel=3)


class TextEncoder(nn.Module):
    """Tokenizer + T5 encoder. Call with a list of prompts; returns (embeddings, mask)."""

    def __init__(self, config: TextEncoderConfig, model: T5Encoder, tokenizer):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @classmethod
    def build(cls, config: TextEncoderConfig, captions: Iterable[str] | None = None) -> TextEncoder:
        """From config: a small random T5 encoder (name_or_path None) or pretrained weights. A "bpe"
        tokenizer is fitted to `captions` (a sample of the corpus's) here."""
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        if config.name_or_path is None:
            if config.tokenizer == "bpe":
                if captions is None:
                    raise ValueError("a text encoder with tokenizer 'bpe' fits its vocabulary to the corpus's "
                                     "captions: pass them (muse train all does, from the corpus it trains on)")
                tokenizer = fit_bpe_tokenizer(captions, config.vocab_size)
            else:
                tokenizer = ByT5Tokenizer()
            t5 = T5Config(
                vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
                d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                use_cache=False,
            )
            # Hugging Face's random initialisation of T5 (its scales per weight), into our module.
            model = T5Encoder(T5EncoderConfig.from_dict(t5.to_dict()))
            model.load_state_dict(T5EncoderModel(t5).state_dict())
            return cls(config, model.eval(), tokenizer)
        return cls.load_pretrained(config.name_or_path, config)

    @classmethod
    def load_pretrained(cls, name_or_path: str, config: TextEncoderConfig | None = None,
                        device: str | torch.device = "cpu") -> TextEncoder:
        """A Hugging Face T5-family encoder from a local dir, an s3:// dir, or the local HF cache, in
        `config.dtype` ("auto": bfloat16 on a GPU, float32 on a CPU)."""
        from dataclasses import replace

        from transformers import AutoTokenizer

        if storage.is_s3(name_or_path):  # one download per machine, shared by its processes
            with node_cache.local_folder(name_or_path) as local:
                encoder = cls.load_pretrained(local, config, device)
            encoder.config = replace(encoder.config, name_or_path=name_or_path)  # where it lives, not the copy
            return encoder
        base = config or TextEncoderConfig()
        folder = _local_folder(name_or_path)
        model = load_t5_encoder(folder, resolve_dtype(base.dtype, device))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, ImportError) as e:
            raise ValueError(f"text encoder {name_or_path!r}: its tokenizer does not load from {folder} "
                             f"(T5's own tokenizer needs sentencepiece): {e}") from e
        config = replace(base, name_or_path=name_or_path, d_model=model.config.d_model)
        return cls(config, model.eval(), tokenizer)

    @classmethod
    def from_reference(cls, config: TextEncoderConfig, device: str | torch.device = "cpu") -> TextEncoder:
        """The encoder a model root references (checkpoint.save_reference), loaded from its folder."""
        return cls.load_pretrained(config.name_or_path, config, device).place(device)

    @classmethod
    def check_reference(cls, config: TextEncoderConfig) -> None:
        """Refuse a reference to a folder that is not there, without loading what it holds."""
        folder = config.name_or_path
        if not storage.is_s3(folder):
            _local_folder(folder)
        elif not storage.is_dir(folder):
            raise ValueError(f"text encoder {folder!r}: no such folder on S3")

    def place(self, device: str | torch.device) -> TextEncoder:
        """Move to `device` in the dtype the config asks for (checkpoint.load_component calls this)."""
        self.model.to(device=device, dtype=resolve_dtype(self.config.dtype, device))
        return self

    # -- checkpoint hooks (muse/checkpoint.py) -------------------------------------------------
    def save_extra(self, directory: str) -> None:
        """Files beside model.safetensors: the T5 architecture and the tokenizer."""
        with open(os.path.join(directory, T5_CONFIG_FILE), "w") as f:
            json.dump(self.model.config.to_dict(), f, indent=1, default=str)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_saved(cls, config: TextEncoderConfig, directory: str) -> TextEncoder:
        """Rebuild the architecture and tokenizer saved by `save_extra` (weights loaded by the caller)."""
        with open(os.path.join(directory, T5_CONFIG_FILE)) as f:
            t5 = T5EncoderConfig.from_dict(json.load(f))
        if t5.d_model != config.d_model:  # what the transformers' text_dim is checked against
            raise ValueError(f"config.json says d_model {config.d_model}, {T5_CONFIG_FILE} {t5.d_model}")
        return cls(config, T5Encoder(t5).eval(), load_saved_tokenizer(directory))

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (B, L) long, mask (B, L) bool; padded to the longest, capped at max_length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = self.tokenizer(list(prompts), truncation=True, max_length=self.config.max_length)["input_ids"]
        warn_if_cut(self.tokenizer, prompts, self.config.max_length)
        # Padded on the right to the longest, as transformers pads T5 (the tokenizer may be muse's own).
        ids = torch.full((len(rows), max(map(len, rows), default=0)), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, row in enumerate(rows):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, :len(row)] = True
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L), mask (B, L) -> embeddings (B, L, D); padded positions are zeroed."""
        hidden = self.model(ids, mask)
        return hidden * mask[..., None].to(hidden.dtype)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask), mask
