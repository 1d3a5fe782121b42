"""Precise BatchNorm: running statistics recomputed as exact averages over chosen batches.

A network trained with BatchNorm predicts with the running mean/variance its layers kept,
an exponential average (momentum 0.1) over roughly the last 20 training batches. For a
mixing run those batches are partly mixed and partly clean, so what the network predicts
at evaluation depends on which batches happened to come last (the README's "Evaluation
protocol"). :func:`recalibrate_batchnorm` replaces that accident by a defined procedure
(precise BN: Wu and Johnson, "Rethinking 'Batch' in BatchNorm", arXiv:2105.07576, 2021;
MiSLAS's shifted BN is the class-balanced variant: Zhong et al., "Improving Calibration for
Long-Tailed Recognition", CVPR 2021): reset every BatchNorm layer and set, per channel ``c``,

    running_mean_c = (1/N) Σ_n  mean_c(batch n)
    running_var_c  = (1/N) Σ_n  var_c(batch n)      (unbiased, as BatchNorm stores it)

over ``N`` batches, which is PyTorch's cumulative average (``momentum=None``): the ``n``-th
batch moves the statistics by ``1/n``. That factor is set on the host from each layer's own
call count (``momentum = 1/n`` by a forward pre-hook, the same Python float), not read from its
``num_batches_tracked`` as ``momentum=None`` does, a host-device synchronisation per layer and
batch on a GPU; the statistics are bit for bit the same, also for a layer called several times
per forward. Only the
BatchNorm layers run in train mode; every other module stays in eval mode, nothing gets a
gradient, and the affine parameters are untouched. Under ``torch.distributed`` each rank's
averages are averaged over ranks (every rank recalibrates on its rows of the same global
batches).

Where the evaluation-time BatchNorm statistics come from (``eval.bn_stats``):

- ``running``: as the last training batches left them (no recalibration);
- ``train``: batches drawn as the run trains (its mixer with ``mix.prob``, its partner
  sampler, OTmix's current confusion matrix); the same as ``clean`` for a run without mixer;
- ``clean``: clean augmented batches of the long-tailed training set;
- ``balanced``: clean augmented batches from the class-balanced sampler (MiSLAS's shifted BN).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from otlt.amp import autocast
from otlt.data.samplers import permutation_batches, sample_weights
from otlt.engine.distributed import all_reduce_sum, is_distributed, world_size
from otlt.engine.stacked_bn import block_statistics, stackable
from otlt.errors import require


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (1-, 2- and 3-d, and SyncBatchNorm)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every BatchNorm buffer (running mean/var, batch count), by state-dict key."""
    layers = {id(m) for m in batchnorm_layers(model)}
    out = {}
    for name, module in model.named_modules():
        if id(module) in layers:
            for key, buf in module.named_buffers(recurse=False):
                out[f"{name}.{key}" if name else key] = buf.detach().clone()
    return out


def statistics_gap(state: dict[str, torch.Tensor],
                   reference: dict[str, torch.Tensor]) -> dict[str, float]:
    """How far two states of :func:`batchnorm_state` are apart, scale-free, as the largest
    over layers of ``mean``: ``‖μ − μ_ref‖ / ‖σ_ref‖`` (the means' difference in units of the
    reference's standard deviations ``σ_ref = sqrt(running_var_ref)``; a mean near 0 makes a
    plain relative difference meaningless) and ``var``: ``‖σ² − σ²_ref‖ / ‖σ²_ref‖``."""
    gaps = {"mean": 0.0, "var": 0.0}
    for key, var_ref in reference.items():
        if not key.endswith("running_var"):
            continue
        prefix = key[: -len("running_var")]
        var_ref = var_ref.double()
        mean_gap = (state[prefix + "running_mean"].double()
                    - reference[prefix + "running_mean"].double()).norm() / var_ref.sqrt().norm()
        var_gap = (state[key].double() - var_ref).norm() / var_ref.norm()
        gaps = {"mean": max(gaps["mean"], float(mean_gap)), "var": max(gaps["var"], float(var_gap))}
    return gaps


def load_batchnorm_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy buffers saved by :func:`batchnorm_state` back into ``model`` in place."""
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        for key, value in state.items():
            buffers[key].copy_(value)


@contextmanager
def preserved_batchnorm(model: nn.Module) -> Iterator[None]:
    """Restore ``model``'s BatchNorm buffers on exit, whatever ran inside."""
    saved = batchnorm_state(model)
    try:
        yield
    finally:
        load_batchnorm_state(model, saved)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor], *,
                          amp_dtype: torch.dtype | None = None,
                          channels_last: bool = False, stack: int = 1) -> int:
    """Set ``model``'s BatchNorm running statistics to exact averages over ``batches``.

    ``batches`` yields float inputs ``(B, C, H, W)`` already on the model's device. Runs
    under ``amp_dtype`` autocast (None: off) and, if asked, channels-last, as training does.
    Changes ``model`` in place (call it on a copy, or inside :func:`preserved_batchnorm`,
    to leave a training model alone); its train/eval mode is restored. Returns the number
    of batches seen (0 leaves the statistics as they were).

    ``stack > 1`` runs up to ``stack`` successive batches of one shape as one forward
    (:mod:`otlt.engine.stacked_bn`: the same statistics up to rounding, a ``stack``-th of
    the kernel launches); a model with synchronised BatchNorm layers goes batch by batch.
    """
    require(isinstance(stack, int) and stack >= 1, f"stack must be a positive integer, "
                                                   f"got {stack!r}")
    layers = batchnorm_layers(model)
    if not layers:
        return 0
    was_training = model.training
    saved = batchnorm_state(model)
    momenta = [m.momentum for m in layers]
    model.eval()
    for m in layers:
        m.reset_running_stats()
        m.train()
    try:
        if stack > 1 and stackable(layers):
            count = _stacked_passes(model, layers, batches, stack, amp_dtype, channels_last)
        else:
            count = _batch_passes(model, layers, batches, amp_dtype, channels_last)
    finally:
        for m, momentum in zip(layers, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
    if count == 0:
        load_batchnorm_state(model, saved)
        return 0
    if is_distributed():
        _average_over_ranks(layers)
    return count


def _forward(model: nn.Module, x: torch.Tensor, amp_dtype: torch.dtype | None,
             channels_last: bool) -> None:
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with autocast(x.device, amp_dtype):
        model(x)


def _batch_passes(model: nn.Module, layers: list[_BatchNorm], batches: Iterable[torch.Tensor],
                  amp_dtype: torch.dtype | None, channels_last: bool) -> int:
    """One forward per batch, each layer's momentum ``1/n`` at its ``n``-th call."""
    hooks = [m.register_forward_pre_hook(_cumulative_momentum(m)) for m in layers]
    count = 0
    try:
        for x in batches:
            _forward(model, x, amp_dtype, channels_last)
            count += 1
    finally:
        for hook in hooks:
            hook.remove()
    return count


def _stacked_passes(model: nn.Module, layers: list[_BatchNorm],
                    batches: Iterable[torch.Tensor], stack: int,
                    amp_dtype: torch.dtype | None, channels_last: bool) -> int:
    """One forward per run of at most ``stack`` successive batches of one shape."""
    count = 0
    with block_statistics(layers) as blocks:
        for group in _groups(batches, stack):
            blocks[0] = len(group)
            _forward(model, group[0] if len(group) == 1 else torch.cat(group), amp_dtype,
                     channels_last)
            count += len(group)
    return count


def _groups(batches: Iterable[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    """Successive batches in lists of at most ``size``, a new list at a change of shape."""
    group: list[torch.Tensor] = []
    for x in batches:
        if group and (len(group) == size or x.shape != group[0].shape):
            yield group
            group = []
        group.append(x)
    if group:
        yield group


def _cumulative_momentum(layer: _BatchNorm):
    """A forward pre-hook that sets ``layer.momentum`` to ``1/n`` at its ``n``-th call: what
    ``momentum=None`` computes from ``num_batches_tracked``, counted on the host instead."""
    calls = 0

    def hook(module: nn.Module, inputs: object) -> None:
        nonlocal calls
        calls += 1
        layer.momentum = 1.0 / calls

    return hook


_BN_SEED = 0xB47C4  # keeps the recalibration streams apart from seed-derived training ones


def recalibration_generator(seed: int, epoch: int) -> torch.Generator:
    """The recalibration generator of ``epoch``: seeded from (seed, epoch), alike on every
    rank (each draws the global batches and keeps its rows), and separate from the training
    generator, so evaluation never moves training."""
    return torch.Generator().manual_seed(_BN_SEED + 1_000_003 * seed + 1009 * epoch)


def recalibration_indices(mode: str, labels: torch.Tensor, batch_size: int, count: int,
                          generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``count`` training-index batches ``(batch_size,)`` for procedure ``mode``, drawn
    lazily from ``generator``: class-balanced draws with replacement for ``balanced``
    (every class equally likely), else successive random permutations of the training set."""
    if mode == "balanced":
        weights = sample_weights(labels, 0.0)
        return (torch.multinomial(weights, batch_size, replacement=True, generator=generator)
                for _ in range(count))
    return permutation_batches(len(labels), batch_size, count, generator)


def _average_over_ranks(layers: list[_BatchNorm]) -> None:
    world = world_size()
    for m in layers:
        if m.running_mean is None or m.running_var is None:
            continue
        stacked = torch.stack([m.running_mean.float(), m.running_var.float()])
        mean, var = (all_reduce_sum(stacked) / world).to(m.running_mean.dtype)
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


__all__ = ["batchnorm_layers", "batchnorm_state", "load_batchnorm_state",
           "preserved_batchnorm", "recalibrate_batchnorm", "statistics_gap"]
