"""The serving pieces that need no Ray: sizes, typed config, the URL store, edit inputs, previews,
the HTTP layer with and without an API key, and batched decoding without Serve."""

from __future__ import annotations

import asyncio
import io
import os
import time
import types
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from serve.config import AppArgs, Deployment, Files, Generator, cpu_threads, load_args
from serve.images import UploadError, prepare_edit
from serve.pixels import fill_masked, grey_out
from serve.schemas import APIError, resolve_size
from serve_helpers import fake_ingress

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("size, stage, side", [(None, "lo", 64), ("auto", "lo", 64), ("64x64", "lo", 64),
                                               ("256x256", "lo", 256), ("128x128", "hi", 128), ("512x512", "hi", 512),
                                               (" 512X512 ", "hi", 512), ("1024x1024", "hi", 1024)])
def test_sizes_map_to_stages_and_the_side_asked_for(size, stage, side):
    assert resolve_size(size, 64, 128) == (stage, side)


@pytest.mark.parametrize("size, hi", [("100x100", 128), ("1024x1024", None), ("512x512", None), ("128x128", None),
                                      ("", 128), ("64", 128)])
def test_other_sizes_are_refused(size, hi):
    with pytest.raises(APIError) as err:
        resolve_size(size, 64, hi)
    assert err.value.status == 400 and err.value.param == "size"


def test_shipped_serve_config_is_valid_and_typed():
    args = AppArgs.model_validate(load_args(REPO / "serve" / "config.yaml"))
    assert args.base.autoscaling.max_replicas == 4 and args.base.batching.max_rows == 32
    opts = args.base.options()
    assert opts["autoscaling_config"]["max_replicas"] == 4 and "num_replicas" not in opts
    assert opts["ray_actor_options"] == {"num_cpus": 0.5, "num_gpus": 0.0}
    assert Deployment(num_replicas=3).options()["num_replicas"] == 3
    for name in ("ingress", "text_encoder", "base", "superres", "decoder"):  # finite queues everywhere
        assert getattr(args, name).options()["max_queued_requests"] > 0
    assert args.base.autoscaling.target_ongoing_requests == args.base.batching.max_rows / 2  # fills a forward
    # Setting one ingress field keeps the ingress's own queue defaults (not every deployment's 32/32).
    ingress = AppArgs(checkpoint="x", ingress={"num_cpus": 0.5}).ingress
    assert (ingress.num_cpus, ingress.max_ongoing_requests, ingress.max_queued_requests) == (0.5, 64, 512)


@pytest.mark.parametrize("data", [
    {"checkpoint": "x", "bogus": 1},
    {"checkpoint": "x", "base": {"batching": {"max_rows": 64}, "max_ongoing_requests": 8}},
    {"checkpoint": "x", "base": {"max_ongoing_requests": 16, "autoscaling": {"target_ongoing_requests": 32}}},
    {"checkpoint": "x", "limits": {"max_retries": 5}},
    {"checkpoint": "x", "decoder": {"autoscaling": {"min_replicas": 3, "max_replicas": 2}}},
    {"checkpoint": "x", "base": {"num_cpus": -1}},
    {"checkpoint": "x", "device": "cuda"},  # replicas without a GPU fraction would see no GPU
    {"checkpoint": "x", "ingress": {"num_replicas": 2}},  # url images in one replica's memory
    {"checkpoint": "x", "limits": {"max_image_pixels": 200_000_000}},  # past Pillow's own limit
    {"checkpoint": "x", "sampling": {"choice_temperature": float("inf")}},  # would re-mask kept tokens
    {"checkpoint": "x", "limits": {"request_timeout_s": float("nan")}},
    {},
])
def test_bad_config_is_refused(data):
    with pytest.raises(ValueError):
        AppArgs.model_validate(data)


@pytest.mark.parametrize("num_cpus, threads", [(None, 1), (0, 1), (0.25, 1), (0.99, 1), (1, 1), (2.5, 2), (4, 4),
                                               (3.99999, 4)])
def test_a_replica_computes_on_the_whole_cpus_it_claims(num_cpus, threads):
    assert cpu_threads(num_cpus) == threads


def test_a_model_built_outside_ray_claims_nothing_and_starts_no_ray():
    """In a fresh interpreter: this session's own Ray would hide a call that starts one."""
    import subprocess
    import sys

    probe = ("import ray; from serve.deployments import _claimed_cpus; "
             "assert _claimed_cpus() is None; "
             "assert not ray.is_initialized(), 'get_runtime_context() started a Ray'")
    subprocess.run([sys.executable, "-c", probe], check=True, cwd=REPO)


def test_load_args_accepts_a_plain_mapping(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text("checkpoint: /models/tiny\nbase:\n  batching: {max_rows: 2}\n")
    assert AppArgs.model_validate(load_args(path)).base == Generator(batching={"max_rows": 2})


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_prepare_edit_marks_the_tokens_under_transparent_pixels():
    image = Image.new("RGBA", (128, 96), (10, 200, 30, 255))  # centre square: x in [16, 112)
    image.paste((0, 0, 0, 0), (16, 0, 40, 24))  # the top-left 24x24 of the square -> tokens (0..1, 0..1) of 8x8
    edit = prepare_edit(_png(image), None, {"lo": 64, "hi": 128}, 8, max_pixels=10**6)
    assert edit.images["lo"].shape == (64, 64, 3) and edit.images["hi"].shape == (128, 128, 3)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[:2, :2] = True
    assert isinstance(edit.regenerate, np.ndarray) and np.array_equal(edit.regenerate, expected.numpy())
    assert tuple(edit.images["lo"][40, 40]) == (10, 200, 30)

    mask = Image.new("RGBA", (128, 96), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (100, 84, 112, 96))  # bottom-right corner of the square
    edit = prepare_edit(_png(image.convert("RGB")), _png(mask), {"lo": 64}, 8, max_pixels=10**6)
    assert np.argwhere(edit.regenerate).tolist() == [[7, 7]] and edit.kept("lo") is None
    kept = prepare_edit(_png(image.convert("RGB")), _png(mask), {"lo": 64, "hi": 128}, 8, 10**6, keep_pixels=True)
    assert [kept.kept(s)[1].shape for s in ("lo", "hi")] == [(64, 64), (128, 128)]
    assert np.argwhere(kept.kept("lo")[1]).min(axis=0).tolist() == [56, 56]  # the square's corner (12 of 96)
    assert prepare_edit(_png(image.convert("RGB")), None, {"lo": 64}, 8, max_pixels=10**6).regenerate is None

    outside = Image.new("RGBA", (128, 96), (0, 0, 0, 255))
    outside.paste((0, 0, 0, 0), (0, 0, 12, 96))  # only left of the centre square: the model never sees it
    with pytest.raises(UploadError, match="outside the centre") as err:
        prepare_edit(_png(image.convert("RGB")), _png(outside), {"lo": 64}, 8, max_pixels=10**6)
    assert err.value.param == "mask"


@pytest.mark.parametrize("side, tokens", [(64, 8), (100, 8), (37, 16), (16, 16), (200, 7)])
def test_the_ingress_token_mask_is_the_models_pooled_mask(side, tokens):
    """The ingress computes edit masks in numpy (it imports no torch); the library's torch version is
    the reference, on sides that do and do not divide evenly."""
    from muse.editing import token_mask_from_pixels
    from serve.images import token_mask

    gen = np.random.default_rng(side * tokens)
    for density in (0.002, 0.05, 0.5):
        pixels = gen.random((side, side)) < density
        ours = token_mask(pixels, tokens)
        theirs = token_mask_from_pixels(torch.from_numpy(pixels)[None], tokens)[0].numpy()
        assert ours.shape == (tokens, tokens) and np.array_equal(ours, theirs)


def test_the_ingress_imports_no_torch():
    """The API's ingress replica parses, validates and forwards; torch would add ~1 s and ~180 MB to it."""
    import subprocess
    import sys

    probe = ("import sys; import serve.api, serve.images, serve.streaming, serve.responses; "
             "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]")
    subprocess.run([sys.executable, "-c", probe], check=True)


@pytest.mark.parametrize("image, mask, param", [
    (b"junk", None, "image"),
    (None, b"junk", "mask"),
    (None, "small", "mask"),
    ("big", None, "image"),
])
def test_prepare_edit_refuses_bad_uploads(image, mask, param):
    ok = _png(Image.new("RGB", (32, 32)))
    image = {None: ok, "big": _png(Image.new("1", (200, 200)))}.get(image, image)
    mask = {"small": _png(Image.new("RGBA", (16, 32)))}.get(mask, mask)
    with pytest.raises(UploadError) as err:
        prepare_edit(image, mask, {"lo": 64}, 8, max_pixels=100 * 100)
    assert err.value.param == param


def test_uploads_decode_as_the_library_decodes_them():
    """16-bit grey is scaled (not clipped to white), EXIF orientation is applied (a mask drawn on the
    photo as shown fits it), and bytes a codec chokes on in any way are a 400's UploadError."""
    import io

    from muse.data.images import decode_image

    grey = Image.fromarray(np.full((64, 64), 32768, dtype=np.uint16))
    edit = prepare_edit(_png(grey), None, {"lo": 64}, 8, max_pixels=10**6)
    assert tuple(edit.images["lo"][10, 10]) == (128, 128, 128)

    photo = Image.new("RGB", (64, 32), (255, 0, 0))
    photo.paste((0, 0, 255), (32, 0, 64, 32))  # stored: red left, blue right; shown a quarter turn on
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", exif=exif)
    shown = decode_image(buf.getvalue())
    assert shown.size == (32, 64)
    mask = Image.new("RGBA", shown.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 16, 32, 24))  # the top quarter of the centre square
    edit = prepare_edit(buf.getvalue(), _png(mask), {"lo": 64}, 8, max_pixels=10**6)
    top, bottom = edit.images["lo"][2, 32], edit.images["lo"][61, 32]
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red above blue, as shown
    assert edit.regenerate[:2].all() and not edit.regenerate[2:].any()

    im = io.BytesIO()
    Image.new("RGB", (16, 16)).save(im, format="IM")  # Pillow raises TypeError on this header
    hostile = im.getvalue().replace(b"Image size (x*y): 16*16", b"Image size (x*y): 1.*16")
    with pytest.raises(UploadError, match="not a readable image") as err:
        prepare_edit(hostile, None, {"lo": 64}, 8, max_pixels=10**6)
    assert err.value.param == "image"


def test_previews_grey_out_undecided_tokens():
    ids = torch.tensor([[[3, 512], [512, 7]]])
    filled, masked = fill_masked(ids, 512)
    assert filled.tolist() == [[[3, 0], [0, 7]]] and masked.tolist() == [[[False, True], [True, False]]]
    # aMUSEd's [MASK] is 8255 with 8192 codes: every id past the codebook is undecided.
    filled, masked = fill_masked(torch.tensor([[[8191, 8255], [8192, 0]]]), 8192)
    assert filled.tolist() == [[[8191, 0], [0, 0]]] and masked.tolist() == [[[False, True], [True, False]]]
    images = torch.full((1, 3, 16, 16), 0.5)
    out = grey_out(images, masked)
    assert (out[:, :, :8, 8:] == 0).all() and (out[:, :, 8:, :8] == 0).all()
    assert (out[:, :, :8, :8] == 0.5).all() and (out[:, :, 8:, 8:] == 0.5).all()


async def _models(key: str | None, header: dict) -> int:
    from serve.api import build_fastapi

    transport = httpx.ASGITransport(app=build_fastapi(fake_ingress(key)))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return (await client.get("/v1/models", headers=header)).status_code


def test_api_is_open_without_a_key_and_closed_with_one():
    import asyncio

    assert asyncio.run(_models(None, {})) == 200
    assert asyncio.run(_models("s3cret", {})) == 401
    assert asyncio.run(_models("s3cret", {"Authorization": "Bearer s3cret"})) == 200
    assert asyncio.run(_models("s3cret", {"Authorization": "bearer s3cret"})) == 200  # the scheme's case is free
    assert asyncio.run(_models("s3cret", {"Authorization": "Bearer s3cre"})) == 401
    assert asyncio.run(_models("s3cret", {"Authorization": "Basic s3cret"})) == 401


def test_browser_pages_of_the_origins_allowed_may_call_the_api_and_no_others():
    """A preflight needs no API key and is answered for allowed origins only; the API's answers (a 401 and
    a 429 included) carry the headers a browser needs to read them, and expose Retry-After."""
    import asyncio

    from serve.api import build_fastapi
    from serve.config import AppArgs

    page, elsewhere = "https://app.example.com", "https://evil.example.com"
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type,x-stainless-lang"}

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.options("/v1/images/generations", headers={"Origin": page} | preflight),
                await client.options("/v1/images/generations", headers={"Origin": elsewhere} | preflight),
                await client.get("/v1/models", headers={"Origin": page}),
                await client.get("/v1/models", headers={"Origin": page, "Authorization": "Bearer s3cret"}),
                await client.post("/v1/images/generations", json={"prompt": "a red circle"},
                                  headers={"Origin": page, "Authorization": "Bearer s3cret"})]

    ing = fake_ingress("s3cret")
    ing.args = AppArgs(checkpoint="unused", api_key="s3cret", cors={"allow_origins": [page]})
    ing.limits = ing.args.limits.model_copy(update={"max_in_flight": 1})
    release = None

    async def held(*_):  # one request in flight, so the next is a 429
        await release.wait()
        raise APIError(503, "the server is at capacity; retry shortly", type="server_error", code="overloaded")

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        nonlocal release
        release = asyncio.Event()
        transport = httpx.ASGITransport(app=build_fastapi(ing))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            first = asyncio.create_task(client.post("/v1/images/generations", json={"prompt": "a"},
                                                    headers={"Authorization": "Bearer s3cret"}))
            await asyncio.sleep(0.2)
            answers = await calls(client)
            release.set()
            assert (await first).status_code == 503
            return answers

    ing.generate = held
    ok, refused, no_key, listed, busy = asyncio.run(run())
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == page
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert refused.status_code == 400 and "access-control-allow-origin" not in refused.headers
    assert no_key.status_code == 401 and no_key.headers["access-control-allow-origin"] == page
    assert listed.status_code == 200 and listed.headers["access-control-allow-origin"] == page
    assert busy.status_code == 429 and busy.headers["access-control-allow-origin"] == page
    assert "retry-after" in busy.headers["access-control-expose-headers"].lower()

    # Without allowed origins (the default) a preflight is refused and no CORS header is sent.
    async def default() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=build_fastapi(fake_ingress(None)))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return [await client.options("/v1/images/generations", headers={"Origin": page} | preflight),
                    await client.get("/v1/models", headers={"Origin": page})]

    options, models = asyncio.run(default())
    assert options.status_code == 405 and models.status_code == 200
    assert not any(h.startswith("access-control-") for h in [*options.headers, *models.headers])


def test_an_overloaded_server_says_when_to_retry():
    import asyncio

    from serve.api import build_fastapi

    async def overloaded(*_):
        raise APIError(503, "the server is at capacity; retry shortly", type="server_error", code="overloaded")

    ing = fake_ingress(None)
    ing.generate = overloaded

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi(ing))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/images/generations", json={"prompt": "a red circle"})

    r = asyncio.run(post())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "overloaded"


def test_numbers_no_field_can_hold_are_a_400_naming_the_field():
    """A 5,000-digit integer in a form (past Python's int() limit), NaN guidance in JSON."""
    import asyncio

    from serve.api import build_fastapi

    png = io.BytesIO()
    Image.new("RGBA", (64, 64)).save(png, "PNG")

    async def post() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=build_fastapi(fake_ingress(None)))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            edits = [await client.post("/v1/images/edits", files={"image": ("i.png", png.getvalue())},
                                       data={"prompt": "a red circle", field: "9" * 5000})
                     for field in ("n", "seed")]
            guidance = await client.post("/v1/images/generations", content=b'{"prompt": "x", "guidance_scale": NaN}',
                                         headers={"Content-Type": "application/json"})
            return [*edits, guidance]

    for r, field, said in zip(asyncio.run(post()), ("n", "seed", "guidance_scale"),
                              ("at most 30 digits", "at most 30 digits", "finite number")):
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
        assert said in r.json()["error"]["message"] and len(r.text) < 500, r.text


def test_build_app_reads_the_key_from_the_environment(tmp_path, monkeypatch):
    from muse.checkpoint import init_model_root
    from serve.app import build_app

    with pytest.raises(ValueError, match="lacks"):
        build_app(AppArgs(checkpoint=str(tmp_path / "empty")))
    root = str(tmp_path / "root")
    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo", "base"))
    monkeypatch.setenv("MUSE_API_KEY", "from-env")
    app = build_app({"checkpoint": root})
    ingress = app._bound_deployment
    assert ingress.name == "Ingress"
    text, base, superres, decoder, args = ingress.init_args
    assert superres is None  # no super-res stage in this root: only the base size is served
    assert args.api_key == "from-env"
    weights = os.path.join(root, "base", "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) - 100)  # cut short: every Base replica would fail on it
    with pytest.raises(ValueError, match="base: .*model.safetensors is cut short"):
        build_app({"checkpoint": root})


def test_deployments_load_their_models_from_s3(s3_bucket, tmp_path):
    """Each deployment class loads its component from an s3:// model root (a local S3 server): the
    same images as the library makes from the same root written locally."""
    from muse.checkpoint import init_model_root
    from muse.pipeline import MusePipeline
    from serve.config import Batching
    from serve.deployments import BaseGenerator, Decode, Decoder, TextEncoder

    root, local = f"{s3_bucket}/models/tiny", str(tmp_path / "tiny")
    for where in (root, local):
        init_model_root("tiny", where, components=("text_encoder", "vqgan_lo", "base"))
    text, base, decoder = TextEncoder(root), BaseGenerator(root, "cpu", Batching(), 4.5, 2), Decoder(root)
    tokens = asyncio.run(base.generate(text.encode("a red circle"), Decode(1, 2, 1.0, 0)))
    (png,) = decoder.decode(tokens, "lo")
    assert Image.open(io.BytesIO(png)).size == (64, 64) and set(decoder.vqgans) == {"lo"}
    want = MusePipeline.from_pretrained(local)("a red circle", steps=2, guidance_scale=1.0, seed=0,
                                               choice_temperature=4.5, output="tokens")
    assert torch.equal(tokens.ids, want)


def test_health_check_fails_on_a_stalled_decode_and_passes_again_after_it(tmp_path):
    from muse.checkpoint import init_model_root
    from serve.config import Batching
    from serve.deployments import BaseGenerator

    root = str(tmp_path / "root")
    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo", "base"))
    base = BaseGenerator(root, "cpu", Batching(), 4.5, 2, stuck_after_s=5.0)
    sched = base.scheduler
    base.check_health()  # idle
    sched.active.append(object())  # a task in flight
    base.check_health()  # just started
    sched.last_progress -= 6.0  # no step finished for 6 s
    with pytest.raises(RuntimeError, match="no step finished"):
        base.check_health()
    sched.last_progress = time.monotonic()  # a step finishes
    base.check_health()
    sched.active.clear()
    sched.last_progress -= 60.0
    base.check_health()  # nothing in flight: idle is not stuck


class _RefusedStream:
    """A deployment stream that Serve refuses (its queue is full) when first iterated."""

    def __aiter__(self):
        return self

    async def __anext__(self):
        from ray.serve.exceptions import BackPressureError

        raise BackPressureError(num_queued_requests=9, max_queued_requests=8)

    def cancel(self):
        pass


def test_a_stream_that_cannot_be_admitted_gets_a_503_before_any_event(monkeypatch):
    import asyncio

    import serve.chain
    from serve.api import Ingress, build_fastapi

    async def finished(response):  # the text encoding, done at once
        pass

    monkeypatch.setattr(serve.chain, "finished", finished)
    ing = fake_ingress(None)
    call = types.SimpleNamespace(remote=lambda *a: None)
    ing.text = types.SimpleNamespace(encode=call)
    ing.base = types.SimpleNamespace(options=lambda **_: types.SimpleNamespace(
        stream=types.SimpleNamespace(remote=lambda *a: _RefusedStream())))
    ing.superres = ing.decoder = None
    ing.decodes = lambda *a, **k: Ingress.decodes(ing, *a, **k)

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi(ing))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/images/generations", json={"prompt": "a red circle", "stream": True})

    r = asyncio.run(post())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.headers["content-type"].startswith("application/json") and r.json()["error"]["code"] == "overloaded"


def test_a_stream_failing_after_its_headers_is_coded_as_a_plain_response_would_be():
    """At capacity mid-stream (super-res refusing what base finished) is `overloaded`, as the 503 of a
    plain request is, not a generic server error; a model failure stays `model_error`."""
    from ray.serve.exceptions import BackPressureError

    from serve.streaming import stream_failure

    assert stream_failure(BackPressureError(num_queued_requests=8, max_queued_requests=8)).code == "overloaded"
    assert stream_failure(ValueError("bad tokens")).code == "model_error"
