"""Entropic optimal transport on batches of cost matrices: :func:`sinkhorn` and its value.

:func:`sinkhorn` solves the entropic OT problem of OTmix (Gao et al., "Enhancing Minority
Classes by Mixing: An Adaptative Optimal Transport Approach for Long-tailed Classification",
NeurIPS 2023, eq. 4, ε = 0.01) and of OT re-weighting (Guo et al., "Learning to Re-weight
Examples with Optimal Transport for Imbalanced Classification", NeurIPS 2022, ε = 0.1) on
whole batches of cost matrices, on any device, in float32 or float64. :func:`entropic_ot_value`
is its value, differentiable in the marginals and the cost.

Notation: cost ``C`` of shape ``(..., n, m)``, marginals ``a`` ``(..., n)`` and ``b`` ``(..., m)``
with equal total mass, regularisation ``ε > 0``. The entropic problem is

    OT_ε(a, b, C) = min_{T ≥ 0, T 1 = a, Tᵀ 1 = b}  <T, C> + ε KL(T ‖ a bᵀ)

whose solution is ``T_ij = a_i b_j exp((f_i + g_j − C_ij) / ε)`` for dual potentials ``f, g``.

The iteration itself is :mod:`otlt.transport.solver`; this module checks and prepares the
inputs and turns the potentials into the value.
"""

from __future__ import annotations

import torch
from torch import Tensor

from otlt.errors import OtltError, is_finite_number, is_integer, require
from otlt.transport.solver import OTResult, solve


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
    check_marginals: bool = True,
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
            iteration; given ``a`` or ``b`` add one more read for their checks (unless
            ``check_marginals`` is False).
        warn: issue the non-convergence warning; callers that count ``OTResult.converged``
            themselves (OTMix, per epoch) turn it off.
        check_marginals: check given marginals (nonnegative, finite, equal mass: one host
            read); False where the caller builds them so (a softmax), to save the read.

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
    c, a_full, b_full = _prepare(cost, a, b, eps, check_marginals)
    _check_solver_args(max_iter, tol, check_every)
    return solve(c, a_full, b_full, eps, max_iter, tol, check_every, warn)


def entropic_ot_value(
    cost: Tensor,
    a: Tensor | None = None,
    b: Tensor | None = None,
    *,
    eps: float,
    max_iter: int = 1000,
    tol: float = 1e-6,
    check_marginals: bool = True,
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
        check_marginals: as in :func:`sinkhorn`.

    Returns:
        ``(...,)`` values in the compute dtype of ``cost``.
    """
    c, a_full, b_full = _prepare(cost, a, b, eps, check_marginals)
    _check_solver_args(max_iter, tol, 10)
    with torch.no_grad():
        res = solve(c.detach(), a_full.detach(), b_full.detach(), eps, max_iter, tol, 10)
    f, g = res.f, res.g
    outer = a_full[..., :, None] * b_full[..., None, :]
    # Bounded by 1 / max(a_i, b_j) (T_ij ≤ min(a_i, b_j)), also on a massless row or column;
    # only pairs where both are massless may overflow, and they carry no value or gradient.
    scaled = torch.exp((f[..., :, None] + g[..., None, :] - c) / eps)
    keep = (a_full > 0)[..., :, None] | (b_full > 0)[..., None, :]
    penalty = (outer * torch.where(keep, scaled, torch.zeros_like(scaled))).sum((-2, -1))
    penalty = penalty - outer.sum((-2, -1))
    return (f * a_full).sum(-1) + (g * b_full).sum(-1) - eps * penalty


# Input handling


def _compute_dtype(cost: Tensor) -> torch.dtype:
    require(not cost.is_complex(), f"cost must be real, got dtype {cost.dtype}")
    return torch.float64 if cost.dtype == torch.float64 else torch.float32


def _prepare(
    cost: Tensor, a: Tensor | None, b: Tensor | None, eps: float, check_marginals: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Return ``(C, a, b)`` in the compute dtype, marginals broadcast to the batch shape."""
    require(isinstance(cost, Tensor) and cost.dim() >= 2,
            f"cost must be a tensor of shape (..., n, m), got {getattr(cost, 'shape', cost)!r}")
    require(is_finite_number(eps) and eps > 0, f"eps must be a positive number, got {eps!r}")
    n, m = cost.shape[-2:]
    require(n > 0 and m > 0, f"cost must have at least one row and column, got "
                             f"{tuple(cost.shape)}")
    c = cost.to(_compute_dtype(cost))
    a_full = _marginal(a, c, n, "a")
    b_full = _marginal(b, c, m, "b")
    if check_marginals and (a is not None or b is not None):
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
    require(is_integer(max_iter) and max_iter >= 1,
            f"max_iter must be a positive integer, got {max_iter!r}")
    require(is_finite_number(tol) and tol >= 0, f"tol must be >= 0, got {tol!r}")
    require(is_integer(check_every) and check_every >= 1,
            f"check_every must be a positive integer, got {check_every!r}")
