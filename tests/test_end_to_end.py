"""The whole loop at CI size, as `make demo` runs it: corpus -> VQGAN (Ray Train) -> tokens (Ray Data)
-> base + super-res (Ray Train) -> Ray Serve -> HTTP -> judge. Each stage's output must feed the next,
and the served images must come from the trained checkpoint, not from random weights. (The decoder
fine-tune, which the demo leaves out, has its own Ray Train test in tests/jobs/test_ray_stages.py.)"""

import json

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

STEPS = [
    "vqgan.run.max_steps=6", "vqgan.hi_max_steps=4", "vqgan.run.checkpoint_every=6", "vqgan.run.sample_every=6",
    "vqgan.run.log_every=3",
    "base.run.max_steps=6", "base.run.checkpoint_every=6", "base.run.sample_every=6", "base.run.log_every=3",
    "superres.run.max_steps=4", "superres.run.checkpoint_every=4", "superres.run.sample_every=4",
    "superres.run.log_every=2",
]


def test_demo_loop_end_to_end(ray_session, tmp_path):
    from jobs.demo import run_demo
    from muse import checkpoint
    from muse.pipeline import MusePipeline
    from pipelines.shards import load_token_shards

    from ray import serve

    serve.shutdown()  # the demo starts its own Serve on its own port; the serve tests' app may still be up
    out = tmp_path / "demo"
    report = run_demo(str(out), overrides=tuple(STEPS), corpus_size=48, n_seen=3, eval_steps=3, ceiling_images=16,
                      n_held_out=2)
    root = str(out / "checkpoint")

    # Every stage left its output, and each fed the next.
    assert (out / "corpus" / "holdout.json").exists()
    for name in checkpoint.COMPONENTS:
        assert checkpoint.has_component(root, name), name
    tokens = load_token_shards(str(out / "tokens"))
    assert tokens.num_rows > 0 and "tokens_lo" in tokens.column_names and "tokens_hi" in tokens.column_names
    lo_side = checkpoint.read_component_config(checkpoint.component_uri(root, "vqgan_lo"))[1].tokens_per_side
    assert len(tokens.column("tokens_lo")[0].as_py()) == lo_side**2
    base_cfg = checkpoint.read_component_config(checkpoint.component_uri(root, "base"))[1]
    assert base_cfg.tokens_per_side == lo_side
    for stage, steps in (("base", 6), ("superres", 4)):  # exported by the runs, at their last step
        extra = checkpoint.component_extra(checkpoint.component_uri(root, stage))
        assert extra.get("finished") and extra["step"] == steps, extra

    # The report and the grid exist; the judge scored every prompt.
    saved = json.loads((out / "report.json").read_text())
    assert saved["judge"]["seen"]["n"] == 3 and saved["judge"]["held_out"]["n"] == 2
    assert saved["judge_base"]["seen"]["n"] == 3 and "chance" in saved["judge_base"]  # base stage alone
    assert (out / "grid.png").exists() and (out / "grid_base.png").exists()
    # serve.yaml serves the root afterwards with the sampling the demo served it with, and the root records
    # it (configs/demo.yaml's), so that `muse generate` and a plain `muse serve` draw with it too.
    from jobs.config import load_config
    from jobs.demo import DEFAULT_CONFIG
    from muse.root_sampling import read_root_sampling
    from serve.config import AppArgs, load_args

    demo_sampling = load_config(DEFAULT_CONFIG).sampling.recorded()
    assert demo_sampling["guidance_scale"] == 1.0 and read_root_sampling(root).recorded() == demo_sampling
    served_as = AppArgs(**load_args(out / "serve.yaml"))
    assert served_as.checkpoint == str(root) and served_as.sampling.model_dump(include=set(demo_sampling)) == \
        demo_sampling
    assert set(saved["psnr_db"]) == {"vqgan_lo", "vqgan_hi"}
    from jobs.parallel import cpu_runs_bf16

    assert saved["precision"]["vqgan"] == "fp32"  # the demo's transformers ask for bf16 where the CPU has it
    assert saved["precision"]["base"] == saved["precision"]["superres"] == \
        ("bf16 autocast" if cpu_runs_bf16() else "fp32")

    # Served images come from the trained checkpoint: identical to this process's pipeline on the
    # trained root, and different from the same root with its transformers freshly initialised (the
    # same architectures, text encoder and tokenizers), so not from an initialisation.
    assert report["served_matches_checkpoint"]["matches"], report["served_matches_checkpoint"]
    assert set(report["tokenizer_ceiling"]) == set(report["tokenizer_ceiling_held_out"]) == {"vqgan_lo", "vqgan_hi"}
    trained, untrained = MusePipeline.from_pretrained(root), MusePipeline.from_pretrained(root)
    torch.manual_seed(0)
    for stage in ("base", "superres"):
        config = checkpoint.read_component_config(checkpoint.component_uri(root, stage))[1]
        setattr(untrained, stage, checkpoint.build_component(stage, config).eval())
    prompt = report["served_matches_checkpoint"]["prompt"]
    a = np.asarray(trained([prompt], steps=3, seed=5)[0], dtype=np.int16)
    b = np.asarray(untrained([prompt], steps=3, seed=5)[0], dtype=np.int16)
    assert np.abs(a - b).mean() > 1.0

    # A second run reuses every finished stage (the training half of the demo: serving and judging
    # again would only repeat what is checked above).
    from jobs.all import train_all
    from jobs.config import load_config
    from jobs.demo import DEFAULT_CONFIG

    again = train_all(load_config(DEFAULT_CONFIG, list(STEPS)), str(out / "corpus"), root, tokens=str(out / "tokens"))
    assert set(again) >= {"vqgan_lo", "vqgan_hi", "tokenize", "base", "superres"}, again
    assert all(str(v).startswith("skipped") for v in again.values()), again
