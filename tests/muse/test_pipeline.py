"""MusePipeline and the two token stages: a fake transformer for what each branch sees, the tiny preset
(random weights) for everything end to end, and the CLI."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from muse import checkpoint
from muse.pipeline import MusePipeline
from muse.token_stages import TextCondition, base_tokens, stage_contexts, superres_tokens
from muse.context import Context
from fakes import context_tags, selected

STEPS = dict(steps=3, superres_steps=2)


class FakeBase(torch.nn.Module):
    """encode_context tags each row with its first embedding value (0 when the text is masked out);
    forward returns fixed logits shifted by the tag and records the tags of every forward."""

    def __init__(self, side: int = 4, codebook_size: int = 8):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))  # gives the stage a parameter dtype
        self.config = type("Cfg", (), {"tokens_per_side": side})()
        self.num_tokens, self.codebook_size, self.mask_token_id = side * side, codebook_size, codebook_size
        self.logits = torch.randn(side * side, codebook_size, generator=torch.Generator().manual_seed(0))
        self.encoded: list[torch.Tensor] = []
        self.forward_tags: list[list[float]] = []

    def encode_context(self, text: torch.Tensor, mask: torch.Tensor) -> Context:
        self.encoded.append(mask.clone())
        tag = (text[:, 0, 0] * mask.any(dim=1)).view(-1, 1, 1, 1)
        return Context([tag], [tag], torch.ones(text.shape[0], 1, dtype=torch.bool))

    def null_context(self) -> Context:
        return self.encode_context(torch.zeros(1, 1, 1), torch.zeros(1, 1, dtype=torch.bool))

    def forward(self, ids: torch.Tensor, ctx: Context, select: torch.Tensor | None = None) -> torch.Tensor:
        tags = context_tags(ctx)
        self.forward_tags.append(tags.tolist())
        return selected(self.logits + tags[:, None, None], select)


def cond(*values: float) -> TextCondition:
    emb = torch.tensor(values).view(-1, 1, 1).expand(-1, 3, 2).clone()
    return TextCondition(emb, torch.ones(len(values), 3, dtype=torch.bool))


def test_base_tokens_encodes_each_context_once_and_the_negative_reaches_uncond():
    model = FakeBase()
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    ids = base_tokens(model, cond(1.0, 2.0), cond(7.0, 8.0), num_images=2, steps=6, guidance_scale=3.0, generator=gens)
    assert ids.shape == (4, 4, 4) and not (ids == model.mask_token_id).any()
    assert len(model.encoded) == 2  # cond + negative, once for 6 steps and 2 images per prompt
    assert len(model.forward_tags) == 6
    # From step 1 on the batched forward is [cond rows ; negative rows], prompt-major.
    assert model.forward_tags[-1] == [1.0, 1.0, 2.0, 2.0, 7.0, 7.0, 8.0, 8.0]


def test_base_tokens_without_negative_uses_the_null_text_and_without_guidance_no_uncond():
    model = FakeBase()
    base_tokens(model, cond(1.0), steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    assert model.encoded[0].all() and not model.encoded[1].any()  # second context: text masked out
    assert model.forward_tags[-1] == [1.0, 0.0]
    model = FakeBase()
    base_tokens(model, cond(1.0), cond(5.0), steps=4, guidance_scale=0.0, generator=torch.Generator().manual_seed(0))
    assert len(model.encoded) == 1 and all(tags == [1.0] for tags in model.forward_tags)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models are far too small for intra-op threads to pay; on a shared 2-core machine
    spinning OpenMP threads make each call 5-20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe() -> MusePipeline:
    return MusePipeline.from_preset("tiny", seed=0)


def test_text_to_image_two_stages_gives_images_of_the_right_size(pipe):
    stages: list[tuple[str, int]] = []
    images = pipe(["a red circle", "two blue squares"], num_images=2, seed=5,
                  callback=lambda stage, step, ids: stages.append((stage, step)), **STEPS)
    assert len(images) == 4
    assert all(isinstance(im, Image.Image) and im.size == (128, 128) and im.mode == "RGB" for im in images)
    assert stages == [("base", 0), ("base", 1), ("base", 2), ("superres", 0), ("superres", 1)]
    lo = pipe("a red circle", seed=5, superres=False, steps=3)
    assert len(lo) == 1 and lo[0].size == (64, 64)


def test_seed_reproduces_tokens_and_image_i_depends_on_seed_and_i_alone(pipe):
    a = pipe("a red circle", seed=3, output="tokens", **STEPS)
    b = pipe("a red circle", seed=3, output="tokens", **STEPS)
    c = pipe("a red circle", seed=4, output="tokens", **STEPS)
    assert a.shape == (1, 16, 16) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    three = pipe("a red circle", seed=3, num_images=3, output="tokens", superres=False, steps=3)
    two = pipe("a red circle", seed=3, num_images=2, output="tokens", superres=False, steps=3)
    next_seed = pipe("a red circle", seed=4, num_images=2, output="tokens", superres=False, steps=3)
    assert not torch.equal(two[0], two[1])
    torch.testing.assert_close(three[:2], two, rtol=0, atol=0)  # image i does not depend on n
    # Seeds 3 and 4 share no image (with seed + i they shared all but one).
    assert not any(torch.equal(x, y) for x in two for y in next_seed)
    from muse import sampling

    assert sampling.image_seed(3, 1) != sampling.image_seed(4, 0)


def test_a_prompts_images_depend_on_the_seed_and_their_place_not_on_how_many_were_asked_for(pipe):
    kw = dict(seed=3, output="tokens", superres=False, steps=3)
    prompts = ["a red circle", "a blue square on the left"]
    one_each = pipe(prompts, **kw)
    two_each = pipe(prompts, num_images=2, **kw)
    three_prompts = pipe(prompts + ["two green triangles"], **kw)
    assert torch.equal(one_each[1], two_each[2])  # prompt 1's first image, with n=1 and n=2
    assert torch.equal(one_each, three_prompts[:2])  # a prompt added after them changes nothing
    assert torch.equal(one_each[0], pipe("a red circle", **kw)[0])  # the first prompt's seeds are a lone one's
    twice = pipe(["a red circle", "a red circle"], **kw)
    assert not torch.equal(twice[0], twice[1])  # the same prompt twice: two images


def test_a_run_drawn_in_batches_gives_the_images_of_one_call(pipe, photo, tmp_path):
    """`first_image`: a long run in batches (`muse generate --n 5 --batch-size 2`) holds one batch in
    memory and gives the images one call gives, through both stages and in every way of sampling."""
    from muse.generate_cli import main

    kw = dict(seed=3, output="tokens", steps=3, superres_steps=2)
    mask = np.zeros((96, 96), np.uint8)
    mask[:48] = 255
    for draw in (lambda **k: pipe("a red circle", **kw, **k),
                 lambda **k: pipe.inpaint(photo, mask, "a red circle", **kw, **k),
                 lambda **k: pipe.edit(photo, "a red circle", iterations=3, seed=3, output="tokens", **k)):
        whole = draw(num_images=5)
        batches = torch.cat([draw(num_images=2), draw(num_images=2, first_image=2), draw(num_images=1, first_image=4)])
        assert torch.equal(whole, batches)
    with pytest.raises(ValueError, match="first_image must be an integer >= 0"):
        pipe("a red circle", first_image=-1)
    out = tmp_path / "out"
    for batch in ("5", "2"):
        main(["generate", "--preset", "tiny", "--prompt", "a red circle", "--n", "5", "--batch-size", batch,
              "--steps", "2", "--superres-steps", "1", "--out", str(out / batch)])
    for i in range(5):
        assert (out / "5" / f"generate_{i:02d}.png").read_bytes() == (out / "2" / f"generate_{i:02d}.png").read_bytes()


def test_contexts_are_encoded_once_per_stage_and_negative_prompt_replaces_null(pipe, monkeypatch):
    seen: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"base": [], "superres": []}
    for stage in seen:
        model = getattr(pipe, stage)
        real = model.encode_context

        def spy(text, mask, *rest, _real=real, _log=seen[stage]):
            _log.append((text.clone(), mask.clone()))
            return _real(text, mask, *rest)

        monkeypatch.setattr(model, "encode_context", spy)
    pipe.base._null = None  # the null context is cached per model: start without it
    pipe("a red circle", seed=0, steps=5, superres_steps=3)
    assert [len(v) for v in seen.values()] == [2, 2]  # cond + uncond, whatever the number of steps
    assert seen["base"][0][1].any() and seen["base"][1][1].shape == (1, 0)  # uncond = no text at all
    assert seen["superres"][1][1].shape == (1, 0)
    for log in seen.values():
        log.clear()
    pipe("a blue square", seed=0, steps=5, superres_steps=3)
    assert [len(v) for v in seen.values()] == [1, 2]  # the base model's null context is reused

    for log in seen.values():
        log.clear()
    pipe("a red circle", negative_prompt="a blue square", seed=0, **STEPS)
    negative = pipe.encode_prompts(["a blue square"])
    for stage in ("base", "superres"):
        text, mask = seen[stage][1]
        assert torch.equal(mask, negative.mask)
        torch.testing.assert_close(text, negative.embeddings)


def test_numpy_numbers_are_taken_as_pythons(pipe, photo):
    """Settings read from arrays or configs (np.int64, np.float32) give what Python's numbers give."""
    as_py = dict(num_images=2, steps=2, superres_steps=2, guidance_scale=3.0, choice_temperature=2.0, seed=1,
                 first_image=1, output="tokens")
    as_np = dict(as_py, num_images=np.int64(2), steps=np.int32(2), superres_steps=np.int64(2),
                 guidance_scale=np.float32(3.0), choice_temperature=np.float64(2.0), seed=np.int64(1),
                 first_image=np.int64(1))
    assert torch.equal(pipe("a red circle", **as_np), pipe("a red circle", **as_py))
    edit = dict(as_py, iterations=2, top_k=2)
    del edit["steps"]
    edit_np = dict(edit, num_images=np.int64(2), iterations=np.int64(2), top_k=np.int64(2),
                   guidance_scale=np.float32(3.0))
    assert torch.equal(pipe.edit(photo, "a red circle", **edit_np), pipe.edit(photo, "a red circle", **edit))


def test_no_autograd_graph_is_kept_by_any_call(pipe, photo, monkeypatch):
    """Every context encoding and VQGAN encode of a call runs without autograd: a graph kept through
    the decode holds the text layers', K/V projections' and encoders' activations for nothing."""
    grad_seen = []
    for model in (pipe.base, pipe.superres, pipe.vqgan_lo, pipe.vqgan_hi):
        for name in ("encode_context", "encode"):
            if hasattr(model, name):
                real = getattr(model, name)
                monkeypatch.setattr(model, name, lambda *a, _real=real, **k: grad_seen.append(
                    torch.is_grad_enabled()) or _real(*a, **k))
    mask = torch.zeros(photo.height, photo.width, dtype=torch.bool)
    mask[:8, :8] = True
    pipe("a red circle", seed=0, **STEPS)
    pipe.inpaint(photo, mask, "a red circle", seed=0, **STEPS)
    pipe.outpaint(photo, "a red circle", seed=0, **STEPS)
    pipe.edit(photo, "a red circle", seed=0, iterations=2, superres_steps=2)
    assert grad_seen and not any(grad_seen), grad_seen
    ctx, _ = stage_contexts(pipe.base, pipe.encode_prompts(["x"]), None, guided=False)
    assert ctx.keys[0].grad_fn is None


def test_from_pretrained_round_trip_equals_from_preset(tmp_path):
    checkpoint.init_model_root("tiny", str(tmp_path / "root"), seed=2)
    loaded = MusePipeline.from_pretrained(str(tmp_path / "root"))
    built = MusePipeline.from_preset("tiny", seed=2)
    kwargs = dict(seed=7, output="tokens", **STEPS)
    assert torch.equal(loaded("a red circle", **kwargs), built("a red circle", **kwargs))
    assert not torch.equal(MusePipeline.from_preset("tiny", seed=3)("a red circle", **kwargs),
                           built("a red circle", **kwargs))

    # Loaded in another dtype: each component cast as it loads, as `to(dtype=...)` casts the pipeline.
    bf16 = MusePipeline.from_pretrained(str(tmp_path / "root"), dtype=torch.bfloat16)
    for name in ("vqgan_lo", "base", "vqgan_hi", "superres"):
        assert {p.dtype for p in getattr(bf16, name).parameters()} == {torch.bfloat16}, name
    assert {p.dtype for p in bf16.text_encoder.parameters()} == {torch.float32}  # its config's, as `to` keeps
    assert torch.equal(bf16("a red circle", **kwargs), loaded.to(dtype=torch.bfloat16)("a red circle", **kwargs))


def test_save_pretrained_to_s3_and_load_base_only_root(pipe, s3_bucket, tmp_path):
    root = f"{s3_bucket}/model"
    pipe.save_pretrained(root)
    loaded = MusePipeline.from_pretrained(root)
    kwargs = dict(seed=1, output="tokens", **STEPS)
    assert torch.equal(loaded("a red circle", **kwargs), pipe("a red circle", **kwargs))

    for name in ("text_encoder", "vqgan_lo", "base"):  # a root without super-res
        checkpoint.save_component(getattr(pipe, name), str(tmp_path / "lo" / name))
    base_only = MusePipeline.from_pretrained(str(tmp_path / "lo"))
    assert base_only.superres is None and base_only.resolution == 64
    assert base_only("a red circle", superres=False, steps=2)[0].size == (64, 64)
    assert base_only("a red circle", steps=2)[0].size == (64, 64)  # superres=None: the stages it has
    with pytest.raises(ValueError, match="superres"):
        base_only("a red circle", steps=2, superres=True)

    # Saved over a whole root, it would load beside the old super-res: refused, or removed when asked.
    whole = tmp_path / "whole"
    pipe.save_pretrained(str(whole))
    with pytest.raises(ValueError, match="vqgan_hi, superres"):
        base_only.save_pretrained(str(whole))
    assert MusePipeline.from_pretrained(str(whole)).superres is not None  # nothing was written
    base_only.save_pretrained(str(whole), remove_others=True)
    assert MusePipeline.from_pretrained(str(whole)).superres is None


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8))


@pytest.mark.parametrize("call, match", [
    (lambda p, im: p("", steps=1), "prompt"),
    (lambda p, im: p(["a cat", "  "], steps=1), "prompt"),
    (lambda p, im: p([], steps=1), "prompt"),
    (lambda p, im: p("a cat", steps=0), "steps"),
    (lambda p, im: p("a cat", steps=2, superres_steps=0), "superres_steps"),
    (lambda p, im: p("a cat", num_images=0), "num_images"),
    (lambda p, im: p("a cat", guidance_scale=-1.0), "guidance_scale"),
    (lambda p, im: p("a cat", guidance_scale=float("nan")), "guidance_scale must be a finite number"),
    (lambda p, im: p.edit(im, "a cat", guidance_scale=float("inf")), "guidance_scale must be a finite number"),
    (lambda p, im: p("a cat", choice_temperature=float("nan")), "choice_temperature must be a finite number"),
    (lambda p, im: p.inpaint("/nonexistent/x.png", np.ones((96, 96)), "a cat", choice_temperature=float("inf")),
     "choice_temperature must be a finite number"),  # checked before the image is read
    (lambda p, im: p.edit(im, "a cat", choice_temperature=-1.0), "choice_temperature must be a finite number"),
    (lambda p, im: p("a cat", output="jpeg"), "output"),
    (lambda p, im: p("a cat", seed=-1), "seed"),
    (lambda p, im: p("a cat", superres_top_k=0), "superres_top_k"),
    (lambda p, im: p("a cat", superres=False, superres_top_k=1), "superres_top_k applies to the super-res stage"),
    (lambda p, im: p(["a", "b"], negative_prompt=["c"]), "negative_prompt"),
    (lambda p, im: p.inpaint(im, np.ones((64, 64)), "a cat", steps=1), "mask"),
    (lambda p, im: p.inpaint(im, np.zeros((96, 96)), "a cat", steps=1), "mask"),
    (lambda p, im: p.inpaint(b"not an image", np.ones((96, 96)), "a cat", steps=1), "image"),
    (lambda p, im: p.inpaint("/nonexistent/x.png", np.ones((96, 96)), "a cat"), "image"),
    (lambda p, im: p.inpaint(im, np.ones((96, 96)), "", steps=1), "prompt"),
    (lambda p, im: p.outpaint(im, "a cat", direction="north"), "direction"),
    (lambda p, im: p.outpaint(im, "a cat", scale=1.0), "scale"),
    (lambda p, im: p.edit(im, "a cat", iterations=0), "iterations"),
    (lambda p, im: p.edit(im, "a cat", fraction=2.0), "fraction"),
    (lambda p, im: p.edit(12, "a cat"), "image"),
])
def test_bad_input_raises_value_error_naming_the_parameter(pipe, photo, call, match):
    with pytest.raises(ValueError, match=match):
        call(pipe, photo)


def test_inpaint_keeps_known_tokens_at_base_and_through_superres(pipe, photo):
    mask = np.zeros((96, 96), np.uint8)
    mask[:, 48:] = 255  # regenerate the right half
    lo_src = pipe.vqgan_lo.encode(pipe._image_tensors(photo, True)[0])[0]
    hi_src = pipe.vqgan_hi.encode(pipe._image_tensors(photo, True)[1])[0]
    lo = pipe.inpaint(_png(photo), Image.fromarray(mask), "a red circle", seed=0, output="tokens",
                      superres=False, steps=3)[0]
    assert torch.equal(lo[:, :4], lo_src[:, :4])  # left half kept (8x8 tokens)
    assert not torch.equal(lo[:, 4:], lo_src[:, 4:])
    hi = pipe.inpaint(photo, mask, "a red circle", seed=0, output="tokens", **STEPS)[0]
    assert torch.equal(hi[:, :8], hi_src[:, :8])  # 16x16 high-res tokens: left half kept
    assert not torch.equal(hi[:, 8:], hi_src[:, 8:])
    images = pipe.inpaint(photo, mask, "a red circle", seed=0, num_images=2, **STEPS)
    assert [im.size for im in images] == [(128, 128)] * 2


def test_keep_pixels_gives_back_the_input_outside_the_mask_and_new_pixels_inside(pipe, photo):
    """Without it, outside the mask is the tokenizer's round trip of the input; with it, the input
    itself, but for a feathered band of FEATHER_PER_SIDE of the side along the mask's edge."""
    from muse.editing import FEATHER_PER_SIDE, outpaint_canvas

    mask = np.zeros((96, 96), np.uint8)
    mask[:, 60:] = 255  # the right 36 of 96 columns: 48 of 128 after super-res
    src = pipe._image_tensors(photo, True)[1]  # the input as the model sees it, at 128
    want = np.asarray(tensor_pil(src[0]), np.int16)
    kw = dict(seed=0, num_images=2, **STEPS)
    plain = [np.asarray(im, np.int16) for im in pipe.inpaint(photo, mask, "a red circle", **kw)]
    kept = [np.asarray(im, np.int16) for im in pipe.inpaint(photo, mask, "a red circle", keep_pixels=True, **kw)]
    band = max(1, round(128 * FEATHER_PER_SIDE))
    outside, inside = slice(0, 80 - band), slice(80, 128)
    for p, k in zip(plain, kept):
        assert np.abs(p[:, outside] - want[:, outside]).max() > 8  # random weights: a poor round trip
        assert np.abs(k[:, outside] - want[:, outside]).max() <= 1  # the input (uint8 rounding)
        assert np.array_equal(k[:, inside], p[:, inside])  # what the model drew, untouched
        assert not np.array_equal(k[:, 80 - band:80], want[:, 80 - band:80])  # the feathered seam
    lo = pipe.inpaint(photo, mask, "a red circle", keep_pixels=True, superres=False, seed=0, steps=3)[0]
    lo_src = np.asarray(tensor_pil(pipe._image_tensors(photo, False)[0][0]), np.int16)
    assert lo.size == (64, 64) and np.abs(np.asarray(lo, np.int16)[:, :38] - lo_src[:, :38]).max() <= 1
    out = pipe.outpaint(photo, "a red circle", direction="left", scale=0.5, keep_pixels=True, seed=0, **STEPS)[0]
    canvas = np.asarray(tensor_pil(outpaint_canvas(src, "left", 0.5)[0][0]), np.int16)
    assert np.abs(np.asarray(out, np.int16)[:, 64 + band:] - canvas[:, 64 + band:]).max() <= 1  # the shifted image


def tensor_pil(x: torch.Tensor) -> Image.Image:
    from muse.data.images import tensor_to_pil

    return tensor_to_pil(x)


def test_outpaint_keeps_the_placed_image_tokens(pipe, photo):
    from muse.editing import outpaint_canvas

    lo_img = pipe._image_tensors(photo, False)[0]
    canvas, _ = outpaint_canvas(lo_img, "left", 0.5)
    canvas_ids = pipe.vqgan_lo.encode(canvas)[0]
    lo = pipe.outpaint(photo, "a red circle", direction="left", scale=0.5, seed=0, output="tokens",
                       superres=False, steps=3)[0]
    assert torch.equal(lo[:, 4:], canvas_ids[:, 4:]) and not torch.equal(lo[:, :4], canvas_ids[:, :4])
    out = pipe.outpaint(photo, "a red circle", seed=0, **STEPS)
    assert out[0].size == (128, 128)


def test_edit_changes_part_of_the_tokens_and_superres_keeps_unchanged_regions(pipe, photo):
    lo_src = pipe.vqgan_lo.encode(pipe._image_tensors(photo, False)[0])[0]
    lo = pipe.edit(photo, "a red circle", iterations=3, fraction=0.1, seed=0, output="tokens", superres=False)[0]
    changed = (lo != lo_src).sum().item()
    assert 0 < changed <= 3 * round(0.1 * 64)
    hi = pipe.edit(photo, "a red circle", iterations=3, fraction=0.1, seed=0, output="tokens", superres_steps=2)[0]
    hi_src = pipe.vqgan_hi.encode(pipe._image_tensors(photo, True)[1])[0]
    kept = (lo == lo_src).repeat_interleave(2, 0).repeat_interleave(2, 1)  # lo token -> 2x2 hi tokens
    assert torch.equal(hi[kept], hi_src[kept])
    assert pipe.edit(photo, "a red circle", iterations=2, superres_steps=1, seed=0)[0].size == (128, 128)


def test_superres_top_k_one_draws_the_likeliest_code(pipe, photo):
    """With one super-res step every position is decoded at once: under superres_top_k=1 each is the
    likeliest code of the guided logits; sampling the whole codebook draws others."""
    from muse import sampling
    from muse.token_stages import stage_contexts

    lo = pipe("a red circle", seed=2, output="tokens", superres=False, steps=3)
    hi = pipe("a red circle", seed=2, output="tokens", steps=3, superres_steps=1, superres_top_k=1)
    ctx, uncond = stage_contexts(pipe.superres, pipe.encode_prompts(["a red circle"]), None, guided=True, lo_ids=lo)
    N = pipe.superres.num_tokens
    with torch.no_grad():
        logits = sampling.guided_logits(pipe.superres, torch.full((1, N), pipe.superres.mask_token_id), ctx,
                                        sampling.cfg_context(ctx, uncond), torch.tensor([4.0]),
                                        torch.ones(1, N, dtype=torch.bool))
    assert torch.equal(hi.view(1, N), logits.argmax(-1).view(1, N))
    sampled = pipe("a red circle", seed=2, output="tokens", steps=3, superres_steps=1)
    assert not torch.equal(sampled, hi)
    # Inpainting's super-res stage takes it too: the kept half stays, the regenerated half is drawn otherwise.
    mask = np.zeros((96, 96), np.uint8)
    mask[:, 48:] = 255
    a = pipe.inpaint(photo, mask, "a red circle", seed=0, output="tokens", steps=3, superres_steps=2, superres_top_k=1)
    b = pipe.inpaint(photo, mask, "a red circle", seed=0, output="tokens", steps=3, superres_steps=2)
    assert not torch.equal(a, b) and torch.equal(a[0, :, :8], b[0, :, :8])


def test_superres_tokens_accepts_prompt_major_rows(pipe):
    c = pipe.encode_prompts(["a red circle", "a blue square"])
    lo = torch.randint(0, 512, (4, 8, 8), generator=torch.Generator().manual_seed(0))
    hi = superres_tokens(pipe.superres, c, lo, steps=2, generator=torch.Generator().manual_seed(0))
    assert hi.shape == (4, 16, 16) and hi.max() < 512 and hi.min() >= 0


def test_a_negative_prompt_at_guidance_0_is_said_to_do_nothing(pipe):
    with pytest.warns(UserWarning, match="no effect at guidance_scale 0"):
        pipe("a red circle", negative_prompt="blue", guidance_scale=0, steps=1, superres=False, seed=0)


def test_outpainting_that_keeps_all_or_nothing_of_the_image_is_refused(pipe):
    img = Image.fromarray(np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="no token of the canvas is new"):
        pipe.outpaint(img, "x", scale=0.999, steps=1, superres=False)
    with pytest.raises(ValueError, match="no token of the image is kept"):
        pipe.outpaint(img, "x", scale=1e-9, steps=1, superres=False)


def test_non_square_images_inpaint_their_centre_and_outpaint_whole(pipe):
    """A 2:1 image: a mask outside the centre square the model sees is refused, not silently a
    no-op; outpainting letterboxes the whole image, so its outer parts count."""
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (96, 192, 3), dtype=np.uint8)
    mask = np.zeros((96, 192), np.uint8)
    mask[:, :20] = 255  # only in the left strip the crop drops
    with pytest.raises(ValueError, match="centre"):
        pipe.inpaint(Image.fromarray(wide), mask, "a red circle", steps=1, superres=False)
    other = wide.copy()
    other[:, :40] = 255 - other[:, :40]  # differs only outside the centre square
    kwargs = dict(direction="left", scale=0.5, seed=0, output="tokens", superres=False, steps=2)
    a = pipe.outpaint(Image.fromarray(wide), "a red circle", **kwargs)
    b = pipe.outpaint(Image.fromarray(other), "a red circle", **kwargs)
    assert not torch.equal(a, b)


def test_from_pretrained_checks_each_slot_and_loads_a_root_whose_superres_is_unfinished(tmp_path):
    from muse.components import CheckpointError

    root = tmp_path / "root"
    checkpoint.init_model_root("tiny", str(root), seed=0)
    (root / "superres").rename(tmp_path / "superres")  # super-res not trained yet
    with pytest.warns(UserWarning, match="without the super-res stage"):
        partial = MusePipeline.from_pretrained(str(root))
    assert partial.superres is None and partial.vqgan_hi is None
    (root / "base").rename(tmp_path / "base")
    (root / "vqgan_hi").rename(root / "base")  # a VQGAN where the base transformer belongs
    with pytest.raises(CheckpointError, match="expected 'base'"):
        MusePipeline.from_pretrained(str(root))


def test_to_a_device_gives_the_text_encoder_the_precision_its_config_names_there():
    from dataclasses import replace

    pipe = MusePipeline.from_preset("tiny")
    pipe.text_encoder.config = replace(pipe.text_encoder.config, dtype="bfloat16")
    pipe.to("cpu")  # as from_pretrained(device=...) places it ("auto" would be bfloat16 on a GPU)
    assert next(pipe.text_encoder.parameters()).dtype == torch.bfloat16
    assert next(pipe.base.parameters()).dtype == torch.float32
