"""Long-tailed dataset construction with balanced validation and meta carve-outs.

CIFAR-LT (Cao et al. 2019, used by both OT papers): class ``k`` keeps
``n_k = int(n_max * (1/phi) ** (k / (K - 1)))`` images ("exp" profile), or ``n_max`` for
the first half of the classes and ``int(n_max / phi)`` for the rest ("step" profile).

The head class of CIFAR-10-LT uses all 5,000 of its images, so a balanced validation or meta
split cannot be "what is left over": :func:`build_splits` carves ``val_per_class`` and then
``meta_per_class`` images out of *every* class first, then draws the long-tailed training
set from the remaining pool, with each class count capped by its pool size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from otlt.config import PROFILES
from otlt.errors import require, require_choice


def long_tailed_counts(num_classes: int, n_max: int, imbalance_ratio: float,
                       profile: str = "exp") -> list[int]:
    """Return the per-class image counts of a long-tailed profile.

    Args:
        num_classes: K.
        n_max: size of the largest class.
        imbalance_ratio: phi = n_max / n_min, >= 1 (phi = 1 gives the balanced dataset).
        profile: "exp" (``n_max * phi^(-k/(K-1))``, truncated) or "step" (first ``K // 2``
            classes keep ``n_max``, the rest ``int(n_max / phi)``).

    >>> long_tailed_counts(10, 5000, 100)
    [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    """
    require(num_classes >= 1, f"num_classes must be >= 1, got {num_classes}")
    require(n_max >= 1, f"n_max must be >= 1, got {n_max}")
    require(imbalance_ratio >= 1, f"imbalance ratio must be >= 1, got {imbalance_ratio}")
    require_choice("profile", profile, PROFILES)
    if profile == "exp":
        if num_classes == 1:
            return [n_max]
        inv = 1.0 / imbalance_ratio
        counts = [int(n_max * inv ** (k / (num_classes - 1))) for k in range(num_classes)]
    else:  # "step"
        half = num_classes // 2
        counts = [n_max] * half + [int(n_max / imbalance_ratio)] * (num_classes - half)
    empty = [k for k, c in enumerate(counts) if c == 0]
    require(not empty, f"n_max={n_max} with imbalance ratio {imbalance_ratio:g} leaves "
                       f"class(es) {empty} without a training image (the rarest class gets "
                       f"n_max / ratio): raise n_max to at least {math.ceil(imbalance_ratio)} "
                       f"or lower the ratio")
    return counts


@dataclass
class SplitIndices:
    """Indices into the source training split (the test split is used whole).

    Attributes:
        train: long-tailed training indices, ``(N_train,)`` int64, sorted.
        val: balanced validation indices, ``val_per_class`` per class.
        meta: balanced meta indices, ``meta_per_class`` per class (OT re-weighting).
        train_counts: ``(K,)`` images per class in ``train``.
        shortfall: ``(K,)`` training images the profile asked of each class and the class
            did not hold after the carve-out (``target_k - train_counts[k]``, at least 0).
    """

    train: np.ndarray
    val: np.ndarray
    meta: np.ndarray
    train_counts: list[int]
    shortfall: list[int]


def build_splits(labels: np.ndarray, num_classes: int, *, imbalance_ratio: float,
                 n_max: int, profile: str = "exp", val_per_class: int = 0,
                 meta_per_class: int = 0, data_seed: int = 0) -> SplitIndices:
    """Carve balanced val/meta splits from every class, then subsample the long tail.

    Each class's indices are shuffled by a ``torch.Generator`` seeded with ``data_seed``
    (one permutation per class, in class order); the first ``val_per_class`` go to
    validation, the next ``meta_per_class`` to meta, and the first
    ``min(n_k, pool_k)`` of the rest to training. The three sets are disjoint by
    construction.
    """
    labels = np.asarray(labels)
    available = np.bincount(labels, minlength=num_classes)
    carve = val_per_class + meta_per_class
    require(int(available.min()) > carve,
            f"class {int(available.argmin())} has {int(available.min())} images, too few to "
            f"carve {val_per_class} validation + {meta_per_class} meta images per class")
    targets = long_tailed_counts(num_classes, n_max, imbalance_ratio, profile)
    gen = torch.Generator().manual_seed(data_seed)
    train, val, meta, counts = [], [], [], []
    for k in range(num_classes):
        members = np.flatnonzero(labels == k)
        order = members[torch.randperm(len(members), generator=gen).numpy()]
        val.append(order[:val_per_class])
        meta.append(order[val_per_class:carve])
        pool = order[carve:]
        take = min(targets[k], len(pool))
        train.append(pool[:take])
        counts.append(take)
    return SplitIndices(np.sort(np.concatenate(train)), np.sort(np.concatenate(val)),
                        np.sort(np.concatenate(meta)), counts,
                        [t - c for t, c in zip(targets, counts, strict=True)])
