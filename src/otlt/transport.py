"""Optimal-transport solvers: batched entropic Sinkhorn and exact assignment.

Two solvers serve the two OT methods of the library (the module stays whole, over 400 lines:
one solver family, its two numerical regimes and the math in their docstrings belong
together, as in POT's ``ot/bregman/_sinkhorn.py``):

- :func:`sinkhorn` solves the entropic OT problem of OTmix (paper 002, eq. 4, ε = 0.01) and of
  OT re-weighting (ε = 0.1) on whole batches of cost matrices, on any device, in float32 or
  float64. :func:`entropic_ot_value` is its value, differentiable in the marginals and the cost.
- :func:`assignment` is the exact (ε → 0) optimal one-to-one pairing, solved by
  ``scipy.optimize.linear_sum_assignment`` on the CPU.

Notation: cost ``C`` of shape ``(..., n, m)``, marginals ``a`` ``(..., n)`` and ``b`` ``(..., m)``
with equal total mass, regularisation ``ε > 0``. The entropic problem is

    OT_ε(a, b, C) = min_{T ≥ 0, T 1 = a, Tᵀ 1 = b}  <T, C> + ε KL(T ‖ a bᵀ)

whose solution is ``T_ij = a_i b_j exp((f_i + g_j − C_ij) / ε)`` for dual potentials ``f, g``.

Solver. :func:`sinkhorn` runs the stabilised Sinkhorn iteration with absorption (Schmitzer,
"Stabilized sparse scaling algorithms for entropy regularized transport problems", 2019):
the potentials live in the log domain and are absorbed into a kernel
``K_ij = exp((f_i + g_j − C_ij) / ε)`` whose entries stay in a safe range, while the iterations
between absorptions are two matrix-vector products. A block of iterations that overflows is
redone with log-sum-exp updates, and the first two iterations always use them, so no entry of
``exp(−C/ε)`` ever has to be representable: float32 at ε = 0.01 with costs up to 2 (where
``exp(−C/ε)`` underflows) is fine. On a 2-core CPU this is 2–6x faster per iteration than
plain log-sum-exp updates and 4–25x faster than POT's ``sinkhorn_log``, which also stalls at
~4e-6 marginal error in float32; POT's plain ``sinkhorn`` is as fast but fails at ε = 0.01
once a row's costs all exceed ~1 (``benchmarks/transport.md``). Hence the library uses its own
solver, not POT.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from otlt.errors import OtltError, require

__all__ = [
    "OTResult",
    "SinkhornConvergenceWarning",
    "assignment",
    "entropic_ot_value",
    "sinkhorn",
]

# Absorb the scalings into the kernel once |log scaling| exceeds this: e^±30 times kernel entries
# of at most ~n stays far from float32 overflow (e^88) over the next block of iterations.
_ABSORB_AT = 30.0
# Below this many entries torch.logsumexp's single call beats a hand-written max shift on CPU.
_SMALL_LSE = 1 << 16
# The first block runs in logs (before potentials exist exp(−C/ε) may underflow whole rows);
# two log-domain iterations already place the kernel safely (measured on costs of range
# C/ε up to 2000 with no fallback needed), and they are the expensive ones.
_FIRST_LOG = 2


class SinkhornConvergenceWarning(RuntimeWarning):
    """Sinkhorn stopped at ``max_iter`` with a marginal violation above ``tol``."""


@dataclass(frozen=True)
class OTResult:
    """Solution of a batch of entropic OT problems, as returned by :func:`sinkhorn`.

    Attributes:
        plan: ``(..., n, m)`` transport plan ``T``; its row and column sums equal ``a`` and ``b``
            up to ``marginal_error``.
        cost: ``(...,)`` transport cost of the plan ``<T, C> = Σ_ij T_ij C_ij``, *without* the
            entropy term (what POT's ``ot.sinkhorn2`` returns).
        objective: ``(...,)`` entropic value ``<f, a> + <g, b>``: the dual objective, equal to
            ``<T, C> + ε KL(T ‖ a bᵀ)`` at the optimum (see :func:`entropic_ot_value`).
        f: ``(..., n)`` dual potential of the rows (same units as the cost); ``(f + c, g − c)``
            is as optimal for any constant ``c``, so compare potentials up to a shift.
        g: ``(..., m)`` dual potential of the columns.
        n_iter: number of Sinkhorn iterations run (one iteration updates ``f`` then ``g``).
        converged: whether every problem of the batch reached ``marginal_error <= tol``.
        marginal_error: ``(...,)`` L1 marginal violation of ``plan``,
            ``Σ_i |Σ_j T_ij − a_i| + Σ_j |Σ_i T_ij − b_j|``.
    """

    plan: Tensor
    cost: Tensor
    objective: Tensor
    f: Tensor
    g: Tensor
    n_iter: int
    converged: bool
    marginal_error: Tensor


def sinkhorn(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_every: int = 10,
    warn: bool = True,
) -> OTResult:
    """Solve entropic OT ``min <T, C> + ε KL(T ‖ a bᵀ)`` over plans with marginals ``a``, ``b``.

    This is eq. 4 of the OTmix paper (``T = Sinkhorn(C, ε)``, uniform marginals) and the inner
    problem of OT re-weighting. Leading dimensions of ``cost`` are a batch of independent
    problems solved together.

    Args:
        cost: ``(..., n, m)`` cost matrices. Entries may be ``+inf`` (forbidden pairs). Half
            precision and integer costs are solved in float32, float64 in float64; OT is never
            computed in half precision.
        a: ``(..., n)`` or ``(n,)`` row marginal, nonnegative; uniform ``1/n`` if ``None``.
        b: ``(..., m)`` or ``(m,)`` column marginal with the same total mass as ``a``; uniform
            ``1/m`` if ``None``.
        eps: entropic regularisation ε > 0, in the units of the cost.
        max_iter: most iterations; a :class:`SinkhornConvergenceWarning` is issued if the batch
            has not converged by then.
        tol: stop when the L1 marginal violation (``OTResult.marginal_error``, rows plus
            columns) of every problem in the batch is at most ``tol``.
        check_every: test convergence every this many iterations (the first test comes after
            the two opening log-domain iterations). Each test reads three numbers back from
            the device, a host-device synchronisation on GPU, so it is not done every
            iteration; given ``a`` or ``b`` add one more read for their checks.
        warn: issue the non-convergence warning; callers that count ``OTResult.converged``
            themselves (OTMix, per epoch) turn it off.

    Returns:
        An :class:`OTResult` in the compute dtype (float32 or float64) on ``cost``'s device.

    Raises:
        OtltError: bad ``eps``, ``max_iter``, ``tol``, shapes or marginals (negative, unequal
            total mass), or a cost with NaN entries / a row or column with only ``+inf`` costs.

    Gradients flow through the iterations when an input requires grad (memory: two vectors per
    iteration plus one ``(..., n, m)`` kernel per absorption and per log-domain iteration). For
    the gradient of the OT value prefer :func:`entropic_ot_value`, which needs no graph through
    the iterations.
    """
    c, a_full, b_full = _prepare(cost, a, b, eps)
    _check_solver_args(max_iter, tol, check_every)
    return _solve(c, a_full, b_full, eps, max_iter, tol, check_every, warn)


def entropic_ot_value(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
) -> Tensor:
    """Return ``OT_ε(a, b, C)``, differentiable in ``a``, ``b`` and ``cost`` without unrolling.

    The value is the dual objective at the Sinkhorn potentials ``(f, g)``::

        OT_ε = <f, a> + <g, b> − ε Σ_ij a_i b_j (exp((f_i + g_j − C_ij) / ε) − 1)
             = min_T <T, C> + ε KL(T ‖ a bᵀ)        (at the optimum, where the last term is 0)

    Its gradients follow from the envelope theorem (the potentials are the maximisers, so they
    are held fixed): ``∂/∂a = f``, ``∂/∂b = g``, ``∂/∂C = T``, up to the tiny marginal error of
    the solution. Since ``(f + c, g − c)`` is optimal for any constant ``c``, the gradient in
    ``a`` is defined up to a constant: only its component along the simplex (entries summing to
    zero) is meaningful, which is what OT re-weighting uses. Memory is one ``(..., n, m)``
    matrix, whatever the iteration count.

    Args:
        cost: ``(..., n, m)`` cost matrices.
        a: ``(..., n)`` or ``(n,)`` row marginal; uniform if ``None``.
        b: ``(..., m)`` or ``(m,)`` column marginal; uniform if ``None``.
        eps: entropic regularisation ε > 0.
        max_iter: most Sinkhorn iterations (warns if not converged).
        tol: L1 marginal tolerance, as in :func:`sinkhorn`.

    Returns:
        ``(...,)`` values in the compute dtype of ``cost``.
    """
    c, a_full, b_full = _prepare(cost, a, b, eps)
    _check_solver_args(max_iter, tol, 10)
    with torch.no_grad():
        res = _solve(c.detach(), a_full.detach(), b_full.detach(), eps, max_iter, tol, 10)
    f, g = res.f, res.g
    outer = a_full[..., :, None] * b_full[..., None, :]
    # Bounded by 1 / max(a_i, b_j) (T_ij ≤ min(a_i, b_j)), also on a massless row or column;
    # only pairs where both are massless may overflow, and they carry no value or gradient.
    scaled = torch.exp((f[..., :, None] + g[..., None, :] - c) / eps)
    keep = (a_full > 0)[..., :, None] | (b_full > 0)[..., None, :]
    penalty = (outer * torch.where(keep, scaled, torch.zeros_like(scaled))).sum((-2, -1))
    penalty = penalty - outer.sum((-2, -1))
    return (f * a_full).sum(-1) + (g * b_full).sum(-1) - eps * penalty


def assignment(cost: Tensor) -> Tensor:
    """Return the exact optimal one-to-one partner of every row: ``argmin_σ Σ_i C[i, σ(i)]``.

    Solved by ``scipy.optimize.linear_sum_assignment`` (minimisation) on the CPU in float64,
    one problem at a time: the cost is copied to the host and the answer back, a host-device
    round trip by nature. This is the ε → 0 limit of :func:`sinkhorn`'s plan followed by a
    row-wise argmax (OTmix eq. 8).

    Args:
        cost: ``(n, m)`` or ``(..., n, m)`` finite costs with ``n <= m``.

    Returns:
        ``(..., n)`` int64 column indices, distinct within each problem, on ``cost``'s device.
    """
    require(cost.dim() >= 2, f"cost must have shape (..., n, m), got {tuple(cost.shape)}")
    n, m = cost.shape[-2:]
    require(n <= m, f"assignment needs n <= m (rows no more than columns), got cost "
                    f"{tuple(cost.shape)}")
    host = cost.detach().to("cpu", torch.float64).reshape(-1, n, m).numpy()
    require(bool(np.isfinite(host).all()), "assignment needs a finite cost matrix, got "
                                           "NaN or inf entries")
    cols = np.empty((host.shape[0], n), dtype=np.int64)
    for k, problem in enumerate(host):
        cols[k] = linear_sum_assignment(problem)[1]
    return torch.from_numpy(cols).reshape(cost.shape[:-1]).to(cost.device)


# ---------------------------------------------------------------------------------------------
# Input handling


def _compute_dtype(cost: Tensor) -> torch.dtype:
    require(not cost.is_complex(), f"cost must be real, got dtype {cost.dtype}")
    return torch.float64 if cost.dtype == torch.float64 else torch.float32


def _prepare(
    cost: Tensor, a: Tensor | None, b: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(C, a, b)`` in the compute dtype, marginals broadcast to the batch shape."""
    require(isinstance(cost, Tensor) and cost.dim() >= 2,
            f"cost must be a tensor of shape (..., n, m), got {getattr(cost, 'shape', cost)!r}")
    require(isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps)
            and eps > 0, f"eps must be a positive number, got {eps!r}")
    n, m = cost.shape[-2:]
    require(n > 0 and m > 0, f"cost must have at least one row and column, got "
                             f"{tuple(cost.shape)}")
    c = cost.to(_compute_dtype(cost))
    a_full = _marginal(a, c, n, "a")
    b_full = _marginal(b, c, m, "b")
    if a is not None or b is not None:
        _check_masses(a_full, b_full)
    return c, a_full, b_full


def _marginal(x: Tensor | None, c: Tensor, size: int, name: str) -> Tensor:
    shape = c.shape[:-2] + (size,)
    if x is None:
        return torch.full(shape, 1.0 / size, dtype=c.dtype, device=c.device)
    require(isinstance(x, Tensor) and x.dim() >= 1 and x.shape[-1] == size,
            f"{name} must be a tensor of shape (..., {size}) to match cost {tuple(c.shape)}, "
            f"got {tuple(getattr(x, 'shape', ()))}")
    try:
        return x.to(device=c.device, dtype=c.dtype).expand(shape)
    except RuntimeError as err:
        raise OtltError(f"{name} of shape {tuple(x.shape)} does not broadcast to the batch "
                        f"shape {tuple(c.shape[:-2])} of cost {tuple(c.shape)}") from err


def _check_masses(a: Tensor, b: Tensor) -> None:
    """Reject negative or empty marginals and unequal masses (one host read for all checks)."""
    with torch.no_grad():
        mass_a, mass_b = a.sum(-1), b.sum(-1)
        gap = ((mass_a - mass_b).abs() / mass_a.abs().clamp_min(1e-30)).amax()
        flags = torch.stack([
            ~((a >= 0).all() & (b >= 0).all()),  # also catches NaN
            ~(torch.isfinite(mass_a).all() & torch.isfinite(mass_b).all()),
            (mass_a.amin() <= 0) | (mass_b.amin() <= 0),
        ]).to(gap.dtype)
        negative, infinite, empty, gap = torch.cat([flags, gap[None]]).tolist()
    require(not negative, "marginals a and b must be nonnegative, got a negative or NaN entry")
    require(not infinite, "marginals a and b must be finite, got an infinite entry")
    require(not empty, "marginals a and b must have positive total mass, got a zero one")
    require(gap <= 1e-4, f"marginals a and b must have equal total mass (balanced OT), got a "
                         f"relative difference of {gap:.3g}")


def _check_solver_args(max_iter: int, tol: float, check_every: int) -> None:
    require(isinstance(max_iter, int) and max_iter >= 1,
            f"max_iter must be a positive integer, got {max_iter!r}")
    require(isinstance(tol, (int, float)) and tol >= 0, f"tol must be >= 0, got {tol!r}")
    require(isinstance(check_every, int) and check_every >= 1,
            f"check_every must be a positive integer, got {check_every!r}")


# ---------------------------------------------------------------------------------------------
# The stabilised Sinkhorn iteration


def _solve(
    c: Tensor, a: Tensor, b: Tensor, eps: float, max_iter: int, tol: float, check_every: int,
    warn: bool = True,
) -> OTResult:
    solver = _Solver(c, a, b, eps)
    solver.run(max_iter, tol, check_every)
    if warn and not solver.converged:
        warnings.warn(
            f"sinkhorn did not converge in {solver.n_iter} iterations: largest L1 marginal "
            f"violation {solver.worst_error:.3g} > tol={tol:g} (eps={eps:g}); raise max_iter or "
            "eps, or loosen tol",
            SinkhornConvergenceWarning,
            stacklevel=3,
        )
    return solver.result()


def _lse(x: Tensor, dim: int) -> Tensor:
    """Return ``log Σ exp(x)`` along ``dim``; ``x`` is a temporary the function may overwrite."""
    if x.device.type != "cpu" or x.numel() <= _SMALL_LSE:
        return torch.logsumexp(x, dim)
    # On large CPU inputs torch.logsumexp is ~4x slower than this max shift, done in place.
    top = x.amax(dim, keepdim=True).detach().nan_to_num(0.0, 0.0, 0.0)  # rows of -inf
    shifted = (x - top).exp_() if x.requires_grad else x.sub_(top).exp_()
    return shifted.sum(dim).log() + top.squeeze(dim)


def _matvec(k: Tensor, v: Tensor) -> Tensor:
    """Return ``K v`` for ``K`` ``(..., n, m)`` and ``v`` ``(..., m)``."""
    if k.dim() == 2:
        return torch.mv(k, v)  # a third of matmul's per-call overhead at small sizes on CPU
    return (k @ v[..., None]).squeeze(-1)


def _vecmat(u: Tensor, k: Tensor) -> Tensor:
    """Return ``Kᵀ u`` for ``K`` ``(..., n, m)`` and ``u`` ``(..., n)``."""
    if k.dim() == 2:
        return torch.mv(k.T, u)
    return (u[..., None, :] @ k).squeeze(-2)


class _Solver:
    """State of the stabilised Sinkhorn iteration on scaled potentials ``φ = f/ε, ψ = g/ε``.

    The plan is ``T = diag(u) K diag(v)`` with the kernel ``K_ij = exp(φ_i + ψ_j − C_ij/ε)``.
    ``(φ, ψ)`` are the absorbed potentials; the cheap iterations update only the scalings
    ``u = a ⊙ α`` and ``v = b ⊙ β``, and absorption moves ``log α, log β`` into ``(φ, ψ)``.
    """

    def __init__(self, c: Tensor, a: Tensor, b: Tensor, eps: float) -> None:
        self.c, self.eps = c, eps
        self.neg_c = -c / eps
        self.a, self.b = a, b
        self.la, self.lb = a.log(), b.log()
        self.phi, self.psi = torch.zeros_like(a), torch.zeros_like(b)
        self.alpha, self.beta = torch.ones_like(a), torch.ones_like(b)
        self.u, self.v = a, b
        self.kernel = self.neg_c  # replaced by the first (log-domain) block before any use
        self.error = torch.full(a.shape[:-1], math.inf, dtype=c.dtype, device=c.device)
        self.n_iter = 0
        self.converged = False
        self.worst_error = math.inf

    def _log_block(self, steps: int) -> None:
        """Run ``steps`` log-sum-exp iterations, then absorb them into a fresh kernel."""
        phi, psi = self.phi + self.alpha.log(), self.psi + self.beta.log()
        for _ in range(steps):
            phi = -_lse(self.neg_c + (psi + self.lb)[..., None, :], -1)
            psi = -_lse(self.neg_c + (phi + self.la)[..., :, None], -2)
        self.phi, self.psi = phi, psi
        self._reset_kernel()

    def _scaling_block(self, steps: int) -> None:
        """Run ``steps`` iterations as matrix-vector products with the current kernel."""
        k, u, v = self.kernel, self.u, self.v
        for _ in range(steps):
            u = self.a / _matvec(k, v)
            v = self.b / _vecmat(u, k)
        self.u, self.v = u, v

    def _measure(self) -> None:
        """Set the L1 marginal error of the current plan and its scalings ``α = u / a``, ``β``."""
        kv, ku = _matvec(self.kernel, self.v), _vecmat(self.u, self.kernel)
        row, col = self.u * kv, self.v * ku
        self.error = ((row - self.a).abs().sum(-1) + (col - self.b).abs().sum(-1)).detach()
        # Massless rows have u_i = 0; their potential is the one that the next update would give.
        self.alpha = torch.where(self.a > 0, self.u / self.a, 1.0 / kv)
        self.beta = torch.where(self.b > 0, self.v / self.b, 1.0 / ku)

    def _absorb(self) -> None:
        self.phi = self.phi + self.alpha.log()
        self.psi = self.psi + self.beta.log()
        self._reset_kernel()
        self._measure()

    def _reset_kernel(self) -> None:
        self.kernel = torch.exp(self.neg_c + self.phi[..., :, None] + self.psi[..., None, :])
        self.u, self.v = self.a, self.b

    def run(self, max_iter: int, tol: float, check_every: int) -> None:
        """Iterate in blocks of ``check_every`` until converged or ``max_iter``."""
        use_log = True
        while self.n_iter < max_iter:
            steps = min(_FIRST_LOG if self.n_iter == 0 else check_every, max_iter - self.n_iter)
            saved = (self.u, self.v, self.alpha, self.beta)
            if use_log:
                self._log_block(steps)
            else:
                self._scaling_block(steps)
            self._measure()
            worst, drift, finite = self._health()  # the one host read per block
            if not finite and not use_log:
                # Overflow, or a kernel row that underflowed to zero: redo the block in logs.
                self.u, self.v, self.alpha, self.beta = saved
                use_log = True
                continue
            self.n_iter += steps
            self.worst_error = worst
            if worst <= tol:
                self.converged = True
                return
            require(finite, "sinkhorn got a non-finite solution from log-domain updates: the "
                            "cost has NaN entries, or a row or column whose mass can go nowhere "
                            "(+inf cost to every partner with mass)")
            use_log = False
            if drift > _ABSORB_AT:
                self._absorb()

    def _health(self) -> tuple[float, float, bool]:
        """Return the worst marginal error, the largest |log scaling| and whether all is finite."""
        with torch.no_grad():
            stats = torch.stack([self.error.amax(), self.alpha.log().abs().amax(),
                                 self.beta.log().abs().amax()])
            worst, drift_a, drift_b = stats.tolist()  # amax propagates NaN
        drift = max(drift_a, drift_b)
        return worst, drift, math.isfinite(worst) and math.isfinite(drift)

    def result(self) -> OTResult:
        plan = self.u[..., :, None] * self.kernel * self.v[..., None, :]
        f = self.eps * (self.phi + self.alpha.log())
        g = self.eps * (self.psi + self.beta.log())
        # Forbidden pairs (C = +inf) carry no mass; 0 * inf would be NaN.
        transport = torch.where(plan > 0, plan * self.c, torch.zeros_like(plan)).sum((-2, -1))
        return OTResult(plan=plan, cost=transport, objective=_dot(f, self.a) + _dot(g, self.b),
                        f=f, g=g, n_iter=self.n_iter, converged=self.converged,
                        marginal_error=self.error)


def _dot(x: Tensor, w: Tensor) -> Tensor:
    """Return ``Σ_i w_i x_i``, treating ``0 · (±inf)`` as 0 (potentials of massless rows)."""
    return torch.where(w > 0, w * x, torch.zeros_like(x)).sum(-1)
