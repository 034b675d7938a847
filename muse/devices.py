"""The device a command line names, checked before any model is loaded."""

from __future__ import annotations

import torch


def checked_device(spec: str) -> torch.device:
    """The device of a `--device` flag; ValueError (one line) for one this PyTorch cannot use."""
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device {spec!r}: {e}") from None
    if device.type == "meta":
        raise ValueError("--device meta holds shapes, not numbers: use cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: this PyTorch sees no CUDA device (torch {torch.__version__})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device
