"""Typed arguments of the serving app: what `build_app(args)` takes, what `serve/config.yaml` holds
under `applications[].args`, and what `muse serve --config` reads.

Every deployment's resources (replicas or autoscaling, CPUs, GPU fractions, concurrency) and every
batcher's size and wait come from here; nothing is hard-coded in a decorator. Unknown keys are
rejected, so a typo in the YAML fails at deploy time instead of being silently ignored.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from muse.config import RENAMED_TEMPERATURE, SAMPLING
from muse.data.images import PILLOW_MAX_PIXELS


def cpu_threads(num_cpus: float | None) -> int:
    """Torch threads for a replica that claims `num_cpus` CPUs: its whole CPUs, so a replica given 4
    computes on 4; at least 1, and 1 for a fractional claim (such replicas share a core). Rounded to
    Ray's resource unit (1e-4) first, so a claim of 4 read back as 3.99999 is still 4."""
    return max(1, math.floor(round(num_cpus or 0, 4)))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)  # no NaN or inf setting


class Autoscaling(Strict):
    """Ray Serve autoscaling for one deployment (a subset of `ray.serve.config.AutoscalingConfig`)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(60.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} > max_replicas {self.max_replicas}")
        return self


class Deployment(Strict):
    """Resources and concurrency of one deployment. Exactly one of `num_replicas` / `autoscaling`
    decides the replica count (autoscaling wins when both are given; the default is one replica)."""

    num_replicas: int | None = Field(None, ge=1)
    autoscaling: Autoscaling | None = None
    num_cpus: float = Field(0.25, ge=0)  # also its torch threads: cpu_threads(num_cpus)
    num_gpus: float = Field(0.0, ge=0)  # fractions share one GPU between deployments
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(32, ge=-1)  # callers past it get a quick 503 (-1: unbounded, not advised)

    def options(self) -> dict[str, Any]:
        """Keyword arguments for `Deployment.options(...)`."""
        out: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            out["num_replicas"] = self.num_replicas or 1
        return out


class IngressDeployment(Deployment):
    """The ingress's own Serve queue only holds requests on their way to its admission check, which
    answers past `limits.max_in_flight` with a quick 429 in OpenAI's shape; a deep queue keeps Serve's
    plain-text 503 for floods far beyond it. Its own defaults, so `ingress: {num_cpus: 0.5}` keeps them."""

    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(512, ge=-1)


class Batching(Strict):
    """The step scheduler of a generator replica (serve/scheduler.py): requests from different
    callers share each forward, up to `max_rows` rows. An image takes one row, two with guidance
    (conditional + unconditional). `max_rows: 1` turns batching off."""

    max_rows: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(0.01, ge=0)  # an idle replica waits this long to gather a batch


class Generator(Deployment):
    """A transformer deployment (base or super-res): resources plus its scheduler's row budget.

    A replica holds `max_ongoing_requests` requests: enough to fill the row budget and have the next
    ones waiting; Serve queues `max_queued_requests` more, then answers 503. Autoscaling should
    target about the requests that fill the budget (max_rows / 2 guided images), not more than
    a replica holds, so replicas are added when batches are full, not before."""

    batching: Batching = Batching()
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(16, ge=-1)

    @model_validator(mode="after")
    def _consistent(self) -> Generator:
        fill = max(1, self.batching.max_rows // 2)  # guided one-image requests that fill a forward
        if self.max_ongoing_requests < fill:
            raise ValueError(f"max_ongoing_requests {self.max_ongoing_requests} < max_rows / 2 = {fill}: "
                             "the row budget could never fill")
        target = self.autoscaling.target_ongoing_requests if self.autoscaling else None
        if target is not None and target > self.max_ongoing_requests:
            raise ValueError(f"autoscaling target_ongoing_requests {target} > max_ongoing_requests "
                             f"{self.max_ongoing_requests}: a replica can never reach it")
        return self


class Limits(Strict):
    """What the HTTP API accepts; requests beyond these get a 400 / 408 / 413 in OpenAI's error shape."""

    max_prompt_chars: int = Field(1000, ge=1)
    max_images: int = Field(4, ge=1)  # `n`
    max_steps: int = Field(100, ge=1)
    max_guidance_scale: float = Field(30.0, ge=0)
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024)
    body_timeout_s: float = Field(30.0, gt=0)  # for the whole body to arrive, else 408 (it holds a max_in_flight slot)
    # Pillow refuses images past its decompression-bomb limit (~179M pixels) whatever this says.
    max_image_pixels: int = Field(4096 * 4096, ge=1, le=PILLOW_MAX_PIXELS)
    request_timeout_s: float = Field(300.0, gt=0)
    max_in_flight: int = Field(48, ge=1)  # image requests per ingress replica; more get a quick 429
    max_retries: int = Field(1, ge=0, le=2)  # re-runs after a replica was lost (after a crash, one at most)


class Sampling(Strict):
    """Defaults for fields a request leaves out."""

    steps: int = Field(SAMPLING.steps, ge=1)  # base decoding steps (Muse: 24)
    superres_steps: int = Field(SAMPLING.superres_steps, ge=1)  # super-res decoding steps (Muse: 8)
    guidance_scale: float = Field(SAMPLING.guidance_scale, ge=0)
    choice_temperature: float = Field(SAMPLING.choice_temperature, ge=0)  # MaskGIT's re-masking noise
    # Super-res draws each code among its k likeliest (1: the likeliest); None: the whole codebook (Muse).
    superres_top_k: int | None = Field(None, ge=1)
    # torch.compile each generator's step (CUDA graphs on GPU); eager if that fails. The scheduler's
    # batches change shape as requests join and leave: a size that changes is compiled once more as a
    # free size, after which no new batch or prompt length compiles (CUDA graphs record once per shape).
    compile: bool = False
    edit_iterations: int = Field(SAMPLING.edit_iterations, ge=1)  # mask-free editing (Muse §3.3: ~100 at ~8%)
    edit_fraction: float = Field(SAMPLING.edit_fraction, gt=0, le=1)
    preview_every: int = Field(4, ge=1)  # streaming: one preview every k decoding steps

    @model_validator(mode="before")
    @classmethod
    def _renamed_temperature(cls, data):
        if isinstance(data, dict) and "temperature" in data:
            warnings.warn(f"sampling.{RENAMED_TEMPERATURE}", DeprecationWarning, stacklevel=2)
            data = {k: v for k, v in data.items() if k != "temperature"} | {
                "choice_temperature": data.get("choice_temperature", data["temperature"])}
        return data


class Files(Strict):
    """Where PNGs for `response_format: "url"` live until they expire. Without `uri` they are kept in
    the ingress replica's memory (fine for one ingress replica); with a local directory or s3:// URI
    shared by all ingress replicas, any replica can serve any URL."""

    uri: str | None = None
    ttl_s: float = Field(3600.0, gt=0)
    max_files: int = Field(512, ge=1)  # in-memory store only: past it, links are refused (503) until one expires
    public_url: str | None = None  # base of returned URLs; default: the URL the request came in on


class Cors(Strict):
    """Browser pages of other origins that may call the API (CORS). None by default: the web page at /
    is the API's own origin and needs none."""

    allow_origins: list[str] = []  # e.g. ["https://app.example.com"]; ["*"] for any origin
    max_age_s: int = Field(600, ge=0)  # how long a browser may cache a preflight's answer


class AppArgs(Strict):
    """Everything `build_app` needs. Only `checkpoint` is required."""

    checkpoint: str  # model root, local path or s3://
    device: str = "cpu"
    model_name: str = "muse"  # the id advertised by GET /v1/models
    api_key: str | None = None  # when None, the environment variable `api_key_env` is read
    api_key_env: str = "MUSE_API_KEY"
    limits: Limits = Limits()
    sampling: Sampling = Sampling()
    files: Files = Files()
    cors: Cors = Cors()
    ingress: IngressDeployment = IngressDeployment()
    text_encoder: Deployment = Deployment()
    base: Generator = Generator()
    superres: Generator = Generator()
    decoder: Deployment = Deployment()

    @model_validator(mode="after")
    def _files_every_ingress_serves(self) -> AppArgs:
        several = self.ingress.autoscaling is not None or (self.ingress.num_replicas or 1) > 1
        if several and self.files.uri is None:
            raise ValueError("more than one ingress replica keeps `url` images in each replica's memory, where the "
                             "others cannot serve them: set files.uri to a directory or s3:// URI they share")
        return self

    @model_validator(mode="after")
    def _admission_before_serve_queue(self) -> AppArgs:
        # Past the ingress's max_ongoing_requests Serve queues requests before they reach the admission
        # check, so they would wait there instead of getting their 429; one spare slot answers it.
        if self.limits.max_in_flight >= self.ingress.max_ongoing_requests:
            raise ValueError(f"limits.max_in_flight {self.limits.max_in_flight} must be below "
                             f"ingress.max_ongoing_requests {self.ingress.max_ongoing_requests}: otherwise requests "
                             "past it wait in Serve's queue instead of getting a 429; lower the one or raise the other")
        return self

    @model_validator(mode="after")
    def _gpus_for_cuda(self) -> AppArgs:
        if self.device.startswith("cuda"):
            models = ("text_encoder", "base", "superres", "decoder")
            starved = [name for name in models if getattr(self, name).num_gpus <= 0]
            if starved:
                raise ValueError(f"device {self.device!r} needs num_gpus > 0 (a fraction is fine) for {starved}: "
                                 "Ray hides the GPUs from replicas that do not ask for one")
        return self


def load_args(path: str | Path, app_name: str | None = None) -> dict[str, Any]:
    """The `args` mapping of a YAML file (`load_config_file`)."""
    return load_config_file(path, app_name)[0]


# What `muse serve` reads of a Serve config's http_options (the rest of Serve's are for `serve deploy`).
HTTP_OPTIONS = {"host", "port"}


def load_config_file(path: str | Path, app_name: str | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(args, http_options) of a YAML file, read once: either a Ray Serve config (`applications:
    [{args: ...}]`, the first application or the one named `app_name`, and its `http_options`) or a
    plain mapping of AppArgs fields (no http_options)."""
    data = _load_yaml(path)
    if "applications" not in data:
        return data, {}
    http = data.get("http_options") or {}
    if not isinstance(http, dict):
        raise ValueError(f"{path}: http_options must be a mapping")
    if unknown := sorted(set(http) - HTTP_OPTIONS):
        raise ValueError(f"{path}: http_options: `muse serve` reads host and port only, not {unknown}: drop them, "
                         "or deploy the file with `serve deploy`, which reads Serve's other options")
    if not isinstance(http.get("host", ""), str) or not isinstance(http.get("port", 0), int):
        raise ValueError(f"{path}: http_options: host must be a string and port an integer")
    apps = data["applications"] or []
    if not isinstance(apps, list) or not all(isinstance(app, dict) for app in apps):
        raise ValueError(f"{path}: applications must be a list of mappings (name, import_path, args, ...)")
    for app in apps:
        if app_name is None or app.get("name") == app_name:
            args = app.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError(f"{path}: the application's args must be a mapping of AppArgs fields")
            return dict(args), http
    raise ValueError(f"{path}: no application named {app_name!r}" if app_name else f"{path}: applications is empty")


def _load_yaml(path: str | Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: the top level must be a mapping")
    return data
