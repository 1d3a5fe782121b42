"""Model registry: ``create_model(name, num_classes, head)``, ``list_models()``, and three ways
to bring another backbone to the CLI:

- :func:`register_model` in your own code (a library user, or a script that calls
  ``otlt.cli.main``);
- an installed package's entry point in the group ``otlt.models`` (``name = "pkg:factory"``),
  found the first time an unknown name is asked for;
- ``model.name: timm:<architecture>`` when timm is installed (``pretrained=False``; linear
  head only).

A factory is called as ``factory(num_classes=K, head=head, generator=g)`` and returns an
``nn.Module`` mapping ``(B, C, H, W)`` to ``(B, K)`` logits; OTmix takes its features with
:func:`otlt.models.features.feature_fn`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from otlt.errors import OtltError, is_integer
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


def register_model(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``factory(num_classes, head, generator) -> nn.Module`` as model ``name``."""
    key = name.strip().lower()
    if not key or key.startswith("timm:"):
        raise OtltError(f"cannot register a model as {name!r}")

    def decorator(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if key in _MODELS and _MODELS[key] is not factory:
            raise OtltError(f"model {name!r} is already registered")
        _MODELS[key] = factory
        return factory

    return decorator


def _from_entry_points(key: str) -> Callable[..., nn.Module] | None:
    from importlib.metadata import entry_points

    for ep in entry_points(group="otlt.models"):
        if ep.name.lower() == key:
            factory = ep.load()
            _MODELS[key] = factory
            return factory
    return None


def _timm_factory(arch: str) -> Callable[..., nn.Module]:
    try:
        import timm
    except ImportError:
        raise OtltError(f"model.name=timm:{arch} needs timm (pip install timm)") from None

    def build(num_classes: int, head: str, generator: torch.Generator | None) -> nn.Module:
        if head != "linear":
            raise OtltError(f"timm models take model.head=linear, got {head!r}")
        try:
            return timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except (RuntimeError, ValueError) as exc:
            raise OtltError(f"timm cannot build {arch!r}: {exc}") from None

    return build


def list_models() -> list[str]:
    """Return the registered model names, sorted (``timm:<arch>`` is not listed)."""
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
    factory = check_model(name, num_classes, head)
    return factory(num_classes=num_classes, head=head, generator=generator)


def check_model(name: str, num_classes: int, head: str = "linear") -> Callable[..., nn.Module]:
    """Return model ``name``'s factory without building it; an unknown name or head, or a
    bad ``num_classes``, is an :class:`OtltError` (what :func:`create_model` would raise
    before any weight is drawn)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if isinstance(key, str) and key.startswith("timm:"):
        factory = _timm_factory(name.strip()[5:])
    else:
        factory = _MODELS.get(key) or (_from_entry_points(key) if isinstance(key, str)
                                       else None)
    if factory is None:
        raise OtltError(f"unknown model {name!r}; expected one of {', '.join(list_models())}, "
                        "timm:<architecture>, or a name given to otlt.models.register_model")
    if head not in HEADS:
        raise OtltError(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    if not is_integer(num_classes) or num_classes < 2:
        raise OtltError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return factory
