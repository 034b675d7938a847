"""The super-res pixel prior: high-res codes scored against the upsampled low-res image."""

import pytest
import torch
import torch.nn.functional as F

from muse import checkpoint, sampling
from muse.code_vectors import LEARNED_LOGIT_BOUND, pixel_code_vectors, pixel_patch_side
from muse.config import SuperResTransformerConfig
from muse.token_stages import TextCondition, superres_tokens
from muse.transformer import SuperResTransformer

# 2x2 low-res tokens of 4x4 px (an 8 px image) under 4x4 high-res tokens of 4x4 px (16 px).
CONFIG = SuperResTransformerConfig(lo_codebook_size=6, hi_codebook_size=40, lo_tokens_per_side=2, hi_tokens_per_side=4,
                                   hidden=32, lo_layers=1, hi_layers=1, heads=2, mlp=64, text_dim=8, lo_skip=True,
                                   code_dim=64, lo_code_dim=64, code_vectors="pixels", pixel_prior=True)


LO_IDS = torch.tensor([[[1, 2], [3, 0]], [[5, 5], [4, 1]]])


def _codebooks(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Low-res codes: coloured shapes on white. High-res codes: the patches of LO_IDS's two images
    upsampled (in shuffled order), and random patches; returns where each image's patch went."""
    g = torch.Generator().manual_seed(seed)
    lo = torch.ones(6, 3, 4, 4)
    for k in range(1, 6):
        shape = torch.rand(4, 4, generator=g) < 0.5
        colour = torch.rand(3, generator=g) * 2 - 1
        lo[k] = torch.where(shape, colour[:, None, None], lo[k])
    images = lo[LO_IDS].permute(0, 3, 1, 4, 2, 5).reshape(2, 3, 8, 8)
    up = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    patches = F.unfold(up, kernel_size=4, stride=4).transpose(1, 2).reshape(32, 48)  # (image, position) rows
    perm = torch.randperm(40, generator=g)
    hi = torch.rand(40, 48, generator=g) * 2 - 1
    hi[perm[:32]] = patches
    return lo.reshape(6, 48), hi, perm[:32].view(2, 4, 4)


def _model(lo: torch.Tensor, hi: torch.Tensor) -> SuperResTransformer:
    torch.manual_seed(0)
    model = SuperResTransformer(CONFIG).eval()
    model.lo_embed.set_code_vectors(pixel_code_vectors(lo))
    model.embed.set_code_vectors(pixel_code_vectors(hi))
    model.pixel_prior.set_code_pixels(lo, hi)
    return model


def test_an_untrained_model_draws_the_high_res_codes_of_the_upsampled_low_res_image():
    """No training target ever named these codes: the prior alone draws, at every high-res position,
    the patch of the upsampled low-res image there (or one within a few grey levels of it), through
    guided sampling (the conditional and the unconditional rows stacked in one forward)."""
    lo, hi, want = _codebooks()
    model = _model(lo, hi)
    lo_ids = LO_IDS
    text = TextCondition(torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool))
    got = superres_tokens(model, text, lo_ids, steps=4, guidance_scale=3.0, generator=sampling.image_generators(0, 2))
    error = ((hi[got] - hi[want]) ** 2).mean(-1)  # (2, 4, 4): each drawn patch against the right one
    assert error.max() < 0.05, error
    # Without the prior the same untrained model draws other patches.
    with torch.no_grad():
        model.pixel_prior.scale.zero_()
    other = superres_tokens(model, text, lo_ids, steps=4, guidance_scale=3.0, generator=sampling.image_generators(0, 2))
    assert ((hi[other] - hi[want]) ** 2).mean(-1).mean() > 0.2


def test_the_prior_is_a_mean_squared_distance_in_logits():
    lo, hi, _ = _codebooks(1)
    model = _model(lo, hi)
    lo_ids = torch.randint(0, 6, (1, 4))
    u = model.pixel_prior.prior_pixels(lo_ids)  # (1, 16, 48)
    distance = ((u[:, :, None] - hi[None, None]) ** 2).mean(-1)  # (1, 16, 40)
    logits = model.pixel_prior.prior(u)
    scale = model.pixel_prior.scale.item()
    torch.testing.assert_close(logits - logits[..., :1], -scale * (distance - distance[..., :1]), atol=1e-3, rtol=1e-4)
    # The transformer's own logits are bounded beside it, however large they grow.
    huge = torch.full((1, 16, 40), -1.0e4)
    huge[..., 7] = 1.0e4
    combined = model.pixel_prior(huge, u)
    assert ((combined - logits).abs() <= LEARNED_LOGIT_BOUND + 1e-3).all()


def test_the_code_pixels_and_scale_are_saved_and_the_prior_needs_pixel_codes(tmp_path):
    from dataclasses import replace

    lo, hi, _ = _codebooks()
    model = _model(lo, hi)
    model.pixel_prior.scale.data.fill_(3.5)
    checkpoint.save_component(model, str(tmp_path / "superres"))
    loaded = checkpoint.load_component(str(tmp_path / "superres")).eval()
    assert torch.equal(loaded.pixel_prior.hi_pixels, hi) and torch.equal(loaded.pixel_prior.lo_pixels, lo)
    assert loaded.pixel_prior.scale.item() == 3.5
    with pytest.raises(ValueError, match="pixel_prior"):
        SuperResTransformer(replace(CONFIG, code_vectors="codebook"))
    with pytest.raises(ValueError, match="pixel code vectors"):
        pixel_patch_side(60)
    with pytest.raises(ValueError, match="hi_pixels"):
        model.pixel_prior.set_code_pixels(lo, hi[:10])
