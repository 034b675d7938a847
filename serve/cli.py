"""`muse serve`: serve a model root over HTTP on this machine with one command.

    muse serve --checkpoint ROOT [--port 8000] [--host 127.0.0.1] [--config serve/config.yaml]

joins Ray as every entry point does (`jobs.cluster`: RAY_ADDRESS, a `ray start` cluster on this
node, or a new local Ray), starts Serve's HTTP proxy on host:port, deploys
`serve.app:build_app` and blocks until Ctrl-C. `--config` takes a Ray Serve config file (the args of
its first application are used; `serve/config.yaml` is one) or a plain YAML mapping of AppArgs
fields; --checkpoint overrides its `checkpoint`. Set MUSE_API_KEY to require
`Authorization: Bearer <key>` on /v1/; without a key the API is open, so keep the default loopback host.

Ray 2.60 turns token authentication on for its own cluster APIs (`ray.init` writes the token); the
jobs CLI and SDK then need RAY_AUTH_MODE=token. The images API above is separate from that.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

APP_NAME = "muse"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="muse serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The API: POST /v1/images/generations, POST /v1/images/edits, "
                                            "GET /v1/models, GET /healthz, and a web page at /.")
    parser.add_argument("--checkpoint", help="model root (local path or s3://); required unless --config has it")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    parser.add_argument("--config", help="YAML: a Ray Serve config (serve/config.yaml) or a mapping of AppArgs")
    parser.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1),
                        help="logical CPUs of a local Ray (default: max(4, cores)); ignored when joining a cluster")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from serve.config import AppArgs, load_args

    data = load_args(args.config) if args.config else {}
    if args.checkpoint:
        data["checkpoint"] = args.checkpoint
    if "checkpoint" not in data:
        raise SystemExit("muse serve: give --checkpoint ROOT (or a config with `checkpoint`)")
    app_args = AppArgs.model_validate(data)

    import ray
    from ray import serve

    from jobs.cluster import LocalPathRefused, check_shared_paths, join_ray
    from serve.app import build_app, start_serve

    local = join_ray(num_cpus=args.num_cpus, include_dashboard=False, quiet=False)  # replicas' logs stay on the console
    try:
        check_shared_paths({"--checkpoint": app_args.checkpoint})  # replicas on other nodes load it too
    except LocalPathRefused as e:
        raise SystemExit(f"muse serve: {e}") from None
    stop = threading.Event()

    def on_signal(*_) -> None:
        # The first Ctrl-C (or SIGTERM) asks for a clean shutdown; another one stops waiting for it.
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        start_serve(args.host, args.port)
        print(f"muse serve: starting {app_args.checkpoint} (loading the models)", flush=True)
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
        if not stop.is_set():
            print(f"muse serve: serving {app_args.checkpoint} at http://{args.host}:{args.port}/  (Ctrl-C to stop)",
                  flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # a second signal while starting
        pass
    finally:
        try:
            print("muse serve: stopping", flush=True)
            stop_serving(APP_NAME, local)
        except KeyboardInterrupt:  # Ray's processes still go when this one exits
            print("muse serve: stopped without waiting for Serve to shut down", flush=True)


def stop_serving(app_name: str, local: bool) -> None:
    """Undo what `muse serve` started: on its own local Ray, Serve and Ray; on a cluster it joined
    (RAY_ADDRESS, or a `ray start` one on this node), only its app, leaving the cluster's other
    Serve apps and its HTTP proxy running."""
    import ray
    from ray import serve

    if local:
        serve.shutdown()
        ray.shutdown()
    else:
        serve.delete(app_name)


if __name__ == "__main__":
    main()
