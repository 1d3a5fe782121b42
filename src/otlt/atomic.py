"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every whole file otlt writes into a run directory, a results folder or the data cache
(checkpoints, weights, config, splits, evaluation records, reports and their figures, cache
entries) goes through :func:`write_atomic`; the exceptions are files that grow
(``metrics.jsonl``, ``sittings.jsonl``, TensorBoard events), the run directory's lock file,
and downloads (written as ``NAME.part``, checked, then renamed).

The bytes go to a temp file in the target's folder (same file system, so the rename is
atomic), are fsynced, and the temp file is renamed over the target. A process stopped in
the middle (a preemption, SIGKILL, a full disk) leaves the previous file and at most a stale
``.NAME.<pid>.<random>.tmp``, which the next write of that name removes once its writer is
gone. A new file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the
umask, and a folder's default ACL): the temp file is created with that mode, not by
:func:`tempfile.mkstemp` (``0o600``).

The lowest layer (beside :mod:`otlt.errors`), so the config writer, the engine's
checkpoints and logs, the reports and the data cache share one implementation.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from otlt.errors import writing

STALE_AFTER_SECONDS = 3600.0  # a temp file this old is stale even if its PID is alive
# What follows ".NAME." in a temp file's name: "<pid>.<8 hex>.tmp", or mkstemp's
# "<random>.tmp" of otlt before the PID was in the name.
_TEMP_NAME = re.compile(r"(?:(?P<pid>\d+)\.[0-9a-f]{8}|[A-Za-z0-9_]+)\.tmp")


def _writer_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (a PID of another host may be anything: the
    age rule covers those). Windows: assumed alive (``os.kill`` there ends processes)."""
    if os.name == "nt":
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def remove_stale_temps(path: str | Path) -> None:
    """Delete leftover temp files of an interrupted :func:`write_atomic` to ``path``: those
    whose writer's PID is gone, those older than an hour, and those of the old naming (no
    PID). A fresh temp file of a live writer (another rank or job writing the same cache
    entry right now) is left alone."""
    path = Path(path)
    prefix = f".{path.name}."
    for stale in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        ours = _TEMP_NAME.fullmatch(stale.name[len(prefix):])
        if ours is None:  # another file's temp (".last.pt.json.<pid>...")
            continue
        with contextlib.suppress(OSError):
            pid = ours.group("pid")
            if pid and _writer_alive(int(pid)) and \
                    time.time() - stale.stat().st_mtime < STALE_AFTER_SECONDS:
                continue
            stale.unlink()


def _create_temp(path: Path) -> tuple[int, Path]:
    """A new, empty ``.NAME.<pid>.<random>.tmp`` beside ``path``, opened for writing with
    mode ``0o666`` (the umask applies), and its file descriptor."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:  # 32 random bits taken: draw again
            continue


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any], *,
                 parents: bool = False) -> None:
    """Call ``write(handle)`` on a temp file in ``path``'s folder, fsync, rename over ``path``:
    readers see the old file or the whole new one, never a half-written one. ``parents``:
    create the missing folders above ``path`` first. A refused write (``OSError``: a full
    disk, a read-only folder) removes the temp file and raises
    :class:`~otlt.errors.OtltError` naming ``path`` and the reason."""
    path = Path(path)
    remove_stale_temps(path)
    with writing(path):  # a full disk or a read-only folder: one line, the old file kept
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _create_temp(path)
        try:
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_text_atomic(path: str | Path, text: str, *, parents: bool = False) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`write_atomic`."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data), parents=parents)
