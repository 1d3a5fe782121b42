"""otlt.console: the text the CLI prints from records."""

from __future__ import annotations

from otlt.console import format_eval


def test_a_class_without_test_images_is_n_a_not_a_crash():
    """A list-file test split may lack a class: its accuracy is None, which the table used
    to format as a float (a TypeError after the whole training)."""
    result = {"top1_error": 25.0, "many_error": 20.0, "medium_error": None, "few_error": 30.0,
              "classes": ["ant", "bee", "cat"], "class_counts_train": [50, 10, 5],
              "per_class_accuracy": [80.0, None, 70.0]}
    lines = format_eval(result).splitlines()
    assert [line.split()[-1] for line in lines[-3:]] == ["80.0%", "n/a", "70.0%"]
    assert "medium error     n/a" in format_eval(result)
