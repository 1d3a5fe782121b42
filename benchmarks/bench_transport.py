"""Time otlt.transport against POT and scipy on the OT problems of OTmix and OT re-weighting.

Prints Markdown tables (results are recorded in benchmarks/transport.md):

1. Sinkhorn to ``tol`` on ``B x B`` float32 costs: ``otlt.transport.sinkhorn`` against POT's
   ``ot.sinkhorn(method="sinkhorn_log")`` and plain ``ot.sinkhorn`` (NumPy float32 on CPU,
   POT's torch backend on CUDA), plus a plain ``torch.logsumexp`` loop with otlt's iteration
   count as the log-domain reference. POT's iterations are capped so that the run stays short
   (a capped run says so); its stopping threshold is ``tol / sqrt(B)`` on its L2 criterion, so
   that it reaches at least the same L1 accuracy. Every plan's L1 marginal error is recomputed
   in float64 by this script.
2. ``otlt.transport.assignment`` (scipy ``linear_sum_assignment``) for the same sizes.
3. How often the argmax of the ε = 0.01 plan is the exact assignment partner (OTmix eq. 8).

Costs:
- ``otmix``: C = 0.05 (1 − cos(z_i, z_j)) + 0.95 (1 − F[y_i, y_j]) with random 64-d features,
  10 classes and a random row-normalised confusion F with zero diagonal (eq. 7), ε = 0.01.
- ``reweight``: C = 0.5 (1 − cos(z_meta, z_train)) + 0.5 · (2/K if the labels differ), ε = 0.1.

Usage::

    PYTHONPATH=src python benchmarks/bench_transport.py            # full, ~2 minutes on 2 cores
    PYTHONPATH=src python benchmarks/bench_transport.py --quick    # B = 64, 256; seconds
    PYTHONPATH=src python benchmarks/bench_transport.py --device cuda
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from otlt.engine.provenance import cpu_name
from otlt.transport import SinkhornConvergenceWarning, assignment, sinkhorn

try:
    import ot
except ImportError:  # POT is a dev dependency only
    ot = None

EPS = {"otmix": 0.01, "reweight": 0.1}


def make_cost(kind: str, size: int, gen: torch.Generator, classes: int = 10) -> torch.Tensor:
    """Return a ``(size, size)`` float32 cost of the given kind (see the module docstring)."""
    z = torch.nn.functional.normalize(torch.randn(size, 64, generator=gen), dim=1)
    y = torch.randint(0, classes, (size,), generator=gen)
    if kind == "otmix":
        confusion = torch.rand(classes, classes, generator=gen).fill_diagonal_(0)
        confusion = confusion / confusion.sum(1, keepdim=True)
        return 0.05 * (1 - z @ z.T) + 0.95 * (1 - confusion[y][:, y])
    z_meta = torch.nn.functional.normalize(torch.randn(size, 64, generator=gen), dim=1)
    y_meta = torch.randint(0, classes, (size,), generator=gen)
    label = (y_meta[:, None] != y[None, :]).float() * (2.0 / classes)
    return 0.5 * (1 - z_meta @ z.T) + 0.5 * label


def timed(fn: Callable[[], object], repeats: int, device: str) -> tuple[float, object]:
    """Return the median wall time in ms over ``repeats`` calls (after one warm-up) and a result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out


def marginal_l1(plan: np.ndarray) -> float:
    """Return ``|T 1 − 1/n|₁ + |Tᵀ 1 − 1/m|₁`` computed in float64."""
    plan = np.asarray(plan, dtype=np.float64)
    n, m = plan.shape
    return float(np.abs(plan.sum(1) - 1 / n).sum() + np.abs(plan.sum(0) - 1 / m).sum())


def logsumexp_loop(cost: torch.Tensor, eps: float, iters: int) -> torch.Tensor:
    """Plain log-domain Sinkhorn with ``torch.logsumexp``, a fixed number of iterations."""
    n, m = cost.shape
    neg = -cost / eps
    la, lb = -math.log(n), -math.log(m)
    f = torch.zeros(n, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(m, dtype=cost.dtype, device=cost.device)
    for _ in range(iters):
        f = -torch.logsumexp(neg + (g + lb)[None, :], dim=1)
        g = -torch.logsumexp(neg + (f + la)[:, None], dim=0)
    return torch.exp(neg + f[:, None] + g[None, :] + la + lb)


def sinkhorn_rows(kind: str, size: int, args: argparse.Namespace) -> list[list[str]]:
    eps = EPS[kind]
    cost = make_cost(kind, size, torch.Generator().manual_seed(size)).to(args.device)
    repeats = args.repeats if size <= 256 else max(1, args.repeats // 2)  # keeps the run short
    rows = []

    def ours() -> object:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SinkhornConvergenceWarning)
            return sinkhorn(cost, eps=eps, tol=args.tol, max_iter=args.max_iter)

    ms, res = timed(ours, repeats, args.device)
    iters = res.n_iter
    rows.append(_row(kind, size, "otlt sinkhorn", iters, res.converged,
                     marginal_l1(res.coupling.cpu().numpy()), ms))
    ms, plan = timed(lambda: logsumexp_loop(cost, eps, iters), repeats, args.device)
    rows.append(_row(kind, size, "torch.logsumexp loop", iters, None,
                     marginal_l1(plan.cpu().numpy()), ms))
    if ot is None:
        return rows
    # POT runs on NumPy on the CPU, and on its torch backend when the device is CUDA.
    if args.device == "cuda":
        pot_cost = cost
        uniform = torch.full((size,), 1.0 / size, device=cost.device)
    else:
        pot_cost = cost.cpu().numpy()
        uniform = np.full(size, 1.0 / size, dtype=np.float32)
    cap = args.pot_cap if size >= 512 else args.max_iter
    # POT stops on the L2 norm of the column violation; |x|₁ <= sqrt(B) |x|₂, so this threshold
    # asks POT for at least the L1 accuracy that otlt's `tol` asks for.
    stop = args.tol / math.sqrt(size)
    for method, label in [("sinkhorn_log", "POT sinkhorn_log"), ("sinkhorn", "POT sinkhorn")]:
        def pot(method: str = method) -> object:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return ot.sinkhorn(uniform, uniform, pot_cost, eps, method=method,
                                   numItermax=cap, stopThr=stop, log=True)
        ms, (plan, log) = timed(pot, 1 if size >= 512 else repeats, args.device)
        plan = plan.cpu().numpy() if isinstance(plan, torch.Tensor) else plan
        n_iter = int(log["niter"]) + 1
        finite = bool(np.isfinite(plan).all())
        err = marginal_l1(plan) if finite else math.nan
        note = "NaN" if not finite else ("cap" if n_iter >= cap else None)
        rows.append(_row(kind, size, label, n_iter, note is None and err <= 2 * args.tol, err,
                         ms, note))
    return rows


def _row(kind: str, size: int, solver: str, iters: int, converged: bool | None, err: float,
         ms: float, note: str | None = None) -> list[str]:
    conv = "-" if converged is None else ("yes" if converged else "no")
    if note:
        conv = f"{conv} ({note})"
    return [kind, f"{EPS[kind]:g}", str(size), solver, str(iters), conv, f"{err:.1e}",
            f"{ms:.1f}", f"{ms / max(iters, 1):.3f}"]


def assignment_rows(size: int, args: argparse.Namespace) -> list[list[str]]:
    cost = make_cost("otmix", size, torch.Generator().manual_seed(size)).to(args.device)
    ms, _ = timed(lambda: assignment(cost), args.repeats, args.device)
    return [[str(size), args.device, f"{ms:.2f}"]]


def agreement(args: argparse.Namespace, size: int = 128, seeds: int = 10) -> list[list[str]]:
    """Return per-seed agreement of argmax(plan) with the exact assignment at ε = 0.01."""
    rates, iters, distinct = [], [], []
    for seed in range(seeds):
        cost = make_cost("otmix", size, torch.Generator().manual_seed(1000 + seed))
        res = sinkhorn(cost.to(args.device), eps=0.01, tol=args.tol, max_iter=5000)
        partner = res.coupling.argmax(1).cpu()
        rates.append((partner == assignment(cost)).double().mean().item())
        iters.append(res.n_iter)
        distinct.append(partner.unique().numel() / size)
    return [[str(size), str(seeds), f"{statistics.mean(rates):.3f}",
             f"{min(rates):.3f}–{max(rates):.3f}", f"{statistics.mean(distinct):.3f}",
             f"{statistics.median(iters):.0f} ({min(iters)}–{max(iters)})"]]


def stability(args: argparse.Namespace, size: int = 128) -> list[list[str]]:
    """Return whether each solver gives a finite plan on costs in [0, 2] with an all-2 row."""
    cost = 2 * torch.rand(size, size, generator=torch.Generator().manual_seed(7))
    cost[0] = 2.0  # exp(-2 / 0.01) underflows to 0 in float32: the plain kernel has a zero row
    uniform = np.full(size, 1.0 / size, dtype=np.float32)
    rows = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = sinkhorn(cost.to(args.device), eps=0.01, tol=1e-5, max_iter=5000)
        plans = {"otlt sinkhorn": res.coupling.cpu().numpy()}
        if ot is not None:
            for method in ["sinkhorn_log", "sinkhorn"]:
                plans[f"POT {method}"] = ot.sinkhorn(uniform, uniform, cost.numpy(), 0.01,
                                                     method=method, numItermax=5000,
                                                     stopThr=1e-5 / math.sqrt(size))
    for name, plan in plans.items():
        finite = bool(np.isfinite(plan).all())
        err = f"{marginal_l1(plan):.1e}" if finite else "-"
        rows.append([name, "yes" if finite else "no (NaN/inf)", err])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def hardware(device: str) -> str:
    text = f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    if ot is not None:
        text += f", POT {ot.__version__}"
    if device == "cuda":
        text += f", {torch.cuda.get_device_name()}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="B = 64 and 256 only")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--tol", type=float, default=1e-6)
    parser.add_argument("--max-iter", type=int, default=2000)
    parser.add_argument("--pot-cap", type=int, default=200,
                        help="iteration cap for POT at B >= 512 (it is slow there)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [64, 256] if args.quick else args.sizes
    start = time.perf_counter()
    print(f"Hardware: {hardware(args.device)}; device {args.device}; tol {args.tol:g}\n")
    header = ["cost", "ε", "B", "solver", "iterations", "converged", "L1 marginal err",
              "time ms", "ms/iter"]
    rows = [r for kind in EPS for size in sizes for r in sinkhorn_rows(kind, size, args)]
    print(table(header, rows) + "\n")
    rows = [r for size in sizes for r in assignment_rows(size, args)]
    print(table(["B", "device", "assignment ms"], rows) + "\n")
    print(table(["B", "seeds", "argmax = assignment", "range", "distinct partners",
                 "iterations median (range)"], agreement(args)) + "\n")
    print(table(["solver (float32, ε = 0.01, costs in [0, 2], one all-2 row, B = 128)",
                 "finite plan", "L1 marginal err"], stability(args)) + "\n")
    print(f"Total wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
