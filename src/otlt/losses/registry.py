"""The loss registry: ``create_loss(name, class_counts, **kwargs)``, ``list_losses()``,
``loss_defaults(name)``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from otlt.errors import OtltError
from otlt.losses.base import CountsLike, LongTailLoss
from otlt.losses.standard import (
    BalancedSoftmaxLoss,
    ClassBalancedSigmoidLoss,
    CrossEntropyLoss,
    FocalLoss,
    LDAMLoss,
    LogitAdjustedLoss,
)


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
