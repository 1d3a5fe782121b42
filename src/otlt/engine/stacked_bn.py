"""BatchNorm recalibration of several batches in one forward (``train.bn_stack``).

:func:`otlt.engine.batchnorm.recalibrate_batchnorm` runs one forward per recalibration batch:
``N`` batches of ``B`` rows cost ``N`` launches of every kernel of the network, and on a GPU at
CIFAR sizes those launches, not the arithmetic, are the time (issue 29). Stacked, the ``N``
batches go through the network as one input of ``N·B`` rows, and every BatchNorm layer
normalises each block of ``B`` rows with that block's own statistics. Every other layer of a
network in eval mode (convolutions, linear layers, pooling, activations) treats rows
independently, so each layer sees what ``N`` separate forwards would give it, and the
statistics

    running_mean_c = (1/N) Σ_n  mean_c(block n)
    running_var_c  = (1/N) Σ_n  var_c(block n) · m / (m − 1)     (m: values per channel
                                                                   and block, unbiased)

are PyTorch's cumulative average over the batches, up to floating-point rounding: the
convolutions run at another batch size (a kernel may sum in another order), the block
statistics come from one call of the BatchNorm kernel over the blocks laid out as channels,
and the average is a sum divided by ``N`` where batch by batch moves it by ``1/n`` at the
``n``-th batch. So they agree to a tolerance, not bit for
bit, which is why stacking is a setting (``train.bn_stack``, default 1: the batch-by-batch
path, whose numbers are PyTorch's to the bit) and not the rule.

Inside :func:`block_statistics`, for a layer with input ``x (N·B, C, *S)`` (computed as
:func:`_block_forward` says)::

    x_n = x[n·B:(n+1)·B]                                     (block n, (B, C, *S))
    y_n = (x_n − mean(x_n)) / sqrt(var(x_n) + eps) · γ + β   (per channel, biased var)

A layer called ``k`` times per forward contributes ``k·N`` blocks, as it contributes ``k·N``
calls batch by batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from otlt.errors import require

STACKABLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Layers whose train-mode forward is a function of the block alone. Synchronised layers
(``SyncBatchNorm``, :class:`otlt.engine.syncbn.GlobalBatchNorm2d`) take their statistics over
every rank's rows, so a model that has them recalibrates batch by batch."""


def stackable(layers: list[_BatchNorm]) -> bool:
    """Whether every layer is a plain BatchNorm layer (:data:`STACKABLE`, exact type)."""
    return all(type(m) in STACKABLE for m in layers)


class _Accumulator:
    """Per layer: the sums of block means and unbiased block variances ``(C,)`` (float32,
    float64 for float64 input) and the number of blocks seen."""

    def __init__(self) -> None:
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.blocks = 0

    def add(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """Add ``(N, C)`` block means and unbiased variances."""
        self.blocks += mean.shape[0]
        mean, var = mean.sum(0), var.sum(0)
        self.mean = mean if self.mean is None else self.mean + mean
        self.var = var if self.var is None else self.var + var

    def store(self, layer: _BatchNorm) -> None:
        """Write the averages into ``layer``'s running buffers (a layer never called keeps
        the reset statistics, as batch by batch)."""
        if self.blocks == 0 or layer.running_mean is None or layer.running_var is None:
            return
        layer.running_mean.copy_(self.mean / self.blocks)
        layer.running_var.copy_(self.var / self.blocks)
        if layer.num_batches_tracked is not None:
            layer.num_batches_tracked.fill_(self.blocks)


def _block_forward(layer: _BatchNorm, blocks: list[int], acc: _Accumulator):
    """``layer``'s forward while stacked: ``blocks[0]`` blocks per input (set per forward by
    :func:`block_statistics`' caller), each normalised with its own statistics.

    The blocks become channels: ``x (N·B, C, *S)`` is laid out as ``(B, N·C, *S)`` and goes
    through PyTorch's own train-mode ``batch_norm`` (the fused kernel batch-by-batch
    recalibration runs) with the affine parameters repeated ``N`` times and fresh running
    buffers of size ``N·C`` at momentum 1, which then hold each block's mean and unbiased
    variance exactly as that kernel computes them."""

    def forward(x: torch.Tensor) -> torch.Tensor:
        layer._check_input_dim(x)  # as the layer's own forward does
        count, channels = blocks[0], x.shape[1]
        require(x.shape[0] % count == 0,
                f"a stacked BatchNorm input of {x.shape[0]} rows does not split into "
                f"{count} equal blocks")
        rows, rest = x.shape[0] // count, x.shape[2:]
        as_channels = x.reshape(count, rows, *x.shape[1:]).transpose(0, 1).reshape(
            rows, count * channels, *rest)
        mean = var = None
        if layer.running_mean is not None:
            mean = torch.zeros(count * channels, dtype=layer.running_mean.dtype,
                               device=x.device)
            var = torch.ones_like(mean)
        weight = None if layer.weight is None else layer.weight.repeat(count)
        bias = None if layer.bias is None else layer.bias.repeat(count)
        y = F.batch_norm(as_channels, mean, var, weight, bias, training=True, momentum=1.0,
                         eps=layer.eps)
        del as_channels  # a copy of the input (the stack holds N·B rows of every activation)
        if mean is not None:
            acc.add(mean.view(count, channels), var.view(count, channels))
        out = torch.empty_like(x)  # x's memory format (channels-last stays channels-last)
        out.view(count, rows, *x.shape[1:]).transpose(0, 1).copy_(
            y.view(rows, count, channels, *rest))
        return out

    return forward


@contextmanager
def block_statistics(layers: list[_BatchNorm]) -> Iterator[list[int]]:
    """Within the block, every layer (in train mode) normalises blocks of rows with their own
    statistics and accumulates them; on a clean exit each layer's running buffers hold the
    averages (:class:`_Accumulator`), on an exception they are left as they were. Yields a
    one-item list: set ``[0]`` to the number of blocks of the next forward's input."""
    require(stackable(layers), "stacked recalibration needs plain BatchNorm layers "
                               "(synchronised ones read every rank's rows)")
    blocks = [1]
    accumulators = [_Accumulator() for _ in layers]
    own = [vars(layer).get("forward") for layer in layers]  # an instance forward of its own
    for layer, acc in zip(layers, accumulators, strict=True):
        layer.forward = _block_forward(layer, blocks, acc)  # an instance attribute shadows it
    try:
        yield blocks
        with torch.no_grad():
            for layer, acc in zip(layers, accumulators, strict=True):
                acc.store(layer)
    finally:
        for layer, forward in zip(layers, own, strict=True):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


__all__ = ["STACKABLE", "block_statistics", "stackable"]
