"""The learning-rate schedule of ``optim``: linear warm-up, then steps or a cosine."""

from __future__ import annotations

import math


def step_lr(cfg, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at a step: linear warm-up, then the step or cosine schedule."""
    o = cfg.optim
    progress = epoch + step / steps_per_epoch
    if o.warmup_epochs and progress < o.warmup_epochs:
        return o.lr * (progress + 1 / steps_per_epoch) / o.warmup_epochs
    if o.schedule == "cosine":
        span = max(o.epochs - o.warmup_epochs, 1)
        return 0.5 * o.lr * (1 + math.cos(math.pi * (progress - o.warmup_epochs) / span))
    factor = 1.0
    for milestone, gamma in zip(o.milestones, o.gammas, strict=True):
        if epoch >= milestone:
            factor = gamma
    return o.lr * factor
