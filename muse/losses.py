"""Training losses: masked-token cross-entropy for the transformers; reconstruction, hinge GAN and
adaptive weighting for the VQGAN (Esser et al., Taming Transformers). Codebook and commitment terms
come out of the quantizer itself (muse/vqgan.py)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_token_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor,
                      label_smoothing: float = 0.1, undrawn: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy on masked positions only. logits (B, N, K), targets (B, N), mask (B, N) bool.
    `undrawn` ((K,) bool, a model that draws one code of each class: TokenEmbedding.undrawn) gets no
    share of the label smoothing: it is spread over the codes the model can draw."""
    picked = logits[mask]  # (M, K): unmasked positions never reach the loss
    if picked.numel() == 0:
        return logits.sum() * 0.0
    picked, picked_targets = picked.float(), targets[mask]
    if undrawn is None or label_smoothing == 0.0:
        return F.cross_entropy(picked, picked_targets, label_smoothing=label_smoothing)
    logp = F.log_softmax(picked, dim=-1)
    nll = -logp.gather(1, picked_targets[:, None]).squeeze(1)
    smooth = -logp[:, ~undrawn].mean(-1)
    return ((1.0 - label_smoothing) * nll + label_smoothing * smooth).mean()


@torch.no_grad()
def masked_token_accuracy(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Share of masked positions whose argmax equals the target."""
    if not mask.any():
        return logits.new_zeros(())
    return (logits.argmax(-1)[mask] == targets[mask]).float().mean()


def reconstruction_loss(images: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """L1 + L2 pixel loss, both in [-1, 1] space."""
    return F.l1_loss(recon, images) + F.mse_loss(recon, images)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_disc_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer_weight: torch.Tensor,
                         max_weight: float = 1e4) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer_weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer_weight, retain_graph=True)[0]
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()
