"""otlt.console: the text the CLI prints from records."""

from __future__ import annotations

from otlt.console import format_epoch, format_eval


def test_a_class_without_test_images_is_n_a_not_a_crash():
    """A list-file test split may lack a class: its accuracy is None, which the table used
    to format as a float (a TypeError after the whole training)."""
    result = {"top1_error": 25.0, "many_error": 20.0, "medium_error": None, "few_error": 30.0,
              "classes": ["ant", "bee", "cat"], "class_counts_train": [50, 10, 5],
              "per_class_accuracy": [80.0, None, 70.0]}
    lines = format_eval(result).splitlines()
    assert [line.split()[-1] for line in lines[-3:]] == ["80.0%", "n/a", "70.0%"]
    assert "medium error     n/a" in format_eval(result)


def test_an_epoch_that_mixed_nothing_says_so():
    """skip_first/skip_last epochs mix no batch: "OT pairing in 0%" read as random pairing."""
    record = {"epoch": 0, "lr": 0.1, "train_loss": 1.0, "train_acc": 50.0,
              "ot_batch_fraction": 0.0, "mixed_batches": 0, "epoch_seconds": 20.0}
    assert "no batch mixed" in format_epoch(record, 3) and "OT pairing" not in \
        format_epoch(record, 3)
    mixed = {**record, "mixed_batches": 40}
    assert "OT pairing in 0% of mixed batches" in format_epoch(mixed, 3)

