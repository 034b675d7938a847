"""Every bad request gets a 400/401/413 in OpenAI's error shape, quickly: never a 500 or a hang."""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from serve_helpers import TEST_ARGS

LIMIT = TEST_ARGS["limits"]["max_body_bytes"]
FAST = 30  # seconds; a bad request is refused before any model runs


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param, error
    return error


GOOD = {"prompt": "a red circle", "size": "64x64"}


@pytest.mark.parametrize("body, param", [
    ({"size": "64x64"}, "prompt"),  # missing
    ({**GOOD, "prompt": ""}, "prompt"),
    ({**GOOD, "prompt": "   "}, "prompt"),
    ({**GOOD, "prompt": "x" * 201}, "prompt"),  # over max_prompt_chars
    ({**GOOD, "prompt": 5}, "prompt"),
    ({**GOOD, "negative_prompt": "x" * 201}, "negative_prompt"),
    ({**GOOD, "n": 0}, "n"),
    ({**GOOD, "n": 5}, "n"),  # over max_images
    ({**GOOD, "n": "many"}, "n"),
    ({**GOOD, "size": "100x100"}, "size"),
    ({**GOOD, "size": "2048x2048"}, "size"),
    ({**GOOD, "size": "big"}, "size"),
    ({**GOOD, "steps": 0}, "steps"),
    ({**GOOD, "steps": 101}, "steps"),  # over max_steps
    ({**GOOD, "steps": 2.5}, "steps"),
    ({**GOOD, "n": "2"}, "n"),  # a number in a string: OpenAI's API refuses it too
    ({**GOOD, "seed": " 7"}, "seed"),
    ({**GOOD, "guidance_scale": "3"}, "guidance_scale"),
    ({**GOOD, "superres_steps": 0}, "superres_steps"),
    ({**GOOD, "guidance_scale": -1}, "guidance_scale"),
    ({**GOOD, "guidance_scale": 1e9}, "guidance_scale"),
    ({**GOOD, "seed": -1}, "seed"),
    ({**GOOD, "response_format": "jpeg"}, "response_format"),
    ({**GOOD, "stream": "sometimes"}, "stream"),
    ({**GOOD, "seeds": 3}, "seeds"),  # unknown field (a typo) is refused, not ignored
])
def test_bad_generation_requests(muse_app, body, param):
    _assert_error(muse_app.client.post("/v1/images/generations", json=body, timeout=FAST), 400, param)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"a string"', b""])
def test_malformed_bodies(muse_app, content):
    r = muse_app.client.post("/v1/images/generations", content=content, timeout=FAST,
                             headers={"Content-Type": "application/json"})
    _assert_error(r, 400)
    assert "None" not in r.json()["error"]["message"]  # an empty body is told what to send


def test_a_form_body_is_told_to_send_json(muse_app):
    """`curl -d hello` sends a form, not JSON: the message says what to send."""
    r = muse_app.client.post("/v1/images/generations", content=b"hello", timeout=FAST,
                             headers={"Content-Type": "application/x-www-form-urlencoded"})
    _assert_error(r, 400)
    assert "JSON object" in r.json()["error"]["message"]


def test_oversized_bodies_get_413(muse_app):
    big = b'{"prompt": "' + b"x" * LIMIT + b'"}'
    _assert_error(muse_app.client.post("/v1/images/generations", content=big, timeout=FAST,
                                       headers={"Content-Type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(LIMIT // 65536 + 2):
            yield b"x" * 65536

    _assert_error(muse_app.client.post("/v1/images/generations", content=chunks(), timeout=FAST,
                                       headers={"Content-Type": "application/json"}), 413)
    huge_image = {"image": ("i.png", b"\x89PNG" + b"\0" * LIMIT)}
    _assert_error(muse_app.client.post("/v1/images/edits", files=huge_image, data={"prompt": "x"}, timeout=FAST), 413)


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


IMAGE = _png(Image.new("RGB", (64, 64), (200, 10, 10)))


@pytest.mark.parametrize("files, data, param", [
    ({"image": ("i.png", b"definitely not an image")}, {"prompt": "x"}, "image"),
    ({"image": ("i.png", b"")}, {"prompt": "x"}, "image"),
    ({"image": ("i.png", IMAGE[:40])}, {"prompt": "x"}, "image"),  # truncated PNG
    ({"image": ("i.png", IMAGE), "mask": ("m.png", _png(Image.new("RGBA", (32, 64))))}, {"prompt": "x"}, "mask"),
    ({"image": ("i.png", IMAGE), "mask": ("m.png", b"nope")}, {"prompt": "x"}, "mask"),
    ({"image": ("i.png", IMAGE)}, {}, "prompt"),
    ({}, {"prompt": "x"}, "image"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "n": "0"}, "n"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "n": "two"}, "n"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "size": "300x300"}, "size"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "steps": "0"}, "steps"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "response_format": "gif"}, "response_format"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "stream": "sometimes"}, "stream"),
    ({"image": ("i.png", IMAGE), "prompt": ("p.txt", b"a red circle")}, {}, "prompt"),  # a file, not text
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "n": "0_2"}, "n"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "partial_images": "lots"}, "partial_images"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "partial_images": "7"}, "partial_images"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "keep_pixels": "yes"}, "keep_pixels"),
    ({"image": ("i.png", IMAGE)}, {"prompt": "x", "keep_pixels": "true"}, "keep_pixels"),  # no mask: nothing to keep
])
def test_bad_edit_requests(muse_app, files, data, param):
    _assert_error(muse_app.client.post("/v1/images/edits", files=files or None, data=data, timeout=FAST), 400, param)


def test_decompression_bomb_is_refused(muse_app):
    bomb = _png(Image.new("1", (5000, 5000)))  # tiny file, 25M pixels: over max_image_pixels
    r = muse_app.client.post("/v1/images/edits", files={"image": ("b.png", bomb)}, data={"prompt": "x"}, timeout=FAST)
    assert "pixels" in _assert_error(r, 400, "image")["message"]


def test_unknown_route_and_method(muse_app):
    _assert_error(muse_app.client.get("/v1/nothing-here", timeout=FAST), 404)
    assert muse_app.client.get("/v1/images/generations", timeout=FAST).status_code == 405


def test_api_key_is_required_when_configured(muse_app):
    url = muse_app.url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": muse_app.key},
                    {"Authorization": f"Basic {muse_app.key}"}):
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/images/generations"), ("POST", "/v1/images/edits")):
            body = GOOD if method == "POST" else None
            r = httpx.request(method, url + path, headers=headers, json=body, timeout=FAST)
            error = r.json()["error"]
            assert r.status_code == 401 and error["code"] == "invalid_api_key", (headers, path, r.text)
    # The key is checked before the body is even read: no 413 leaks what the limit is.
    assert httpx.post(url + "/v1/images/generations", content=b"x" * (2 * LIMIT), timeout=FAST).status_code == 401
    # Open without a key: the health check and the web page (which asks for the key itself).
    assert httpx.get(url + "/healthz", timeout=FAST).status_code == 200
    assert httpx.get(url + "/", timeout=FAST).status_code == 200
    ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {muse_app.key}"}, timeout=FAST)
    assert ok.status_code == 200
