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


def decode_steps(steps: int, tokens: int) -> int:
    """The steps a decode runs: never more than its tokens to decode (each step decodes one or more),
    as `muse.sampling.generate`; 0 when nothing is left to decode."""
    return max(0, min(steps, tokens))


def preview_after(step: int, steps: int, every: int) -> bool:
    """Whether a stream sends a preview after decoding step `step` (0-based) of the `steps` it runs
    (`decode_steps`): every `every` steps, never after the last (the final grid follows instead)."""
    return (step + 1) % every == 0 and step + 1 < steps


def previews_sent(steps: int, tokens: int, every: int) -> int:
    """How many previews a generator streams for a stage asked for `steps` over `tokens` masked tokens."""
    runs = decode_steps(steps, tokens)
    return sum(preview_after(s, runs, every) for s in range(runs))
