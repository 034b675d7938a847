"""`muse serve`: serve a model root over HTTP on this machine with one command.

    muse serve --checkpoint ROOT [--port 8000] [--host 127.0.0.1] [--config serve/config.yaml]

joins Ray as every entry point does (`jobs.cluster`: RAY_ADDRESS, a `ray start` cluster on this
node, or a new local Ray), starts Serve's HTTP proxy on host:port, deploys
`serve.app:build_app` and blocks until Ctrl-C. `--config` takes a Ray Serve config file (the args of
its first application are used; `serve/config.yaml` is one) or a plain YAML mapping of AppArgs
fields; --checkpoint overrides its `checkpoint`, and --host and --port its `http_options`. The flags, the
config and the model root's config files are checked before Ray starts. Set MUSE_API_KEY to require
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


def parse_args(argv: list[str] | None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="muse serve", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The API: POST /v1/images/generations, POST /v1/images/edits, "
                                            "GET /v1/models, GET /healthz, and a web page at /.")
    parser.add_argument("--checkpoint", help="model root (local path or s3://); required unless --config has it")
    parser.add_argument("--port", type=int, help="HTTP port (default: the config's http_options.port, else 8000)")
    parser.add_argument("--host", help="address to listen on (default: the config's http_options.host, else "
                                       "127.0.0.1, loopback only)")
    parser.add_argument("--config", help="YAML: a Ray Serve config (serve/config.yaml) or a mapping of AppArgs")
    parser.add_argument("--num-cpus", type=int, default=max(4, os.cpu_count() or 1),
                        help="logical CPUs of a local Ray (default: max(4, cores)); ignored when joining a cluster")
    return parser, parser.parse_args(argv)


def resolve(parser: argparse.ArgumentParser, args: argparse.Namespace):
    """(AppArgs, host, port) from the flags and --config, with the model root checked, before Ray
    starts: every mistake a flag or the config can hold is one `muse serve: error:` line (exit 2)."""
    from pydantic import ValidationError

    from muse.checkpoint import check_root_weights
    from muse.components import check_root
    from serve.config import AppArgs, load_config_file

    try:
        data, http = load_config_file(args.config) if args.config else ({}, {})
    except (OSError, ValueError) as e:
        parser.error(f"--config: {e}")
    if args.checkpoint:
        data["checkpoint"] = args.checkpoint
    if "checkpoint" not in data:
        parser.error("give --checkpoint ROOT (or a config with `checkpoint`)")
    try:
        app_args = AppArgs.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'args'}: {err['msg']}" for err in e.errors())
        parser.error(f"--config: {problems}")
    host = args.host or http.get("host") or "127.0.0.1"
    port = args.port if args.port is not None else http.get("port", 8000)
    if not isinstance(port, int) or not 1 <= port <= 65535:
        parser.error(f"--port must be 1-65535, got {port!r}")
    try:
        check_root(app_args.checkpoint)
        check_root_weights(app_args.checkpoint)  # a replica failing on it would retry, each with a traceback
    except (OSError, ValueError) as e:
        parser.error(f"--checkpoint: {e}")
    return app_args, host, port


def port_taken(host: str, port: int) -> str | None:
    """Why host:port cannot be listened on (another server holds it, no such address), or None."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            # As servers bind: a port whose last server just stopped (TIME_WAIT) is free to listen on.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        return e.strerror or str(e)
    return None


def main(argv: list[str] | None = None) -> None:
    parser, args = parse_args(argv)
    app_args, host, port = resolve(parser, args)

    from ray import serve

    from jobs.cluster import LocalPathRefused, RayUnreachable, check_shared_paths, cluster_address, join_ray
    from serve.app import build_app, start_serve

    # On a Ray of its own, Serve's proxy will listen here; on a cluster, one may be listening already.
    if cluster_address() is None and (why := port_taken(host, port)):
        parser.error(f"cannot listen on {host}:{port}: {why} (pick another --port)")
    stop, serving = threading.Event(), threading.Event()

    def on_signal(*_) -> None:
        # The first Ctrl-C (or SIGTERM) asks for a clean shutdown; another one stops waiting for it.
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if not serving.is_set():  # the models may take minutes to load: say that it was heard
            print("muse serve: stopping once the models have loaded (Ctrl-C again to stop at once)", flush=True)

    # Before Ray starts too: a signal while it starts would otherwise kill this process and leave
    # Ray's agents running on their own.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        local = join_ray(num_cpus=args.num_cpus, include_dashboard=False, quiet=False)  # replicas' logs on the console
    except KeyboardInterrupt:  # a second signal while Ray started
        import ray

        ray.shutdown()
        raise SystemExit("muse serve: stopped while Ray started") from None
    except RayUnreachable as e:
        parser.exit(2, f"muse serve: error: {e}\n")
    signal.signal(signal.SIGTERM, on_signal)  # join_ray's own handler replaced it
    try:
        check_shared_paths({"--checkpoint": app_args.checkpoint})  # replicas on other nodes load it too
    except LocalPathRefused as e:
        if local:
            import ray

            ray.shutdown()
        raise SystemExit(f"muse serve: {e}") from None
    at_once = False
    try:
        if stop.is_set():
            raise KeyboardInterrupt  # asked to stop while Ray started
        start_serve(host, port)
        print(f"muse serve: starting {app_args.checkpoint} (loading the models)", flush=True)
        serve.run(build_app(app_args), name=APP_NAME, route_prefix="/", blocking=False)
        serving.set()
        if not stop.is_set():
            print(f"muse serve: serving {app_args.checkpoint} at http://{host}:{port}/  (Ctrl-C to stop)",
                  flush=True)
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:  # a second signal while starting: nothing was served yet, nothing to drain
        at_once = True
    finally:
        try:
            if at_once:
                print("muse serve: stopping at once", flush=True)
                stop_serving(APP_NAME, local, at_once=True)
            else:
                print("muse serve: stopping; the requests in flight finish first (Ctrl-C again to stop at once)",
                      flush=True)
                stop_serving(APP_NAME, local, app_args.limits.request_timeout_s)
        except KeyboardInterrupt:  # Ray's processes still go when this one exits
            print("muse serve: stopped without waiting for Serve to shut down", flush=True)


def stop_serving(app_name: str, local: bool, drain_s: float = 300.0, at_once: bool = False) -> None:
    """Undo what `muse serve` started: on its own local Ray, Serve and Ray; on a cluster it joined
    (RAY_ADDRESS, or a `ray start` one on this node), only its app, leaving the cluster's other
    Serve apps and its HTTP proxy running. `at_once`: stopped before anything was served (no drain)."""
    import ray
    from ray import serve

    # The ingress drains first, refusing new requests, while every model behind it still runs: deleting
    # the app at once would stop the super-res and decoder replicas that its requests still need.
    # Then Serve stops each replica once it holds nothing. A second Ctrl-C stops waiting.
    board = None if at_once else drain_ingress(app_name, drain_s)
    try:
        if not (at_once and local):  # (Ray's shutdown below takes a local app with it)
            serve.delete(app_name)
    except Exception as e:  # noqa: BLE001 - the app never started
        print(f"muse serve: no app to delete ({type(e).__name__})", flush=True)
    if board is not None:
        ray.kill(board)
    if local:
        ray.shutdown()  # takes Serve with it; serve.shutdown() first only races its controller's own exit
    print("muse serve: stopped", flush=True)


def drain_ingress(app_name: str, drain_s: float):
    """Have every replica of the app's ingress refuse new requests and wait for those in flight
    (`serve.draining`); returns the drain board, which keeps them refusing until it is killed."""
    from serve.draining import drain, running_ingress_replicas

    try:
        if not running_ingress_replicas(app_name):  # not started, or not this server's app
            return None
        board, left = drain(app_name, drain_s, waiting=lambda n: print(
            f"muse serve: draining: {n} request(s) still in flight", flush=True))
    except Exception as e:  # noqa: BLE001 - Serve or the ingress already gone: nothing to drain
        print(f"muse serve: nothing to drain ({type(e).__name__})", flush=True)
        return None
    if left:
        print(f"muse serve: {left} request(s) still in flight after {drain_s:g} s; stopping anyway", flush=True)
    return board


if __name__ == "__main__":
    main()
