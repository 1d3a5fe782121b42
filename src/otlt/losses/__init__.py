"""Long-tailed classification losses and their registry.

Modules: :mod:`~otlt.losses.base` (the base class, class constants, argument checks) <-
:mod:`~otlt.losses.standard` (the losses) <- :mod:`~otlt.losses.registry`;
:mod:`~otlt.losses.mixed` (the mixed-batch loss).

Every loss is a :class:`LongTailLoss`: ``forward(logits (B, K), target (B,)) -> (B,)``, the
per-example loss with no reduction (the engine reduces). Class-dependent constants (counts,
class-balanced weights, LDAM margins, log-priors) are registered buffers, so ``.to(device)``
moves them and ``state_dict()`` holds them. Epoch-dependent behaviour (DRW) goes through
:meth:`LongTailLoss.set_epoch`. Half-precision logits (autocast) are computed in float32;
float64 logits stay float64.

Losses (``create_loss(name, class_counts, **kwargs)``; defaults in brackets):

- ``ce``: cross-entropy.
- ``drw``: CE, weighted from epoch ``drw_epoch`` [160] on by the class-balanced weights of
  :func:`class_balanced_weights` with ``beta`` [0.9999] (Cao et al. 2019, deferred re-weighting).
- ``ldam``: LDAM, margins :func:`ldam_margins` with ``max_margin`` [0.5], scale ``s`` [30];
  meant for the cosine ``NormedLinear`` head, whose logits lie in ``[-1, 1]``.
- ``ldam_drw``: LDAM with DRW weights (``max_margin``, ``s``, ``beta``, ``drw_epoch``).
- ``balanced_softmax`` (alias ``balms``): CE on ``logits + log(n_k / N)`` (Ren et al. 2020).
- ``focal``: softmax focal loss ``(1 - p_y)^gamma * CE``, ``gamma`` [1.0] as in the LDAM-DRW
  code's CIFAR runs (Lin et al. 2017; LDAM-DRW ``FocalLoss``).
- ``cb_softmax``: CE weighted by class-balanced weights, ``beta`` [0.9999] (Cui et al. 2019).
- ``cb_sigmoid``: class-balanced one-vs-all BCE-with-logits summed over classes (Cui et al.).
- ``cb_focal``: class-balanced sigmoid focal loss, ``beta`` [0.9999], ``gamma`` [1.0].
- ``logit_adjusted``: CE on ``logits + tau * log(pi_k)``, ``tau`` [1.0] (Menon et al. 2021).

Reduction note: a weighted loss returns ``w[y_i] * l_i``. Averaging it over the batch is the
class-balanced-loss convention (Cui et al.). ``nn.CrossEntropyLoss(weight=w)``, used by the
LDAM-DRW and OTmix code for DRW, instead divides by ``sum_i w[y_i]``; to reproduce that,
reduce with ``loss.sum() / criterion.example_weights(target).sum()``.
"""

from __future__ import annotations

from otlt.losses.base import LongTailLoss, class_balanced_weights, ldam_margins
from otlt.losses.mixed import batch_loss
from otlt.losses.registry import create_loss, list_losses, loss_defaults
from otlt.losses.standard import (
    BalancedSoftmaxLoss,
    ClassBalancedSigmoidLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
)

__all__ = [
    "LongTailLoss",
    "CrossEntropyLoss",
    "LDAMLoss",
    "LogitAdjustedLoss",
    "BalancedSoftmaxLoss",
    "FocalLoss",
    "ClassBalancedSigmoidLoss",
    "class_balanced_weights",
    "ldam_margins",
    "create_loss",
    "list_losses",
    "loss_defaults",
    "batch_loss",
]
