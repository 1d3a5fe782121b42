"""The loss base class :class:`LongTailLoss`, the class constants (class-balanced weights, LDAM
margins) and the argument checks every loss shares."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from otlt.errors import OtltError, is_finite_number, is_integer, require

CountsLike = Sequence[int] | torch.Tensor


def check_counts(class_counts: CountsLike) -> torch.Tensor:
    """Return the class counts as a 1-D int64 CPU tensor, or raise OtltError."""
    if isinstance(class_counts, torch.Tensor):
        values = class_counts.detach().cpu().reshape(-1).tolist()
        require(class_counts.dim() == 1, f"class_counts must be 1-D, got shape "
                f"{tuple(class_counts.shape)}")
    else:
        try:
            values = list(class_counts)
        except TypeError:
            raise OtltError(
                f"class_counts must be a sequence of positive integers, got {class_counts!r}"
            ) from None
    require(len(values) > 0, "class_counts must name at least one class, got []")
    ok = all(
        is_finite_number(v) and float(v) == int(v) and v > 0
        for v in values
    )
    require(ok, f"class_counts must be positive integers, got {values}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def check_real(name: str, value: Any, low: float, high: float = math.inf, *,
          low_open: bool = False, high_open: bool = True) -> float:
    """Return ``value`` as a float inside the given interval, or raise OtltError."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
    require(is_number, f"{name} must be a real number in {interval}, got {value!r}")
    x = float(value)
    above = x > low if low_open else x >= low
    below = x < high if high_open else x <= high
    require(math.isfinite(x) and above and below,
            f"{name} must be in {interval}, got {value!r}")
    return x


def check_epoch(name: str, value: Any) -> int:
    """Return ``value`` as a non-negative int epoch, or raise OtltError."""
    require(is_integer(value) and value >= 0,
            f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def class_balanced_weights(class_counts: CountsLike, beta: float = 0.9999) -> torch.Tensor:
    """Return the class-balanced weights ``(K,)`` from the effective number of samples.

    ``w_k = (1 - beta) / (1 - beta^{n_k})`` (the inverse effective number, Cui et al. 2019,
    Sec. 3), normalised so that ``sum_k w_k = K``. ``beta = 0`` gives all ones; ``beta -> 1``
    tends to inverse frequency. float32 on the CPU.
    """
    counts = check_counts(class_counts).double()
    beta = check_real("beta", beta, 0.0, 1.0)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights * (len(counts) / weights.sum())).float()


def ldam_margins(class_counts: CountsLike, max_margin: float = 0.5) -> torch.Tensor:
    """Return the LDAM margins ``(K,)``: ``m_k = C / n_k^{1/4}`` with ``max_k m_k = max_margin``.

    Cao et al. 2019 (LDAM loss) and its official ``LDAMLoss``: the rarest class gets ``max_margin``,
    so ``m_k = max_margin * (n_min / n_k)^{1/4}``. float32 on the CPU.
    """
    counts = check_counts(class_counts).double()
    max_margin = check_real("max_margin", max_margin, 0.0)
    margins = counts.pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


class LongTailLoss(nn.Module):
    """Per-example loss ``(B, K), (B,) -> (B,)`` with class constants as buffers.

    Subclasses implement :meth:`_per_example` on logits already in float32 (or float64) and
    may hold class-balanced weights ``cb_weights`` that are switched on either always
    (``drw_epoch=None``) or from ``drw_epoch`` on (deferred re-weighting). The epoch starts
    at 0; call :meth:`set_epoch` at the start of every epoch (0-based), as for samplers.
    """

    name: str = "loss"

    def __init__(self, class_counts: CountsLike, *, beta: float | None = None,
                 drw_epoch: int | None = None) -> None:
        super().__init__()
        counts = check_counts(class_counts)
        self.register_buffer("class_counts", counts)
        self.epoch = 0
        self.beta = None if beta is None else check_real("beta", beta, 0.0, 1.0)
        self.drw_epoch = None if drw_epoch is None else check_epoch("drw_epoch", drw_epoch)
        if self.beta is not None:
            self.register_buffer("cb_weights", class_balanced_weights(counts, self.beta))
        elif self.drw_epoch is not None:
            raise ValueError("drw_epoch needs beta: there are no weights to switch on")

    @property
    def num_classes(self) -> int:
        """Number of classes ``K``."""
        return int(self.class_counts.numel())

    def set_epoch(self, epoch: int) -> None:
        """Tell the loss the current 0-based epoch (DRW weights switch on at ``drw_epoch``)."""
        self.epoch = check_epoch("epoch", epoch)

    def class_weights(self) -> torch.Tensor | None:
        """Return the per-class weights ``(K,)`` in effect this epoch, or None if unweighted."""
        if self.beta is None:
            return None
        if self.drw_epoch is not None and self.epoch < self.drw_epoch:
            return None
        return self.cb_weights

    def example_weights(self, target: torch.Tensor) -> torch.Tensor:
        """Return the class weight ``w[y_i]`` ``(B,)`` of each example (ones if unweighted).

        ``loss.sum() / example_weights(target).sum()`` reproduces the weighted mean of
        ``nn.CrossEntropyLoss(weight=w)``.
        """
        weights = self.class_weights()
        if weights is None:
            return torch.ones(target.shape, dtype=torch.float32, device=target.device)
        return weights.float()[target]

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Return the per-example loss ``(B,)`` for logits ``(B, K)`` and labels ``(B,)``."""
        logits, target = self._check(logits, target)
        loss = self._per_example(logits, target)
        weights = self.class_weights()
        if weights is not None:
            loss = loss * weights.to(logits.dtype)[target]
        return loss

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check(self, logits: torch.Tensor, target: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Validate shapes; upcast half-precision logits so the loss is float32."""
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"{self.name}: logits must be (B, {self.num_classes}), "
                             f"got {tuple(logits.shape)}")
        if target.shape != logits.shape[:1]:
            raise ValueError(f"{self.name}: target must be ({logits.shape[0]},), "
                             f"got {tuple(target.shape)}")
        if target.is_floating_point() or target.is_complex():
            raise ValueError(f"{self.name}: target must hold integer labels, got {target.dtype}; "
                             "use batch_loss for mixed labels")
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        return logits, target.long()

    def extra_repr(self) -> str:
        parts = [f"num_classes={self.num_classes}"]
        if self.beta is not None:
            parts.append(f"beta={self.beta}")
        if self.drw_epoch is not None:
            parts.append(f"drw_epoch={self.drw_epoch}")
        return ", ".join(parts)
