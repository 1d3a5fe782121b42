"""Scaling study (``otlt bench --scaling``): Sinkhorn and exact assignment for B = 64 .. 1024,
and the OTmix step for batch sizes 64 .. 512."""

from __future__ import annotations

import statistics
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from otlt.bench.harness import BenchOptions, open_bench
from otlt.bench.timing import interleaved_times, paired_ratio, time_call
from otlt.engine.provenance import environment, load_average
from otlt.mixing import otmix_cost
from otlt.transport import assignment, sinkhorn

SCALING_OT_SIZES = (64, 128, 256, 512, 1024)


SCALING_STEP_SIZES = (64, 128, 256, 512)


def otmix_like_cost(batch: int, num_classes: int, generator: torch.Generator,
                    device: torch.device) -> torch.Tensor:
    """A ``(B, B)`` OTmix cost (eq. 7, omega = 0.05) from random features and confusion."""
    z = torch.randn(2 * batch, 64, generator=generator).relu()
    y = torch.randint(0, num_classes, (2 * batch,), generator=generator)
    confusion = torch.rand(num_classes, num_classes, generator=generator) \
        + 5 * torch.eye(num_classes)
    cost = otmix_cost(z[:batch], z[batch:], y[:batch], y[batch:], confusion, omega=0.05)
    return cost.to(device)


def scaling_transport(device: torch.device, sizes: Sequence[int], repeats: int,
                      sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Sinkhorn (eps = 0.01, tol = 1e-6) and exact assignment time per batch size."""

    rows = []
    for b in sizes:
        cost = otmix_like_cost(b, 10, torch.Generator().manual_seed(b), device)
        solved = sinkhorn(cost, eps=0.01)
        rows.append({"B": b, "sinkhorn_ms": 1e3 * time_call(
            lambda c=cost: sinkhorn(c, eps=0.01), repeats, sync),
            "sinkhorn_iters": solved.n_iter,
            "assignment_ms": 1e3 * time_call(lambda c=cost: assignment(c), repeats, sync)})
    return rows


def run_scaling(options: BenchOptions, ot_sizes: Sequence[int] = SCALING_OT_SIZES,
                step_sizes: Sequence[int] = SCALING_STEP_SIZES) -> dict[str, Any]:
    """Transport times for ``ot_sizes`` and ERM / OTmix step times for ``step_sizes``."""
    _, repeats, warmup = options.resolved()
    repeats = min(repeats, 5)
    with tempfile.TemporaryDirectory(prefix="otlt-bench-") as work:
        bench, cfg = open_bench(options, Path(work))
        env = {**environment(bench.device), "threads_reason": bench.threads_reason}
        transport = scaling_transport(bench.device, ot_sizes, max(repeats, 3), bench.sync)
        steps = []
        for b in step_sizes:
            bench.set_batch_size(b)
            s = interleaved_times({"erm": bench.erm, "otmix": bench.otmix_step,
                                   "pairing": bench.pairing, "features": bench.features},
                                  steps=1, repeats=repeats, warmup=max(warmup, 1),
                                  sync=bench.sync)
            med = {k: statistics.median(v) for k, v in s.items()}
            steps.append({"B": b, "erm_ms": 1e3 * med["erm"], "otmix_ms": 1e3 * med["otmix"],
                          "ratio_otmix_erm": paired_ratio(s["otmix"], s["erm"])["median"],
                          "features_ms": 1e3 * med["features"],
                          "pairing_ms": 1e3 * med["pairing"],
                          "pairing_share": paired_ratio(s["pairing"], s["otmix"])["median"]})
    return {**env, "load_average_1m_end": load_average(), "config": options.config,
            "model": cfg.model.name, "amp": str(bench.trainer.amp_dtype),
            "data": "synthetic" if options.synthetic else str(options.data or "find_data"),
            "repeats": repeats, "transport": transport, "otmix_step": steps}


def scaling_markdown(result: dict[str, Any]) -> str:
    """The scaling study as two small Markdown tables."""
    lines = [f"Device {result['device']} ({result['hardware']}, {result['threads']} threads "
             f"[{result.get('threads_reason', '')}]), "
             f"torch {result['torch_version']}, model {result['model']}, amp {result['amp']}, "
             f"load {result['load_average_1m']} -> {result['load_average_1m_end']}; medians "
             f"of {result['repeats']}+ repeats.", "",
             "| B | Sinkhorn ms (ε = 0.01, tol 1e-6) | iterations | assignment ms |",
             "|---:|---:|---:|---:|"]
    for r in result["transport"]:
        lines.append(f"| {r['B']} | {r['sinkhorn_ms']:.1f} | {r['sinkhorn_iters']} | "
                     f"{r['assignment_ms']:.1f} |")
    lines += ["", "| batch | ERM step ms | OTmix step ms | OTmix / ERM | feature pass ms | "
                  "pairing ms | pairing share |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["otmix_step"]:
        lines.append(f"| {r['B']} | {r['erm_ms']:.0f} | {r['otmix_ms']:.0f} | "
                     f"{r['ratio_otmix_erm']:.2f} | {r['features_ms']:.0f} | "
                     f"{r['pairing_ms']:.1f} | {100 * r['pairing_share']:.1f}% |")
    return "\n".join(lines) + "\n"
