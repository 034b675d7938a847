"""LoRA adapters: only the adapters train, the output starts unchanged, and merging folds them into
plain weights with the original keys and the same outputs."""

from __future__ import annotations

import pytest
import torch

from muse import checkpoint
from muse.config import preset
from muse.lora import LoRALinear, add_lora, has_lora, lora_state, merge_lora


def tiny_base():
    torch.manual_seed(0)
    return checkpoint.build_component("base", preset("base-tiny")).train()


def batch(model, B: int = 4):
    g = torch.Generator().manual_seed(1)
    c = model.config
    ids = torch.randint(0, c.codebook_size, (B, c.num_tokens), generator=g)
    text = torch.randn(B, 6, c.text_dim, generator=g)
    return ids, text, torch.ones(B, 6, dtype=torch.bool)


def logits(model, ids, text, mask):
    return model(ids, model.encode_context(text, mask))


def test_only_adapters_train_and_merging_keeps_outputs_and_keys():
    model = tiny_base()
    keys_before = set(model.state_dict())
    frozen_before = {k: v.clone() for k, v in model.state_dict().items()}
    ids, text, mask = batch(model)
    with torch.no_grad():
        reference = logits(model, ids, text, mask)
    wrapped = add_lora(model, rank=4)
    assert wrapped and all(isinstance(model.get_submodule(n), LoRALinear) for n in wrapped)
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, text, mask), reference)  # B = 0: unchanged at start
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(v.numel() for v in lora_state(model).values())
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    target = torch.randint(0, model.config.codebook_size, ids.shape)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(logits(model, ids, text, mask).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = {k.replace(".base.", "."): v for k, v in model.state_dict().items() if "lora_" not in k}
    for k, v in frozen_before.items():
        torch.testing.assert_close(after[k], v, rtol=0, atol=0)  # every original weight untouched
    assert any(v.abs().sum() > 0 for k, v in lora_state(model).items() if k.endswith("lora_b"))
    with torch.no_grad():
        adapted = logits(model, ids, text, mask)
    assert not torch.allclose(adapted, reference)
    merge_lora(model)
    assert not has_lora(model) and set(model.state_dict()) == keys_before
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids, text, mask), adapted, rtol=1e-4, atol=1e-4)


def test_bad_rank_and_no_targets_are_refused():
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_base(), rank=0)
    with pytest.raises(ValueError, match="no nn.Linear"):
        add_lora(tiny_base(), rank=2, targets=("nothing",))
    for alpha in (0, -2.0):  # 0 was taken for "the rank", a negative one flipped the adapters' sign
        with pytest.raises(ValueError, match="alpha must be > 0"):
            add_lora(tiny_base(), rank=2, alpha=alpha)



def test_lora_on_the_amused_uvit():
    from muse.config import UViTConfig

    torch.manual_seed(0)
    cfg = UViTConfig(codebook_size=64, vocab_size=72, mask_token_id=71, tokens_per_side=4, hidden=32, layers=2,
                     heads=2, mlp=64, embed_dim=16, conv_channels=16, res_blocks=1, conv_heads=2, text_dim=16,
                     text_len=5, micro_cond_dim=8)
    model = checkpoint.build_component("base", cfg)  # the U-ViT fills the base slot of an aMUSEd root
    keys = set(model.state_dict())
    ids = torch.randint(0, 64, (2, 16))
    text, mask = torch.randn(2, 6, 16), torch.ones(2, 6, dtype=torch.bool)
    with torch.no_grad():
        reference = model(ids, model.encode_context(text, mask))
    wrapped = add_lora(model, rank=2)
    assert any(n.endswith(".attn.q") for n in wrapped) and any(n.endswith(".cross.out") for n in wrapped)
    assert not [n for n in wrapped if ".ff." in n], wrapped  # attention projections only, as documented
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = model(ids, model.encode_context(text, mask)).float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    with torch.no_grad():
        adapted = model(ids, model.encode_context(text, mask))
    assert not torch.allclose(adapted, reference)
    merge_lora(model)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        torch.testing.assert_close(model(ids, model.encode_context(text, mask)), adapted, rtol=1e-4, atol=1e-4)
