"""Run a model in float64: parameters, buffers and every input cast on the way in.

``train.float64`` is for numerical checks (a multi-process run against a one-process run,
gradients against finite differences), not for training speed: autocast is off with it.
"""

from __future__ import annotations

import torch
from torch import nn


def to_float64(model: nn.Module) -> nn.Module:
    """Cast ``model`` to float64 in place and make every module with parameters cast its
    floating-point inputs to float64 (so uint8-derived float32 batches, ``model.features``
    and any other entry point work unchanged). Returns the model."""
    model.double()

    def cast(_module: nn.Module, args: tuple) -> tuple:
        return tuple(a.double() if torch.is_tensor(a) and a.is_floating_point() else a
                     for a in args)

    for module in model.modules():
        if any(True for _ in module.parameters(recurse=False)):
            module.register_forward_pre_hook(cast)
    return model
