"""OT re-weighting on a real model: check the weight gradient, and say in numbers why it is small.

    python scripts/reweight_gradient_check.py --config configs/cifar10_lt_r100_ot_reweight.yaml \
        --stage1 runs/cpu_full/cifar10_lt_r100_ot_reweight_stage1 --batches 50 \
        --out results/<group>/gradient_check.json

Builds stage 2 exactly as ``otlt train`` does (the stage-1 weights, the augmented meta set's
prototypes, the run's first epoch of batches, each batch's frozen features) and, for each of
the first ``--batches`` batches at the initial (class-balanced) weights ``w_B``:

* the gradient ``∂OT_ε/∂w_B`` the run uses (potentials, float32, tol 1e-6), the same through
  unrolled Sinkhorn iterations, and central finite differences in float64 (tol 1e-12,
  h = 1e-6) as the reference: their relative errors;
* the official code's gradient (autograd of the plan's transport cost ``<T, C>`` through at
  most 200 iterations, ``OT_train.py``): its cosine and norm ratio to ours;
* the official optimiser, ``SGD([w], lr, momentum=0.9, weight_decay)`` created afresh for
  every batch: its step equals plain SGD's (momentum never acts), up to float32 rounding;
* what bounds the step: ``∂L/∂w_i = ν_i (g_i − <ν, g>)`` with ``ν = softmax(w_B)`` and
  ``g`` the column potential, so ``|∂L/∂w_i| <= ν_i (max g − min g)``; the weights' scale.

The summary turns the mean ``|lr ∂L/∂w_i|`` into the largest drift an example's raw weight can
make in the run (one visit per epoch, every step in the same direction) and the weight
learning rate at which that drift would reach the spread of the initial class weights.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch

from otlt.config import load_config
from otlt.engine.distributed import global_batches
from otlt.engine.trainer import Trainer
from otlt.reweight import ot_reweight_loss, reweight_cost
from otlt.transport import sinkhorn


def finite_differences(loss, w: torch.Tensor, h: float) -> torch.Tensor:
    """Central differences ``(B,)`` of a scalar function of ``w`` ``(B,)``."""
    grad = torch.empty_like(w)
    for i in range(len(w)):
        step = torch.zeros_like(w)
        step[i] = h
        grad[i] = (loss(w + step) - loss(w - step)) / (2 * h)
    return grad


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def check_batch(rw, z: torch.Tensor, y: torch.Tensor, w0: torch.Tensor, lr: float,
                weight_decay: float) -> dict[str, float]:
    """Every measurement above for one batch; ``w0`` ``(B,)`` are its raw weights."""
    def cost(dtype):
        return reweight_cost(rw.meta_features.to(dtype), rw.meta_labels, z.to(dtype), y,
                             num_classes=rw.num_classes, feature_weight=rw.feature_weight,
                             label_distance=rw.label_distance)

    def gradient(fn, w):
        w = w.clone().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(fn(w), w)
        return g

    c32, c64 = cost(torch.float32), cost(torch.float64)

    def value(w, c=c64, tol=1e-12, mode="potentials"):
        return ot_reweight_loss(c, torch.softmax(w, 0), eps=rw.eps, max_iter=100_000, tol=tol,
                                gradient=mode)

    reference = finite_differences(value, w0.double(), 1e-6)
    ours = gradient(lambda w: rw.ot_loss(z.float(), y, w), w0.float())  # the run's step
    unrolled = gradient(lambda w: value(w, c32, 1e-6, "unrolled"), w0.float())
    official = gradient(lambda w: sinkhorn(c32, None, torch.softmax(w, 0), eps=rw.eps,
                                           max_iter=200, tol=1e-6).cost, w0.float())

    # The official optimiser, re-created for every batch: its first step has no momentum.
    w_official = w0.float().clone().requires_grad_(True)
    opt = torch.optim.SGD([w_official], lr=lr, momentum=0.9, weight_decay=weight_decay)
    w_official.grad = ours.clone()
    opt.step()
    plain = w0.float() - lr * (ours + weight_decay * w0.float())

    nu = torch.softmax(w0.double(), 0)
    solved = sinkhorn(c64, None, nu, eps=rw.eps, max_iter=100_000, tol=1e-12)
    g_range = float(solved.g.max() - solved.g.min())
    after = torch.softmax(plain.double(), 0)
    return {
        "fd_rel_error_potentials_float32": relative_error(ours, reference),
        "fd_rel_error_unrolled_float32": relative_error(unrolled, reference),
        "official_cosine": float(torch.nn.functional.cosine_similarity(
            official.double(), ours.double(), dim=0)),
        "official_norm_ratio": float(official.norm() / ours.norm()),
        "official_optimizer_max_abs_diff": float((w_official.detach() - plain).abs().max()),
        "grad_norm": float(ours.norm()),
        "grad_abs_mean": float(ours.abs().mean()),
        "grad_abs_max": float(ours.abs().max()),
        "bound_ratio_max": float((ours.double().abs() / (nu * g_range)).max()),
        "nu_max": float(nu.max()), "nu_min": float(nu.min()),
        "g_range": g_range, "ot_loss": float(solved.objective),
        "step_abs_mean": float((lr * ours).abs().mean()),
        "step_rel_mean": float(((lr * ours).abs() / w0.float().abs()).mean()),
        "softmax_l1_change": float((after - nu).abs().sum()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--stage1", required=True, help="the finished stage-1 run (or last.pt)")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [*args.overrides, f"reweight.stage1={args.stage1}",
                                        f"out_dir={tmp}", "train.progress=false"])
        trainer = Trainer(cfg)
        stage2, feed = trainer.step, trainer.feed  # a Stage2Step: reweight.stage1 is set
        stage2.prepare_meta(trainer.generator)
        rw, r = stage2.reweighter, cfg.reweight
        order = torch.randperm(len(feed), generator=trainer.generator)
        batches = global_batches(order, cfg.optim.batch_size, 1)[: args.batches]
        rows = []
        for idx in batches:
            x, y = feed.gather(idx, trainer.generator)
            z = stage2.frozen_features(stage2.layout(x))
            rows.append(check_batch(rw, z, y, rw.raw[idx],
                                    r.weight_lr, r.weight_decay))
        per_class = rw.class_stats()["weight_class_mean"]
    mean = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
    worst = {key: max(row[key] for row in rows) for key in
             ("fd_rel_error_potentials_float32", "fd_rel_error_unrolled_float32",
              "official_optimizer_max_abs_diff", "bound_ratio_max")}
    spread = max(per_class) - min(per_class)
    epochs = cfg.optim.epochs
    drift = epochs * mean["step_abs_mean"]
    summary = {
        "config": args.config, "stage1": args.stage1, "batches": len(rows),
        "batch_size": cfg.optim.batch_size, "eps": r.eps, "weight_lr": r.weight_lr,
        "weight_decay": r.weight_decay, "epochs": epochs,
        "initial_class_weights": per_class, "initial_class_weight_spread": spread,
        "mean": mean, "worst": worst,
        "max_drift_over_run": drift,
        "max_drift_over_run_relative_to_spread": drift / spread,
        "weight_lr_for_drift_equal_to_spread": r.weight_lr * spread / drift,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    ok = worst["fd_rel_error_potentials_float32"] < 1e-3 and math.isfinite(drift)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
