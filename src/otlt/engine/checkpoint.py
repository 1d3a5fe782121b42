"""Checkpoint files that are atomic, checksummed, and cannot run code when read.

- Atomic: :func:`otlt.atomic.write_atomic` (temp file, fsync, rename), so a crash leaves
  the old file or the whole new one (a killed save's temp file is removed at the next save
  or load once its writer is gone or it is an hour old: :func:`otlt.atomic.remove_stale_temps`).
- Checksummed: ``last.pt`` is ``MAGIC + sha256(payload) + payload`` with the ``torch.save``
  payload after the header; a flipped byte is an error on load, not a silently different
  model. Files written before the header existed (a bare ``torch.save`` zip) still load.
- No code: the payload is read with ``torch.load(weights_only=True)`` (tensors, numbers,
  strings and containers only), so a tampered file cannot execute anything.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from otlt.atomic import remove_stale_temps, write_atomic
from otlt.errors import OtltError, reason

CHECKPOINT_FORMAT = 1
MAGIC = b"OTLTCKPT\x01"
_DIGEST_BYTES = 32


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write the checkpoint ``state`` to ``path``: header, checksum, ``torch.save`` payload."""
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **state}, buffer)
    payload = buffer.getvalue()
    digest = hashlib.sha256(payload).digest()
    write_atomic(path, lambda handle: handle.write(MAGIC + digest + payload))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_atomic`; bad files raise :class:`OtltError`."""
    path = Path(path)
    if not path.is_file():
        raise OtltError(f"checkpoint {path} does not exist (expected a last.pt written by "
                        "'otlt train')")
    remove_stale_temps(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise OtltError(f"cannot read checkpoint {path} ({exc.strerror or exc})") from None
    if data.startswith(MAGIC):
        start = len(MAGIC) + _DIGEST_BYTES
        digest, data = data[len(MAGIC):start], data[start:]
        if hashlib.sha256(data).digest() != digest:
            raise OtltError(f"checkpoint {path} is damaged: its checksum does not match its "
                            "content (a changed or truncated file); nothing was loaded")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise OtltError(f"checkpoint {path} is corrupt or not an otlt checkpoint, or it "
                        f"holds objects other than tensors and plain data "
                        f"({reason(exc, 120)})") from None
    version = state.get("format") if isinstance(state, dict) else None
    if isinstance(version, int) and version > CHECKPOINT_FORMAT:
        raise OtltError(f"checkpoint {path} has format version {version}, newer than this "
                        f"build of otlt reads (version {CHECKPOINT_FORMAT}); upgrade otlt "
                        "to load it")
    if version != CHECKPOINT_FORMAT:
        found = "no format version" if version is None else f"format version {version!r}"
        raise OtltError(f"checkpoint {path} is not an otlt checkpoint this build reads "
                        f"({found}; this build reads version {CHECKPOINT_FORMAT})")
    return state
