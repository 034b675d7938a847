"""Shared training pieces: the schedule, weight-decay groups, EMA, and the pickle-free checkpoint that
restores a run exactly."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from jobs.common import (
    EMA,
    build_optimizer,
    build_scheduler,
    load_gathered_state,
    lr_factor,
    param_groups,
    save_gathered_state,
)
from jobs.config import OptimSettings
from jobs.parallel import WorkerEnv, configure_cpu_worker, uses_bf16
from muse.config import preset
from muse.transformer import MaskedTransformer


def test_lr_warms_up_linearly_then_decays_by_cosine_to_the_final_fraction():
    f = [lr_factor(s, warmup=10, total=110, final=0.1) for s in range(111)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(f[:9], f[1:10]))
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert f[60] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert f[110] == pytest.approx(0.1)


def test_weight_decay_only_on_linear_and_conv_weights():
    from dataclasses import replace

    from muse.vqgan import VQGAN

    # The transformer has no convolutions; the VQGAN stages are mostly Conv2d (a small conv form here),
    # and the patch form draws its output with a ConvTranspose2d.
    vqgan = VQGAN(replace(preset("vqgan-tiny"), form="conv", base_channels=32, channel_mult=(1, 2)))
    patch = VQGAN(preset("vqgan-tiny"))
    assert isinstance(patch.decoder.conv_out, nn.ConvTranspose2d)
    for model in (MaskedTransformer(preset("base-tiny")), patch, vqgan):
        decay, no_decay = param_groups(model, 0.05)
        names = {id(p): n for n, p in model.named_parameters()}
        weights = {f"{n}.weight" for n, m in model.named_modules()
                   if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))}
        assert {names[id(p)] for p in decay["params"]} == weights
        assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - weights
        assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    # In the VQGAN: convolutions decayed; biases, norms and the codebook not.
    assert {"encoder.conv_in.weight", "quantizer.proj.weight"} <= weights
    assert {"encoder.conv_in.bias", "encoder.norm_out.weight", "quantizer.codebook"} <= set(names.values()) - weights


def test_ema_warms_up_its_decay_and_tracks_the_weights():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.99)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(step=0)  # decay min(0.99, 1/10) = 0.1: the average moves 90% of the way
    start = ema.full_state()["weight"]
    assert torch.allclose(start, model.weight - 0.1, atol=1e-6)
    # Later steps: decay (1 + step) / (10 + step) = 6/15 at step 5, then the configured 0.99 once reached.
    for step, moved in ((5, 1 - 6 / 15), (10_000, 1 - 0.99)):
        before = ema.full_state()["weight"].clone()  # full_state may hand back the average itself
        with torch.no_grad():
            model.weight.add_(1.0)
        ema.update(step=step)
        assert torch.allclose(ema.full_state()["weight"], before + moved * (model.weight - before), atol=1e-6)


def _train(model, opt, sched, ema, steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        ids = torch.randint(0, 512, (4, 64), generator=gen)
        ctx = model.encode_context(torch.randn(4, 5, 64, generator=gen), torch.ones(4, 5, dtype=torch.bool))
        loss = nn.functional.cross_entropy(model(ids, ctx).flatten(0, 1), ids.flatten())
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        ema.update(step)


def _fresh(seed: int = 0):
    torch.manual_seed(seed)
    model = MaskedTransformer(preset("base-tiny"))
    optim = OptimSettings(lr=1e-3, warmup_steps=2)
    opt = build_optimizer(model, optim, WorkerEnv())
    return model, opt, build_scheduler(opt, optim, total_steps=20), EMA(model, 0.9)


def test_checkpoint_restores_model_optimizer_scheduler_and_ema_exactly(tmp_path):
    model, opt, sched, ema = _fresh()
    _train(model, opt, sched, ema, 3, seed=1)
    save_gathered_state(str(tmp_path), step=3, env=WorkerEnv(), modules={"model": model}, optimizers={"model": opt},
                        schedulers={"model": sched}, ema=ema, counters={"samples": 12.0})
    assert sorted(os.listdir(tmp_path)) == ["ema.safetensors", "model.optim.safetensors", "model.safetensors",
                                            "trainer_state.json"]  # no pickles
    _train(model, opt, sched, ema, 3, seed=2)  # the uninterrupted run

    model2, opt2, sched2, ema2 = _fresh(seed=123)  # different initial weights: all must come from disk
    meta = load_gathered_state(str(tmp_path), modules={"model": model2}, optimizers={"model": opt2},
                               schedulers={"model": sched2}, ema=ema2)
    assert meta["step"] == 3 and meta["counters"] == {"samples": 12.0}
    assert sched2.last_epoch == 3 and opt2.state[opt2.param_groups[0]["params"][0]]["step"] == 3
    _train(model2, opt2, sched2, ema2, 3, seed=2)  # the resumed run

    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow, ema2.shadow))
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_checkpoint_from_another_model_is_refused(tmp_path):
    model, opt, sched, ema = _fresh()
    save_gathered_state(str(tmp_path), step=1, env=WorkerEnv(), modules={"model": model}, optimizers={},
                        schedulers={}, ema=None, counters={})
    with pytest.raises(ValueError, match="does not match"):
        load_gathered_state(str(tmp_path), modules={"model": nn.Linear(2, 2)}, optimizers={}, schedulers={}, ema=None)


def test_perceptual_loss_needs_user_weights_and_never_downloads(tmp_path):
    from safetensors.torch import save_file

    from jobs.perceptual import check_weights, load_perceptual, vgg16_features

    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        check_weights(str(tmp_path / "vgg16.safetensors"))
    torch.manual_seed(0)
    weights = {f"features.{k}": v for k, v in vgg16_features().state_dict().items()}
    save_file(weights, str(tmp_path / "vgg16.safetensors"))
    loss = load_perceptual(str(tmp_path / "vgg16.safetensors"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == pytest.approx(0.0, abs=1e-6)
    assert float(loss(x, -x)) > 0.0
    torch.save(weights, tmp_path / "vgg16.pt")
    with pytest.raises(ValueError, match="safetensors"):
        load_perceptual(str(tmp_path / "vgg16.pt"))


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_cpu_bf16_only_where_the_cpu_has_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    """run.cpu_bf16 on a CPU without AVX512-BF16 or AMX would run emulated bf16, 10-15x slower than fp32:
    it is ignored there. GPUs follow run.bf16 alone."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert uses_bf16(cpu, bf16=True, cpu_bf16=True) is expected
    assert uses_bf16(cpu, bf16=True, cpu_bf16=False) is False
    assert uses_bf16(cuda, bf16=True, cpu_bf16=False) is True
    assert uses_bf16(cuda, bf16=False, cpu_bf16=True) is False


def test_cpu_bf16_training_takes_the_math_attention_kernel():
    """bf16 on a CPU: the flash kernel's backward is the slow one, so attention runs as matmuls there,
    with the same result; fp32 keeps PyTorch's choice."""
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    with WorkerEnv(bf16=True).autocast():
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert y.dtype == torch.bfloat16
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on exit
    with WorkerEnv(bf16=False).autocast():
        assert torch.backends.cuda.flash_sdp_enabled()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(y.float(), ref, atol=3e-2)


def test_cpu_training_workers_flush_denormals_in_their_thread_and_the_threads_it_starts():
    """configure_cpu_worker runs in Ray Train's training thread: denormals there, and in threads it
    starts afterwards, become zero; other threads keep IEEE behaviour."""
    import threading

    tiny = torch.tensor([1e-39])  # a float32 denormal
    seen = {}

    def training_thread():
        configure_cpu_worker(1)
        seen["training"] = float(tiny * 1.0)
        child = threading.Thread(target=lambda: seen.update(child=float(tiny * 1.0)))
        child.start()
        child.join()
        seen["threads"] = torch.get_num_threads()

    threads = torch.get_num_threads()
    worker = threading.Thread(target=training_thread)
    worker.start()
    worker.join()
    torch.set_num_threads(threads)
    assert seen["training"] == 0.0 and seen["child"] == 0.0 and seen["threads"] == 1
    assert float(tiny * 1.0) > 0  # this thread was not touched
