"""The HTTP ingress: an OpenAI-compatible images API and a web page, in front of the model DAG.

    POST /v1/images/generations   JSON; `stream: true` answers with server-sent events
    POST /v1/images/edits         multipart: image, optional mask, prompt, ...
    GET  /v1/models  /v1/models/<id>  /v1/files/<id>.<format>  /healthz  /

Each request chains the model deployments (text -> base -> super-res -> decoder), making each call
once the calls it reads have finished and handing it their DeploymentResponses, so every stage's
queue limit holds, token grids go from replica to replica, and only image bytes come back here.
Where each concern lives:

    serve/chain.py      running a chain: timeout, cancellation, retries on a lost replica, errors
    serve/streaming.py  server-sent events, admitted before the first byte
    serve/responses.py  b64_json or file URLs
    serve/guard.py      API key, body size, admission (429 past `max_in_flight`)
    serve/draining.py   every ingress replica refusing new requests while `muse serve` stops
    serve/schemas.py    request fields and validation

Every failure is answered in OpenAI's error shape, never as a 500.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import secrets
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from muse import components
from muse.tokenizer import load_tokenizer
from serve.chain import NOT_RETRIED, Calls, run_chain
from serve.config import AppArgs
from serve.draining import watch_for_drain
from serve.guard import RETRY_AFTER_S, Admission, Guard
from serve.images import EditInput, UploadError, prepare_edit
from serve.responses import Responses
from serve.schemas import (
    FIELDS, OUTPUT_FORMATS, APIError, GenerationRequest, check_common, check_prompt, check_unknown_fields,
    error_response, request_error, resolve_size, supported_sizes, usage,
)
from serve.specs import Decode, Output
from serve.streaming import StreamRequest, open_stream

logger = logging.getLogger("ray.serve")
STATIC = Path(__file__).parent / "static"


def not_router_start(record: logging.LogRecord) -> bool:
    """A filter for the ingress's Serve logger: Serve's router says "Started <...LongPollClient
    object at 0x...>" at the first request, an internal object's repr between the access lines."""
    return not str(record.msg).startswith("Started <ray.serve._private.router")


@serve.ingress()
class Ingress:
    """Builds its FastAPI app per replica (`__serve_build_asgi_app__`) from the typed args."""

    def __init__(self, text_encoder, base, superres, decoder, args: AppArgs):
        logger.addFilter(not_router_start)
        self.text, self.base, self.superres, self.decoder = text_encoder, base, superres, decoder
        self.args = args
        self.limits, self.sampling = args.limits, args.sampling
        _, lo = components.read_component_config(components.component_uri(args.checkpoint, "vqgan_lo"))
        self.lo_side, self.lo_tokens = lo.resolution, lo.tokens_per_side
        self.hi_side = self.hi_tokens = None
        if superres is not None:
            _, hi = components.read_component_config(components.component_uri(args.checkpoint, "vqgan_hi"))
            self.hi_side, self.hi_tokens = hi.resolution, hi.tokens_per_side
        self.responses = Responses(args.files)
        self.admission = Admission()  # what its Guard lets in, and whether it drains
        # For the replica's whole life: `muse serve` stopping drains every ingress replica this way.
        self.drain_watch = asyncio.get_running_loop().create_task(
            watch_for_drain(serve.get_replica_context().app_name, self.admission))
        self.page = (STATIC / "index.html").read_text()
        # The tokenizer alone (no weights): `usage` counts the prompt as the text encoder reads it.
        text_encoder = components.component_uri(args.checkpoint, "text_encoder")
        self.tokenizer, self.max_text_tokens = load_tokenizer(text_encoder)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_fastapi(self)

    # -- the model DAG -------------------------------------------------------------------------
    def side(self, stage: str) -> int:
        return self.hi_side if stage == "hi" else self.lo_side

    def usage(self, prompt: str, n: int, stage: str, text: bool = True, edit: bool = False) -> dict:
        """OpenAI's usage block for n images of `stage`; without `text`, their image tokens alone; an
        `edit` also reads its source image's tokens at each stage."""
        tokens = self.lo_tokens**2 + (self.hi_tokens**2 if stage == "hi" else 0)
        read = len(self.tokenizer(prompt, truncation=True, max_length=self.max_text_tokens)["input_ids"]) if text else 0
        return usage(read, n, tokens, image_tokens=tokens if edit else 0)

    def decodes(self, n: int, seed: int, steps: int | None, superres_steps: int | None,
                guidance: float | None, base_default: int | None = None) -> tuple[Decode, Decode]:
        g = self.sampling.guidance_scale if guidance is None else guidance
        lo_steps = steps if steps is not None else (base_default or self.sampling.steps)
        hi_steps = superres_steps if superres_steps is not None else self.sampling.superres_steps
        return Decode(n, lo_steps, g, seed), Decode(n, hi_steps, g, seed)

    async def generate(self, req: GenerationRequest, stage: str, seed: int, out: Output) -> list[bytes]:
        lo_decode, hi_decode = self.decodes(req.n, seed, req.steps, req.superres_steps, req.guidance_scale)

        async def chain(calls: Calls) -> None:
            cond = calls.start(self.text.encode.remote(req.prompt, req.negative_prompt))
            await calls.ready(cond)
            tokens = calls.start(self.base.generate.remote(cond, lo_decode))
            await calls.ready(tokens)
            if stage == "hi":
                tokens = calls.start(self.superres.generate.remote(cond, tokens, hi_decode))
                await calls.ready(tokens)
            calls.start(self.decoder.decode.remote(tokens, stage, out))

        return await self.call(chain)

    async def prepare_edit(self, image: bytes, mask: bytes | None, stage: str, keep_pixels: bool = False) -> EditInput:
        """The upload at each stage's side, and the low-res tokens its mask regenerates (400 if unreadable)."""
        sides = {"lo": self.lo_side, **({"hi": self.hi_side} if stage == "hi" else {})}
        try:
            return await asyncio.to_thread(prepare_edit, image, mask, sides, self.lo_tokens,
                                           self.limits.max_image_pixels, keep_pixels)
        except UploadError as e:
            raise APIError(400, str(e), param=e.param, code="invalid_image") from None

    async def edit(self, edit: EditInput, prompt: str, negative: str | None, stage: str, lo_decode: Decode,
                   hi_decode: Decode, out: Output) -> list[bytes]:
        mask_free = edit.regenerate is None

        async def chain(calls: Calls) -> None:
            cond = calls.start(self.text.encode.remote(prompt, negative))
            source = calls.start(self.decoder.encode.remote(edit.images["lo"], "lo"))
            await calls.ready(cond, source)
            if mask_free:
                tokens = self.base.edit.remote(cond, lo_decode, source, lo_decode.steps, self.sampling.edit_fraction)
            else:
                tokens = self.base.generate.remote(cond, lo_decode, source, edit.regenerate)
            calls.start(tokens)
            if stage == "hi":
                hi_source = calls.start(self.decoder.encode.remote(edit.images["hi"], "hi"))
                await calls.ready(tokens, hi_source)
                tokens = calls.start(self.superres.generate.remote(cond, tokens, hi_decode, hi_source))
            await calls.ready(tokens)
            calls.start(self.decoder.decode.remote(tokens, stage, out, edit.kept(stage)))

        return await self.call(chain)

    async def call(self, chain) -> list[bytes]:
        return await run_chain(chain, self.limits.request_timeout_s, self.limits.max_retries)


def _seed(seed: int | None) -> int:
    # A drawn seed stays below 2**53: JavaScript reads larger JSON numbers rounded, and a rounded seed
    # sent back draws another image.
    return seed if seed is not None else secrets.randbelow(2**53)


def default_response_format(model: str | None) -> str:
    """OpenAI's current image models answer base64 unless asked; its DALL-E models answered URLs."""
    return "url" if (model or "").startswith("dall-e") else "b64_json"


def _retry_headers(status: int, code: str | None) -> dict | None:
    """Retry-After where coming back helps (at capacity, no replica); on a failure that would repeat
    (the model failed on this request, it crashed a replica, it ran out of time, the link store is full
    until its oldest link expires) OpenAI's SDKs are told not to resend it, as they otherwise do on any 5xx."""
    if code in NOT_RETRIED or code == "files_full" or (status >= 500 and code == "server_error"):
        return {"x-should-retry": "false"}
    return {"Retry-After": str(RETRY_AFTER_S)} if status in (429, 503) else None


def build_fastapi(ing: Ingress) -> FastAPI:
    """The ASGI app of one ingress replica."""
    app = FastAPI(title="Muse images API", docs_url=None, redoc_url=None, openapi_url=None)
    limits = ing.limits

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e.status, e.message, e.param, e.code, e.type, headers=_retry_headers(e.status, e.code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        error = request_error(e.errors())
        return error_response(error.status, error.message, error.param, error.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:  # as OpenAI words an unknown route (e.g. /v1/images/variations)
            return error_response(404, f"Invalid URL ({request.method} {request.url.path})", code="not_found")
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        # A bug here, not the caller's fault: a 503 (never a 500) that clients are told not to resend.
        logger.exception("unhandled error")
        return error_response(503, f"internal error: {type(e).__name__}", type="server_error", code="server_error",
                              headers=_retry_headers(503, "server_error"))

    app.add_middleware(Guard, api_key=ing.args.api_key, max_body_bytes=limits.max_body_bytes,
                       max_in_flight=limits.max_in_flight, body_timeout_s=limits.body_timeout_s,
                       admission=ing.admission)
    cors = ing.args.cors
    if cors.allow_origins:
        # Added last, so outermost: a preflight is answered before the API key is asked for, and the
        # Guard's 401/413/429 carry the headers a browser needs to read them. The request's own headers
        # are allowed (the OpenAI SDKs send several, Authorization among them); Retry-After and
        # x-should-retry are exposed to the SDKs' retry logic.
        app.add_middleware(CORSMiddleware, allow_origins=cors.allow_origins, allow_methods=["GET", "POST"],
                           allow_headers=["*"], expose_headers=["Retry-After", "x-should-retry"],
                           max_age=cors.max_age_s)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(ing.page)

    @app.get("/healthz")
    async def healthz() -> Response:
        # Draining: a load balancer stops sending here while the requests in flight finish.
        if ing.admission.draining:
            return JSONResponse({"status": "draining"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok"})

    def model_card() -> dict:
        sizes = {}
        for size, stage in supported_sizes(ing.lo_side, ing.hi_side).items():
            native, asked = ing.lo_side if stage == "lo" else ing.hi_side, int(size.split("x")[0])
            name = "base" if stage == "lo" else "super-res"
            sizes[size] = name if native == asked else f"{name}, drawn at {native}x{native} and resampled"
        return {"id": ing.args.model_name, "object": "model", "created": 0, "owned_by": "muse-on-ray",
                "sizes": sizes, "default_size": f"{ing.lo_side}x{ing.lo_side}",
                "defaults": ing.sampling.model_dump(), "limits": limits.model_dump(exclude={"request_timeout_s"})}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict:
        if model_id != ing.args.model_name:
            raise APIError(404, f"The model '{model_id}' does not exist; this server has '{ing.args.model_name}'",
                           param="model", code="model_not_found")
        return model_card()

    @app.get("/v1/files/{name}")
    async def files(name: str) -> Response:
        data = await ing.responses.file(name)  # None unless the name, its format included, is one it gave
        if data is None:
            kept = "" if ing.args.files.uri else (", or the server restarted since it was made (links are kept in "
                                                  "memory unless files.uri is set)")
            raise APIError(404, f"no such file: it has expired{kept}", param="file", code="not_found")
        max_age = max(0, int(name.split("-", 1)[0]) - int(time.time()))  # until it expires
        return Response(data, media_type=OUTPUT_FORMATS[name.rpartition(".")[2]],
                        headers={"Cache-Control": f"private, max-age={max_age}"})

    @app.post("/v1/images/generations")
    async def generations(req: GenerationRequest, request: Request):
        check_unknown_fields(req)
        if req.keep_pixels:
            raise APIError(400, "keep_pixels applies to edits (/v1/images/edits with a mask): a generation has no "
                                "input pixels to keep", param="keep_pixels", code="invalid_value")
        check_prompt(req.prompt, limits)
        check_prompt(req.negative_prompt, limits, "negative_prompt", required=False)
        check_common(req.n, req.steps, req.superres_steps, req.guidance_scale, limits)
        stage, side = resolve_size(req.size, ing.lo_side, ing.hi_side)
        out = Output(side, req.output_format, req.output_compression)
        seed = _seed(req.seed)
        base_url = str(request.base_url)
        if req.stream:
            lo, hi = ing.decodes(req.n, seed, req.steps, req.superres_steps, req.guidance_scale)
            return await streamed(StreamRequest(req.prompt, req.negative_prompt, stage, seed, lo, hi,
                                                req.partial_images, req.response_format), base_url, out)
        response_format = req.response_format or default_response_format((req.model_extra or {}).get("model"))
        ing.responses.check_room(req.n, response_format)
        images = await ing.generate(req, stage, seed, out)
        return await ing.responses.images(images, response_format, seed, out, base_url,
                                          ing.usage(req.prompt, req.n, stage))

    @app.post("/v1/images/edits")
    async def edits(request: Request):
        """Multipart, as OpenAI's: `image` (or `image[]`, as openai-python sends a list: one image is
        used, more are a 400), optional `mask`, and the fields of `FIELDS`; empty values are absent."""
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(400, "send the edit as multipart/form-data: an 'image' file, an optional 'mask' file "
                                "and the text fields", param="image", code="invalid_request")
        form = await request.form()
        unknown = sorted(set(form) - set(FIELDS) - {"image", "image[]", "mask"})
        if unknown:
            raise APIError(400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0],
                           code="unknown_parameter")
        images = form.getlist("image") + form.getlist("image[]")
        if any(not hasattr(image, "read") for image in images):
            raise APIError(400, "'image' must be a file, not a text field", param="image", code="invalid_type")
        if len(images) != 1:
            raise APIError(400, f"give exactly one image file ('image' or 'image[]'), got {len(images)}",
                           param="image", code="invalid_value")
        mask = form.get("mask")
        if mask is not None and not hasattr(mask, "read"):
            raise APIError(400, "'mask' must be an image file", param="mask", code="invalid_value")
        req = _EditForm(form).request()  # the JSON route's fields, limits and messages
        check_unknown_fields(req)
        check_prompt(req.prompt, limits)
        check_prompt(req.negative_prompt, limits, "negative_prompt", required=False)
        check_common(req.n, req.steps, req.superres_steps, req.guidance_scale, limits)
        response_format = req.response_format or default_response_format((req.model_extra or {}).get("model"))
        stage, side = resolve_size(req.size, ing.lo_side, ing.hi_side)
        out = Output(side, req.output_format, req.output_compression)
        seed = _seed(req.seed)
        edit = await ing.prepare_edit(await images[0].read(), await mask.read() if mask is not None else None, stage,
                                      req.keep_pixels)
        lo, hi = ing.decodes(req.n, seed, req.steps, req.superres_steps, req.guidance_scale,
                             base_default=ing.sampling.edit_iterations if edit.regenerate is None else None)
        if req.stream:
            return await streamed(StreamRequest(req.prompt, req.negative_prompt, stage, seed, lo, hi,
                                                req.partial_images, req.response_format, edit),
                                  str(request.base_url), out)
        ing.responses.check_room(req.n, response_format)
        data = await ing.edit(edit, req.prompt, req.negative_prompt, stage, lo, hi, out)
        return await ing.responses.images(data, response_format, seed, out, str(request.base_url),
                                          ing.usage(req.prompt, req.n, stage, edit=True))

    async def streamed(req: StreamRequest, base_url: str, out: Output) -> StreamingResponse:
        """Server-sent events, admitted (or refused with a 503) before the first one."""
        ing.responses.check_room(req.lo.n, req.response_format)
        events = await open_stream(ing, req, base_url, out)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


_INTEGER = re.compile(r"[+-]?[0-9]{1,30}")  # ASCII digits; past 30 no field is in range, and int() refuses 4300


class _EditForm:
    """Typed reads of a multipart form's text fields; an empty value is an absent one (as a null), and
    a file part where text belongs is a 400."""

    INTEGERS = ("n", "output_compression", "partial_images", "seed", "steps", "superres_steps")

    def __init__(self, form):
        self.form = form

    def request(self) -> GenerationRequest:
        """The form as the JSON route's request: numbers and flags read from their text, then the same
        validation (limits, choices) and the same 400s."""
        fields = {name: self.text(name) for name in FIELDS
                  if name not in self.INTEGERS + ("guidance_scale", "stream", "keep_pixels")}
        fields |= {name: self.integer(name) for name in self.INTEGERS}
        fields |= {"guidance_scale": self.number("guidance_scale"), "stream": self.boolean("stream"),
                   "keep_pixels": self.boolean("keep_pixels")}
        try:
            return GenerationRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        except ValidationError as e:
            raise request_error(e.errors()) from None

    def text(self, name: str) -> str | None:
        value = self.form.get(name)
        if value is not None and not isinstance(value, str):
            raise APIError(400, f"'{name}' must be a text field, not a file", param=name, code="invalid_type")
        return None if value is None or value == "" else value

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self.text(name)
        if value is None:
            return default
        if not _INTEGER.fullmatch(value.strip()):  # int() would take "0_2" or "٣"
            raise APIError(400, f"'{name}' must be an integer of at most 30 digits, got {value[:40]!r}", param=name,
                           code="invalid_type")
        return int(value)

    def boolean(self, name: str) -> bool:
        """A flag as multipart clients send one ("true"/"false", any case; absent is false)."""
        value = self.text(name)
        if value is None or value.lower() == "false":
            return False
        if value.lower() == "true":
            return True
        raise APIError(400, f"'{name}' must be true or false, got {value[:40]!r}", param=name, code="invalid_type")

    def number(self, name: str) -> float | None:
        value = self.text(name)
        try:
            number = None if value is None else float(value)
        except ValueError:
            number = math.nan
        if number is not None and not math.isfinite(number):
            raise APIError(400, f"'{name}' must be a finite number, got {value[:40]!r}", param=name,
                           code="invalid_type")
        return number
