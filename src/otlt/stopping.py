"""How a command stops on a signal: SIGTERM (a scheduler's preemption, ``kill``,
``scripts/run_many.py``'s deadline) takes the Ctrl-C path, so the CLI ends with one line and
exit code 143 instead of dying without a word. Used by ``otlt.cli.main``."""

from __future__ import annotations

import signal
import threading


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, ``kill``, ``scripts/run_many.py``'s deadline) turned
    into the Ctrl-C path: the command stops where it is, every file it writes is atomic, and
    ``last.pt`` holds the last finished epoch."""


def _raise_terminated(signum, frame) -> None:
    # a second SIGTERM while this one unwinds (a cgroup-wide kill, then a launcher's) ends
    # the process at once, as SIGTERM did before: every checkpoint is already atomic
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated


def stop_on_sigterm() -> bool:
    """End on SIGTERM as on Ctrl-C (one line, exit 143) instead of dying without a word.
    Only where the process has no SIGTERM handler of its own and only from the main thread
    (the one place Python delivers signals); True if installed (``main`` puts the default
    back when the command returns, for a caller that runs ``main`` in its own process)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        return False
    signal.signal(signal.SIGTERM, _raise_terminated)
    return True
