"""A run's last-epoch weights with post-hoc logit adjustment: is its classifier, not its
features, what keeps the tail classes down?

    python scripts/logit_adjusted_eval.py RUN_DIR [RUN_DIR ...] [--tau 1] [--bn-stats MODE]
        [--json OUT]

Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", ICLR 2021)
predicts ``argmax_k f_k(x) - tau log pi_k`` with ``pi`` the training class prior (the run's
own counts): it removes the label-prior bias of a classifier trained with plain
cross-entropy without touching its features. ``tau = 1`` is the paper's default and is fixed
here before any number is read, so nothing is selected on test. Per run: the weights of
``last.safetensors`` (committed results) or ``last.pt``, the model under the run's
``eval.bn_stats`` procedure (or ``--bn-stats``) recalibrated as ``otlt eval`` does, top-1
error (%) on validation and test with ``tau = 0`` (the run's own number, as ``otlt eval``
gives it) and with the adjustment, plus the per-class test accuracies. A diagnostic of where
a gain lives, not a method of this library: the presets' evaluation stays unadjusted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from otlt.config import BN_STATS
from otlt.engine.evaluation import eval_logits, split_batches
from otlt.engine.posthoc import (
    PROVENANCE_KEY,
    evaluated_with,
    evaluation_procedure,
    load_into,
    read_last,
    weights_from,
    weights_path,
)
from otlt.errors import OtltError
from otlt.metrics import confusion_matrix


def evaluate(run_dir: Path, tau: float, bn_stats: str | None) -> dict:
    """The record of one run (see the module docstring)."""
    last = read_last(run_dir)
    procedure = evaluation_procedure(run_dir, last)
    path = weights_path(run_dir, "last")  # last.pt, else the committed last.safetensors
    load_into(procedure, weights_from(path, run_dir, last))
    cfg, feed = procedure.cfg, procedure.feed
    epoch = cfg.optim.epochs - 1
    mode = bn_stats or cfg.eval.bn_stats
    model = procedure.model_for(epoch, mode)
    counts = torch.tensor(feed.counts, dtype=torch.float32)
    shift = tau * torch.log(counts / counts.sum())
    record = {"run": run_dir.name, "bn_stats": mode, "tau": tau,
              "threads": torch.get_num_threads(),  # bf16 results depend on it (a few images)
              "weights": str(path),
              PROVENANCE_KEY: evaluated_with(procedure)}  # as otlt eval records it
    for name in ("val", "test"):
        split = getattr(feed, name)
        if split is None:
            continue
        # batched and laid out as otlt eval does, so the unadjusted error is its number
        logits = torch.cat([z.float() for z, _ in eval_logits(
            model, split_batches(split, cfg.train.eval_batch_size), procedure.amp_dtype,
            cfg.train.channels_last)])
        labels = split.labels.cpu()
        for label, adjust in (("plain", 0.0), ("adjusted", 1.0)):
            pred = (logits.cpu() - adjust * shift).argmax(1)
            summary = procedure.summarize(confusion_matrix(pred, labels, len(counts)))
            record[f"{name}_{label}_error"] = round(summary["top1_error"], 2)
            if name == "test":
                record[f"test_{label}_per_class_acc"] = [
                    round(a, 1) for a in summary["per_class_accuracy"]]
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--tau", type=float, default=1.0)
    parser.add_argument("--bn-stats", choices=BN_STATS, default=None,
                        help="BatchNorm procedure for every run (default: each run's own)")
    parser.add_argument("--json", type=Path, default=None, help="write the records here")
    args = parser.parse_args()
    try:
        records = [evaluate(run, args.tau, args.bn_stats) for run in args.runs]
    except OtltError as exc:
        sys.exit(f"logit_adjusted_eval: error: {exc}")
    print("| run | bn_stats | val | val adjusted | test | test adjusted |")
    print("|---|---|---:|---:|---:|---:|")
    for r in records:
        print(f"| {r['run']} | {r['bn_stats']} | {r.get('val_plain_error', '–')} | "
              f"{r.get('val_adjusted_error', '–')} | {r['test_plain_error']} | "
              f"{r['test_adjusted_error']} |")
    if args.json:
        args.json.write_text(json.dumps({"tau": args.tau, "records": records}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
