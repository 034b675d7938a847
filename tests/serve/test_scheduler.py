"""The generator replicas' step scheduler without Serve: batched work (plain, streamed, inpainting,
mask-free edits) decodes to exactly what each request gives alone and what the one-process pipeline
gives; the row budget holds; a cancelled task frees its rows at the next step; a poison task fails
alone."""

from __future__ import annotations

import asyncio

import pytest
import torch

from muse import editing, sampling
from muse.token_stages import TextCondition, base_tokens, stage_contexts
from serve.config import Batching
from serve.deployments import BaseGenerator, Decode, TextEncoder, _Job
from serve.specs import previews_sent


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    from muse.checkpoint import init_model_root

    root = str(tmp_path_factory.mktemp("sched") / "root")
    init_model_root("tiny", root, components=("text_encoder", "vqgan_lo", "base"))
    return root


@pytest.fixture(scope="module")
def models(root):
    return TextEncoder(root), BaseGenerator(root, "cpu", Batching(max_rows=64, batch_wait_timeout_s=0.0), 4.5, 2)


def _calls(base, text):
    """(name, coroutine factory, what it must equal) for mixed work."""
    inpaint_src = torch.randint(0, base.model.codebook_size, (1, 8, 8))
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[2:5, 3:7] = True
    return [
        lambda: base.generate(text.encode("a red circle"), Decode(2, 4, 3.0, 1)),
        lambda: base.generate(text.encode("a much longer prompt about squares", "blurry"), Decode(1, 5, 2.0, 7)),
        lambda: base.generate(text.encode("three"), Decode(1, 3, 0.0, 7)),
        lambda: base.generate(text.encode("fill"), Decode(2, 4, 2.0, 3), inpaint_src, region),
        lambda: base.edit(text.encode("edit me"), Decode(1, 5, 4.0, 5), inpaint_src, 5, 0.1),
        lambda: _streamed(base, text.encode("streamed"), Decode(1, 6, 4.0, 11)),
    ]


async def _streamed(base, cond, decode):
    async for event in base.stream(cond, decode):
        if event["kind"] == "done":
            return event["ids"]


def test_batched_work_of_every_kind_gives_each_request_its_own_tokens(models):
    text, base = models
    calls = _calls(base, text)

    async def together():
        return await asyncio.gather(*(c() for c in calls))

    before = dict(base.scheduler.stats.tasks_per_forward)
    batched = asyncio.run(together())
    grew = {k: v - before.get(k, 0) for k, v in base.scheduler.stats.tasks_per_forward.items()}
    assert max(k for k, v in grew.items() if v) == len(calls)  # every kind shared a forward
    for call, got in zip(calls, batched):
        alone = asyncio.run(call())
        assert torch.equal(alone.ids, got.ids)
        assert all(torch.equal(a, b) for a, b in zip(alone.rng, got.rng))
        assert (alone.changed is None) == (got.changed is None)
    assert not torch.equal(batched[0].ids[0], batched[0].ids[1])  # rows of one request differ
    assert base.scheduler.in_flight_rows == 0


def test_scheduled_decodes_match_the_library(models):
    """What muse.sampling / muse.editing give for the same request in one process."""
    text, base = models
    cond = text.encode("a blue square")
    got = asyncio.run(base.generate(cond, Decode(2, 5, 3.0, 4)))
    tc = TextCondition(cond.emb, cond.mask)
    want = base_tokens(base.model, tc, num_images=2, steps=5, guidance_scale=3.0,
                       generator=sampling.image_generators(4, 2))
    assert torch.equal(got.ids, want)

    src = torch.randint(0, base.model.codebook_size, (1, 8, 8))
    got = asyncio.run(base.edit(cond, Decode(1, 4, 4.0, 2), src, 4, 0.1))
    ctx, unc = stage_contexts(base.model, tc, None, guided=True)
    want = editing.edit_tokens(base.model, ctx, unc, src, iterations=4, fraction=0.1, guidance_scale=4.0,
                               generator=sampling.image_generators(2, 1))
    assert torch.equal(got.ids, want)


def test_a_generator_with_top_k_draws_as_the_library_does(models, root):
    """A replica's `top_k` (serve's sampling.superres_top_k for super-res) reaches every step."""
    text, base = models
    greedy = BaseGenerator(root, "cpu", Batching(max_rows=64, batch_wait_timeout_s=0.0), 4.5, 2, top_k=1)
    cond = text.encode("a blue square")
    got = asyncio.run(greedy.generate(cond, Decode(2, 5, 3.0, 4)))
    want = base_tokens(greedy.model, TextCondition(cond.emb, cond.mask), num_images=2, steps=5, guidance_scale=3.0,
                       generator=sampling.image_generators(4, 2), top_k=1)
    assert torch.equal(got.ids, want)
    assert not torch.equal(got.ids, asyncio.run(base.generate(cond, Decode(2, 5, 3.0, 4))).ids)


def test_row_budget_cancellation_and_poison(models):
    text, base = models
    sched = base.scheduler
    cond = text.encode("budget")

    async def run():
        sched.max_rows = 4  # two guided images
        seen = []
        real_step = sched._step

        def step(tasks):
            seen.append(sum(t.cost for t in tasks))
            real_step(tasks)

        sched._step = step
        try:
            long = asyncio.create_task(base.generate(cond, Decode(1, 60, 4.0, 1)))
            others = [asyncio.create_task(base.generate(cond, Decode(1, 4, 4.0, s))) for s in range(3)]
            while len(seen) < 4:  # cancel mid-decode however fast the steps run
                await asyncio.sleep(0.005)
            long.cancel()
            done = await asyncio.gather(*others)
            await asyncio.sleep(0.05)
            assert sched.in_flight_rows == 0 and not sched.active
            assert max(seen) <= 4 and len(seen) < 60  # the cancelled decode left early
            # A poison task (a token id past the codebook: the embedding fails in the shared forward).
            bad = torch.full((1, 8, 8), 10**6)
            region = torch.zeros(8, 8, dtype=torch.bool)
            region[0, 0] = True
            sched.max_rows = 64
            good = [base.generate(cond, Decode(1, 4, 4.0, s)) for s in range(3)]
            results = await asyncio.gather(base.generate(cond, Decode(1, 4, 4.0, 9), bad, region), *good,
                                           return_exceptions=True)
            return done, results
        finally:
            sched._step = real_step

    done, results = asyncio.run(run())
    assert isinstance(results[0], IndexError)
    for s, tokens in enumerate(results[1:]):
        assert torch.equal(tokens.ids, done[s].ids)  # the others are untouched
    assert base.scheduler.stats.outcomes["cancelled"] >= 1


def test_a_task_with_nothing_to_decode_returns_its_ids_unchanged(models):
    """An edit whose regenerated region is empty (super-res after a mask-free base edit that changed no
    token): the library returns the ids unchanged after drawing its uniforms; so does the scheduler,
    at admission, without a forward."""
    text, base = models
    cond = text.encode("keep")
    src = torch.randint(0, base.model.codebook_size, (1, 8, 8))
    nothing = torch.zeros(8, 8, dtype=torch.bool)
    forwards = sum(base.scheduler.stats.tasks_per_forward.values())
    got = asyncio.run(base.generate(cond, Decode(2, 4, 4.0, 3), src, nothing))
    assert sum(base.scheduler.stats.tasks_per_forward.values()) == forwards
    assert torch.equal(got.ids, src.expand(2, -1, -1)) and not got.changed.any()
    gens = sampling.image_generators(3, 2)
    ctx, unc = stage_contexts(base.model, TextCondition(cond.emb, cond.mask), None, guided=True, repeat=2)
    want = sampling.generate(base.model, ctx, unc, steps=4, guidance_scale=4.0, generator=gens,
                             init_ids=src.reshape(1, -1).expand(2, -1), fixed=torch.ones(2, 64, dtype=torch.bool))
    assert torch.equal(got.ids.reshape(2, -1), want)
    assert all(torch.equal(a, g.get_state()) for a, g in zip(got.rng, gens))  # the next stage continues alike

    async def stream():
        job = _Job(cond, Decode(1, 4, 4.0, 3), src.reshape(-1), nothing.reshape(1, -1))
        return [event["kind"] async for event in base._stream(job)]

    assert asyncio.run(stream()) == ["admitted", "done"]
    assert base.scheduler.in_flight_rows == 0 and not base.scheduler.active


@pytest.mark.parametrize("steps", [6, 100])
def test_a_stream_sends_the_previews_the_ingress_counts(models, steps):
    """The ingress picks `partial_images` among `previews_sent(steps, tokens, every)`: what a generator
    really sends, also when `steps` exceeds the 8x8 = 64 tokens (it then runs 64 steps)."""
    text, base = models

    async def previews():
        return [e["step"] async for e in base.stream(text.encode("count"), Decode(1, steps, 4.0, 0))
                if e["kind"] == "preview"]

    sent = asyncio.run(previews())
    assert len(sent) == previews_sent(steps, base.model.num_tokens, base.preview_every)
    assert sent == list(range(2, min(steps, 64), 2))  # every 2 steps, never after the last


def test_rows_with_different_regions_decode_as_the_library_does(models):
    """Super-res after a mask-free edit regenerates a different region in each row: each row keeps its
    own step count, ramp and noise (muse.sampling.decode_plan), in the scheduler as in the library."""
    from serve.scheduler import DecodeTask

    text, base = models
    cond = text.encode("two regions")
    model = base.model
    src = torch.randint(0, model.codebook_size, (2, 64), generator=torch.Generator().manual_seed(0))
    fixed = torch.ones(2, 64, dtype=torch.bool)
    fixed[0, [3, 9, 20]] = False  # 3 tokens to decode
    fixed[1, 10:50] = False  # 40
    ctx, unc = stage_contexts(model, TextCondition(cond.emb, cond.mask), None, guided=True, repeat=2)
    scale = torch.tensor([3.0, 3.0])
    want = sampling.generate(model, ctx, unc, steps=6, guidance_scale=scale, generator=sampling.image_generators(5, 2),
                             init_ids=src, fixed=fixed)
    task = DecodeTask(2, True, prepare=lambda: None)
    task.setup(model, 6, scale, sampling.image_generators(5, 2), 4.5, init_ids=src, fixed=fixed,
               finish=lambda ids: ids)
    joint = sampling.cfg_context(ctx, unc)
    with torch.no_grad():
        while not task.done:
            step = task.inputs()
            task.advance(sampling.guided_logits(model, step.ids, ctx, joint if step.guided else None, step.weight,
                                                step.select))
    assert torch.equal(task.result, want)
    alone = sampling.generate(model, ctx.index(slice(0, 1)), unc, steps=6, guidance_scale=3.0,
                              generator=sampling.image_generators(5, 1), init_ids=src[:1], fixed=fixed[:1])
    assert torch.equal(alone[0], want[0])  # the 3-token row as if it were alone


def test_a_forward_holds_the_rows_its_budget_counted(models):
    """A guided image costs two rows of the budget and an unguided one one: a forward that mixes
    them feeds the model at most those rows (no unconditional rows for the unguided tasks), and each
    task still decodes what it decodes alone."""
    text, base = models
    cond = text.encode("a red circle")
    fed = []
    forward = base.model.forward

    def counting(ids, context, select=None):
        fed.append(ids.shape[0])
        return forward(ids, context, select=select)

    calls = [lambda: base.generate(cond, Decode(1, 4, 4.0, 1))] + [
        (lambda s=s: base.generate(cond, Decode(2, 4, 0.0, s))) for s in range(3)]

    async def together():
        return await asyncio.gather(*(c() for c in calls))

    before = base.scheduler.stats.rows_per_forward.copy()
    base.model.forward = counting
    try:
        batched = asyncio.run(together())
    finally:
        del base.model.forward
    counted = base.scheduler.stats.rows_per_forward - before
    # (the first step has no guidance yet: the guided image feeds one row there)
    assert len(fed) == counted.total() and max(fed) == max(counted) == 2 + 3 * 2, (fed, counted)
    for call, got in zip(calls, batched):
        assert torch.equal(asyncio.run(call()).ids, got.ids)


def test_a_read_only_mask_from_the_object_store_is_taken_without_a_warning():
    import warnings

    import numpy as np

    from serve.deployments import _rows

    mask = np.zeros((8, 8), bool)
    mask[:2] = True
    mask.flags.writeable = False  # as a numpy array arrives through Ray's object store
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rows = _rows(mask, 3)
    assert rows.shape == (3, 64) and int(rows[0].sum()) == 16 and torch.equal(rows[0], rows[2])
