"""Evaluation metrics: confusion matrix, per-class and many/medium/few-shot accuracy.

Conventions: ``confusion[i, j]`` counts test samples of true class ``i`` predicted as
``j`` (rows = truth, columns = prediction). Errors and accuracies in :func:`summarize` are
percentages. Shot groups follow LDAM-DRW / OTmix: a class is *many*-shot with more than 100
training images, *medium* with 20 to 100 (both ends included), *few* with fewer than 20.

A group's accuracy is ``correct / total`` over the group's test samples. On a balanced test
set (CIFAR-LT, ImageNet-LT) that equals the mean of the group's per-class accuracies, the
number the papers report; on an unbalanced test set it weights classes by their test size.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from otlt.errors import OtltError

SHOT_GROUPS: tuple[str, ...] = ("many", "medium", "few")


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Count ``(true, predicted)`` pairs: ``(N,), (N,) -> (K, K)`` int64 on the inputs' device.

    Raises :class:`OtltError` when a label or prediction lies outside ``[0, K)``.
    """
    if preds.shape != targets.shape or preds.dim() != 1:
        raise ValueError(f"preds and targets must both be (N,), got {preds.shape}, {targets.shape}")
    if preds.is_floating_point() or targets.is_floating_point():
        raise ValueError("preds and targets must be integer class indices")
    k = num_classes
    preds = preds.to(device=targets.device, dtype=torch.long)
    targets = targets.to(torch.long)
    if preds.numel() > 0:
        lo = torch.minimum(preds.min(), targets.min())
        hi = torch.maximum(preds.max(), targets.max())
        lo_i, hi_i = int(lo), int(hi)  # one device sync per call, worth it: bad labels corrupt rows
        if lo_i < 0 or hi_i >= k:
            raise OtltError(
                f"class index out of range: found {lo_i if lo_i < 0 else hi_i}, "
                f"expected 0..{k - 1} for num_classes={k}"
            )
    return torch.bincount(targets * k + preds, minlength=k * k).view(k, k)


def per_class_accuracy(confusion: torch.Tensor) -> torch.Tensor:
    """Return the per-class accuracy ``diag(C) / C.sum(1)``, ``(K,)`` float64 fractions.

    A class with no test samples gets NaN.
    """
    c = confusion.to(torch.float64)
    return c.diagonal() / c.sum(dim=1)


def shot_groups(
    train_counts: Sequence[int] | torch.Tensor, many: int = 100, few: int = 20
) -> dict[str, list[int]]:
    """Split class indices by training-set size ``n``.

    many: ``n > many``; medium: ``few <= n <= many``; few: ``n < few``.
    """
    if few > many + 1:
        raise OtltError(f"shot thresholds need few <= many + 1, got few={few}, many={many}")
    counts = _as_int_list(train_counts)
    return {
        "many": [k for k, n in enumerate(counts) if n > many],
        "medium": [k for k, n in enumerate(counts) if few <= n <= many],
        "few": [k for k, n in enumerate(counts) if n < few],
    }


def summarize(
    confusion: torch.Tensor,
    train_counts: Sequence[int] | torch.Tensor,
    many: int = 100,
    few: int = 20,
) -> dict[str, Any]:
    """Turn a confusion matrix ``(K, K)`` into the JSON-ready metrics dictionary.

    Keys: ``top1_error``, ``top1_accuracy``, ``many_error``, ``medium_error``,
    ``few_error`` (percent; ``None`` for a group with no test samples), ``per_class_accuracy``
    (percent, ``None`` for a class with no test samples), ``confusion_matrix`` (nested list),
    ``class_counts_train``, ``groups`` (class indices per group), ``num_samples`` and
    ``shot_thresholds``.
    """
    k = _check_square(confusion)
    counts = _as_int_list(train_counts)
    if len(counts) != k:
        raise OtltError(f"train_counts has {len(counts)} classes, the confusion matrix has {k}")
    conf = confusion.detach().to("cpu", torch.long)
    total = int(conf.sum())
    if total == 0:
        raise OtltError("cannot summarise an empty evaluation: the confusion matrix is all zeros")
    correct = int(conf.diagonal().sum())
    groups = shot_groups(counts, many=many, few=few)
    result: dict[str, Any] = {
        "top1_accuracy": 100.0 * correct / total,
        "top1_error": 100.0 * (total - correct) / total,
    }
    for name, classes in groups.items():
        result[f"{name}_error"] = _group_error(conf, classes)
    result["per_class_accuracy"] = [
        None if math.isnan(a) else 100.0 * a for a in per_class_accuracy(conf).tolist()
    ]
    result["confusion_matrix"] = conf.tolist()
    result["class_counts_train"] = counts
    result["groups"] = groups
    result["num_samples"] = total
    result["shot_thresholds"] = {"many": many, "few": few}
    return result


def row_normalized_confusion(
    confusion: torch.Tensor, zero_diagonal: bool = False, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Return ``F̂[i, j] = C[i, j] / sum_j C[i, j]`` ``(K, K)``, optionally with ``diag(F̂) = 0``.

    Rows sum to 1 before the diagonal is zeroed; a row with no samples stays all zero.
    OTmix's cost (eq. 3) uses it with the diagonal zeroed, so same-class pairs cost the most.
    """
    _check_square(confusion)
    c = confusion.to(dtype)
    rows = c.sum(dim=1, keepdim=True)
    out = torch.where(rows > 0, c / rows.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(c))
    if zero_diagonal:
        out.fill_diagonal_(0.0)
    return out


def _group_error(conf: torch.Tensor, classes: list[int]) -> float | None:
    if not classes:
        return None
    rows = conf[classes]
    total = int(rows.sum())
    if total == 0:
        return None
    correct = int(conf[classes, classes].sum())
    return 100.0 * (total - correct) / total


def _check_square(confusion: torch.Tensor) -> int:
    if confusion.dim() != 2 or confusion.shape[0] != confusion.shape[1]:
        raise ValueError(f"confusion matrix must be (K, K), got {tuple(confusion.shape)}")
    return confusion.shape[0]


def _as_int_list(counts: Sequence[int] | torch.Tensor) -> list[int]:
    values = counts.tolist() if isinstance(counts, torch.Tensor) else list(counts)
    out = [int(n) for n in values]
    if any(n < 0 for n in out):
        raise OtltError(f"training class counts must be >= 0, got {out}")
    return out


def select_value(summary: dict[str, Any], metric: str) -> float | None:
    """The checkpoint-selection value of a :func:`summarize` record, in percent.

    ``balanced_acc`` is the mean per-class accuracy (classes with samples); ``top1_acc`` the
    plain accuracy; ``many_acc`` / ``medium_acc`` / ``few_acc`` a group's accuracy (None
    when the group has no samples).
    """
    if metric == "balanced_acc":
        accs = [a for a in summary["per_class_accuracy"] if a is not None]
        return sum(accs) / len(accs) if accs else None
    if metric == "top1_acc":
        return summary["top1_accuracy"]
    group = metric.removesuffix("_acc")
    if f"{group}_error" not in summary:
        raise OtltError(f"unknown selection metric {metric!r}")
    error = summary[f"{group}_error"]
    return None if error is None else 100.0 - error
