"""Text for people: the evaluation table printed by ``otlt train``, ``otlt eval`` and the demo."""

from __future__ import annotations


def format_percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}%"


def format_eval(result: dict, title: str = "evaluation") -> str:
    """Human-readable table of an ``eval.json`` record."""
    lines = [title, "-" * len(title)]
    lines.append(f"{'top-1 error':<14}{result['top1_error']:6.2f}%")
    for group in ("many", "medium", "few"):
        err = result.get(f"{group}_error")
        n = len(result.get("groups", {}).get(group, []))
        value = "   n/a" if err is None else f"{err:6.2f}%"
        lines.append(f"{group + ' error':<14}{value}  ({n} classes)")
    classes = result.get("classes") or [str(k) for k in range(len(result["per_class_accuracy"]))]
    counts = result.get("class_counts_train", [None] * len(classes))
    lines.append("")
    lines.append(f"{'class':<16}{'train n':>8}{'accuracy':>10}")
    for name, n, acc in zip(classes, counts, result["per_class_accuracy"], strict=False):
        lines.append(f"{name[:15]:<16}{'' if n is None else n:>8}{acc:9.1f}%")
    return "\n".join(lines)


__all__ = ["format_eval", "format_percent"]
