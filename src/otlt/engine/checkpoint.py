"""Atomic checkpoint files: a crash never leaves a half-written ``last.pt``.

Checkpoints are read with ``weights_only=True``: tensors, numbers, strings and containers
only, so a tampered ``last.pt`` cannot run code when it is loaded.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch

from otlt.errors import OtltError

CHECKPOINT_FORMAT = 1


def write_atomic(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(handle)`` on a temp file in ``path``'s folder, fsync, rename over ``path``:
    readers see the old file or the whole new one, never a half-written one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write the checkpoint ``state`` to ``path`` atomically (:func:`write_atomic`)."""
    write_atomic(path, lambda handle: torch.save({"format": CHECKPOINT_FORMAT, **state}, handle))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; bad files raise :class:`OtltError`."""
    path = Path(path)
    if not path.is_file():
        raise OtltError(f"checkpoint {path} does not exist (expected a last.pt written by "
                        "'otlt train')")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged file
        raise OtltError(f"checkpoint {path} is corrupt or not an otlt checkpoint "
                        f"({type(exc).__name__}: {str(exc)[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise OtltError(f"checkpoint {path} is not an otlt checkpoint "
                        f"(format {CHECKPOINT_FORMAT} expected)")
    return state
