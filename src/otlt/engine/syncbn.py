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
:class:`torch.nn.BatchNorm2d`. Sums, statistics and ``x̂`` are float32 (float64 for float64
input) under any autocast dtype; ``y`` and ``∂L/∂x`` come back in the input's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from otlt.errors import OtltError


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # In float32 at least: bf16 sums lose ~1% of the variance, fp16's Σx² overflows.
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        channels = x.shape[1]
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        count = torch.tensor([x.numel() / channels], dtype=xf.dtype, device=x.device)
        stats = torch.cat([xf.sum(dims), (xf * xf).sum(dims), count])
        dist.all_reduce(stats)
        n = stats[-1]
        mean = stats[:channels] / n
        var = (stats[channels:2 * channels] / n - mean * mean).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        xhat = (xf - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(x, weight, mean, invstd, n)  # x̂ is recomputed from x
        ctx.dims, ctx.shape = dims, shape
        y = xhat * weight.view(shape) + bias.view(shape)
        return y.to(x.dtype), mean, var * n / (n - 1).clamp_min(1)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor, _grad_mean: Any,
                 _grad_var: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        x, weight, mean, invstd, n = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        xhat = (x.to(mean.dtype) - mean.view(shape)) * invstd.view(shape)
        g = grad_y.to(mean.dtype)
        local_dy = g.sum(dims)
        local_dy_xhat = (g * xhat).sum(dims)
        sums = torch.cat([local_dy, local_dy_xhat])
        dist.all_reduce(sums)
        sum_dy, sum_dy_xhat = sums.chunk(2)
        grad_x = (weight * invstd).view(shape) * (
            g - (sum_dy / n).view(shape) - xhat * (sum_dy_xhat / n).view(shape))
        return (grad_x.to(x.dtype), local_dy_xhat.to(weight.dtype), local_dy.to(weight.dtype),
                None)


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


_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``train.sync_bn``: replace every plain :class:`torch.nn.BatchNorm1d`/``2d``/``3d``
    in ``module`` by :class:`torch.nn.SyncBatchNorm` (``device_type == "cuda"``) or by
    :class:`GlobalBatchNorm2d` (any other device: 2d only), keeping the very parameter and
    buffer tensors (like ``SyncBatchNorm.convert_sync_batchnorm``); returns the converted
    module (in place where possible).

    Layers already synchronised stay synchronised (``GlobalBatchNorm2d`` untouched; on CUDA,
    after the check, the conversion is torch's own, which rebuilds ``SyncBatchNorm`` layers on
    the same tensors). Any other BatchNorm subclass (timm's ``BatchNormAct2d`` adds an activation in
    its ``forward``, which a conversion would drop), and what the device's layer cannot do,
    raise :class:`OtltError` naming the module; the model is checked before anything changes.
    """
    for name, child in module.named_modules():
        _check_convertible(f"model.{name}" if name else "model", child, device_type)
    if device_type == "cuda":  # only plain layers (or SyncBatchNorm) are left: torch's own
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_global(module)


def _check_convertible(path: str, child: nn.Module, device_type: str) -> None:
    kind = type(child)
    if not isinstance(child, _BatchNorm) or kind is GlobalBatchNorm2d:
        return
    if kind is nn.SyncBatchNorm and device_type == "cuda":
        return
    why = None
    if kind is nn.SyncBatchNorm:
        why = f"torch's SyncBatchNorm runs on CUDA only, not on {device_type}"
    elif kind not in _PLAIN:
        why = "only torch.nn.BatchNorm1d/2d/3d are converted"
    elif device_type != "cuda" and kind is not nn.BatchNorm2d:
        why = f"on {device_type} only torch.nn.BatchNorm2d is converted (SyncBatchNorm needs CUDA)"
    elif device_type != "cuda" and not (child.affine and child.track_running_stats):
        why = f"on {device_type} it needs affine=True and track_running_stats=True"
    if why:
        raise OtltError(f"train.sync_bn cannot synchronise {path} ({kind.__name__}): {why}; "
                        "set train.sync_bn=false (BatchNorm buffers are then averaged over "
                        "ranks after every epoch) or use plain BatchNorm layers")


def _convert_global(module: nn.Module) -> nn.Module:
    """Every (checked) ``nn.BatchNorm2d`` to a :class:`GlobalBatchNorm2d` on the same tensors."""
    if type(module) is nn.BatchNorm2d:
        new = GlobalBatchNorm2d(module.num_features, module.eps, module.momentum,
                                module.affine, module.track_running_stats)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var = module.running_mean, module.running_var
        new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_global(child))
    return module
