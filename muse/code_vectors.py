"""What a transformer that reads codes through vectors (`code_dim` > 0) reads them as, and the
super-res prior that reads the low-res image those codes draw.

A free embedding row per code cannot name a code no training target used: its logit only ever falls.
Read through a vector (the codebook's, or the pixels of the patch the code decodes to), a code gets an
embedding and a logit that are linear maps of it, so a colour-shape pairing never seen as a target
composes from the pairings it shares a colour or a shape with (benchmarks/RESULTS.md, "Codes read as
the patches they draw").

The super-res pixel prior (`PixelPrior`) goes one step further for patch-form tokenizers, whose every
code is a patch of pixels: the low-res tokens are an image, and that image, upsampled, says which
high-res patch belongs where. Each high-res code's logit gets `scale · -(mean squared distance)` between
its patch and the upsampled low-res pixels it would cover. A learned map from low-res codes to high-res
codes only knows the pairs it was trained on; the prior holds for any colour and shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from muse.config import VQGANConfig

CODE_VECTORS = ("codebook", "pixels")  # what a model with code_dim reads codes through


def pixel_code_vectors(pixels: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """Code vectors from the patches codes draw: pixels (K, channels * P) -> (K, (channels + 1) * P),
    the pixels centred over the codebook, then each pixel's distance from that mean patch. A logit
    that is linear in pixels alone can only score a colour where a shape puts it; the distances are
    an outline that hardly depends on the colour, so a colour and a shape can be scored apart."""
    K = pixels.shape[0]
    centred = pixels.float() - pixels.float().mean(dim=0)
    outline = centred.view(K, channels, -1).norm(dim=1)  # (K, P)
    return torch.cat([centred, outline], dim=1)


def code_classes(unit: torch.Tensor, min_cosine: float, chunk: int = 1024) -> torch.Tensor:
    """(K,) the class of each of K unit code vectors: the lowest code reachable through pairs whose cosine
    is above `min_cosine`. Closeness is not transitive (a~b, b~c, not a~c), so a class is a connected
    component, found by spreading the lowest index along the pairs (in chunks of rows: K x K at 8192
    codes is half a GiB as integers)."""
    k = len(unit)
    classes = torch.arange(k, device=unit.device)
    while True:
        spread = torch.cat([
            torch.where((unit[i:i + chunk] @ unit.t()) > min_cosine, classes[None, :], k).amin(dim=1)
            for i in range(0, k, chunk)])
        spread = torch.minimum(spread, classes)  # a zero vector matches nothing: its own class
        if torch.equal(spread, classes):
            return classes
        classes = spread


def pixel_code_dim(tokenizer: VQGANConfig) -> int:
    """The width of `pixel_code_vectors` for a patch-form tokenizer's codes."""
    if tokenizer.form != "patch":
        raise ValueError(f"code pixels need a patch-form tokenizer (each code decoded on its own); this one is "
                         f"{tokenizer.form!r}")
    return (tokenizer.in_channels + 1) * tokenizer.downsample_factor**2


def pixel_patch_side(code_dim: int, channels: int = 3) -> int:
    """The side in pixels of the patches behind `pixel_code_vectors` of width code_dim."""
    side = math.isqrt(code_dim // (channels + 1)) if code_dim > 0 else 0
    if side == 0 or (channels + 1) * side * side != code_dim:
        raise ValueError(f"code_dim {code_dim} is not the width of pixel code vectors of {channels}-channel "
                         f"square patches ((channels + 1) * side**2)")
    return side


PRIOR_SCALE = 100.0  # the pixel prior's initial scale (learned): a wrong colour on a patch costs ~100 in logits
LEARNED_LOGIT_BOUND = 4.0  # beside the prior, the transformer's own logits stay within +-4


class PixelPrior(nn.Module):
    """Super-res logits from the low-res image: for each high-res position, the upsampled low-res
    pixels it covers (`prior_pixels`, once per request) against every high-res code's patch.

    -scale * ||u - p_k||^2 / D = scale * (2 u.p_k - ||p_k||^2) / D + (a constant per position, which
    softmax ignores), so it is one matmul against the codes' patches. The transformer's own logits are
    bounded (LEARNED_LOGIT_BOUND * tanh) before they are added: trained on the corpus's pairings alone,
    unbounded logits grew to thousands and drew a held-out pairing's low-res codes as a seen pairing's
    whatever the prior said (benchmarks/RESULTS.md, "Super-res that reads the low-res image"); bounded,
    they choose between patches the prior finds close, and the text still counts there."""

    def __init__(self, lo_codebook_size: int, lo_side: int, lo_patch: int, hi_codebook_size: int, hi_side: int,
                 hi_patch: int, channels: int = 3):
        super().__init__()
        self.lo_side, self.lo_patch, self.hi_side, self.hi_patch = lo_side, lo_patch, hi_side, hi_patch
        self.channels = channels
        self.register_buffer("lo_pixels", torch.zeros(lo_codebook_size, channels * lo_patch**2))
        self.register_buffer("hi_pixels", torch.zeros(hi_codebook_size, channels * hi_patch**2))
        self.scale = nn.Parameter(torch.tensor(PRIOR_SCALE))

    @torch.no_grad()
    def set_code_pixels(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """The tokenizers' code patches, `VQGAN.code_pixels()` of the low-res and high-res tokenizer."""
        for name, value in (("lo_pixels", lo), ("hi_pixels", hi)):
            buf = getattr(self, name)
            if tuple(value.shape) != tuple(buf.shape):
                raise ValueError(f"{name} must be {tuple(buf.shape)} (codebook_size, channels * patch**2), "
                                 f"got {tuple(value.shape)}")
            buf.copy_(value.to(buf))

    def prior_pixels(self, lo_ids: torch.Tensor) -> torch.Tensor:
        """Low-res ids (B, n_lo) -> the upsampled low-res pixels over each high-res patch (B, N_hi, D)."""
        B, c, p, s = lo_ids.shape[0], self.channels, self.lo_patch, self.lo_side
        patches = self.lo_pixels[lo_ids.reshape(B, -1)].view(B, s, s, c, p, p)
        image = patches.permute(0, 3, 1, 4, 2, 5).reshape(B, c, s * p, s * p)
        size = self.hi_side * self.hi_patch
        up = F.interpolate(image, size=(size, size), mode="bilinear", align_corners=False)
        return F.unfold(up, kernel_size=self.hi_patch, stride=self.hi_patch).transpose(1, 2)  # (B, N_hi, D)

    def prior(self, prior_pixels: torch.Tensor) -> torch.Tensor:
        """(..., D) upsampled low-res pixels -> (..., K_hi) prior logits."""
        hi = self.hi_pixels.to(prior_pixels.dtype)
        d = hi.shape[1]
        return (2.0 * prior_pixels @ hi.t() - (hi * hi).sum(dim=1)) * (self.scale.to(prior_pixels.dtype) / d)

    def forward(self, logits: torch.Tensor, prior_pixels: torch.Tensor) -> torch.Tensor:
        """The transformer's logits (..., K_hi), bounded, plus the prior's, in float32 (prior logits
        reach ~100, where bf16 would round the learned part's +-4 to halves)."""
        bound = LEARNED_LOGIT_BOUND
        with torch.autocast(logits.device.type, enabled=False):
            return bound * torch.tanh(logits.float() / bound) + self.prior(prior_pixels.float())
