"""Driver side of each stage: data, model config and job for `jobs.loop.fit_stage`, and the CLI.

`run_stage(stage, cfg, data, root)` is what `muse train <stage>`, `python -m jobs.<stage>` and
`muse train all` call. It joins (or starts) Ray, builds the stage's Ray Dataset, derives the model
config (transformers adapt codebook, token grid and text width to the tokens they train on), runs the
TorchTrainer, and returns the ray.train.Result(s). The component lands in ROOT when the run ends.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

from jobs.config import PAPER_PRESETS, STAGES, TrainConfig, load_config
from jobs.loop import ensure_ray, fit_stage, run_location
from jobs.progress import say, set_verbose, stop_display
from muse import checkpoint, storage
from muse.config import preset, to_dict

VQGAN_COMPONENTS = ("vqgan_lo", "vqgan_hi")


def _component_config(root: str, name: str) -> dict | None:
    if not checkpoint.has_component(root, name):
        return None
    return to_dict(checkpoint.read_component_config(checkpoint.component_uri(root, name))[1])


def _tokenize_spec(data: str) -> dict:
    """What produced the token shards (`_job.json` of pipelines.tokenize), or {}."""
    from pipelines.shards import JOB_FILE

    path = storage.join(data, JOB_FILE)
    return json.loads(storage.read_text(path)) if storage.exists(path) else {}


def token_model_config(name: str, root: str, data: str, info: dict, superres: bool, quiet: bool = False):
    """The transformer preset `name`, with codebook sizes, token grids and text width taken from the
    token shards (and the tokenizers that made them, else the root's), so model and data agree."""
    cfg = preset(name)
    spec = _tokenize_spec(data)
    lo = spec.get("vqgan_lo") or _component_config(root, "vqgan_lo")
    hi = spec.get("vqgan_hi") or _component_config(root, "vqgan_hi")
    text = _component_config(root, "text_encoder")
    changes: dict[str, Any] = {}
    text_dim = info.get("text_dim") or (text or {}).get("d_model")
    if text_dim:
        changes["text_dim"] = int(text_dim)
    if superres:
        changes |= {"lo_tokens_per_side": info["tokens_lo_side"], "hi_tokens_per_side": info["tokens_hi_side"]}
        changes |= {"lo_codebook_size": lo["codebook_size"]} if lo else {}
        changes |= {"hi_codebook_size": hi["codebook_size"]} if hi else {}
    else:
        changes["tokens_per_side"] = info["tokens_lo_side"]
        changes |= {"codebook_size": lo["codebook_size"]} if lo else {}
    adapted = replace(cfg, **changes)
    diff = {k: v for k, v in changes.items() if getattr(cfg, k) != v}
    if diff and not quiet:
        say(f"[{'superres' if superres else 'base'}] preset {name} adapted to the data: {diff}")
    return adapted


def transformer_config(stage: str, model: str | None, root: str, data: str, info: dict):
    """(model config, component URI to start from or None). The root decides: without an explicit
    preset, a root that already holds the stage's component is continued in that architecture from its
    weights, and a mismatch with the tokens is refused; an empty root gets the paper's preset. An
    explicit preset is trained from scratch and replaces what the root holds, said out loud."""
    superres = stage == "superres"
    uri = checkpoint.component_uri(root, stage)
    existing = checkpoint.read_component_config(uri)[1] if checkpoint.has_component(root, stage) else None
    if model is None and existing is not None:
        cfg = existing
        wanted = token_model_config(PAPER_PRESETS[stage], root, data, info, superres=superres, quiet=True)
        fields = (("lo_tokens_per_side", "hi_tokens_per_side", "lo_codebook_size", "hi_codebook_size")
                  if superres else ("tokens_per_side", "codebook_size")) + ("text_dim",)
        diff = {f: (getattr(cfg, f), getattr(wanted, f)) for f in fields if getattr(cfg, f) != getattr(wanted, f)}
        if diff:
            raise ValueError(
                f"the model root's {stage} does not fit these tokens (root vs data: {diff}); give "
                f"--model PRESET (or {stage}.model in the config) to train a new {stage} that replaces it")
        say(f"[{stage}] continues the model root's {stage} ({_describe(cfg)}) from its weights")
        return cfg, uri
    cfg = token_model_config(model or PAPER_PRESETS[stage], root, data, info, superres=superres)
    if existing is not None and existing != cfg:
        say(f"[{stage}] trains {model} ({_describe(cfg)}) from scratch; it replaces the root's {stage} when done")
    return cfg, None


def _describe(cfg) -> str:
    layers = getattr(cfg, "layers", None) or getattr(cfg, "hi_layers", None)
    return f"{layers} layers, hidden {cfg.hidden}"


def run_stage(stage: str, cfg: TrainConfig, data: str, root: str, *, component: str | None = None,
              format: str = "auto") -> list[Any]:
    """Train one stage on `data` (token shards for base/superres, a corpus for vqgan/decoder) and
    export into the model root `root`; returns the Ray Train results (one per trained component)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
    data, root = storage.absolute(data), storage.absolute(root)
    ensure_ray()
    if stage in ("base", "superres"):
        return [_run_transformer(stage, cfg, data, root)]
    if stage == "vqgan":
        return [_run_vqgan(cfg, data, root, c, format) for c in vqgan_components(cfg, component)]
    return [_run_decoder(cfg, data, root, component or cfg.decoder.component, format)]


def vqgan_components(cfg: TrainConfig, component: str | None) -> list[str]:
    wanted = list(VQGAN_COMPONENTS) if component in (None, "both") else [component]
    if "vqgan_hi" in wanted and cfg.vqgan.hi_model is None:
        if component == "vqgan_hi":
            raise ValueError("vqgan.hi_model is null: there is no high-res tokenizer to train")
        wanted.remove("vqgan_hi")
    return wanted


def _run_transformer(stage: str, cfg: TrainConfig, data: str, root: str):
    from jobs.data import data_order_seed, token_dataset

    section = getattr(cfg, stage)
    storage_uri, name = run_location(root, section.run, stage)
    seed = data_order_seed(section.run.seed, storage.join(storage_uri, name))
    dataset, info = token_dataset(data, hi=stage == "superres", cache=section.run.cache_data, shuffle_seed=seed)
    if info.get("text_storage", "ids") != "embeddings" and not checkpoint.has_component(root, "text_encoder"):
        raise ValueError(f"the token shards hold text ids but the model root {root} has no text_encoder/ to "
                         "encode them (write one with `muse init` or train with `muse train all`)")
    model_cfg, init_from = transformer_config(stage, section.model, root, data, info)
    job = {"root": root, "component": stage, "model_config": to_dict(model_cfg), "data_meta": info,
           "init_from": init_from}
    return fit_stage(stage, section, job, dataset)


def _run_vqgan(cfg: TrainConfig, data: str, root: str, component: str, format: str):
    from jobs.data import image_dataset
    from jobs.perceptual import check_weights

    section = cfg.vqgan
    check_weights(section.gan.perceptual_weights)
    vq_cfg = preset(section.lo_model if component == "vqgan_lo" else section.hi_model)
    if section.run.name:
        section = replace(section, run=replace(section.run, name=f"{section.run.name}_{component}"))
    if component == "vqgan_hi" and section.hi_max_steps:
        section = replace(section, run=replace(section.run, max_steps=section.hi_max_steps))
    dataset = image_dataset(data, vq_cfg.resolution, cfg.tokenize, format, cache=section.run.cache_data)
    job = {"root": root, "component": component, "model_config": to_dict(vq_cfg), "data_meta": {}}
    if component == "vqgan_hi" and section.hi_init_from_lo:
        job["init_from"] = _lo_for_hi_init(root, vq_cfg)
    return fit_stage("vqgan", section, job, dataset)


def _lo_for_hi_init(root: str, hi_cfg) -> str:
    """ROOT/vqgan_lo, checked to fit the high-res tokenizer: the same architecture at another
    resolution (its weights are copied), or lo grown by one level (`muse.vqgan.grow`)."""
    from muse.vqgan import grown_config

    uri = checkpoint.component_uri(root, "vqgan_lo")
    if not checkpoint.has_component(root, "vqgan_lo"):
        raise ValueError(f"vqgan.hi_init_from_lo: the model root {root} has no vqgan_lo/ to start vqgan_hi from")
    lo_cfg = checkpoint.read_component_config(uri)[1]
    if replace(lo_cfg, resolution=hi_cfg.resolution) != hi_cfg and grown_config(lo_cfg) != hi_cfg:
        raise ValueError("vqgan.hi_init_from_lo needs vqgan.hi_model to be vqgan.lo_model at another resolution, "
                         f"or grown by one level at twice the resolution; got {lo_cfg} and {hi_cfg}")
    return uri


def decoder_component(root: str, component: str) -> str:
    if component == "auto":
        return "vqgan_hi" if checkpoint.has_component(root, "vqgan_hi") else "vqgan_lo"
    return component


def _run_decoder(cfg: TrainConfig, data: str, root: str, component: str, format: str):
    from jobs.data import image_dataset
    from jobs.decoder import widened_config
    from jobs.perceptual import check_weights

    section = cfg.decoder
    check_weights(section.gan.perceptual_weights)
    component = decoder_component(root, component)
    if not checkpoint.has_component(root, component):
        raise ValueError(f"the model root {root} has no {component}/ to fine-tune the decoder of")
    wide = widened_config(root, component, section)
    dataset = image_dataset(data, wide.resolution, cfg.tokenize, format, cache=section.run.cache_data)
    job = {"root": root, "component": component, "model_config": to_dict(wide), "data_meta": {}}
    section = replace(section, run=replace(section.run, name=section.run.name or f"decoder_{component}"))
    return fit_stage("decoder", section, job, dataset)


# ---------------------------------------------------------------------------------------------
# CLI: muse train <stage> / python -m jobs.<stage>.

DATA_HELP = {
    "vqgan": "image-caption corpus (Parquet, image folder or WebDataset; local, file:// or s3://)",
    "decoder": "image-caption corpus (Parquet, image folder or WebDataset; local, file:// or s3://)",
    "base": "token shards written by `muse tokenize` (local or s3://)",
    "superres": "token shards with tokens_hi written by `muse tokenize` (local or s3://)",
}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="training YAML with only what differs from the defaults "
                                         "(e.g. configs/train_tiny.yaml); see jobs/config.py")
    parser.add_argument("--output", required=True, help="model root to write components into (local or s3://); "
                                                        "runs go to ROOT/runs and sample grids to ROOT/samples")
    parser.add_argument("--workers", type=int, help="Ray Train workers (scaling.num_workers)")
    parser.add_argument("--gpus-per-worker", type=float, help="GPUs per worker; > 0 trains on GPU")
    parser.add_argument("--cpus-per-worker", type=float, help="CPUs per worker (may be fractional)")
    parser.add_argument("--max-steps", type=int, help="optimizer steps (run.max_steps)")
    parser.add_argument("--storage", help="Ray Train storage for runs and checkpoints, local or s3:// "
                                          "(run.storage_path; default ROOT/runs)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set base.optim.lr=3e-4 (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line (logs, CI)")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own logs and every worker's lines instead of one progress line per stage")


def cli_overrides(args: argparse.Namespace, sections: list[str]) -> list[str]:
    """The command-line flags as `section.key=value` overrides for each stage section they apply to."""
    flags = {"scaling.num_workers": args.workers, "run.max_steps": args.max_steps, "model": getattr(args, "model", None),
             "scaling.cpus_per_worker": args.cpus_per_worker, "run.storage_path": args.storage}
    if args.gpus_per_worker is not None:
        flags |= {"scaling.use_gpu": args.gpus_per_worker > 0}
        flags |= {"scaling.gpus_per_worker": args.gpus_per_worker} if args.gpus_per_worker > 0 else {}
    if args.no_progress:
        flags["run.progress"] = False
    return [f"{s}.{k}={v}" for s in sections for k, v in flags.items() if v is not None] + list(args.set)


def stage_main(stage: str, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog=f"muse train {stage}",
        description=f"Train the {stage} stage with Ray Train and export it into the model root. Re-running "
                    "with the same --output (and run name) resumes from the last checkpoint.",
        epilog=f"example: muse train {stage} --config configs/train_tiny.yaml --data "
               f"{'data/tokens' if stage in ('base', 'superres') else 'data/synth'} --output models/tiny. "
               "On a cluster: RAY_AUTH_MODE=token ray job submit --working-dir . -- "
               f"python -m jobs.{stage} --data s3://... --output s3://...",
    )
    parser.add_argument("--data", required=True, help=DATA_HELP[stage])
    add_common_args(parser)
    if stage in ("base", "superres"):
        parser.add_argument("--model", help=f"{stage} preset to train from scratch, replacing the root's {stage} "
                                            f"(default: continue the root's {stage}, or {PAPER_PRESETS[stage]} "
                                            "in a root without one)")
    if stage in ("vqgan", "decoder"):
        parser.add_argument("--format", default="auto", choices=("auto", "parquet", "folder", "webdataset"),
                            help="corpus format (default: detect)")
        choices = ("both",) + VQGAN_COMPONENTS if stage == "vqgan" else ("auto",) + VQGAN_COMPONENTS
        parser.add_argument("--component", choices=choices,
                            help="which tokenizer: vqgan both (default), decoder auto = vqgan_hi when present")
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    try:
        cfg = load_config(args.config, cli_overrides(args, [stage]))
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        results = run_stage(stage, cfg, args.data, args.output, component=getattr(args, "component", None),
                            format=getattr(args, "format", "auto"))
    finally:
        stop_display()
    for result in results:
        print(f"{stage}: {result_summary(result)}", flush=True)


def result_summary(result) -> str:
    """One line for a finished Ray Train run: its last metrics that a person reads, and the checkpoint."""
    metrics = result.metrics or {}
    shown = ", ".join(f"{k} {metrics[k]:.4g}" for k in ("step", "loss", "acc", "psnr", "tokens_per_s") if k in metrics)
    return f"finished ({shown}); checkpoint {result.checkpoint.path if result.checkpoint else None}"
