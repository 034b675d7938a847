"""`make demo`: the whole platform on one machine, CPU only, with the tiny presets.

    synthetic corpus (held-out pairings) ─▶ Ray Train: VQGANs ─▶ Ray Data: tokenize ─▶
    Ray Train: base + super-res ─▶ Ray Serve ─▶ HTTP requests ─▶ judge + report
    (the decoder fine-tune runs too when the config's `stages` lists it; configs/demo.yaml does not)

Writes into --output (default demo_output/):
  corpus/       the synthetic corpus and holdout.json
  images/       with --tokenizer-images all-pairings: as many images again, of every pairing, that
                the tokenizers learn from instead of the corpus
  checkpoint/   the trained model root
  serve.yaml    the root with the demo's sampling: `muse serve --config demo_output/serve.yaml` serves
                it afterwards as the demo did
  grid.png      prompt -> served image (base + super-res), with the judge's verdict
  grid_base.png the same prompts through the base stage alone
  report.json   judge accuracy (seen vs held-out pairings, and the chance level of the same images
                judged against other prompts) for both, PSNR, masked-token accuracy, stage times

Every stage is skipped when its output already exists, so a second run only serves and evaluates.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import time
import urllib.error
import urllib.request

from PIL import Image

from jobs.cluster import join_ray
from jobs.fit import worker_env
from jobs.preflight import RunRefused
from jobs.stage import errors_in_one_line
from jobs.progress import quiet_ray_loggers, set_verbose, stop_display
from muse import storage
from muse.data.synthetic import GRID_LAYOUTS

DEMO_APP = "muse-demo"  # the demo's Serve application: the only one it deletes
TOKENIZER_IMAGES = ("corpus", "all-pairings")  # what the tokenizers learn from (--tokenizer-images)

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.yaml")


SERVE_CONFIG = "serve.yaml"


def write_serve_config(output: str, root: str, sampling: dict) -> str:
    """OUTPUT/serve.yaml: AppArgs overrides (the root, the demo's sampling: configs/demo.yaml's, which the
    root records too) for `muse serve --config`, so the root is served afterwards as the demo served it,
    not with Serve's defaults (guidance 4, super-res sampling the whole codebook), under which the tiny
    model draws other images."""
    import yaml

    path = storage.join(output, SERVE_CONFIG)
    storage.write_text(path, "# `muse serve --config " + path + "`: the demo's model with the demo's sampling\n"
                       + yaml.safe_dump({"checkpoint": os.path.abspath(root) if not storage.is_s3(root) else root,
                                         "sampling": dict(sampling)}, sort_keys=False))
    return path


def http_generate(url: str, size: str, steps: int | None = None, timeout: float = 300.0):
    """A `(prompts, seeds) -> images` function (`muse.evaluate.Generate`) that asks the served API, one
    request per prompt with its seed."""
    def generate(prompts: list[str], seeds: list[int]) -> list[Image.Image]:
        images = []
        for prompt, seed in zip(prompts, seeds):
            body = {"prompt": prompt, "n": 1, "size": size, "seed": seed, "response_format": "b64_json"}
            if steps is not None:
                body["steps"] = steps
            request = urllib.request.Request(f"{url}/v1/images/generations", data=json.dumps(body).encode(),
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    payload = json.loads(response.read())
            except urllib.error.HTTPError as e:
                raise RuntimeError(f"the server answered {e.code} to {prompt!r}: {e.read()[:300]!r}") from e
            images.append(Image.open(io.BytesIO(base64.b64decode(payload["data"][0]["b64_json"]))).convert("RGB"))
        return images
    return generate


def wait_healthy(url: str, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"the Serve app at {url} did not become healthy in {timeout:.0f}s")


def provenance_check(served, pipe, args, steps: int | None) -> dict:
    """Whether the served image for a fixed prompt and seed is the one the trained checkpoint makes
    in this process: evidence that Serve loaded the trained model root, not random weights."""
    import numpy as np

    prompt, seed = "two red circles on the left and a blue square on the right", 1234
    remote = np.asarray(served([prompt], [seed])[0], dtype=np.int16)
    local = pipe([prompt], steps=steps or args.sampling.steps, superres_steps=args.sampling.superres_steps,
                 guidance_scale=args.sampling.guidance_scale, choice_temperature=args.sampling.choice_temperature,
                 superres_top_k=args.sampling.superres_top_k if pipe.superres is not None else None, seed=seed,
                 superres=pipe.superres is not None)[0]
    if local.size != remote.shape[1::-1]:  # the API resamples to the size asked for, bicubic
        from PIL import Image

        local = local.resize(remote.shape[1::-1], Image.Resampling.BICUBIC)
    diff = np.abs(remote - np.asarray(local, dtype=np.int16))
    # Tokens are bit-identical; the decoder's float kernels may round a few pixels differently
    # across processes, so "matches" allows sub-level noise (random weights differ by tens of levels).
    return {"prompt": prompt, "seed": seed, "mean_abs_pixel_difference": float(diff.mean()),
            "max_abs_pixel_difference": int(diff.max()), "matches": bool(diff.mean() < 0.5)}


def training_precision(cfg) -> dict[str, str]:
    """What each training stage ran in on this machine (run.cpu_bf16 takes effect only where the CPU
    has bf16 instructions): demos of two machines differ where this does."""
    import torch

    from jobs.parallel import uses_bf16

    def precision(section) -> str:
        device = torch.device("cuda" if section.scaling.use_gpu else "cpu")
        return "bf16 autocast" if uses_bf16(device, section.run.bf16, section.run.cpu_bf16) else "fp32"

    return {stage: precision(getattr(cfg, stage)) for stage in ("vqgan", "base", "superres")}


ATTRIBUTES = (("color", "colour"), ("shape", "shape"), ("count", "count"), ("placement", "placement"),
              ("correct", "whole scene"))


def judge_table(report: dict) -> str:
    """The judge's figures as a console table: one row per stage and prompt set, chance in brackets."""
    header = f"{'':<38}" + "".join(f"{label:>15}" for _, label in ATTRIBUTES)
    rows = [header]
    for key, stage in (("judge_base", "base (256x256)"), ("judge", "full chain (512x512)")):
        summary = report.get(key)
        if not summary:
            continue
        for name, label in (("seen", "seen"), ("held_out", "held-out")):
            got, chance = summary.get(name, {}), summary.get("chance", {}).get(name, {})
            cells = "".join(f"{got[k]:>8.2f} ({chance.get(k, float('nan')):.2f})" if k in got else f"{'-':>15}"
                            for k, _ in ATTRIBUTES)
            rows.append(f"{stage + ', ' + label + ' n=' + str(got.get('n', 0)):<38}{cells}")
    return "\n".join(rows)


def run_demo(output: str, *, config: str | None = DEFAULT_CONFIG, overrides: tuple[str, ...] = (),
             corpus_size: int = 2000, image_size: int = 128, holdout_fraction: float = 0.2, corpus_grid: int = 8,
             corpus_layout: str = "lines",
             n_seen: int = 48, eval_steps: int | None = None, num_cpus: int | None = None,
             ceiling_images: int = 200, tokenizer_images: str = "all-pairings", n_held_out: int | None = None) -> dict:
    """Run (or resume) the demo; returns the report that is also written to OUTPUT/report.json.
    tokenizer_images: what the tokenizers learn from, the captioned corpus ("corpus") or as many images
    again of every colour-shape pairing ("all-pairings", written to OUTPUT/images). n_held_out: how many of
    the corpus's held-out prompts are judged (default all)."""
    if tokenizer_images not in TOKENIZER_IMAGES:
        raise ValueError(f"tokenizer_images must be one of {TOKENIZER_IMAGES}, got {tokenizer_images!r}")
    import ray
    from ray import serve

    from jobs.all import train_all
    from jobs.config import load_config
    from muse.data.synthetic import write_corpus
    from muse.evaluate import evaluate
    from muse.pipeline import MusePipeline
    from serve.app import build_app, start_serve, unused_port
    from serve.config import AppArgs, Deployment, Generator, Sampling

    train_cfg = load_config(config, list(overrides))  # a typo fails here, before Ray and the corpora
    output = storage.absolute(output)
    corpus, root = storage.join(output, "corpus"), storage.join(output, "checkpoint")
    images = storage.join(output, "images") if tokenizer_images == "all-pairings" else None
    timings: dict[str, float] = {}
    began = time.time()
    started_ray = join_ray(worker_env(), num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False)
    quiet_ray_loggers()
    deployed = False
    try:
        start = time.time()
        if storage.exists(storage.join(corpus, "holdout.json")):
            check_reused_corpus(corpus, n=corpus_size, size=image_size, grid=corpus_grid, layout=corpus_layout)
            print(f"[demo] corpus: reusing {corpus}", flush=True)
        else:
            print(f"[demo] corpus: writing {corpus_size} synthetic {image_size}px images to {corpus}", flush=True)
            write_corpus(corpus, corpus_size, size=image_size, holdout_fraction=holdout_fraction, grid=corpus_grid,
                         layout=corpus_layout)
        if tokenizer_images == "all-pairings" and not storage.exists(storage.join(images, "holdout.json")):
            # The tokenizers learn from images of every pairing, captions unused (as a tokenizer learns from
            # a broad image set): the held-out pairings are kept from the transformers, which never see a
            # caption or a token grid of one, not from the image codec.
            print(f"[demo] tokenizer images: writing {corpus_size} more, every pairing, to {images}", flush=True)
            write_corpus(images, corpus_size, size=image_size, seed=1, grid=corpus_grid, layout=corpus_layout)
        timings["corpus_s"] = time.time() - start

        start = time.time()
        try:
            stages = train_all(train_cfg, corpus, root, tokens=storage.join(output, "tokens"), images=images)
        finally:
            stop_display()
        timings["training_s"] = time.time() - start

        start = time.time()
        port = unused_port()
        url = f"http://127.0.0.1:{port}"
        small = Deployment(num_cpus=0.25)
        gen = Generator(num_cpus=0.5)
        ingress = AppArgs.model_fields["ingress"].default.model_copy(update={"num_cpus": 0.25})  # its queue kept
        sampling = train_cfg.sampling.recorded()  # what the recipe measured its model to draw well with
        args = AppArgs(checkpoint=root, text_encoder=small, decoder=small, ingress=ingress, base=gen, superres=gen,
                       sampling=Sampling(**sampling))
        write_serve_config(output, root, sampling)
        start_serve("127.0.0.1", port)
        deployed = True  # from here on the app may exist, even if serve.run fails part-way
        serve.run(build_app(args), name=DEMO_APP, route_prefix="/", blocking=False)
        wait_healthy(url)
        print(f"[demo] serving {root} at {url}", flush=True)
        timings["serve_start_s"] = time.time() - start

        start = time.time()
        pipe = MusePipeline.from_pretrained(root)
        size = "512x512" if pipe.superres is not None else "256x256"
        served = http_generate(url, size, eval_steps)
        # The base stage's own images too ("256x256": no super-res), judged the same way.
        served_base = http_generate(url, "256x256", eval_steps) if pipe.superres is not None else None
        report = evaluate(served, pipe, corpus, output, n_seen=n_seen, base_generate=served_base,
                          ceiling_images=ceiling_images, n_held_out=n_held_out)
        report["served_matches_checkpoint"] = provenance_check(served, pipe, args, eval_steps)
        timings["eval_s"] = time.time() - start
        report["stages"] = stages
        report["precision"] = training_precision(train_cfg)
        report["timings_s"] = {k: round(v, 1) for k, v in timings.items()}
        report["served_from"] = {"url": url, "checkpoint": root, "size": size}
        storage.write_text(storage.join(output, "report.json"), json.dumps(report, indent=1))
        serve.delete(DEMO_APP)
        deployed = False
    finally:
        if started_ray:
            ray.shutdown()  # takes Serve with it (serve.shutdown() here races the controller's own exit)
        elif deployed:
            # A joined cluster's Serve may run other users' apps: only the demo's own goes, and a failed
            # delete does not hide the error that brought us here.
            try:
                serve.delete(DEMO_APP)
            except Exception as e:
                print(f"[demo] could not delete the Serve app {DEMO_APP}: {e}", flush=True)
    minutes = (time.time() - began) / 60
    print(f"\n[demo] done in {minutes:.1f} min. The attribute judge on served images (chance level in brackets):",
          flush=True)
    print(judge_table(report), flush=True)
    print("[demo] trained in " + ", ".join(f"{stage}: {p}" for stage, p in report["precision"].items()), flush=True)
    print(f"\n[demo] outputs in {output}:\n"
          f"  grid.png, grid_base.png   prompt -> served image, full chain and base stage, with the verdicts\n"
          f"  report.json               every figure above, stage times, the provenance check\n"
          f"  checkpoint/, serve.yaml   the model root, served as here by: muse serve --config "
          f"{storage.join(output, SERVE_CONFIG)}", flush=True)
    return report


def check_reused_corpus(corpus: str, **wanted) -> None:
    """Refuse to reuse a corpus written with other settings (--corpus-size, --corpus-grid,
    --corpus-layout) than this run asks for; what its holdout.json does not record is not compared."""
    written = json.loads(storage.read_text(storage.join(corpus, "holdout.json")))
    differ = {k: (written[k], v) for k, v in wanted.items() if k in written and written[k] != v}
    if differ:
        shown = ", ".join(f"{k} {was} (asked: {now})" for k, (was, now) in differ.items())
        raise RunRefused(f"{corpus} was written with {shown}: delete it to write a new one, or ask for the same")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="demo_output", help="output directory (default demo_output)")
    parser.add_argument("--config", default=DEFAULT_CONFIG, help="training config YAML (default configs/demo.yaml)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="training config override, e.g. --set base.run.max_steps=100 (repeatable)")
    parser.add_argument("--corpus-size", type=int, default=2000)
    parser.add_argument("--corpus-grid", type=int, default=8,
                        help="shapes drawn on a GRID x GRID lattice, the base tokenizer's token grid, so each "
                             "shape is one token (default 8); 0 places them freely")
    parser.add_argument("--corpus-layout", choices=GRID_LAYOUTS, default="lines",
                        help="where on the lattice: each group on its fixed line of cells, one image per caption "
                             "(lines, default), or random cells of its side (scattered)")
    parser.add_argument("--n-seen", type=int, default=48, help="seen-pairing prompts to judge (default 48)")
    parser.add_argument("--tokenizer-images", choices=TOKENIZER_IMAGES, default="all-pairings",
                        help="what the tokenizers learn from: as many images again as the corpus, of every "
                             "colour-shape pairing, captions unused, so that they can draw the pairings the "
                             "corpus holds out (default), or the captioned corpus alone")
    parser.add_argument("--verbose", action="store_true",
                        help="Ray's own logs and every worker's lines instead of one progress line per stage")
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    from jobs.config import load_config

    try:  # a usage error, said in one line before Ray starts and the corpora are written
        load_config(args.config, list(args.set))
    except (ValueError, OSError) as e:
        parser.error(str(e))
    with errors_in_one_line(parser):
        run_demo(args.output, config=args.config, overrides=tuple(args.set), corpus_size=args.corpus_size,
                 corpus_grid=args.corpus_grid, corpus_layout=args.corpus_layout, n_seen=args.n_seen,
                 tokenizer_images=args.tokenizer_images)


if __name__ == "__main__":
    main()
