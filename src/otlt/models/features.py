"""Feature functions for any backbone: what OTmix's cost needs from a model.

:func:`feature_fn` turns a classifier into ``embed(images (N, C, H, W)) -> (N, D)`` float32
features, computed without gradients. It recognises, in this order:

- otlt's models and anything with ``features(x) -> (N, D)`` (a 4-D ``features`` map, as in
  torchvision's MobileNet/EfficientNet/VGG/DenseNet, is average-pooled to ``(N, C)``);
- timm-style models: ``forward_head(forward_features(x), pre_logits=True)``;
- torchvision-style classifiers with a final ``fc``, ``classifier`` or ``head`` module: the
  input of that module, captured by a forward pre-hook during ``model(x)``.

``mode="pooled_eval"`` (ours) runs the model in eval mode, so BatchNorm statistics are left
alone; ``mode="official"`` is the official OTmix code's pass: ``Sequential(children[:-1])``
in train mode, flattened (BatchNorm normalises with batch statistics and its running
statistics move). The model's train/eval mode is restored either way; ``amp_dtype`` runs the
pass under autocast and ``channels_last`` in that memory format. ``graphs=True`` runs the pass
through ``torch.compile(mode="reduce-overhead")`` (CUDA graphs on a GPU, one per input shape,
as ``train.cuda_graphs`` runs the training step): each call begins a new graph iteration and
returns a copy, so a later replay cannot overwrite features a caller still holds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from otlt.amp import autocast
from otlt.errors import OtltError, require_choice

FEATURE_MODES = ("pooled_eval", "official")
HEAD_NAMES = ("fc", "classifier", "head")

Embed = Callable[[torch.Tensor], torch.Tensor]


def _head(model: nn.Module) -> nn.Module | None:
    for name in HEAD_NAMES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):
            return module
    return None


def _raw_features(model: nn.Module) -> Embed:
    """The model's penultimate features as a callable (no mode, autocast or layout)."""
    features = getattr(model, "features", None)
    if callable(features) and not isinstance(features, nn.Sequential):
        return lambda x: _pooled(features(x))
    if hasattr(model, "forward_features") and hasattr(model, "forward_head"):
        return lambda x: model.forward_head(model.forward_features(x), pre_logits=True)
    if isinstance(features, nn.Sequential):  # torchvision: a feature map, then a classifier
        return lambda x: _pooled(features(x))
    head = _head(model)
    if head is not None:
        return lambda x: _head_input(model, head, x)
    raise OtltError(f"cannot take features from {type(model).__name__}: it needs "
                    "features(x) -> (N, D), timm's forward_features + forward_head, or a final "
                    f"module named one of {', '.join(HEAD_NAMES)}; or pass embed= yourself")


def has_features(model: nn.Module) -> bool:
    """Whether :func:`feature_fn` recognises ``model`` (``features``, timm's pair, or a
    final ``fc`` / ``classifier`` / ``head`` module); nothing is run."""
    try:
        _raw_features(model)
    except OtltError:
        return False
    return True


def _pooled(z: torch.Tensor) -> torch.Tensor:
    return z.mean(dim=tuple(range(2, z.dim()))) if z.dim() > 2 else z


def _head_input(model: nn.Module, head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    if not captured:
        name = next(n for n in HEAD_NAMES if getattr(model, n, None) is head)
        raise OtltError(f"cannot take features from {type(model).__name__}: its .{name} module "
                        "was never called by forward(), so its input is not the features; "
                        "give the model features(x) -> (N, D) or pass embed= yourself")
    return captured[0]


def feature_fn(model: nn.Module, mode: str = "pooled_eval",
               amp_dtype: torch.dtype | None = None, channels_last: bool = False,
               graphs: bool = False) -> Embed:
    """Return ``embed(images) -> (N, D)`` float32 features of ``model`` (module docstring)."""
    require_choice("feature mode", mode, FEATURE_MODES)
    if mode == "official":
        body = nn.Sequential(*list(model.children())[:-1])
        raw = body
    else:
        raw = _raw_features(model)
    run = torch.compile(raw, mode="reduce-overhead", dynamic=False) if graphs else raw

    @torch.no_grad()
    def embed(images: torch.Tensor) -> torch.Tensor:
        was_training = model.training
        model.train(mode == "official")
        x = images.contiguous(memory_format=torch.channels_last) if channels_last \
            and images.dim() == 4 else images
        try:
            if graphs:
                torch.compiler.cudagraph_mark_step_begin()
            with autocast(x.device, amp_dtype):
                z = run(x).flatten(1)
            # a graph's output lives in its memory pool, which the next replay overwrites
            return z.to(torch.float32, copy=True) if graphs else z.float()
        finally:
            model.train(was_training)

    return embed


__all__ = ["FEATURE_MODES", "Embed", "feature_fn", "has_features"]
