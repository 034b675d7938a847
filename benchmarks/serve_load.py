"""Closed-loop HTTP load on the serving app, on loopback: requests/s, p50/p99 latency and errors at
several concurrencies, with @serve.batch batching on and off in the same run.

    python benchmarks/serve_load.py                      # tiny random model, 24 base steps, 64x64
    python benchmarks/serve_load.py --checkpoint ROOT --size 512x512 --duration 20

Each of `concurrency` clients sends a request, waits for the answer, and sends the next, for
`duration` seconds (after a short warm-up); requests go only to 127.0.0.1 and each has a timeout,
so the load is bounded in count and time. "Batching off" redeploys the same app with
max_batch_size 1 for the base and super-res deployments; everything else is identical.
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
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before each level")
    p.add_argument("--size", default="64x64", help="requested size (the base size, or super-res)")
    p.add_argument("--steps", type=int, default=24, help="base decoding steps (Muse: 24)")
    p.add_argument("--superres-steps", type=int, default=8)
    p.add_argument("--max-batch-size", type=int, default=16, help="batch size when batching is on")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s when batching is on")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--num-cpus", type=int, default=8, help="logical CPUs of the local Ray")
    p.add_argument("--json", help="write the results here as JSON")
    return p.parse_args(argv)


async def closed_loop(url: str, concurrency: int, duration: float, warmup: float, body: dict,
                      timeout: float) -> dict:
    """`concurrency` clients each sending back-to-back requests; stats over the measured window."""
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration

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
            done = time.perf_counter()
            i += 1
            if sent >= measure_from and done <= stop_at + timeout:
                if ok:
                    latencies.append(done - sent)
                else:
                    errors += 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        await asyncio.gather(*(client(w, http) for w in range(concurrency)))
    elapsed = max(time.perf_counter(), stop_at) - measure_from
    lat = sorted(latencies)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    return {"concurrency": concurrency, "requests": len(lat), "errors": errors,
            "rps": len(lat) / elapsed, "p50_s": q(0.50), "p99_s": q(0.99),
            "mean_s": statistics.fmean(lat) if lat else float("nan")}


def deploy(root: str, batching: bool, args: argparse.Namespace) -> None:
    from ray import serve

    from serve.app import build_app
    from serve.config import AppArgs

    batch = {"max_batch_size": args.max_batch_size if batching else 1, "batch_wait_timeout_s": args.batch_wait}
    gen = {"batching": batch, "max_ongoing_requests": max(64, 4 * args.max_batch_size)}
    app_args = AppArgs(checkpoint=root, api_key="", sampling={"steps": args.steps, "superres_steps": args.superres_steps},
                       base=gen, superres=gen, ingress={"max_ongoing_requests": 128})
    serve.run(build_app(app_args), name=APP, route_prefix="/", blocking=False)


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
    url = f"http://127.0.0.1:{port}"
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
    results = []
    body = {"prompt": "a red circle above a blue square", "size": args.size, "n": 1, "response_format": "b64_json"}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for batching in (True, False):
            deploy(root, batching, args)
            for c in args.concurrency:
                row = asyncio.run(closed_loop(url, c, args.duration, args.warmup, body, args.timeout))
                row["batching"] = "on" if batching else "off"
                results.append(row)
                print(f"batching {row['batching']:>3}  c={c:>2}  {row['rps']:6.2f} req/s  p50 {row['p50_s']:.3f}s  "
                      f"p99 {row['p99_s']:.3f}s  errors {row['errors']}", flush=True)
            base = serve.get_deployment_handle("BaseGenerator", app_name=APP).stats.remote().result()
            sizes = dict(sorted((int(k), v) for k, v in base["batch_sizes"].items()))
            print(f"  requests per base decode (size: count): {sizes}", flush=True)
            for row in results[-len(args.concurrency):]:
                row["base_decode_sizes"] = sizes
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"\n{platform.node()}: {os.cpu_count()} cores, load average at the end {load}; size {args.size}, "
          f"{args.steps} base steps{'' if args.size == '64x64' else f' + {args.superres_steps} super-res'}, "
          f"{args.duration:g} s per level\n")
    print("| batching | concurrency | req/s | p50 (s) | p99 (s) | errors |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['batching']} | {r['concurrency']} | {r['rps']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
              f"{r['errors']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
