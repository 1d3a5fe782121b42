"""Class-weighted sampling of the foreground distribution ``Q_fore`` (OTmix eq. 3, CMO).

Notation (OTmix paper, section 4, eq. 3), for class sizes ``n_k`` and smoothing ``r``:

* class draw probability  ``q_k = n_k^{-r} / sum_j n_j^{-r}``  (classes with ``n_k = 0`` get 0),
* per-sample weight       ``w_i = q_{y_i} / n_{y_i}``           (so ``sum_{i: y_i = k} w_i = q_k``).

``r = 1`` is inverse class frequency (the paper's setting), ``r = 1/2`` the smoothed version,
``r = 0`` draws every class equally often and ``r = -1`` is the uniform distribution over
images (the ordinary shuffled loader).

The official CMO and OTmix code use a different parametrisation: ``weighted_alpha = a`` gives
every *image* the weight ``n_k^{-a}``, so a class is drawn with probability proportional to
``n_k^{1-a}``. Their default ``a = 1`` is therefore ``r = 0`` here (class-balanced), and the
paper's ``r = 1`` is ``a = 2`` there. In general ``r = a - 1``.

All draws are with replacement through :func:`torch.multinomial` and a CPU
:class:`torch.Generator`; nothing touches the global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from otlt.errors import OtltError, require

__all__ = [
    "permutation_batches",
    "ClassWeightedSampler",
    "DistributedClassWeightedSampler",
    "class_sampling_probs",
    "draw_class_weighted",
    "epoch_seed",
    "sample_weights",
]

LabelsLike = Sequence[int] | np.ndarray | torch.Tensor


def _as_counts(class_counts: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64).flatten()
    require(counts.numel() > 0, "class_counts is empty; expected one count per class")
    require(bool(torch.all(counts >= 0)), f"class_counts must be >= 0, got {counts.tolist()}")
    require(bool(counts.sum() > 0), "class_counts are all 0; expected at least one image")
    return counts


def _as_labels(labels: LabelsLike) -> torch.Tensor:
    array = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    require(array.ndim == 1 and array.size > 0,
            f"labels must be a non-empty 1-D sequence of class indices, got shape {array.shape}")
    require(np.issubdtype(array.dtype, np.integer),
            f"labels must be integer class indices, got dtype {array.dtype}")
    require(int(array.min()) >= 0, f"labels must be >= 0, got minimum {int(array.min())}")
    return torch.as_tensor(array, dtype=torch.long)


def class_sampling_probs(class_counts: Sequence[int] | np.ndarray | torch.Tensor,
                         r: float = 1.0) -> torch.Tensor:
    """Return the class draw probabilities ``q_k ∝ n_k^{-r}`` of OTmix eq. 3, ``(K,)`` float64.

    Classes with ``n_k = 0`` get ``q_k = 0``. ``r = 1``: inverse frequency, ``r = 1/2``:
    smoothed, ``r = 0``: class-uniform, ``r = -1``: proportional to class size.
    """
    require(math.isfinite(r), f"r must be a finite number, got {r}")
    counts = _as_counts(class_counts)
    present = counts > 0
    # Work in log space so that large counts with large r neither overflow nor underflow.
    log_q = torch.full_like(counts, -math.inf)
    log_q[present] = -r * torch.log(counts[present])
    return torch.softmax(log_q, dim=0)


def sample_weights(labels: LabelsLike, r: float = 1.0) -> torch.Tensor:
    """Return the per-image weights ``w_i = q_{y_i} / n_{y_i}``, ``(N,)`` float64 summing to 1.

    Drawing image ``i`` with probability ``w_i`` draws class ``k`` with probability ``q_k``
    (:func:`class_sampling_probs`).
    """
    y = _as_labels(labels)
    counts = torch.bincount(y).to(torch.float64)
    q = class_sampling_probs(counts, r)
    per_image = torch.zeros_like(q)
    present = counts > 0
    per_image[present] = q[present] / counts[present]
    return per_image[y]


def draw_class_weighted(weights: torch.Tensor, n: int,
                        generator: torch.Generator) -> torch.Tensor:
    """Draw ``n`` indices in ``[0, N)`` with replacement, ``P(i) ∝ weights[i]``; ``(n,)`` long.

    ``weights`` is ``(N,)``, non-negative, on the generator's device (normally the CPU).
    """
    require(n >= 1, f"number of draws must be >= 1, got {n}")
    if weights.ndim != 1 or weights.numel() == 0:
        raise ValueError("weights must be a non-empty 1-D tensor, "
                         f"got shape {tuple(weights.shape)}")
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def epoch_seed(seed: int, epoch: int) -> int:
    """Return a 32-bit generator seed hashed from ``(seed, epoch)``.

    torch's CPU generator keeps only the low 32 bits of its seed, so packing the pair into one
    64-bit number (``seed << 32 | epoch``) would ignore ``seed``; numpy's ``SeedSequence``
    (no global state) mixes both into 32 well-spread bits instead.
    """
    require(seed >= 0 and epoch >= 0, f"seed and epoch must be >= 0, got {seed}, {epoch}")
    return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


class ClassWeightedSampler(Sampler[int]):
    """Sample dataset indices with replacement so that class ``k`` is drawn with prob. ``q_k``.

    ``q_k ∝ n_k^{-r}`` (:func:`class_sampling_probs`). Each epoch draws ``num_samples``
    indices (default: the dataset size) from a generator seeded by ``(seed, epoch)``, so a
    run is reproducible and every epoch differs; call :meth:`set_epoch` before iterating.
    """

    def __init__(self, labels: LabelsLike, r: float = 1.0, num_samples: int | None = None,
                 seed: int = 0) -> None:
        self.weights = sample_weights(labels, r)
        self.r = float(r)
        self.num_samples = len(self.weights) if num_samples is None else int(num_samples)
        require(self.num_samples >= 1, f"num_samples must be >= 1, got {num_samples}")
        require(seed >= 0, f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose draw the next iteration yields."""
        require(epoch >= 0, f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def _full_draw(self, total: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return draw_class_weighted(self.weights, total, generator)

    def epoch_indices(self) -> torch.Tensor:
        """Return this epoch's indices, ``(len(self),)`` long, the ones ``iter`` yields."""
        return self._full_draw(self.num_samples)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices().tolist())

    def __len__(self) -> int:
        return self.num_samples


class DistributedClassWeightedSampler(ClassWeightedSampler):
    """Give each of ``num_replicas`` ranks a disjoint, equal share of one class-weighted draw.

    Every rank computes the same draw of ``total = ceil(num_samples / num_replicas) *
    num_replicas`` indices from ``(seed, epoch)`` and keeps positions ``rank::num_replicas``.
    With ``num_replicas = 1`` it yields exactly what :class:`ClassWeightedSampler` yields.
    ``num_replicas`` and ``rank`` default to the initialised ``torch.distributed`` group.
    """

    def __init__(self, labels: LabelsLike, r: float = 1.0, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0,
                 num_samples: int | None = None) -> None:
        super().__init__(labels, r=r, num_samples=num_samples, seed=seed)
        if num_replicas is None or rank is None:
            if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
                raise OtltError("num_replicas and rank are required when torch.distributed "
                                "is not initialised")
            num_replicas = torch.distributed.get_world_size() if num_replicas is None \
                else num_replicas
            rank = torch.distributed.get_rank() if rank is None else rank
        require(num_replicas >= 1, f"num_replicas must be >= 1, got {num_replicas}")
        require(0 <= rank < num_replicas, f"rank must be in [0, {num_replicas}), got {rank}")
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.total_size = math.ceil(self.num_samples / self.num_replicas) * self.num_replicas

    def full_draw(self) -> torch.Tensor:
        """Return the draw shared by all ranks this epoch, ``(total_size,)`` long."""
        return self._full_draw(self.total_size)

    def epoch_indices(self) -> torch.Tensor:
        """Return this rank's share of the epoch's draw, ``(len(self),)`` long."""
        return self.full_draw()[self.rank::self.num_replicas]

    def __len__(self) -> int:
        return self.total_size // self.num_replicas


def permutation_batches(n: int, batch_size: int, count: int,
                        generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``count`` index batches ``(min(batch_size, n),)`` cut from successive random
    permutations of ``range(n)`` (a permutation's short last chunk is skipped)."""
    require(n >= 1, f"cannot draw batches from an empty set (n={n})")
    batch_size = min(batch_size, n)
    made = 0
    while made < count:
        for chunk in torch.randperm(n, generator=generator).split(batch_size):
            if len(chunk) < batch_size or made == count:
                break
            yield chunk
            made += 1
