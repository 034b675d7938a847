"""The per-worker training steps of every stage, in-process (one worker, no Ray): on a tiny fixed set
the loss falls; text dropout hits ~10% of the samples, not ~90%."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jobs import stages
from jobs.masked import drop_text
from jobs.root_fit import token_model_config
from jobs.parallel import WorkerEnv
from jobs.train_job import TrainJob
from muse.config import preset, to_dict
from pipelines.shards import load_token_shards

from jobs_helpers import tiny_config


def make_worker(stage: str, section, root: str, model_config, data_meta=None, component=None, **job_extra):
    job = TrainJob(root=root, component=component or stage, stage=stage, model_config=to_dict(model_config),
                   data_meta=data_meta or {}, run_name=f"test_{stage}", **job_extra)
    torch.manual_seed(0)
    worker = stages.get(stage).worker(section, job, WorkerEnv())
    worker.reseed(0)
    return worker


def numpy_batch(table, rows: int) -> dict:
    """The first `rows` rows as Ray's numpy batch format (list columns are object arrays)."""
    return {name: table[name].slice(0, rows).to_numpy(zero_copy_only=False) for name in table.column_names}


def token_table(tiny_data):
    return load_token_shards(tiny_data.tokens)


def image_batch(tiny_data, size: int, rows: int) -> dict:
    from jobs.data import read_images
    from pipelines.config import TokenizeConfig

    return numpy_batch(read_images(tiny_data.corpus, size, TokenizeConfig()), rows)


def train(worker, batch: dict, steps: int) -> list[dict]:
    collated = worker.collate(batch)
    return [worker.train_step(collated, step) for step in range(steps)]


def assert_no_host_sync(metrics: list[dict]) -> None:
    """A step's metrics stay 0-d device tensors (only the counts are floats), so train_step never waits
    for the device; the loop converts them when it logs."""
    counts = {"tokens", "samples", "flops"}
    for m in metrics:
        kept = {k: type(v).__name__ for k, v in m.items() if k not in counts and not isinstance(v, torch.Tensor)}
        assert not kept, f"metrics synced to the host inside train_step: {kept}"


def test_drop_text_rate_is_ten_percent_not_ninety():
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(64, 12, dtype=torch.bool)
    rates = []
    for _ in range(300):
        new, dropped = drop_text(mask, 0.1, gen)
        assert torch.equal(~new.any(1), dropped)  # a dropped row is all False, the others untouched
        assert torch.equal(new[~dropped], mask[~dropped])
        rates.append(dropped.float().mean().item())
    assert abs(np.mean(rates) - 0.1) < 0.01


def test_base_loss_falls_and_text_is_dropped_for_a_tenth(tiny_data):
    table = token_table(tiny_data)
    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "ids", "text_dim": 64}
    cfg = tiny_config("base.optim.lr=3e-3", "base.optim.warmup_steps=0", "base.optim.ema_decay=0.9",
                      "base.run.max_steps=30")
    model_cfg = token_model_config("base-tiny", tiny_data.root, tiny_data.tokens, info, superres=False)
    worker = make_worker("base", cfg.base, tiny_data.root, model_cfg, info)
    seen_masks = []
    forward = worker.wrapper.forward
    worker.wrapper.forward = lambda ids, text, mask, lo=None: (seen_masks.append(mask.clone()), forward(ids, text, mask, lo))[1]
    metrics = train(worker, numpy_batch(table, 12), 30)
    first = np.mean([m["loss"] for m in metrics[:4]])
    last = np.mean([m["loss"] for m in metrics[-4:]])
    assert last < first - 0.5, (first, last)
    dropped = torch.cat([~m.any(1) for m in seen_masks]).float().mean().item()  # what the model saw
    assert dropped == pytest.approx(np.mean([m["text_dropped"] for m in metrics]))
    assert 0.02 < dropped < 0.2  # 360 samples: 10% ± 4.5 sigma, and nowhere near 90%
    assert all(0.0 < m["mask_rate"] <= 1.0 for m in metrics)
    assert metrics[-1]["acc"] > metrics[0]["acc"]
    assert_no_host_sync(metrics)


def test_superres_loss_falls(tiny_data):
    table = token_table(tiny_data)
    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "ids", "text_dim": 64}
    cfg = tiny_config("superres.optim.lr=3e-3", "superres.optim.warmup_steps=0", "superres.run.max_steps=15")
    model_cfg = token_model_config("superres-tiny", tiny_data.root, tiny_data.tokens, info, superres=True)
    worker = make_worker("superres", cfg.superres, tiny_data.root, model_cfg, info)
    metrics = train(worker, numpy_batch(table, 4), 15)
    assert np.mean([m["loss"] for m in metrics[-3:]]) < np.mean([m["loss"] for m in metrics[:3]]) - 0.3


def test_fresh_transformers_take_the_code_vectors_of_the_roots_tokenizers(tiny_data, tmp_path):
    from dataclasses import replace

    from jobs.root_fit import _code_dim
    from muse import checkpoint

    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "ids", "text_dim": 64}
    cfg = tiny_config("superres.optim.warmup_steps=0", "superres.run.max_steps=2")
    lo = checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "vqgan_lo"))
    hi = checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "vqgan_hi"))
    assert _code_dim(replace(preset("superres-tiny"), lo_code_dim=1), "lo_code_dim", to_dict(lo.config)) == {
        "lo_code_dim": lo.config.codebook_dim}  # the width comes from the tokenizer, not the preset
    model_cfg = replace(token_model_config("superres-tiny", tiny_data.root, tiny_data.tokens, info, superres=True),
                        code_dim=hi.config.codebook_dim, lo_code_dim=lo.config.codebook_dim)
    worker = make_worker("superres", cfg.superres, tiny_data.root, model_cfg, info)
    model = worker.wrapper.module.model if hasattr(worker.wrapper, "module") else worker.wrapper.model
    torch.testing.assert_close(model.embed.code_vectors, hi.quantizer.codes())
    torch.testing.assert_close(model.lo_embed.code_vectors, lo.quantizer.codes())
    metrics = train(worker, numpy_batch(token_table(tiny_data), 4), 2)
    assert np.isfinite([float(m["loss"]) for m in metrics]).all()
    exported = worker.eval_model()  # the vectors travel with the weights
    torch.testing.assert_close(exported.embed.code_vectors, hi.quantizer.codes())

    bare = str(tmp_path / "bare")  # a root without its tokenizers: a clear error, not zero vectors
    checkpoint.save_component(checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "text_encoder")),
                              checkpoint.component_uri(bare, "text_encoder"))
    base_cfg = replace(token_model_config("base-tiny", tiny_data.root, tiny_data.tokens, info, superres=False),
                       code_dim=lo.config.codebook_dim)
    with pytest.raises(ValueError, match="no vqgan_lo/"):
        make_worker("base", tiny_config().base, bare, base_cfg, info)


def test_demo_presets_read_codes_as_the_patches_the_roots_tokenizers_draw(tiny_data):
    from dataclasses import replace

    from jobs.root_fit import _code_dim
    from muse import checkpoint
    from muse.code_vectors import pixel_code_vectors

    info = {"tokens_lo_side": 8, "tokens_hi_side": 16, "text_storage": "ids", "text_dim": 64}
    cfg = tiny_config("superres.optim.warmup_steps=0", "superres.run.max_steps=2")
    lo = checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "vqgan_lo"))
    hi = checkpoint.load_component(checkpoint.component_uri(tiny_data.root, "vqgan_hi"))
    model_cfg = token_model_config("superres-tiny-codes", tiny_data.root, tiny_data.tokens, info, superres=True)
    f = hi.config.downsample_factor
    assert model_cfg.code_vectors == "pixels" and (model_cfg.code_dim, model_cfg.lo_code_dim) == (4 * f * f,) * 2
    worker = make_worker("superres", cfg.superres, tiny_data.root, model_cfg, info)
    model = worker.wrapper.module.model if hasattr(worker.wrapper, "module") else worker.wrapper.model
    for embed, vq in ((model.embed, hi), (model.lo_embed, lo)):
        torch.testing.assert_close(embed.code_vectors, pixel_code_vectors(vq.code_pixels()))
    # and super-res's pixel prior reads both tokenizers' patches
    torch.testing.assert_close(model.pixel_prior.lo_pixels, lo.code_pixels())
    torch.testing.assert_close(model.pixel_prior.hi_pixels, hi.code_pixels())
    # one class per codebook entry that has copies, as with codebook vectors
    same = (hi.quantizer.codes() @ hi.quantizer.codes().t()) > 0.99
    assert torch.equal(model.embed.code_class, (same | torch.eye(len(same), dtype=torch.bool)).int().argmax(dim=1))
    metrics = train(worker, numpy_batch(token_table(tiny_data), 4), 2)
    assert np.isfinite([float(m["loss"]) for m in metrics]).all()
    conv = to_dict(replace(lo.config, form="conv"))  # a conv decoder draws no code on its own
    with pytest.raises(ValueError, match="patch-form"):
        _code_dim(preset("base-tiny-codes"), "code_dim", conv)


def test_label_smoothing_defaults_to_none_on_a_code_vector_model_and_setting_it_is_warned_about():
    from jobs.config import TransformerStage
    from jobs.masked import label_smoothing, label_smoothing_warning

    assert TransformerStage().label_smoothing is None
    assert label_smoothing(preset("base-tiny-codes"), None) == 0.0
    assert label_smoothing(preset("superres-tiny-codes"), None) == 0.0
    assert label_smoothing(preset("base-tiny"), None) == 0.1 == label_smoothing(preset("base-632m"), None)
    assert label_smoothing(preset("base-tiny-codes"), 0.05) == 0.05  # as configured
    warning = label_smoothing_warning("superres", preset("superres-tiny-codes"), 0.1)
    assert "superres.label_smoothing unset" in warning and "0.1" in warning
    assert label_smoothing_warning("base", preset("base-tiny-codes"), None) is None
    assert label_smoothing_warning("base", preset("base-tiny-codes"), 0.0) is None
    assert label_smoothing_warning("base", preset("base-tiny"), 0.1) is None  # a free row per code
    with pytest.raises(ValueError, match="label_smoothing"):
        TransformerStage(label_smoothing=1.0)


def test_vqgan_reconstruction_loss_falls_and_gan_starts_after_warmup(tiny_data):
    cfg = tiny_config("vqgan.optim.lr=2e-3", "vqgan.optim.warmup_steps=0", "vqgan.gan.disc_start=8",
                      "vqgan.run.max_steps=10")
    worker = make_worker("vqgan", cfg.vqgan, tiny_data.root, preset("vqgan-tiny"), component="vqgan_lo")
    metrics = train(worker, image_batch(tiny_data, 64, 4), 10)
    assert metrics[-1]["rec"] < 0.7 * metrics[0]["rec"], [m["rec"] for m in metrics]
    assert all("d_loss" not in m for m in metrics[:8]) and all("d_loss" in m for m in metrics[8:])
    assert_no_host_sync(metrics)
    grid = worker.sample_grid(10)
    assert grid.size[0] > 2 * 64  # image | reconstruction, side by side


def test_vqgan_autoencoder_warmup_then_seeds_the_codebook(tiny_data):
    cfg = tiny_config("vqgan.quantizer_warmup_steps=3", "vqgan.optim.warmup_steps=0", "vqgan.run.max_steps=5")
    worker = make_worker("vqgan", cfg.vqgan, tiny_data.root, preset("vqgan-tiny"), component="vqgan_lo")
    quantizer = worker.vqgan.quantizer
    initial = quantizer.codebook.detach().clone()
    batch = worker.collate(image_batch(tiny_data, 64, 4))
    for step in range(2):
        metrics = worker.train_step(batch, step)
        assert float(metrics["commit"]) == 0.0  # a plain autoencoder: no code losses, no restarts
        assert torch.equal(quantizer.codebook, initial) and not quantizer.usage.any()
    worker.train_step(batch, 2)  # the last warm-up step seeds the codes from the latents kept so far
    assert not torch.equal(quantizer.codebook, initial) and torch.equal(quantizer.usage, torch.ones_like(quantizer.usage))
    assert not worker.seed_latents  # the candidates are released
    latents = worker.vqgan(batch["images"], quantize=False).latents.flatten(0, 2)
    codes = torch.nn.functional.normalize(quantizer.codebook.detach(), dim=-1)
    assert (latents @ codes.t()).amax(dim=-1).min() > 0.95  # every latent of the data has a code close by
    assert float(worker.train_step(batch, 3)["commit"]) > 0.0  # then it trains as a VQGAN
    with pytest.raises(ValueError, match="quantizer_warmup_steps"):
        tiny_config("vqgan.quantizer_warmup_steps=-1")


def test_a_run_resumed_inside_the_warmup_seeds_from_as_many_latents_as_an_uninterrupted_one(tiny_data):
    """The latents kept for seeding are not in the checkpoint: a run resumed at step 4 of a 6-step
    warm-up warms up for 6 steps of its own (its last, step 9, seeds) rather than seeding at step 5
    from 2 steps' latents. Uninterrupted, step 5 seeds, as before."""
    cfg = tiny_config("vqgan.quantizer_warmup_steps=6", "vqgan.optim.warmup_steps=0", "vqgan.run.max_steps=12",
                      "vqgan.run.batch_size=4")
    worker = make_worker("vqgan", cfg.vqgan, tiny_data.root, preset("vqgan-tiny"), component="vqgan_lo")
    assert worker.seeding_step(0) == 5 and worker.seeding_step(6) == -1
    batch = worker.collate(image_batch(tiny_data, 64, 4))
    initial = worker.vqgan.quantizer.codebook.detach().clone()
    for step in range(4, 9):
        assert float(worker.train_step(batch, step)["commit"]) == 0.0, step  # still an autoencoder
    assert torch.equal(worker.vqgan.quantizer.codebook, initial) and worker.seed_rows == 5 * 4 * 64
    worker.train_step(batch, 9)
    assert not torch.equal(worker.vqgan.quantizer.codebook, initial) and not worker.seed_latents
    assert float(worker.train_step(batch, 10)["commit"]) > 0.0


def test_decoder_finetune_trains_only_the_decoder(tiny_data, tmp_path):
    from muse.checkpoint import component_uri, load_component

    from jobs.decoder import widened_config

    cfg = tiny_config("decoder.optim.lr=1e-2", "decoder.optim.warmup_steps=0", "decoder.decoder_base_channels=64",
                      "decoder.gan.disc_start=100", "decoder.run.max_steps=8")
    wide = widened_config(tiny_data.root, "vqgan_lo", cfg.decoder)
    worker = make_worker("decoder", cfg.decoder, tiny_data.root, wide, component="vqgan_lo")
    before = {k: v.clone() for k, v in worker.vqgan.state_dict().items()}
    metrics = train(worker, image_batch(tiny_data, 64, 4), 8)
    assert metrics[-1]["rec"] < 0.8 * metrics[0]["rec"]
    after = worker.vqgan.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("decoder.") for k in changed)
    original = load_component(component_uri(tiny_data.root, "vqgan_lo"))
    images = worker.collate(image_batch(tiny_data, 64, 4))["images"]
    assert torch.equal(original.encode(images), worker.vqgan.encode(images))  # same tokens as before


def test_decoder_grids_compare_with_the_old_decoder_only_while_the_root_holds_it(tiny_data, tmp_path):
    """A finished decoder run continued with more steps finds its own export in the root: that is not
    the old decoder, so its grids show image | new decoder, not a column mislabelled "old"."""
    from muse.checkpoint import component_extra, component_uri, load_component, save_component

    from jobs.decoder import widened_config
    from jobs_helpers import copy_tree

    root = copy_tree(tiny_data.root, str(tmp_path / "root"))
    cfg = tiny_config("decoder.decoder_base_channels=64")
    wide = widened_config(root, "vqgan_lo", cfg.decoder)
    worker = make_worker("decoder", cfg.decoder, root, wide, component="vqgan_lo")
    assert len(worker.reconstructions(worker.vqgan, torch.zeros(2, 3, 64, 64))) == 2  # old and new decoder
    uri = component_uri(root, "vqgan_lo")
    save_component(load_component(uri), uri, extra=component_extra(uri) | {"run": "test_decoder"})
    again = make_worker("decoder", cfg.decoder, root, wide, component="vqgan_lo")
    assert again.original is None and len(again.reconstructions(again.vqgan, torch.zeros(2, 3, 64, 64))) == 1


def test_hi_tokenizer_can_start_from_the_trained_lo_one(tiny_data, tmp_path):
    from dataclasses import replace

    from jobs.vqgan import lo_for_hi_init
    from muse.checkpoint import component_uri, load_component, save_component
    from muse.vqgan import VQGAN, grown_config

    uri = lo_for_hi_init(tiny_data.root, preset("vqgan-hi-tiny"))
    cfg = tiny_config("vqgan.hi_init_from_lo=true")
    worker = make_worker("vqgan", cfg.vqgan, tiny_data.root, preset("vqgan-hi-tiny"), component="vqgan_hi",
                         init_from=uri)
    lo = load_component(uri)
    assert worker.vqgan.config.resolution == 128
    grown, trained = worker.vqgan.state_dict(), lo.state_dict()
    assert grown.keys() == trained.keys() and all(torch.equal(grown[k], trained[k]) for k in trained)
    with pytest.raises(ValueError, match="at another resolution, or grown"):
        lo_for_hi_init(tiny_data.root, preset("vqgan-f8-8192"))
    # A conv-form lo grown by one level (muse.vqgan.grow) is the other accepted start.
    conv_lo = VQGAN(replace(lo.config, form="conv", base_channels=16, num_res_blocks=0))
    save_component(conv_lo, component_uri(str(tmp_path), "vqgan_lo"))
    grown = grown_config(conv_lo.config)
    conv_uri = lo_for_hi_init(str(tmp_path), grown)
    worker = make_worker("vqgan", cfg.vqgan, str(tmp_path), grown, component="vqgan_hi", init_from=conv_uri)
    assert worker.vqgan.config == grown
    assert torch.equal(worker.vqgan.quantizer.codebook, conv_lo.quantizer.codebook)
