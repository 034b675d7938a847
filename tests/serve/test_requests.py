"""Request validation in the HTTP layer, without Ray: what a client gets wrong is a 400 in OpenAI's
error shape (never a 413, never a 503 that invites a retry), and a stream delivers the previews it
promised."""

from __future__ import annotations

import asyncio
import json
import time
import types

import httpx
import pytest

from serve.guard import Guard
from serve.schemas import APIError
from serve_helpers import FakeStream, fake_ingress


def _post(ing, **kwargs) -> httpx.Response:
    from serve.api import build_fastapi

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_fastapi(ing))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/v1/images/generations", **kwargs)

    return asyncio.run(post())


def test_links_are_refused_not_cut_short_when_the_store_is_full():
    """The in-memory store keeps every link it gave until it expires: past files.max_files a request
    for links is a 503 that says what to do, before its images are drawn, and b64_json still works."""
    from serve.config import Files
    from serve.responses import Responses

    ing, drawn = fake_ingress(), []
    ing.responses = Responses(Files(max_files=2))
    ing.usage = lambda *args, **kwargs: {}

    async def generate(req, *_):
        drawn.append(req.n)
        return [b"png"] * req.n

    ing.generate = generate
    body = {"prompt": "a red circle", "response_format": "url"}
    first = _post(ing, json={**body, "n": 2})
    assert first.status_code == 200 and len(first.json()["data"]) == 2, first.text
    full = _post(ing, json=body)
    assert full.status_code == 503 and full.json()["error"]["code"] == "files_full", full.text
    assert "b64_json" in full.json()["error"]["message"] and full.headers["x-should-retry"] == "false"
    assert drawn == [2]  # refused before any model work
    assert _post(ing, json={**body, "response_format": "b64_json"}).status_code == 200
    names = [d["url"].rsplit("/", 1)[1] for d in first.json()["data"]]
    assert all(ing.responses.files.get(name) == b"png" for name in names)  # the links given still work


def test_links_that_cannot_be_stored_are_a_503_that_says_to_ask_for_b64_json(tmp_path):
    """A store whose disk is full or whose S3 is down (after its own retries): the request is a 503
    worth retrying, which says how to get the images without links, never a 500."""
    from serve.config import Files
    from serve.responses import Responses

    ing = fake_ingress()
    links = tmp_path / "links"
    ing.responses = Responses(Files(uri=str(links)))
    links.rmdir()
    links.write_bytes(b"")  # the store's folder is gone, a file in its place: a real OSError on every write
    ing.usage = lambda *args, **kwargs: {}

    async def generate(req, *_):
        return [b"png"] * req.n

    ing.generate = generate
    failed = _post(ing, json={"prompt": "a red circle", "response_format": "url"})
    assert failed.status_code == 503 and failed.json()["error"]["code"] == "files_unavailable", failed.text
    assert "ask for response_format b64_json" in failed.json()["error"]["message"]
    assert "Retry-After" in failed.headers
    assert _post(ing, json={"prompt": "a red circle", "response_format": "b64_json"}).status_code == 200


def _checked_ingress():
    """An ingress whose model chain answers a recognisable 503: a request that passed validation."""
    ing = fake_ingress()

    async def generate(*_):
        raise APIError(503, "reached the models", type="server_error", code="reached")

    ing.generate = generate
    return ing


def _assert_400(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


@pytest.mark.parametrize("param, bad, good", [
    ("prompt", '"a red \\ud800 circle"', '"a red circle"'),  # a lone surrogate: valid JSON, not UTF-8 text
    ("negative_prompt", '"\\udfff"', '"blurry"'),
    ("n", "true", "1"),  # not one image
    ("partial_images", "false", "1"),  # not 0
    ("seed", "true", "1"),
    ("steps", "true", "2"),
    ("guidance_scale", "true", "1.5"),
    ("stream", '"yes"', "false"),  # not true
    ("stream", "1", "false"),
])
def test_malformed_fields_are_a_400_naming_the_field(param, bad, good):
    ing = _checked_ingress()

    def body(value: str) -> bytes:
        fields = {"prompt": '"a red circle"', param: value}
        return ("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}").encode()

    headers = {"Content-Type": "application/json"}
    _assert_400(_post(ing, content=body(bad), headers=headers), param)
    # The same body with the field typed right gets past validation to the models.
    assert _post(ing, content=body(good), headers=headers).json()["error"]["code"] == "reached"


async def _guard(content_length: bytes, limit: int = 1024) -> tuple[int | None, dict]:
    """(status, body) the Guard answers a POST declaring `content_length`; (None, {}) when it lets
    the request through to the app."""
    messages: list[dict] = []

    async def app(scope, receive, send):
        messages.append({"reached": True})

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message):
        messages.append(message)

    scope = {"type": "http", "method": "POST", "path": "/v1/images/generations", "root_path": "",
             "headers": [(b"content-length", content_length), (b"content-type", b"application/json")]}
    await Guard(app, None, limit, 4)(scope, receive, send)
    if messages[0].get("reached"):
        return None, {}
    body = json.loads(b"".join(m.get("body", b"") for m in messages[1:]))
    return messages[0]["status"], body


@pytest.mark.parametrize("declared, status", [(b"abc", 400), (b"-5", 400), (b"", 400), (b"1e3", 400),
                                              (b"1025", 413), (b"1024", None), (b"2", None)])
def test_a_malformed_content_length_is_a_400_and_a_large_one_a_413(declared, status):
    got, body = asyncio.run(_guard(declared))
    assert got == status, body
    if status == 400:
        assert "Content-Length" in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"


def test_uploads_still_arriving_count_against_max_in_flight():
    """Ten requests whose bodies come in two chunks, at a limit of 2: two reach the app, eight get a
    429 at once (the slot is taken before the body is read, not after)."""
    async def main():
        running, peak, statuses = 0, 0, []
        release = asyncio.Event()

        async def app(scope, receive, send):
            nonlocal running, peak
            await receive()
            running += 1
            peak = max(peak, running)
            await release.wait()
            running -= 1
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        async def one():
            chunks = iter([{"type": "http.request", "body": b'{"a":', "more_body": True},
                           {"type": "http.request", "body": b' 1}', "more_body": False}])

            async def receive():
                await asyncio.sleep(0.01)  # the upload takes a moment
                return next(chunks)

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            scope = {"type": "http", "method": "POST", "path": "/v1/images/edits", "root_path": "", "headers": []}
            await guard(scope, receive, send)

        guard = Guard(app, None, 1024, 2)
        tasks = [asyncio.create_task(one()) for _ in range(10)]
        await asyncio.sleep(0.2)
        release.set()
        await asyncio.gather(*tasks)
        return peak, sorted(statuses), guard.in_flight

    peak, statuses, left = asyncio.run(main())
    assert peak == 2 and statuses == [200] * 2 + [429] * 8 and left == 0


def _stalled_upload():
    """An upload that sends its first bytes and then nothing more, as a client that stops writing."""
    chunks = iter([{"type": "http.request", "body": b'{"prompt":', "more_body": True}])

    async def receive():
        try:
            return next(chunks)
        except StopIteration:
            await asyncio.Event().wait()  # never set
    return receive


async def _guarded(guard: Guard, path: str, receive) -> tuple[list[dict], bool]:
    """(messages sent, whether the app was reached) for one POST to `path` through `guard`."""
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "root_path": "", "headers": []}
    await asyncio.wait_for(guard(scope, receive, send), 5)  # a bounded wait: a stalled read fails, not hangs
    return sent, guard.app.reached


def _app():
    async def app(scope, receive, send):
        app.reached = True
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})
    app.reached = False
    return app


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/other"])
def test_a_stalled_upload_is_a_408_that_frees_its_slot(path):
    """A body that stops arriving is answered 408 once body_timeout_s has passed, on every route, and
    its admission slot goes to the next request instead of being held while the client idles."""
    async def main():
        guard = Guard(_app(), None, 1024, 1, body_timeout_s=0.05)
        sent, reached = await _guarded(guard, path, _stalled_upload())
        assert not reached and sent[0]["status"] == 408
        error = json.loads(sent[1]["body"])["error"]
        assert error["code"] == "request_timeout" and "body_timeout_s" in error["message"], error
        assert guard.in_flight == 0
        whole = iter([{"type": "http.request", "body": b"{}", "more_body": False}])

        async def receive():
            return next(whole)

        sent, reached = await _guarded(guard, path, receive)
        assert reached and sent[0]["status"] == 200

    asyncio.run(main())


def test_a_client_gone_mid_upload_is_no_error_and_frees_its_slot():
    """Ray Serve cancels the replica's receive when the client goes away (TaskCancelledError out of
    receive()): Guard stops without an answer or an exception. A cancelled task stays cancelled."""
    from ray.exceptions import TaskCancelledError

    async def main():
        guard = Guard(_app(), None, 1024, 1)
        first = iter([{"type": "http.request", "body": b'{"prompt":', "more_body": True}])

        async def receive():
            try:
                return next(first)
            except StopIteration:
                raise TaskCancelledError() from None

        sent, reached = await _guarded(guard, "/v1/images/generations", receive)
        assert sent == [] and not reached and guard.in_flight == 0

        task = asyncio.create_task(_guarded(guard, "/v1/images/generations", _stalled_upload()))
        await asyncio.sleep(0.01)
        assert guard.in_flight == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert guard.in_flight == 0

    asyncio.run(main())


def _stream(previews: int) -> FakeStream:
    """Admitted, `previews` previews, done."""
    shown = [{"kind": "preview", "step": 4 * (i + 1), "steps": 100, "ids": i} for i in range(previews)]
    return FakeStream([{"kind": "admitted"}, *shown, {"kind": "done", "ids": "grid"}])


def _remote(fn) -> types.SimpleNamespace:
    """A deployment method's handle: `.remote(...)` awaits to fn(...)."""
    async def call(*args):
        return fn(*args)
    return types.SimpleNamespace(remote=call)


def test_partial_images_are_delivered_when_steps_exceed_the_tokens(monkeypatch):
    """steps 100 over the tiny root's 8x8 = 64 tokens: the generator runs 64 steps and, previewing
    every 4, sends 15 previews (tests/serve/test_scheduler.py checks that count on a real generator);
    `partial_images: 1` must pick the last of those 15, not of the 24 that 100 steps would give."""
    import serve.chain
    from serve.api import Ingress

    async def finished(response):  # the text encoding, done at once
        pass

    monkeypatch.setattr(serve.chain, "finished", finished)
    ing = fake_ingress()
    assert ing.sampling.preview_every == 4 and ing.lo_tokens == 8
    ing.text = types.SimpleNamespace(encode=types.SimpleNamespace(remote=lambda *a: "cond"))  # passed on
    stream = types.SimpleNamespace(remote=lambda *a: _stream(15))
    ing.base = types.SimpleNamespace(options=lambda **_: types.SimpleNamespace(stream=stream))
    ing.decoder = types.SimpleNamespace(preview=_remote(lambda ids, *a: [b"preview-%d" % ids]),
                                        decode=_remote(lambda *a: [b"final"]))
    ing.superres = None
    ing.decodes = lambda *a, **k: Ingress.decodes(ing, *a, **k)
    ing.usage = lambda *a, **k: {}
    r = _post(ing, json={"prompt": "a red circle", "stream": True, "steps": 100, "partial_images": 1,
                         "size": "64x64"})
    assert r.status_code == 200, r.text
    events = [json.loads(line[len("data: "):]) for line in r.text.splitlines() if line.startswith("data: ")]
    partial = [e for e in events if e["type"] == "image_generation.partial_image"]
    assert [e["step"] for e in partial] == [60]  # the last preview the generator sent
    assert [e["type"] for e in events][-1] == "image_generation.completed"


def test_an_unsupported_size_lists_the_sizes_on_offer_in_order():
    from serve.schemas import resolve_size

    with pytest.raises(APIError) as err:
        resolve_size("300x300", 64, 128)
    assert "64x64, 128x128, 256x256, 512x512, 1024x1024 (or 'auto')" in err.value.message


@pytest.mark.parametrize("negative", ["", "   "])
def test_a_blank_negative_prompt_means_none_on_both_routes(negative):
    """A client that sends "" for "unset" gets no negative prompt, on the JSON route as on the edits
    route (whose form reads an empty field as absent), not a 400 on one of them."""
    ing = fake_ingress()
    asked = []

    async def generate(req, *_):
        asked.append(req.negative_prompt)
        raise APIError(503, "reached the models", type="server_error", code="reached")

    async def prepare_edit(image, mask, stage, keep_pixels=False):
        return types.SimpleNamespace(regenerate=None)

    async def edit(prepared, prompt, negative_prompt, *_):
        asked.append(negative_prompt)
        raise APIError(503, "reached the models", type="server_error", code="reached")

    ing.generate, ing.prepare_edit, ing.edit = generate, prepare_edit, edit
    ing.decodes = lambda *args, **kwargs: (None, None)
    r = _post(ing, json={"prompt": "a red circle", "negative_prompt": negative})
    assert r.json()["error"]["code"] == "reached", r.text
    from serve.api import build_fastapi

    async def post_edit() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_fastapi(ing)), base_url="http://t") as c:
            return await c.post("/v1/images/edits", files={"image": ("i.png", _png())},
                                data={"prompt": "a red circle", "negative_prompt": negative})

    r = asyncio.run(post_edit())
    assert r.json()["error"]["code"] == "reached", r.text
    assert asked == [None, None]


def _png() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize("field, value", [
    ("output_compression", 101), ("partial_images", 7), ("seed", 2**63), ("response_format", "gif"),
    ("output_format", "gif"), ("n", 0), ("steps", 0), ("guidance_scale", -1), ("background", "transparent"),
    ("size", "300x300"), ("quality", None),
])
def test_the_edits_form_is_refused_as_the_json_route_refuses_the_same_field(field, value):
    """The edits route reads its form into the JSON route's request: one list of fields, limits and
    messages, so the two never drift apart. (A form's empty field is an absent one, as a JSON null.)"""
    from serve.api import build_fastapi

    ing = fake_ingress()

    async def reached(*_):
        raise APIError(503, "reached the models", type="server_error", code="reached")

    async def prepare_edit(*_):
        return types.SimpleNamespace(regenerate=None)

    ing.generate, ing.edit, ing.prepare_edit = reached, reached, prepare_edit
    ing.decodes = lambda *args, **kwargs: (None, None)
    fields = {"prompt": "a red circle", field: value}

    async def post_both() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=build_fastapi(ing)), base_url="http://t") as c:
            as_json = await c.post("/v1/images/generations", json=fields)
            as_form = await c.post("/v1/images/edits", files={"image": ("i.png", _png())},
                                   data={k: "" if v is None else str(v) for k, v in fields.items()})
            return as_json, as_form

    as_json, as_form = asyncio.run(post_both())
    if value is None:  # null / empty: the default, on both routes; the request goes on to the models
        assert as_form.json()["error"]["code"] == as_json.json()["error"]["code"] == "reached", as_form.text
        return
    assert as_json.status_code == as_form.status_code == 400, (as_json.text, as_form.text)
    assert as_form.json()["error"] == as_json.json()["error"]


def test_a_draining_ingress_refuses_new_requests_and_reports_those_in_flight(monkeypatch):
    """What each ingress replica does once `muse serve` stopping puts up the drain board, before Serve
    stops any replica: new image requests get 503 shutting_down (Retry-After), and it reports its
    requests in flight until the last has finished; a board that goes away ends the drain."""
    import ray

    from serve import draining

    monkeypatch.setattr(draining, "LOOK_EVERY_S", 0.05)
    monkeypatch.setattr(draining, "REPORT_EVERY_S", 0.05)

    class Board:  # the named actor's interface, with awaitable calls as a handle's are
        def __init__(self):
            self.reports, self.gone = [], False

        @property
        def report(self):
            board = self

            class Call:
                @staticmethod
                async def remote(replica, in_flight):
                    if board.gone:
                        raise ray.exceptions.RayActorError()
                    board.reports.append(in_flight)
            return Call

    async def main():
        ing = fake_ingress()
        guard = Guard(_app(), None, 1024, 4, admission=ing.admission)
        board, up = Board(), []
        watch = asyncio.create_task(draining.watch_for_drain("muse", ing.admission, lambda app: board if up else None))
        upload = asyncio.create_task(_guarded(guard, "/v1/images/generations", _stalled_upload()))
        await asyncio.sleep(0.2)
        assert ing.admission.in_flight == 1 and not ing.admission.draining and not board.reports
        up.append(True)  # the CLI puts the board up
        await asyncio.sleep(0.3)
        assert ing.admission.draining and board.reports[-1] == 1  # waits for the one in flight

        async def whole_body():
            return {"type": "http.request", "body": b'{"prompt": "x"}', "more_body": False}

        sent, reached = await _guarded(guard, "/v1/images/generations", whole_body)
        assert sent[0]["status"] == 503 and not reached
        assert b"shutting_down" in sent[1]["body"]
        upload.cancel()  # the request in flight ends
        with pytest.raises(asyncio.CancelledError):
            await upload
        await asyncio.sleep(0.2)
        assert board.reports[-1] == 0
        board.gone = True  # the CLI was killed: the replica takes requests again
        await asyncio.sleep(0.2)
        assert not ing.admission.draining
        watch.cancel()

    asyncio.run(main())


def test_the_drain_waits_for_every_running_ingress_replica(ray_session):
    """The stopping CLI's side: done once as many replicas as are running have each reported 0 (a dead
    replica's last report does not hold it up); at the deadline, what is left is counted."""
    import ray

    from serve import draining

    asked = []
    running = lambda app: asked.append(app) or 2  # noqa: E731
    board = draining.DrainBoard.options(name=draining.board_name("t-drain"), namespace=draining.NAMESPACE).remote()
    try:
        ray.get([board.report.remote("a", 0), board.report.remote("b", 3)])
        said = []
        found, left = draining.drain("t-drain", 0.3, running, waiting=said.append, every_s=0.1)
        assert left == 3 and found._actor_id == board._actor_id  # b still busy: the deadline; the same board
        assert said and set(said) == {3}  # what is still in flight, said while it waits
        assert len(asked) == 1  # Serve's controller is asked once a second, not at every look at the board
        ray.get([board.report.remote("b", 0), board.report.remote("dead", 5)])
        t = time.monotonic()
        assert draining.drain("t-drain", 30, running)[1] == 0
        assert time.monotonic() - t < 5
    finally:
        ray.kill(board)
