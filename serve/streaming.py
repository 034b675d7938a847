"""Server-sent events for `stream: true`, as OpenAI's image streams: `image_generation.partial_image`
previews while the stages decode, then one `image_generation.completed` per image with `usage`
(`image_edit.*` for edits; a mask-free edit's base stage resamples the whole image each iteration, so
its previews come from super-res alone).

A stream is admitted before its first byte: `open_stream` waits until the base generator's scheduler
has taken the request (or Serve refused it), so an overloaded server answers a plain 503 with
Retry-After instead of a 200 followed by an error event. Leaving the stream (the client went away)
cancels the generator's stream, and the scheduler drops its rows at the next step.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator

from ray.serve.exceptions import BackPressureError

from serve.chain import Calls, cancel_calls, crash_error, crashed, model_failed, overloaded, replica_lost, retry_wait
from serve.images import EditInput
from serve.schemas import APIError
from serve.specs import Decode, Output, previews_sent

if TYPE_CHECKING:
    from serve.api import Ingress

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class StreamRequest:
    """What a stream decodes, from either route."""

    prompt: str
    negative_prompt: str | None
    stage: str  # "lo" (base only) or "hi" (through super-res)
    seed: int
    lo: Decode
    hi: Decode
    partial_images: int
    response_format: str | None
    edit: EditInput | None = None  # an edit's source image (and mask); None for a generation

    @property
    def event(self) -> str:
        return "image_edit" if self.edit is not None else "image_generation"


async def open_stream(ing: Ingress, req: StreamRequest, base_url: str, out: Output) -> AsyncIterator[str]:
    """The stream's events, once the request is admitted: raises APIError before any event when it
    is not (503 refused, 504 not admitted within the request's time)."""
    events = _events(ing, req, base_url, out)
    try:
        await events.__anext__()  # the admission marker (bounded by the request's deadline)
    except asyncio.TimeoutError:
        await events.aclose()
        raise APIError(504, "the request was not admitted within the timeout", type="server_error",
                       code="timeout") from None
    except Exception as e:  # noqa: BLE001 - refused, or a model or replica failure before the first event
        await events.aclose()
        raise stream_failure(e) from None
    return events


async def _events(ing: Ingress, req: StreamRequest, base_url: str, out: Output) -> AsyncIterator[str | None]:
    """None once admitted, then the SSE text of each event. A replica lost (or crashed, once) under
    the request is re-run as a plain request's chain is (`retry_wait`), until the first event has
    been sent: seeds make the re-run's images the same. Failures after that end the stream with an
    error event."""
    deadline = time.monotonic() + ing.limits.request_timeout_s
    attempt, admitted, sent = 0, False, False
    while True:
        try:
            async with aclosing(_attempt(ing, req, base_url, out, deadline)) as events:
                async for event in events:
                    if event is None:  # admitted (again, on a re-run: said once)
                        if not admitted:
                            admitted = True
                            yield None
                        continue
                    sent = True
                    yield event
            return
        except asyncio.TimeoutError:
            if not admitted:
                raise
            yield sse("error", {"error": error_body("the request took longer than the timeout", "timeout")})
            return
        except Exception as e:  # noqa: BLE001 - a lost replica is re-run; the rest is reported
            failure = e
            lost = replica_lost(e)
            if lost is not None and not sent:
                try:
                    wait = retry_wait(lost, attempt, ing.limits.max_retries, deadline)
                except APIError as refused:
                    failure = refused
                else:
                    attempt += 1
                    await asyncio.sleep(wait)
                    continue
            if not admitted:
                raise failure from None
            failure = stream_failure(failure)
            yield sse("error", {"error": error_body(failure.message, failure.code, failure.type, failure.param)})
            return


async def _attempt(ing: Ingress, req: StreamRequest, base_url: str, out: Output,
                   deadline: float) -> AsyncIterator[str | None]:
    """One run of the stream's chain: None when admitted, then SSE text. Each stage is called only
    once what it reads has finished, as a plain request's chain does (Serve's queue limit then
    holds); the calls still running when it ends early are cancelled."""
    fields = event_fields(f"{out.side}x{out.side}", out.format)
    edit, mask_free = req.edit, req.edit is not None and req.edit.regenerate is None
    every = ing.sampling.preview_every
    # What the generators will send: a stage runs at most as many steps as it has tokens to decode (an
    # edit's super-res decodes only what its base changed: at most all of them, so maybe fewer previews).
    lo_tokens = int(edit.regenerate.sum()) if edit is not None and not mask_free else ing.lo_tokens**2
    stages = ([] if mask_free else [(req.lo.steps, lo_tokens)]) + \
        ([(req.hi.steps, ing.hi_tokens**2)] if req.stage == "hi" else [])
    offered = sum(previews_sent(steps, tokens, every) for steps, tokens in stages)
    keep = spread(offered, req.partial_images)
    partial = seen = 0
    completed = False
    calls = Calls()
    try:
        cond = calls.start(ing.text.encode.remote(req.prompt, req.negative_prompt))
        sources = {s: calls.start(ing.decoder.encode.remote(edit.images[s], s))
                   for s in dict.fromkeys(("lo", req.stage))} if edit else {}  # "lo" once at the base size
        await _within(calls.ready(cond, *sources.values()), deadline)
        tokens = None
        if mask_free:  # not streamed: admitted once it is done
            tokens = await _within(calls.start(ing.base.edit.remote(cond, req.lo, sources["lo"], req.lo.steps,
                                                                    ing.sampling.edit_fraction)), deadline)
            yield None
        for name, deployment in (("base", ing.base), ("superres", ing.superres)):
            if name == "superres" and req.stage != "hi":
                break
            if name == "base" and mask_free:
                continue
            if name == "base":
                call_args = (cond, req.lo) + ((sources["lo"], edit.regenerate) if edit else ())
            else:
                call_args = (cond, tokens, req.hi) + ((sources["hi"],) if edit else ())
            events = deployment.options(stream=True).stream.remote(*call_args)
            try:
                while True:
                    try:
                        event = await _within(events.__anext__(), deadline)
                    except StopAsyncIteration:
                        break
                    if event["kind"] == "admitted":
                        yield None  # said once by `_events`
                        continue
                    if event["kind"] == "done":
                        tokens = event["ids"]
                        continue
                    seen += 1
                    if seen - 1 not in keep:
                        continue
                    previews = await _within(calls.start(ing.decoder.preview.remote(
                        event["ids"], "lo" if name == "base" else "hi", out)), deadline)
                    for i, png in enumerate(previews):
                        yield sse(f"{req.event}.partial_image", {
                            "b64_json": b64(png), "index": i, "partial_image_index": partial, "stage": name,
                            "step": event["step"], "steps": event["steps"], **fields})
                    partial += 1
            finally:
                events.cancel()
        kept = edit.kept(req.stage) if edit is not None else None  # keep_pixels
        pngs = await _within(calls.start(ing.decoder.decode.remote(tokens, req.stage, out, kept)), deadline)
        # Each image's event carries its own usage: its tokens, and the prompt's (and an edit's source
        # image's) in the first only, so that the events add up to the request's usage.
        used = [ing.usage(req.prompt, 1, req.stage, text=i == 0, edit=edit is not None and i == 0)
                for i in range(len(pngs))]
        for i, png in enumerate(pngs):  # always b64_json, as OpenAI's streams; a URL too if asked
            url = (await ing.responses.urls([png], base_url, out.format))[0] if req.response_format == "url" else {}
            yield sse(f"{req.event}.completed", {
                "b64_json": b64(png), **url, "index": i, "seed": req.seed, "usage": used[i], **fields})
        completed = True
    finally:
        if not completed:  # failed, timed out, or the client left: free the model work still queued
            cancel_calls(calls.made)


def stream_failure(e: Exception) -> APIError:
    """A stream's failure as a plain response would report it (at capacity, a lost replica, the model
    failed): its status before the first event, its error event after."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, BackPressureError):
        return overloaded()
    lost = replica_lost(e)
    if lost is not None:
        if crashed(lost):
            return crash_error()
        return APIError(503, "a model replica was lost; retry", type="server_error", code="replica_unavailable")
    return model_failed(e)  # logs it


async def _within(awaitable, deadline: float):
    """Await with what is left of the request's time (a deadline, not a scope: a stream's body is
    iterated by another task than the one that opened it)."""
    async def wait():
        return await awaitable
    return await asyncio.wait_for(wait(), max(0.0, deadline - time.monotonic()))


def event_fields(size: str, output_format: str = "png") -> dict:
    """Fields OpenAI's image stream events carry, so its client parses ours."""
    return {"size": size, "created_at": int(time.time()), "output_format": output_format, "background": "opaque",
            "quality": "auto"}


def spread(offered: int, wanted: int) -> set[int]:
    """Which of `offered` previews to send: `wanted` of them spread evenly, the last one included
    (all when fewer are offered)."""
    if wanted >= offered:
        return set(range(offered))
    return {offered - 1 - round(i * offered / wanted) for i in range(wanted)}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def error_body(message: str, code: str, type: str = "server_error", param: str | None = None) -> dict:
    return {"message": message, "type": type, "param": param, "code": code}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps({'type': event, **data})}\n\n"
