"""Closed-loop HTTP load on the serving app, on loopback: requests/s, p50/p99 latency and errors at
several concurrencies, with @serve.batch batching on and off in the same run.

    python benchmarks/serve_load.py                      # tiny random model, 24 base steps, 64x64
    python benchmarks/serve_load.py --checkpoint ROOT --size 512x512 --duration 20

Each of `concurrency` clients sends a request, waits for the answer, and sends the next, for
`duration` seconds (after a short warm-up); requests go only to 127.0.0.1 and each has a timeout,
so the load is bounded in count and time. Two copies of the app run side by side: "on" batches with
max_batch_size `--max-batch-size`, "off" with max_batch_size 1 for the base and super-res
deployments, everything else identical; they take turns in short windows so that load swings on a
shared machine hit both alike.
Prints a Markdown table (for benchmarks/RESULTS.md) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import tempfile
import time

import httpx

APP = "muse_bench"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="model root (default: a tiny random one in a temp dir)")
    p.add_argument("--device", default="cpu", help="torch device of the model replicas, e.g. cuda")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=15.0,
                   help="measured seconds per concurrency level and mode (split over --rounds windows)")
    p.add_argument("--rounds", type=int, default=3, help="alternating on/off windows per concurrency level")
    p.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each window")
    p.add_argument("--size", default="64x64", help="requested size (the base size, or super-res)")
    p.add_argument("--steps", type=int, default=24, help="base decoding steps (Muse: 24)")
    p.add_argument("--superres-steps", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=16, help="batch size when batching is on")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s when batching is on")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args(argv)


async def closed_loop(url: str, concurrency: int, window: float, warmup: float, body: dict,
                      timeout: float) -> tuple[list[float], int, float]:
    """`concurrency` clients each sending back-to-back requests -> (latencies of the requests sent
    and answered inside the measured window, errors among them, the window's length in seconds)."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + window

    async def client(worker: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < stop_at:
            sent = time.perf_counter()
            try:
                r = await http.post("/v1/images/generations", json={**body, "seed": worker * 100_000 + i})
                ok = r.status_code == 200 and len(r.json()["data"]) == body["n"]
            except (httpx.HTTPError, ValueError, KeyError):
                ok = False
            i += 1
            if sent >= measure_from:
                if ok:
                    latencies.append(time.perf_counter() - sent)
                else:
                    errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
    # Requests sent before stop_at finish after it; the window they were sent in is what they cost.
    return latencies, errors, time.perf_counter() - measure_from


def summarize(latencies: list[float], errors: int, elapsed: float) -> dict:
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / elapsed if elapsed else 0.0,
            "p50_s": q(0.50), "p99_s": q(0.99), "mean_s": statistics.fmean(lat) if lat else float("nan")}


MODES = {"on": "/on", "off": "/off"}  # route prefix of the app with batching on / off


def deploy(root: str, mode: str, args: argparse.Namespace) -> None:
    from ray import serve

    from serve.app import build_app
    from serve.config import AppArgs

    batch = {"max_batch_size": args.max_batch_size if mode == "on" else 1, "batch_wait_timeout_s": args.batch_wait}
    gpu = {"num_gpus": 0.1} if args.device.startswith("cuda") else {}  # 2 apps x 4 models share one GPU
    gen = {"batching": batch, "max_ongoing_requests": max(64, 4 * args.max_batch_size), **gpu}
    app_args = AppArgs(checkpoint=root, device=args.device, api_key="",
                       sampling={"steps": args.steps, "superres_steps": args.superres_steps},
                       base=gen, superres=gen, text_encoder=gpu, decoder=gpu, ingress={"max_ongoing_requests": 128})
    serve.run(build_app(app_args), name=f"{APP}_{mode}", route_prefix=MODES[mode], blocking=False)


def decode_sizes(mode: str) -> dict[int, int]:
    from ray import serve

    stats = serve.get_deployment_handle("BaseGenerator", app_name=f"{APP}_{mode}").stats.remote().result()
    return {int(k): v for k, v in stats["batch_sizes"].items()}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import ray
    from ray import serve

    from muse.checkpoint import init_model_root

    tmp = tempfile.TemporaryDirectory()
    root = args.checkpoint
    if root is None:
        root = os.path.join(tmp.name, "tiny")
        init_model_root("tiny", root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    body = {"prompt": "a red circle above a blue square", "size": args.size, "n": 1, "response_format": "b64_json"}
    results = []
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode in MODES:
            deploy(root, mode, args)
        for c in args.concurrency:
            acc = {mode: ([], 0, 0.0) for mode in MODES}
            sizes = {mode: {} for mode in MODES}
            # Batching on and off take turns in short windows, so a shared machine's load swings hit
            # both alike.
            for _ in range(args.rounds):
                for mode, prefix in MODES.items():
                    before = decode_sizes(mode)
                    lat, err, elapsed = asyncio.run(closed_loop(f"http://127.0.0.1:{port}{prefix}", c,
                                                                args.duration / args.rounds, args.warmup, body,
                                                                args.timeout))
                    acc[mode] = (acc[mode][0] + lat, acc[mode][1] + err, acc[mode][2] + elapsed)
                    for k, v in decode_sizes(mode).items():
                        if v > before.get(k, 0):
                            sizes[mode][k] = sizes[mode].get(k, 0) + v - before.get(k, 0)
            for mode in MODES:
                row = {"batching": mode, "concurrency": c, **summarize(*acc[mode]),
                       "base_decode_sizes": dict(sorted(sizes[mode].items()))}
                results.append(row)
                print(f"batching {mode:>3}  c={c:>2}  {row['rps']:6.2f} req/s  p50 {row['p50_s']:.3f}s  "
                      f"p99 {row['p99_s']:.3f}s  errors {row['errors']}  requests per base decode "
                      f"{row['base_decode_sizes']}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{platform.node()}: {os.cpu_count()} cores, load average at the end {load}; size {args.size}, "
          f"{args.steps} base steps{'' if args.size == '64x64' else f' + {args.superres_steps} super-res'}, "
          f"{args.duration:g} s per level and mode in {args.rounds} alternating windows\n")
    print("| batching | concurrency | req/s | p50 (s) | p99 (s) | errors | requests per base decode (size: count) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted(results, key=lambda r: (r["batching"] != "on", r["concurrency"])):
        print(f"| {r['batching']} | {r['concurrency']} | {r['rps']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
              f"{r['errors']} | {r['base_decode_sizes']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
