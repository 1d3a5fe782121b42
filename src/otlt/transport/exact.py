"""Exact optimal transport between equal-size point sets: the optimal one-to-one pairing."""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from otlt.errors import require


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
