"""The sampling a model root draws well with, recorded beside its components (ROOT/sampling.json).

A recipe measures it with its model (the demo: guidance 1, where the default 4 fills the tiny model's
canvas with shapes) and `muse train` writes it from the training config's `sampling` section. `muse
generate`, `inpaint`, `outpaint`, `edit` and `muse serve` take it for whatever their flags or config
leave out; what is not recorded keeps the built-in defaults (`muse.config.SAMPLING`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from muse import storage

SAMPLING_FILE = "sampling.json"


@dataclass(frozen=True)
class RootSampling:
    """The settings a root records; None: not recorded (the built-in default applies, which for
    superres_top_k is the whole codebook)."""

    steps: int | None = None  # base decoding steps
    superres_steps: int | None = None
    guidance_scale: float | None = None
    choice_temperature: float | None = None  # MaskGIT's re-masking noise
    superres_top_k: int | None = None  # super-res draws each code among its k likeliest

    def __post_init__(self):
        for name in ("steps", "superres_steps", "superres_top_k"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"sampling.{name} must be an integer >= 1, got {value!r}")
        for name in ("guidance_scale", "choice_temperature"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                raise ValueError(f"sampling.{name} must be a number >= 0, got {value!r}")

    def recorded(self) -> dict[str, Any]:
        """The settings recorded, by name."""
        return {name: value for name, value in asdict(self).items() if value is not None}


def read_root_sampling(root: str) -> RootSampling:
    """ROOT/sampling.json, or nothing recorded when the root has none. A file that is not one is a
    ValueError naming it: sampling with settings the recipe did not choose would draw other images."""
    uri = storage.join(root, SAMPLING_FILE)
    if not storage.exists(uri):
        return RootSampling()
    try:
        data = json.loads(storage.read_text(uri))
        if not isinstance(data, dict):
            raise ValueError(f"a JSON object of settings, got {type(data).__name__}")
        unknown = sorted(set(data) - set(RootSampling.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown settings {unknown}")
        return RootSampling(**data)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{uri} is not a model root's sampling: {e}") from None


def write_root_sampling(root: str, sampling: RootSampling) -> None:
    """Record `sampling` in ROOT/sampling.json (replacing what was there); nothing recorded writes nothing."""
    if sampling.recorded():
        storage.write_text(storage.join(root, SAMPLING_FILE), json.dumps(sampling.recorded(), indent=1) + "\n")
