"""Training throughput of the base stage: tokens/s per worker, and MFU on a GPU.

CPU (default): the real Ray Train path (`jobs.stages.run_stage("base", ...)`: TorchTrainer, gloo,
dataset shards, the masked-token step, checkpoint at the end) with 1 and then 2 workers of one CPU
each, in the same run, on synthetic token shards. The reported rate is the last logging window
(the second half of the steps), so worker start-up and the first steps are not in it.

    python benchmarks/train.py [--presets base-tiny] [--workers 1,2] [--steps 40] [--batch-size 16]

GPU (`--device cuda`): one worker in-process (no Ray) running `jobs.base.BaseWorker.train_step` in
bf16 on random tokens and random 4096-d text embeddings standing in for T5-XXL:

    python benchmarks/train.py --device cuda --presets base-632m,base-3b --batch-size 64 [--compile]

MFU = model FLOPs/s ÷ peak bf16 FLOP/s (H100/H200 SXM: 989 TFLOP/s dense; `--peak-tflops` to
override), with model FLOPs = 6 · Σ(linear params × tokens through them) + 12 · layers · hidden ·
N · (N + L) for attention (fwd + bwd; the frozen text encoder is not counted).
Text is stored as embeddings in the synthetic shards, so the numbers are the transformer step alone.

Text ids against stored embeddings (`--text-storage TEXT_PRESET`): the same base step in one process,
alternating, once running the frozen text encoder on every batch and once reading its stored output:

    python benchmarks/train.py --text-storage t5-tiny [--presets base-tiny]
    python benchmarks/train.py --text-storage t5-xxl-shape --presets base-632m --device cuda --batch-size 32

The CPU attention kernel (`--cpu-attention`): `BaseWorker.train_step` in one process, alternating, in
fp32 and in bf16 autocast, each with the flash and the math SDPA kernel (the worker takes math in bf16):

    python benchmarks/train.py --cpu-attention [--presets base-tiny] [--batch-size 32] [--steps 30]

Denormal floats on CPU (`--cpu-denormals`): the 128 px tiny VQGAN's training step
(`VQGANWorker.train_step`, demo config) on 800 images of the demo's corpus, run once in a thread that flushes
denormals to zero (what Ray Train workers do, `jobs.parallel.configure_cpu_worker`) and once in a
thread that does not, same seed and data, rate per window of steps:

    python benchmarks/train.py --cpu-denormals [--steps 300] [--batch-size 8]

Checkpoint save time and step stall, today's full gather against sharded asynchronous checkpoints, 1 and
2 workers, uploads to a local S3 server (benchmarks/train_checkpoints.py):

    python benchmarks/train.py --checkpoint-bench [--presets base-tiny] [--steps 20] [--every 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
import torch

from machine import describe
from muse.config import preset

TEXT_LEN = 16


def write_shards(out: str, cfg, text_dim: int, rows: int, seed: int = 0) -> None:
    """Random token shards with fp16 text embeddings (pipelines.shards schema, text_storage "embeddings")."""
    import pyarrow as pa

    from pipelines.shards import shard_schema, write_table

    rng = np.random.default_rng(seed)
    n = cfg.num_tokens
    meta = {"tokens_lo_side": cfg.tokens_per_side, "tokens_hi_side": None, "text_storage": "embeddings",
            "text_dim": text_dim}
    schema = shard_schema(has_hi=False, text_storage="embeddings", meta=meta)
    table = pa.table({
        "key": [str(i) for i in range(rows)], "caption": ["synthetic"] * rows,
        "tokens_lo": list(rng.integers(0, cfg.codebook_size, (rows, n), dtype=np.int16)),
        "text_ids": [np.ones(TEXT_LEN, np.int32)] * rows,
        "text_emb": list(rng.standard_normal((rows, TEXT_LEN * text_dim)).astype(np.float16)),
        "text_len": [TEXT_LEN] * rows, "width": [256] * rows, "height": [256] * rows,
    }).cast(schema)
    write_table(out, table)


def cpu_ray(presets: list[str], workers: list[int], steps: int, batch: int) -> list[dict]:
    import ray

    from jobs.config import load_config
    from jobs.stages import run_stage

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=max(4, 2 * max(workers)), include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    rows = []
    for name in presets:
        cfg = preset(name)
        with tempfile.TemporaryDirectory() as tmp:
            tokens, root = os.path.join(tmp, "tokens"), os.path.join(tmp, "root")
            write_shards(tokens, cfg, cfg.text_dim, rows=max(workers) * batch * 4)
            for w in workers:
                section = {"model": name, "scaling.num_workers": w, "scaling.cpus_per_worker": 1,
                           "run.max_steps": steps, "run.batch_size": batch, "run.log_every": steps // 2,
                           "run.checkpoint_every": steps, "run.sample_every": 0, "run.progress": False,
                           "run.cache_data": True, "run.max_failures": 0, "run.name": f"bench_{name}_{w}",
                           "optim.warmup_steps": 1}
                train_cfg = load_config(None, [f"base.{k}={v}" for k, v in section.items()])
                start = time.time()
                [result] = run_stage("base", train_cfg, tokens, root)
                m = result.metrics
                rows.append({"preset": name, "device": "cpu", "workers": w, "batch_per_worker": batch,
                             "tokens_per_s_per_worker": m["tokens_per_s_per_worker"],
                             "tokens_per_s": m["tokens_per_s"], "wall_s": time.time() - start})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def gpu_inprocess(presets: list[str], steps: int, batch: int, peak_tflops: float | None, compile: bool) -> list[dict]:
    from jobs.base import BaseWorker
    from jobs.common import peak_flops
    from jobs.config import load_config
    from jobs.parallel import WorkerEnv
    from jobs.train_job import TrainJob
    from muse.config import T5_XXL_DIM, to_dict

    device = torch.device("cuda")
    peak = peak_flops(device, peak_tflops)
    rows = []
    for name in presets:
        cfg = preset(name)
        section = load_config(None, [f"base.model={name}", f"base.run.max_steps={steps + 5}",
                                     "base.optim.warmup_steps=1"]).base
        job = TrainJob(root=tempfile.mkdtemp(), component="base", model_config=to_dict(cfg), run_name="bench",
                       data_meta={"text_storage": "embeddings", "text_dim": T5_XXL_DIM})
        worker = BaseWorker(section, job, WorkerEnv(device=device, bf16=True))
        if compile:
            worker.wrapper = torch.compile(worker.wrapper)
        worker.reseed(0)
        batch_data = {"tokens_lo": torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), device=device),
                      "text_emb": torch.randn(batch, TEXT_LEN, T5_XXL_DIM, device=device),
                      "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool, device=device)}
        for step in range(5):
            worker.train_step(batch_data, step)
        torch.cuda.synchronize()
        start, flops = time.perf_counter(), 0.0
        for step in range(steps):
            flops += worker.train_step(batch_data, step)["flops"]
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        params = sum(p.numel() for p in worker.wrapper.parameters())
        rows.append({"preset": name, "device": torch.cuda.get_device_name(0), "workers": 1, "batch_per_worker": batch,
                     "params": params, "tokens_per_s_per_worker": batch * cfg.num_tokens * steps / seconds,
                     "tflops": flops / seconds / 1e12, "mfu": flops / seconds / peak if peak else None,
                     "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30})
        print(json.dumps(rows[-1]), flush=True)
        del worker
        torch.cuda.empty_cache()
    return rows


def text_storage_compare(name: str, text_preset: str, steps: int, batch: int, device: torch.device) -> list[dict]:
    """The base step with the frozen text encoder run on every step (shards of text ids) against the
    same step reading stored embeddings (text_storage "embeddings"), in one process, alternating."""
    from jobs.base import BaseWorker
    from jobs.config import load_config
    from jobs.parallel import WorkerEnv
    from jobs.train_job import TrainJob
    from muse import checkpoint
    from dataclasses import replace

    from muse.config import TextEncoderConfig, to_dict

    # "t5-xxl-shape": random weights at T5-XXL encoder's shape (24 layers, 4096 wide, 64 heads of 64, FF 10240),
    # for its cost on a machine without the real weights.
    text_cfg = (TextEncoderConfig(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240)
                if text_preset == "t5-xxl-shape" else preset(text_preset))
    cfg = replace(preset(name), text_dim=text_cfg.d_model)
    root = tempfile.mkdtemp()
    torch.manual_seed(0)
    encoder = checkpoint.build_component("text_encoder", text_cfg)
    checkpoint.save_component(encoder, checkpoint.component_uri(root, "text_encoder"))
    ids, mask = encoder.tokenize(["two red squares on the left and a blue circle on the right"] * batch)
    with torch.no_grad():
        emb = encoder.encode_ids(ids, mask)
    tokens = torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens))
    section = load_config(None, [f"base.run.max_steps={2 * steps + 10}", "base.optim.warmup_steps=1"]).base
    workers, batches = {}, {}
    for storage in ("ids", "embeddings"):
        job = TrainJob(root=root, component="base", model_config=to_dict(cfg), run_name="bench",
                       data_meta={"text_storage": storage, "text_dim": text_cfg.d_model})
        workers[storage] = BaseWorker(section, job, WorkerEnv(device=device, bf16=device.type == "cuda"))
        workers[storage].reseed(0)
        text = {"text_ids": ids, "text_mask": mask} if storage == "ids" else {"text_emb": emb, "text_mask": mask}
        batches[storage] = {k: v.to(device) for k, v in ({"tokens_lo": tokens} | text).items()}
    seconds = {"ids": 0.0, "embeddings": 0.0}
    for step in range(steps + 3):
        for storage, worker in workers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            worker.train_step(batches[storage], step)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= 3:  # warm-up steps are not timed
                seconds[storage] += time.perf_counter() - start
    rows = [{"preset": name, "device": device.type, "text": f"{text_preset} {storage}", "workers": 1,
             "batch_per_worker": batch, "s_per_step": seconds[storage] / steps,
             "tokens_per_s_per_worker": batch * cfg.num_tokens * steps / seconds[storage]} for storage in seconds]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def cpu_attention_compare(name: str, steps: int, batch: int) -> list[dict]:
    """The base step on CPU in fp32 and bf16, each with the flash and the math attention kernel, alternating.
    Each variant pins its kernel around the step; the flash rows also replace the worker's bf16 context,
    which would pick math inside it, with plain autocast."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from jobs.base import BaseWorker
    from jobs.config import load_config
    from jobs.parallel import WorkerEnv
    from jobs.train_job import TrainJob
    from muse.config import to_dict

    class PlainAutocastEnv(WorkerEnv):  # the step before the math kernel: autocast only
        def autocast(self):
            return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    cfg = preset(name)
    section = load_config(None, [f"base.run.max_steps={4 * steps + 20}", "base.optim.warmup_steps=1"]).base
    job = TrainJob(root=tempfile.mkdtemp(), component="base", model_config=to_dict(cfg), run_name="bench",
                   data_meta={"text_storage": "embeddings", "text_dim": cfg.text_dim})
    g = torch.Generator().manual_seed(0)
    data = {"tokens_lo": torch.randint(0, cfg.codebook_size, (batch, cfg.num_tokens), generator=g),
            "text_emb": torch.randn(batch, TEXT_LEN, cfg.text_dim, generator=g),
            "text_mask": torch.ones(batch, TEXT_LEN, dtype=torch.bool)}
    variants = {}
    for precision in ("fp32", "bf16"):
        for kernel in ("flash", "math"):
            env_cls = PlainAutocastEnv if kernel == "flash" else WorkerEnv
            torch.manual_seed(0)
            worker = BaseWorker(section, job, env_cls(bf16=precision == "bf16"))
            worker.reseed(0)
            backend = SDPBackend.FLASH_ATTENTION if kernel == "flash" else SDPBackend.MATH
            variants[(precision, kernel)] = (worker, backend)
    seconds = dict.fromkeys(variants, 0.0)
    for step in range(steps + 3):
        for key, (worker, backend) in variants.items():
            start = time.perf_counter()
            with sdpa_kernel([backend]):
                worker.train_step(data, step)
            if step >= 3:
                seconds[key] += time.perf_counter() - start
    rows = [{"preset": name, "device": "cpu", "text": f"{p} {k}", "workers": 1, "batch_per_worker": batch,
             "s_per_step": s / steps, "tokens_per_s_per_worker": batch * cfg.num_tokens * steps / s}
            for (p, k), s in seconds.items()]
    for r in rows:
        print(json.dumps(r), flush=True)
    return rows


def cpu_denormals_compare(steps: int, batch: int, window: int = 50) -> list[dict]:
    """The tiny 128 px VQGAN step with and without flushing denormals, each in its own thread (the flag
    is per thread), one after the other on the same images."""
    import threading

    from jobs.config import load_config
    from jobs.data import collate_images, read_images
    from jobs.demo import DEFAULT_CONFIG as DEMO_CONFIG
    from jobs.vqgan import VQGANWorker
    from jobs.parallel import WorkerEnv
    from jobs.train_job import TrainJob
    from muse.config import to_dict
    from muse.data.synthetic import write_corpus

    cfg = load_config(DEMO_CONFIG, [f"vqgan.run.max_steps={steps}"])
    section, vq_cfg = cfg.vqgan, preset(cfg.vqgan.hi_model)
    with tempfile.TemporaryDirectory() as corpus:  # the demo's corpus, read as the stage reads it
        write_corpus(corpus, 800, size=vq_cfg.resolution, holdout_fraction=0.2, grid=8)
        pixels = read_images(corpus, vq_cfg.resolution, cfg.tokenize).column("pixels").to_numpy(zero_copy_only=False)
    images = collate_images({"pixels": pixels}, vq_cfg.resolution)["images"]
    rows, threads = [], torch.get_num_threads()  # a new thread would otherwise start from the default

    def run(flush: bool) -> None:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(flush)
        job = TrainJob(root="", component="vqgan_hi", stage="vqgan", model_config=to_dict(vq_cfg), run_name="bench")
        torch.manual_seed(0)
        worker = VQGANWorker(section, job, WorkerEnv())
        start = time.perf_counter()
        for step in range(steps):
            worker.reseed(step)
            first = step * batch % len(images)
            worker.train_step({"images": images[first:first + batch]}, step)
            if (step + 1) % window == 0:
                took = time.perf_counter() - start
                rows.append({"preset": section.hi_model, "device": "cpu", "text": f"flush {flush} to {step + 1}",
                             "workers": 1, "batch_per_worker": batch, "s_per_step": took / window,
                             "tokens_per_s_per_worker": batch * vq_cfg.tokens_per_side ** 2 * window / took})
                print(json.dumps(rows[-1]), flush=True)
                start = time.perf_counter()

    for flush in (True, False):
        thread = threading.Thread(target=run, args=(flush,))
        thread.start()
        thread.join()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--presets", default=None, help="comma-separated base presets (cpu: base-tiny; "
                                                        "cuda: base-632m,base-3b)")
    parser.add_argument("--workers", default="1,2", help="CPU: Ray Train worker counts to compare (default 1,2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (cpu default 40, cuda 20)")
    parser.add_argument("--batch-size", type=int, default=None, help="per worker (cpu default 16, cuda 32)")
    parser.add_argument("--peak-tflops", type=float, help="accelerator peak bf16 TFLOP/s for MFU")
    parser.add_argument("--compile", action="store_true", help="cuda: torch.compile the model")
    parser.add_argument("--text-storage", metavar="TEXT_PRESET",
                        help="instead: the base step from text ids (the frozen encoder runs every step) against "
                             "stored embeddings, in one process, with this text-encoder preset (e.g. t5-tiny), or "
                             "t5-xxl-shape: random weights at T5-XXL's encoder size")
    parser.add_argument("--cpu-attention", action="store_true",
                        help="instead: the base step on CPU in fp32 and bf16, each with the flash and the math "
                             "attention kernel, in one process, alternating")
    parser.add_argument("--cpu-denormals", action="store_true",
                        help="instead: the tiny 128 px VQGAN step with and without flushing denormal floats")
    parser.add_argument("--checkpoint-bench", action="store_true",
                        help="instead: checkpoint save time and step stall, today's full gather against sharded "
                             "asynchronous checkpoints, in one Ray Train run per worker count, uploads to a local "
                             "S3 server (benchmarks/train_checkpoints.py)")
    parser.add_argument("--every", type=int, default=5, help="--checkpoint-bench: steps between checkpoints")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"machine: {describe(args.device)}", flush=True)
    if args.checkpoint_bench:
        from train_checkpoints import print_table, run

        rows = run((args.presets or "base-tiny").split(","), [int(w) for w in args.workers.split(",")],
                   args.steps or 20, args.every, args.batch_size or 8)
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        print_table(rows)
    elif args.cpu_attention:
        rows = cpu_attention_compare((args.presets or "base-tiny").split(",")[0], args.steps or 30,
                                     args.batch_size or 32)
    elif args.cpu_denormals:
        rows = cpu_denormals_compare(args.steps or 300, args.batch_size or 8)
    elif args.text_storage:
        if args.device == "cuda" and not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU")
        rows = text_storage_compare((args.presets or "base-tiny").split(",")[0], args.text_storage,
                                    args.steps or 20, args.batch_size or 16, torch.device(args.device))
    elif args.device == "cpu":
        presets = (args.presets or "base-tiny").split(",")
        rows = cpu_ray(presets, [int(w) for w in args.workers.split(",")], args.steps or 40, args.batch_size or 16)
    else:
        if not torch.cuda.is_available():
            parser.error("--device cuda needs a CUDA GPU")
        presets = (args.presets or "base-632m,base-3b").split(",")
        rows = gpu_inprocess(presets, args.steps or 20, args.batch_size or 32, args.peak_tflops, args.compile)
    if not args.checkpoint_bench:
        print(f"load average at the end {os.getloadavg()[0]:.1f}")
        for r in rows:
            mfu = f"  MFU {r['mfu']:.1%}" if r.get("mfu") else ""
            text = f"  {r['text']:<22}" if "text" in r else ""
            print(f"{r['preset']:<10} {r['device']:<6}{text} workers {r['workers']}  batch/worker "
                  f"{r['batch_per_worker']}  tokens/s/worker {r['tokens_per_s_per_worker']:,.0f}{mfu}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": describe(args.device), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
