"""Inpainting, outpainting and mask-free editing at the token level (muse/editing.py)."""

from __future__ import annotations

import pytest
import torch
from fakes import context_tags, selected

from muse import editing
from muse.context import Context


class FakeTransformer(torch.nn.Module):
    """Fixed logits (plus tag·direction per context row); records the ids of every forward."""

    def __init__(self, side: int = 16, codebook_size: int = 8, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_tokens, self.codebook_size, self.mask_token_id = side * side, codebook_size, codebook_size
        self.base = 2 * torch.randn(self.num_tokens, codebook_size, generator=g)
        self.direction = 2 * torch.randn(self.num_tokens, codebook_size, generator=g)
        self.inputs: list[torch.Tensor] = []

    def forward(self, ids: torch.Tensor, ctx: Context, select: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(ids.clone())
        tags = context_tags(ctx)
        return selected(self.base + tags[:, None, None] * self.direction, select)


def ctx(*tags: float) -> Context:
    t = torch.tensor(tags, dtype=torch.float32).view(-1, 1, 1, 1)
    return Context([t], [t.clone()], torch.ones(len(tags), 1, dtype=torch.bool))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pixel_mask_to_token_mask_any_pixel_in_patch():
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[0, 9, 17] = True  # one pixel in patch (row 1, col 2) of an 8x8 grid of 8-pixel patches
    mask[0, 63, 0] = True  # bottom-left patch
    tokens = editing.token_mask_from_pixels(mask, 8)
    expected = torch.zeros(1, 8, 8, dtype=torch.bool)
    expected[0, 1, 2] = expected[0, 7, 0] = True
    assert torch.equal(tokens, expected)
    # Same mask seen by a 16x16 grid (4-pixel patches).
    fine = editing.token_mask_from_pixels(mask.float()[:, None], 16)
    assert fine.sum() == 2 and fine[0, 2, 4] and fine[0, 15, 0]


def test_upsample_token_mask_covers_blocks():
    lo = torch.zeros(1, 8, 8, dtype=torch.bool)
    lo[0, 3, 5] = True
    hi = editing.upsample_token_mask(lo, 16)
    assert hi.sum() == 4 and hi[0, 6:8, 10:12].all()


def test_inpainting_never_changes_a_known_token():
    model = FakeTransformer()
    ids = torch.randint(0, 8, (2, 16, 16), generator=gen(0))
    regen = torch.zeros(2, 16, 16, dtype=torch.bool)
    regen[0, 4:10, 2:12] = True
    regen[1, :, 8:] = True
    out = editing.inpaint_tokens(model, ctx(1.0, -1.0), ctx(0.0, 0.0), ids, regen, steps=6,
                                 guidance_scale=3.0, generator=gen(1))
    assert out.shape == ids.shape
    assert torch.equal(out[~regen], ids[~regen])
    assert not (out == model.mask_token_id).any()
    assert not torch.equal(out[regen], ids[regen])  # the masked part was actually decoded anew
    # The model saw the known tokens at every step.
    for seen in model.inputs:
        assert torch.equal(seen[:2].view(2, 16, 16)[~regen], ids[~regen])


@pytest.mark.parametrize("direction", ["all", "left", "right", "up", "down"])
def test_outpaint_canvas_marks_the_new_region(direction):
    images = torch.rand(1, 3, 64, 64) * 2 - 1
    canvas, new = editing.outpaint_canvas(images, direction=direction, scale=0.75 if direction != "all" else 0.5)
    assert canvas.shape == images.shape and new.shape == (1, 64, 64)
    assert (canvas[:, :, new[0]] == 0).all()  # the new region is blank
    if direction == "all":
        assert not new[0, 16:48, 16:48].any() and new.sum() == 64 * 64 - 32 * 32
    elif direction == "left":  # new strip on the left, the image's left 48 columns moved right
        assert new[0, :, :16].all() and not new[0, :, 16:].any()
        assert torch.equal(canvas[..., 16:], images[..., :48])
    elif direction == "right":
        assert new[0, :, 48:].all() and torch.equal(canvas[..., :48], images[..., 16:])
    elif direction == "up":
        assert new[0, :16].all() and torch.equal(canvas[..., 16:, :], images[..., :48, :])
    else:
        assert new[0, 48:].all() and torch.equal(canvas[..., :48, :], images[..., 16:, :])


@pytest.mark.parametrize("direction", editing.DIRECTIONS)
def test_the_high_res_canvas_is_the_low_res_one_scaled_so_no_kept_token_holds_new_canvas(direction):
    """The super-res stage keeps the high-res tokens under kept low-res tokens. Placed apart (each side
    rounded on its own), 34 of 455 (direction, scale) pairs kept a high-res token over a strip of the
    grey canvas, e.g. "left" at 0.62: 24 new columns of 64, but 49 of 128."""
    lo = torch.rand(1, 3, 64, 64) * 2 - 1
    hi = torch.nn.functional.interpolate(lo, size=(128, 128))
    for scale in [i / 40 for i in range(1, 40)] + [0.62, 0.37, 0.73]:
        _, new_lo = editing.outpaint_canvas(lo, direction, scale)
        _, new_hi = editing.outpaint_canvas(hi, direction, scale, placed_at=64)
        assert torch.equal(new_hi, torch.nn.functional.interpolate(new_lo[:, None].float(), size=(128, 128))[:, 0] > 0), \
            scale
        regen_hi = editing.upsample_token_mask(editing.token_mask_from_pixels(new_lo, 8), 16)
        needs_hi = editing.token_mask_from_pixels(new_hi, 16)  # high-res tokens holding new canvas
        assert not (needs_hi & ~regen_hi).any(), scale
    with pytest.raises(ValueError, match="must be square and a multiple"):
        editing.outpaint_canvas(torch.zeros(1, 3, 100, 100), direction, 0.5, placed_at=64)


def test_outpaint_canvas_keeps_low_precision_dtype():
    images = torch.rand(1, 3, 16, 16, dtype=torch.bfloat16)
    canvas, new = editing.outpaint_canvas(images, "all", 0.5)
    assert canvas.dtype == torch.bfloat16 and new.sum() == 16 * 16 - 8 * 8


def test_outpaint_canvas_rejects_bad_arguments():
    images = torch.zeros(1, 3, 8, 8)
    with pytest.raises(ValueError, match="direction"):
        editing.outpaint_canvas(images, direction="sideways")
    with pytest.raises(ValueError, match="scale"):
        editing.outpaint_canvas(images, scale=1.5)


def test_mask_free_edit_resamples_the_configured_fraction_per_iteration():
    model = FakeTransformer(side=16)  # 256 tokens: 8% = 20 per iteration
    # Start from ids that are never the model's top choice, so every resampled token changes.
    worst = model.base.argmin(dim=-1)
    ids = worst.view(1, 16, 16).repeat(2, 1, 1)
    changed_per_iteration: list[list[int]] = []
    prev = [ids.view(2, -1).clone()]

    def track(it, cur):
        changed_per_iteration.append((cur != prev[0]).sum(dim=1).tolist())
        prev[0] = cur.clone()

    out = editing.edit_tokens(model, ctx(0.0, 0.0), ctx(0.0, 0.0), ids, iterations=10, fraction=0.08,
                              guidance_scale=4.0, top_k=1, generator=[gen(0), gen(1)], callback=track)
    assert out.shape == ids.shape
    for seen in model.inputs:  # exactly 20 positions per row are masked for each prediction
        assert ((seen == model.mask_token_id).sum(dim=1) == 20).all()
    assert len(model.inputs) == 10  # one batched (cond + uncond) forward per iteration
    assert model.inputs[0].shape[0] == 4
    assert changed_per_iteration[0] == [20, 20]
    assert all(c <= 20 for row in changed_per_iteration for c in row)
    # Over 10 iterations of 8% the edited rows differ from the source in a good share of places,
    # and differently for the two generators.
    frac = (out != ids).float().mean().item()
    assert 0.3 < frac < 0.7
    assert not torch.equal(out[0], out[1])


def test_mask_free_edit_respects_editable_region_and_seed():
    model = FakeTransformer(side=8)
    ids = torch.randint(0, 8, (1, 8, 8), generator=gen(3))
    editable = torch.zeros(1, 8, 8, dtype=torch.bool)
    editable[0, :4] = True
    run = lambda seed: editing.edit_tokens(model, ctx(1.0), ctx(0.0), ids, iterations=20,  # noqa: E731
                                           fraction=0.25, editable=editable, generator=gen(seed))
    a = run(4)
    assert torch.equal(a[~editable], ids[~editable])
    assert not torch.equal(a[editable], ids[editable])
    assert torch.equal(a, run(4))
    assert not torch.equal(a, run(5))


def test_mask_free_edit_rejects_bad_settings():
    model = FakeTransformer(side=8)
    ids = torch.zeros(1, 8, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="fraction"):
        editing.edit_tokens(model, ctx(1.0), ctx(0.0), ids, fraction=0.0, generator=gen(0))
    with pytest.raises(ValueError, match="iterations"):
        editing.edit_tokens(model, ctx(1.0), ctx(0.0), ids, iterations=0, generator=gen(0))


def test_mask_free_edit_leaves_a_row_with_nothing_editable_alone():
    model = FakeTransformer(side=8)
    ids = torch.randint(0, 8, (2, 8, 8), generator=gen(3))
    editable = torch.zeros(2, 8, 8, dtype=torch.bool)
    editable[1, :4] = True  # row 0: nothing editable
    out = editing.edit_tokens(model, ctx(1.0, 1.0), ctx(0.0), ids, iterations=10, fraction=0.25,
                              editable=editable, generator=[gen(1), gen(2)])
    assert torch.equal(out[0], ids[0])
    assert torch.equal(out[1][~editable[1]], ids[1][~editable[1]]) and not torch.equal(out[1], ids[1])
    nothing = editing.edit_tokens(model, ctx(1.0), ctx(0.0), ids[:1], iterations=3,
                                  editable=torch.zeros(1, 8, 8, dtype=torch.bool), generator=gen(0))
    assert torch.equal(nothing, ids[:1])


def test_outpaint_canvas_marks_what_a_letterboxed_image_does_not_cover_as_new():
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    known = torch.zeros(1, 16, 16, dtype=torch.bool)
    known[:, 4:12] = True  # a 2:1 image letterboxed: bands above and below
    canvas, new = editing.outpaint_canvas(images, "left", 0.5, known=known)
    # The image's left half moves right; its bands stay new, and so does the strip on the left.
    assert new[:, :, :8].all()
    assert (~new[:, 4:12, 8:]).all() and new[:, :4, 8:].all() and new[:, 12:, 8:].all()
    assert torch.equal(canvas[..., 4:12, 8:], images[..., 4:12, :8])
    _, new_all = editing.outpaint_canvas(images, "all", 0.5, known=known)
    assert int((~new_all).sum()) == 8 * 4  # the centre 8x8 holds the image's 8x4 rows that are real


def test_edit_draws_its_uniforms_per_iteration(monkeypatch):
    """Memory does not grow with `iterations`: no draw spans them."""
    from muse import sampling

    shapes = []
    real = sampling.row_uniforms
    monkeypatch.setattr(sampling, "row_uniforms", lambda gens, shape, device: (shapes.append(shape),
                                                                               real(gens, shape, device))[1])
    model = FakeTransformer(side=4)
    ids = torch.randint(0, 8, (2, 4, 4), generator=gen(3))
    editing.edit_tokens(model, ctx(1.0, 1.0), ctx(0.0), ids, iterations=5, fraction=0.25, generator=[gen(1), gen(2)])
    assert shapes == [(2, 2, 16)] * 5
