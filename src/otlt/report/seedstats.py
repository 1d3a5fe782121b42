"""Statistics over seeds: mean, sample standard deviation and a Student-t interval.

For per-seed values ``e_1 … e_n`` (one per seed; a row's errors or a pair's per-seed
differences)::

    mean = (1/n) Σ_s e_s,   std = sqrt(Σ_s (e_s − mean)² / (n − 1)),   se = std / sqrt(n)
    95% interval = mean ± t_{0.975, n−1} · se

The interval is the usual one for the mean of normal values with unknown variance; with two or
three seeds its quantile is large (12.71 for one degree of freedom, 4.30 for two), which is the
point of printing it: a difference over few seeds says less than its mean suggests.

The quantile is SciPy's (``scipy.special.stdtrit``, already a dependency of the package);
one degree of freedom gives ``t = tan(π (p − 1/2))`` and two ``t = (2p − 1) sqrt(2 / (4p(1 −
p)))``, which the tests check.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from scipy.special import stdtrit

from otlt.errors import is_finite_number, require


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """``(mean, sample std or None for one value, n)`` of the values present."""
    xs = [float(v) for v in values if is_finite_number(v)]
    if not xs:
        return None, None, 0
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, None, len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)), len(xs)


def t_quantile(p: float, dof: int) -> float:
    """The ``p`` quantile of Student's t with ``dof`` degrees of freedom, ``0.5 <= p < 1``."""
    require(0.5 <= p < 1, f"t_quantile needs 0.5 <= p < 1, got {p}")
    require(dof >= 1, f"t_quantile needs at least one degree of freedom, got {dof}")
    return float(stdtrit(dof, p))


def t_interval(values: Sequence[float | None],
               level: float = 0.95) -> tuple[float, float] | None:
    """The ``level`` Student-t interval of the mean of the values present (``None`` with fewer
    than two: one seed has no spread to scale)."""
    require(0 < level < 1, f"t_interval needs a level in (0, 1), got {level}")
    mean, std, n = mean_std(values)
    if std is None:
        return None
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half
