import math

import pytest
import torch

from muse.config import preset
from muse.context import Context, ContextStack
from muse.transformer import UNDRAWN_LOGIT, MaskedTransformer, SuperResTransformer


SUPERRES_8_TO_16 = preset("superres-tiny")  # an 8x8 low-res grid to the 16x16 high-res one


def _text(B=2, L=5, D=64):
    emb = torch.randn(B, L, D)
    mask = torch.ones(B, L, dtype=torch.bool)
    if B > 1:
        mask[1, 3:] = False
    return emb, mask


def test_base_shapes_and_dtypes():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny"))
    emb, mask = _text()
    ids = torch.randint(0, model.codebook_size + 1, (2, model.num_tokens))
    logits = model(ids, model.encode_context(emb, mask))
    assert logits.shape == (2, 64, 512) and logits.dtype == torch.float32
    assert model.mask_token_id == 512


def test_superres_shapes():
    torch.manual_seed(0)
    model = SuperResTransformer(SUPERRES_8_TO_16)
    emb, mask = _text()
    lo = torch.randint(0, 512, (2, 8, 8))
    hi = torch.full((2, 256), model.mask_token_id)
    logits = model(hi, model.encode_context(emb, mask, lo))
    assert logits.shape == (2, 256, 512)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    for model, extra in [(MaskedTransformer(preset("base-tiny")), ()),
                         (SuperResTransformer(SUPERRES_8_TO_16), (torch.randint(0, 512, (2, 64)),))]:
        emb, mask = _text()
        ids = torch.randint(0, model.codebook_size + 1, (2, model.num_tokens))
        model(ids, model.encode_context(emb, mask, *extra)).logsumexp(-1).mean().backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
        assert not dead, f"no gradient reaches {dead}"


def test_padded_text_positions_are_ignored():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    emb, mask = _text(B=1)
    mask[0, 3:] = False
    ids = torch.randint(0, 512, (1, 64))
    a = model(ids, model.encode_context(emb, mask))
    emb2 = emb.clone()
    emb2[0, 3:] = 100.0  # garbage in padded slots must not matter
    b = model(ids, model.encode_context(emb2, mask))
    assert torch.allclose(a, b, atol=1e-5)


def test_unconditional_context_differs_and_has_no_nans():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    emb, mask = _text(B=1)
    ids = torch.randint(0, 512, (1, 64))
    cond = model(ids, model.encode_context(emb, mask))
    uncond = model(ids, model.encode_context(emb, torch.zeros_like(mask)))
    assert torch.isfinite(uncond).all()
    assert not torch.allclose(cond, uncond)


def test_context_cat_pads_and_matches_separate_forwards():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    e1, m1 = torch.randn(1, 4, 64), torch.ones(1, 4, dtype=torch.bool)
    e2, m2 = torch.randn(1, 7, 64), torch.ones(1, 7, dtype=torch.bool)
    c1, c2 = model.encode_context(e1, m1), model.encode_context(e2, m2)
    ids = torch.randint(0, 512, (1, 64))
    joint = model(ids.repeat(2, 1), Context.cat([c1, c2]))
    assert torch.allclose(joint[0], model(ids, c1)[0], atol=1e-5)
    assert torch.allclose(joint[1], model(ids, c2)[0], atol=1e-5)
    assert Context.cat([c1, c2]).repeat(3).batch_size == 6


def test_superres_lo_skip_copies_each_low_res_token_to_the_positions_it_covers():
    torch.manual_seed(0)
    assert preset("superres-tiny").lo_skip and not preset("superres-268m").lo_skip  # paper model unchanged
    model = SuperResTransformer(SUPERRES_8_TO_16).eval()
    assert torch.count_nonzero(model.lo_skip.weight) == 0  # starts as the cross-attention-only model
    torch.nn.init.normal_(model.lo_skip.weight)
    emb, mask = _text()
    lo_ids = torch.randint(0, 512, (2, 8, 8))
    ctx = model.encode_context(emb, mask, lo_ids)
    assert ctx.input_bias.shape == (2, 256, 128)
    bias = ctx.input_bias.view(2, 16, 16, 128)
    assert torch.equal(bias[:, 2, 4], bias[:, 3, 5]) and not torch.equal(bias[:, 2, 4], bias[:, 4, 4])
    # Context operations carry the bias along with the keys and values.
    assert ctx.repeat(3).input_bias.shape[0] == 6 and ctx.index(slice(1, 2)).input_bias.shape[0] == 1
    both = Context.cat([ctx, ctx.index(slice(0, 1))])
    assert both.input_bias.shape[0] == 3
    hi = torch.full((2, 256), model.mask_token_id)
    with torch.no_grad():
        separate = model(hi, ctx)
        joined = model(torch.cat([hi, hi[:1]]), both)
    torch.testing.assert_close(joined[:2], separate, atol=1e-5, rtol=1e-5)
    no_bias = Context(ctx.keys, ctx.values, ctx.mask)
    with torch.no_grad():
        assert not torch.allclose(model(hi, no_bias), separate)  # the bias reaches the logits


def test_token_patches_group_neighbouring_tokens_and_give_each_token_its_own_logits():
    from muse.transformer import TokenPatches

    patches = TokenPatches(side=4, p=2, hidden=1)
    with torch.no_grad():
        patches.down.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))
        patches.down.bias.zero_()
    x = torch.arange(16, dtype=torch.float32).view(1, 16, 1)  # token t of the 4x4 grid holds t
    folded = patches.fold(x)
    assert folded.shape == (1, 4, 1)
    # Patch (0, 0) holds tokens 0, 1 (its top row) and 4, 5; patch (1, 1) holds 10, 11, 14, 15.
    assert folded[0, 0, 0].item() == 0 * 1 + 1 * 10 + 4 * 100 + 5 * 1000
    assert folded[0, 3, 0].item() == 10 * 1 + 11 * 10 + 14 * 100 + 15 * 1000
    assert patches.unfold(folded).shape == (1, 16, 1)
    with pytest.raises(ValueError, match="token_patch"):
        TokenPatches(side=5, p=2, hidden=1)
    # In a model, the tokens that share a position still get logits of their own.
    torch.manual_seed(0)
    model = SuperResTransformer(preset("superres-tiny")).eval()
    assert model.config.token_patch == 2
    emb, mask = _text(B=1)
    context = model.encode_context(emb, mask, torch.randint(0, 512, (1, 8, 8)))
    logits = model(torch.full((1, 256), model.mask_token_id), context)
    assert not torch.allclose(logits[0, 0], logits[0, 1])


def test_context_stack_matches_separate_forwards_and_broadcasts_a_one_row_context():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    emb, mask = _text(B=2, L=6)  # row 1 is padded: a masked context
    cond, null = model.encode_context(emb, mask), model.null_context()
    assert not cond.dense and null.dense and null.batch_size == 1
    ids = torch.randint(0, 513, (2, 64))
    with torch.no_grad():
        joint = model(torch.cat([ids, ids]), ContextStack([cond, null], [2, 2]))
        torch.testing.assert_close(joint[:2], model(ids, cond), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(joint[2:], model(ids, null.repeat(2)), atol=1e-5, rtol=1e-5)


def test_null_context_is_the_fully_masked_text_and_is_cached_until_the_weights_change():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    emb, mask = _text(B=1)
    ids = torch.randint(0, 513, (1, 64))
    with torch.no_grad():
        masked_out = model(ids, model.encode_context(emb, torch.zeros_like(mask)))
        torch.testing.assert_close(model(ids, model.null_context()), masked_out, atol=1e-5, rtol=1e-5)
        assert model.null_context() is model.null_context()
        before = model.null_context()
        model.text_proj.null.add_(1.0)  # a training step changes the weights in place
        assert model.null_context() is not before
        # Weights loaded anew (as checkpoint.load_component does: assign=True, fresh tensors, all at
        # version 0 as the ones before them) are not served the old weights' null context.
        fresh = lambda m: {k: v.clone() for k, v in m.state_dict().items()}  # noqa: E731
        model.load_state_dict(fresh(model), assign=True)
        model.null_context()
        torch.manual_seed(1)
        other = MaskedTransformer(preset("base-tiny")).eval()
        want = other(ids, other.null_context())
        model.load_state_dict(fresh(other), assign=True)
        torch.testing.assert_close(model(ids, model.null_context()), want, atol=1e-5, rtol=1e-5)


def test_the_cached_null_context_follows_lora_merges_autocast_and_inference_tensors():
    from muse.lora import add_lora, merge_lora

    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny")).eval()
    ids = torch.randint(0, 513, (1, 64))

    def uncached(m):  # the null context as the weights give it now
        m.forget_null()
        return m(ids, m.null_context())

    with torch.no_grad():
        model(ids, model.null_context())  # cached
        add_lora(model, rank=4)
        for name, p in model.named_parameters():
            if name.endswith("lora_b"):
                p.normal_()
        merge_lora(model)  # new modules whose weights have the same versions as the ones replaced
        torch.testing.assert_close(model(ids, model.null_context()), uncached(model))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(ids, model.null_context())  # a bf16 context, cached under autocast
        assert model(ids, model.null_context()).dtype == torch.float32  # not the bf16 one, outside it
    with torch.inference_mode():  # loaded as a server might: inference tensors keep no version
        loaded = MaskedTransformer(preset("base-tiny")).eval()
        loaded.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
        assert loaded.null_context() is loaded.null_context()
        torch.testing.assert_close(loaded(ids, loaded.null_context()), uncached(model))


def test_select_gives_the_logits_of_the_selected_positions_only():
    torch.manual_seed(0)
    model = SuperResTransformer(SUPERRES_8_TO_16).eval()
    emb, mask = _text()
    ctx = model.encode_context(emb, mask, torch.randint(0, 512, (2, 64)))
    ids = torch.randint(0, 513, (2, 256))
    select = torch.rand(2, 256) < 0.3
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ctx, select=select), model(ids, ctx)[select])


def test_grouped_kv_heads_are_expanded_once_in_the_context():
    from dataclasses import replace

    torch.manual_seed(0)
    model = MaskedTransformer(replace(preset("base-tiny"), kv_heads=2)).eval()
    emb, mask = _text()
    ctx = model.encode_context(emb, mask)
    assert ctx.keys[0].shape[1] == model.config.heads  # stored per query head: nothing to expand per step
    assert model.blocks[0].cross.k.out_features == 2 * model.config.hidden // model.config.heads


def test_canvas_counts_start_at_zero_and_give_every_position_the_visible_codes_counts():
    from dataclasses import replace

    torch.manual_seed(0)
    with_counts = MaskedTransformer(preset("base-tiny")).eval()
    assert with_counts.config.canvas_counts
    plain = MaskedTransformer(replace(preset("base-tiny"), canvas_counts=False)).eval()
    keys = plain.load_state_dict(with_counts.state_dict(), strict=False)
    assert keys.unexpected_keys == ["embed.counts"] and not keys.missing_keys
    emb, mask = _text()
    ids = torch.randint(0, 512, (2, 64))
    ids[:, ::3] = plain.mask_token_id
    with torch.no_grad():  # zero at initialisation: exactly the model without them
        assert torch.equal(with_counts(ids, with_counts.encode_context(emb, mask)),
                           plain(ids, plain.encode_context(emb, mask)))
        with_counts.embed.counts.normal_()
    embed = with_counts.embed
    one, other = ids.clone(), ids.clone()
    one[:, 1], other[:, 1] = 7, 8  # one visible code changed, at position 1
    masked = ids.clone()
    masked[:, 1] = plain.mask_token_id
    with torch.no_grad():
        a, b, m = embed(one), embed(other), embed(masked)
        base = embed.tokens(one) + (embed.rows + embed.cols).view(64, -1)
        counts = torch.zeros(2, 512).scatter_add_(1, one.clamp(max=511), (one < 512).float())
    assert not torch.allclose(a[:, 5], b[:, 5])  # every position sees the change, not only position 1
    torch.testing.assert_close(a, base + (counts / 8 @ embed.counts)[:, None])
    torch.testing.assert_close(m - embed.tokens(masked), a - embed.tokens(one) - (embed.counts[7] / 8))  # [MASK] counts nothing


def test_configs_written_before_canvas_counts_load_without_them():
    from muse.config import from_dict

    old = {k: v for k, v in vars(preset("base-tiny")).items() if k != "canvas_counts"}
    config = from_dict(type(preset("base-tiny")), old)
    assert config.canvas_counts is False and MaskedTransformer(config).embed.counts is None


def test_checkpoints_from_before_the_text_proj_rename_still_load():
    torch.manual_seed(0)
    model = MaskedTransformer(preset("base-tiny"))
    old = {("text." + k[len("text_proj."):] if k.startswith("text_proj.") else k): v
           for k, v in model.state_dict().items()}
    fresh = MaskedTransformer(preset("base-tiny"))
    result = fresh.load_state_dict(old, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(fresh.text_proj.proj.weight, model.text_proj.proj.weight)


def test_sinusoidal_text_positions_let_the_text_layers_tell_word_order_and_add_no_weights():
    from dataclasses import replace

    torch.manual_seed(0)
    plain = MaskedTransformer(replace(preset("base-tiny"), text_positions="none")).eval()
    ordered = MaskedTransformer(replace(preset("base-tiny"), text_positions="sinusoidal")).eval()
    assert ordered.state_dict().keys() == plain.state_dict().keys()  # old tiny roots load either way
    ordered.load_state_dict(plain.state_dict())
    emb, mask = _text(B=1, L=6)
    swapped = emb[:, [3, 1, 2, 0, 4, 5]]  # two words trade places
    with torch.no_grad():
        for model, order_matters in ((plain, False), (ordered, True)):
            a, _ = model.text_proj(emb, mask)
            b, _ = model.text_proj(swapped, mask)
            same_set = torch.allclose(a[:, [0, 4, 2, 3, 1, 5, 6]], b, atol=1e-5)  # index 0 is the null token
            assert same_set != order_matters
        # padding after a prompt changes nothing the prompt's positions see
        padded = torch.cat([emb, torch.randn(1, 3, 64)], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1)
        short, _ = ordered.text_proj(emb, mask)
        long, _ = ordered.text_proj(padded, padded_mask)
        torch.testing.assert_close(long[:, :7], short)
    with pytest.raises(ValueError, match="text positions"):
        MaskedTransformer(replace(preset("base-tiny"), text_positions="rotary"))


def test_code_vectors_give_codes_an_embedding_and_a_logit_that_are_maps_of_their_vectors():
    from dataclasses import replace

    torch.manual_seed(0)
    model = MaskedTransformer(replace(preset("base-tiny"), code_dim=16)).eval()
    embed = model.embed
    assert not hasattr(embed, "tokens") and embed.counts.shape == (16, 128)
    vectors = torch.nn.functional.normalize(torch.randn(512, 16), dim=-1)
    vectors[9] = vectors[7]  # two codes that look alike
    model.embed.set_code_vectors(vectors)
    with torch.no_grad():
        embed.counts.normal_()
    ids = torch.randint(0, 512, (2, 64))
    ids[:, ::3] = model.mask_token_id
    a, b = ids.clone(), ids.clone()
    a[:, 1], b[:, 1] = 7, 9
    emb, mask = _text()
    with torch.no_grad():
        # Codes with equal vectors are one class to the model: the same embedding and count, and only
        # the first of them is drawn; targets are mapped to it.
        torch.testing.assert_close(embed(a), embed(b))
        logits = model(a, model.encode_context(emb, mask))
        assert (logits[..., 9] == UNDRAWN_LOGIT).all() and (logits[..., 7] > UNDRAWN_LOGIT).all()
        assert embed.undrawn().nonzero().flatten().tolist() == [9]
        assert torch.equal(embed.classes(torch.tensor([9, 7, 3, 512])), torch.tensor([7, 7, 3, 512]))
        # Guidance mixes two such logits: the floor stays finite, so no NaN.
        null = model(a, model.null_context())
        assert torch.isfinite(torch.lerp(null, logits, 3.0)).all()
        # The canvas count is the sum of the visible codes' vectors, mapped; [MASK] counts nothing.
        visible = (a < 512).float()
        summed = (visible[..., None] * vectors[a.clamp(max=511)]).sum(1)
        positions = (embed.rows + embed.cols).view(64, -1)
        plain = torch.cat([embed.code_in(vectors), embed.mask_embedding[None]])[a] + positions
        torch.testing.assert_close(embed(a), plain + (summed / 8 @ embed.counts)[:, None])
    fresh = MaskedTransformer(replace(preset("base-tiny"), code_dim=16))  # vectors not set yet: all zero
    fresh.embed.set_code_vectors(torch.zeros(512, 16))
    assert not fresh.embed.undrawn().any()  # zero vectors match nothing, themselves included: own classes
    with pytest.raises(ValueError, match=r"\(512, 16\)"):
        model.embed.set_code_vectors(torch.zeros(512, 8))
    with pytest.raises(ValueError, match="code_dim 0"):
        MaskedTransformer(preset("base-tiny")).embed.set_code_vectors(vectors)


def test_codes_can_be_told_apart_by_other_vectors_than_the_ones_read():
    """Code pixels: copies of a codebook entry decode to patches that differ by noise, so which codes
    are one class comes from the codebook (same_by), not from the pixels the model reads."""
    from dataclasses import replace

    model = MaskedTransformer(replace(preset("base-tiny"), code_dim=12, code_vectors="pixels"))
    codebook = torch.nn.functional.normalize(torch.randn(512, 16), dim=-1)
    codebook[9] = codebook[7]
    pixels = torch.randn(512, 12)  # 7 and 9 draw slightly different patches
    model.embed.set_code_vectors(pixels, same_by=codebook)
    assert model.embed.undrawn().nonzero().flatten().tolist() == [9]
    torch.testing.assert_close(model.embed.code_vectors, pixels)  # what the model reads
    model.embed.set_code_vectors(pixels)  # by the pixels themselves: every code its own class
    assert not model.embed.undrawn().any()
    # A chain: 20 is close to 21 and 21 to 22, but 20 not to 22. One class, drawn as 20: a class whose
    # first code is itself undrawn would be a target no logit can reach.
    angle = math.acos(0.995)
    chain = codebook.clone()
    chain[20:23] = 0
    chain[20:23, :2] = torch.tensor([[math.cos(a * angle), math.sin(a * angle)] for a in range(3)])
    assert (chain[20] @ chain[22]).item() < 0.99 < (chain[20] @ chain[21]).item()
    model.embed.set_code_vectors(pixels, same_by=chain)
    assert model.embed.classes(torch.tensor([20, 21, 22, 9])).tolist() == [20, 20, 20, 7]
    assert model.embed.undrawn().nonzero().flatten().tolist() == [9, 21, 22]
    with pytest.raises(ValueError, match="one vector per code"):
        model.embed.set_code_vectors(pixels, same_by=codebook[:100])
    with pytest.raises(ValueError, match="code_vectors"):
        MaskedTransformer(replace(preset("base-tiny"), code_dim=12, code_vectors="latents"))


def test_pixel_code_vectors_score_a_colour_and_a_shape_apart():
    """Patches of 2 colours x 2 shapes on a white ground: the outline part is nearly the same for both
    colours of a shape, and a linear score that is (colour part) + (outline part) ranks the pairing
    that neither part saw together first."""
    from muse.code_vectors import pixel_code_vectors

    white = torch.ones(3, 4, 4)
    masks = {"square": torch.zeros(4, 4), "bar": torch.zeros(4, 4)}
    masks["square"][1:3, 1:3] = 1
    masks["bar"][:, 1] = 1
    colours = {"red": torch.tensor([1.0, -1, -1]), "blue": torch.tensor([-1.0, -1, 1])}
    names = [(c, m) for c in colours for m in masks]
    pixels = torch.stack([torch.where(masks[m].bool(), colours[c][:, None, None], white).flatten() for c, m in names])
    background = torch.ones(1, 48)
    vectors = pixel_code_vectors(torch.cat([pixels, background.expand(4, -1)]))[:4]  # codebook mostly background
    assert vectors.shape == (4, 64)
    outline = vectors[:, 48:]
    red_square, red_bar, blue_square, blue_bar = range(4)
    # same shape, other colour: outlines far closer than those of another shape
    assert (outline[red_square] - outline[blue_square]).norm() < 0.5 * (outline[red_square] - outline[red_bar]).norm()
    # "blue" learnt from the blue bar, "square" from the red square: the blue square still ranks first
    colour_part = torch.cat([vectors[blue_bar, :48] - vectors[red_bar, :48], torch.zeros(16)])
    shape_part = torch.cat([torch.zeros(48), outline[red_square] - outline[red_bar]])
    scores = vectors @ (colour_part + shape_part)
    assert scores.argmax().item() == blue_square


def test_code_vectors_are_saved_with_the_model_and_superres_reads_both_grids_through_them(tmp_path):
    from dataclasses import replace

    from muse import checkpoint

    sr = SuperResTransformer(replace(SUPERRES_8_TO_16, code_dim=16, lo_code_dim=16)).eval()
    sr.embed.set_code_vectors(torch.nn.functional.normalize(torch.randn(512, 16), dim=-1))
    sr.lo_embed.set_code_vectors(torch.nn.functional.normalize(torch.randn(512, 16), dim=-1))
    checkpoint.save_component(sr, str(tmp_path / "superres"))
    loaded = checkpoint.load_component(str(tmp_path / "superres")).eval()
    assert torch.equal(loaded.embed.code_vectors, sr.embed.code_vectors)
    assert torch.equal(loaded.lo_embed.code_vectors, sr.lo_embed.code_vectors)
    emb, mask = _text()
    lo = torch.randint(0, 512, (2, 64))
    hi = torch.full((2, 256), sr.mask_token_id)
    with torch.no_grad():
        torch.testing.assert_close(loaded(hi, loaded.encode_context(emb, mask, lo)), sr(hi, sr.encode_context(emb, mask, lo)))
