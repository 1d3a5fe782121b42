"""Small OT plans kept for inspection (``mix.params.plan_epochs``, the OTmix paper's Fig. 3).

A requested epoch ``e`` is served by the first OT batch of the first epoch ``≥ e`` that pairs
by OT: an epoch that draws random pairing (probability ``1 − (t/T)^μ``) has no plan, so a
plan asked for at such an epoch comes from the next OT epoch instead of never (the file is
named by the epoch it comes from and lists the epochs it serves). Which requested epochs were
served is part of the mixer's state, so a resumed run keeps no plan twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from otlt.errors import require
from otlt.transport import sinkhorn


class PlanSamples:
    """The requested epochs (resolved, from 0) and those served so far."""

    def __init__(self, epochs: Sequence[int]) -> None:
        self.epochs = tuple(int(e) for e in epochs)
        require(all(e >= 0 for e in self.epochs), f"plan_epochs must be resolved epochs >= 0 "
                f"(the config resolves -1 to the last), got {list(self.epochs)}")
        self.served: set[int] | None = set()

    def start_epoch(self, epoch: int) -> None:
        """Called at every epoch's switch draw. After loading a state written before served
        epochs were recorded, every requested epoch before ``epoch`` counts as served (it
        was kept then, or its epoch drew random pairing and it never will be)."""
        if self.served is None:
            self.served = {e for e in self.epochs if e < epoch}

    def due(self, epoch: int) -> list[int]:
        """The requested epochs that an OT batch of ``epoch`` serves (empty: keep nothing)."""
        served = self.served or set()
        return [e for e in self.epochs if e <= epoch and e not in served]

    def keep(self, epoch: int, cost: torch.Tensor, y_partner: torch.Tensor,
             y_base: torch.Tensor, *, size: int, eps: float, omega: float,
             **solver: Any) -> tuple[str, dict[str, Any]] | None:
        """The file name and object of one small plan when an epoch is due (else None): the
        first ``size`` rows and columns of the batch's cost ``(B, B)``, re-solved alone (ε,
        Sinkhorn's ``solver`` options), with their labels; marks the due epochs served."""
        due = self.due(epoch)
        if not due:
            return None
        assert self.served is not None  # due() is empty before start_epoch after a load
        self.served.update(due)
        m = min(size, cost.shape[0])
        small = sinkhorn(cost[:m, :m].float(), eps=eps, **solver)
        return f"plans/epoch_{epoch:04d}.json", {  # keys as committed reports read them
            "epoch": epoch, "requested_epochs": due, "eps": eps, "omega": omega,
            "fore_labels": y_partner[:m].tolist(), "back_labels": y_base[:m].tolist(),
            "cost": cost[:m, :m].tolist(), "plan": small.coupling.tolist(),
            "argmax": small.coupling.argmax(1).tolist()}

    def state_dict(self) -> list[int] | None:
        return None if self.served is None else sorted(self.served)

    def load_state_dict(self, served: list[int] | None) -> None:
        """``served`` as :meth:`state_dict` gave it; None: a state from before it existed."""
        self.served = None if served is None else {int(e) for e in served}


__all__ = ["PlanSamples"]
