"""The VQ tokenizer of aMUSEd, computing what diffusers' `VQModel` does (with `lookup_from_codebook`).

    image [-1, 1] ──to [0, 1]──▶ Encoder ──1x1 (quant)──▶ z (B, D, h, w) ──nearest code──▶ ids (B, h, w)
    ids ──codebook──▶ (B, D, h, w) ──1x1 (post-quant)──▶ Decoder ──clip to [0, 1]──▶ image [-1, 1]

The encoder and decoder are the taming-transformers conv stacks: GroupNorm/SiLU res blocks per level,
a stride-2 conv between levels (the decoder: nearest upsampling, then a conv), a middle of two res
blocks (with single-head attention between them when `mid_attention`). aMUSEd's VQ works on images
in [0, 1]; at this module's boundary images are in [-1, 1], as everywhere else in `muse`. It is
known to overflow in float16: keep it in float32 or bfloat16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import VQConfig


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class MidAttention(nn.Module):
    """Single-head self-attention over all positions, GroupNorm in front, residual."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.q, self.k, self.v, self.out = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).view(B, C, H * W).transpose(1, 2)[:, None]  # (B, 1, HW, C)
        y = F.scaled_dot_product_attention(self.q(h), self.k(h), self.v(h))
        return x + self.out(y[:, 0]).transpose(1, 2).reshape(B, C, H, W)


class Middle(nn.Module):
    def __init__(self, ch: int, groups: int, attention: bool):
        super().__init__()
        self.res1 = ResBlock(ch, ch, groups)
        self.attn = MidAttention(ch, groups) if attention else None
        self.res2 = ResBlock(ch, ch, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.res1(x)
        return self.res2(x if self.attn is None else self.attn(x))


class Level(nn.Module):
    """Res blocks at one resolution, then a 2x down (stride-2 conv) or up (nearest + conv) resample."""

    def __init__(self, cin: int, cout: int, blocks: int, groups: int, resample: str | None):
        super().__init__()
        self.blocks = nn.ModuleList(ResBlock(cin if i == 0 else cout, cout, groups) for i in range(blocks))
        self.resample = resample
        self.conv = nn.Conv2d(cout, cout, 3, stride=2 if resample == "down" else 1,
                              padding=0 if resample == "down" else 1) if resample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        if self.resample == "down":
            x = self.conv(F.pad(x, (0, 1, 0, 1)))
        elif self.resample == "up":
            x = self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class Encoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch, n = c.channels, len(c.channels)
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block, c.groups, "down" if i < n - 1 else None)
            for i in range(n))
        self.mid = Middle(ch[-1], c.groups, c.mid_attention)
        self.norm_out = nn.GroupNorm(c.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(self.mid(x))))


class Decoder(nn.Module):
    def __init__(self, c: VQConfig):
        super().__init__()
        ch, n = list(reversed(c.channels)), len(c.channels)
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid = Middle(ch[0], c.groups, c.mid_attention)
        self.levels = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, c.groups, "up" if i < n - 1 else None)
            for i in range(n))
        self.norm_out = nn.GroupNorm(c.groups, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid(self.conv_in(z))
        for level in self.levels:
            x = level(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class VQModel(nn.Module):
    """encode(images (B, 3, r, r) in [-1, 1]) -> ids (B, h, w); decode(ids) -> images in [-1, 1]."""

    def __init__(self, config: VQConfig):
        super().__init__()
        c = self.config = config
        dim = c.codebook_dim or c.latent_channels
        self.encoder = Encoder(c)
        self.quant_conv = nn.Conv2d(c.latent_channels, dim, 1)
        self.codebook = nn.Embedding(c.codebook_size, dim)
        self.post_quant_conv = nn.Conv2d(dim, c.latent_channels, 1)
        self.decoder = Decoder(c)

    def encode_latents(self, images01: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] -> pre-quantisation latents (B, D, h, w)."""
        return self.quant_conv(self.encoder(images01))

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, D, h, w) -> ids (B, h, w) of the nearest code (Euclidean)."""
        B, D, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, D)
        return torch.cdist(flat, self.codebook.weight).argmin(dim=1).view(B, h, w)

    def decode_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, h, w) -> the decoder's raw output (B, 3, r, r), images in about [0, 1]."""
        q = self.codebook(ids).permute(0, 3, 1, 2)  # (B, D, h, w)
        return self.decoder(self.post_quant_conv(q))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize(self.encode_latents((images + 1) / 2))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode_codes(ids.long()).clamp(0, 1) * 2 - 1
