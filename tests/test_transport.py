"""Tests for otlt.transport: Sinkhorn marginals, agreement with POT, stability, assignment."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from otlt.errors import OtltError
from otlt.transport import (
    OTResult,
    SinkhornConvergenceWarning,
    assignment,
    entropic_ot_value,
    sinkhorn,
    solver,
)
from otlt.transport.solver import StabilizedSinkhorn

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="CUDA not available")),
]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _simplex(shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    x = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.2
    return (x / x.sum(-1, keepdim=True)).to(dtype)


def _otmix_cost(batch: int, gen: torch.Generator, classes: int = 10) -> torch.Tensor:
    """Return the OTmix cost 0.05 (1 − cos) + 0.95 (1 − F[y_i, y_j]) of a random batch (eq. 7)."""
    z = torch.nn.functional.normalize(torch.randn(batch, 32, generator=gen), dim=1)
    y = torch.randint(0, classes, (batch,), generator=gen)
    confusion = torch.rand(classes, classes, generator=gen).fill_diagonal_(0)
    confusion = confusion / confusion.sum(1, keepdim=True)
    return 0.05 * (1 - z @ z.T) + 0.95 * (1 - confusion[y][:, y])


def _marginal_l1(plan: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    plan = plan.double()
    return ((plan.sum(-1) - a.double()).abs().sum(-1)
            + (plan.sum(-2) - b.double()).abs().sum(-1))


# --- sinkhorn: marginals ---------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("eps", [0.05, 0.5])
def test_sinkhorn_batched_marginals_match(device: str, dtype: torch.dtype, eps: float) -> None:
    gen = _gen(0)
    cost = (2 * torch.rand(2, 3, 20, 30, generator=gen, dtype=dtype)).to(device)
    a = _simplex((2, 3, 20), gen, dtype).to(device)
    b = _simplex((30,), gen, dtype).to(device)  # shared by the whole batch
    res = sinkhorn(cost, a, b, eps=eps, tol=1e-6, max_iter=5000)
    assert res.converged and res.n_iter < 5000
    assert res.coupling.shape == (2, 3, 20, 30) and res.coupling.dtype == dtype
    assert res.coupling.device.type == device
    assert res.f.shape == (2, 3, 20) and res.g.shape == (2, 3, 30)
    assert res.cost.shape == res.objective.shape == res.marginal_error.shape == (2, 3)
    # Recomputed in float64 from the returned plan: float32 adds summation rounding.
    atol = 1e-6 if dtype == torch.float64 else 2e-5
    assert _marginal_l1(res.coupling, a, b.expand(2, 3, 30)).max().item() < atol
    assert res.marginal_error.max().item() <= 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_float32_otmix_cost_marginals_at_small_eps(device: str) -> None:
    cost = torch.stack([_otmix_cost(96, _gen(seed)) for seed in range(3)]).to(device)
    res = sinkhorn(cost, eps=0.01, tol=1e-6, max_iter=3000)
    assert res.converged and res.coupling.dtype == torch.float32
    uniform = torch.full((3, 96), 1 / 96)
    assert _marginal_l1(res.coupling.cpu(), uniform, uniform).max().item() < 1e-5


def test_sinkhorn_defaults_to_uniform_marginals() -> None:
    cost = torch.rand(6, 8, generator=_gen(1), dtype=torch.float64)
    res = sinkhorn(cost, eps=0.05)
    torch.testing.assert_close(res.coupling.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close(res.coupling.sum(0), torch.full((8,), 1 / 8, dtype=torch.float64),
                               atol=1e-6, rtol=0)


@pytest.mark.parametrize("size", [10, 190])
def test_sinkhorn_batch_equals_problems_solved_one_by_one(size: int) -> None:
    # At 190 the batch takes the large-input log-sum-exp path and single problems do not.
    cost = torch.rand(2, size, size + 2, generator=_gen(2), dtype=torch.float64)
    batched = sinkhorn(cost, eps=0.1, tol=1e-10).coupling
    single = torch.stack([sinkhorn(c, eps=0.1, tol=1e-10).coupling for c in cost])
    torch.testing.assert_close(batched, single, atol=1e-12, rtol=1e-8)


def test_sinkhorn_recovers_when_a_scaling_block_overflows(monkeypatch: pytest.MonkeyPatch) -> None:
    cost = _otmix_cost(48, _gen(6)).double()
    reference = sinkhorn(cost, eps=0.01, tol=1e-9, max_iter=5000)
    original = StabilizedSinkhorn._scaling_block
    calls = []

    def overflowing(self: StabilizedSinkhorn, steps: int) -> None:
        original(self, steps)
        calls.append(steps)
        if len(calls) in (1, 4):  # as if a kernel row had underflowed to zero
            self.u = self.u.clone()
            self.u[0] = math.inf

    monkeypatch.setattr(StabilizedSinkhorn, "_scaling_block", overflowing)
    res = sinkhorn(cost, eps=0.01, tol=1e-9, max_iter=5000)
    assert len(calls) > 4 and res.converged
    torch.testing.assert_close(res.coupling, reference.coupling, atol=1e-10, rtol=0)


def test_sinkhorn_plan_has_gibbs_form_of_potentials() -> None:
    gen = _gen(3)
    cost = torch.rand(9, 7, generator=gen, dtype=torch.float64)
    a, b = _simplex((9,), gen, torch.float64), _simplex((7,), gen, torch.float64)
    res = sinkhorn(cost, a, b, eps=0.1, tol=1e-10)
    gibbs = a[:, None] * b[None, :] * torch.exp((res.f[:, None] + res.g[None, :] - cost) / 0.1)
    torch.testing.assert_close(res.coupling, gibbs, atol=1e-12, rtol=1e-9)
    torch.testing.assert_close(res.cost, (res.coupling * cost).sum())


def test_sinkhorn_massless_rows_get_no_mass() -> None:
    gen = _gen(4)
    cost = torch.rand(5, 5, generator=gen, dtype=torch.float64)
    a = torch.tensor([0.5, 0.0, 0.25, 0.25, 0.0], dtype=torch.float64)
    res = sinkhorn(cost, a, eps=0.05, tol=1e-9)
    assert res.converged and torch.isfinite(res.objective)
    assert res.coupling[[1, 4]].abs().max().item() == 0.0
    torch.testing.assert_close(res.coupling.sum(0), torch.full((5,), 0.2, dtype=torch.float64))


def test_sinkhorn_forbidden_pairs_carry_no_mass() -> None:
    cost = torch.rand(4, 4, generator=_gen(5), dtype=torch.float64)
    cost[0, 0] = math.inf
    res = sinkhorn(cost, eps=0.2, tol=1e-9)
    assert res.coupling[0, 0].item() == 0.0
    assert torch.isfinite(res.cost) and torch.isfinite(res.objective)


# --- sinkhorn: agreement with POT ------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("eps", [0.02, 0.1, 1.0])
def test_sinkhorn_plan_matches_pot_log_domain(seed: int, eps: float) -> None:
    ot = pytest.importorskip("ot")
    gen = _gen(10 + seed)
    n, m = 15, 11
    cost = torch.rand(n, m, generator=gen, dtype=torch.float64)
    a, b = _simplex((n,), gen, torch.float64), _simplex((m,), gen, torch.float64)
    ours = sinkhorn(cost, a, b, eps=eps, tol=1e-11, max_iter=20000)
    theirs = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), eps, method="sinkhorn_log",
                         stopThr=1e-13, numItermax=200000)
    np.testing.assert_allclose(ours.coupling.numpy(), theirs, atol=1e-9, rtol=0)
    # POT's sinkhorn2 value is the transport cost <T, C> without the entropy term.
    pot_cost = ot.sinkhorn2(a.numpy(), b.numpy(), cost.numpy(), eps, method="sinkhorn_log",
                            stopThr=1e-13, numItermax=200000)
    assert ours.cost.item() == pytest.approx(float(pot_cost), abs=1e-9)


def test_sinkhorn_float32_otmix_plan_matches_pot_float64() -> None:
    ot = pytest.importorskip("ot")
    cost = _otmix_cost(64, _gen(20))
    ours = sinkhorn(cost, eps=0.01, tol=1e-6, max_iter=5000)
    theirs = ot.sinkhorn(np.full(64, 1 / 64), np.full(64, 1 / 64), cost.double().numpy(), 0.01,
                         method="sinkhorn_log", stopThr=1e-10, numItermax=100000)
    # Plan entries are at most 1/64; 2e-5 is a relative error of ~1e-3 on the largest ones.
    np.testing.assert_allclose(ours.coupling.double().numpy(), theirs, atol=2e-5, rtol=0)
    assert (ours.coupling.argmax(1).numpy() == theirs.argmax(1)).mean() > 0.95


# --- sinkhorn: float32 stability -------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_sinkhorn_float32_small_eps_wide_costs_is_finite(device: str) -> None:
    gen = _gen(30)
    cost = 2 * torch.rand(4, 64, 64, generator=gen)
    cost[0, 5] = 2.0  # a row at the top of the range: exp(-2 / 0.01) = 0 in float32
    cost[1, :, 7] = 2.0  # a column likewise
    cost[2] = 2.0  # every entry: the uniform plan is the answer
    cost = cost.to(device)
    assert torch.exp(-cost[0, 5] / 0.01).max().item() == 0.0  # the naive kernel underflows
    # Random costs of range 2 at ε = 0.01 converge slowly (plain Sinkhorn's rate worsens with
    # range/ε); 1e-5 is reached well within the budget.
    res = sinkhorn(cost, eps=0.01, tol=1e-5, max_iter=5000)
    assert res.converged
    for tensor in (res.coupling, res.f, res.g, res.cost, res.objective):
        assert torch.isfinite(tensor).all()
    uniform = torch.full((64,), 1 / 64)
    assert _marginal_l1(res.coupling, uniform, uniform).max() < 2e-5
    torch.testing.assert_close(res.coupling[2].cpu(), torch.full((64, 64), 1 / 64**2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available")
def test_sinkhorn_cuda_syncs_only_at_convergence_checks() -> None:
    cost = _otmix_cost(128, _gen(32)).cuda()
    sinkhorn(cost, eps=0.01)  # warm-up: lazy CUDA initialisation may synchronise
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = sinkhorn(cost, eps=0.01, check_every=10)
            res.coupling.argmax(1)  # OTmix's pairing stays on the device
    finally:
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    checks = 1 + math.ceil((res.n_iter - 2) / 10)  # the opening log block, then every 10
    assert res.n_iter > 20 and 1 <= len(syncs) <= checks


def test_sinkhorn_half_precision_cost_is_solved_in_float32() -> None:
    cost = torch.rand(16, 16, generator=_gen(31)).to(torch.bfloat16)
    res = sinkhorn(cost, eps=0.05)
    assert res.coupling.dtype == torch.float32 and torch.isfinite(res.coupling).all()
    assert res.converged


# --- sinkhorn: convergence reporting and input errors ----------------------------------------


def test_sinkhorn_warns_when_max_iter_too_small() -> None:
    cost = _otmix_cost(32, _gen(40))
    with pytest.warns(SinkhornConvergenceWarning, match="did not converge in 3 iterations"):
        res = sinkhorn(cost, eps=0.01, max_iter=3)
    assert not res.converged and res.n_iter == 3
    assert res.marginal_error.item() > 1e-6
    assert issubclass(SinkhornConvergenceWarning, RuntimeWarning)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warn=False: the caller counts convergence itself
        quiet = sinkhorn(cost, eps=0.01, max_iter=3, warn=False)
    assert not quiet.converged and torch.equal(quiet.coupling, res.coupling)


def test_sinkhorn_no_warning_when_converged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sinkhorn(torch.rand(8, 8, generator=_gen(41)), eps=0.1, check_every=7)
    # Convergence is tested after 2 log-domain iterations, then every `check_every`.
    assert res.converged and (res.n_iter - 2) % 7 == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"eps": 0.0}, "eps must be a positive number"),
        ({"eps": -1.0}, "eps must be a positive number"),
        ({"eps": 0.1, "max_iter": 0}, "max_iter must be a positive integer"),
        ({"eps": 0.1, "max_iter": True}, "max_iter must be a positive integer"),  # not 1
        ({"eps": 0.1, "max_iter": 10.0}, "max_iter must be a positive integer"),
        ({"eps": 0.1, "check_every": True}, "check_every must be a positive integer"),
        ({"eps": 0.1, "tol": -1.0}, "tol must be >= 0"),
        ({"eps": 0.1, "tol": float("nan")}, "tol must be >= 0"),
        ({"eps": 0.1, "a": torch.ones(3) / 3}, r"a must be a tensor of shape \(\.\.\., 4\)"),
        ({"eps": 0.1, "a": torch.tensor([0.5, 0.5, 0.5, -0.5])}, "nonnegative"),
        ({"eps": 0.1, "b": torch.full((5,), 0.3)}, "equal total mass"),
        ({"eps": 0.1, "a": torch.ones(2, 4) / 4}, "does not broadcast"),
    ],
)
def test_sinkhorn_rejects_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(OtltError, match=match):
        sinkhorn(torch.rand(3, 4, 5, generator=_gen(42)), **kwargs)


def test_numpy_integers_are_solver_limits_too() -> None:
    cost = torch.rand(4, 4, generator=_gen(42))
    res = sinkhorn(cost, eps=0.1, max_iter=np.int64(1000), check_every=np.int32(5),
                   tol=np.float32(1e-6))
    assert torch.equal(res.coupling, sinkhorn(cost, eps=0.1, check_every=5).coupling)


@pytest.mark.parametrize("bad", ["nan", "inf_row"])
def test_sinkhorn_rejects_nan_or_infeasible_cost(bad: str) -> None:
    cost = torch.rand(6, 6, generator=_gen(43))
    if bad == "nan":
        cost[2, 3] = math.nan
    else:
        cost[1] = math.inf
    with pytest.raises(OtltError, match="non-finite solution"):
        sinkhorn(cost, eps=0.1)


# --- entropic value and its gradient ---------------------------------------------------------


def test_entropic_value_equals_primal_objective_of_pot_plan() -> None:
    ot = pytest.importorskip("ot")
    gen = _gen(50)
    cost = torch.rand(12, 10, generator=gen, dtype=torch.float64)
    a, b = _simplex((12,), gen, torch.float64), _simplex((10,), gen, torch.float64)
    eps = 0.05
    plan = ot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), eps, method="sinkhorn_log",
                       stopThr=1e-13, numItermax=100000)
    kl = (plan * np.log(plan / np.outer(a.numpy(), b.numpy()))).sum()
    primal = (plan * cost.numpy()).sum() + eps * kl
    value = entropic_ot_value(cost, a, b, eps=eps, tol=1e-11)
    assert value.item() == pytest.approx(primal, abs=1e-10)
    assert sinkhorn(cost, a, b, eps=eps, tol=1e-11).objective.item() == pytest.approx(primal,
                                                                                      abs=1e-10)


def _zero_sum_direction(n: int, gen: torch.Generator) -> torch.Tensor:
    d = torch.randn(n, generator=gen, dtype=torch.float64)
    return d - d.mean()


@pytest.mark.parametrize("small_lse", [solver._SMALL_LSE, 0])
def test_entropic_value_gradient_in_a_matches_finite_differences_and_autograd(
    small_lse: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(solver, "_SMALL_LSE", small_lse)  # both log-sum-exp code paths
    gen = _gen(51)
    cost = torch.rand(2, 9, 8, generator=gen, dtype=torch.float64)
    a, b = _simplex((2, 9), gen, torch.float64), _simplex((8,), gen, torch.float64)
    eps, kw = 0.05, {"tol": 1e-12, "max_iter": 20000}
    leaf = a.clone().requires_grad_(True)
    entropic_ot_value(cost, leaf, b, eps=eps, **kw).sum().backward()
    unrolled = a.clone().requires_grad_(True)
    sinkhorn(cost, unrolled, b, eps=eps, **kw).objective.sum().backward()
    step = 1e-6
    for _ in range(3):  # directions inside the simplex: the gradient is defined up to a constant
        d = torch.stack([_zero_sum_direction(9, gen) for _ in range(2)])
        up = entropic_ot_value(cost, a + step * d, b, eps=eps, **kw).sum()
        down = entropic_ot_value(cost, a - step * d, b, eps=eps, **kw).sum()
        fd = ((up - down) / (2 * step)).item()
        assert (leaf.grad * d).sum().item() == pytest.approx(fd, rel=1e-6, abs=1e-8)
        assert (unrolled.grad * d).sum().item() == pytest.approx(fd, rel=1e-6, abs=1e-8)


def test_entropic_value_gradient_at_a_massless_row_matches_one_sided_differences() -> None:
    gen = _gen(53)
    cost = torch.rand(6, 5, generator=gen, dtype=torch.float64)
    a = torch.tensor([0.3, 0.0, 0.2, 0.1, 0.25, 0.15], dtype=torch.float64)
    kw = {"eps": 0.1, "tol": 1e-13, "max_iter": 20000}
    leaf = a.clone().requires_grad_(True)
    entropic_ot_value(cost, leaf, **kw).backward()
    d = torch.zeros(6, dtype=torch.float64)
    d[1], d[0] = 1.0, -1.0  # move mass onto the empty row: only h > 0 is feasible
    h = 1e-5
    values = [entropic_ot_value(cost, a + k * h * d, **kw).item() for k in range(3)]
    one_sided = (-3 * values[0] + 4 * values[1] - values[2]) / (2 * h)
    assert torch.isfinite(leaf.grad).all()
    assert (leaf.grad * d).sum().item() == pytest.approx(one_sided, rel=1e-5, abs=1e-8)


def test_entropic_value_gradient_in_cost_is_the_plan() -> None:
    gen = _gen(52)
    cost = torch.rand(6, 7, generator=gen, dtype=torch.float64).requires_grad_(True)
    b = _simplex((7,), gen, torch.float64).requires_grad_(True)
    value = entropic_ot_value(cost, None, b, eps=0.1, tol=1e-12)
    value.backward()
    res = sinkhorn(cost.detach(), None, b.detach(), eps=0.1, tol=1e-12)
    torch.testing.assert_close(cost.grad, res.coupling, atol=1e-10, rtol=0)
    torch.testing.assert_close(b.grad - b.grad.mean(), res.g - res.g.mean(), atol=1e-9, rtol=0)


# --- assignment -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(12, 12), (7, 10)])
def test_assignment_reaches_scipy_optimal_cost(seed: int, shape: tuple[int, int]) -> None:
    cost = torch.rand(*shape, generator=_gen(60 + seed), dtype=torch.float64)
    partner = assignment(cost)
    assert partner.dtype == torch.int64 and partner.shape == (shape[0],)
    assert len(set(partner.tolist())) == shape[0]  # one-to-one
    rows, cols = linear_sum_assignment(cost.numpy())
    optimal = cost.numpy()[rows, cols].sum()
    assert cost[torch.arange(shape[0]), partner].sum().item() == pytest.approx(optimal, abs=1e-12)


def test_assignment_beats_every_permutation_on_a_small_problem() -> None:
    cost = torch.rand(5, 5, generator=_gen(64))
    rows = torch.arange(5)
    best = min(cost[rows, list(p)].sum().item() for p in itertools.permutations(range(5)))
    partner = assignment(cost)
    assert cost[torch.arange(5), partner].sum().item() == pytest.approx(best, abs=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_assignment_batched_keeps_device(device: str, dtype: torch.dtype) -> None:
    cost = torch.rand(2, 3, 6, 6, generator=_gen(65), dtype=dtype).to(device)
    partner = assignment(cost)
    assert partner.shape == (2, 3, 6) and partner.dtype == torch.int64
    assert partner.device == cost.device
    flat = cost.reshape(6, 6, 6).cpu()
    for k, p in enumerate(partner.reshape(6, 6).cpu()):
        assert torch.equal(p, torch.from_numpy(linear_sum_assignment(flat[k].numpy())[1]))


def test_assignment_of_permuted_identity_recovers_permutation() -> None:
    perm = torch.randperm(20, generator=_gen(66))
    cost = 1.0 - torch.eye(20)[perm]  # zero cost exactly at (i, perm[i])
    assert torch.equal(assignment(cost), perm)


@pytest.mark.parametrize(
    ("cost", "match"),
    [
        (torch.rand(5), r"shape \(\.\.\., n, m\)"),
        (torch.rand(6, 4), "n <= m"),
        (torch.tensor([[0.0, math.nan], [1.0, 0.0]]), "finite"),
    ],
)
def test_assignment_rejects_bad_cost(cost: torch.Tensor, match: str) -> None:
    with pytest.raises(OtltError, match=match):
        assignment(cost)


def test_result_is_a_frozen_dataclass() -> None:
    res = sinkhorn(torch.rand(3, 3, generator=_gen(70)), eps=0.5)
    assert isinstance(res, OTResult)
    with pytest.raises(AttributeError):
        res.n_iter = 0  # type: ignore[misc]


@pytest.mark.parametrize("k", [2, 3, 7, 10, 25])
def test_sinkhorn_checking_every_k_iterations_meets_the_same_tolerance(k: int) -> None:
    # A sparser convergence test (fewer host syncs on a GPU) stops at the first tested
    # iteration within tol: never more than the k-block that holds the every-iteration count.
    for seed, (n, eps) in enumerate([(16, 0.01), (64, 0.01), (32, 0.05), (128, 0.01)] * 2):
        cost = _otmix_cost(n, _gen(300 + seed))
        every = sinkhorn(cost, eps=eps, check_every=1)
        sparse = sinkhorn(cost, eps=eps, check_every=k)
        assert every.converged and sparse.converged
        assert (sparse.n_iter - 2) % k == 0
        assert sparse.n_iter <= 2 + math.ceil((every.n_iter - 2) / k) * k
        uniform = torch.full((n,), 1 / n)
        assert sparse.marginal_error.max() <= 1e-6
        assert _marginal_l1(sparse.coupling, uniform, uniform).max() <= 2e-6
        torch.testing.assert_close(sparse.coupling.argmax(1), every.coupling.argmax(1),
                                   rtol=0, atol=0)
