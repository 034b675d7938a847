"""The T5 encoder stack, with the module and weight names of Hugging Face's `T5EncoderModel`.

Weights of a T5 or mT5 folder (and the text encoders of existing model roots) load into it by name.
It is ours so that a process that encodes text imports only torch: importing transformers' T5 modeling
costs seconds (it imports torch's compiler), paid by every training worker and Serve replica that loads
a text encoder. Dropout is left out: the encoder is frozen and runs in eval mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.nn import functional as F

from muse.uvit import RMSNorm  # T5's layer norm: no mean, no bias, statistics in float32


@dataclass
class T5EncoderConfig:
    """The fields of a Hugging Face T5 config.json that the encoder uses (the others are ignored)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"  # "relu" (T5), "gated-gelu" (T5 v1.1), or "[gated-]relu|gelu|silu"

    def __post_init__(self):
        act = self.feed_forward_proj.removeprefix("gated-")
        if act not in ("relu", "gelu", "silu"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported: use relu, gelu or "
                             "silu, optionally with 'gated-' before it")

    @property
    def gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """Hugging Face's dense_act_fn: "gated-gelu" means the tanh form ("gelu_new"), "gelu" the exact one."""
        return "gelu_new" if self.feed_forward_proj == "gated-gelu" else self.feed_forward_proj.removeprefix("gated-")

    @classmethod
    def from_dict(cls, values: dict) -> T5EncoderConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        """What Hugging Face's T5Config reads too (so a saved root's t5_config.json stays one)."""
        return {f.name: getattr(self, f.name) for f in fields(self)} | {
            "model_type": "t5", "is_encoder_decoder": False, "dropout_rate": 0.0, "use_cache": False,
            "dense_act_fn": self.activation, "is_gated_act": self.gated}


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": _gelu_tanh, "silu": F.silu}


def relative_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's bidirectional buckets of key position minus query position: exact near zero, log-spaced
    out to max_distance, one half of the buckets for each direction."""
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    far = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact) * (half - exact)).long()
    far = torch.clamp(far, max=half - 1)
    return buckets + torch.where(distance < exact, distance, far)


class T5Attention(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_bias: bool):
        super().__init__()
        inner = config.num_heads * config.d_kv
        self.heads, self.d_kv = config.num_heads, config.d_kv
        self.buckets, self.max_distance = config.relative_attention_num_buckets, config.relative_attention_max_distance
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        if has_bias:  # only the first block learns the position bias; the others reuse it
            self.relative_attention_bias = nn.Embedding(self.buckets, self.heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """(1, heads, L, L) bias from key position minus query position."""
        positions = torch.arange(length, device=device)
        relative = positions[None, :] - positions[:, None]
        bias = self.relative_attention_bias(relative_buckets(relative, self.buckets, self.max_distance))
        return bias.permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, self.d_kv).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) + bias  # T5 does not scale by 1/sqrt(d_kv)
        weights = torch.softmax(scores.float(), dim=-1).type_as(scores)
        return self.o((weights @ v).transpose(1, 2).reshape(b, n, -1))


class T5SelfAttentionLayer(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(config, has_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseActDense(nn.Module):
    """wo(act(wi(x))), or wo(act(wi_0(x)) * wi_1(x)) when gated."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.activation]
        self.gated = config.gated
        if self.gated:
            self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
            self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        else:
            self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h.to(self.wo.weight.dtype))


class T5FeedForwardLayer(nn.Module):
    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.DenseReluDense = T5DenseActDense(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, config: T5EncoderConfig, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5SelfAttentionLayer(config, has_bias), T5FeedForwardLayer(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nn.Module):
    def __init__(self, config: T5EncoderConfig, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.block = nn.ModuleList([T5Block(config, has_bias=i == 0) for i in range(config.num_layers)])
        self.final_layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """ids (B, L), mask (B, L) -> hidden states (B, L, d_model). Padded keys get no attention."""

    def __init__(self, config: T5EncoderConfig):
        super().__init__()
        self.config = config
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = T5Stack(config, self.shared)  # the input embedding is the shared one, tied

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.shared(ids)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(ids.shape[1], ids.device).to(x.dtype)
        bias = bias + (~mask.bool())[:, None, None, :].to(x.dtype) * torch.finfo(x.dtype).min
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)
