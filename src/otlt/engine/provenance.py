"""What a number needs beside it: the machine, the libraries, the code, and for a run, one
line per sitting in ``sittings.jsonl``.

Retraining a run bit for bit needs more than its config: on the CPU the same machine kind
and torch thread count (bf16 convolutions reduce in a thread-dependent order: epoch 1 of one
preset gives training loss 1.8926 with 2 threads and 1.8886 with 1; docs/research.md), on a
GPU the same device and, unless ``train.deterministic``, cuDNN's kernel choice. So every
sitting of a run (its start and each ``--resume``) appends, on rank 0, one JSON line to
``<run_dir>/sittings.jsonl``::

    {"start_epoch": 30, "started": "2026-12-04T23:01:05Z", "device": "cpu",
     "hardware": "AMD EPYC", "threads": 2, "cpu_count": 2, "world_size": 1,
     "torch_version": "2.13.0+cpu", "python": "3.11.2", "otlt_version": "0.1.0",
     "git_commit": "6e7cfe1...", "git_dirty": false, "load_average_1m": 1.9}

(``git_*`` are None when otlt is not imported from a git checkout). Nothing reads the file;
it is the record a result's README quotes.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from otlt.errors import writing


def environment(device: torch.device) -> dict[str, Any]:
    """Device, hardware, library versions and load: what a number needs beside it."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = _cpu_name()
    return {"device": str(device), "hardware": hardware, "torch_version": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "python": platform.python_version(), "load_average_1m": load_average()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def code_version() -> dict[str, Any]:
    """otlt's installed version and, when it is imported from a git checkout, the commit and whether
    tracked files differ from it (``git_dirty``); None where git or the checkout is absent."""
    source = Path(__file__).resolve().parents[1]  # the otlt package
    try:
        installed = metadata.version("otlt")
    except metadata.PackageNotFoundError:  # imported from a source tree, not installed
        installed = None
    out: dict[str, Any] = {"otlt_version": installed, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return out
        status = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                 "--untracked-files=no"], capture_output=True, text=True,
                                timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return out
    out["git_commit"] = commit.stdout.strip()
    out["git_dirty"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    return out


def provenance(device: torch.device) -> dict[str, Any]:
    """:func:`environment` and :func:`code_version` together: what a sitting's line and a
    post-hoc evaluation record of where they were computed."""
    return {**environment(device), **code_version()}


def record_sitting(run_dir: Path, device: torch.device, start_epoch: int,
                   world_size: int) -> dict[str, Any]:
    """Append this sitting's line to ``run_dir/sittings.jsonl`` (see the module docstring)
    and return it. Call it on one process (rank 0)."""
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    line = {"start_epoch": start_epoch, "started": started, **provenance(device),
            "world_size": world_size}
    path = Path(run_dir) / "sittings.jsonl"
    with writing(path), path.open("a") as f:
        f.write(json.dumps(line) + "\n")
    return line


__all__ = ["code_version", "environment", "load_average", "provenance", "record_sitting"]
