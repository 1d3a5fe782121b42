"""Process-group helpers so the engine runs the same under ``torchrun`` and alone."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    """Only rank 0 logs, writes files and prints."""
    return rank() == 0


def init_from_env(device: torch.device) -> None:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not is_distributed():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op when not distributed)."""
    if is_distributed():
        dist.all_reduce(tensor)
    return tensor


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / torch.compile wrappers (what checkpoints hold)."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)
