"""The concrete long-tailed losses: CE, LDAM, logit-adjusted / balanced softmax, focal,
class-balanced sigmoid (see :mod:`otlt.losses` for the list and defaults)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from otlt.losses.base import (
    CountsLike,
    LongTailLoss,
    check_real,
    ldam_margins,
)


class CrossEntropyLoss(LongTailLoss):
    """Cross-entropy ``-log softmax(z)_y``, optionally class-balanced (always or from DRW on).

    ``ce``: no weights. ``cb_softmax``: ``w[y] * CE`` with :func:`class_balanced_weights`
    (Cui et al. 2019). ``drw``: plain CE before ``drw_epoch``, ``w[y] * CE`` from it on
    (Cao et al. 2019, Algorithm 1 / official ``train_rule == 'DRW'``).
    """

    name = "ce"

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, target, reduction="none")


class LDAMLoss(LongTailLoss):
    """LDAM: ``CE(s * (z - m_y e_y), y)`` with margins ``m_k ∝ n_k^{-1/4}``, max ``max_margin``.

    Cao et al. 2019; as in the official ``LDAMLoss`` the scale ``s`` multiplies every
    logit, and only the true class's logit is reduced by its margin. Intended for cosine
    logits in ``[-1, 1]`` (``NormedLinear``). With ``beta``/``drw_epoch`` it is LDAM-DRW.
    """

    name = "ldam"

    def __init__(self, class_counts: CountsLike, *, max_margin: float = 0.5, s: float = 30.0,
                 beta: float | None = None, drw_epoch: int | None = None) -> None:
        super().__init__(class_counts, beta=beta, drw_epoch=drw_epoch)
        self.max_margin = check_real("max_margin", max_margin, 0.0)
        self.s = check_real("s", s, 0.0, low_open=True)
        self.register_buffer("margins", ldam_margins(self.class_counts, self.max_margin))

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        margin = self.margins.to(logits.dtype)[target]
        shifted = logits - F.one_hot(target, self.num_classes).to(logits.dtype) * margin[:, None]
        return F.cross_entropy(self.s * shifted, target, reduction="none")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_margin={self.max_margin}, s={self.s}"


class LogitAdjustedLoss(LongTailLoss):
    """Logit-adjusted CE: ``CE(z + tau * log(pi), y)`` with the train prior ``pi_k = n_k / N``.

    Menon et al. 2021 (logit-adjusted softmax cross-entropy). ``tau = 1`` is Balanced Softmax.
    """

    name = "logit_adjusted"

    def __init__(self, class_counts: CountsLike, *, tau: float = 1.0) -> None:
        super().__init__(class_counts)
        self.tau = check_real("tau", tau, 0.0)
        prior = self.class_counts.double() / self.class_counts.sum()
        self.register_buffer("log_prior", prior.log().float())

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        adjusted = logits + self.tau * self.log_prior.to(logits.dtype)
        return F.cross_entropy(adjusted, target, reduction="none")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, tau={self.tau}"


class BalancedSoftmaxLoss(LogitAdjustedLoss):
    """Balanced Softmax (BALMS): ``CE(z + log(n_k / N), y)`` (Ren et al. 2020)."""

    name = "balanced_softmax"

    def __init__(self, class_counts: CountsLike) -> None:
        super().__init__(class_counts, tau=1.0)


class FocalLoss(LongTailLoss):
    """Softmax focal loss ``(1 - p_y)^gamma * CE`` with ``p_y = exp(-CE)``.

    As the LDAM-DRW code's ``FocalLoss`` (Lin et al. 2017 applied to the softmax); ``gamma``
    defaults to 1.0, the value of its CIFAR runs. ``gamma = 0`` is CE.
    """

    name = "focal"

    def __init__(self, class_counts: CountsLike, *, gamma: float = 1.0) -> None:
        super().__init__(class_counts)
        self.gamma = check_real("gamma", gamma, 0.0)

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits, target, reduction="none")
        # 1 - p = -expm1(-ce) keeps precision for confident examples; the floor keeps the
        # gradient of (1 - p)^gamma finite (0 * inf) when gamma < 1 and ce rounds to 0.
        one_minus_p = (-torch.expm1(-ce)).clamp_min(torch.finfo(ce.dtype).tiny)
        return one_minus_p.pow(self.gamma) * ce

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


class ClassBalancedSigmoidLoss(LongTailLoss):
    """Class-balanced sigmoid (focal) loss of Cui et al. 2019 on one-hot targets.

    ``l_i = w[y_i] * sum_k (1 - p^t_{ik})^gamma * BCE(z_ik, [k = y_i])`` where
    ``p^t = sigmoid(z)`` for the true class and ``1 - sigmoid(z)`` for the others. Summing
    over the K binary terms follows the paper (and its code, which divides the total by B);
    ``gamma = 0`` is the CB sigmoid loss, ``gamma > 0`` the CB focal loss.
    """

    name = "cb_sigmoid"

    def __init__(self, class_counts: CountsLike, *, beta: float = 0.9999,
                 gamma: float = 0.0) -> None:
        super().__init__(class_counts, beta=beta)
        self.gamma = check_real("gamma", gamma, 0.0)

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sign = 2.0 * F.one_hot(target, self.num_classes).to(logits.dtype) - 1.0
        signed = sign * logits  # z^t: BCE = softplus(-z^t), 1 - p^t = sigmoid(-z^t)
        bce = F.softplus(-signed)
        if self.gamma != 0.0:
            bce = torch.exp(self.gamma * F.logsigmoid(-signed)) * bce
        return bce.sum(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"
