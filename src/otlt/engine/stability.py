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
    """An epoch's watch on the training loss: the steps' summed losses, kept as the device
    tensors they are (no kernel and no host synchronisation per step), looked at once, at
    the end of the epoch.

    ``first_bad``: the first step (0-based) whose mean loss was inf or NaN, -1 if none;
    ``last_finite``: the mean loss of the last step before it (NaN if none).
    """

    def __init__(self) -> None:
        self._steps: list[tuple[torch.Tensor, int]] = []

    def update(self, loss: torch.Tensor, n: int) -> None:
        """Note the next step's loss summed over its ``n`` rows (a 0-dim tensor)."""
        self._steps.append((loss.detach(), n))

    def total(self) -> torch.Tensor:
        """The epoch's summed loss, on the device (0 before the first step)."""
        if not self._steps:
            return torch.zeros(())
        return torch.stack([loss.float() for loss, _ in self._steps]).sum()

    def first_bad_and_last_finite(self) -> tuple[int, float]:
        """``(first_bad, last_finite)`` of the class docstring (one read of the steps)."""
        means = torch.tensor([float(loss) / n for loss, n in self._steps])
        bad = (~torch.isfinite(means)).nonzero()
        first = int(bad[0]) if len(bad) else -1
        before = means if first < 0 else means[:first]
        return first, float(before[-1]) if len(before) else math.nan

    def check(self, total_loss: float, epoch: int, epochs: int, steps: int) -> None:
        """Raise :class:`OtltError` when the epoch's summed loss ``total_loss`` (over every
        rank, so every rank decides alike) is not finite, naming the epoch, the first bad
        step of this rank and the last finite loss before it."""
        if math.isfinite(total_loss):
            return
        first, last = self.first_bad_and_last_finite()
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
