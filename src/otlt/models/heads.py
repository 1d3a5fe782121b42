"""Classification heads: the cosine ``NormedLinear`` head of LDAM-DRW.

``NormedLinear`` (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
Margin Loss", NeurIPS 2019, official code ``models/resnet_cifar.py``) outputs the cosine
similarity between a feature and every class weight, so its logits lie in ``[-1, 1]``; the
LDAM loss multiplies them by a scale ``s = 30`` before the softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class NormedLinear(nn.Module):
    """Cosine classifier: ``out[b, k] = <x_b / |x_b|, W[:, k] / |W[:, k]|>``.

    The weight is stored as ``(D, K)`` (transposed compared with ``nn.Linear``) to match
    the LDAM-DRW code and its checkpoints. Input ``(B, D)``, output ``(B, K)`` in ``[-1, 1]``.
    There is no bias.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(in_features, out_features))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Draw ``W ~ U(-1, 1)`` and rescale every column to unit norm, as LDAM-DRW does."""
        self.weight.uniform_(-1.0, 1.0, generator=generator)
        # LDAM-DRW writes this as renorm_(2, 1, 1e-5).mul_(1e5); dividing by the norm is the
        # same except that it cannot overflow for a column that happens to be tiny.
        self.weight.div_(self.weight.norm(dim=0, keepdim=True).clamp_min(1e-12))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the cosines ``(B, K)`` between the features ``x`` ``(B, D)`` and the classes."""
        return F.normalize(x, dim=1) @ F.normalize(self.weight, dim=0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def make_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    """Build the final layer: ``"linear"`` (``nn.Linear`` with bias) or ``"cosine"``."""
    if kind == "cosine":
        return NormedLinear(in_features, num_classes)
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    raise ValueError(f"unknown head {kind!r}")


@torch.no_grad()
def reset_linear_default(layer: nn.Linear, generator: torch.Generator | None = None) -> None:
    """Re-draw an ``nn.Linear`` with PyTorch's default init, ``U(-1/sqrt(D), 1/sqrt(D))``.

    Same distribution as ``nn.Linear.reset_parameters`` (whose ``kaiming_uniform_`` with
    ``a = sqrt(5)`` reduces to this bound), but drawn from ``generator``.
    """
    bound = 1.0 / math.sqrt(layer.in_features)
    layer.weight.uniform_(-bound, bound, generator=generator)
    if layer.bias is not None:
        layer.bias.uniform_(-bound, bound, generator=generator)
