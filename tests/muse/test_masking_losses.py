import math

import pytest
import torch

from muse.losses import hinge_d_loss, hinge_g_loss, masked_token_accuracy, masked_token_loss
from muse.masking import mask_tokens, num_masked_after_step, sample_mask_rates, schedule


def test_arccos_rates_mean_and_range():
    g = torch.Generator().manual_seed(0)
    r = sample_mask_rates(200_000, generator=g)
    assert r.min() > 0 and r.max() <= 1
    assert abs(r.mean().item() - 2 / math.pi) < 0.005  # mean of the arccos density is 2/π ≈ 0.637
    # The density rises toward 1: more mass in [0.9, 1] than in [0, 0.1].
    assert ((r > 0.9).float().mean() > 2 * (r < 0.1).float().mean())


def test_mask_tokens_masks_the_requested_count():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 10, (4, 100))
    masked, mask = mask_tokens(ids, torch.tensor([0.01, 0.25, 0.5, 1.0]), mask_id=10, generator=g)
    assert mask.sum(1).tolist() == [1, 25, 50, 100]
    assert (masked[mask] == 10).all() and (masked[~mask] == ids[~mask]).all()
    priority = torch.arange(100.0).flip(0).expand(4, 100)  # the last positions first
    _, ordered = mask_tokens(ids, torch.tensor([0.01, 0.25, 0.5, 1.0]), mask_id=10, priority=priority)
    assert [row.nonzero().flatten().tolist() for row in ordered[:3]] == [[99], list(range(75, 100)),
                                                                         list(range(50, 100))]


def test_schedules():
    assert schedule("cosine", 0) == 1 and abs(schedule("cosine", 1)) < 1e-12
    assert schedule("linear", 0.25) == 0.75
    counts = [num_masked_after_step(s, 8, 256) for s in range(8)]
    assert counts[-1] == 0 and counts == sorted(counts, reverse=True)
    with pytest.raises(ValueError):
        schedule("exp", 0.5)


def test_masked_loss_ignores_unmasked_positions():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5, requires_grad=True)
    targets = torch.randint(0, 5, (2, 6))
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[:, :2] = True
    loss = masked_token_loss(logits, targets, mask, label_smoothing=0.0)
    loss.backward()
    assert logits.grad[:, 2:].abs().sum() == 0 and logits.grad[:, :2].abs().sum() > 0
    changed = logits.detach().clone()
    changed[:, 2:] = 1e3  # anything at unmasked positions leaves the loss unchanged
    assert torch.allclose(masked_token_loss(changed, targets, mask, label_smoothing=0.0), loss)


def test_label_smoothing_spreads_only_over_the_codes_a_model_draws():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 6), torch.randint(0, 4, (2, 3))
    mask = torch.ones(2, 3, dtype=torch.bool)
    undrawn = torch.tensor([False, False, False, False, True, True])
    floored = logits.masked_fill(undrawn, -1.0e4)
    # The same as smoothing over the four drawn codes alone...
    expected = masked_token_loss(logits[..., :4], targets, mask, label_smoothing=0.1)
    torch.testing.assert_close(masked_token_loss(floored, targets, mask, 0.1, undrawn=undrawn), expected)
    # ...where spreading over all six would charge the floored codes' -1e4 log-probabilities.
    assert masked_token_loss(floored, targets, mask, 0.1) > 100
    # Without the mask, or without smoothing, it is plain cross-entropy.
    torch.testing.assert_close(masked_token_loss(logits, targets, mask, 0.1, undrawn=torch.zeros(6, dtype=torch.bool)),
                               masked_token_loss(logits, targets, mask, 0.1))


def test_accuracy_and_hinge():
    logits = torch.zeros(1, 3, 4)
    logits[0, 0, 2] = 5
    targets = torch.tensor([[2, 1, 1]])
    mask = torch.tensor([[True, True, False]])
    assert masked_token_accuracy(logits, targets, mask).item() == 0.5
    assert hinge_d_loss(torch.full((3,), 2.0), torch.full((3,), -2.0)).item() == 0
    assert hinge_g_loss(torch.ones(3)).item() == -1
