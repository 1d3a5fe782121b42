"""What a run stands on: its device, its autocast precision, its optimizer's kernel, its data
on the device, its run directory."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch

from otlt.config import RunConfig, TrainConfig
from otlt.engine.distributed import is_distributed
from otlt.engine.syncbn import convert_sync_batchnorm
from otlt.errors import OtltError
from otlt.models import create_model
from otlt.models.precision import to_float64


def build_model(cfg: RunConfig, device: torch.device) -> torch.nn.Module:
    """``model.name`` initialised from ``seed`` and placed on ``device`` as ``train.*`` asks
    (float64, channels-last, synchronised BatchNorm under ``torch.distributed``): the model
    checkpoints hold and evaluation runs."""
    model = create_model(cfg.model.name, cfg.num_classes, head=cfg.model.head,
                         generator=torch.Generator().manual_seed(cfg.seed))
    train = cfg.train
    model.to(device)
    if train.float64:
        to_float64(model)
    if train.channels_last:
        model.to(memory_format=torch.channels_last)
    if is_distributed() and train.sync_bn:  # torch's on CUDA, ours elsewhere (gloo)
        model = convert_sync_batchnorm(model, device.type)
    return model


def check_step_options(train: TrainConfig, device: torch.device) -> None:
    """``train.cuda_graphs`` needs a CUDA device (graph capture is CUDA's) and one process
    (under ``torch.distributed`` its DDP and SyncBatchNorm collectives inside the graphs
    have not been checked on GPUs yet)."""
    if not train.cuda_graphs:
        return
    if device.type != "cuda":
        raise OtltError(f"train.cuda_graphs needs a CUDA device (this run's is {device.type}); "
                        "drop it (--set train.cuda_graphs=false), or use train.compile")
    if is_distributed():
        raise OtltError("train.cuda_graphs is not checked under torchrun yet (DDP and "
                        "SyncBatchNorm inside CUDA graphs); drop it, or use train.compile")


def step_model_for(model: torch.nn.Module, train: TrainConfig,
                   device: torch.device) -> torch.nn.Module:
    """What the training step calls: ``model`` itself; compiled (``train.compile``); or
    compiled in ``reduce-overhead`` mode (``train.cuda_graphs``: forward and backward
    replayed as CUDA graphs, one graph per batch shape, so the partial last batch has its
    own); wrapped in DistributedDataParallel under ``torch.distributed``. It shares
    ``model``'s parameters and buffers."""
    check_step_options(train, device)
    step_model = model
    if train.cuda_graphs:
        step_model = torch.compile(model, mode="reduce-overhead")
    elif train.compile:
        step_model = torch.compile(model)
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        step_model = torch.nn.parallel.DistributedDataParallel(step_model, device_ids=ids)
    return step_model


def rng_states(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """The random states a checkpoint carries for an exact resume: the run's ``generator``,
    torch's global CPU state and, on CUDA, ``device``'s (CPU ByteTensors)."""
    states = {"generator": generator.get_state(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(state: dict[str, Any], generator: torch.Generator,
                       device: torch.device) -> None:
    """Put back :func:`rng_states`' entries of ``state`` (the CUDA one only on CUDA)."""
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for CUDA without one is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OtltError(f"train.device={name} but no CUDA device is available: use "
                        "--set train.device=cpu or auto (a resume takes it too)")
    return torch.device(name)


def configure_kernels(device: torch.device, deterministic: bool) -> None:
    """cuDNN's kernel choice (``train.deterministic``). Off (default): ``cudnn.benchmark``
    picks the fastest convolution kernels, which need not be bit-reproducible, so a resumed
    CUDA run follows the same data, augmentation and mixing draws but its weights drift from
    an uninterrupted run's by float rounding. On: cuDNN's deterministic kernels and torch's
    deterministic algorithms (``torch.use_deterministic_algorithms``, warning once for an op
    that has none instead of failing), at some speed; ``scripts/device_check.py`` checks a
    killed and resumed CUDA run against an uninterrupted one bit for bit under it. The CPU
    kernels the engine uses are deterministic either way."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic
        torch.backends.cudnn.deterministic = deterministic


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA and on CPUs with native bf16; fp16 only when asked; None for off."""
    if amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16
    return torch.bfloat16 if torch.cpu._is_avx512_bf16_supported() else None


def sgd_options(device: torch.device) -> dict[str, Any]:
    """The run's ``torch.optim.SGD`` keyword arguments on ``device``: ``fused=True`` on CUDA
    (the whole update, momentum and weight decay included, in one kernel launch; with fp16
    the :class:`~torch.amp.GradScaler` hands it the inf check on the device, no host read)
    and torch's default ``fused=None`` elsewhere, so CPU training is unchanged. Empty on a
    torch whose SGD has no ``fused`` argument."""
    if "fused" not in inspect.signature(torch.optim.SGD).parameters:
        return {}
    return {"fused": True if device.type == "cuda" else None}


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         device: torch.device) -> None:
    """Load ``state`` into ``optimizer`` and keep this device's :func:`sgd_options`:
    ``load_state_dict`` would carry the saving run's ``fused`` flag along (a CUDA run
    resumed on the CPU would otherwise step with the fused CPU kernel)."""
    optimizer.load_state_dict(state)
    options = sgd_options(device)
    for group in optimizer.param_groups:
        group.update(options)


class DeviceSplit:
    """One split as uint8 ``(N, H, W, 3)`` images and ``(N,)`` labels on the device."""

    def __init__(self, arrays, device: torch.device):
        self.images = torch.from_numpy(arrays.images).to(device)
        self.labels = torch.from_numpy(arrays.labels).long().to(device)

    def __len__(self) -> int:
        return len(self.labels)


def run_dir_path(cfg: RunConfig, run_dir: str | Path | None = None) -> Path:
    """The run's directory: ``run_dir`` when given, else ``cfg.out_dir/cfg.name``."""
    return Path(run_dir) if run_dir else Path(cfg.out_dir) / cfg.name


def open_run_dir(cfg: RunConfig, run_dir: Path | None, resume: bool) -> Path:
    """Create (or, for resume, check) the run directory without touching an existing run."""
    run_dir = run_dir_path(cfg, run_dir)
    if resume:
        if not (run_dir / "last.pt").is_file() and not (run_dir / "config.yaml").is_file():
            raise OtltError(f"cannot resume: {run_dir / 'last.pt'} does not exist")
        return run_dir  # config.yaml without last.pt: it died in epoch 1; start it afresh
    if (run_dir / "last.pt").exists():
        raise OtltError(f"run directory {run_dir} already holds a run; resume it with "
                        f"'otlt train --resume {run_dir}' or choose another name "
                        "(--set name=...)")
    if (run_dir / "config.yaml").exists():
        raise OtltError(f"run directory {run_dir} holds a run that stopped before its first "
                        f"epoch ended (no last.pt); start it afresh with 'otlt train --resume "
                        f"{run_dir}', or remove it with 'rm -r {run_dir}'")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc
        raise OtltError(f"run directory {run_dir} is not writable ({reason})") from None
    return run_dir
