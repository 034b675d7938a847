"""FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to the features of two
image sets, |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^1/2).

The features come from a network the user supplies; nothing is downloaded and no stand-in is used:

- a TorchScript file (`.pt`) mapping uint8 images (N, 3, H, W) in 0..255 to features (N, D), such
  as NVlabs' `inception-2015-12-05.pt` (called with `return_features=True`: its 2048-d pool
  features, the FID of the literature; it resizes to 299 itself);
- a local Hugging Face CLIP folder (a full `CLIPModel` or a vision tower alone): its image embeddings.
  FID in CLIP space ranks models too, but its numbers are not comparable with Inception FID.

The estimate is biased upward at small n and meaningless when n is far below the feature width
(the covariance has rank n - 1), so `check_n` refuses n < MIN_N unless the caller accepts a smoke run.
"""

from __future__ import annotations

import os
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from muse.data.images import to_uint8_array

MIN_N = 500
DEFAULT_N = 2000
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FEATURE_NET_HELP = ("a TorchScript feature network (.pt, e.g. NVlabs' inception-2015-12-05.pt; TorchScript runs "
                    "the code it holds: load only files you trust) or a local Hugging Face CLIP folder (full "
                    "CLIPModel or a CLIP vision model); nothing is downloaded")


def check_n(n: int, allow_small_n: bool = False) -> None:
    """Refuse sample sizes at which FID is not a measurement."""
    if n < MIN_N and not allow_small_n:
        raise ValueError(
            f"n={n} is below {MIN_N}: FID fits a mean and a covariance of 512-2048-d features, and with "
            f"fewer samples the covariance is rank-deficient and the score is dominated by the sample "
            f"size, not by the model (use >= {DEFAULT_N}; 10k-50k for numbers to publish). "
            f"--allow-small-n runs anyway for a smoke test and marks the report as not comparable")


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """FID between two feature sets (n, d). Tr((S_a S_b)^1/2) = Tr((R S_b R)^1/2) with R = S_a^1/2:
    the product is not symmetric, R S_b R is (and PSD), so eigh gives its roots exactly."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    sa, sb = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ sb @ root_a)
    covmean_trace = np.sqrt(np.clip(inner, 0, None)).sum()
    distance = ((mu_a - mu_b) ** 2).sum() + np.trace(sa) + np.trace(sb) - 2 * covmean_trace
    return max(0.0, float(distance))  # >= 0 exactly; rounding leaves a set against itself at about -1e-3


class FeatureNet(Protocol):
    name: str

    def __call__(self, images: list[Image.Image]) -> torch.Tensor: ...  # (N, D) float32 on CPU


def clip_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """CLIP's preprocessing: shorter side to `size`, centre crop, normalise. (N, 3, size, size)."""
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    pixels = torch.from_numpy(np.stack([to_uint8_array(img, size) for img in images])).permute(0, 3, 1, 2)
    return (pixels.float() / 255 - mean) / std


class CLIPImageFeatures:
    """Image embeddings of a local Hugging Face CLIP folder: the projected embedding when the folder
    has a projection, else the pooled output of the vision tower."""

    def __init__(self, path: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoConfig, CLIPModel, CLIPVisionModel, CLIPVisionModelWithProjection

        try:
            config = AutoConfig.from_pretrained(path, local_files_only=True)
            kind = config.model_type
            arch = (config.architectures or [""])[0]
            cls = {"clip": CLIPModel, "clip_vision_model":
                   CLIPVisionModelWithProjection if arch.endswith("WithProjection") else CLIPVisionModel}[kind]
            self.model = cls.from_pretrained(path, local_files_only=True).to(device, dtype).eval()
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{path!r} is not a local Hugging Face CLIP folder ({type(e).__name__}: {e}); "
                             f"FID needs {FEATURE_NET_HELP}") from e
        vision = config.vision_config if kind == "clip" else config
        self.size, self.device, self.dtype = vision.image_size, device, dtype
        self.name = f"clip:{os.path.basename(os.path.normpath(path))}"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = clip_pixels(images, self.size).to(self.device, self.dtype)
        if hasattr(self.model, "get_image_features"):
            out = self.model.get_image_features(pixel_values=pixels)
            out = getattr(out, "pooler_output", out)  # some transformers versions return the output object
        else:
            out = self.model(pixel_values=pixels)
            out = out.image_embeds if hasattr(out, "image_embeds") else out.pooler_output
        return out.float().cpu()


class TorchScriptFeatures:
    """A TorchScript network on uint8 images (N, 3, size, size); `return_features=True` when its
    forward takes it (NVlabs' Inception), else called on the images alone."""

    def __init__(self, path: str, device: str | torch.device = "cpu", size: int = 299):
        try:
            self.net = torch.jit.load(path, map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path!r} is not a TorchScript file ({e}); FID needs {FEATURE_NET_HELP}") from e
        names = {arg.name for arg in self.net.forward.schema.arguments}
        self.kwargs = {"return_features": True} if "return_features" in names else {}
        self.size, self.device = size, device
        self.name = f"torchscript:{os.path.basename(path)}"

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        x = torch.from_numpy(np.stack([to_uint8_array(img, self.size) for img in images])).permute(0, 3, 1, 2)
        out = self.net(x.to(self.device), **self.kwargs)
        return out.reshape(len(images), -1).float().cpu()


def load_feature_net(path: str, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> FeatureNet:
    """A directory is a CLIP folder; a file is TorchScript (kept in fp32: Inception's FID is fp32)."""
    if os.path.isdir(path):
        return CLIPImageFeatures(path, device, dtype)
    if os.path.isfile(path):
        return TorchScriptFeatures(path, device)
    raise ValueError(f"no feature network at {path!r}: FID needs {FEATURE_NET_HELP}")


def features(net: FeatureNet, images: list[Image.Image], batch: int = 64) -> np.ndarray:
    """(N, D) float64 features of `images`, `batch` at a time."""
    return torch.cat([net(images[i:i + batch]) for i in range(0, len(images), batch)]).double().numpy()
