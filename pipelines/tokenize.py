"""Tokenize an image-caption corpus into Parquet token shards with Ray Data.

    read (one task per part) -> preprocess (caption ids) -> VQGAN pool (lo [+ hi])
        [-> text-encoder pool] -> write (CPU tasks: each block's rows of each part to a shard file)
        -> driver: small records only; commits each part to the manifest once all its rows are written

    on CPU: part list -> VQGAN pool (each actor reads, decodes, encodes and writes whole parts)
        [-> text-encoder pool -> write] -> driver, as above

The models run in actor pools (`compute=ray.data.ActorPoolStrategy`, `pipelines.models`), loaded
once per actor from the model root: one pool for the image tokenizers (each actor holds vqgan_lo and
vqgan_hi, so each pixel array goes only to the actor that encodes it), and one for the text encoder
when the shards store its embeddings (`text_storage: embeddings`). Token ids alone need no model:
decoding adds them. Pool sizes, CPUs/GPUs per actor and batch sizes come from `TokenizeConfig`, so
a cluster gives the VQGAN actors whole GPUs while decoding fans out over every CPU as tasks of its
own, its pixels travelling at the tokenizers' sizes, LZ4-packed where that pays
(`pipelines.preprocess.pack_pixels`). When the VQGAN actors run on CPU, each does all of a part
(`preprocess.placement`, `pipelines.models.PartTokens`): read and write tasks and a decoding pool
would only move the rows between processes that share the same cores, and start processes of their
own (benchmarks/RESULTS.md, "Whole parts in the CPU actors").
Image sizes come from the VQGAN configs in the model root. Bad samples never fail the job: they are
rejected by reason, counted in rejects.json and skipped by the model UDFs. No sample passes through
the driver: workers write the shards, and Ray Data's streaming executor runs in a coordinator actor
(`Coordinator`), so the driver only plans, commits small per-part records and reports; its CPU and
memory do not grow with the corpus or the length of the run.

Resumable, exactly once (see pipelines.manifest): a part is finished when its manifest entry, which
names its shard files, is committed; a re-run skips finished parts without reading them, deletes the
files a failed run left uncommitted, and refuses to mix outputs of different models, settings,
numerics (the VQGAN pool's device and precision) or inputs (`s3://b/c` and `s3://b/c/` are the same
input, and so are `./root` and `/abs/root` models). A driver keeps a heartbeat in the output while
it runs, and a second driver on the same output refuses to start instead of deleting the first
one's uncommitted shards (`output_runs.Heartbeat`; `--force-cleanup` when the first is known dead).
Why not Ray Data's `CheckpointConfig`: it filters finished rows by id *after* re-reading and
re-decoding the whole corpus, holds every finished id in memory, and has nowhere to record rejected
rows (which are never written), so a re-run would count them again. The manifest skips whole parts
unopened.

Faults: every S3 request is retried with backoff by the filesystem (`muse.storage`); a read or write
task that still fails on I/O is retried by Ray, and a part in a CPU actor is redone, each at most
`io_task_retries` times. A source that is itself bad is a counted reject; any other error is a bug
and fails the job.

Text storage (`text_storage` in the config):
- "ids" (default): T5/ByT5 token ids trimmed to the true length, ~100-500 bytes per caption.
  Training runs the frozen encoder on them; the text pool needs only the tokenizer.
- "embeddings": the encoder output in fp16 trimmed to the true length, plus the ids, written by the
  workers like every column. Training skips the encoder, but T5-XXL gives 4096 x 2 bytes per token:
  ~1 MB for a 128-token caption, so a billion captions is a petabyte.

Run: `muse tokenize --input URI --output URI --checkpoint ROOT` or, on a cluster,
`ray job submit --working-dir . -- python -m pipelines.tokenize ...` (Ray 2.60 uses token auth: set
RAY_AUTH_MODE=token for the jobs CLI). It joins Ray as every entry point does (`jobs.cluster`): the
cluster in RAY_ADDRESS, else one started on this node with `ray start`, else a local Ray for the run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections.abc import Callable

from jobs.cluster import LocalPathRefused, RayUnreachable, check_shared_paths
from jobs.placement import on_this_node
from muse import storage
from pipelines import corpus_data, manifest, output_runs, readers, shards
from pipelines.config import PoolConfig, TokenizeConfig, load_config
from pipelines.job_spec import (ResumeRefused, check_resumable, device_of, job_spec,  # noqa: F401 (job_spec: the tests')
                                resumed_spec, settings_as_before)
from pipelines.models import (ImageTokens, Models, PartTokens, TextTokens, check_loadable, for_workers,
                              load_tokenizer, resolve_models)
from pipelines.preprocess import preprocessed
from pipelines.rejects import CorpusRefused
from pipelines.room import check_room

__all__ = ["Models", "build", "load_tokenizer", "main", "resolve_models", "run"]


# ---------------------------------------------------------------------------------------------
# The dataset and the job.


def _pool(ds, udf: type, kwargs: dict, pool: PoolConfig, batch_size: int | None, **ray_remote_args):
    import ray

    return ds.map_batches(
        udf, fn_constructor_kwargs=kwargs, batch_format="pyarrow", batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        num_cpus=pool.num_cpus, num_gpus=pool.num_gpus, **ray_remote_args,
    )


def decodes_in_actors(cfg: TokenizeConfig) -> bool:
    """Whether the image-tokenizer actors read, decode and (with ids) write whole parts themselves
    (`PreprocessConfig.placement`). On CPU, tasks of their own only add object-store hops and
    processes that each load the libraries: benchmarks/RESULTS.md, "Decoding in the CPU actors" and
    "Whole parts in the CPU actors"."""
    placement = cfg.preprocess.placement
    return placement == "actors" or (placement == "auto" and cfg.vqgan_lo.num_gpus == 0)


def build(cfg: TokenizeConfig, parts: list[readers.Part], models: Models, lo_size: int,
          hi_size: int | None, *, output: str, run: str, schema):
    """read -> preprocess -> VQGANs [-> text encoder] -> write, as one streaming Ray Dataset whose rows
    are the writers' small per-block (or, from CPU actors, per-part) records (`shards.RECORD_SCHEMA`)."""
    io_retries = shards.io_retry_args(cfg.io_task_retries)
    # Token ids need only the tokenizer: decoding adds them, and no text pool runs.
    ids_only = cfg.text_storage == "ids"
    decode = {"lo_size": lo_size, "hi_size": hi_size, "text_ids": models.text_encoder if ids_only else None}
    tokenizers = [{"uri": models.vqgan_lo, "pixels": "pixels_lo", "tokens": "tokens_lo",
                   "batch_size": cfg.vqgan_lo.batch_size}]
    if models.vqgan_hi:
        tokenizers.append({"uri": models.vqgan_hi, "pixels": "pixels_hi", "tokens": "tokens_hi",
                           "batch_size": cfg.vqgan_hi.batch_size})
    actor = {"tokenizers": tokenizers, "device": device_of(cfg.vqgan_lo), "precision": cfg.precision,
             "num_cpus": cfg.vqgan_lo.num_cpus}
    write = {"out": output, "run": run, "schema": schema, "examples": cfg.examples_per_reason}
    in_actors = decodes_in_actors(cfg)
    if in_actors:
        # Whole parts in the actors: the part list's reads claim what the pool's actors claim, so
        # Ray Data fuses them into the pool ("ReadParts->MapBatches(PartTokens)"), and with ids the
        # actor writes too. Only the parts' records leave it.
        memory = cfg.preprocess.memory_mb * 2**20
        ds = corpus_data.part_list(parts, num_cpus=cfg.vqgan_lo.num_cpus, num_gpus=cfg.vqgan_lo.num_gpus, memory=memory)
        ds = _pool(ds, PartTokens, actor | {"reader": cfg.reader, "preprocess": decode | {"cfg": cfg.preprocess},
                                            "write": write if ids_only else None, "retries": cfg.io_task_retries},
                   cfg.vqgan_lo, None, memory=memory)
    else:
        ds = preprocessed(parts, cfg, pack=True, **decode)
        ds = _pool(ds, ImageTokens, actor, cfg.vqgan_lo, cfg.vqgan_lo.batch_size)
    if not ids_only:
        ds = _pool(ds, TextTokens, {"uri": models.text_encoder, "text_storage": cfg.text_storage,
                                    "device": device_of(cfg.text), "precision": cfg.precision,
                                    "num_cpus": cfg.text.num_cpus}, cfg.text, cfg.text.batch_size)
    ds.context.enable_progress_bars = cfg.ray_progress_bars
    ds.context.raise_original_map_exception = True  # an OSError stays one, so Ray retries the writer
    if ids_only and in_actors:
        return ds  # written by the actors
    # Workers write: a task per block, part of the stream, so Ray Data's backpressure reaches it.
    return ds.map_batches(shards.write_block, batch_format="pyarrow", batch_size=None, num_cpus=cfg.write_cpus,
                          fn_kwargs=write, **io_retries)


class Coordinator:
    """Runs the dataset's streaming executor in a process of its own, as Ray Train's split
    coordinator does, and streams the writers' records to the driver. Ray Data's scheduling loop
    wakes ten times a second or more for as long as a job runs and costs a share of a core
    (`benchmarks/tokenize_scale.py` reports it); here it costs that on a worker, so the driver does
    per-part work only and stays flat however long the job runs. The actor is owned by the driver:
    if the driver dies, it dies, and with it the pools it owns."""

    def __init__(self, *args, **kwargs):
        from jobs.progress import quiet_ray_loggers

        quiet_ray_loggers()
        self.ds = build(*args, **kwargs)

    def records(self):
        yield from self.ds.iter_batches(batch_size=None, batch_format="pyarrow")

    def finish(self) -> tuple[str, float]:
        """(Ray Data's per-stage stats, CPU-seconds this process has used)."""
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return self.ds.stats(), usage.ru_utime + usage.ru_stime


def run(input_uri: str, output: str, models: Models, cfg: TokenizeConfig | None = None,
        format: str = "auto", on_published: Callable[[dict], None] | None = None,
        progress: bool = True, reporter=None, force_cleanup: bool = False, retire_changed: bool = False) -> dict:
    """Tokenize every unfinished part of the corpus at `input_uri` into `output`; returns totals.
    `on_published(entry)` is called on this thread once a part's manifest entry is committed.
    Progress is a tqdm bar (`progress`), or goes to `reporter` (jobs.progress.Reporter: `update(done,
    metrics)`, `finish(line)`); without a reporter the plan's line and the summary are printed. Another
    driver writing to `output` (a fresh heartbeat) is refused with `output_runs.OutputInUse`; `force_cleanup` takes it for dead and deletes what it left uncommitted.
    Finished parts that are not in the input any more are refused, or with `retire_changed` retired
    (`manifest.retire`) and their images tokenized again in the parts that now hold them."""
    cfg = cfg or TokenizeConfig()
    input_uri, output = readers.canonical(input_uri), readers.canonical(output)
    models = for_workers(models)
    real_input, real_output = _resolved(input_uri), _resolved(output)  # through symlinks
    if real_output == real_input:
        raise CorpusRefused(f"the output {output} is the input: write the shards to another folder")
    if real_output.startswith(real_input.rstrip("/") + "/"):  # its Parquet shards would be read as corpus
        raise CorpusRefused(f"the output {output} lies inside the input {input_uri}: a later run, or a VQGAN "
                            "trained on that corpus, would read its shards as corpus; write it elsewhere")
    start = time.time()
    spec = job_spec(input_uri, cfg, models)
    check_loadable(models, cfg.text_storage == "embeddings")
    done = manifest.read_manifest(output)
    finished = set(done["part"].to_pylist())
    old_spec = resumed_spec(output, finished)
    cfg, part_ids, folder_cuts, sizes = settings_as_before(spec, old_spec, cfg)
    run_id = manifest.new_run_id(output)
    # The heartbeat is written before the cleanup looks for others': two drivers starting at once
    # see each other and both refuse, rather than both going on. It also keeps this run's plan files
    # (written into its folder while planning) from another driver's cleanup.
    heartbeat = output_runs.Heartbeat(output, run_id)
    heartbeat.beat()
    todo: list[readers.Part] = []
    not_read: list[str] = []  # what the corpus's listing passed over, said again in the summary
    try:
        removed = output_runs.remove_stale(output, done, run=run_id, force=force_cleanup)
        del done
        plan_dir = storage.join(output, manifest.SHARDS_DIR, run_id, manifest.PLAN_DIR)
        parts = _plan(input_uri, format, cfg, part_ids, folder_cuts, sizes, plan_dir, heartbeat,
                      progress and reporter is None, start, not_read)
        if any(p.format == "parquet" for p in parts):
            spec["parquet_parts"] = "whole row groups"  # outputs of the earlier row slices do not resume
        if folder_cuts == "names" and any(p.format == "folder" for p in parts):
            spec["folder_cuts"] = folder_cuts
        changed = check_resumable(output, spec, old_spec, finished, {p.id for p in parts}, retire_changed)
        retired = manifest.retire(output, run_id, changed) if changed else (0, 0)
        todo = [p for p in parts if p.id not in finished]
        if reporter is None:
            print(f"tokenize: planned {len(parts)} parts in {time.time() - start:.1f}s, {len(todo)} to do"
                  + (f"; removed {removed} files a failed run left" if removed else "")
                  + (f"; retired {retired[0]} finished parts ({retired[1]} samples) whose input changed"
                     if retired[0] else ""), flush=True)
        totals = _run_parts(todo, cfg, models, spec, output, run_id, heartbeat, start, on_published, progress,
                            reporter, "; ".join(not_read))
    finally:
        heartbeat.stop(remove_run=not todo)
    seconds = totals["seconds"]
    reasons = ", ".join(f"{k} {v}" for k, v in totals["rejects"]["by_reason"].items()) or "none"
    line = (f"{totals['accepted']} accepted, {totals['rejected']} rejected ({reasons}) in "
            f"{totals['parts']} parts; this run {len(todo)} parts ({len(parts) - len(todo)} already done), "
            f"{totals['run_rows']} samples in {seconds:.1f}s ({totals['run_rows'] / max(seconds, 1e-9):.1f} "
            f"samples/s) -> {output}")
    if "not_read" in totals:  # said at planning too, which a long job's log has long scrolled past
        line += f"; not read in the corpus: {totals['not_read']}"
    if reporter is not None:
        reporter.finish(line)
    else:
        print(f"tokenize: {line}", flush=True)
    return totals | {"removed": removed, "retired": retired[0]}


PLANNING_LINE_SECONDS = 10.0  # a long planning (a big folder corpus) says how far it is this often


def _plan(input_uri: str, format: str, cfg: TokenizeConfig, part_ids: str, folder_cuts: str, sizes: bool,
          spill: str, heartbeat: output_runs.Heartbeat, lines: bool, start: float,
          not_read: list[str]) -> list[readers.Part]:
    """The corpus's parts; a folder corpus's image lists go to plan files in `spill`. The heartbeat is
    kept while a big folder is listed, and with `lines` a line says how far it is. What the listing
    passed over is appended to `not_read`."""
    last = time.monotonic()

    def planned(images: int, parts: int, captions: int = 0, note: str | None = None) -> None:
        nonlocal last
        heartbeat.beat()  # when due
        if lines and time.monotonic() - last >= PLANNING_LINE_SECONDS:
            last = time.monotonic()
            so_far = (note if note else f"{images} images in {parts} parts" if images or not captions
                      else f"{captions} records of the captions file indexed")
            print(f"tokenize: planning: {so_far} so far ({time.time() - start:.0f}s)", flush=True)

    return readers.plan_parts(input_uri, format, cfg.reader, ids=part_ids, spill=spill, progress=planned,
                              folder_cuts=folder_cuts, sizes=sizes, not_read=not_read)


def _run_parts(todo: list[readers.Part], cfg: TokenizeConfig, models: Models, spec: dict, output: str,
               run_id: str, heartbeat: output_runs.Heartbeat, start: float, on_published, progress: bool,
               reporter, not_read: str) -> dict:
    """Tokenize `todo` as run `run_id`, commit each part as it finishes, then compact the manifest
    and write the totals (with `not_read`, what the listing passed over, when anything was); the
    driver's loop also keeps the heartbeat."""
    from tqdm import tqdm

    lo_size = spec["vqgan_lo"]["resolution"]
    hi_size = spec["vqgan_hi"]["resolution"] if spec["vqgan_hi"] else None
    rows, examples, stats, coordinator_cpu_s = 0, {}, "", 0.0
    if todo:
        import ray

        _init_ray(cfg)
        text = models.text_encoder if storage.is_s3(models.text_encoder) or os.path.isdir(models.text_encoder) else None
        check_shared_paths({"--input": todo[0].uri, "--output": output, "vqgan_lo": models.vqgan_lo,
                            "vqgan_hi": models.vqgan_hi, "text_encoder": text})  # (a cache name is no path)
        heartbeat.beat()
        meta = {"tokens_lo_side": lo_size // _factor(spec["vqgan_lo"]),
                "tokens_hi_side": hi_size // _factor(spec["vqgan_hi"]) if hi_size else None,
                "text_storage": cfg.text_storage,
                "text_dim": _text_dim(spec["text_encoder"])}
        schema = shards.shard_schema(has_hi=hi_size is not None, text_storage=cfg.text_storage, meta=meta)
        bar = tqdm(total=len(todo), unit="part", desc="tokenize", disable=not progress or reporter is not None,
                   smoothing=0.1)
        if reporter is not None:
            reporter.total = len(todo)
        assembler = manifest.PartAssembler(run_id, {p.id: json.dumps(p.describe()) for p in todo},
                                           cfg.examples_per_reason)
        log = manifest.ManifestLog(output, run_id, cfg.commit_seconds, fence=heartbeat.check)

        def published(entries: list[dict]) -> None:
            nonlocal rows
            for entry in entries:
                rows += entry["rows"]
                bar.update(1)
                rate = rows / max(time.time() - start, 1e-9)
                bar.set_postfix(images_per_s=f"{rate:.1f}", refresh=False)
                if reporter is not None:
                    reporter.update(bar.n, {"images/s": rate})
                if on_published is not None:
                    on_published(entry)

        coordinator = ray.remote(num_cpus=0, max_restarts=0)(Coordinator).options(**on_this_node()).remote(
            cfg, todo, models, lo_size, hi_size, output=output, run=run_id, schema=schema)
        try:
            records = coordinator.records.options(num_returns="streaming").remote()
            while True:
                heartbeat.beat()  # when due; waits below never outlast its interval
                if not ray.wait([records], timeout=heartbeat.due_in())[0]:
                    published(log.flush_if_due())
                    continue
                try:
                    ref = next(records)
                except StopIteration:
                    break
                for record in ray.get(ref).to_pylist():
                    entry = assembler.add(record)
                    if entry is not None:
                        published(log.add(entry))
                published(log.flush_if_due())
            published(log.flush())  # before the bar closes, so that it ends at every part
            stats, coordinator_cpu_s = ray.get(coordinator.finish.remote())
        except output_runs.OutputTakenOver:
            raise  # the files of its pending parts may be gone: nothing more is committed
        except BaseException:
            log.flush()  # parts finished before the failure stay finished
            raise
        finally:
            bar.close()
            ray.kill(coordinator)  # stops the pools too: they belong to it
            storage.delete(storage.join(output, manifest.SHARDS_DIR, run_id, manifest.PLAN_DIR))
        missing = assembler.incomplete()
        if missing:
            raise RuntimeError(f"{len(missing)} part(s) ended incomplete, e.g. {missing[:3]}; re-run to finish")
        if assembler.wrote and assembler.clean:
            manifest.mark_clean(output, run_id)
        examples = assembler.examples
    heartbeat.beat()
    totals = manifest.summarize(output, manifest.compact(output, run_id), examples, cfg.examples_per_reason,
                                not_read=not_read)
    return totals | {"run_parts": len(todo), "run_rows": rows, "seconds": time.time() - start,
                     "stats": stats, "coordinator_cpu_s": coordinator_cpu_s}


def _init_ray(cfg: TokenizeConfig) -> None:
    """Join Ray the platform's way (`jobs.cluster.join_ray`: RAY_ADDRESS, a `ray start` cluster on this
    node, or a local Ray). A local Ray gets enough logical CPUs for one actor of each pool plus read
    and preprocessing tasks: on a small machine, pools that claim every CPU would leave the read tasks
    unschedulable, a deadlock. The job's workers get this driver's S3 endpoint: on a cluster they
    inherit the rest of the node's environment."""
    import math

    from jobs.cluster import join_ray

    env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "MUSE_S3_MAX_ATTEMPTS")
           if k in os.environ}
    pools = cfg.vqgan_lo.min_size * cfg.vqgan_lo.num_cpus
    if cfg.text_storage == "embeddings":
        pools += cfg.text.min_size * cfg.text.num_cpus
    need = pools + 2 * cfg.preprocess.num_cpus + cfg.write_cpus
    join_ray(env, num_cpus=max(4, os.cpu_count() or 1, math.ceil(need)),
             local_env={"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"})
    check_room(cfg)  # an actor no node can hold would hang the job without a word


def _resolved(uri: str) -> str:
    return uri if storage.is_s3(uri) else os.path.realpath(uri)


def _text_dim(text: dict | None) -> int | None:
    """Width of a text encoder config: T5's d_model, or CLIP's hidden (an imported aMUSEd root)."""
    if not text:
        return None
    return text["d_model"] if "d_model" in text else text["hidden"]


def _factor(vqgan: dict) -> int:
    """Downsampling factor of a tokenizer config: our VQGAN's channel_mult, or the imported VQ's channels."""
    levels = vqgan["channel_mult"] if "channel_mult" in vqgan else vqgan["channels"]
    return 2 ** (len(levels) - 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="muse tokenize",
        description="Tokenize an image-caption corpus (Parquet, image folder or WebDataset; local, "
                    "file:// or s3://) into Parquet token shards with Ray Data: the image tokenizer's ids "
                    "for each image and the text encoder's token ids (or embeddings) for each caption. "
                    "Killed and run again with the "
                    "same arguments, it finishes the remaining parts and never duplicates a sample.",
        epilog="example: muse tokenize --input data/corpus --output data/tokens --checkpoint ROOT --config configs/tokenize-local.yaml",
    )
    parser.add_argument("--input", required=True, help="corpus file or directory (local, file:// or s3://)")
    parser.add_argument("--output", required=True, help="directory for token shards (local or s3://)")
    parser.add_argument("--checkpoint", help="model root with vqgan_lo/, text_encoder/ and optional vqgan_hi/")
    parser.add_argument("--vqgan", help="low-res VQGAN component directory (overrides ROOT/vqgan_lo)")
    parser.add_argument("--vqgan-hi", help="high-res VQGAN component directory (overrides ROOT/vqgan_hi)")
    parser.add_argument("--text-encoder", help="text encoder component directory, or a local Hugging Face "
                                               "T5 directory/cache name (overrides ROOT/text_encoder)")
    parser.add_argument("--format", choices=readers.formats(), default="auto", help="corpus format (default: detect)")
    parser.add_argument("--config", help="YAML with TokenizeConfig fields that differ from the defaults "
                                         "(see configs/tokenize-*.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set vqgan_lo.num_gpus=1 (repeatable)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar and no per-stage timing at the end (logs, CI); the plan's "
                             "line and the summary still print")
    parser.add_argument("--force-cleanup", action="store_true",
                        help="start even though another run's heartbeat in --output is fresh (that run "
                             "is dead, e.g. killed a moment ago), deleting the shards it left uncommitted")
    parser.add_argument("--retire-changed", action="store_true",
                        help="the corpus changed since finished parts were tokenized (files added, removed, "
                             "renamed or rewritten with another size): delete those parts' shards and "
                             "tokenize the parts that replace them")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        models = resolve_models(args.checkpoint, args.vqgan, args.vqgan_hi, args.text_encoder)
    except (ValueError, OSError) as e:  # one line, as every other refusal
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    try:
        totals = run(args.input, args.output, models, cfg, args.format, progress=not args.no_progress,
                     force_cleanup=args.force_cleanup, retire_changed=args.retire_changed)
    except (ResumeRefused, CorpusRefused, output_runs.OutputInUse, readers.NoInput, LocalPathRefused,
            RayUnreachable) as e:  # refused before any work
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except output_runs.OutputTakenOver as e:
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except OSError as e:
        if refused := storage.s3_refusal(e):  # a missing bucket, credentials that do not allow it
            parser.exit(2, f"{parser.prog}: error: {refused}\n")
        if refused := storage.access_refused(e):  # the corpus's folder, or an output this user may not write
            parser.exit(2, f"{parser.prog}: error: {refused}; the parts published so far stay\n")
        if failed := storage.s3_failure(e):  # S3 unreachable or throttling past every retry
            parser.exit(1, f"{parser.prog}: error: {failed} (after the retries of each request, "
                           "MUSE_S3_MAX_ATTEMPTS); the parts published so far stay, and the same command tokenizes "
                           "the rest\n")
        if (full := storage.full_disk(e)) is None:
            raise
        parser.exit(1, f"{parser.prog}: error: writing to {args.output}: {full.strerror or full}: free space there, or "
                       "give another --output; the parts published so far stay, and the same command tokenizes the "
                       "rest\n")
    except KeyboardInterrupt:  # Ctrl-C, or `ray job stop` (jobs.cluster.stop_on_sigterm)
        parser.exit(130, f"{parser.prog}: stopped; the parts published so far stay, and the same command "
                         "tokenizes the rest\n")
    if totals["stats"] and not args.no_progress:
        from jobs.progress import VERBOSE_ENV

        lines = None if os.environ.get(VERBOSE_ENV) else stage_times(totals["stats"])
        if lines is None:  # Ray Data's whole report (its rows are records of blocks or parts, not samples)
            print("tokenize: time per stage (Ray Data):\n" + totals["stats"], flush=True)
        else:
            print("tokenize: time per stage (Ray Data; work summed over its tasks; "
                  f"{VERBOSE_ENV}=1 for its whole report):\n" + "\n".join(lines), flush=True)


_OPERATOR = re.compile(r"^Operator \d+ (.+?): (\d+) tasks executed")
_TOTALS = ("Remote wall time", "Remote cpu time", "Output size bytes per block")
_TOTAL = re.compile(rf"^\* ({'|'.join(_TOTALS)}): .*?([\d.]+)\s*(us|ms|s)?\s+total")
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, None: 1.0}


def stage_times(stats: str) -> list[str] | None:
    """One line per Ray Data operator from its stats report (tasks, seconds of work and of CPU, bytes
    out), or None when the report has no operator in the expected form."""
    lines, current = [], None
    for line in stats.splitlines():
        if m := _OPERATOR.match(line.strip()):
            current = {"name": m.group(1), "tasks": int(m.group(2))}
            lines.append(current)
        elif current is not None and (m := _TOTAL.match(line.strip())):
            current[m.group(1)] = float(m.group(2)) * _UNITS[m.group(3)]
    if not lines or any(k not in op for op in lines for k in _TOTALS):
        return None
    width = max(len(op["name"]) for op in lines)
    return [f"  {op['name']:<{width}}  {op['tasks']:>5} task{'s' if op['tasks'] != 1 else ' '}"
            f"  {op['Remote wall time']:8.2f} s  ({op['Remote cpu time']:.2f} s CPU)"
            f"  {op['Output size bytes per block'] / 1e6:9.2f} MB out" for op in lines]


if __name__ == "__main__":
    main()
