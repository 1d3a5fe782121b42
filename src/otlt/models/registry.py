"""Model registry: ``create_model(name, num_classes, head)`` and ``list_models()``."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from otlt.errors import OtltError
from otlt.models.resnet import resnet50
from otlt.models.resnet_cifar import resnet20, resnet32, resnet44, resnet56, resnet110

_MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet110": resnet110,
    "resnet50": resnet50,
}

HEADS: tuple[str, ...] = ("linear", "cosine")


def list_models() -> list[str]:
    """Return the registered model names, sorted."""
    return sorted(_MODELS)


def create_model(
    name: str,
    num_classes: int,
    head: str = "linear",
    *,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build model ``name`` with a ``num_classes``-way ``head`` (``"linear"`` or ``"cosine"``).

    The model has ``feature_dim``, ``num_classes``, ``features(x) -> (B, D)``, ``forward(x)
    -> (B, K)`` and its final layer as ``fc``. All initial weights are drawn from
    ``generator`` when one is given (the global RNG otherwise).
    """
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in _MODELS:
        raise OtltError(f"unknown model {name!r}; expected one of {', '.join(list_models())}")
    if head not in HEADS:
        raise OtltError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise OtltError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return _MODELS[key](num_classes=num_classes, head=head, generator=generator)
