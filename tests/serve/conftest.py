"""One Muse app on a real local Ray Serve (HTTP on 127.0.0.1, a free port) for the serve tests, with
a tiny random model root; started once and shared by every test module here."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

from serve_helpers import APP, KEY, TEST_ARGS, App, healthy

from serve.app import unused_port


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> str:
    from muse.checkpoint import init_model_root

    root = str(tmp_path_factory.mktemp("serve") / "tiny")
    init_model_root("tiny", root)
    return root


@pytest.fixture(scope="session")
def pipe(tiny_root):
    """The one-process pipeline on the same model root: what the server must reproduce."""
    from muse.pipeline import MusePipeline

    return MusePipeline.from_pretrained(tiny_root)


@pytest.fixture(scope="session")
def muse_app(ray_session, tiny_root):
    from ray import serve

    from serve.app import build_app
    from serve.config import AppArgs

    port = unused_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(AppArgs(checkpoint=tiny_root, **TEST_ARGS)), name=APP, route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while not healthy(url):
        assert time.monotonic() < deadline, "the app did not come up in 120 s"
        time.sleep(0.5)
    with httpx.Client(base_url=url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield App(url, KEY, tiny_root, client)
    from ray.serve.exceptions import RayServeException

    # A later test (the end-to-end demo) may already have shut Serve down.
    with contextlib.suppress(RayServeException):
        serve.delete(APP)
    serve.shutdown()

