"""Process-group helpers so the engine runs the same under ``torchrun`` and alone.

The rules (README, "Several GPUs and nodes"):

- ``torchrun`` sets ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE``; :func:`setup_process` joins
  the process group before anything touches the run directory and puts each process on
  ``cuda:LOCAL_RANK`` (NCCL) or the CPU (gloo).
- ``optim.batch_size`` is the **global** batch: every step draws one global batch (indices,
  crops, flips, partners, coins) from the generator all ranks share, and rank ``r`` takes
  rows ``[r * B / W, (r + 1) * B / W)`` (:func:`rank_slice`). A last batch that does not split
  evenly is padded by wrapping around the epoch's order (:func:`global_batches`), so every
  rank takes the same number of equally shaped steps and a 2-process run follows the
  1-process recipe.
- Only rank 0 writes files and prints.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import inspect
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from otlt.errors import OtltError

T = TypeVar("T")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def launched_world_size() -> int:
    """``WORLD_SIZE`` as ``torchrun`` set it (1 when launched alone)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """Only rank 0 logs, writes files and prints."""
    return rank() == 0


def setup_process(device: torch.device, timeout: float | None = None) -> torch.device:
    """Join the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1; a group the
    caller joined already is used as it is) and return this process's device:
    ``cuda:LOCAL_RANK`` (made current) for CUDA, else ``device``.

    NCCL for CUDA (bound to this process's GPU, ``device_id``), gloo otherwise; ``timeout``
    seconds (``train.dist_timeout``) bound how long a rank waits for a peer that died in a
    collective before it fails too. A group joined here is left at interpreter exit
    (``atexit``) as well, so a script that builds a trainer itself and never calls
    :func:`teardown_process` still stops the group's threads while the interpreter is alive."""
    if launched_world_size() <= 1 and not is_distributed():
        return device
    if device.type == "cuda":  # also in a group the caller joined (any world size)
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not is_distributed():
        options: dict[str, Any] = {}
        if timeout is not None:
            options["timeout"] = datetime.timedelta(seconds=timeout)
        if device.type == "cuda" and "device_id" in inspect.signature(
                dist.init_process_group).parameters:  # torch >= 2.3
            options["device_id"] = device
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **options)
        atexit.register(teardown_process)
    return device


def teardown_process(synchronize: bool = False) -> None:
    """Leave the process group (``destroy_process_group``) if this process joined one: its
    communication threads then stop before the interpreter exits, instead of being torn down
    with it (which aborted a gloo process now and then: "terminate called without an active
    exception", SIGABRT: gloo's worker threads still held tensors when the interpreter was
    finalised). Safe to call twice.

    ``synchronize=True`` waits at a barrier first, so no rank destroys its group while
    another is still finishing its last collective (PyTorch's advice for a clean shutdown;
    a destroy racing a peer can hang, pytorch/pytorch#75097). Only for a command every
    rank finished: after an error the other ranks may never reach the barrier, so the
    error path and the ``atexit`` handler leave without it."""
    if dist.is_available() and dist.is_initialized():
        if synchronize:
            dist.barrier()
        dist.destroy_process_group()


def collective_device_types() -> frozenset[str] | None:
    """The device types the default process group communicates on: ``{"cuda"}`` for NCCL,
    ``{"cpu", "cuda"}`` for gloo, the named ones for a per-device backend such as
    ``"cpu:gloo,cuda:nccl"`` (None: not distributed)."""
    if not is_distributed():
        return None
    return backend_device_types(str(dist.get_backend()))


@functools.lru_cache(maxsize=8)
def backend_device_types(backend: str) -> frozenset[str]:
    """The device types a backend string names (parsed once per string: every collective
    asks)."""
    backend = backend.lower()
    if ":" in backend:
        return frozenset(pair.split(":")[0].strip() for pair in backend.split(","))
    return frozenset({"cuda"} if backend == "nccl" else {"cpu", "cuda"})


def check_collective_device(tensor: torch.Tensor) -> None:
    """Refuse a collective on a tensor the process group cannot communicate (a CPU tensor
    under NCCL fails in torch with "No backend type associated with device type cpu"). The
    engine keeps every collective on the training device; this check makes a slip fail the
    same way under gloo on the CPU, in the tests, as it would under NCCL on GPUs."""
    types = collective_device_types()
    if types is not None and tensor.device.type not in types:
        raise RuntimeError(f"collective on a {tensor.device.type} tensor, but the process "
                           f"group ({dist.get_backend()}) communicates only on "
                           f"{', '.join(sorted(types))}: reduce on the training device")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (no-op when not distributed); the tensor must lie
    on a device the group communicates on (:func:`check_collective_device`)."""
    if is_distributed():
        check_collective_device(tensor)
        dist.all_reduce(tensor)
    return tensor


def all_reduce_counters(stats: dict[str, Any] | None, device: torch.device) -> None:
    """Sum a per-rank counter dict over ranks in place (tensors and non-bool numbers;
    e.g. a mixer's ``mix_pairs``); nothing outside ``torch.distributed`` or for ``None``."""
    if not is_distributed() or not isinstance(stats, dict):
        return
    for key, value in stats.items():
        if isinstance(value, torch.Tensor):
            stats[key] = all_reduce_sum(value.to(device))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            total = all_reduce_sum(torch.tensor(float(value), device=device)).item()
            stats[key] = type(value)(total)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def on_main_then_share(fn: Callable[[], T]) -> T:
    """Run ``fn`` on rank 0 only and give its result to every rank; an :class:`OtltError`
    on rank 0 is raised on every rank (so no rank waits for one that failed)."""
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if is_main_process():
        try:
            box[0] = ("ok", fn())
        except OtltError as exc:
            box[0] = ("error", str(exc))
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise OtltError(value)
    return value


def average_buffers(module: torch.nn.Module) -> None:
    """Average every floating buffer (BatchNorm running statistics) over ranks in place:
    timm's ``--dist-bn reduce``, so every rank evaluates and saves the same model."""
    if not is_distributed():
        return
    world = world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            all_reduce_sum(buf).div_(world)


def global_batches(order: torch.Tensor, batch_size: int, world: int) -> list[torch.Tensor]:
    """Cut an epoch's order ``(N,)`` into global batches of ``batch_size`` (the last one
    shorter); when ``world`` > 1 the last one is padded with the order's first indices up
    to a multiple of ``world``, so it splits evenly over the ranks."""
    batches = list(order.split(batch_size))
    if world > 1 and batches and len(batches[-1]) % world:
        pad = world - len(batches[-1]) % world
        batches[-1] = torch.cat([batches[-1], order.repeat(pad // len(order) + 1)[:pad]])
    return batches


def rank_slice(n: int) -> slice:
    """This rank's rows of a global batch of ``n`` rows (``n`` divisible by the world)."""
    world = world_size()
    share = n // world
    return slice(rank() * share, (rank() + 1) * share)
