"""Long-tailed classification losses and their registry.

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

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from otlt.errors import OtltError, require

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
    "mixed_loss",
    "batch_loss",
]

CountsLike = Sequence[int] | torch.Tensor


# --------------------------------------------------------------------------- validation


def _counts(class_counts: CountsLike) -> torch.Tensor:
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
        isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        and float(v) == int(v) and v > 0
        for v in values
    )
    require(ok, f"class_counts must be positive integers, got {values}")
    return torch.tensor([int(v) for v in values], dtype=torch.int64)


def _real(name: str, value: Any, low: float, high: float = math.inf, *,
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


def _epoch(name: str, value: Any) -> int:
    """Return ``value`` as a non-negative int epoch, or raise OtltError."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 0
    require(ok, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- class constants


def class_balanced_weights(class_counts: CountsLike, beta: float = 0.9999) -> torch.Tensor:
    """Return the class-balanced weights ``(K,)`` from the effective number of samples.

    ``w_k = (1 - beta) / (1 - beta^{n_k})`` (the inverse effective number, Cui et al. 2019,
    Sec. 3), normalised so that ``sum_k w_k = K``. ``beta = 0`` gives all ones; ``beta -> 1``
    tends to inverse frequency. float32 on the CPU.
    """
    counts = _counts(class_counts).double()
    beta = _real("beta", beta, 0.0, 1.0)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights * (len(counts) / weights.sum())).float()


def ldam_margins(class_counts: CountsLike, max_margin: float = 0.5) -> torch.Tensor:
    """Return the LDAM margins ``(K,)``: ``m_k = C / n_k^{1/4}`` with ``max_k m_k = max_margin``.

    Cao et al. 2019 (LDAM loss) and its official ``LDAMLoss``: the rarest class gets ``max_margin``,
    so ``m_k = max_margin * (n_min / n_k)^{1/4}``. float32 on the CPU.
    """
    counts = _counts(class_counts).double()
    max_margin = _real("max_margin", max_margin, 0.0)
    margins = counts.pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


# --------------------------------------------------------------------------- base class


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
        counts = _counts(class_counts)
        self.register_buffer("class_counts", counts)
        self.epoch = 0
        self.beta = None if beta is None else _real("beta", beta, 0.0, 1.0)
        self.drw_epoch = None if drw_epoch is None else _epoch("drw_epoch", drw_epoch)
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
        self.epoch = _epoch("epoch", epoch)

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
                             "use mixed_loss for mixed labels")
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


# --------------------------------------------------------------------------- losses


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
        self.max_margin = _real("max_margin", max_margin, 0.0)
        self.s = _real("s", s, 0.0, low_open=True)
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
        self.tau = _real("tau", tau, 0.0)
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
        self.gamma = _real("gamma", gamma, 0.0)

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
        self.gamma = _real("gamma", gamma, 0.0)

    def _per_example(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        sign = 2.0 * F.one_hot(target, self.num_classes).to(logits.dtype) - 1.0
        signed = sign * logits  # z^t: BCE = softplus(-z^t), 1 - p^t = sigmoid(-z^t)
        bce = F.softplus(-signed)
        if self.gamma != 0.0:
            bce = torch.exp(self.gamma * F.logsigmoid(-signed)) * bce
        return bce.sum(dim=1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma}"


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., LongTailLoss]
    defaults: dict[str, Any]


def _named(cls: type[LongTailLoss], name: str, **fixed: Any) -> Callable[..., LongTailLoss]:
    def build(class_counts: CountsLike, **kwargs: Any) -> LongTailLoss:
        loss = cls(class_counts, **fixed, **kwargs)
        loss.name = name
        return loss

    return build


_DRW = {"beta": 0.9999, "drw_epoch": 160}
_LDAM = {"max_margin": 0.5, "s": 30.0}

_REGISTRY: dict[str, _Spec] = {
    "ce": _Spec(_named(CrossEntropyLoss, "ce"), {}),
    "drw": _Spec(_named(CrossEntropyLoss, "drw"), dict(_DRW)),
    "ldam": _Spec(_named(LDAMLoss, "ldam"), dict(_LDAM)),
    "ldam_drw": _Spec(_named(LDAMLoss, "ldam_drw"), {**_LDAM, **_DRW}),
    "balanced_softmax": _Spec(_named(BalancedSoftmaxLoss, "balanced_softmax"), {}),
    "focal": _Spec(_named(FocalLoss, "focal"), {"gamma": 1.0}),
    "cb_softmax": _Spec(_named(CrossEntropyLoss, "cb_softmax"), {"beta": 0.9999}),
    "cb_sigmoid": _Spec(_named(ClassBalancedSigmoidLoss, "cb_sigmoid", gamma=0.0),
                        {"beta": 0.9999}),
    "cb_focal": _Spec(_named(ClassBalancedSigmoidLoss, "cb_focal"),
                      {"beta": 0.9999, "gamma": 1.0}),
    "logit_adjusted": _Spec(_named(LogitAdjustedLoss, "logit_adjusted"), {"tau": 1.0}),
}
_ALIASES = {"balms": "balanced_softmax"}


def list_losses() -> list[str]:
    """Return the registered loss names (aliases such as ``balms`` not repeated)."""
    return list(_REGISTRY)


def _resolve(name: str) -> str:
    key = str(name).strip().lower().replace("-", "_")
    key = _ALIASES.get(key, key)
    if key not in _REGISTRY:
        aliases = ", ".join(f"{a} = {c}" for a, c in _ALIASES.items())
        raise OtltError(f"unknown loss {name!r}; expected one of {', '.join(_REGISTRY)} "
                        f"(aliases: {aliases})")
    return key


def loss_defaults(name: str) -> dict[str, Any]:
    """Return the keyword arguments loss ``name`` accepts, with their default values."""
    return dict(_REGISTRY[_resolve(name)].defaults)


def create_loss(name: str, class_counts: CountsLike, **kwargs: Any) -> LongTailLoss:
    """Build loss ``name`` for training-set class counts ``(K,)``; see :func:`list_losses`.

    ``kwargs`` override :func:`loss_defaults` (``drw_epoch``, ``beta``, ``max_margin``, ``s``,
    ``gamma``, ``tau``, depending on the loss). Unknown names, keys or bad values raise
    :class:`~otlt.errors.OtltError`.
    """
    key = _resolve(name)
    spec = _REGISTRY[key]
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        valid = ", ".join(spec.defaults) or "none"
        raise OtltError(f"loss {key!r} got unknown parameter(s) {', '.join(unknown)}; "
                        f"valid: {valid}")
    return spec.build(class_counts, **{**spec.defaults, **kwargs})


# --------------------------------------------------------------------------- mixed targets


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
    lam = _real("lam", lam, 0.0, 1.0, high_open=False)
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
