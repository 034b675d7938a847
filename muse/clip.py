"""The CLIP text encoder of aMUSEd: prompts -> [pooled projection ; penultimate hidden states].

aMUSEd conditions its U-ViT on two things from CLIP-L/14 (transformers' `CLIPTextModelWithProjection`,
prompts padded to 77 tokens, no attention mask): the hidden states before the last layer, for
cross-attention, and the projected pooled embedding, for the adaptive norms. Both go out as one
sequence (B, 1 + 77, D), pooled first, with an all-True mask, so the pair travels wherever Muse's
(embeddings, mask) does: the pipeline, the serving deployments, token shards. The U-ViT splits it.

Everything loads from the component directory (clip_config.json + tokenizer files); nothing is
downloaded.
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from muse.components import CLIP_CONFIG_FILE
from muse.config import CLIPTextConfig
from muse.text import warn_if_cut



class CLIPTextEncoder(nn.Module):
    """Call with a list of prompts; returns (embeddings (B, 1 + L, D), mask (B, 1 + L) all True)."""

    def __init__(self, config: CLIPTextConfig, model: nn.Module, tokenizer):
        super().__init__()
        c = model.config
        if c.hidden_size != c.projection_dim:
            raise ValueError(f"CLIP hidden width {c.hidden_size} != projection width {c.projection_dim}: "
                             "the pooled projection and the hidden states share one sequence")
        self.config = config
        self.model = model
        self.tokenizer = tokenizer

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @classmethod
    def from_transformers(cls, model: nn.Module, tokenizer, name_or_path: str | None = None) -> CLIPTextEncoder:
        config = CLIPTextConfig(name_or_path=name_or_path, hidden=model.config.hidden_size,
                                max_length=int(min(tokenizer.model_max_length, model.config.max_position_embeddings)))
        return cls(config, model.eval(), tokenizer)

    @classmethod
    def load_pretrained(cls, model_dir: str, tokenizer_dir: str | None = None) -> CLIPTextEncoder:
        """From Hugging Face folders (a local path; the tokenizer may sit in its own folder)."""
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        model = CLIPTextModelWithProjection.from_pretrained(model_dir, local_files_only=True,
                                                            variant=weights_variant(model_dir))
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir or model_dir, local_files_only=True)
        return cls.from_transformers(model.float(), tokenizer, model_dir)

    # -- checkpoint hooks (muse/checkpoint.py) -------------------------------------------------
    def save_extra(self, directory: str) -> None:
        with open(os.path.join(directory, CLIP_CONFIG_FILE), "w") as f:
            json.dump(self.model.config.to_dict(), f, indent=1, default=str)
        self.tokenizer.save_pretrained(directory)

    @classmethod
    def from_saved(cls, config: CLIPTextConfig, directory: str) -> CLIPTextEncoder:
        """The architecture and tokenizer saved by `save_extra` (weights loaded by the caller)."""
        from transformers import CLIPTextConfig as HFConfig
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        with open(os.path.join(directory, CLIP_CONFIG_FILE)) as f:
            hf = HFConfig.from_dict(json.load(f))
        tokenizer = CLIPTokenizer.from_pretrained(directory, local_files_only=True)
        return cls(config, CLIPTextModelWithProjection(hf).eval(), tokenizer)

    def restore_buffers(self) -> None:
        """The position ids CLIP computes at construction and never saves, for a model built on the
        meta device (muse.checkpoint.load_component): loading needs no random init of the real model."""
        embeddings = self.model.text_model.embeddings
        if embeddings.position_ids.is_meta:
            ids = torch.arange(embeddings.position_embedding.num_embeddings).expand((1, -1))
            embeddings.register_buffer("position_ids", ids, persistent=False)

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> ids (B, max_length), padded as aMUSEd pads; mask (B, max_length) all True
        (aMUSEd's text encoder and transformer attend to the padding)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        warn_if_cut(self.tokenizer, list(prompts), self.config.max_length, verbose=False)
        ids = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                             max_length=self.config.max_length, return_tensors="pt")["input_ids"]
        ids = ids.to(next(self.model.parameters()).device)
        return ids, torch.ones_like(ids, dtype=torch.bool)

    def encode_ids(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, L) -> [pooled ; penultimate hidden states] (B, 1 + max_length, D). Ids trimmed to
        their length (token shards, `mask` False past it) are padded back as `tokenize` pads, so
        training sees what sampling sees."""
        if mask is not None and (ids.shape[1] != self.config.max_length or not bool(mask.all())):
            pad = self.tokenizer.pad_token_id
            ids = torch.where(mask.bool(), ids, torch.full_like(ids, pad))[:, : self.config.max_length]
            ids = torch.nn.functional.pad(ids, (0, self.config.max_length - ids.shape[1]), value=pad)
        out = self.model(input_ids=ids, output_hidden_states=True)
        hidden = out.hidden_states[-2]
        return torch.cat([out.text_embeds[:, None].to(hidden.dtype), hidden], dim=1)

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, _ = self.tokenize(prompts)
        emb = self.encode_ids(ids)
        return emb, torch.ones(emb.shape[:2], dtype=torch.bool, device=emb.device)


def weights_variant(folder: str) -> str | None:
    """The variant a Hugging Face folder's weights come in (`model.fp16.safetensors`: "fp16") when it
    holds no plain weights file, else None: what `from_pretrained(variant=...)` needs to find them."""
    names = os.listdir(folder)
    plain = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    if any(n in plain for n in names):
        return None
    variants = sorted(n.split(".")[-2] for n in names
                      if n.startswith(("model.", "pytorch_model.")) and n.endswith((".safetensors", ".bin"))
                      and n.count(".") == 2)
    return variants[0] if variants else None
