"""What OpenAI's clients send and read, against the HTTP layer with no models behind it: the default
response format, the fields they may send, retry headers, seeds a browser can hold, and the
answers to routes this server does not have."""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest
from PIL import Image

from serve.schemas import APIError
from serve_helpers import fake_ingress


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _ingress(fail: APIError | None = None):
    ing = fake_ingress(None)
    ing.seeds = []

    async def generate(req, stage, seed, out):
        if fail is not None:
            raise fail
        ing.seeds.append(seed)
        return [_png()] * req.n

    ing.generate = generate
    ing.usage = lambda prompt, n, stage, **_: {"input_tokens": 1, "output_tokens": n, "total_tokens": n + 1}
    return ing


def _call(ing, method: str, path: str, **kwargs) -> httpx.Response:
    from serve.api import build_fastapi

    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi(ing))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def test_base64_unless_a_dall_e_client_or_the_request_asks_for_urls():
    """OpenAI's current image models answer base64 (its example decodes `data[0].b64_json`); its
    DALL-E models answered URLs, and clients written for them read `url`."""
    ing = _ingress()
    plain = _call(ing, "POST", "/v1/images/generations", json={"prompt": "a red circle"}).json()["data"][0]
    assert plain["b64_json"] and "url" not in plain
    dall_e = _call(ing, "POST", "/v1/images/generations", json={"prompt": "a red circle", "model": "dall-e-3"})
    assert dall_e.json()["data"][0]["url"].startswith("http://test/v1/files/")
    asked = _call(ing, "POST", "/v1/images/generations", json={"prompt": "x", "response_format": "url"})
    assert "url" in asked.json()["data"][0]


def test_openai_fields_that_do_not_apply_are_ignored_but_must_be_strings():
    ing = _ingress()
    for field, value in (("safety_identifier", "user-7"), ("complexity", "low"), ("background", "opaque"),
                         ("model", "gpt-image-2"), ("quality", "high")):
        r = _call(ing, "POST", "/v1/images/generations", json={"prompt": "x", field: value})
        assert r.status_code == 200, (field, r.text)
    for field, value in (("model", {"a": 1}), ("quality", ["high"])):
        r = _call(ing, "POST", "/v1/images/generations", json={"prompt": "x", field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field
    transparent = _call(ing, "POST", "/v1/images/generations", json={"prompt": "x", "background": "transparent"})
    assert transparent.status_code == 400 and "opaque" in transparent.json()["error"]["message"]


@pytest.mark.parametrize("code, status", [("model_error", 503), ("replica_crashed", 503), ("timeout", 504)])
def test_failures_that_would_repeat_tell_openai_clients_not_to_resend(code, status):
    """OpenAI's SDKs resend any 5xx twice unless told not to: a request that crashed a replica would
    crash two more."""
    r = _call(_ingress(APIError(status, "no", type="server_error", code=code)), "POST", "/v1/images/generations",
              json={"prompt": "x"})
    assert r.status_code == status and r.headers["x-should-retry"] == "false" and "retry-after" not in r.headers
    busy = _call(_ingress(APIError(503, "busy", type="server_error", code="overloaded")), "POST",
                 "/v1/images/generations", json={"prompt": "x"})
    assert busy.headers["retry-after"] == "1" and "x-should-retry" not in busy.headers


def test_a_drawn_seed_survives_javascript_numbers():
    """A browser reads JSON numbers as doubles: a drawn seed of 2**53 or more comes back rounded."""
    ing = _ingress()
    for _ in range(20):
        assert _call(ing, "POST", "/v1/images/generations", json={"prompt": "x"}).status_code == 200
    assert len(ing.seeds) == 20 and all(0 <= s < 2**53 for s in ing.seeds) and len(set(ing.seeds)) == 20


def test_the_model_route_and_unknown_routes_answer_as_openai_does():
    ing = _ingress()
    card = _call(ing, "GET", f"/v1/models/{ing.args.model_name}").json()
    assert card["id"] == ing.args.model_name and card["object"] == "model" and "1024x1024" in card["sizes"]
    other = _call(ing, "GET", "/v1/models/dall-e-3")
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    variations = _call(ing, "POST", "/v1/images/variations", files={"image": ("i.png", _png())})
    assert variations.status_code == 404
    assert variations.json()["error"]["message"] == "Invalid URL (POST /v1/images/variations)"


def test_edit_requests_in_the_wrong_shape_say_what_to_send():
    ing = _ingress()
    as_json = _call(ing, "POST", "/v1/images/edits", json={"prompt": "x", "image": "i.png"})
    assert as_json.status_code == 400 and "multipart/form-data" in as_json.json()["error"]["message"]
    as_text = _call(ing, "POST", "/v1/images/edits", data={"prompt": "x", "image": "i.png"},
                    files={"mask": ("m.png", _png())})
    assert as_text.status_code == 400 and as_text.json()["error"]["message"] == "'image' must be a file, not a text field"
    transparent = _call(ing, "POST", "/v1/images/edits", data={"prompt": "x", "background": "transparent"},
                        files={"image": ("i.png", _png())})
    assert transparent.status_code == 400 and transparent.json()["error"]["param"] == "background"
