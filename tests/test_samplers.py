"""Tests for the class-weighted foreground sampler (OTmix eq. 3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from otlt.data.samplers import (
    ClassWeightedSampler,
    DistributedClassWeightedSampler,
    class_sampling_probs,
    draw_class_weighted,
    epoch_seed,
    sample_weights,
)
from otlt.errors import OtltError

COUNTS = [500, 150, 50, 10]


def make_labels(counts: list[int]) -> np.ndarray:
    """Return labels with ``counts[k]`` copies of class ``k``, interleaved (not sorted)."""
    labels = np.concatenate([np.full(n, k) for k, n in enumerate(counts)])
    return labels[np.random.default_rng(0).permutation(len(labels))]


@pytest.mark.parametrize(("r", "expected"), [
    (1.0, [1 / 100, 1 / 25, 1 / 4]),          # inverse frequency
    (0.5, [1 / 10, 1 / 5, 1 / 2]),            # smoothed
    (0.0, [1, 1, 1]),                         # class-uniform (the CMO/OTmix code's default)
    (-1.0, [100, 25, 4]),                     # proportional to size: uniform over images
])
def test_class_probs_closed_form(r: float, expected: list[float]) -> None:
    q = class_sampling_probs([100, 25, 4], r)
    assert q.dtype == torch.float64
    torch.testing.assert_close(q, torch.tensor(expected, dtype=torch.float64) / sum(expected))


def test_class_probs_empty_class_and_extreme_r() -> None:
    q = class_sampling_probs([100, 0, 4], 1.0)
    assert q[1] == 0 and torch.isclose(q.sum(), torch.tensor(1.0, dtype=torch.float64))
    q = class_sampling_probs([5000, 50], 200.0)  # n^-r underflows without the log-space path
    assert torch.isfinite(q).all() and q[1] == 1.0


def test_sample_weights_sum_to_class_probs() -> None:
    labels = make_labels(COUNTS)
    for r in (1.0, 0.5, 0.0):
        w = sample_weights(labels, r)
        q = class_sampling_probs(COUNTS, r)
        per_class = torch.zeros(len(COUNTS), dtype=torch.float64).index_add_(
            0, torch.as_tensor(labels), w)
        torch.testing.assert_close(per_class, q)
        # Within a class every image has the same weight q_k / n_k.
        for k, n in enumerate(COUNTS):
            torch.testing.assert_close(w[labels == k], torch.full((n,), float(q[k] / n),
                                                                  dtype=torch.float64))


@pytest.mark.parametrize("r", [1.0, 0.5])
def test_sampler_class_frequencies_match_q(r: float) -> None:
    labels = make_labels(COUNTS)
    sampler = ClassWeightedSampler(labels, r=r, num_samples=20_000, seed=3)
    drawn = labels[sampler.epoch_indices().numpy()]
    observed = np.bincount(drawn, minlength=len(COUNTS))
    q = class_sampling_probs(COUNTS, r).numpy()
    n = observed.sum()
    sigma = np.sqrt(n * q * (1 - q))
    assert np.all(np.abs(observed - n * q) < 4 * sigma), (observed, n * q)
    assert chisquare(observed, n * q).pvalue > 1e-4


def test_sampler_draws_uniformly_within_a_class() -> None:
    labels = make_labels(COUNTS)
    sampler = ClassWeightedSampler(labels, r=1.0, num_samples=20_000, seed=1)
    idx = sampler.epoch_indices().numpy()
    tail_images = np.flatnonzero(labels == 3)
    hits = np.array([(idx == i).sum() for i in tail_images])
    assert chisquare(hits).pvalue > 1e-4  # the 10 tail images are equally likely


def test_sampler_seed_epoch_and_length() -> None:
    labels = make_labels(COUNTS)
    a = ClassWeightedSampler(labels, r=1.0, seed=7)
    b = ClassWeightedSampler(labels, r=1.0, seed=7)
    assert len(a) == len(labels) and list(a) == list(b)
    first = list(a)
    a.set_epoch(1)
    assert list(a) != first
    a.set_epoch(0)
    assert list(a) == first
    assert list(ClassWeightedSampler(labels, r=1.0, seed=8)) != first
    assert all(0 <= i < len(labels) for i in first)
    assert len(ClassWeightedSampler(labels, num_samples=33)) == 33
    assert len({epoch_seed(s, e) for s in range(4) for e in range(4)}) == 16


def test_sampler_works_with_dataloader() -> None:
    labels = make_labels(COUNTS)
    sampler = ClassWeightedSampler(labels, num_samples=64, seed=0)
    loader = torch.utils.data.DataLoader(torch.as_tensor(labels), batch_size=16, sampler=sampler)
    batches = list(loader)
    assert [len(b) for b in batches] == [16] * 4
    assert torch.equal(torch.cat(batches), torch.as_tensor(labels)[sampler.epoch_indices()])


@pytest.mark.parametrize("num_samples", [660, 661])
def test_distributed_shards_are_disjoint_and_cover_the_draw(num_samples: int) -> None:
    labels = make_labels(COUNTS)
    world = 4
    shards = [DistributedClassWeightedSampler(labels, r=1.0, num_replicas=world, rank=k,
                                              seed=5, num_samples=num_samples)
              for k in range(world)]
    for s in shards:
        s.set_epoch(2)
    full = shards[0].full_draw()
    assert all(torch.equal(s.full_draw(), full) for s in shards)  # every rank, same draw
    lengths = {len(s) for s in shards}
    assert lengths == {len(full) // world} and len(full) >= num_samples
    rebuilt = torch.empty_like(full)
    for k, s in enumerate(shards):
        part = s.epoch_indices()
        assert len(part) == len(s) and list(s) == part.tolist()
        rebuilt[k::world] = part  # positions k::world are disjoint and cover the draw
    assert torch.equal(rebuilt, full)


def test_distributed_single_replica_equals_plain_sampler() -> None:
    labels = make_labels(COUNTS)
    plain = ClassWeightedSampler(labels, r=0.5, seed=9)
    dist = DistributedClassWeightedSampler(labels, r=0.5, num_replicas=1, rank=0, seed=9)
    plain.set_epoch(3)
    dist.set_epoch(3)
    assert list(plain) == list(dist)


def test_draw_class_weighted_never_draws_zero_weight() -> None:
    weights = torch.tensor([0.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    idx = draw_class_weighted(weights, 4000, torch.Generator().manual_seed(0))
    assert idx.dtype == torch.long and set(idx.tolist()) == {1, 3}
    share = (idx == 3).double().mean().item()
    assert abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / 4000)


@pytest.mark.parametrize("bad", [
    lambda: ClassWeightedSampler([0, -1, 2]),
    lambda: ClassWeightedSampler([]),
    lambda: ClassWeightedSampler([0.5, 1.0]),
    lambda: ClassWeightedSampler([0, 1], num_samples=0),
    lambda: class_sampling_probs([0, 0], 1.0),
    lambda: class_sampling_probs([3, 4], float("nan")),
    lambda: DistributedClassWeightedSampler([0, 1], num_replicas=2, rank=2),
    lambda: DistributedClassWeightedSampler([0, 1], num_replicas=2),
])
def test_bad_input_raises_otlt_error(bad) -> None:
    with pytest.raises(OtltError):
        bad()
