"""Constants and helpers shared by the serve tests (imported by name: pytest puts this folder on
sys.path)."""

from __future__ import annotations

import base64
import io
import types
from dataclasses import dataclass

import httpx
import numpy as np
from PIL import Image

APP = "muse"
KEY = "test-key-123"
# Small step counts keep the suite fast on two cores; an idle scheduler waits long enough that
# concurrent requests reliably share a batch. Queues are small so an overload test reaches them.
TEST_ARGS = {
    "api_key": KEY,
    "sampling": {"steps": 6, "superres_steps": 3, "preview_every": 2, "edit_iterations": 6},
    "base": {"batching": {"max_rows": 16, "batch_wait_timeout_s": 0.2}, "max_ongoing_requests": 12,
             "max_queued_requests": 8},
    "superres": {"batching": {"max_rows": 16, "batch_wait_timeout_s": 0.2}, "max_ongoing_requests": 12,
                 "max_queued_requests": 8},
    "limits": {"max_body_bytes": 1 << 20, "max_images": 4, "max_prompt_chars": 200, "request_timeout_s": 120,
               "max_in_flight": 24},
}


@dataclass
class App:
    url: str
    key: str
    root: str
    client: httpx.Client  # sends the API key

    def generate(self, **body) -> httpx.Response:
        return self.client.post("/v1/images/generations", json=body)


def png_array(data: bytes | str) -> np.ndarray:
    """PNG bytes or base64 -> (H, W, 3) uint8."""
    if isinstance(data, str):
        data = base64.b64decode(data)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def pil_array(img: Image.Image) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def assert_same_image(got: np.ndarray, want: np.ndarray) -> None:
    """Same tokens decode to the same picture up to float rounding across processes with different
    thread counts (a pixel may round one step apart); a single different token changes a whole
    8x8 patch by far more."""
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert diff.max() <= 2, f"images differ: {(diff > 2).sum()} values by more than 2 (max {diff.max()})"


def fake_ingress(api_key: str | None = None) -> types.SimpleNamespace:
    """What build_fastapi (and a stream) reads from an Ingress, with no models behind it: the tiny
    root's sides and token grids."""
    from serve.config import AppArgs, Files, Limits, Sampling
    from serve.guard import Admission
    from serve.responses import Responses

    args = AppArgs(checkpoint="unused", api_key=api_key)
    return types.SimpleNamespace(args=args, limits=Limits(), sampling=Sampling(), lo_side=64, hi_side=128,
                                 lo_tokens=8, hi_tokens=16, responses=Responses(Files()),
                                 page="<html>Muse on Ray</html>", admission=Admission())


class FakeStream:
    """A generator's stream as Serve hands it to the ingress: `events` in order (admitted, previews,
    done), and `error` raised once `error_after` of them were read (0: at the first read)."""

    def __init__(self, events: list[dict], error: BaseException | None = None, error_after: int = 0):
        self.events, self.error, self.error_after, self.read = iter(events), error, error_after, 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.error is not None and self.read == self.error_after:
            raise self.error
        self.read += 1
        try:
            return next(self.events)
        except StopIteration:
            raise StopAsyncIteration from None

    def cancel(self):
        pass
