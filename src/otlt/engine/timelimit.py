"""Stop a run at an epoch boundary before a wall-clock limit (``otlt train --time-limit``).

A GPU lent for a fixed window, or a queue slot, ends at a known time; a run killed mid-epoch
loses that epoch (and, killed mid-write, nothing worse: every write is atomic). A run that
knows its deadline does better: after each epoch it asks whether the next one still fits, and
if not it stops exactly as ``--stop-after`` does (``last.pt`` at that epoch, exit 0,
resumable with ``otlt train --resume``), leaving the rest of the window to the caller.

The rule, checked after every epoch (the first epoch always runs: nothing is known before it):
stop when the time left is less than what comes next, where the next epoch costs the longest
epoch seen so far times ``margin`` (1.2 by default: epochs vary with the machine's load, and
the first one, carrying warm-up, is usually the longest, so the longest errs on the safe side)
and the final evaluation (the test split under the run's procedure for the last epoch's and
the validation-selected weights) is counted as one more such epoch: it is a forward pass over
the test split twice (plus BatchNorm recalibration), which costs less than a training epoch
with its validation. So before the last epoch the run needs two epochs' worth of time, after
it one (a run whose final evaluation does not fit stops after its last epoch and evaluates on
resume). An epoch is timed from one check to the next (training, validation, the log line and
``last.pt`` together); the first from the trainer's own record.

Under torchrun rank 0 decides and every rank follows (their clocks differ slightly, and a
rank that stopped alone would leave the others waiting in a collective).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from otlt.engine.distributed import on_main_then_share
from otlt.errors import OtltError

DEFAULT_MARGIN = 1.2


class TimeLimit:
    """A wall-clock budget of ``seconds`` from now (see the module docstring for the rule).

    ``clock`` is the time source (seconds, monotonic); tests pass a fake one.
    ``stopped_at`` is the number of epochs done when the limit stopped the run (None while
    it has not)."""

    def __init__(self, seconds: float, margin: float = DEFAULT_MARGIN,
                 clock: Callable[[], float] = time.monotonic):
        if not seconds > 0:
            raise OtltError(f"--time-limit must be > 0 seconds, got {seconds}")
        if not margin >= 1:
            raise OtltError(f"--time-margin must be >= 1, got {margin}")
        self.clock = clock
        self.deadline = clock() + seconds
        self.margin = margin
        self.longest = 0.0
        self.last_check: float | None = None
        self.stopped_at: int | None = None

    def left(self) -> float:
        """Seconds until the limit (negative once it has passed)."""
        return self.deadline - self.clock()

    def needed(self, done: int, total: int) -> float:
        """Seconds the run needs before its next stop point, ``done`` of ``total`` epochs
        done: the next epoch, plus the final evaluation when that epoch is the last; only the
        final evaluation when every epoch is done."""
        return self.longest * self.margin * (2 if done + 1 == total else 1)

    def should_stop(self, done: int, total: int, epoch_seconds: float) -> bool:
        """Called after every epoch (``done`` epochs done, the last one took
        ``epoch_seconds`` by the trainer's record): True when the run should stop here."""
        now = self.clock()
        lap = now - self.last_check if self.last_check is not None else 0.0
        self.last_check = now
        self.longest = max(self.longest, epoch_seconds, lap)
        stop = on_main_then_share(lambda: self.deadline - now < self.needed(done, total))
        if stop:
            self.stopped_at = done
        return stop
