"""Request and response shapes of the images API (OpenAI Images API, plus Muse's own fields) and
OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

Sizes: the model root decides what it can produce, its base resolution ("lo") and, when it has a
super-res stage, the super-res resolution ("hi"). A request may name either as "WxH", or "256x256"
(the base stage) and "512x512" or "1024x1024" (through super-res) on any model, so clients written
for the paper's 256/512 model, or for OpenAI's 1024 px default, work unchanged; "auto" (or no size) is the base stage. The image returned always has the
size asked for: where the stage's own resolution differs (the tiny root draws 64 and 128 px), it is
resampled, and `/v1/models` says so. Anything else is a 400 naming the sizes on offer.

Both routes share one list of fields (`FIELDS`); an explicit JSON null means "not given".
"""

from __future__ import annotations

from typing import Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator
from pydantic_core import PydanticCustomError

from serve.config import Limits

BASE_ALIAS, SUPERRES_ALIAS = "256x256", "512x512"
# OpenAI's usual size (its current models' default), drawn through super-res and resampled.
LARGE_ALIAS = "1024x1024"
# Fields of OpenAI's request that existing clients may send and that do not apply to this model:
# accepted (as a string or null) and ignored, one model per server. Any other unknown field is a 400.
OPENAI_IGNORED = ("model", "quality", "style", "user", "safety_identifier", "background", "moderation",
                  "input_fidelity", "complexity")
# `background` values this model honours: its images are opaque.
BACKGROUNDS = ("auto", "opaque")
OUTPUT_FORMATS = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Every field either route takes (the edit route adds image, image[] and mask).
FIELDS = ("prompt", "n", "size", "response_format", "output_format", "output_compression", "stream",
          "partial_images", "negative_prompt", "seed", "steps", "superres_steps", "guidance_scale",
          "keep_pixels") + OPENAI_IGNORED
NUMBER_FIELDS = ("n", "output_compression", "partial_images", "seed", "steps", "superres_steps", "guidance_scale")


class APIError(Exception):
    """Raised by route code; rendered as OpenAI's error object with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   type: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class GenerationRequest(BaseModel):
    """POST /v1/images/generations."""

    model_config = ConfigDict(extra="allow")

    prompt: str
    n: int = Field(1, ge=1)
    size: str | None = None  # default ("auto"): the base resolution
    response_format: Literal["url", "b64_json"] | None = None  # "url"; a stream's events carry b64_json as well
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int | None = Field(None, ge=0, le=100)  # jpeg/webp quality; default 100
    stream: StrictBool = False  # not "yes" nor 1
    partial_images: int = Field(0, ge=0, le=3)  # streamed previews, spread over the decode; 0 as OpenAI's default
    negative_prompt: str | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    steps: int | None = Field(None, ge=1)
    superres_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    keep_pixels: StrictBool = False  # edits with a mask: the image's own pixels outside it

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_absent(cls, data):
        """OpenAI's SDKs send explicit nulls for optional fields: they mean the default. A blank
        negative prompt means none, as on the edits route (a form's empty field)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if (v is not None or k == "prompt")
                    and not (k == "negative_prompt" and blank(v))}
        return data

    @field_validator(*NUMBER_FIELDS, mode="before")
    @classmethod
    def _a_json_number(cls, v):
        # Pydantic's lax mode reads true as 1 and "2" as 2: a client's mistake, which OpenAI refuses too.
        if isinstance(v, (bool, str)):
            raise PydanticCustomError("number_type", "Input should be a JSON number, not a {kind}",
                                      {"kind": "boolean" if isinstance(v, bool) else "string"})
        return v


def check_unknown_fields(req: BaseModel) -> None:
    """Unknown fields are a 400 naming the field; OpenAI's that do not apply here must be strings."""
    extra = req.model_extra or {}
    for key, value in extra.items():
        if key not in OPENAI_IGNORED:
            raise APIError(400, f"Unrecognized request argument supplied: {key}", param=key, code="unknown_parameter")
        if not isinstance(value, str):
            raise APIError(400, f"'{key}' must be a string", param=key, code="invalid_type")
    check_background(extra.get("background"))


def check_background(background: str | None) -> None:
    """A transparent background is refused rather than ignored: every image here is opaque."""
    if background is not None and background not in BACKGROUNDS:
        raise APIError(400, f"'background' {background[:40]!r} is not supported: this model draws opaque images "
                            f"({' or '.join(BACKGROUNDS)})", param="background", code="invalid_value")


def blank(value) -> bool:
    return isinstance(value, str) and not value.strip()


def check_prompt(prompt: str | None, limits: Limits, param: str = "prompt", required: bool = True) -> None:
    if prompt is None or not prompt.strip():
        if required or prompt is not None:
            raise APIError(400, f"'{param}' must be a non-empty string", param=param, code="invalid_value")
        return
    if len(prompt) > limits.max_prompt_chars:
        raise APIError(400, f"'{param}' is {len(prompt)} characters; the maximum is {limits.max_prompt_chars}",
                       param=param, code="string_above_max_length")
    try:  # JSON may carry a lone surrogate ("\ud800"); the tokenizers would fail on it later, as a 503
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"'{param}' is not valid Unicode text (it holds a lone surrogate)", param=param,
                       code="invalid_value") from None


def check_common(n: int, steps: int | None, superres_steps: int | None, guidance_scale: float | None,
                 limits: Limits) -> None:
    if not 1 <= n <= limits.max_images:
        raise APIError(400, f"'n' must be between 1 and {limits.max_images}, got {n}", param="n", code="invalid_value")
    for name, value in (("steps", steps), ("superres_steps", superres_steps)):
        if value is not None and not 1 <= value <= limits.max_steps:
            raise APIError(400, f"'{name}' must be between 1 and {limits.max_steps}, got {value}", param=name,
                           code="invalid_value")
    if guidance_scale is not None and not 0 <= guidance_scale <= limits.max_guidance_scale:
        raise APIError(400, f"'guidance_scale' must be between 0 and {limits.max_guidance_scale}, got "
                            f"{guidance_scale}", param="guidance_scale", code="invalid_value")


def resolve_size(size: str | None, lo_side: int, hi_side: int | None) -> tuple[str, int]:
    """(stage "lo" or "hi", output side in pixels) for a requested size; APIError(400) otherwise."""
    offered = supported_sizes(lo_side, hi_side)
    size = "auto" if size is None else size.strip().lower()
    if size == "auto":
        return "lo", lo_side
    if size in offered:
        return offered[size], int(size.split("x")[0])
    listed = sorted(offered, key=lambda s: int(s.split("x")[0]))
    raise APIError(400, f"size {size!r} is not supported; this model produces {', '.join(listed)} (or 'auto')",
                   param="size", code="invalid_size")


def supported_sizes(lo_side: int, hi_side: int | None) -> dict[str, str]:
    """Every size a client may ask for -> the stage that draws it."""
    sizes = {f"{lo_side}x{lo_side}": "lo", BASE_ALIAS: "lo"}
    if hi_side is not None:
        sizes |= {f"{hi_side}x{hi_side}": "hi", SUPERRES_ALIAS: "hi", LARGE_ALIAS: "hi"}
    return sizes


def usage(text_tokens: int, images: int, tokens_per_image: int, image_tokens: int = 0) -> dict:
    """OpenAI's `usage` block: input = the prompt's tokens in the model's own text tokenizer (what
    the text encoder reads, after its length cap) plus an edit's source image tokens, output = the
    image tokens decoded."""
    out = images * tokens_per_image
    read = text_tokens + image_tokens
    return {"input_tokens": read, "output_tokens": out, "total_tokens": read + out,
            "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": image_tokens}}


def request_error(errors: list[dict]) -> APIError:
    """The 400 of a request that failed validation (FastAPI's, or `GenerationRequest.model_validate`
    on the edits route's form), as OpenAI words it: its first error, naming the field."""
    first = errors[0] if errors else {}
    loc = tuple(first.get("loc", ()))
    param, message, kind = validation_param(loc), first.get("msg", "invalid request"), first.get("type")
    if kind == "json_invalid":
        param, message = None, "the request body is not valid JSON"
    elif kind in ("dict_type", "model_attributes_type") and loc == ("body",):
        param, message = None, "the request body must be a JSON object, sent as Content-Type: application/json"
    elif kind == "missing" and param is None:
        message = "the request body is empty: send a JSON object, as Content-Type: application/json"
    elif kind == "missing":
        message = f"'{param}' is required"
    elif param:
        message = f"'{param}': {message}"
    return APIError(400, message, param, "missing" if kind == "missing" else "invalid_value")


def validation_param(loc: tuple) -> str | None:
    """The field name of a pydantic/FastAPI error location such as ("body", "n")."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or None
