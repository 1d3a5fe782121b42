"""The OT re-weighting ablation table, from stage-2 run directories' own files.

    python scripts/reweight_ablation_table.py BASELINE_RUN RUN [RUN ...] > table.md

For every run: what its config changes against the first run (the preset), validation and
test error at the last epoch, the validation-selected epoch (``eval.select_metric``) with its
validation and test error, and how far the learned weights moved: the largest relative change
of a class's mean raw weight between the initial weights and the last epoch, the mean per-step
L1 change of ``softmax(w_B)``, the mean ``||dOT/dw_B||`` and the OT loss of the first and the
last epoch. Nothing here reads the test split to choose anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from otlt.config import build_config
from otlt.reweight import OTReweighter

IGNORED = {"name", "out_dir"}


def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "params":
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changes(run: Path, base: Path) -> str:
    a = flat(yaml.safe_load((base / "config.yaml").read_text()))
    b = flat(yaml.safe_load((run / "config.yaml").read_text()))
    diff = [f"`{k}={b.get(k)}`" for k in sorted(set(a) | set(b))
            if k not in IGNORED and not k.startswith("paper.") and k != "reweight.stage1"
            and a.get(k) != b.get(k)]
    return ", ".join(diff) or "the preset"


def initial_class_means(run: Path) -> list[float | None]:
    """Per-class mean of the initial raw weights (the re-weighter built from the config)."""
    cfg = build_config(yaml.safe_load((run / "config.yaml").read_text()))
    counts = json.loads((run / "splits.json").read_text())["counts"]["train"]
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    r = cfg.reweight
    rw = OTReweighter(labels, cfg.num_classes, init=r.init, beta=r.beta)
    return rw.class_stats()["weight_class_mean"]


def summary(run: Path, base: Path) -> dict[str, Any]:
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    result = json.loads((run / "eval.json").read_text())
    selected = result.get("selected") or {}
    by_epoch = {r["epoch"]: r for r in records}
    last = records[-1]
    start = initial_class_means(run)
    end = last["weight_class_mean"]
    moved = max(abs(e - s) / abs(s) for s, e in zip(start, end, strict=True)
                if s is not None and e is not None and s != 0)

    def mean_of(key: str) -> float | None:
        values = [r[key] for r in records if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    sel_epoch = selected.get("epoch")
    return {
        "run": run.name, "changes": changes(run, base),
        "val_last": 100 - last["val_acc"], "test_last": result["top1_error"],
        "sel_epoch": None if sel_epoch is None else sel_epoch + 1,
        "val_sel": None if sel_epoch is None else 100 - by_epoch[sel_epoch]["val_acc"],
        "test_sel": selected.get("top1_error"),
        "moved": 100 * moved, "step_change": mean_of("weight_step_change"),
        "grad_norm": mean_of("ot_grad_norm"),
        "ot_first": records[0].get("ot_loss"), "ot_last": last.get("ot_loss"),
    }


def fmt(value: Any, pattern: str = "{:.2f}") -> str:
    return "–" if value is None else pattern.format(value)


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| run | changes | val last | test last | selected epoch | val sel. | test sel. "
            "| class mean moved (max, %) | per-step L1 change of softmax(w_B) "
            "| mean ‖dOT/dw_B‖ | OT loss first → last |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 9]
    for r in rows:
        ot = "–" if r["ot_first"] is None else f"{r['ot_first']:.4f} → {r['ot_last']:.4f}"
        lines.append(
            f"| {r['run']} | {r['changes']} | {fmt(r['val_last'])} | {fmt(r['test_last'])} | "
            f"{fmt(r['sel_epoch'], '{}')} | {fmt(r['val_sel'])} | {fmt(r['test_sel'])} | "
            f"{fmt(r['moved'])} | {fmt(r['step_change'], '{:.2e}')} | "
            f"{fmt(r['grad_norm'], '{:.2e}')} | {ot} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="stage-2 runs; the first is the base")
    args = parser.parse_args()
    base = args.runs[0]
    print(table([summary(run, base) for run in args.runs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
