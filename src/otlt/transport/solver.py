"""The stabilised Sinkhorn iteration behind :func:`otlt.transport.sinkhorn`.

Sinkhorn with absorption (Schmitzer, "Stabilized sparse scaling algorithms for entropy
regularized transport problems", 2019): the potentials live in the log domain and are absorbed
into a kernel ``K_ij = exp((f_i + g_j − C_ij) / ε)`` whose entries stay in a safe range, while
the iterations between absorptions are two matrix-vector products. A block of iterations that
overflows is redone with log-sum-exp updates, and the first two iterations always use them, so
no entry of ``exp(−C/ε)`` ever has to be representable: float32 at ε = 0.01 with costs up to 2
(where ``exp(−C/ε)`` underflows) is fine. Inputs arrive checked and in the compute dtype
(:mod:`otlt.transport.entropic` prepares them).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from otlt.errors import require, warn_renamed

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
        coupling: ``(..., n, m)`` the transport plan ``T`` (named so as not to be confused
            with a mixing plan, :class:`otlt.mixing.MixPlan`); its row and column sums equal
            ``a`` and ``b`` up to ``marginal_error``.
        cost: ``(...,)`` transport cost of the coupling ``<T, C> = Σ_ij T_ij C_ij``, *without* the
            entropy term (what POT's ``ot.sinkhorn2`` returns).
        objective: ``(...,)`` entropic value ``<f, a> + <g, b>``: the dual objective, equal to
            ``<T, C> + ε KL(T ‖ a bᵀ)`` at the optimum (see :func:`entropic_ot_value`).
        f: ``(..., n)`` dual potential of the rows (same units as the cost); ``(f + c, g − c)``
            is as optimal for any constant ``c``, so compare potentials up to a shift.
        g: ``(..., m)`` dual potential of the columns.
        n_iter: number of Sinkhorn iterations run (one iteration updates ``f`` then ``g``).
        converged: whether every problem of the batch reached ``marginal_error <= tol``.
        marginal_error: ``(...,)`` L1 marginal violation of ``coupling``,
            ``Σ_i |Σ_j T_ij − a_i| + Σ_j |Σ_i T_ij − b_j|``.
    """

    coupling: Tensor
    cost: Tensor
    objective: Tensor
    f: Tensor
    g: Tensor
    n_iter: int
    converged: bool
    marginal_error: Tensor

    @property
    def plan(self) -> Tensor:
        """Deprecated name of :attr:`coupling`."""
        warn_renamed("OTResult.plan", "OTResult.coupling")
        return self.coupling


def solve(
    c: Tensor, a: Tensor, b: Tensor, eps: float, max_iter: int, tol: float, check_every: int,
    warn: bool = True,
) -> OTResult:
    """Run :class:`StabilizedSinkhorn` on prepared inputs (compute dtype, marginals broadcast
    to the batch) and return its :class:`OTResult`; warn when it did not converge."""
    solver = StabilizedSinkhorn(c, a, b, eps)
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


class StabilizedSinkhorn:
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
                            "cost has NaN entries, a row or column whose mass can go nowhere (+inf "
                            "cost to every partner with mass), or a marginal is NaN or infinite")
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
        coupling = self.u[..., :, None] * self.kernel * self.v[..., None, :]
        f = self.eps * (self.phi + self.alpha.log())
        g = self.eps * (self.psi + self.beta.log())
        # Forbidden pairs (C = +inf) carry no mass; 0 * inf would be NaN.
        transport = torch.where(coupling > 0, coupling * self.c,
                                torch.zeros_like(coupling)).sum((-2, -1))
        return OTResult(coupling=coupling, cost=transport,
                        objective=_dot(f, self.a) + _dot(g, self.b), f=f, g=g,
                        n_iter=self.n_iter, converged=self.converged, marginal_error=self.error)


def _dot(x: Tensor, w: Tensor) -> Tensor:
    """Return ``Σ_i w_i x_i``, treating ``0 · (±inf)`` as 0 (potentials of massless rows)."""
    return torch.where(w > 0, w * x, torch.zeros_like(x)).sum(-1)
