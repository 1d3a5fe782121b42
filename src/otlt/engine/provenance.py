"""What a number needs beside it: the machine, the libraries, the code, and for a run, one
line per sitting in ``sittings.jsonl``.

Retraining a run bit for bit needs more than its config: on the CPU the same CPU model and
torch thread count (bf16 convolutions reduce in a thread-dependent order: epoch 1 of one
preset gives training loss 1.8926 with 2 threads and 1.8886 with 1; docs/research.md), on a
GPU the same device and, unless ``train.deterministic``, cuDNN's kernel choice. So every
sitting of a run (its start and each ``--resume``) appends, on rank 0, one JSON line to
``<run_dir>/sittings.jsonl``::

    {"start_epoch": 30, "started": "2026-12-04T23:01:05Z", "device": "cpu",
     "hardware": "AMD EPYC", "cpu": {"vendor": "AuthenticAMD", "family": 25, "model": 17,
     "bf16": ["avx512_bf16"], "capability": "AVX512"}, "threads": 2, "cpu_count": 2,
     "world_size": 1, "torch_version": "2.13.0+cpu", "python": "3.11.2",
     "otlt_version": "0.1.0", "git_commit": "6e7cfe1...", "git_dirty": false,
     "load_average_1m": 1.9}

(``git_*`` are None when otlt is not imported from a git checkout). ``cpu`` is written on the
CPU only: a virtual machine's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor") names no
model, and the instruction sets decide which kernels oneDNN runs, so two hosts under one name
can compute different numbers. ``vendor``, ``family``, ``model`` and ``bf16`` (the bf16
instruction sets present; None where cpuinfo lists no flags) come from ``/proc/cpuinfo``
where it has them (Linux x86); ``capability`` is the kernel set torch dispatches to on any
host (``torch.backends.cpu.get_cpu_capability()``: "AVX512", "AVX2", ...). Nothing in the
engine reads the file back; a result's README quotes it (``scripts/collect_results.py``).
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
    cpu = None
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware, cpu = cpu_name(), {**(cpu_identity() or {}), "capability": cpu_capability()}
    return {"device": str(device), "hardware": hardware, **({"cpu": cpu} if cpu else {}),
            "torch_version": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "load_average_1m": load_average()}


#: The bf16 instruction sets that change which CPU kernels run (oneDNN dispatches on them).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_name() -> str:
    """The CPU's model name as ``/proc/cpuinfo`` gives it, else what Python's platform says."""
    return (_first_value(_read_cpuinfo(), "model name") or platform.processor()
            or platform.machine() or "unknown CPU")


def cpu_capability() -> str | None:
    """The CPU kernel set torch dispatches to ("AVX512", "AVX2", "DEFAULT", ...); None where
    this torch cannot say."""
    probe = getattr(torch.backends.cpu, "get_cpu_capability", None)
    return probe() if probe is not None else None


def cpu_identity(cpuinfo: str | None = None) -> dict[str, Any] | None:
    """The first processor's vendor, family, model and bf16 instruction sets, parsed from the
    text of ``/proc/cpuinfo`` (this machine's when ``cpuinfo`` is None); None where the text
    has no family or model (not Linux, or an architecture whose cpuinfo has other fields)."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    family, model = _first_value(cpuinfo, "cpu family"), _first_value(cpuinfo, "model")
    if family is None or model is None or not (family.isdigit() and model.isdigit()):
        return None
    flags = _first_value(cpuinfo, "flags")
    return {"vendor": _first_value(cpuinfo, "vendor_id"), "family": int(family),
            "model": int(model),
            "bf16": None if flags is None else [f for f in BF16_FLAGS if f in flags.split()]}


def describe_cpu(cpu: Any) -> str:
    """A sitting's ``cpu`` record as text, "GenuineIntel family 6 model 167, bf16: avx512_bf16
    amx_bf16, kernels AVX512" (the parts it has); "not recorded" for None (a record from
    before the field, or not from a CPU); anything else as it is."""
    if cpu is None:
        return "not recorded"
    if not isinstance(cpu, dict):
        return str(cpu)
    parts = []
    if "family" in cpu:
        bf16 = cpu.get("bf16")
        parts += [f"{cpu.get('vendor') or 'unknown vendor'} family {cpu['family']} model "
                  f"{cpu.get('model')}",
                  "bf16: " + ("unknown" if bf16 is None else " ".join(bf16) or "none")]
    if cpu.get("capability"):
        parts.append(f"kernels {cpu['capability']}")
    return ", ".join(parts) or "not recorded"


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _first_value(cpuinfo: str, key: str) -> str | None:
    """The value of the first ``key : value`` line of cpuinfo text whose key is exactly ``key``."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return None


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


__all__ = ["BF16_FLAGS", "code_version", "cpu_capability", "cpu_identity", "cpu_name",
           "describe_cpu", "environment", "load_average", "provenance", "record_sitting"]
