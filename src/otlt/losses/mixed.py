"""The loss of a mixed batch: the batch reduction the engine uses (normalised like the
official code)."""

from __future__ import annotations

import torch

from otlt.losses.base import LongTailLoss


def batch_loss(loss: LongTailLoss, logits: torch.Tensor, base_labels: torch.Tensor,
               partner_labels: torch.Tensor | None = None,
               lam: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (possibly mixed) batch to its scalar loss, normalised like the official code.

    For class-weighted losses (DRW, CB) ``nn.CrossEntropyLoss(weight=w)`` in the LDAM-DRW and
    OTmix code divides by the batch's summed class weights, not by B; each mixed term is
    normalised by its own labels' weights:

        L = sum_i lam_i l_i(a) / sum_i w[a_i] + sum_i (1 - lam_i) l_i(b) / sum_i w[b_i]

    with ``a = base_labels`` and ``b = partner_labels`` (:class:`otlt.mixing.MixedBatch`'s).
    For unweighted losses ``w = 1`` and this is the plain mean of
    ``lam_i l_i(a) + (1 - lam_i) l_i(b)``. ``lam`` is a float or a ``(B,)`` tensor: the weight
    of the base labels (Mixup/CutMix/OTmix convention, OTmix eqs. 9-10:
    ``λ ℓ(out, y_back) + (1 − λ) ℓ(out, y_fore)``, background = base, foreground = partner).
    Without ``partner_labels`` it is the loss of a clean batch. The loss is evaluated once per label
    rather than on soft targets because some losses depend on the label itself, not only on a
    target distribution: LDAM subtracts the margin of the given label from that label's logit,
    and DRW/CB losses weight by the given label's class.
    """
    per_a = loss(logits, base_labels)
    norm_a = loss.example_weights(base_labels).to(per_a).sum()
    if partner_labels is None or lam is None:
        return per_a.sum() / norm_a
    lam_t = torch.as_tensor(lam, device=per_a.device, dtype=per_a.dtype)
    per_b = loss(logits, partner_labels)
    norm_b = loss.example_weights(partner_labels).to(per_b).sum()
    return (lam_t * per_a).sum() / norm_a + ((1 - lam_t) * per_b).sum() / norm_b
