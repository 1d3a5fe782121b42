"""Tests for otlt.metrics on hand-built confusion matrices."""

from __future__ import annotations

import math

import pytest
import torch

from otlt.errors import OtltError
from otlt.metrics import (
    confusion_matrix,
    per_class_accuracy,
    row_normalized_confusion,
    shot_groups,
    summarize,
)

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]

# K = 4, train counts [500, 60, 30, 5]: class 0 many, 1-2 medium, 3 few.
# Balanced test set, 10 images per class; rows = truth, columns = prediction.
TRAIN_COUNTS = [500, 60, 30, 5]
CONFUSION = torch.tensor(
    [
        [9, 1, 0, 0],  # 90 %
        [2, 7, 1, 0],  # 70 %
        [1, 2, 6, 1],  # 60 %
        [3, 1, 1, 5],  # 50 %
    ]
)


@pytest.mark.parametrize("device", DEVICES)
def test_confusion_matrix_by_hand(device: str):
    preds = torch.tensor([0, 1, 1, 2, 0, 2], device=device)
    targets = torch.tensor([0, 1, 2, 2, 1, 0], device=device)
    conf = confusion_matrix(preds, targets, 3)
    assert conf.dtype == torch.long and conf.device.type == device
    expected = torch.tensor([[1, 0, 1], [1, 1, 0], [0, 1, 1]])
    assert torch.equal(conf.cpu(), expected)


def test_confusion_matrix_matches_loop_reference():
    g = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 7, (500,), generator=g)
    targets = torch.randint(0, 7, (500,), generator=g)
    expected = torch.zeros(7, 7, dtype=torch.long)
    for p, t in zip(preds.tolist(), targets.tolist(), strict=True):
        expected[t, p] += 1
    assert torch.equal(confusion_matrix(preds, targets, 7), expected)
    assert torch.equal(confusion_matrix(preds[:0], targets[:0], 7), torch.zeros(7, 7).long())


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(OtltError, match="found 3, expected 0..2"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(OtltError, match="found -1"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([-1, 1]), 3)
    with pytest.raises(ValueError):
        confusion_matrix(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]), 3)


def test_per_class_accuracy_by_hand():
    acc = per_class_accuracy(CONFUSION)
    assert acc.dtype == torch.float64
    torch.testing.assert_close(acc, torch.tensor([0.9, 0.7, 0.6, 0.5], dtype=torch.float64))
    with_empty = per_class_accuracy(torch.tensor([[2, 0], [0, 0]]))
    assert with_empty[0] == 1.0 and math.isnan(with_empty[1])


def test_shot_groups_boundaries():
    groups = shot_groups([101, 100, 20, 19, 1000, 0])
    assert groups == {"many": [0, 4], "medium": [1, 2], "few": [3, 5]}
    assert shot_groups(torch.tensor(TRAIN_COUNTS)) == {"many": [0], "medium": [1, 2], "few": [3]}
    custom = shot_groups([51, 50, 10, 9], many=50, few=10)
    assert custom == {"many": [0], "medium": [1, 2], "few": [3]}
    with pytest.raises(OtltError, match="few=30, many=10"):
        shot_groups([5], many=10, few=30)
    with pytest.raises(OtltError, match=">= 0"):
        shot_groups([5, -1])


def test_summarize_by_hand():
    s = summarize(CONFUSION, TRAIN_COUNTS)
    # 27 of 40 correct.
    assert s["top1_accuracy"] == pytest.approx(67.5)
    assert s["top1_error"] == pytest.approx(32.5)
    assert s["many_error"] == pytest.approx(10.0)  # class 0: 9/10
    assert s["medium_error"] == pytest.approx(35.0)  # classes 1, 2: (7 + 6) / 20
    assert s["few_error"] == pytest.approx(50.0)  # class 3: 5/10
    assert s["per_class_accuracy"] == pytest.approx([90.0, 70.0, 60.0, 50.0])
    assert s["confusion_matrix"] == CONFUSION.tolist()
    assert s["class_counts_train"] == TRAIN_COUNTS
    assert s["groups"] == {"many": [0], "medium": [1, 2], "few": [3]}
    assert s["num_samples"] == 40
    assert s["shot_thresholds"] == {"many": 100, "few": 20}


def test_summarize_group_error_is_pooled_over_test_samples():
    # Unbalanced test rows in the medium group: class 1 has 7/10, class 2 has 3/4 correct.
    # Pooled: 10/14 correct (error 28.571 %); the mean of per-class accuracies would be 72.5 %.
    conf = torch.tensor([[5, 0, 0, 0], [2, 7, 1, 0], [0, 0, 3, 1], [1, 0, 0, 1]])
    s = summarize(conf, TRAIN_COUNTS)
    assert s["medium_error"] == pytest.approx(100 * 4 / 14)
    assert s["top1_error"] == pytest.approx(100 * 5 / 21)


def test_summarize_empty_groups_and_classes_give_none():
    conf = torch.tensor([[3, 1, 0], [0, 0, 0], [1, 0, 1]])
    s = summarize(conf, [500, 200, 150])
    assert s["medium_error"] is None and s["few_error"] is None
    assert s["many_error"] == pytest.approx(100 * 2 / 6)
    assert s["per_class_accuracy"][1] is None
    assert s["per_class_accuracy"][0] == pytest.approx(75.0)
    s = summarize(conf, [500, 50, 150])  # class 1 is medium but has no test samples
    assert s["medium_error"] is None


def test_summarize_rejects_bad_input():
    with pytest.raises(OtltError, match="3 classes"):
        summarize(CONFUSION, [1, 2, 3])
    with pytest.raises(OtltError, match="empty"):
        summarize(torch.zeros(4, 4, dtype=torch.long), TRAIN_COUNTS)


def test_row_normalized_confusion_by_hand():
    conf = torch.tensor([[3, 1, 0], [0, 0, 0], [2, 2, 4]])
    full = row_normalized_confusion(conf)
    expected = torch.tensor([[0.75, 0.25, 0.0], [0.0, 0.0, 0.0], [0.25, 0.25, 0.5]])
    torch.testing.assert_close(full, expected)
    zeroed = row_normalized_confusion(conf, zero_diagonal=True)
    expected.fill_diagonal_(0.0)
    torch.testing.assert_close(zeroed, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_row_normalized_confusion_invariants(dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    conf = torch.randint(0, 50, (6, 6), generator=g)
    conf[2] = 0
    full = row_normalized_confusion(conf, dtype=dtype)
    zeroed = row_normalized_confusion(conf, zero_diagonal=True, dtype=dtype)
    assert full.dtype == zeroed.dtype == dtype
    sums = full.sum(dim=1)
    nonempty = torch.tensor([k != 2 for k in range(6)])
    torch.testing.assert_close(sums[nonempty], torch.ones(5, dtype=dtype))
    assert torch.count_nonzero(full[2]) == 0
    assert torch.count_nonzero(zeroed.diagonal()) == 0
    off = ~torch.eye(6, dtype=torch.bool)
    assert torch.equal(zeroed[off], full[off])
    assert ((full >= 0) & (full <= 1)).all()
