"""Text for people: the epoch line of ``otlt train`` and the evaluation table printed by
``otlt train``, ``otlt eval`` and the demo."""

from __future__ import annotations

from typing import Any


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
        shown = f"{'n/a':>10}" if acc is None else f"{acc:9.1f}%"  # no test image of the class
        lines.append(f"{name[:15]:<16}{'' if n is None else n:>8}{shown}")
    return "\n".join(lines)


def format_epoch(record: dict[str, Any], epochs: int) -> str:
    """The epoch line ``otlt train`` prints, from the epoch's ``metrics.jsonl`` record."""
    parts = [f"epoch {record['epoch'] + 1:>3}/{epochs}", f"lr {record['lr']:.4g}",
             f"loss {record['train_loss']:.3f}", f"train {record['train_acc']:.1f}%"]
    if "val_acc" in record:
        parts.append(f"val {record['val_acc']:.1f}% (many {_fmt(record['val_many_acc'])} "
                     f"med {_fmt(record['val_medium_acc'])} few {_fmt(record['val_few_acc'])})")
    if "ot_batch_fraction" in record and record.get("mixed_batches", 1) == 0:
        parts.append("no batch mixed")  # an epoch skip_first or skip_last keeps clean
    elif "ot_batch_fraction" in record:
        parts.append(f"OT pairing in {100 * record['ot_batch_fraction']:.0f}% of mixed batches")
        if record.get("ot_converged_fraction", 1.0) < 1.0:
            parts.append(f"Sinkhorn converged {100 * record['ot_converged_fraction']:.0f}%")
    if "bn_seconds" in record:
        parts.append(f"BN {record['bn_seconds']:.1f}s")
    if "bn_probe" in record:
        probe = " ".join(f"{mode} {v['val_acc']:.1f}" for mode, v in record["bn_probe"].items())
        parts.append(f"probe val {probe} ({record['bn_probe_seconds']:.1f}s)")
    parts.append(f"{record['epoch_seconds']:.1f}s")
    return " | ".join(parts)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


__all__ = ["format_epoch", "format_eval", "format_percent"]
