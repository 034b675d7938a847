"""Server-sent events for `stream: true`, as OpenAI's image streams: `image_generation.partial_image`
previews while the stages decode, then one `image_generation.completed` per image with `usage`.

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
from typing import TYPE_CHECKING, AsyncIterator

from ray.serve.exceptions import BackPressureError

from serve.chain import model_failed, overloaded, replica_lost
from serve.schemas import APIError, GenerationRequest
from serve.specs import Output, previews_sent

if TYPE_CHECKING:
    from serve.api import Ingress

logger = logging.getLogger("ray.serve")


async def open_stream(ing: Ingress, req: GenerationRequest, stage: str, seed: int, base_url: str,
                      out: Output) -> AsyncIterator[str]:
    """The stream's events, once the request is admitted: raises APIError (503) before any event
    when it is not."""
    events = _events(ing, req, stage, seed, base_url, out)
    try:
        await events.__anext__()  # the admission marker (bounded by the request's deadline)
    except BackPressureError:
        await events.aclose()
        raise overloaded() from None
    except asyncio.TimeoutError:
        await events.aclose()
        raise APIError(503, "the request was not admitted within the timeout", type="server_error",
                       code="overloaded") from None
    except APIError:
        await events.aclose()
        raise
    except Exception as e:  # noqa: BLE001 - a model or replica failure before the first event
        await events.aclose()
        if replica_lost(e) is not None:
            raise APIError(503, "a model replica was lost; retry", type="server_error",
                           code="replica_unavailable") from None
        raise model_failed(e) from e
    return events


async def _events(ing: Ingress, req: GenerationRequest, stage: str, seed: int, base_url: str,
                  out: Output) -> AsyncIterator[str | None]:
    """None once the base stage admitted the request, then the SSE text of each event."""
    lo_decode, hi_decode = ing.decodes(req.n, seed, req.steps, req.superres_steps, req.guidance_scale)
    fields = event_fields(f"{out.side}x{out.side}", out.format)
    every = ing.sampling.preview_every
    # What the generators will send: a stage runs at most as many steps as it has tokens to decode.
    stages = [(lo_decode.steps, ing.lo_tokens**2)] + ([(hi_decode.steps, ing.hi_tokens**2)] if stage == "hi" else [])
    offered = sum(previews_sent(steps, tokens, every) for steps, tokens in stages)
    keep = spread(offered, req.partial_images)
    partial = seen = 0
    admitted = False
    deadline = time.monotonic() + ing.limits.request_timeout_s
    try:
        cond = ing.text.encode.remote(req.prompt, req.negative_prompt)
        tokens = None
        for name, deployment, decode in (("base", ing.base, lo_decode), ("superres", ing.superres, hi_decode)):
            if name == "superres" and stage != "hi":
                break
            call_args = (cond, decode) if tokens is None else (cond, tokens, decode)
            events = deployment.options(stream=True).stream.remote(*call_args)
            try:
                while True:
                    try:
                        event = await _within(events.__anext__(), deadline)
                    except StopAsyncIteration:
                        break
                    if event["kind"] == "admitted":
                        if not admitted:
                            admitted = True
                            yield None
                        continue
                    if event["kind"] == "done":
                        tokens = event["ids"]
                        continue
                    seen += 1
                    if seen - 1 not in keep:
                        continue
                    previews = await _within(ing.decoder.preview.remote(
                        event["ids"], "lo" if name == "base" else "hi", out), deadline)
                    for i, png in enumerate(previews):
                        yield sse("image_generation.partial_image", {
                            "b64_json": b64(png), "index": i, "partial_image_index": partial, "stage": name,
                            "step": event["step"], "steps": event["steps"], **fields})
                    partial += 1
            finally:
                events.cancel()
        pngs = await _within(ing.decoder.decode.remote(tokens, stage, out), deadline)
        # Each image's event carries its own usage: its tokens, and the prompt's in the first only, so
        # that the events add up to the request's usage.
        used = [ing.usage(req.prompt, 1, stage, text=i == 0) for i in range(len(pngs))]
        for i, png in enumerate(pngs):  # always b64_json, as OpenAI's streams; a URL too if asked
            url = await ing.responses.item(png, "url", base_url, out.format) if req.response_format == "url" else {}
            yield sse("image_generation.completed", {
                "b64_json": b64(png), **url, "index": i, "seed": seed, "usage": used[i], **fields})
    except asyncio.TimeoutError:
        if not admitted:
            raise
        yield sse("error", {"error": error_body("the request took longer than the timeout", "timeout")})
    except Exception as e:  # noqa: BLE001 - headers are sent: report in-band and end the stream
        if not admitted:
            raise
        logger.warning("stream failed: %s: %s", type(e).__name__, str(e)[:300])
        yield sse("error", {"error": error_body(f"generation failed: {type(e).__name__}", "server_error")})


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
