"""What keeps a run's numbers finite: fp16 loss scaling and the non-finite loss guard.

``train.amp: fp16`` backpropagates through a :class:`torch.amp.GradScaler`: the loss is
multiplied by a scale ``s`` before ``backward``, the gradients are divided by ``s`` before the
step, and a step whose gradients hold an inf or NaN is skipped (``s`` halves; it doubles after
2000 clean steps). Its state goes into ``last.pt``, so a resume stays exact. bf16 and float32
have float32's range and run without one.

A non-finite training loss stops the run (:class:`LossGuard`): the guard follows the first
bad step and the last finite loss in device tensors (no host synchronisation per step) and is
read once, at the end of the epoch, before its record is logged and its ``last.pt`` saved.
"""

from __future__ import annotations

import math

import torch

from otlt.errors import OtltError


def grad_scaler(amp_dtype: torch.dtype | None,
                device: torch.device) -> torch.amp.GradScaler | None:
    """A :class:`torch.amp.GradScaler` on ``device``'s type for float16 autocast, else None."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def backward_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor,
                  scaler: torch.amp.GradScaler | None) -> None:
    """Zero the gradients, backpropagate ``loss`` and step: ``scaler.scale(loss)``, a step
    skipped on inf/NaN gradients and the scale's update when ``scaler`` is given."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
        return
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


class LossGuard:
    """An epoch's watch on the training loss, on the device.

    ``first_bad``: the first step (0-based) whose mean loss was inf or NaN, -1 while none;
    ``last_finite``: the mean loss of the last step before it (NaN while none).
    """

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.last_finite = torch.full((), math.nan, device=device)

    def update(self, step: int, loss: torch.Tensor) -> None:
        """Note step ``step``'s mean loss (a 0-dim tensor; no synchronisation)."""
        loss = loss.detach().float()
        clean = self.first_bad < 0
        finite = torch.isfinite(loss)
        self.last_finite = torch.where(clean & finite, loss, self.last_finite)
        self.first_bad = torch.where(clean & ~finite, step, self.first_bad)

    def check(self, total_loss: float, epoch: int, epochs: int, steps: int) -> None:
        """Raise :class:`OtltError` when the epoch's summed loss ``total_loss`` (over every
        rank, so every rank decides alike) is not finite, naming the epoch, the first bad
        step of this rank and the last finite loss before it."""
        if math.isfinite(total_loss):
            return
        first, last = int(self.first_bad), float(self.last_finite)
        if first < 0:
            where = "on another process (this one's stayed finite)"
        else:
            where = f"at step {first + 1} of {steps} " + (
                f"(last finite loss {last:.4g}, step {first})" if first else
                "(its first step: no finite loss in the epoch)")
        kept = f"last.pt holds the run after epoch {epoch}" if epoch else "no epoch was saved"
        raise OtltError(f"the training loss became inf or NaN in epoch {epoch + 1}/{epochs} "
                        f"{where}; the run stopped and {kept} (a resume would repeat the same "
                        "steps): lower optim.lr, or check the data and train.amp, in a new run")
