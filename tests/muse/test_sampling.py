"""Parallel decoding (muse/sampling.py) against a fake transformer whose logits are fixed per context."""

from __future__ import annotations

import math

import pytest
import torch
from fakes import context_tags, selected

from muse import sampling
from muse.context import Context

N, K = 16, 8


class FakeTransformer(torch.nn.Module):
    """logits = base + tag·direction, where `tag` is a number carried by each context row. Records
    every forward's input ids and the tags it saw, so tests can see what each branch received."""

    def __init__(self, num_tokens: int = N, codebook_size: int = K, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.num_tokens, self.codebook_size, self.mask_token_id = num_tokens, codebook_size, codebook_size
        self.base = 2 * torch.randn(num_tokens, codebook_size, generator=g)
        self.direction = 2 * torch.randn(num_tokens, codebook_size, generator=g)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.selects: list[torch.Tensor | None] = []  # each forward's `select`

    def forward(self, ids: torch.Tensor, ctx: Context, select: torch.Tensor | None = None) -> torch.Tensor:
        assert ids.shape == (ctx.batch_size, self.num_tokens)
        tags = context_tags(ctx)  # (B,)
        self.calls.append((ids.clone(), tags.clone()))
        self.selects.append(None if select is None else select.clone())
        return selected(self.base + tags[:, None, None] * self.direction, select)


def ctx(*tags: float) -> Context:
    t = torch.tensor(tags, dtype=torch.float32).view(-1, 1, 1, 1)
    return Context([t], [t.clone()], torch.ones(len(tags), 1, dtype=torch.bool))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_no_mask_token_left_and_ids_in_codebook():
    model = FakeTransformer()
    ids = sampling.generate(model, ctx(1.0, -1.0, 0.5), ctx(0.0, 0.0, 0.0), steps=6, guidance_scale=3.0,
                            generator=gen(0))
    assert ids.shape == (3, N) and ids.dtype == torch.long
    assert not (ids == model.mask_token_id).any()
    assert ids.min() >= 0 and ids.max() < K


@pytest.mark.parametrize("steps", [1, 4, 7])
def test_decoded_count_follows_cosine_schedule_and_decoded_tokens_stay(steps):
    model = FakeTransformer()
    seen: list[torch.Tensor] = []
    sampling.generate(model, ctx(1.0, 2.0), steps=steps, generator=gen(1),
                      callback=lambda step, ids: seen.append(ids.clone()))
    assert len(seen) == steps
    for step, ids in enumerate(seen):
        expected_masked = math.floor(N * math.cos(math.pi / 2 * (step + 1) / steps))
        assert ((ids == model.mask_token_id).sum(dim=1) == expected_masked).all(), step
    for before, after in zip(seen, seen[1:]):  # a decoded token is never re-masked or changed
        decoded = before != model.mask_token_id
        assert torch.equal(after[decoded], before[decoded])


def test_linear_schedule_counts():
    model = FakeTransformer()
    seen: list[int] = []
    sampling.generate(model, ctx(1.0), steps=4, schedule="linear", generator=gen(0),
                      callback=lambda step, ids: seen.append(int((ids == model.mask_token_id).sum())))
    assert seen == [12, 8, 4, 0]


def test_same_seed_same_ids_different_seed_different_ids():
    model = FakeTransformer()
    run = lambda seed: sampling.generate(model, ctx(0.3, 0.7), ctx(0.0, 0.0), steps=5,  # noqa: E731
                                         guidance_scale=2.0, generator=gen(seed))
    assert torch.equal(run(7), run(7))
    assert not torch.equal(run(7), run(8))


def test_per_row_generators_reproduce_a_row_whatever_the_batch():
    model = FakeTransformer()
    alone = sampling.generate(model, ctx(0.5), ctx(0.0), steps=5, guidance_scale=2.0, generator=[gen(42)])
    batched = sampling.generate(model, ctx(-1.0, 0.5, 2.0), ctx(0.0), steps=5, guidance_scale=2.0,
                                generator=[gen(1), gen(42), gen(3)])
    other_batch = sampling.generate(model, ctx(0.5, 1.5), ctx(0.0), steps=5, guidance_scale=2.0,
                                    generator=[gen(42), gen(9)])
    assert torch.equal(batched[1], alone[0])
    assert torch.equal(other_batch[0], alone[0])
    assert not torch.equal(batched[0], alone[0])


def test_generator_list_of_wrong_length_is_rejected():
    with pytest.raises(ValueError, match="generator"):
        sampling.generate(FakeTransformer(), ctx(1.0, 1.0), steps=2, generator=[gen(0)])


def test_guidance_zero_equals_conditional_path_and_never_runs_uncond():
    model = FakeTransformer()
    cond_only = sampling.generate(model, ctx(1.0, -0.5), steps=5, generator=gen(3))
    model.calls.clear()
    zero = sampling.generate(model, ctx(1.0, -0.5), ctx(9.0, 9.0), steps=5, guidance_scale=0.0, generator=gen(3))
    assert torch.equal(zero, cond_only)
    assert all(tags.tolist() == [1.0, -0.5] for _, tags in model.calls)
    guided = sampling.generate(model, ctx(1.0, -0.5), ctx(9.0, 9.0), steps=5, guidance_scale=3.0, generator=gen(3))
    assert not torch.equal(guided, cond_only)


def test_guidance_is_one_batched_forward_per_step_with_uncond_second():
    model = FakeTransformer()
    sampling.generate(model, ctx(1.0, 2.0), ctx(-3.0, -4.0), steps=6, guidance_scale=2.0, generator=gen(0))
    assert len(model.calls) == 6  # one forward per step, never two
    first_ids, first_tags = model.calls[0]
    assert first_tags.tolist() == [1.0, 2.0]  # the ramp starts at t = 0: no unconditional branch
    for ids, tags in model.calls[1:]:
        assert tags.tolist() == [1.0, 2.0, -3.0, -4.0]
        assert torch.equal(ids[:2], ids[2:])  # both branches see the same tokens


def test_guided_logits_formula_and_linear_ramp_to_target():
    model = FakeTransformer()
    cond, uncond = ctx(1.0, 2.0), ctx(-1.0, 0.5)
    ids = torch.full((2, N), model.mask_token_id)
    t = torch.tensor([3.0, 0.5])
    got = sampling.guided_logits(model, ids, cond, sampling.cfg_context(cond, uncond), t)
    lc, lu = model(ids, cond), model(ids, uncond)
    torch.testing.assert_close(got, (1 + t[:, None, None]) * lc - t[:, None, None] * lu)

    # With top_k=1 and one step (t = target), the ids are the argmax of the fully guided logits.
    ids = sampling.generate(model, cond, uncond, steps=1, guidance_scale=t, generator=gen(0), top_k=1)
    assert torch.equal(ids, got.argmax(dim=-1))


def test_fp16_logits_are_guided_in_float32_so_a_large_scale_stays_finite():
    """(1 + t) is past fp16's largest value (65504) at t = 7e4: the guided logits stayed all inf and the
    sampler drew one code everywhere. They are combined in float32."""
    model = FakeTransformer()
    half = lambda *a, **k: FakeTransformer.forward(model, *a, **k).half()  # noqa: E731
    cond, uncond = ctx(1.0, 2.0), ctx(-1.0, 0.5)
    ids = torch.full((2, N), model.mask_token_id)
    t = torch.tensor([7e4, 3.0])
    fake = torch.nn.Module()
    fake.forward = half
    got = sampling.guided_logits(fake, ids, cond, sampling.cfg_context(cond, uncond), t)
    lc, lu = model(ids, cond).half().float(), model(ids, uncond).half().float()
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, (1 + t[:, None, None]) * lc - t[:, None, None] * lu, rtol=1e-3, atol=1.0)


def test_guidance_ramp_reaches_target_on_last_step():
    """Spy on guided_logits: t goes 0, s/(S-1)·scale, ..., scale."""
    model = FakeTransformer()
    seen: list[float] = []
    real = sampling.guided_logits

    def spy(model_, ids, context, joint, t, select=None):
        seen.append(float(t[0]) if joint is not None else 0.0)
        return real(model_, ids, context, joint, t, select)

    sampling.guided_logits = spy
    try:
        sampling.generate(model, ctx(1.0), ctx(0.0), steps=5, guidance_scale=4.0, generator=gen(0))
    finally:
        sampling.guided_logits = real
    assert seen == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])


def test_guidance_without_uncond_context_is_an_error():
    with pytest.raises(ValueError, match="uncond_context"):
        sampling.generate(FakeTransformer(), ctx(1.0), steps=2, guidance_scale=2.0, generator=gen(0))


def test_top_k_restricts_samples():
    model = FakeTransformer()
    ids = sampling.generate(model, ctx(0.0, 0.0, 0.0), steps=3, generator=gen(5), top_k=2)
    top2 = model.base.topk(2, dim=-1).indices  # (N, 2)
    assert (ids[..., None] == top2).any(-1).all()
    # Without top-k, 3 rows x 16 positions of an 8-way softmax leave the top 2 somewhere.
    free = sampling.generate(model, ctx(0.0, 0.0, 0.0), steps=3, generator=gen(5))
    assert not (free[..., None] == top2).any(-1).all()


def test_fixed_positions_are_kept_and_schedule_counts_only_free_tokens():
    model = FakeTransformer()
    init = torch.randint(0, K, (2, N), generator=gen(0))
    fixed = torch.zeros(2, N, dtype=torch.bool)
    fixed[0, :6] = True
    fixed[1, 4:14] = True
    counts: list[list[int]] = []
    out = sampling.generate(model, ctx(1.0, 1.0), steps=3, generator=gen(2), init_ids=init, fixed=fixed,
                            callback=lambda s, ids: counts.append((ids == model.mask_token_id).sum(1).tolist()))
    assert torch.equal(out[fixed], init[fixed])
    assert not (out == model.mask_token_id).any()
    free = [10, 6]
    assert counts == [[math.floor(f * math.cos(math.pi / 2 * (s + 1) / 3)) for f in free] for s in range(3)]
    # Fixed tokens are visible to the model from the first step.
    first_ids, _ = model.calls[0]
    assert torch.equal(first_ids[fixed], init[fixed])


def test_temperature_changes_the_decoding_order():
    model = FakeTransformer(num_tokens=64)
    order = lambda temp: sampling.generate(  # noqa: E731
        model, ctx(0.0), steps=8, choice_temperature=temp, generator=gen(11), top_k=1,
        callback=lambda s, ids: orders.append(ids.clone()),
    )
    orders: list[torch.Tensor] = []
    order(0.0)
    cold = [o.clone() for o in orders]
    orders.clear()
    order(50.0)
    # Same final tokens (top-1), but which tokens are committed first depends on the noise.
    assert torch.equal(cold[-1], orders[-1])
    assert any(not torch.equal(a, b) for a, b in zip(cold[:-1], orders[:-1]))


def test_old_temperature_name_still_works_with_a_warning():
    model = FakeTransformer()
    new = sampling.generate(model, ctx(0.5), steps=4, choice_temperature=2.0, generator=gen(1))
    with pytest.warns(DeprecationWarning, match="choice_temperature"):
        old = sampling.generate(model, ctx(0.5), steps=4, temperature=2.0, generator=gen(1))
    assert torch.equal(new, old)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, True, "4.5"])
def test_choice_temperature_must_be_a_finite_number_at_least_zero(bad):
    with pytest.raises(ValueError, match="choice_temperature must be a finite number >= 0"):
        sampling.generate(FakeTransformer(), ctx(0.5), steps=4, choice_temperature=bad, generator=gen(1))


@pytest.mark.parametrize("noise", [float("nan"), float("inf")])
def test_remask_never_masks_a_kept_token_whatever_the_confidences(noise):
    """A plan whose noise is NaN or inf (made without `generate`'s check, as the serving scheduler
    makes one) and NaN / inf log p: only positions that were masked may be masked again."""
    mask_id = K
    ids = torch.randint(0, K, (2, N), generator=gen(0))
    masked = torch.zeros(2, N, dtype=torch.bool)
    masked[0, 8:] = True  # the kept tokens come first, where a stable sort puts ties and NaNs' rivals
    masked[1, ::2] = True
    ids[masked] = mask_id
    plan = sampling.decode_plan(masked.sum(1).tolist(), 4, noise, [False, False])
    picked = torch.randint(0, K, (int(masked.sum()),), generator=gen(1))
    logp = torch.full_like(picked, -1.0, dtype=torch.float32)
    logp[::3], logp[1::3] = float("nan"), float("inf")
    for step in range(plan.steps):
        out = sampling.remask(ids, masked, picked, logp, torch.rand(picked.shape, generator=gen(step)), plan,
                              step, mask_id)
        assert torch.equal(out[~masked], ids[~masked]), step
        remain = (out == mask_id).sum(1)
        assert torch.equal(remain, torch.minimum(plan.keep[step], masked.sum(1) - 1)), step


def test_small_region_takes_one_step_per_token_and_stops_when_nothing_is_masked():
    """MaskGIT's clamp: every step decodes at least one token, so 3 free tokens need 3 forwards of
    the 24 asked for, not 24; a grid with nothing to decode needs none."""
    model = FakeTransformer()
    init = torch.randint(0, K, (1, N), generator=gen(0))
    fixed = torch.ones(1, N, dtype=torch.bool)
    fixed[0, [2, 7, 11]] = False
    out = sampling.generate(model, ctx(1.0), ctx(0.0), steps=24, guidance_scale=2.0, generator=gen(1),
                            init_ids=init, fixed=fixed)
    assert len(model.calls) == 3
    assert not (out == model.mask_token_id).any() and torch.equal(out[fixed], init[fixed])
    model.calls.clear()
    none_free = sampling.generate(model, ctx(1.0), steps=24, generator=gen(1), init_ids=init)
    assert torch.equal(none_free, init) and not model.calls


def test_steps_past_the_token_count_draw_no_more_and_decode_the_same(monkeypatch):
    """At most N steps run, so a million steps asked for draws N steps' uniforms (not a million: ~1 GB
    per image at 64 tokens), and decodes what N steps asked for do."""
    drawn = []
    row_uniforms = sampling.row_uniforms
    monkeypatch.setattr(sampling, "row_uniforms", lambda g, shape, device: drawn.append(shape) or
                        row_uniforms(g, shape, device))
    at_n = sampling.generate(FakeTransformer(), ctx(1.0, 0.5), steps=N, generator=[gen(1), gen(2)])
    huge = sampling.generate(FakeTransformer(), ctx(1.0, 0.5), steps=10**6, generator=[gen(1), gen(2)])
    assert drawn == [(2, N, 2, N)] * 2 and torch.equal(at_n, huge)


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_forward_logits_only_at_masked_positions(guidance_scale):
    model = FakeTransformer()
    sampling.generate(model, ctx(1.0, -1.0), ctx(0.0), steps=4, guidance_scale=guidance_scale, generator=gen(0))
    rows = [ids.shape[0] for ids, _ in model.calls]
    assert len(rows) == 4 and (2 * 2 in rows) == (guidance_scale != 0)  # guided steps ran a doubled batch
    # Every forward was asked only for the positions that were [MASK] in the ids it was given.
    for (ids, _), select in zip(model.calls, model.selects):
        assert select is not None and torch.equal(select, ids == model.mask_token_id)


def _reference_inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    cdf = probs.double().cumsum(-1)
    return torch.searchsorted(cdf, (u.double() * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=probs.shape[1] - 1)


@pytest.mark.parametrize("K_", [512, 10, 8192])
def test_blockwise_inverse_cdf_matches_the_full_cumulative_sum(K_):
    g = gen(0)
    probs = torch.softmax(3 * torch.randn(400, K_, generator=g), dim=-1)
    probs[:, 1] = 0.0  # an impossible id
    u = torch.rand(400, generator=g)
    got = sampling.inverse_cdf(probs, u)
    want = _reference_inverse_cdf(probs, u)
    assert (got == want).float().mean() >= 0.99  # the same inverse, up to float rounding at boundaries
    assert not (got == 1).any() and got.max() < K_


def test_sampled_frequencies_follow_the_softmax():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 0.5]]).expand(20000, -1).contiguous()
    u = torch.rand(20000, generator=gen(3))
    ids, logp = sampling.sample_tokens(logits.clone(), u)
    want = torch.softmax(logits[0], -1)
    freq = torch.bincount(ids, minlength=5).float() / 20000
    torch.testing.assert_close(freq, want, atol=0.015, rtol=0)
    torch.testing.assert_close(logp, want.log()[ids])
    top1, _ = sampling.sample_tokens(logits[:100].clone(), u[:100], top_k=1)
    assert (top1 == 0).all()


def test_a_row_decodes_as_alone_beside_rows_with_more_tokens_to_fill():
    """Each row keeps its own number of steps, guidance ramp and noise: a row with 3 free tokens
    batched beside a fully masked row decodes as it does alone (inpainting with per-row masks)."""
    model = FakeTransformer()
    init = torch.randint(0, K, (1, N), generator=gen(0))
    fixed = torch.ones(1, N, dtype=torch.bool)
    fixed[0, [2, 7, 11]] = False
    for seed in range(12):
        kwargs = dict(steps=8, guidance_scale=2.0, choice_temperature=4.5)
        alone = sampling.generate(model, ctx(0.5), ctx(0.0), generator=[gen(seed)], init_ids=init, fixed=fixed,
                                  **kwargs)
        both = sampling.generate(model, ctx(0.5, 0.5), ctx(0.0), generator=[gen(seed), gen(seed + 100)],
                                 init_ids=torch.cat([init, torch.full_like(init, model.mask_token_id)]),
                                 fixed=torch.cat([fixed, torch.zeros_like(fixed)]), **kwargs)
        assert torch.equal(both[0], alone[0]), seed
        assert not (both == model.mask_token_id).any()
