"""Timing: interleaved samples, medians and paired ratios, and what a number needs beside it
(device, hardware, versions, load, threads)."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from otlt.engine.provenance import load_average
from otlt.errors import require


def interleaved_times(variants: dict[str, Callable[[], None]], *, steps: int, repeats: int,
                      warmup: int, sync: Callable[[], None]) -> dict[str, list[float]]:
    """Seconds per step of every variant, one sample per repeat, variants interleaved.

    Each variant first runs ``warmup`` steps (kernel selection, allocator, caches); then every
    repeat times ``steps`` consecutive steps of A, then of B, ... so slow drifts in background
    load spread over all variants alike.
    """
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    sync()
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            for _ in range(steps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / steps)
    return samples


def summarize_times(samples: list[float]) -> dict[str, Any]:
    """Median, min, max and the samples (seconds per step)."""
    return {"median_s": statistics.median(samples), "min_s": min(samples),
            "max_s": max(samples), "samples_s": samples}


def paired_ratio(num: list[float], den: list[float]) -> dict[str, float]:
    """Median, min and max of the per-repeat ratios ``num[r] / den[r]``."""
    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def time_call(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def choose_threads(requested: int | None, device: torch.device) -> tuple[int, str]:
    """Torch CPU threads for the bench, and why: as requested, else 1 on a busy CPU, else
    torch's default.

    On a CPU shared with other jobs, torch's threads wait for each other at every operator
    while the scheduler runs someone else: times swing several-fold. One thread is steadier.
    """
    if requested is not None:
        require(requested >= 1, f"--threads must be >= 1, got {requested}")
        return requested, "requested"
    load, cores = load_average(), os.cpu_count() or 1
    if device.type == "cpu" and cores > 1 and load is not None and load > 0.5 * cores:
        return 1, f"auto: CPU busy (load {load} on {cores} cores)"
    return torch.get_num_threads(), "torch default"
