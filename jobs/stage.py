"""What a training stage is: one `Stage` value per stage module, holding everything the driver, the
registry (`jobs.stages`) and `muse train <stage>` need.

    STAGE = Stage(name, summary, worker=StageWorker subclass, build=driver builder,
                  data="corpus" | "tokens", data_help, add_args=the stage's own flags)

`Stage.train` is the driver entry (absolute paths, Ray up, then `build`); `Stage.main` is the stage's
command line. This module imports no stage module, so stage modules import it without a cycle.

Flag names are the same on every `muse train` command and match the rest of the platform:
`--corpus` (raw images), `--tokens` (token shards), `--checkpoint ROOT` (the model root, as tokenize,
generate and serve call it). The older `--data` and `--output` stay as aliases.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Callable

from jobs.cluster import LocalPathRefused, RayUnreachable, check_shared_paths
from jobs.config import load_config
from jobs.fit import StopWithThreads, ensure_ray, resume_note
from jobs.preflight import RunRefused
from jobs.progress import running_now, say, set_verbose, stop_display
from jobs.root_fit import codes_version
from muse import checkpoint, storage
from muse.components import COMPONENTS, CheckpointError
from muse.root_sampling import write_root_sampling

DATA_KINDS = {"corpus": "data/corpus", "tokens": "data/tokens"}  # --<kind> -> example path


def _no_args(parser: argparse.ArgumentParser) -> None:
    return None


def component_extra(root: str, name: str) -> dict:
    if not checkpoint.has_component(root, name):
        return {}
    return checkpoint.component_extra(checkpoint.component_uri(root, name))


def finished(root: str, name: str, stage: str, run, later: tuple[str, ...] = (), model: str | None = None) -> bool:
    """Whether ROOT/<name> holds what this config's run of `stage` would leave there: the export of a
    finished run under the same name (`run.name`, else the component's) that reached `run.max_steps`
    (from the preset `model` where one is asked for), or the export of a `later` stage built on it (the
    decoder fine-tune's vqgan_hi). Another run's export, or a shorter one (a smoke run before the full
    budget), is trained on: its run resumes or the stage continues the component."""
    extra = component_extra(root, name)
    if extra.get("finished") and extra.get("stage") in later:
        return True
    if not extra.get("finished") or extra.get("stage") != stage:
        return False
    if "run" not in extra:  # exported before the run was recorded
        return True
    return (extra["run"] == (run.name or name) and int(extra.get("step", 0)) >= run.max_steps
            and extra.get("model", model) == model)  # exports before the preset was recorded: any


def transformer_finished(stage: str) -> Callable[[Any, str, str | None], bool]:
    """`Stage.finished` of a stage that trains the root's component of its own name."""
    def done(cfg, root: str, component: str | None = None) -> bool:
        section = named_run(getattr(cfg, stage), stage)
        if not finished(root, stage, stage, section.run, model=section.model):
            return False
        # Not once a tokenizer it reads was trained again: it learnt codes that now draw other images.
        learnt = component_extra(root, stage).get("codes")
        return learnt is None or learnt == codes_version(stage, root)  # None: exported before it was recorded

    return done


def named_run(section, stage: str):
    """A transformer stage's section with its run's name: `run.name`, else the stage's own, and for a
    LoRA run `<stage>_lora`: its checkpoints hold adapters and are not the full run's to resume, and its
    export is its own."""
    if section.run.name or not section.lora_rank:
        return section
    return replace(section, run=replace(section.run, name=f"{stage}_lora"))


@dataclass(frozen=True)
class Stage:
    """One stage. `build(cfg, data, root, component, format) -> [ray.train.Result]` runs on the driver
    with absolute URIs and Ray up: it makes the dataset and the job and calls `jobs.fit.fit_stage`.
    `component` and `format` come from `--component` / `--format` where the stage has them."""

    name: str
    summary: str  # one line in `muse train --help`
    worker: type  # the jobs.loop.StageWorker subclass each Ray Train worker runs
    build: Callable[..., list]
    data: str  # "corpus" or "tokens": what the stage reads, and the name of its data flag
    data_help: str
    add_args: Callable[[argparse.ArgumentParser], None] = _no_args
    # (cfg, root, component) -> whether the root holds what this run would leave (checked before Ray starts)
    finished: Callable[[Any, str, str | None], bool] | None = None
    # (cfg, data, root): raise RunRefused where `build` would refuse, without training (Ray up); `train
    # all` asks it of each transformer before the first trains
    preflight: Callable[[Any, str, str], None] | None = None

    def __post_init__(self):
        if self.data not in DATA_KINDS:
            raise ValueError(f"stage {self.name}: data must be one of {sorted(DATA_KINDS)}, got {self.data!r}")

    def train(self, cfg, data: str, root: str, *, component: str | None = None, format: str = "auto") -> list[Any]:
        """Train on `data` and export into the model root `root`; the Ray Train results."""
        data, root = storage.absolute(data), storage.absolute(root)
        if self.finished is not None and self.finished(cfg, root, component):
            # (the vqgan stage's exports are per tokenizer)
            step = component_extra(root, self.name).get("step") if self.name in COMPONENTS else None
            held = f"{root}/{self.name} holds this run's finished export (step {step})" if step is not None else \
                f"{root} holds this run's finished exports"
            say(f"[{self.name}] {held}: nothing to train (raise --max-steps to go on, or --set "
                f"{self.name}.run.name=NEW for a new run)")
            return []
        storage.check_writable(root)  # where the run exports (and by default keeps its runs), before Ray
        ensure_ray()
        check_shared_paths({f"--{self.data}": data, "--checkpoint": root})
        results = self.build(cfg, data, root, component, format)
        if self.data == "tokens":  # a transformer: what generate and serve draw with, unless told otherwise
            write_root_sampling(root, cfg.sampling)
        return results

    def parser(self) -> argparse.ArgumentParser:
        flag = f"--{self.data}"
        parser = argparse.ArgumentParser(
            prog=f"muse train {self.name}",
            description=f"{self.summary[:1].upper()}{self.summary[1:]}, with Ray Train, and export it into the "
                        "model root. Re-running with the same --checkpoint (and run name) resumes from the last "
                        "checkpoint; a run name whose checkpoints belong to another model root, component or "
                        f"architecture is refused (pass --set {self.name}.run.name=NEW).",
            epilog=f"example: muse train {self.name} --config configs/demo.yaml {flag} {DATA_KINDS[self.data]} "
                   "--checkpoint ROOT. On a cluster: RAY_AUTH_MODE=token ray job submit --working-dir . -- "
                   f"python -m jobs.{self.name} {flag} s3://... --checkpoint s3://...",
        )
        parser.add_argument(flag, "--data", dest="data", required=True, metavar=self.data.upper(),
                            help=self.data_help)
        add_common_args(parser)
        self.add_args(parser)
        return parser

    def main(self, argv: list[str] | None = None) -> None:
        parser = self.parser()
        args = parser.parse_args(argv)
        set_verbose(args.verbose)
        try:
            cfg = load_config(args.config, cli_overrides(args, [self.name]))
        except (ValueError, OSError) as e:
            parser.error(str(e))
        try:
            with errors_in_one_line(parser):
                results = self.train(cfg, args.data, args.checkpoint, component=getattr(args, "component", None),
                                     format=getattr(args, "format", "auto"))
        finally:
            drawn = stop_display()
        for result in results:  # the display's summary line already gave the run's metrics
            print(f"{self.name}: {result_summary(result, metrics=not drawn)}", flush=True)


@contextlib.contextmanager
def errors_in_one_line(parser: argparse.ArgumentParser) -> Iterator[None]:
    """Around a training command's work: a refusal (what would fail on every attempt, found before
    it; a tokenization's refusal in `train all`) is one usage line and exit status 2; training that
    failed after Ray Train's retries one line naming the first worker's error and exit status 1.
    Anything else is a bug, with its traceback."""
    from pipelines.job_spec import ResumeRefused
    from pipelines.output_runs import OutputInUse, OutputTakenOver
    from pipelines.readers import NoInput
    from pipelines.rejects import CorpusRefused
    from pipelines.shards import CorruptShard, NoTokenShards

    try:
        yield
    except KeyboardInterrupt as stop:  # Ctrl-C, or `ray job stop` (jobs.cluster.stop_on_sigterm)
        running: list[str] = []
        try:  # a second Ctrl-C (or `timeout`, which signals the driver and then its process group) skips these
            shown = running_now()
            stop_display()
            running = [text + resume_note(name) for name, text in shown.items()]
        except KeyboardInterrupt:
            pass
        from jobs import run_lock

        taken, code = run_lock.taken_over(), 130
        line = (f"{parser.prog}: stopped{' with ' + ', '.join(running) if running else ''}; finished stages "
                "and registered checkpoints stay: the same command resumes from them\n")
        if taken is not None:  # the interrupt came from a lock's heartbeat, not from the user
            line, code = f"{parser.prog}: error: {taken}\n", 1
        if isinstance(stop, StopWithThreads):
            import ray

            sys.stderr.write(line)
            sys.stderr.flush()
            try:
                run_lock.release_all()  # the trainers' threads never reach their own release
                ray.shutdown()
            finally:
                os._exit(code)
        parser.exit(code, line)
    except (RunRefused, ResumeRefused, OutputInUse, NoInput, CorpusRefused, LocalPathRefused, RayUnreachable,
            NoTokenShards, CorruptShard, CheckpointError) as e:  # a model root that is none (a diffusers folder not imported) among them
        stop_display()
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    except OutputTakenOver as e:  # `train all`'s tokenization, silent too long
        stop_display()
        parser.exit(1, f"{parser.prog}: error: {e}\n")
    except Exception as e:
        if refused := storage.s3_refusal(e) or storage.access_refused(e):  # a missing bucket, a read-only disk
            stop_display()
            parser.exit(2, f"{parser.prog}: error: {refused}\n")
        failed = _training_failure(e)
        if failed is None and (s3_failed := storage.s3_failure(e)):  # the driver's own request
            stop_display()
            parser.exit(1, f"{parser.prog}: error: {s3_failed} (after the retries of each request, "
                           "MUSE_S3_MAX_ATTEMPTS); finished stages and registered checkpoints stay: the same "
                           "command resumes from them\n")
        if failed is None:
            raise
        stop_display()
        parser.exit(1, f"{parser.prog}: error: training failed after its retries (run.max_failures): {failed}; "
                       f"the workers' logs: --verbose, or {_where_logs_are()}\n")


def _where_logs_are() -> str:
    """Where the workers' logs of a run are: this node's session folder, or on a cluster the nodes
    the workers ran on (which the autoscaler may have removed since), read through the dashboard."""
    from jobs.cluster import cluster_may_grow

    if cluster_may_grow():
        return "the Ray dashboard (the job's page, or Logs by node), or `ray logs cluster`"
    return "Ray's session folder (/tmp/ray/session_latest/logs)"


def _training_failure(e: BaseException) -> str | None:
    """The first worker's error of a Ray Train run that failed for good, in one line; None for any
    other exception."""
    import sys

    train = sys.modules.get("ray.train")  # imported wherever a run can have failed
    if train is None or not isinstance(e, train.TrainingFailedError):
        return None
    from jobs.attempts import raised_by

    failures = getattr(e, "worker_failures", None) or {}
    wrapped = failures[min(failures)] if failures else e
    first = raised_by(wrapped)
    # A cause unwrapped from Ray's RayTaskError: its message is its first line (Ray appends its traceback).
    text = " ".join((str(first) if first is wrapped else str(first).strip().split("\n")[0]).split())
    line = f"{type(first).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"
    if storage.full_disk(first) is not None:
        line += ("; a disk is full: free space where the run writes (its checkpoints under run.storage_path, by "
                 "default ROOT/runs, and the local temporary folder they are staged in), and the same command "
                 "resumes from its last checkpoint")
    return line


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags every `muse train` command takes."""
    parser.add_argument("--config", help="training YAML with only what differs from the defaults "
                                         "(e.g. configs/demo.yaml); see jobs/config.py")
    parser.add_argument("--checkpoint", "--output", dest="checkpoint", required=True, metavar="ROOT",
                        help="model root to write components into (local or s3://), the --checkpoint that "
                             "tokenize, generate and serve read; runs go to ROOT/runs and sample grids to ROOT/samples")
    parser.add_argument("--workers", type=int, help="Ray Train workers (scaling.num_workers)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; > 0 trains on GPU")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (may be fractional)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (run.max_steps); for the VQGAN stage, of both "
                                                     "tokenizers' runs (vqgan.hi_max_steps too)")
    parser.add_argument("--storage", help="Ray Train storage for runs and checkpoints, local or s3:// "
                                          "(run.storage_path; default ROOT/runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set base.optim.lr=3e-4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no live progress line (logs, CI); notes, failed attempts and the summary still print")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own logs and every worker's lines instead of one progress line per stage")


def add_format_arg(parser: argparse.ArgumentParser) -> None:
    from pipelines.readers import formats

    parser.add_argument("--format", default="auto", choices=formats(), help="corpus format (default: detect)")


def cli_overrides(args: argparse.Namespace, sections: list[str]) -> list[str]:
    """The command-line flags as `section.key=value` overrides for each stage section they apply to."""
    flags = {"scaling.num_workers": args.workers, "run.max_steps": args.max_steps, "model": getattr(args, "model", None),
             "lora_rank": getattr(args, "lora_rank", None),
             "scaling.cpus_per_worker": args.cpus_per_worker, "run.storage_path": args.storage}
    if args.gpus_per_worker is not None:
        flags |= {"scaling.use_gpu": args.gpus_per_worker > 0}
        flags |= {"scaling.gpus_per_worker": args.gpus_per_worker} if args.gpus_per_worker > 0 else {}
    if args.no_progress:
        flags["run.progress"] = False
    out = [f"{s}.{k}={v}" for s in sections for k, v in flags.items() if v is not None]
    if "vqgan" in sections and args.max_steps is not None:
        # vqgan.hi_max_steps would otherwise win for vqgan_hi: a 10-step smoke run trained it 3,000 steps.
        out.append(f"vqgan.hi_max_steps={args.max_steps}")
    return out + list(args.set)  # --set last: it wins


def checkpoint_uri(checkpoint) -> str:
    """A Ray Train checkpoint's location as a user gives it: Ray keeps an S3 one as "bucket/key"."""
    import pyarrow.fs

    if isinstance(getattr(checkpoint, "filesystem", None), pyarrow.fs.S3FileSystem):
        return f"s3://{checkpoint.path.lstrip('/')}"
    return checkpoint.path


def result_summary(result, metrics: bool = True) -> str:
    """One line for a finished Ray Train run: the checkpoint, and (`metrics`) its last reported
    metrics that a person reads."""
    path = checkpoint_uri(result.checkpoint) if result.checkpoint else None
    if not metrics:
        return f"finished; checkpoint {path}"
    m = result.metrics or {}
    shown = ", ".join(f"{k} {m[k]:.4g}" for k in ("step", "loss", "acc", "psnr", "tokens_per_s") if k in m)
    return f"finished ({shown}); checkpoint {path}"
