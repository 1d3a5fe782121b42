"""Losses of mixed batches: the per-example ``lam``-combination and the batch reduction the
engine uses (normalised like the official code)."""

from __future__ import annotations

import torch

from otlt.losses.base import LongTailLoss, check_real


def mixed_loss(loss: LongTailLoss, logits: torch.Tensor, target_a: torch.Tensor,
               target_b: torch.Tensor, lam: float | torch.Tensor) -> torch.Tensor:
    """Return ``lam * l(logits, a) + (1 - lam) * l(logits, b)`` per example ``(B,)``.

    The per-example values, for a reduction of your own; the batch loss the engine and the
    README use is :func:`batch_loss` (normalised like the official code).

    ``lam`` is a float or a ``(B,)`` (or 0-d) tensor: the weight of ``target_a`` (Mixup/CutMix/OTmix
    convention, OTmix eqs. 9-10: ``λ ℓ(out, y_back) + (1 − λ) ℓ(out, y_fore)``). The loss is
    evaluated twice rather than on soft targets because some losses depend on the label
    itself, not only on a target distribution: LDAM subtracts the margin of the given label
    from that label's logit, and DRW/CB losses weight by the given label's class.
    """
    if isinstance(lam, torch.Tensor):
        if lam.dim() != 0 and lam.shape != target_a.shape:
            raise ValueError(f"lam must be a float, a 0-d tensor or shaped like target_a "
                             f"{tuple(target_a.shape)}, got {tuple(lam.shape)}")
        per_a, per_b = loss(logits, target_a), loss(logits, target_b)
        lam = lam.to(device=per_a.device, dtype=per_a.dtype)
        return lam * per_a + (1.0 - lam) * per_b
    lam = check_real("lam", lam, 0.0, 1.0, high_open=False)
    # Skipping the unused term saves a forward pass on unmixed batches.
    if lam == 1.0:
        return loss(logits, target_a)
    if lam == 0.0:
        return loss(logits, target_b)
    return lam * loss(logits, target_a) + (1.0 - lam) * loss(logits, target_b)


def batch_loss(loss: LongTailLoss, logits: torch.Tensor, target_a: torch.Tensor,
               target_b: torch.Tensor | None = None,
               lam: float | torch.Tensor | None = None) -> torch.Tensor:
    """Reduce a (possibly mixed) batch to its scalar loss, normalised like the official code.

    For class-weighted losses (DRW, CB) ``nn.CrossEntropyLoss(weight=w)`` in the LDAM-DRW and
    OTmix code divides by the batch's summed class weights, not by B; each mixed term is
    normalised by its own labels' weights:

        L = sum_i lam_i l_i(a) / sum_i w[a_i] + sum_i (1 - lam_i) l_i(b) / sum_i w[b_i]

    For unweighted losses ``w = 1`` and this is the plain mean of :func:`mixed_loss`.
    """
    per_a = loss(logits, target_a)
    norm_a = loss.example_weights(target_a).to(per_a).sum()
    if target_b is None or lam is None:
        return per_a.sum() / norm_a
    lam_t = torch.as_tensor(lam, device=per_a.device, dtype=per_a.dtype)
    per_b = loss(logits, target_b)
    norm_b = loss.example_weights(target_b).to(per_b).sum()
    return (lam_t * per_a).sum() / norm_a + ((1 - lam_t) * per_b).sum() / norm_b
