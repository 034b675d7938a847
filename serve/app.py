"""The serving application: one deployment per model, chained under a FastAPI ingress.

    app = Ingress.bind(TextEncoder.bind(root), BaseGenerator.bind(root, ...),
                       SuperResGenerator.bind(root, ...), Decoder.bind(root), args)

`build_app(args)` is what `serve run serve.app:build_app checkpoint=ROOT`, `serve deploy
serve/config.yaml` and `muse serve` call. Every deployment's replicas or autoscaling, CPUs, GPU
fraction and concurrency come from `AppArgs` through `.options(...)`; the super-res stage is left out
when the model root has none (then only the base size is served).
"""

from __future__ import annotations

import logging
import os
import random
import socket

from ray import serve
from ray.serve import Application

from muse import checkpoint
from muse.checkpoint import check_root_weights
from muse.components import check_root
from muse.root_sampling import read_root_sampling
from serve.api import Ingress
from serve.config import AppArgs, Sampling
from serve.deployments import BaseGenerator, Decoder, SuperResGenerator, TextEncoder


def start_serve(host: str, port: int) -> None:
    """Serve's HTTP proxy on host:port for a one-command server (`muse serve`, the demo). Serve's
    controller and proxy, and this process's Serve client, log only what goes wrong: the caller says
    what is served, and the replicas' logs and the ingress's line per request stay on the console."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})


def unused_port(host: str = "127.0.0.1") -> int:
    """A port free on host now, for a server about to start there. It is drawn above Ray's worker ports
    (10002-19999) and below the kernel's ephemeral range, from which every bind(0) and outgoing
    connection takes its port: a port found free in that range may be taken by one of Ray's own
    processes before the server binds it."""
    low, high = 20000, _ephemeral_ports_start()
    for port in random.SystemRandom().sample(range(low, high), min(64, max(high - low, 0))):
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # all taken (or an unusual range): any port the kernel gives
        s.bind((host, 0))
        return s.getsockname()[1]


def _ephemeral_ports_start() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def with_root_sampling(sampling: Sampling, root: str) -> Sampling:
    """`sampling` with what its config left out taken from the root's recorded sampling
    (`muse.root_sampling`): a root trained by the demo's recipe draws its prompts at guidance 1, and
    the default 4 fills its canvas with shapes."""
    recorded = {name: value for name, value in read_root_sampling(root).recorded().items()
                if name not in sampling.model_fields_set}
    return sampling.model_copy(update=recorded) if recorded else sampling


def build_app(args: AppArgs) -> Application:
    """The Serve application for `args` (a pydantic model; Serve validates a config's `args` dict
    into it). The API key comes from `args.api_key`, else from the environment variable
    `args.api_key_env` where the app is built; with neither, the API is open (loopback use)."""
    if isinstance(args, dict):
        args = AppArgs.model_validate(args)
    check_root(args.checkpoint)
    check_root_weights(args.checkpoint)  # here, not in a replica that Serve restarts, tracebacks and all
    api_key = args.api_key or os.environ.get(args.api_key_env) or None
    root = args.checkpoint if "://" in args.checkpoint else os.path.abspath(args.checkpoint)
    args = args.model_copy(update={"api_key": api_key, "checkpoint": root,  # replicas run elsewhere
                                   "sampling": with_root_sampling(args.sampling, root)})
    root, device, sampling = args.checkpoint, args.device, args.sampling

    def deployment(cls, name: str, options: dict, access_log: bool = False):
        # A replica being replaced finishes what it holds: at least one request's time. The ingress's
        # access log has a line per HTTP request; the chain's calls behind it would add three more.
        options = {"graceful_shutdown_timeout_s": args.limits.request_timeout_s,
                   "logging_config": {"enable_access_log": access_log}, **options}
        return serve.deployment(cls, name=name).options(**options)

    text = deployment(TextEncoder, "TextEncoder", args.text_encoder.options()).bind(root, device)
    # A decode that makes no progress for a whole request's time fails the health check.
    generating = dict(choice_temperature=sampling.choice_temperature, preview_every=sampling.preview_every,
                      compile_step=sampling.compile, stuck_after_s=args.limits.request_timeout_s)
    base = deployment(BaseGenerator, "BaseGenerator", args.base.options()).bind(
        root, device, args.base.batching, **generating)
    superres = None
    if checkpoint.has_component(root, "superres") and checkpoint.has_component(root, "vqgan_hi"):
        superres = deployment(SuperResGenerator, "SuperResGenerator", args.superres.options()).bind(
            root, device, args.superres.batching, top_k=sampling.superres_top_k, **generating)
    decoder = deployment(Decoder, "Decoder", args.decoder.options()).bind(root, device)
    return deployment(Ingress, "Ingress", args.ingress.options(), access_log=True).bind(
        text, base, superres, decoder, args)
