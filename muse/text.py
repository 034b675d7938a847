"""The frozen text encoder: a T5-family encoder and its tokenizer -> (embeddings (B,L,D), mask (B,L)).

Muse conditions on frozen T5-XXL embeddings (§2.1). Real weights load from a Hugging Face model
directory, local or s3://, or from a local Hugging Face cache; nothing is ever downloaded. With no
`name_or_path`, a small T5 encoder is built from `TextEncoderConfig` with the byte-level ByT5
tokenizer, which needs no vocabulary files: the offline default, trainable like any other part.
"""

from __future__ import annotations

import json
import os
import tempfile

import torch
from torch import nn

from muse import storage
from muse.config import TextEncoderConfig

T5_CONFIG_FILE = "t5_config.json"


def _download_dir(uri: str, dest: str) -> str:
    """Copy every file under an s3:// prefix into `dest`; return `dest`."""
    files = storage.list_files(uri)
    if not files:
        raise FileNotFoundError(f"no files under {uri}")
    prefix = uri.rstrip("/") + "/"
    for f in files:
        local = os.path.join(dest, f[len(prefix):])
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as out:
            out.write(storage.read_bytes(f))
    return dest


class TextEncoder(nn.Module):
    """Tokenizer + T5 encoder. Call with a list of prompts; returns (embeddings, mask)."""

    def __init__(self, config: TextEncoderConfig, model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @classmethod
    def build(cls, config: TextEncoderConfig) -> TextEncoder:
        """From config: a small random T5 encoder (name_or_path None) or pretrained weights."""
        from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

        if config.name_or_path is None:
            t5 = T5Config(
                vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
                d_ff=config.d_ff, num_layers=config.num_layers, num_heads=config.num_heads,
                feed_forward_proj="gated-gelu", dropout_rate=0.0, is_encoder_decoder=False,
                use_cache=False,
            )
            return cls(config, T5EncoderModel(t5).eval(), ByT5Tokenizer())
        return cls.load_pretrained(config.name_or_path, config)

    @classmethod
    def load_pretrained(cls, name_or_path: str, config: TextEncoderConfig | None = None) -> TextEncoder:
        """A Hugging Face T5-family encoder from a local dir, an s3:// dir, or the local HF cache."""
        from transformers import AutoTokenizer, T5EncoderModel

        if storage.is_s3(name_or_path):
            with tempfile.TemporaryDirectory() as tmp:
                return cls.load_pretrained(_download_dir(name_or_path, tmp), config)
        try:
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
            model = T5EncoderModel.from_pretrained(name_or_path, local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise ValueError(
                f"text encoder {name_or_path!r} not found locally (no downloads are made): give a "
                f"local or s3:// directory holding a Hugging Face T5 encoder ({e})"
            ) from e
        base = config or TextEncoderConfig()
        from dataclasses import replace

        config = replace(base, name_or_path=name_or_path, d_model=model.config.d_model)
        return cls(config, model.eval(), tokenizer)

    # -- checkpoint hooks (muse/checkpoint.py) -------------------------------------------------
    def save_extra(self, directory: str) -> None:
        """Files beside model.safetensors: the T5 architecture and the tokenizer."""
        with open(os.path.join(directory, T5_CONFIG_FILE), "w") as f:
            json.dump(self.model.config.to_dict(), f, indent=1, default=str)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_saved(cls, config: TextEncoderConfig, directory: str) -> TextEncoder:
        """Rebuild the architecture and tokenizer saved by `save_extra` (weights loaded by the caller)."""
        from transformers import AutoTokenizer, ByT5Tokenizer, T5Config, T5EncoderModel

        with open(os.path.join(directory, T5_CONFIG_FILE)) as f:
            t5 = T5Config.from_dict(json.load(f))
        tok_cfg_path = os.path.join(directory, "tokenizer_config.json")
        tok_class = ""
        if os.path.exists(tok_cfg_path):
            with open(tok_cfg_path) as f:
                tok_class = json.load(f).get("tokenizer_class", "")
        if tok_class.startswith("ByT5"):
            tokenizer = ByT5Tokenizer()
        else:
            tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(config, T5EncoderModel(t5).eval(), tokenizer)

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (B, L) long, mask (B, L) bool; padded to the longest, capped at max_length."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = self.tokenizer(
            list(prompts), padding="longest", truncation=True, max_length=self.config.max_length,
            return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        return out["input_ids"].to(device), out["attention_mask"].bool().to(device)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids (B, L), mask (B, L) -> embeddings (B, L, D); padded positions are zeroed."""
        hidden = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return hidden * mask[..., None].to(hidden.dtype)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(prompts)
        return self.encode_ids(ids, mask), mask
