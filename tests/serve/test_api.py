"""The images API over real HTTP on loopback, against a running Serve app with a tiny random model:
both sizes, URLs, reproducibility against the one-process pipeline, batching across callers,
streaming, edits, and the official `openai` client."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from serve_helpers import APP, TEST_ARGS, assert_same_image, pil_array, png_array

from muse.checkpoint import component_uri
from muse.data.images import to_uint8_array
from muse.tokenizer import load_tokenizer

STEPS = TEST_ARGS["sampling"]["steps"]
SR_STEPS = TEST_ARGS["sampling"]["superres_steps"]


def test_models_advertises_the_sizes_the_model_produces(muse_app):
    body = muse_app.client.get("/v1/models").json()
    model = body["data"][0]
    assert body["object"] == "list" and model["id"] == "muse"
    assert set(model["sizes"]) == {"64x64", "128x128", "256x256", "512x512", "1024x1024"}
    assert model["sizes"]["256x256"] == "base, drawn at 64x64 and resampled"
    assert model["default_size"] == "64x64"


def test_health_and_page(muse_app):
    assert httpx.get(muse_app.url + "/healthz").json() == {"status": "ok"}
    page = httpx.get(muse_app.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "Muse on Ray" in page.text and "v1/images/generations" in page.text


def test_the_ingress_logs_a_line_per_request_and_no_router_internals(muse_app):
    """The ingress replica's log (what `muse serve` shows) has its access line per request, and not
    Serve's "Started <...LongPollClient object at 0x...>" from its first request."""
    import glob
    import os

    import ray

    logs = ray._private.worker._global_node.get_logs_dir_path()

    def ingress_log() -> str:  # the whole session's: earlier tests' requests are in it too
        return "".join(open(f).read() for f in glob.glob(os.path.join(logs, "serve", "replica_*Ingress*.log")))

    def access_lines() -> int:
        return sum("POST /v1/images/generations 200" in line for line in ingress_log().splitlines())

    before = access_lines()
    assert muse_app.generate(prompt="a red circle", size="64x64", response_format="b64_json").status_code == 200
    deadline = time.monotonic() + 10  # the replica may write its line just after answering
    while access_lines() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert access_lines() == before + 1
    assert "Started <" not in ingress_log()


def resampled(image: Image.Image, side: int) -> np.ndarray:
    """The pipeline's image as the API returns it at `side` (bicubic, when the stage draws another size)."""
    return pil_array(image if image.size == (side, side) else image.resize((side, side), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("size, side", [("64x64", 64), ("256x256", 256), ("128x128", 128), ("512x512", 512)])
def test_generation_at_both_sizes_matches_the_pipeline(muse_app, pipe, size, side):
    r = muse_app.generate(prompt="a red circle", size=size, n=2, seed=5, response_format="b64_json")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["size"] == f"{side}x{side}" and len(body["data"]) == 2
    assert [(d["seed"], d["index"]) for d in body["data"]] == [(5, 0), (5, 1)]
    images = [png_array(d["b64_json"]) for d in body["data"]]
    assert all(img.shape == (side, side, 3) for img in images)
    expected = pipe("a red circle", num_images=2, steps=STEPS, superres_steps=SR_STEPS, seed=5,
                    superres=size in ("128x128", "512x512"))
    for got, want in zip(images, expected):
        assert_same_image(got, resampled(want, side))
    assert not np.array_equal(images[0], images[1])


def test_url_response_can_be_fetched(muse_app):
    r = muse_app.generate(prompt="a blue square", size="512x512", seed=1, response_format="url")
    assert r.status_code == 200, r.text
    url = r.json()["data"][0]["url"]
    assert url.startswith(muse_app.url + "/v1/files/") and url.endswith(".png")
    fetched = httpx.get(url)  # no API key needed: the URL is the credential
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert png_array(fetched.content).shape == (512, 512, 3)
    max_age = int(fetched.headers["cache-control"].rsplit("=", 1)[1])
    assert 0 < max_age <= 3600  # cached until the file expires (files.ttl_s), no longer
    assert httpx.get(url.replace(".png", ".jpeg")).status_code == 404  # served only as what it is
    missing = httpx.get(muse_app.url + "/v1/files/9999999999-" + "0" * 32 + ".png")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert "or the server restarted since it was made" in missing.json()["error"]["message"]  # in-memory links


def test_negative_prompt_and_guidance_follow_the_pipeline(muse_app, pipe):
    r = muse_app.generate(prompt="a green triangle", negative_prompt="blurry", guidance_scale=2.5, steps=4,
                          seed=9, response_format="b64_json")
    assert r.status_code == 200, r.text
    want = pipe("a green triangle", negative_prompt="blurry", guidance_scale=2.5, steps=4, seed=9, superres=False)
    assert_same_image(png_array(r.json()["data"][0]["b64_json"]), pil_array(want[0]))


def test_requests_from_different_callers_share_a_batch_and_keep_their_own_images(muse_app, pipe):
    from ray import serve

    base = serve.get_deployment_handle("BaseGenerator", app_name=APP)
    before = base.stats.remote().result()["batch_sizes"]
    # Mixed seeds, step counts, guidance and n: each must come out as if it ran alone.
    requests = [dict(prompt=f"shape {i}", seed=100 + i, steps=STEPS if i % 2 else 4, guidance_scale=float(i % 3),
                     n=1 + i % 2, response_format="b64_json", size="64x64") for i in range(6)]
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda body: muse_app.generate(**body), requests))
    after = base.stats.remote().result()["batch_sizes"]
    new_batches = {int(k): v - before.get(k, 0) for k, v in after.items() if v > before.get(k, 0)}
    assert max(new_batches) > 1, f"no batch held more than one request: {new_batches}"
    for body, r in zip(requests, responses):
        assert r.status_code == 200, r.text
        want = pipe(body["prompt"], num_images=body["n"], steps=body["steps"], guidance_scale=body["guidance_scale"],
                    seed=body["seed"], superres=False)
        for got, img in zip(r.json()["data"], want):
            assert_same_image(png_array(got["b64_json"]), pil_array(img))


def _events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            events.append((name, json.loads(line[len("data: "):])))
    return events


def test_stream_sends_previews_then_the_final_image(muse_app):
    body = dict(prompt="a yellow star", size="128x128", seed=3, stream=True, n=2, partial_images=3)
    with muse_app.client.stream("POST", "/v1/images/generations", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    kinds = [name for name, _ in events]
    assert kinds[-2:] == ["image_generation.completed"] * 2, kinds
    partial = [data for name, data in events if name == "image_generation.partial_image"]
    # preview_every=2: base steps 2, 4 (of 6), super-res step 2 (of 3); one preview per image each.
    assert [(p["stage"], p["step"]) for p in partial if p["index"] == 0] == [("base", 2), ("base", 4), ("superres", 2)]
    assert [p["partial_image_index"] for p in partial if p["index"] == 0] == [0, 1, 2]
    # Previews come at the size asked for, base-stage ones resampled from 64 px.
    assert png_array(partial[0]["b64_json"]).shape == (128, 128, 3)
    assert png_array(partial[-1]["b64_json"]).shape == (128, 128, 3)
    # The streamed final image is the same as the non-streamed one for the same request.
    plain = muse_app.generate(**{**body, "stream": False, "response_format": "b64_json"}).json()
    finals = sorted((data for name, data in events if name == "image_generation.completed"), key=lambda d: d["index"])
    for final, ref in zip(finals, plain["data"]):
        assert_same_image(png_array(final["b64_json"]), png_array(ref["b64_json"]))
    # Each completed event's usage is its image's: together they are the request's, counted once.
    for key in ("input_tokens", "output_tokens"):
        assert sum(f["usage"][key] for f in finals) == plain["usage"][key]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _picture(size: int = 96, seed: int = 0) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(size, size, 3) * 255).astype(np.uint8))


def test_inpainting_with_a_mask_matches_the_pipeline(muse_app, pipe):
    image = _picture()
    mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (10, 20, 60, 50))  # transparent = regenerate
    r = muse_app.client.post("/v1/images/edits", files={"image": ("i.png", _png(image)), "mask": ("m.png", _png(mask))},
                             data={"prompt": "a purple circle", "size": "128x128", "n": "2", "seed": "4",
                                   "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    regen = np.zeros((96, 96), bool)
    regen[20:50, 10:60] = True
    want = pipe.inpaint(image, regen, "a purple circle", num_images=2, steps=STEPS, superres_steps=SR_STEPS, seed=4)
    for got, img in zip(r.json()["data"], want):
        assert_same_image(png_array(got["b64_json"]), pil_array(img))


def test_keep_pixels_serves_the_pipelines_image_with_the_input_outside_the_mask(muse_app, pipe):
    """`keep_pixels`: the served edit equals the library's, plain and streamed, and only edits with a
    mask take it."""
    image = _picture()
    mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (10, 20, 60, 50))
    upload = {"image": ("i.png", _png(image)), "mask": ("m.png", _png(mask))}
    fields = {"prompt": "a purple circle", "size": "128x128", "seed": "4", "keep_pixels": "true",
              "response_format": "b64_json"}
    r = muse_app.client.post("/v1/images/edits", files=upload, data=fields)
    assert r.status_code == 200, r.text
    regen = np.zeros((96, 96), bool)
    regen[20:50, 10:60] = True
    want = pil_array(pipe.inpaint(image, regen, "a purple circle", steps=STEPS, superres_steps=SR_STEPS, seed=4,
                                  keep_pixels=True)[0])
    got = png_array(r.json()["data"][0]["b64_json"])
    assert_same_image(got, want)
    source = to_uint8_array(image, 128).astype(np.int16)  # the input as the model sees it
    assert np.abs(got[80:].astype(np.int16) - source[80:]).max() <= 2  # below the mask (and its band): the input
    with muse_app.client.stream("POST", "/v1/images/edits", files=upload, data={**fields, "stream": "true"}) as r:
        events = _events(r)
    final = [d for name, d in events if name == "image_edit.completed"]
    assert len(final) == 1 and np.array_equal(png_array(final[0]["b64_json"]), got)
    r = muse_app.generate(prompt="x", keep_pixels=True)
    assert r.status_code == 400 and r.json()["error"]["param"] == "keep_pixels", r.text


def test_transparent_canvas_outpaints_and_opaque_image_is_edited_mask_free(muse_app, pipe):
    canvas = Image.new("RGBA", (96, 96), (0, 0, 0, 0))
    canvas.paste(_picture(48, seed=1), (24, 24))  # the picture in the middle of a transparent canvas
    r = muse_app.client.post("/v1/images/edits", files={"image": ("c.png", _png(canvas))},
                             data={"prompt": "a landscape", "size": "64x64", "seed": "2",
                                   "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    new = np.ones((96, 96), bool)
    new[24:72, 24:72] = False
    want = pipe.inpaint(canvas, new, "a landscape", steps=STEPS, seed=2, superres=False)
    assert_same_image(png_array(r.json()["data"][0]["b64_json"]), pil_array(want[0]))

    opaque = _picture(seed=3)
    r = muse_app.client.post("/v1/images/edits", files={"image": ("o.png", _png(opaque))},
                             data={"prompt": "make it blue", "size": "128x128", "seed": "8", "steps": "5",
                                   "response_format": "b64_json"})
    assert r.status_code == 200, r.text
    want = pipe.edit(opaque, "make it blue", iterations=5, superres_steps=SR_STEPS, seed=8)
    assert_same_image(png_array(r.json()["data"][0]["b64_json"]), pil_array(want[0]))


def test_edits_stream_previews_then_the_edited_images(muse_app, pipe):
    """Streamed edits, as OpenAI's `image_edit.*` events: an inpainting streams previews from both
    stages and ends with the same images as the plain request; a mask-free edit's previews come from
    super-res alone."""
    image = _picture()
    mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (10, 20, 60, 50))
    fields = {"prompt": "a purple circle", "size": "128x128", "n": "2", "seed": "4", "stream": "true",
              "partial_images": "3"}
    upload = {"image": ("i.png", _png(image)), "mask": ("m.png", _png(mask))}
    with muse_app.client.stream("POST", "/v1/images/edits", files=upload, data=fields) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = _events(r)
    assert {name for name, _ in events} == {"image_edit.partial_image", "image_edit.completed"}, events[-1]
    partial = [d for name, d in events if name == "image_edit.partial_image" and d["index"] == 0]
    assert [p["partial_image_index"] for p in partial] == [0, 1, 2] and partial[-1]["stage"] == "superres"
    assert partial[0]["stage"] == "base" and png_array(partial[0]["b64_json"]).shape == (128, 128, 3)
    regen = np.zeros((96, 96), bool)
    regen[20:50, 10:60] = True
    want = pipe.inpaint(image, regen, "a purple circle", num_images=2, steps=STEPS, superres_steps=SR_STEPS, seed=4)
    finals = sorted((d for name, d in events if name == "image_edit.completed"), key=lambda d: d["index"])
    for final, img in zip(finals, want, strict=True):
        assert_same_image(png_array(final["b64_json"]), pil_array(img))
    plain = muse_app.client.post("/v1/images/edits", files=upload, data={**fields, "stream": "false"}).json()
    for key in ("input_tokens", "output_tokens"):
        assert sum(f["usage"][key] for f in finals) == plain["usage"][key]

    opaque = _picture(seed=3)
    with muse_app.client.stream("POST", "/v1/images/edits", files={"image": ("o.png", _png(opaque))},
                                data={"prompt": "make it blue", "size": "128x128", "seed": "8", "steps": "5",
                                      "stream": "true", "partial_images": "3"}) as r:
        assert r.status_code == 200, r.read()
        events = _events(r)
    assert {d["stage"] for name, d in events if name == "image_edit.partial_image"} == {"superres"}
    want = pipe.edit(opaque, "make it blue", iterations=5, superres_steps=SR_STEPS, seed=8)
    assert_same_image(png_array(events[-1][1]["b64_json"]), pil_array(want[0]))
    bad = muse_app.client.post("/v1/images/edits", files=upload, data={**fields, "stream": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "stream"


def test_official_openai_client(muse_app, pipe):
    import openai

    client = openai.OpenAI(base_url=muse_app.url + "/v1", api_key=muse_app.key, max_retries=0, timeout=120)
    result = client.images.generate(prompt="a red circle", size="512x512", n=2, response_format="b64_json",
                                    extra_body={"seed": 5})
    assert len(result.data) == 2
    want = pipe("a red circle", num_images=2, steps=STEPS, superres_steps=SR_STEPS, seed=5)
    assert_same_image(png_array(result.data[1].b64_json), resampled(want[1], 512))

    by_url = client.images.generate(prompt="a red circle", size="256x256", model="dall-e-2")  # DALL-E's default
    assert png_array(httpx.get(by_url.data[0].url).content).shape == (256, 256, 3)
    plain = client.images.generate(prompt="a red circle", size="1024x1024", safety_identifier="user-1")
    assert png_array(base64.b64decode(plain.data[0].b64_json)).shape == (1024, 1024, 3)  # as OpenAI's own example reads it

    image = _picture()
    mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 48, 96))
    edited = client.images.edit(image=("image.png", _png(image), "image/png"),
                                mask=("mask.png", _png(mask), "image/png"),
                                prompt="a tree", size="256x256", response_format="b64_json", extra_body={"seed": 1})
    regen = np.zeros((96, 96), bool)
    regen[:, :48] = True
    want = pipe.inpaint(image, regen, "a tree", steps=STEPS, seed=1, superres=False)
    assert_same_image(png_array(edited.data[0].b64_json), resampled(want[0], 256))

    streamed = list(client.images.edit(image=("image.png", _png(image), "image/png"),
                                       mask=("mask.png", _png(mask), "image/png"), prompt="a tree", size="256x256",
                                       stream=True, partial_images=1, extra_body={"seed": 1}))
    assert [e.type for e in streamed] == ["image_edit.partial_image", "image_edit.completed"]
    assert_same_image(png_array(streamed[-1].b64_json), resampled(want[0], 256))

    # No partial_images: no previews, as OpenAI's default (0).
    events = list(client.images.generate(prompt="a red circle", size="64x64", stream=True, extra_body={"seed": 5}))
    assert [e.type for e in events] == ["image_generation.completed"]
    assert_same_image(png_array(events[-1].b64_json),
                                  pil_array(pipe("a red circle", steps=STEPS, seed=5, superres=False)[0]))

    with pytest.raises(openai.BadRequestError) as err:
        client.images.generate(prompt="x", size="1536x1024")
    assert err.value.body["param"] == "size"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=muse_app.url + "/v1", api_key="wrong", max_retries=0).images.generate(prompt="x")


def test_a_stream_whose_client_leaves_stops_decoding(muse_app):
    import time

    from ray import serve

    base = serve.get_deployment_handle("BaseGenerator", app_name=APP)
    before = base.stats.remote().result()["streams"]
    # 64 tokens: 64 steps run, a preview every 2; 3 of those 31 are sent, the first after step 20.
    body = dict(prompt="a long decode", size="64x64", seed=1, stream=True, steps=100, partial_images=3)
    with muse_app.client.stream("POST", "/v1/images/generations", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert (event["step"], event["steps"]) == (20, 64)  # the steps that run, not the 100 asked
                break  # leave after the first preview, 44 steps early
    deadline = time.monotonic() + 30
    while (after := base.stats.remote().result()["streams"]).get("stopped", 0) == before.get("stopped", 0):
        assert time.monotonic() < deadline, f"the base stream was not stopped: {after}"
        time.sleep(0.2)
    assert after.get("completed", 0) == before.get("completed", 0)


def test_openai_clients_as_they_really_call(muse_app, pipe):
    """size "auto", explicit nulls, a lower-case bearer, usage, partial_images, jpeg/webp, image[]."""
    import openai

    client = openai.OpenAI(base_url=muse_app.url + "/v1", api_key=muse_app.key, max_retries=0, timeout=120)
    auto = client.images.generate(prompt="a red circle", size="auto", response_format="b64_json",
                                  extra_body={"seed": 2})
    assert png_array(auto.data[0].b64_json).shape == (64, 64, 3)
    # input: the prompt in the root's tokenizer (ByT5 here: 12 bytes and the end token), not its bytes
    tokenizer, _ = load_tokenizer(component_uri(muse_app.root, "text_encoder"))
    assert auto.usage.output_tokens == 64 and auto.usage.input_tokens == len(tokenizer("a red circle")["input_ids"]) == 13

    nulls = dict(prompt="a red circle", n=None, size=None, seed=2, steps=None, response_format="b64_json",
                 negative_prompt=None, output_format=None, stream=None, partial_images=None)
    r = httpx.post(muse_app.url + "/v1/images/generations", json=nulls,
                   headers={"Authorization": f"bearer {muse_app.key}"}, timeout=120)  # lower-case scheme
    assert r.status_code == 200, r.text
    assert_same_image(png_array(r.json()["data"][0]["b64_json"]), png_array(auto.data[0].b64_json))

    events = list(client.images.generate(prompt="a red circle", size="128x128", stream=True, partial_images=1,
                                         extra_body={"seed": 5}))
    assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert events[-1].usage.output_tokens == 64 + 256  # base and super-res grids

    jpeg = client.images.generate(prompt="a red circle", size="512x512", output_format="jpeg",
                                  response_format="b64_json", extra_body={"seed": 2, "output_compression": 90})
    import base64

    picture = Image.open(io.BytesIO(base64.b64decode(jpeg.data[0].b64_json)))
    assert picture.format == "JPEG" and picture.size == (512, 512)

    image = _picture()
    two = [("image[]", ("a.png", _png(image), "image/png")), ("image[]", ("b.png", _png(image), "image/png"))]
    r = muse_app.client.post("/v1/images/edits", files=two, data={"prompt": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "image"
    edited = client.images.edit(image=[("image.png", _png(image), "image/png")], prompt="make it blue",
                                size="64x64", response_format="b64_json", output_format="webp",
                                extra_body={"seed": 3, "steps": 2})
    assert Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).format == "WEBP"
    opaque_mask = Image.new("RGBA", image.size, (0, 0, 0, 255))
    r = muse_app.client.post("/v1/images/edits", files={"image": ("i.png", _png(image), "image/png"),
                                                        "mask": ("m.png", _png(opaque_mask), "image/png")},
                             data={"prompt": "x"})
    assert r.status_code == 400 and "no transparent pixels" in r.json()["error"]["message"]


def test_stopping_on_a_joined_cluster_deletes_only_its_own_app(muse_app):
    """`muse serve` joined to a cluster (RAY_ADDRESS or `ray start`) takes down its app alone: the
    cluster's other apps, its HTTP proxy and Ray stay up."""
    import ray
    from ray import serve

    from serve.cli import stop_serving

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Other:
        def __call__(self, request) -> str:
            return "still here"

    serve.run(Other.bind(), name="other-team", route_prefix="/other-team", blocking=False)
    assert "other-team" in serve.status().applications
    stop_serving("other-team", local=False)
    assert "other-team" not in serve.status().applications and ray.is_initialized()
    assert muse_app.client.get("/healthz").status_code == 200


def test_the_running_ingress_sees_the_drain_board_and_takes_requests_again_when_it_goes(muse_app):
    """The drain `muse serve` does on stopping, against the real app: once the board is up, the ingress
    replica reports and answers 503 shutting_down (and /healthz 503); with the board gone it serves again."""
    import ray

    from serve import draining

    board, left = draining.drain(APP, 30)
    try:
        assert left == 0 and list(ray.get(board.reports.remote()).values()) == [0]  # one replica, idle
        r = muse_app.client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", r.text
        health = muse_app.client.get("/healthz")  # a load balancer stops sending here
        assert health.status_code == 503 and health.json() == {"status": "draining"}
    finally:
        ray.kill(board)
    deadline = time.monotonic() + 10
    while (r := muse_app.client.post("/v1/images/generations", json={"prompt": "a red circle", "steps": 1,
                                                                      "superres_steps": 1})).status_code == 503:
        assert time.monotonic() < deadline, r.text
        time.sleep(0.2)
    assert r.status_code == 200, r.text


def test_stopping_lets_the_requests_in_flight_finish(muse_app, monkeypatch):
    """`muse serve` stopped by Ctrl-C or SIGTERM deletes its app before Ray goes: each replica finishes
    the requests it holds (graceful_shutdown_timeout_s) instead of dropping their connections."""
    import asyncio

    import ray
    from ray import serve

    from serve.cli import stop_serving

    @serve.deployment(ray_actor_options={"num_cpus": 0}, graceful_shutdown_timeout_s=60)
    class Slow:
        async def __call__(self, request) -> str:
            await asyncio.sleep(4)
            return "finished"

    serve.run(Slow.bind(), name="slow", route_prefix="/slow", blocking=False)
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(httpx.get, muse_app.url + "/slow", timeout=60)
        time.sleep(1.5)  # in flight
        stop_serving("slow", local=False)
        r = answer.result()
    assert r.status_code == 200 and r.text == "finished"
    assert "slow" not in serve.status().applications

    # On a Ray of its own, the ingress drains, then the app is deleted, then Ray shuts down.
    from serve import cli as serve_cli

    order = []
    monkeypatch.setattr(serve_cli, "drain_ingress", lambda name, seconds: order.append(("drain", name, seconds)))
    monkeypatch.setattr(serve, "delete", lambda name: order.append(("delete", name)))
    monkeypatch.setattr(ray, "shutdown", lambda: order.append(("shutdown",)))
    stop_serving("muse", local=True, drain_s=120)
    assert order == [("drain", "muse", 120), ("delete", "muse"), ("shutdown",)]
    # Stopped at once (a second Ctrl-C while the models loaded): nothing was served, nothing to drain.
    order.clear()
    stop_serving("muse", local=True, at_once=True)
    assert order == [("shutdown",)]
    stop_serving("muse", local=False, at_once=True)  # on a cluster it joined: its app goes, not Ray
    assert order == [("shutdown",), ("delete", "muse")]
