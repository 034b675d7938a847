"""VQGAN tokenizer: shapes, gradients, learning, codebook usage and restarts, decoder fine-tune."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from muse.config import preset
from muse.vqgan import PatchDiscriminator, VQGAN, VQGANOutput, freeze_for_decoder_finetune, widen_decoder

TINY = preset("vqgan-tiny")
# A smaller tokenizer for the training tests: f8 over 32px images, a 64-code codebook, in the
# ResNet form of the paper-size presets (residual blocks, attention bottleneck, slow restarts).
SMALL = replace(TINY, form="conv", resolution=32, base_channels=16, z_channels=32, codebook_size=64, codebook_dim=8,
                num_res_blocks=1, mid_block=True, dead_code_threshold=1e-3)
PLAIN = replace(SMALL, num_res_blocks=0, mid_block=False)  # the tiny presets' earlier form
PATCH = replace(SMALL, form="patch", base_channels=64, num_res_blocks=1, mid_block=False)  # the tiny presets' form
STEPS_OVERFIT = 150  # MSE falls ~40x by here (~7x by step 100)
STEPS_USAGE = 120  # codes collapse to ~7 of 64 by step 50; restarts revive ~50 by step 120


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These convs are too small to gain from a second thread, and on a loaded 2-core box (Ray
    workers from other tests) two OpenMP threads measured 70-90x slower per step than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """(n, 3, size, size) in [-1, 1]: a flat background with two coloured discs or squares."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images = []
    for _ in range(n):
        img = (torch.rand(3, 1, 1, generator=generator) * 2 - 1).expand(3, size, size).clone()
        for _ in range(2):
            cx, cy = torch.randint(size // 4, 3 * size // 4, (2,), generator=generator).tolist()
            r = int(torch.randint(size // 8, size // 3, (1,), generator=generator))
            if torch.rand(1, generator=generator) < 0.5:
                inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r * r
            else:
                inside = ((xs - cx).abs() <= r) & ((ys - cy).abs() <= r)
            img[:, inside] = torch.rand(3, 1, generator=generator) * 2 - 1
        images.append(img)
    return torch.stack(images)


def total_loss(out: VQGANOutput, images: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out.recon, images) + out.codebook_loss + out.commitment_loss


@pytest.mark.parametrize("name", ["vqgan-tiny", "vqgan-hi-tiny"])
def test_encode_decode_forward_shapes(name):
    cfg = preset(name)
    torch.manual_seed(0)
    model = VQGAN(cfg).eval()
    images = shapes(2, cfg.resolution, torch.Generator().manual_seed(1))
    side = cfg.tokens_per_side

    ids = model.encode(images)
    assert ids.shape == (2, side, side) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < cfg.codebook_size

    decoded = model.decode(ids)
    assert decoded.shape == (2, 3, cfg.resolution, cfg.resolution) and decoded.dtype == torch.float32
    assert decoded.min() >= -1 and decoded.max() <= 1

    out = model(images)
    assert out.recon.shape == images.shape
    assert torch.equal(out.ids, ids)  # the training pass tokenizes like encode()
    assert torch.allclose(out.recon.clamp(-1, 1), decoded, atol=1e-5)
    for loss in (out.codebook_loss, out.commitment_loss):
        assert loss.ndim == 0 and torch.isfinite(loss) and loss >= 0
    assert 1.0 <= out.perplexity <= min(cfg.codebook_size, ids.numel()) + 1e-3


def test_f16_variant_from_config():
    cfg = replace(TINY, resolution=64, channel_mult=(1, 1, 2, 2, 4), base_channels=16)
    assert cfg.downsample_factor == 16
    model = VQGAN(cfg).eval()
    ids = model.encode(torch.zeros(3, 3, 64, 64))
    assert ids.shape == (3, 4, 4)
    assert model.decode(ids).shape == (3, 3, 64, 64)
    assert model.encode(torch.zeros(1, 3, 128, 96)).shape == (1, 8, 6)  # fully convolutional


def test_bad_input_is_rejected():
    model = VQGAN(SMALL).eval()
    with pytest.raises(ValueError, match="multiples of 8"):
        model.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="ids must"):
        model.decode(torch.full((1, 4, 4), SMALL.codebook_size))
    with pytest.raises(ValueError, match="resolution"):
        VQGAN(replace(SMALL, resolution=36))


def test_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    model = VQGAN(SMALL).train()
    images = shapes(2, 32, torch.Generator().manual_seed(0))
    out = model(images)
    total_loss(out, images).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The reconstruction alone reaches the encoder: the straight-through estimator passes it on.
    (g,) = torch.autograd.grad(F.mse_loss(model(images).recon, images), model.encoder.conv_out.weight)
    assert g.abs().sum() > 0
    # The adaptive GAN weight differentiates through the decoder's final layer.
    w = model.decoder_last_layer_weight()
    assert w is model.decoder.conv_out.weight
    (g,) = torch.autograd.grad(model(images).recon.mean(), w)
    assert g.abs().sum() > 0


def test_plain_form_has_no_residual_or_attention_blocks():
    from muse.vqgan import AttnBlock, ResBlock

    model = VQGAN(PLAIN).eval()
    assert not any(isinstance(m, (ResBlock, AttnBlock)) for m in model.modules())
    assert any(isinstance(m, (ResBlock, AttnBlock)) for m in VQGAN(SMALL).modules())
    ids = model.encode(torch.zeros(2, 3, 32, 32))
    assert ids.shape == (2, 4, 4) and model.decode(ids).shape == (2, 3, 32, 32)
    # The decoder fine-tune may still give the plain tokenizer a residual decoder.
    wide = widen_decoder(model, decoder_base_channels=24, decoder_num_res_blocks=1)
    assert any(isinstance(m, ResBlock) for m in wide.decoder.modules())
    assert torch.equal(wide.encode(torch.zeros(2, 3, 32, 32)), ids)
    with pytest.raises(ValueError, match="num_res_blocks"):
        VQGAN(replace(PLAIN, num_res_blocks=-1))


def test_patch_form_reads_and_draws_each_patch_on_its_own():
    torch.manual_seed(0)
    model = VQGAN(PATCH).eval()
    assert TINY.form == "patch" and preset("vqgan-hi-tiny").form == "patch"
    images = shapes(2, 32, torch.Generator().manual_seed(0))
    latents = model(images).latents  # (2, 4, 4, d)
    changed = images.clone()
    changed[:, :, 8:16, 16:24] = -changed[:, :, 8:16, 16:24]  # one 8x8 patch: token (1, 2)
    moved = (model(changed).latents - latents).abs().amax(dim=-1) > 1e-6  # (2, 4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 2] = True
    assert torch.equal(moved, expected.expand(2, 4, 4))  # no other token sees that patch
    ids = model.encode(images)
    other = ids.clone()
    other[:, 3, 0] = (ids[:, 3, 0] + 1) % PATCH.codebook_size
    differs = (model.decode(other) != model.decode(ids)).any(dim=1)  # (2, 32, 32)
    assert differs[:, 24:, :8].flatten(1).any(dim=1).all()  # that token's patch changes in each image
    assert not differs[:, :24].any() and not differs[:, :, 8:].any()  # and nothing else does
    assert model.decoder_last_layer_weight() is model.decoder.conv_out.weight
    with pytest.raises(ValueError, match="form"):
        VQGAN(replace(PATCH, form="vit"))


def test_code_pixels_are_the_patch_each_code_draws_on_its_own():
    torch.manual_seed(0)
    model = VQGAN(PATCH).eval()
    f, K = PATCH.downsample_factor, PATCH.codebook_size
    pixels = model.code_pixels()
    assert pixels.shape == (K, 3 * f * f)
    for code in (0, 5, K - 1):
        alone = model.decode(torch.full((1, 1, 1), code))  # (1, 3, f, f)
        torch.testing.assert_close(pixels[code], alone.flatten())
    with pytest.raises(ValueError, match="patch-form"):
        VQGAN(replace(PATCH, form="conv")).code_pixels()


def test_autoencoder_pass_then_kmeans_seeding_gives_every_kind_of_patch_its_own_code():
    """quantize=False decodes the unit-norm latents and leaves the codebook alone; `seed` then puts
    a code on each distinct latent before any gets a second one (k-means++)."""
    torch.manual_seed(0)
    model = VQGAN(PATCH).train()
    colors = torch.rand(6, 3, 1, 1, generator=torch.Generator().manual_seed(2)) * 2 - 1
    # 6 kinds of 8x8 patch (flat colours), tiled in varying order over 4x4-token images.
    order = torch.randint(6, (8, 4, 4), generator=torch.Generator().manual_seed(3))
    images = colors[order].permute(0, 3, 1, 4, 2, 5).expand(8, 3, 4, 8, 4, 8).reshape(8, 3, 32, 32)
    before = (model.quantizer.codebook.clone(), model.quantizer.usage.clone())
    out = model(images, quantize=False)
    assert out.codebook_loss == 0 and out.commitment_loss == 0
    assert torch.allclose(out.latents.norm(dim=-1), torch.ones(()), atol=1e-5)
    assert torch.allclose(out.recon, model.decoder(out.latents.permute(0, 3, 1, 2)), atol=1e-6)
    assert torch.equal(model.quantizer.codebook, before[0]) and torch.equal(model.quantizer.usage, before[1])
    model.quantizer.seed(out.latents.flatten(0, 2))
    assert torch.equal(model.quantizer.usage, torch.ones(PATCH.codebook_size))
    ids = model.eval().encode(images)
    kinds = {int(k): set(ids[order == k].tolist()) for k in range(6)}
    assert all(len(codes) == 1 for codes in kinds.values()), kinds  # one code per kind of patch
    assert len(set.union(*kinds.values())) == 6  # and no two kinds share one


def test_only_a_conv_form_tokenizer_can_be_grown():
    from muse.vqgan import grow

    with pytest.raises(ValueError, match="conv-form"):
        grow(VQGAN(PATCH))


@pytest.mark.parametrize("config,lr,warmup,fall", [(SMALL, 2e-3, 0, 10), (PLAIN, 2e-3, 0, 10), (PATCH, 5e-3, 30, 5)],
                         ids=["resnet", "plain", "patch"])
def test_overfits_a_few_images(config, lr, warmup, fall):
    """The patch form as its recipe trains it (autoencoder steps, then k-means++ codes); it has no
    context across patches, so these off-grid discs fall ~7x in the steps where the conv forms fall 10x+."""
    torch.manual_seed(0)
    model = VQGAN(config).train()
    images = shapes(4, 32, torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    before = F.mse_loss(model.eval().decode(model.encode(images)), images).item()
    model.train()
    for step in range(STEPS_OVERFIT):
        out = model(images, quantize=step >= warmup)
        if step == warmup - 1:
            model.quantizer.seed(out.latents.flatten(0, 2))
        loss = total_loss(out, images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = F.mse_loss(model.eval().decode(model.encode(images)), images).item()
    assert after < before / fall, (before, after)


def test_codebook_stays_in_use_on_varied_images():
    torch.manual_seed(0)
    model = VQGAN(SMALL).train()
    model.quantizer.decay = 0.9  # restart after ~70 idle steps instead of ~700, to fit a unit test
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(STEPS_USAGE):
        images = shapes(8, 32, gen)
        loss = total_loss(model(images), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    ids = model.eval().encode(shapes(64, 32, gen))
    used = ids.unique().numel()
    assert used > SMALL.codebook_size // 2, used  # observed 51 of 64; 14 without restarts


def test_dead_codes_are_restarted_from_the_batch_in_training_only():
    torch.manual_seed(0)
    model = VQGAN(SMALL)
    q = model.quantizer
    images = shapes(4, 32, torch.Generator().manual_seed(0))
    q.usage.fill_(1.0)
    dead = torch.arange(0, SMALL.codebook_size, 4)
    q.usage[dead] = 0.0
    before = q.codebook.detach().clone()

    model.eval()(images)  # eval: no restarts, no usage updates
    assert torch.equal(q.codebook, before) and (q.usage[dead] == 0).all()

    model.train()(images)
    changed = (q.codebook != before).any(dim=1)
    assert torch.equal(changed.nonzero().squeeze(1), dead)  # exactly the dead codes moved
    # ... onto (nearly) this batch's projected encoder outputs,
    with torch.no_grad():
        z = q.project(model.encoder(images)).flatten(0, 2)  # (N, d)
    cos = (q.codes()[dead] @ z.t()).max(dim=1).values
    assert (cos > 0.99).all(), cos
    # ... and they are alive again.
    assert (q.usage[dead] > SMALL.dead_code_threshold).all()


def test_restarts_draw_the_candidates_the_codebook_fits_worst():
    # Mostly-background batches: candidates that a live code already fits must not take the
    # restarted codes; the one the codebook misses must.
    torch.manual_seed(0)
    q = VQGAN(SMALL).quantizer
    d = SMALL.codebook_dim
    background, shape = F.one_hot(torch.tensor(0), d).float(), F.one_hot(torch.tensor(1), d).float()
    with torch.no_grad():
        q.codebook.copy_(background.expand(SMALL.codebook_size, d))
    q.usage.fill_(1.0)
    dead = torch.tensor([3, 9, 27])
    q.usage[dead] = 0.0
    candidates = torch.cat([background.expand(500, d), shape[None]])  # 500 fitted rows, 1 missed row
    assert q.restart_dead_codes(candidates) == 3
    assert (q.codes()[dead] @ shape > 0.99).all()  # uniform draws would pick it 0.6% of the time


def test_restart_between_forwards_keeps_the_earlier_graph_valid():
    # A GAN step may run the VQGAN twice before one backward; a restart in the second pass must not
    # invalidate the first pass's graph.
    model = VQGAN(SMALL).train()
    images = shapes(2, 32, torch.Generator().manual_seed(0))
    first = model(images)
    model.quantizer.usage[:8] = 0.0
    second = model(images)
    (total_loss(first, images) + total_loss(second, images)).backward()
    assert model.quantizer.codebook.grad is not None


def test_first_training_batch_seeds_every_code():
    model = VQGAN(SMALL).train()
    assert (model.quantizer.usage == 0).all()
    images = shapes(4, 32, torch.Generator().manual_seed(0))
    before = model.quantizer.codebook.detach().clone()
    model(images)
    assert (model.quantizer.codebook != before).any(dim=1).all()
    assert (model.quantizer.usage > SMALL.dead_code_threshold).all()


def test_patch_discriminator():
    torch.manual_seed(0)
    disc = PatchDiscriminator(TINY)
    images = shapes(2, 64, torch.Generator().manual_seed(0))
    logits = disc(images)
    assert logits.shape == (2, 1, 14, 14)  # 64 -> 32 -> 16 (stride 2) -> 15 -> 14 (stride 1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in disc.modules())
    logits.mean().backward()
    assert all(p.grad is not None for p in disc.parameters())


def test_widen_decoder_keeps_tokens_and_freeze_leaves_only_the_decoder():
    torch.manual_seed(0)
    model = VQGAN(SMALL)
    images = shapes(4, 32, torch.Generator().manual_seed(0))
    model.train()(images)  # seed the codebook so the comparison is not trivial
    model.eval()
    wide = widen_decoder(model, decoder_base_channels=24, decoder_num_res_blocks=2).eval()
    assert wide.config.decoder_base_channels == 24 and wide.config.decoder_num_res_blocks == 2
    assert wide.config.base_channels == SMALL.base_channels
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(wide.decoder) > 2 * n(model.decoder)
    assert n(wide.encoder) == n(model.encoder)
    assert wide.decoder.conv_in.out_channels == 24 * SMALL.channel_mult[-1]
    ids = model.encode(images)
    assert ids.unique().numel() > 1
    assert torch.equal(wide.encode(images), ids)
    assert wide.decode(ids).shape == images.shape

    freeze_for_decoder_finetune(wide)
    trainable = {name for name, p in wide.named_parameters() if p.requires_grad}
    assert trainable == {name for name, _ in wide.named_parameters() if name.startswith("decoder.")}
    # Fine-tuning in train mode neither restarts codes nor changes the tokens.
    wide.quantizer.usage.zero_()
    out = wide.train()(images)
    total_loss(out, images).backward()
    assert torch.equal(wide.eval().encode(images), ids)
    assert all(p.grad is None for p in wide.encoder.parameters())


def test_same_seed_same_init():
    def build(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return VQGAN(SMALL).state_dict()

    a, b, c = build(0), build(0), build(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["quantizer.codebook"], c["quantizer.codebook"])
    assert not torch.equal(a["decoder.conv_out.weight"], c["decoder.conv_out.weight"])


@pytest.mark.parametrize("name", ["vqgan-f16-8192", "vqgan-f8-8192"])
def test_paper_presets_have_sane_sizes(name):
    cfg = preset(name)
    with torch.device("meta"):
        model = VQGAN(cfg)
    params = sum(p.numel() for p in model.parameters())
    assert 20e6 < params < 150e6, params
    assert model.quantizer.codebook.shape == (8192, cfg.codebook_dim)


def test_grow_doubles_the_resolution_keeps_the_grid_and_copies_every_lower_layer():
    from muse.vqgan import grow

    torch.manual_seed(0)
    lo = VQGAN(PLAIN).eval()
    hi = grow(lo).eval()
    assert hi.config.resolution == 2 * lo.config.resolution
    assert hi.config.tokens_per_side == lo.config.tokens_per_side
    assert torch.equal(hi.quantizer.codebook, lo.quantizer.codebook)
    shift = len(hi.encoder.down) - len(lo.encoder.down)
    for i, module in enumerate(lo.encoder.down):
        for (_, a), (_, b) in zip(module.state_dict().items(), hi.encoder.down[i + shift].state_dict().items()):
            assert torch.equal(a, b)
    for i, module in enumerate(lo.decoder.up):
        for (_, a), (_, b) in zip(module.state_dict().items(), hi.decoder.up[i].state_dict().items()):
            assert torch.equal(a, b)
    ids = hi.encode(torch.zeros(2, 3, 64, 64))
    assert ids.shape == (2, 4, 4) and hi.decode(ids).shape == (2, 3, 64, 64)


def test_forward_runs_under_cpu_bf16_autocast_with_a_float32_code_search():
    """run.cpu_bf16 on the VQGAN stage: the encoder runs in bf16, the quantizer's projection and
    nearest-code search in float32."""
    import torch

    from muse.config import preset
    from muse.vqgan import VQGAN

    torch.manual_seed(0)
    model = VQGAN(preset("vqgan-tiny"))
    q = model.quantizer
    x = torch.rand(8, 3, 64, 64) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
        z = model.encoder(x)
        encoded = model.encode(x)
    assert z.dtype == torch.bfloat16  # the encoder does run in bf16
    assert out.ids.shape == (8, 8, 8) and torch.isfinite(out.recon.float()).all()
    # The same bf16 encoder output, projected and searched with autocast off, is the float32 answer.
    assert out.latents.dtype == torch.float32 and torch.equal(out.latents, q.project(z))
    nearest = (out.latents @ q.codes().t()).argmax(dim=-1)  # (the forward's restarts are done by now)
    assert torch.equal(out.ids, nearest) and torch.equal(encoded, nearest)
