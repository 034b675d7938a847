"""What a request asks of the model deployments, in plain data the ingress builds without torch: how to
decode its images (`Decode`), how it wants them (`Output`), and when a stream sends a preview."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Output:
    """How a request wants its images: the side in pixels and the file format (png, jpeg, webp;
    `quality` 0-100 for the lossy ones)."""

    side: int | None = None  # None: the stage's own resolution
    format: str = "png"
    quality: int | None = None


@dataclass
class Decode:
    """How to decode one request's images."""

    n: int
    steps: int
    guidance_scale: float
    seed: int


def preview_after(step: int, steps: int, every: int) -> bool:
    """Whether a stream sends a preview after decoding step `step` (0-based) of `steps`: every
    `every` steps, never after the last (the final grid follows instead)."""
    return (step + 1) % every == 0 and step + 1 < steps
