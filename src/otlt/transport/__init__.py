"""Optimal-transport solvers: batched entropic Sinkhorn and exact assignment.

Two solvers serve the two OT methods of the library:

- :func:`sinkhorn` (:mod:`otlt.transport.entropic`) solves the entropic OT problem of OTmix
  (Gao et al., NeurIPS 2023, eq. 4, ε = 0.01) and of OT re-weighting (Guo et al., NeurIPS
  2022, ε = 0.1) on whole batches of cost matrices, on any device, in float32 or float64.
  :func:`entropic_ot_value` is its value, differentiable in the marginals and the cost. The
  iteration is the stabilised Sinkhorn iteration with absorption of
  :mod:`otlt.transport.solver`.
- :func:`assignment` (:mod:`otlt.transport.exact`) is the exact (ε → 0) optimal one-to-one
  pairing, solved by ``scipy.optimize.linear_sum_assignment`` on the CPU.

Why our own solver, not POT: the stabilised iteration is faster per iteration than plain
log-sum-exp updates and than POT's ``sinkhorn_log``, which also stalls at ~4e-6 marginal error
in float32; POT's plain ``sinkhorn`` fails at ε = 0.01 once a row's costs all exceed ~1
(measurements: ``benchmarks/transport.md``).

References: Gao, Zhao, Li, Guo, "Enhancing Minority Classes by Mixing: An Adaptative Optimal
Transport Approach for Long-tailed Classification", NeurIPS 2023 (OTmix); Guo, Li, Zheng,
Zhao, Zhou, Zha, "Learning to Re-weight Examples with Optimal Transport for Imbalanced
Classification", NeurIPS 2022 (OT re-weighting).
"""

from otlt.transport.entropic import entropic_ot_value, sinkhorn
from otlt.transport.exact import assignment
from otlt.transport.solver import OTResult, SinkhornConvergenceWarning

__all__ = [
    "OTResult",
    "SinkhornConvergenceWarning",
    "assignment",
    "entropic_ot_value",
    "sinkhorn",
]
