"""HTTP load on the serving app, on loopback, with batching on and off in the same run.

    python benchmarks/serve_load.py                      # tiny random model, 24 base steps, 64x64
    python benchmarks/serve_load.py --open-loop          # + 0.5x / 1x / 2x of measured capacity
    python benchmarks/serve_load.py --checkpoint ROOT --size 512x512 --duration 20

Closed loop: each of `concurrency` clients sends a request, waits for the answer, and sends the next,
for `duration` seconds (after a short warm-up): requests/s, p50/p99 latency and errors.
Open loop (`--open-loop`): capacity is measured first (the best closed-loop req/s; give the
windows time for a full batch to finish, e.g. `--duration 24 --rounds 2`); then requests arrive at fixed intervals at 0.5x, 1x and 2x that rate whatever the
answers: accepted req/s, p50/p99 of accepted requests, rejected (429/503) and other 5xx or failed
counts, and the histogram of rows per base forward. Then cancellation recovery: 8 streams leave
after their first preview; the time until the base scheduler holds no rows, and the next request's
latency against an idle one.
Two copies of the app run side by side: "on" with the scheduler's row budget `--max-rows`, "off"
with a budget of 1 (one request per forward), everything else identical; they take turns in short
windows so that load swings on a shared machine hit both alike. Requests go only to 127.0.0.1 and
each has a timeout, so the load is bounded in count and time.
Prints Markdown tables (for benchmarks/RESULTS.md) and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import httpx

from machine import describe

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
    p.add_argument("--max-rows", type=int, default=32, help="row budget per forward when batching is on")
    p.add_argument("--batch-wait", type=float, default=0.01, help="batch_wait_timeout_s when batching is on")
    p.add_argument("--open-loop", action="store_true", help="also run open-loop load at --loads x capacity")
    p.add_argument("--loads", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--open-duration", type=float, default=10.0, help="seconds of arrivals per load and mode")
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

    batch = {"max_rows": args.max_rows if mode == "on" else 1, "batch_wait_timeout_s": args.batch_wait}
    gpu = {"num_gpus": 0.1} if args.device.startswith("cuda") else {}  # 2 apps x 4 models share one GPU
    gen = {"batching": batch, "max_ongoing_requests": max(32, args.max_rows), **gpu}  # queues: the defaults
    app_args = AppArgs(checkpoint=root, device=args.device, api_key="",
                       sampling={"steps": args.steps, "superres_steps": args.superres_steps},
                       base=gen, superres=gen, text_encoder=gpu, decoder=gpu)
    serve.run(build_app(app_args), name=f"{APP}_{mode}", route_prefix=MODES[mode], blocking=False)


def base_stats(mode: str) -> dict:
    from ray import serve

    return serve.get_deployment_handle("BaseGenerator", app_name=f"{APP}_{mode}").stats.remote().result()


async def base_stats_async(mode: str) -> dict:
    from ray import serve

    return await serve.get_deployment_handle("BaseGenerator", app_name=f"{APP}_{mode}").stats.remote()


def decode_sizes(mode: str, key: str = "batch_sizes") -> dict[int, int]:
    """Requests ("batch_sizes") or budget rows ("rows_per_forward") per base forward so far."""
    return {int(k): v for k, v in base_stats(mode)[key].items()}


def grown(before: dict[int, int], after: dict[int, int]) -> dict[int, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v > before.get(k, 0)}


async def open_loop(url: str, rate: float, duration: float, body: dict, timeout: float) -> dict:
    """Requests sent every 1/rate s for `duration` s, answered or not -> counts and latencies."""
    n = max(1, round(rate * duration))
    codes: list[int] = []
    accepted: list[float] = []
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            sent = time.perf_counter()
            try:
                r = await http.post("/v1/images/generations", json={**body, "seed": i})
                code = r.status_code
            except httpx.HTTPError:
                code = 0  # no answer within the timeout, or a dropped connection
            codes.append(code)
            if code == 200:
                accepted.append(time.perf_counter() - sent)

        await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - start
    lat = sorted(accepted)
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")  # noqa: E731
    span = max(elapsed, n / rate)  # at least the arrival window: a short tail must not inflate the rate
    return {"sent": n, "accepted": len(lat), "accepted_rps": len(lat) / span, "p50_s": q(0.5), "p99_s": q(0.99),
            "rejected": sum(c in (429, 503) for c in codes), "errors": sum(c == 0 or (c >= 500 and c != 503)
                                                                          for c in codes),
            "slowest_s": max(lat) if lat else float("nan")}


async def cancellation_recovery(url: str, mode: str, body: dict, timeout: float, streams: int = 8) -> dict:
    """`streams` long streams leave after their first preview -> seconds until the base scheduler
    holds no rows, and the next request's latency over an idle one's."""
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as http:
        async def timed() -> float:
            sent = time.perf_counter()
            await http.post("/v1/images/generations", json=body)
            return time.perf_counter() - sent

        idle = min([await timed() for _ in range(3)])

        async def leave_early(i: int) -> None:
            stream = {**body, "stream": True, "steps": 100, "partial_images": 3, "seed": 1000 + i}
            async with http.stream("POST", "/v1/images/generations", json=stream) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        return

        await asyncio.gather(*(leave_early(i) for i in range(streams)))
        gone = time.perf_counter()
        while (await base_stats_async(mode))["in_flight_rows"] and time.perf_counter() - gone < timeout:
            await asyncio.sleep(0.01)
        freed = time.perf_counter() - gone
        after = await timed()
    return {"rows_freed_s": freed, "idle_s": idle, "next_s": after}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    import ray
    from ray import serve

    from muse.checkpoint import init_model_root
    from serve.app import unused_port

    tmp = tempfile.TemporaryDirectory()
    root = args.checkpoint
    if root is None:
        root = os.path.join(tmp.name, "tiny")
        init_model_root("tiny", root)
    port = unused_port()
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
                      f"p99 {row['p99_s']:.3f}s  errors {row['errors']}  requests per base forward "
                      f"{row['base_decode_sizes']}", flush=True)
        if args.open_loop:
            results += run_open_loop(port, body, args, results)
    finally:
        serve.shutdown()
        ray.shutdown()
        tmp.cleanup()

    print(f"\nmachine at the end: {describe(args.device)}; size {args.size}, "
          f"{args.steps} base steps{'' if args.size == '64x64' else f' + {args.superres_steps} super-res'}, "
          f"{args.duration:g} s per level and mode in {args.rounds} alternating windows\n")
    print("| batching | concurrency | req/s | p50 (s) | p99 (s) | errors | requests per base forward (size: count) |")
    print("|---|---|---|---|---|---|---|")
    for r in sorted([r for r in results if "concurrency" in r], key=lambda r: (r["batching"] != "on", r["concurrency"])):
        print(f"| {r['batching']} | {r['concurrency']} | {r['rps']:.2f} | {r['p50_s']:.3f} | {r['p99_s']:.3f} | "
              f"{r['errors']} | {r['base_decode_sizes']} |")
    open_rows = [r for r in results if "load" in r]
    if open_rows:
        print("\n| batching | load | offered req/s | accepted req/s | p50 (s) | p99 (s) | rejected (429/503) | "
              "5xx / failed | budget rows per base forward (rows: count) |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in sorted(open_rows, key=lambda r: (r["batching"] != "on", r["load"])):
            print(f"| {r['batching']} | {r['load']:g}x | {r['offered_rps']:.2f} | {r['accepted_rps']:.2f} | "
                  f"{r['p50_s']:.3f} | {r['p99_s']:.3f} | {r['rejected']} | {r['errors']} | {r['rows_per_forward']} |")
        print("\n| batching | 8 streams leave: rows freed after (s) | idle request (s) | next request (s) |")
        print("|---|---|---|---|")
        for r in results:
            if "rows_freed_s" in r:
                print(f"| {r['batching']} | {r['rows_freed_s']:.3f} | {r['idle_s']:.3f} | {r['next_s']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=1)
    return results


def run_open_loop(port: int, body: dict, args: argparse.Namespace, closed: list[dict]) -> list[dict]:
    """0.5x / 1x / 2x of the capacity the closed loop measured (the best req/s of any level and
    mode), both modes taking turns at each load; then cancellation recovery per mode."""
    best = max(closed, key=lambda r: r["rps"])
    capacity = best["rps"]
    print(f"\ncapacity (closed loop, c={best['concurrency']}, batching {best['batching']}): {capacity:.2f} req/s",
          flush=True)
    rows = []
    for load in args.loads:
        for mode, prefix in MODES.items():
            before = decode_sizes(mode, "rows_per_forward")
            row = asyncio.run(open_loop(f"http://127.0.0.1:{port}{prefix}", load * capacity, args.open_duration,
                                        body, args.timeout))
            row = {"batching": mode, "load": load, "offered_rps": load * capacity, **row,
                   "rows_per_forward": grown(before, decode_sizes(mode, "rows_per_forward"))}
            rows.append(row)
            print(f"open loop {mode:>3} {load:g}x  accepted {row['accepted_rps']:.2f} req/s  p50 {row['p50_s']:.3f}s  "
                  f"p99 {row['p99_s']:.3f}s  rejected {row['rejected']}  5xx/failed {row['errors']}", flush=True)
            deadline = time.perf_counter() + args.timeout
            while base_stats(mode)["in_flight_rows"] and time.perf_counter() < deadline:
                time.sleep(0.1)  # drained before the next window
    for mode, prefix in MODES.items():
        rec = asyncio.run(cancellation_recovery(f"http://127.0.0.1:{port}{prefix}", mode, body, args.timeout))
        rows.append({"batching": mode, **rec})
        print(f"cancellation {mode:>3}: rows freed after {rec['rows_freed_s']:.3f}s, next request "
              f"{rec['next_s']:.3f}s (idle {rec['idle_s']:.3f}s)", flush=True)
    return rows


if __name__ == "__main__":
    main()
