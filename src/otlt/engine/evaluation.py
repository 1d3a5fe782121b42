"""Confusion matrices of a model on a split or on batches (sharded under torch.distributed),
and the per-split accuracy record the trainer logs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from otlt.amp import autocast
from otlt.data.augment import eval_transform
from otlt.engine.distributed import all_reduce_sum, rank, world_size
from otlt.engine.runtime import DeviceSplit
from otlt.errors import OtltError, require
from otlt.metrics import confusion_matrix


def evaluate(model: torch.nn.Module, split: DeviceSplit, num_classes: int, batch_size: int,
             amp_dtype: torch.dtype | None, channels_last: bool) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` on the CPU (rows: true class) of ``model`` on a split.
    Under ``torch.distributed`` each rank evaluates every ``world``-th image and the matrices
    are summed on the split's device (NCCL communicates only CUDA tensors), so every rank
    holds the whole split's matrix."""
    mine = torch.arange(rank(), len(split), world_size(), device=split.labels.device)
    return summed_confusion(model, split_batches(split, batch_size, indices=mine), num_classes,
                            amp_dtype, channels_last)


def summed_confusion(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     num_classes: int, amp_dtype: torch.dtype | None,
                     channels_last: bool) -> torch.Tensor:
    """:func:`evaluate_batches` of this rank's ``batches``, summed over the ranks (on the
    batches' device: NCCL communicates only CUDA tensors) and returned on the CPU."""
    return all_reduce_sum(evaluate_batches(model, batches, num_classes, amp_dtype,
                                           channels_last)).cpu()


def split_batches(split: DeviceSplit, batch_size: int, *, indices: torch.Tensor | None = None,
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Model inputs ``(B, 3, H, W)`` (:func:`~otlt.data.augment.eval_transform`) and labels
    ``(B,)`` of a split on its device, ``batch_size`` at a time, in order (``indices``: only
    those images, e.g. this rank's share)."""
    if indices is None:
        indices = torch.arange(len(split), device=split.labels.device)
    return ((eval_transform(split.images[idx]), split.labels[idx])
            for idx in indices.split(batch_size))


def eval_logits(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                amp_dtype: torch.dtype | None, channels_last: bool,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Logits ``(B, K)`` (autocast dtype) of ``model`` in eval mode, without gradients, with
    each batch's labels, over ``(x (B, 3, H, W) float, y (B,))`` batches already on the
    model's device, laid out as training lays them out; the model's train/eval mode is
    restored when the batches are exhausted (or the iteration is abandoned)."""
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x = x.contiguous(memory_format=torch.channels_last) if channels_last \
                else x.contiguous()
            with torch.no_grad(), autocast(x.device, amp_dtype):
                logits = model(x)
            yield logits, y
    finally:
        model.train(was_training)


def evaluate_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     num_classes: int, amp_dtype: torch.dtype | None,
                     channels_last: bool) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` of ``model`` (:func:`eval_logits`) over ``(x, y)`` batches
    on the model's device; the matrix stays on that device (a collective may sum it there)."""
    preds, labels = [], []
    for logits, y in eval_logits(model, batches, amp_dtype, channels_last):
        preds.append(logits.argmax(1))
        labels.append(y)
    return confusion_matrix(torch.cat(preds), torch.cat(labels), num_classes)


def model_confusion(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor,
                    num_classes: int, batch_size: int = 1000,
                    amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Confusion matrix ``(K, K)`` (rows: true class) of ``model`` on one split, for a plain
    loop: ``images`` as the loaders give them, uint8 ``(N, H, W, 3)`` (normalised with the
    CIFAR statistics, :func:`~otlt.data.augment.eval_transform`), or model inputs, float
    ``(N, C, H, W)``; ``labels`` ``(N,)``. Batches go to the model's device; the matrix comes
    back on the CPU, for :func:`otlt.metrics.summarize` or ``OTMix.end_epoch``."""
    device = next(model.parameters()).device
    if images.dtype == torch.uint8:
        if images.dim() != 4 or images.shape[-1] != 3:
            raise OtltError(f"uint8 images must be (N, H, W, 3), got {tuple(images.shape)}")
        prepare = eval_transform
    elif images.is_floating_point() and images.dim() == 4:
        def prepare(x: torch.Tensor) -> torch.Tensor:
            return x
    else:
        raise OtltError(f"images must be uint8 (N, H, W, 3) or float (N, C, H, W), got "
                        f"{images.dtype} {tuple(images.shape)}")
    require(len(images) == len(labels) > 0, f"model_confusion needs one label per image and "
            f"at least one image, got {len(images)} images and {len(labels)} labels")
    batches = ((prepare(images[i:i + batch_size].to(device)),
                labels[i:i + batch_size].to(device)) for i in range(0, len(labels), batch_size))
    return evaluate_batches(model, batches, num_classes, amp_dtype,
                            channels_last=False).cpu()


def split_record(prefix: str, summary: dict[str, Any]) -> dict[str, Any]:
    """``<prefix>_acc`` and ``<prefix>_{many,medium,few}_acc`` (percent) of a summary."""
    return {f"{prefix}_acc": summary["top1_accuracy"],
            f"{prefix}_many_acc": _acc(summary["many_error"]),
            f"{prefix}_medium_acc": _acc(summary["medium_error"]),
            f"{prefix}_few_acc": _acc(summary["few_error"])}


def _acc(error: float | None) -> float | None:
    return None if error is None else 100.0 - error
