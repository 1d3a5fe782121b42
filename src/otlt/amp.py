"""One autocast context for every forward pass: the dtype, or no autocast for None."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch


def autocast(device: torch.device | str, dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context for None."""
    if dtype is None:
        return nullcontext()
    kind = device if isinstance(device, str) else device.type
    return torch.autocast(device_type=kind, dtype=dtype)


__all__ = ["autocast"]
