"""`muse train all`: the whole staged recipe from a raw corpus to a model root.

    text encoder (written from its preset when ROOT has none)
    -> vqgan (vqgan_lo, then vqgan_hi)          on the corpus's images, or on --images when given
    -> tokenize (pipelines.tokenize)             corpus -> ROOT/tokens (or --tokens)
    -> base and superres                         concurrently when the cluster has room for both
    -> decoder                                   fine-tunes vqgan_hi's (else vqgan_lo's) decoder

A stage whose output is finished is skipped: each export records {"finished": true, "stage": ...} in
its component's config.json "extra" (the decoder stage adds "decoder_finetuned"). Tokenization skips
finished parts by itself and is not run at all once base and super-res are finished. Interrupted
anywhere, the same command picks up where it stopped: finished stages are skipped and an unfinished
Ray Train run resumes from its last checkpoint (same run name and storage).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

from jobs.cluster import check_shared_paths, cluster_may_grow
from jobs.config import TrainConfig, load_config
from jobs.decoder import decoder_component, decoder_finished
from jobs import fit
from jobs.fit import ensure_ray, run_dir
from jobs.preflight import DATA_CPUS, RunRefused
from jobs.progress import Reporter, say, set_verbose, start_display, stop_display
from jobs.stage import (StopWithThreads, add_common_args, add_format_arg, cli_overrides,
                        errors_in_one_line, finished, named_run)
from jobs import stages
from jobs.stages import run_stage
from jobs.vqgan import CORPUS_HELP, component_run, vqgan_components
from muse import checkpoint, storage
from muse.root_sampling import write_root_sampling

TRANSFORMERS = ("base", "superres")


VOCAB_CAPTIONS = 100_000  # captions a "bpe" text encoder's vocabulary is fitted to


def ensure_text_encoder(cfg: TrainConfig, root: str, corpus: str, format: str = "auto") -> None:
    """Write ROOT/text_encoder from `cfg.text_encoder` when missing (frozen: it is never trained),
    its weights seeded so that a re-made root encodes alike; a "bpe" tokenizer is fitted to the first
    VOCAB_CAPTIONS captions of the corpus."""
    if checkpoint.has_component(root, "text_encoder"):
        return
    import torch

    from muse.config import preset
    from muse.text import TextEncoder
    from pipelines.corpus_data import sample_captions

    text_cfg = preset(cfg.text_encoder)
    if text_cfg.name_or_path is not None:  # pretrained (T5-XXL): referenced where it is, never copied
        try:
            checkpoint.save_reference(text_cfg, checkpoint.component_uri(root, "text_encoder"))
        except ValueError as e:
            raise RunRefused(f"{e}; or make the root reference your copy first: muse init --preset PRESET --out "
                             f"{root} --components text_encoder --text-encoder DIR") from None
        say(f"[all] {root}/text_encoder references {text_cfg.name_or_path}")
        return
    captions = None
    if text_cfg.name_or_path is None and text_cfg.tokenizer == "bpe":
        captions = sample_captions(corpus, VOCAB_CAPTIONS, format)
        if not captions:
            raise ValueError(f"{corpus} has no readable captions to fit the text encoder's vocabulary to")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = TextEncoder.build(text_cfg, captions)
    checkpoint.save_component(encoder, checkpoint.component_uri(root, "text_encoder"))
    fitted = f", vocabulary of {len(encoder.tokenizer)} fitted to {len(captions)} captions" if captions else ""
    say(f"[all] wrote the frozen text encoder ({cfg.text_encoder}{fitted}) to {root}/text_encoder")


def fit_together(cfg: TrainConfig, resources: dict[str, float]) -> bool:
    """Whether base and super-res trainers fit in the cluster at the same time."""
    need_cpu = sum(s.scaling.num_workers * s.scaling.cpus_per_worker for s in (cfg.base, cfg.superres))
    need_gpu = sum(s.scaling.num_workers * s.scaling.gpus_per_worker for s in (cfg.base, cfg.superres)
                   if s.scaling.use_gpu)
    # Both trainers' CPUs must leave Ray Data a CPU (jobs.preflight.DATA_CPUS), as one trainer's must.
    return need_cpu + DATA_CPUS <= resources.get("CPU", 0.0) and need_gpu <= resources.get("GPU", 0.0)


def trainer_bundles(cfg: TrainConfig) -> list[dict[str, float]]:
    """One resource bundle per worker of both transformer trainers."""
    return [s.scaling.resources_per_worker() for s in (cfg.base, cfg.superres) for _ in range(s.scaling.num_workers)]


def room_for_both(cfg: TrainConfig, resources, request, autoscaling: bool, wait_s: float,
                  sleep=time.sleep, clock=time.monotonic) -> bool:
    """Whether base and super-res can train side by side. What is up now is not the answer on a cluster
    that scales from zero GPUs, so on an autoscaling cluster the autoscaler is asked for both trainers'
    bundles (`request`, i.e. ray.autoscaler.sdk.request_resources) and given up to `wait_s` to add them.
    resources() -> the cluster's current totals. A local Ray has no autoscaler: what it has is the answer."""
    if fit_together(cfg, resources()):
        return True
    if not autoscaling or wait_s <= 0:
        return False
    request(bundles=trainer_bundles(cfg))
    try:
        deadline = clock() + wait_s
        while clock() < deadline:
            sleep(min(10.0, max(0.0, deadline - clock())))
            if fit_together(cfg, resources()):
                return True
        return False
    finally:
        # A request stands until replaced: left in place it would keep both trainers' nodes as the
        # cluster's minimum size after training. The trainers' own placement groups ask for what each needs.
        request(bundles=[])


def refuse_foreign_tokens(tokens: str, root: str, spec: dict | None = None) -> None:
    """Refuse a --tokens folder of the user's made by another root's tokenizer: checked before any stage
    trains, as well as once the tokenizers are trained (`replace_stale_tokens`). `spec`: its job spec,
    when the caller has read it."""
    from jobs.root_fit import _tokenize_spec, foreign_makers, makers_text

    if spec is None:
        spec = _tokenize_spec(tokens) if storage.exists(tokens) else {}
    if foreign := foreign_makers(root, spec):  # another root's tokenizer, not this one's before it was trained again
        raise RunRefused(f"--tokens {tokens} holds tokens made by another tokenizer than the model root {root}'s "
                         f"({makers_text(foreign)}): give a new --tokens folder, or leave --tokens out to tokenize "
                         f"into {root}/tokens")


def replace_stale_tokens(tokens: str, root: str, owned: bool) -> None:
    """Token shards made by tokenizers the root has retrained since would be refused by the resuming
    tokenization (and learnt as the wrong codes): `train all`'s own ROOT/tokens is made again; a
    --tokens folder of the user's is not deleted, but refused with the way out."""
    from jobs.root_fit import _tokenize_spec, retrained_tokenizers

    spec = _tokenize_spec(tokens) if storage.exists(tokens) else {}
    changed = retrained_tokenizers(root, spec)
    if not changed:
        return
    if not owned:
        refuse_foreign_tokens(tokens, root, spec)
        raise RunRefused(f"--tokens {tokens} holds tokens of the root's {' and '.join(changed)} as they were before "
                         "they were trained again: give a new --tokens folder (or delete that one)")
    say(f"[all] {tokens} holds tokens of the root's {' and '.join(changed)} before they were trained again: "
        "tokenizing the corpus again")
    storage.delete(tokens)


def check_run_folders(cfg: TrainConfig, root: str) -> None:
    """Refuse, before any work, base and super-res runs named into one folder (`run.name` set alike):
    their checkpoints would mix, concurrently or not, and neither run could resume its own."""
    folders = {stage: run_dir(root, named_run(getattr(cfg, stage), stage).run, stage) for stage in TRANSFORMERS
               if stage in cfg.stages}
    if len(set(folders.values())) < len(folders):
        raise RunRefused(f"base and superres would both keep their checkpoints in {folders['base']}: give them "
                         "different run names (--set superres.run.name=...)")


def check_before_training(todo: list[str], cfg: TrainConfig, tokens: str, root: str) -> None:
    """Refuse, before either trains, a base or super-res run that would be refused at its start: a
    super-res refusal once base had trained wasted base's hours, and was found again on every rerun."""
    for stage in todo:
        if (check := stages.get(stage).preflight) is not None:
            check(cfg, tokens, root)


def reached_step(cfg: TrainConfig, root: str, stage: str) -> int | None:
    """The step of the checkpoint `stage`'s run would resume from, when that is at or past its
    max_steps (the run trains nothing and exports that checkpoint); else None."""
    from jobs.preflight import newest_checkpoint_state

    section = named_run(getattr(cfg, stage), stage)
    found = newest_checkpoint_state(run_dir(root, section.run, stage))
    step = found[1].get("step") if found else None
    return int(step) if isinstance(step, (int, float)) and step >= section.run.max_steps else None


def trained_outcome(reached: int | None, seconds: float, how: str = "") -> str:
    if reached is not None:
        return f"nothing to train (its run was at step {reached}), exported in {seconds:.0f}s"
    return f"trained in {seconds:.0f}s{how}"


def tokenize_outcome(totals: dict, seconds: float) -> str:
    if not totals["run_parts"]:
        return "skipped (every part already tokenized)"
    return f"tokenized {totals['run_parts']} parts ({totals['run_rows']} samples) in {seconds:.0f}s"


def train_all(cfg: TrainConfig, corpus: str, root: str, tokens: str | None = None, format: str = "auto",
              images: str | None = None) -> dict:
    """Run every unfinished stage; returns {stage: "trained" | "skipped"} with seconds per stage.
    `images` (default: the corpus) is what the tokenizers learn from (the vqgan and decoder stages): a
    tokenizer can learn from more images than have captions, as the paper's VQGAN is trained apart."""
    import ray
    from ray.autoscaler.sdk import request_resources

    corpus, root = storage.absolute(corpus), storage.absolute(root)
    images = storage.absolute(images) if images else corpus
    tokens = storage.absolute(tokens or storage.join(root, "tokens"))
    storage.check_writable(root)  # where every stage exports, before Ray starts
    ensure_ray()
    check_shared_paths({"--corpus": corpus, "--images": images, "--tokens": tokens, "--checkpoint": root})
    report: dict[str, str] = {}
    check_run_folders(cfg, root)
    if tokens != storage.join(root, "tokens"):
        refuse_foreign_tokens(tokens, root)

    def timed(name: str, fn, outcome=lambda result, seconds: f"trained in {seconds:.0f}s") -> None:
        start = time.time()
        report[name] = outcome(fn(), time.time() - start)
        say(f"[all] {name}: {report[name]}")

    ensure_text_encoder(cfg, root, corpus, format)
    for component in vqgan_components(cfg, None) if "vqgan" in cfg.stages else []:
        if finished(root, component, "vqgan", component_run(cfg.vqgan, component), later=("decoder",)):
            report[component] = "skipped (finished)"
            continue
        timed(component, lambda c=component: run_stage("vqgan", cfg, images, root, component=c, format=format))

    # vqgan.hi_model null: no high-res tokenizer and no super-res, whatever vqgan_hi the root holds
    # (`muse init` writes a random one).
    has_hi = checkpoint.has_component(root, "vqgan_hi") and cfg.vqgan.hi_model is not None
    wanted = [s for s in TRANSFORMERS if s in cfg.stages and (s == "base" or has_hi)]
    todo = [s for s in wanted if not stages.get(s).finished(cfg, root)]  # what `muse train base/superres` checks
    if todo:
        from pipelines import tokenize

        show = any(getattr(cfg, s).run.progress for s in todo)
        board = start_display() if show else None
        reporter = Reporter(board, "tokenize", None, unit="parts", rate_unit="part/s") if board else None
        replace_stale_tokens(tokens, root, owned=tokens == storage.join(root, "tokens"))
        models = tokenize.resolve_models(root)
        if not has_hi and models.vqgan_hi is not None:
            models = dataclasses.replace(models, vqgan_hi=None)
        timed("tokenize", lambda: tokenize.run(corpus, tokens, models, cfg.tokenize, format, progress=show,
                                               reporter=reporter), tokenize_outcome)
    else:
        report["tokenize"] = "skipped (no transformer left to train)"
    for s in wanted:
        if s not in todo:
            report[s] = "skipped (finished)"
    check_before_training(todo, cfg, tokens, root)
    if len(todo) == 2 and cfg.concurrent and room_for_both(
            cfg, ray.cluster_resources, request_resources, autoscaling=cluster_may_grow(),
            wait_s=cfg.concurrent_wait_s):
        say("[all] training base and super-res concurrently")
        start = time.time()
        gate = fit.start_gate = fit.StartTogether(len(todo))

        def train(stage: str) -> None:  # each stage's time is its own, whichever ends first
            reached = reached_step(cfg, root, stage)
            try:
                run_stage(stage, cfg, tokens, root)
            except BaseException:
                gate.ended(stage, failed=True)
                raise
            gate.ended(stage, failed=False)
            report[stage] = trained_outcome(reached, time.time() - start, " (concurrently)")

        pool = ThreadPoolExecutor(2, thread_name_prefix="train")
        try:
            futures = {pool.submit(train, s): s for s in todo}
            for future in as_completed(futures):
                if future.exception() is not None:  # said at once; the other trainer runs to its end
                    others = [s for f, s in futures.items() if not f.done()]
                    error = future.exception()
                    why = (str(error).strip().splitlines() or [""])[0][:300]
                    say(f"[all] {futures[future]} failed: {type(error).__name__}{': ' + why if why else ''}"
                        + (f"; waiting for {others[0]} to finish" if others else ""))
        except KeyboardInterrupt:  # Ray Train aborts a run on Ctrl-C only from the main thread's fit()
            raise StopWithThreads from None
        finally:
            pool.shutdown(wait=False)
            fit.start_gate = None
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the refusal itself, not the stage it kept from starting
            raise next((e for e in errors if not isinstance(e, fit.NotStarted)), errors[0])
    else:
        for s in todo:
            reached = reached_step(cfg, root, s)
            timed(s, lambda s=s: run_stage(s, cfg, tokens, root), lambda _, seconds: trained_outcome(reached, seconds))

    component = decoder_component(root, cfg.decoder.component)
    if "decoder" in cfg.stages and decoder_finished(cfg, root, component):
        report["decoder"] = "skipped (finished)"
    elif "decoder" in cfg.stages:
        timed("decoder", lambda: run_stage("decoder", cfg, images, root, component=component, format=format))
    write_root_sampling(root, cfg.sampling)  # what generate and serve draw with, unless told otherwise
    say("[all] " + "; ".join(f"{k}: {v}" for k, v in report.items()))
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="muse train all",
        description="Train everything from a raw image-caption corpus: vqgan -> tokenize -> base and "
                    "super-res -> decoder fine-tune, into the model root --checkpoint. Finished stages are "
                    "skipped, so re-running the same command resumes after an interruption.",
        epilog="example: muse train all --config configs/demo.yaml --corpus data/corpus --checkpoint ROOT",
    )
    parser.add_argument("--corpus", required=True, help=CORPUS_HELP)
    parser.add_argument("--tokens", help="where token shards go (default ROOT/tokens)")
    parser.add_argument("--images", help="a corpus whose images the tokenizers (vqgan, decoder) learn from instead "
                                         "of --corpus's; same formats, captions unused")
    add_format_arg(parser)
    add_common_args(parser)
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    try:
        cfg = load_config(args.config, cli_overrides(args, ["vqgan", "base", "superres", "decoder"]))
    except (ValueError, OSError) as e:
        parser.error(str(e))
    try:
        with errors_in_one_line(parser):
            train_all(cfg, args.corpus, args.checkpoint, args.tokens, args.format, images=args.images)
    finally:
        stop_display()


if __name__ == "__main__":
    main()
