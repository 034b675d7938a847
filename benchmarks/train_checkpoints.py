"""Checkpoint cost in a Ray Train run: today's full gather against sharded asynchronous checkpoints.

One Ray Train run per worker count (gloo, FSDP when 2 workers, one CPU each) trains the base
transformer on random tokens and checkpoints every `--every` steps into S3 (a moto server on
loopback, started here, so the upload really crosses HTTP). The first half of the checkpoints take
the old path (`jobs.common.save_gathered_state`: every tensor gathered to rank 0, which writes it,
then a synchronous upload and a wait for the commit); the second half the new one
(`jobs.checkpointing.save_sharded`: every rank writes its own shards, Ray uploads them in the
background). Reported, on rank 0, means over each half:

    save_s       writing the checkpoint to local disk (gather included for the full path)
    stall_s      how long the training loop stood still for the checkpoint (save + report)
    next_step_s  the step right after a checkpoint, against step_s, the median of the other steps

and, from the run's last checkpoint, resuming rank 0 as jobs.loop did before (its node downloads the
whole checkpoint) and as it does now (ranged reads of its own pieces): MB fetched and seconds.

    python benchmarks/train.py --checkpoint-bench [--presets base-tiny] [--workers 1,2]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
import uuid

import torch

MODES = ("full gather, sync upload", "sharded, async upload")


def bench_loop(config: dict) -> None:
    import ray.train
    from torch import nn

    from jobs.checkpointing import save_sharded
    from jobs.common import EMA, build_optimizer, build_scheduler, save_gathered_state
    from jobs.config import OptimSettings
    from jobs.masked import TrainWrapper
    from jobs.parallel import ray_worker_env, transformer_fsdp_units, wrap
    from muse.config import preset
    from muse.transformer import MaskedTransformer

    torch.set_num_threads(1)
    env = ray_worker_env("fsdp", bf16=False)
    torch.manual_seed(0)
    cfg = preset(config["preset"])
    model = MaskedTransformer(cfg)
    wrapper = wrap(TrainWrapper(model), env, transformer_fsdp_units(model))
    optim = OptimSettings(lr=1e-4, warmup_steps=1)
    opt = build_optimizer(wrapper, optim, env)
    sched = build_scheduler(opt, optim, config["steps"])
    ema = EMA(wrapper, 0.999)
    state = {"modules": {"model": wrapper}, "optimizers": {"model": opt}, "schedulers": {"model": sched}, "ema": ema}
    gen = torch.Generator().manual_seed(env.rank)
    batch = config["batch"]

    def step() -> float:
        start = time.perf_counter()
        ids = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), generator=gen)
        text = torch.randn(batch, 16, cfg.text_dim, generator=gen)
        logits = wrapper(ids, text, torch.ones(batch, 16, dtype=torch.bool))
        nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update(0)
        return time.perf_counter() - start

    every, steps = config["every"], config["steps"]
    step_s, rows = [], {m: {"save_s": [], "stall_s": [], "next_step_s": []} for m in MODES}
    after: str | None = None
    for i in range(1, steps + 1):
        took = step()
        (rows[after]["next_step_s"] if after else step_s).append(took)
        after = None
        if i % every:
            continue
        mode = MODES[0] if i <= steps // 2 else MODES[1]
        start = time.perf_counter()
        if mode == MODES[0]:  # what jobs.loop did before: gather to rank 0, upload, wait for the commit
            with tempfile.TemporaryDirectory() as d:
                save_gathered_state(d, step=i, env=env, counters={}, **state)
                saved = time.perf_counter()
                ckpt = ray.train.Checkpoint.from_directory(d) if env.is_main else None
                ray.train.report({"step": i}, checkpoint=ckpt)
            ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        else:  # what jobs.loop does now
            d = tempfile.mkdtemp(prefix="muse-bench-checkpoint-")
            save_sharded(d, step=i, env=env, counters={}, **state)
            saved = time.perf_counter()
            ray.train.report({"step": i}, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)
        rows[mode]["save_s"].append(saved - start)
        rows[mode]["stall_s"].append(time.perf_counter() - start)
        after = mode
    upload_wait = time.perf_counter()
    reported = ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
    upload_left = time.perf_counter() - upload_wait
    summary = {m: {k: statistics.mean(v) for k, v in r.items() if v} for m, r in rows.items()}
    summary["resume"] = resume_both_ways(reported[-1].checkpoint, state)
    summary["step_s"] = statistics.median(step_s)
    summary["params"] = sum(p.numel() for p in model.parameters())
    summary["async_upload_left_at_end_s"] = upload_left
    if env.is_main:
        from muse import storage

        storage.write_text(config["summary_uri"], json.dumps(summary))


def resume_both_ways(checkpoint, state: dict) -> dict:
    """Resume this rank from the last (sharded) checkpoint on S3 as jobs.loop did before (the node
    downloads the whole checkpoint, then loads it from disk) and as it does now (ranged reads of the
    pieces this rank needs): seconds and bytes fetched, each way."""
    import pyarrow.fs as pafs

    from jobs.checkpointing import load_training_state

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        pafs.copy_files(checkpoint.path, d, source_filesystem=checkpoint.filesystem,
                        destination_filesystem=pafs.LocalFileSystem())
        downloaded = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
        load_training_state(d, **state)
    download_s = time.perf_counter() - start
    start, stats = time.perf_counter(), {}
    load_training_state(checkpoint.path, filesystem=checkpoint.filesystem, stats=stats, **state)
    return {"download_s": download_s, "download_mb": downloaded / 1e6,
            "ranged_s": time.perf_counter() - start, "ranged_mb": stats["fetched_bytes"] / 1e6}


def run(presets: list[str], workers: list[int], steps: int, every: int, batch: int) -> list[dict]:
    import logging

    import boto3
    import ray
    from moto.server import ThreadedMotoServer
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from muse import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per S3 request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    endpoint = "http://%s:%d" % server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    os.environ.update(env)
    bucket = f"bench-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, 2 * max(workers)), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"} | env})
    out = []
    for name in presets:
        for w in workers:
            trainer = TorchTrainer(
                bench_loop, train_loop_config={"preset": name, "steps": steps, "every": every, "batch": batch,
                                               "summary_uri": f"s3://{bucket}/summary_{name}_{w}.json"},
                scaling_config=ScalingConfig(num_workers=w, resources_per_worker={"CPU": 1}),
                run_config=RunConfig(name=f"ckpt_{name}_{w}", storage_path=f"{bucket}/runs",
                                     storage_filesystem=storage.s3_filesystem()))
            trainer.fit()
            summary = json.loads(storage.read_text(f"s3://{bucket}/summary_{name}_{w}.json"))
            for mode in MODES:
                out.append({"preset": name, "workers": w, "params": summary["params"], "mode": mode,
                            "step_s": summary["step_s"], **summary[mode]})
                print(json.dumps(out[-1]), flush=True)
            print(f"  sharded uploads still running when the last step ended: "
                  f"{summary['async_upload_left_at_end_s']:.2f} s", flush=True)
            r = summary["resume"]
            print(f"  resuming rank 0 from the last checkpoint: whole download {r['download_mb']:.1f} MB in "
                  f"{r['download_s']:.2f} s, ranged reads {r['ranged_mb']:.1f} MB in {r['ranged_s']:.2f} s",
                  flush=True)
            out[-1]["resume"] = r
    server.stop()
    return out


def print_table(rows: list[dict]) -> None:
    print(f"{'preset':<10} {'workers':>7}  {'checkpoint':<26} {'save s':>7} {'stall s':>8} {'next step s':>12} "
          f"{'step s':>7}")
    for r in rows:
        print(f"{r['preset']:<10} {r['workers']:>7}  {r['mode']:<26} {r['save_s']:>7.3f} {r['stall_s']:>8.3f} "
              f"{r['next_step_s']:>12.3f} {r['step_s']:>7.3f}")
