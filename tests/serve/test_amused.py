"""Streaming on an imported aMUSEd root, whose [MASK] id (8255) is not its codebook size (8192): the
web page always streams, so every preview must decode. The replicas' methods run without Serve, the
same calls a stream makes (generator stream -> Decoder.preview)."""

from __future__ import annotations

import asyncio
import io
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

MUSE_TESTS = Path(__file__).resolve().parents[1] / "muse"


@pytest.fixture(scope="module")
def amused_root(tmp_path_factory) -> str:
    """The tiny aMUSEd-256 that tests/muse/test_amused_import.py builds (random weights), imported."""
    sys.path.insert(0, str(MUSE_TESTS))
    try:
        from test_amused_import import build_amused
    finally:
        sys.path.remove(str(MUSE_TESTS))
    from muse.amused import main as import_main

    tmp = tmp_path_factory.mktemp("amused")
    build_amused("amused-256").save_pretrained(tmp / "src")
    root = str(tmp / "root")
    assert import_main(["amused", "--source", str(tmp / "src"), "--out", root]) == 0
    return root


def test_streamed_previews_decode_on_an_amused_root(amused_root):
    from serve.config import Batching
    from serve.deployments import BaseGenerator, Decode, Decoder, TextEncoder

    text, decoder = TextEncoder(amused_root), Decoder(amused_root)
    base = BaseGenerator(amused_root, "cpu", Batching(batch_wait_timeout_s=0.0), 4.5, 2)
    mask_id, codebook = base.model.mask_token_id, decoder.vqgans["lo"].config.codebook_size
    assert mask_id > codebook  # what the test is about

    async def stream() -> list[dict]:
        return [event async for event in base.stream(text.encode("a red circle"), Decode(1, 4, 3.0, 0))]

    events = asyncio.run(stream())
    previews = [e for e in events if e["kind"] == "preview"]
    assert [e["kind"] for e in events] == ["admitted", "preview", "done"]
    ids = previews[0]["ids"]  # (1, 16, 16), half still [MASK] after 2 of 4 steps
    masked = (ids == mask_id)[0].numpy()
    assert masked.any() and not masked.all()
    (png,) = decoder.preview(ids, "lo")
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    assert image.shape == (256, 256, 3)
    patches = image.reshape(16, 16, 16, 16, 3).transpose(0, 2, 1, 3, 4)  # (h, w, 16, 16, 3) token patches
    assert (np.abs(patches[masked].astype(int) - 128) <= 1).all()  # undecided patches are grey
    assert (np.abs(patches[~masked].astype(int) - 128) > 1).any()  # decided ones are drawn
    (final,) = decoder.decode(events[-1]["ids"], "lo")
    assert Image.open(io.BytesIO(final)).size == (256, 256)
