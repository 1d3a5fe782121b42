"""Synchronised BatchNorm on any device: batch statistics over the global batch of all ranks.

torch's :class:`torch.nn.SyncBatchNorm` runs on CUDA only; the engine uses it there. This
module gives ``train.sync_bn`` the same meaning on the CPU (``gloo`` process groups), so a
multi-process run can be checked against a one-process run with the same global batch.

For a BatchNorm layer over channels ``c`` with ranks holding ``x_r`` ``(N_r, C, ...)``::

    n = Σ_r N_r·S,   μ = Σ_r Σ x_r / n,   σ² = Σ_r Σ x_r² / n − μ²   (S: spatial size)
    x̂ = (x − μ) / sqrt(σ² + eps),   y = γ x̂ + β

(one ``all_reduce`` of ``[Σx, Σx², count]``). Backward, with ``g = ∂L/∂y`` and the global
sums ``Σg``, ``Σ g x̂`` (a second ``all_reduce``)::

    ∂L/∂x = γ / sqrt(σ² + eps) · (g − Σg / n − x̂ · Σ g x̂ / n)

``∂L/∂γ = Σ_local g x̂`` and ``∂L/∂β = Σ_local g`` stay per rank: DistributedDataParallel
averages parameter gradients as for any other layer. Running statistics follow
:class:`torch.nn.BatchNorm2d` (momentum, unbiased variance ``σ² n / (n − 1)``), identical on
every rank. In eval mode, or without a process group of several ranks, the layer is plain
:class:`torch.nn.BatchNorm2d`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        dist.all_reduce(stats)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, weight, invstd, n)
        ctx.dims, ctx.shape = dims, shape
        return xhat * weight.view(shape) + bias.view(shape), mean, var * n / (n - 1).clamp_min(1)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, _grad_mean: Any,
                 _grad_var: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        xhat, weight, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        local_dy = grad_y.sum(dims)
        local_dy_xhat = (grad_y * xhat).sum(dims)
        sums = torch.cat([local_dy, local_dy_xhat])
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.chunk(2)
        grad_x = (weight * invstd).view(shape) * (
            grad_y - (sum_dy / n).view(shape) - xhat * (sum_dy_xhat / n).view(shape))
        return grad_x, local_dy_xhat, local_dy, None


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` whose training-mode statistics cover all ranks' batches
    (see the module docstring); any device, any process-group backend."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        synced = (self.training and dist.is_available() and dist.is_initialized()
                  and dist.get_world_size() > 1)
        if not synced:
            return super().forward(x)
        if not (self.affine and self.track_running_stats):
            raise NotImplementedError("GlobalBatchNorm2d needs affine=True and "
                                      "track_running_stats=True")
        y, mean, var = _GlobalBatchNorm.apply(x, self.weight, self.bias, self.eps)
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                        else self.momentum)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_(var.to(self.running_var.dtype), momentum)
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every :class:`torch.nn.BatchNorm2d` in ``module`` by a
    :class:`GlobalBatchNorm2d` with the same parameters and buffers (in place where
    possible; returns the converted module)."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum,
                                module.affine, module.track_running_stats,
                                device=module.running_mean.device,
                                dtype=module.running_mean.dtype)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_global_batchnorm(child))
    return module
