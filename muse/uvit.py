"""aMUSEd's U-ViT (Patil et al. 2024, arXiv 2401.01808), computing what diffusers' `UVit2DModel` does.

    ids (B, N) ──embed, RMSNorm, 1x1──▶ (B, C, s, s) ──[2x2 down]──▶ res stage ──▶ RMSNorm, linear ──▶
        transformer layers (adaLN-RMSNorm, self-attn, adaLN-RMSNorm, cross-attn, adaLN-LayerNorm, GEGLU)
    ──▶ RMSNorm, linear ──▶ res stage ──▶ [2x2 up] ──▶ 1x1, RMSNorm, 1x1 ──▶ logits (B, N, codebook)

A res stage is `res_blocks` x (ConvNeXt block, modulated by the conditioning vector; two
cross-attentions to the text). The conditioning vector (adaLN) is an MLP of [pooled text ;
sinusoidal micro-conditioning]; the cross-attention keys are the projected CLIP hidden states.

Both are per request, so `encode_context` computes them once: every cross-attention's K/V and the
conditioning vector go into a `Context`, and each sampling step runs only the image side. The text
input is one sequence per prompt, [pooled projection ; hidden states] (B, 1 + L, D), as the CLIP
encoder returns it (muse/clip.py); a row whose mask is all False is unconditional and takes the
empty prompt's encoding, stored with the weights (`null_text`), which is aMUSEd's unconditional
branch. The logits head is pointwise, so `forward(..., select=mask)` runs it only where asked.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import UViTConfig
from muse.context import Context, ContextStack, NullContextCache
from muse.transformer import StepCompiler, sinusoidal


class RMSNorm(nn.Module):
    """RMS norm over the last dim, statistics in float32; weight optional."""

    def __init__(self, dim: int, eps: float, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return y.to(x.dtype)
        return y.to(self.weight.dtype) * self.weight


class Attention(nn.Module):
    """Multi-head attention. As cross-attention its K/V come from `kv`, once per request."""

    def __init__(self, dim: int, heads: int, bias: bool, kv_dim: int | None = None):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim, bias=bias)
        self.k = nn.Linear(kv_dim or dim, dim, bias=bias)
        self.v = nn.Linear(kv_dim or dim, dim, bias=bias)
        self.out = nn.Linear(dim, dim, bias=bias)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)  # (B, H, L, Dh)

    def kv(self, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split(self.k(source)), self.split(self.v(source))

    def forward(self, x: torch.Tensor, context: Context | None = None, layer: int = 0) -> torch.Tensor:
        B, N, C = x.shape
        q = self.split(self.q(x))
        if context is None:  # self-attention
            k, v = self.kv(x)
            y = F.scaled_dot_product_attention(q, k, v)
        else:
            y = context.attend(layer, q)
        return self.out(y.transpose(1, 2).reshape(B, N, C))


class AdaNorm(nn.Module):
    """norm(x)·(1 + scale) + shift, scale and shift a linear map of silu(conditioning vector)."""

    def __init__(self, dim: int, cond_dim: int, norm: nn.Module, bias: bool):
        super().__init__()
        self.mod = nn.Linear(cond_dim, 2 * dim, bias=bias)
        self.norm = norm

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.mod(F.silu(cond).to(x.dtype)).chunk(2, dim=1)  # (B, C) each
        return self.norm(x) * (1 + scale)[:, None] + shift[:, None]


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int, bias: bool, dropout: float):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner, bias=bias)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(inner, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(self.drop(h * F.gelu(gate)))


class Layer(nn.Module):
    """One transformer layer; `layer` indexes its cross-attention K/V in the Context."""

    def __init__(self, c: UViTConfig):
        super().__init__()
        d = c.hidden
        self.norm1 = AdaNorm(d, d, RMSNorm(d, c.eps, c.affine), c.bias)
        self.attn = Attention(d, c.heads, c.bias)
        self.norm2 = AdaNorm(d, d, RMSNorm(d, c.eps, c.affine), c.bias)
        self.cross = Attention(d, c.heads, c.bias)
        self.norm3 = AdaNorm(d, d, nn.LayerNorm(d, c.eps, c.affine, bias=c.bias), c.bias)
        self.ff = GEGLU(d, c.mlp, c.bias, c.dropout)

    def forward(self, x: torch.Tensor, context: Context, cond: torch.Tensor, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x, cond))
        x = x + self.cross(self.norm2(x, cond), context, layer)
        return x + self.ff(self.norm3(x, cond))


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2's GRN over channels-last (B, H, W, C)."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class ConvNeXtBlock(nn.Module):
    """Depthwise 3x3, RMSNorm, 4x MLP with GRN, residual; then modulated by the conditioning vector."""

    def __init__(self, c: UViTConfig):
        super().__init__()
        ch = c.conv_channels
        self.depthwise = nn.Conv2d(ch, ch, 3, padding=1, groups=ch, bias=c.bias)
        self.norm = RMSNorm(ch, c.eps, c.affine)
        self.up = nn.Linear(ch, 4 * ch, bias=c.bias)
        self.grn = GlobalResponseNorm(4 * ch)
        self.down = nn.Linear(4 * ch, ch, bias=c.bias)
        self.drop = nn.Dropout(c.dropout)
        self.mod = nn.Linear(c.hidden, 2 * ch, bias=c.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # x (B, C, h, w)
        h = self.norm(self.depthwise(x).permute(0, 2, 3, 1))  # (B, h, w, C)
        h = self.drop(self.down(self.grn(F.gelu(self.up(h)))))
        x = x + h.permute(0, 3, 1, 2)
        scale, shift = self.mod(F.silu(cond)).chunk(2, dim=1)
        return x * (1 + scale[:, :, None, None]) + shift[:, :, None, None]


class TextAttention(nn.Module):
    """Two pre-norm cross-attentions to the text (no MLP) at the conv stages' width; the text is
    mapped to that width by `kv_map` (of silu(text)) when it differs."""

    def __init__(self, c: UViTConfig):
        super().__init__()
        ch = c.conv_channels
        self.kv_map = nn.Linear(c.hidden, ch, bias=c.bias) if c.hidden != ch else None
        self.norm1 = RMSNorm(ch, 1e-6)
        self.attn1 = Attention(ch, c.conv_heads, c.bias)
        self.norm2 = RMSNorm(ch, 1e-6)
        self.attn2 = Attention(ch, c.conv_heads, c.bias)

    def kvs(self, text: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        source = text if self.kv_map is None else self.kv_map(F.silu(text))
        return [self.attn1.kv(source), self.attn2.kv(source)]

    def forward(self, x: torch.Tensor, context: Context, layer: int) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), context, layer)
        return x + self.attn2(self.norm2(x), context, layer + 1)


class ResStage(nn.Module):
    """[2x2 downsample] -> res_blocks x (ConvNeXt block, text attention) -> [2x2 upsample]."""

    def __init__(self, c: UViTConfig, down: bool, up: bool):
        super().__init__()
        ch = c.conv_channels
        self.down_norm = RMSNorm(ch, c.eps, c.affine) if down else None
        self.down = nn.Conv2d(ch, ch, 2, stride=2, bias=c.bias) if down else None
        self.blocks = nn.ModuleList(ConvNeXtBlock(c) for _ in range(c.res_blocks))
        self.attns = nn.ModuleList(TextAttention(c) for _ in range(c.res_blocks))
        self.up_norm = RMSNorm(ch, c.eps, c.affine) if up else None
        self.up = nn.ConvTranspose2d(ch, ch, 2, stride=2, bias=c.bias) if up else None

    def forward(self, x: torch.Tensor, context: Context, cond: torch.Tensor, layer: int) -> torch.Tensor:
        if self.down is not None:
            x = self.down(self.down_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        for i, (block, attn) in enumerate(zip(self.blocks, self.attns)):
            x = block(x, cond)
            B, C, h, w = x.shape
            x = attn(x.flatten(2).transpose(1, 2), context, layer + 2 * i).transpose(1, 2).reshape(B, C, h, w)
        if self.up is not None:
            x = self.up(self.up_norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        return x


class UViT(NullContextCache, StepCompiler, nn.Module):
    """The aMUSEd transformer under our sampler: `encode_context` once per request, then
    `model(ids, context, select=mask)` per step. [MASK] is `config.mask_token_id`."""

    def __init__(self, config: UViTConfig):
        super().__init__()
        c = self.config = config
        if min(c.hidden, c.heads, c.conv_channels, c.conv_heads) < 1:
            raise ValueError(f"hidden {c.hidden}, heads {c.heads}, conv_channels {c.conv_channels} and conv_heads "
                             f"{c.conv_heads} must be >= 1")
        if c.hidden % c.heads or c.conv_channels % c.conv_heads:
            raise ValueError(f"hidden {c.hidden} / heads {c.heads} or conv_channels {c.conv_channels} / "
                             f"conv_heads {c.conv_heads} do not divide")
        if not c.codebook_size <= c.mask_token_id < c.vocab_size:
            raise ValueError(f"mask_token_id {c.mask_token_id} must be an embedding row past the codebook")
        if (c.downsample or c.upsample) and c.tokens_per_side % 2:
            raise ValueError(f"a 2x2 down/upsample needs an even token grid, got {c.tokens_per_side}")
        self.codebook_size = c.codebook_size
        self.mask_token_id = c.mask_token_id
        self.num_tokens = c.num_tokens
        self.text_proj = nn.Linear(c.text_dim, c.hidden, bias=c.bias)
        self.text_norm = RMSNorm(c.hidden, c.eps, c.affine)
        cond_in = c.text_dim + len(c.micro_conds) * c.micro_cond_dim
        self.cond_embed = nn.Sequential(nn.Linear(cond_in, c.hidden, bias=c.bias), nn.SiLU(),
                                        nn.Linear(c.hidden, c.hidden, bias=c.bias))
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim)
        self.embed_norm = RMSNorm(c.embed_dim, c.eps, c.affine)
        self.embed_proj = nn.Linear(c.embed_dim, c.conv_channels, bias=c.bias)
        self.stage_in = ResStage(c, down=c.downsample, up=False)
        self.in_norm = RMSNorm(c.conv_channels, c.eps, c.affine)
        self.in_proj = nn.Linear(c.conv_channels, c.hidden, bias=c.bias)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.layers))
        self.out_norm = RMSNorm(c.hidden, c.eps, c.affine)
        self.out_proj = nn.Linear(c.hidden, c.conv_channels, bias=c.bias)
        self.stage_out = ResStage(c, down=False, up=c.upsample)
        self.head_proj = nn.Linear(c.conv_channels, c.embed_dim, bias=c.bias)
        self.head_norm = RMSNorm(c.embed_dim, c.eps, c.affine)
        self.head = nn.Linear(c.embed_dim, c.codebook_size, bias=c.bias)
        # The empty prompt's [pooled ; hidden states]: the unconditional branch (set on import).
        self.register_buffer("null_text", torch.zeros(1, 1 + c.text_len, c.text_dim))
        self.init_null_cache()

    # -- per request ---------------------------------------------------------------------------
    def encode_context(self, text: torch.Tensor, text_mask: torch.Tensor,
                       micro_conds: torch.Tensor | None = None) -> Context:
        """text (B, 1 + L, D) = [pooled ; hidden states], mask (B, 1 + L); rows with nothing
        unmasked take the empty prompt. micro_conds (B, 5) or None for the config's."""
        B = text.shape[0]
        dtype = self.text_proj.weight.dtype
        text = text.to(dtype)
        uncond = ~text_mask.bool().any(dim=1)  # (B,)
        if bool(uncond.any()):
            null = self.null_text.to(dtype)
            if bool(uncond.all()):  # any placeholder (serving sends one masked position) will do
                text = null.expand(B, -1, -1)
            elif text.shape[1] != null.shape[1]:
                raise ValueError(f"text of {text.shape[1]} positions; this model reads {null.shape[1]}")
            else:
                text = torch.where(uncond[:, None, None], null, text)
        pooled, hidden = text[:, 0], text[:, 1:]
        if micro_conds is None:
            micro_conds = torch.tensor(self.config.micro_conds, device=text.device).expand(B, -1)
        micro = sinusoidal(micro_conds.flatten(), self.config.micro_cond_dim).reshape(B, -1)
        cond = self.cond_embed(torch.cat([pooled, micro], dim=1).to(dtype))  # (B, hidden)
        h = self.text_norm(self.text_proj(hidden))  # (B, L, hidden)
        kvs = [kv for attn in self.stage_in.attns for kv in attn.kvs(h)]
        kvs += [layer.cross.kv(h) for layer in self.layers]
        kvs += [kv for attn in self.stage_out.attns for kv in attn.kvs(h)]
        mask = torch.ones(B, h.shape[1], dtype=torch.bool, device=h.device)
        return Context([k for k, _ in kvs], [v for _, v in kvs], mask, adaptive=cond)

    def null_context(self) -> Context:
        """The empty prompt's context (one row), cached (`NullContextCache`)."""
        def encode() -> Context:
            mask = torch.ones(self.null_text.shape[:2], dtype=torch.bool, device=self.null_text.device)
            return self.encode_context(self.null_text, mask)

        return self.cached_null(encode)

    # -- per step ------------------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, context: Context | ContextStack,
                select: torch.Tensor | None = None) -> torch.Tensor:
        """ids (B, N) -> logits (B, N, codebook_size), or (M, codebook_size) at `select` (B, N) bool."""
        if isinstance(context, ContextStack):
            context = context.flat
        x = self._features(ids, context)  # (B, N, C)
        x = x if select is None else x[select]
        return self.head(self.head_norm(self.head_proj(x)))

    def features(self, ids: torch.Tensor, context: Context) -> torch.Tensor:
        """ids (B, N) -> the conv stage's output per token (B, N, conv_channels)."""
        c, s = self.config, self.config.tokens_per_side
        B = ids.shape[0]
        cond = context.adaptive
        x = self.embed_proj(self.embed_norm(self.embed(ids.view(B, s, s))))  # (B, s, s, C)
        x = self.stage_in(x.permute(0, 3, 1, 2), context, cond, 0)  # (B, C, h, w)
        _, C, h, w = x.shape
        x = self.in_proj(self.in_norm(x.permute(0, 2, 3, 1).reshape(B, h * w, C)))  # (B, hw, hidden)
        first = 2 * c.res_blocks
        for i, layer in enumerate(self.layers):
            x = layer(x, context, cond, first + i)
        x = self.out_proj(self.out_norm(x)).view(B, h, w, C).permute(0, 3, 1, 2)
        x = self.stage_out(x, context, cond, first + c.layers)  # (B, C, s, s)
        return x.permute(0, 2, 3, 1).reshape(B, s * s, C)
