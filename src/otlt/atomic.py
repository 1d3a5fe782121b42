"""Atomic file writes: a reader sees the old file or the whole new one, never half of one.

Every file otlt writes into a run directory or a results folder goes through
:func:`write_atomic`: the bytes go to a temp file in the target's folder (same file system,
so the rename is atomic), are fsynced, and the temp file is renamed over the target. A
process stopped in the middle (a preemption, SIGKILL, a full disk) leaves the previous file
and at most a stale ``.NAME.*.tmp``, which the next write of that name removes. A file gets
the mode a plain ``open(path, "w")`` would give it (``0o666`` less the umask).

The lowest layer (beside :mod:`otlt.errors`), so the config writer, the engine's
checkpoints and logs, and the reports share one implementation.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from otlt.errors import writing


def remove_stale_temps(path: str | Path) -> None:
    """Delete leftover temp files of an interrupted :func:`write_atomic` to ``path``."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def write_atomic(path: str | Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(handle)`` on a temp file in ``path``'s folder, fsync, rename over ``path``:
    readers see the old file or the whole new one, never a half-written one. A refused write
    (``OSError``: a full disk, a read-only folder) removes the temp file and raises
    :class:`~otlt.errors.OtltError` naming ``path`` and the reason."""
    path = Path(path)
    remove_stale_temps(path)
    with writing(path):  # a full disk or a read-only folder: one line, the old file kept
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, _new_file_mode())  # mkstemp's 0600 would hide results from the group
            with os.fdopen(fd, "wb") as handle:
                write(handle)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` would give a new file: ``0o666`` less the umask."""
    umask = os.umask(0o022)  # reading the umask means setting it; set it back at once
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with :func:`write_atomic`."""
    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data))
