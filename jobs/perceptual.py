"""LPIPS-style perceptual loss (Zhang et al. 2018) from user-supplied VGG16 weights; nothing is downloaded.

The weights file is a `.safetensors` with torchvision's VGG16 names for the convolutions
(`features.<i>.weight` / `.bias`) and, optionally, the LPIPS heads (`lin<k>.model.1.weight`, shape
(1, C_k, 1, 1)). Without heads every channel weighs the same. The distance between two images is

    Σ_k mean_{h,w} Σ_c w_kc · (f̂_k(x) − f̂_k(y))²      f̂ = VGG features at relu1_2 … relu5_3, unit-normalised over c
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from jobs.preflight import RunRefused

# VGG16 "D": conv widths, "M" = 2x2 max-pool. Feature taps after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)  # indices in torchvision's `features` Sequential
SHIFT = (-0.030, -0.088, -0.188)  # LPIPS input scaling, for images in [-1, 1]
SCALE = (0.458, 0.448, 0.450)

MISSING = ("perceptual loss weights not found at {path!r}: give a VGG16 .safetensors with torchvision names "
           "('features.<i>.weight/bias', optional LPIPS heads 'lin<k>.model.1.weight') in "
           "gan.perceptual_weights, or set it to null to train without the perceptual loss "
           "(nothing is downloaded)")


def vgg16_features() -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(prev, v, 3, padding=1), nn.ReLU(inplace=False)]
            prev = v
    return nn.Sequential(*layers)


class PerceptualLoss(nn.Module):
    """Frozen; call with images (B, 3, H, W) in [-1, 1] -> scalar mean distance."""

    def __init__(self, features: nn.Sequential, heads: list[torch.Tensor] | None):
        super().__init__()
        self.features = features
        widths = [features[i - 1].out_channels for i in TAPS]
        weights = heads or [torch.ones(1, c, 1, 1) for c in widths]
        for k, w in enumerate(weights):
            self.register_buffer(f"w{k}", w.reshape(1, -1, 1, 1).float())
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        out, h = [], (x - self.shift) / self.scale
        for i, layer in enumerate(self.features[: TAPS[-1] + 1]):
            h = layer(h)
            if i in TAPS:
                out.append(F.normalize(h, dim=1, eps=1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for k, (fx, fy) in enumerate(zip(self.taps(x.float()), self.taps(y.float()))):
            total = total + ((fx - fy) ** 2 * getattr(self, f"w{k}")).sum(1).mean()
        return total


class MissingWeights(RunRefused, FileNotFoundError):
    """A configured weights file that is not there: refused on the driver, before any run (one line)."""


def check_weights(path: str | None) -> None:
    """Fail fast, on the driver, when a configured weights file is absent."""
    if path is not None and not os.path.isfile(path):
        raise MissingWeights(MISSING.format(path=path))


def load_perceptual(path: str, device: torch.device | str = "cpu") -> PerceptualLoss:
    from safetensors.torch import load_file

    check_weights(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"perceptual weights must be a .safetensors file (no pickles), got {path!r}")
    state = load_file(path)
    features = vgg16_features()
    wanted = {f"features.{k}" for k in features.state_dict()}
    missing = sorted(wanted - set(state))
    if missing:
        raise ValueError(f"{path} is not a VGG16 feature extractor: missing {missing[:4]}")
    features.load_state_dict({k[len("features."):]: v for k, v in state.items() if k in wanted})
    heads = [state[f"lin{k}.model.1.weight"] for k in range(len(TAPS))] if "lin0.model.1.weight" in state else None
    return PerceptualLoss(features, heads).to(device)
