"""Statistics over seeds: the Student-t quantile against its closed forms and printed tables,
and the interval the report prints."""

from __future__ import annotations

import math

import pytest

from otlt.errors import OtltError
from otlt.report.seedstats import mean_std, t_interval, t_quantile


@pytest.mark.parametrize("p", [0.5, 0.6, 0.9, 0.95, 0.975, 0.995])
def test_the_t_quantile_matches_its_closed_forms_for_one_and_two_degrees_of_freedom(p):
    assert t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), abs=1e-8)
    assert t_quantile(p, 2) == pytest.approx(
        (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), abs=1e-8)


def test_the_t_quantile_matches_printed_tables_and_tends_to_the_normal():
    assert t_quantile(0.975, 10) == pytest.approx(2.228139, abs=1e-6)
    assert t_quantile(0.995, 30) == pytest.approx(2.749996, abs=1e-6)
    assert t_quantile(0.975, 10**6) == pytest.approx(1.959964, abs=1e-5)


def test_the_t_quantile_refuses_what_it_cannot_compute():
    with pytest.raises(OtltError, match="0.5 <= p < 1"):
        t_quantile(0.4, 3)
    with pytest.raises(OtltError, match="degree of freedom"):
        t_quantile(0.975, 0)
    with pytest.raises(OtltError, match="t_interval needs a level"):
        t_interval([1.0, 2.0], level=1.0)


def test_the_interval_is_the_mean_plus_minus_t_times_the_standard_error():
    values = [7.03, 9.95, 8.75]  # three per-seed gains
    mean, std, n = mean_std(values)
    lo, hi = t_interval(values)
    half = 4.302652729749462 * std / math.sqrt(3)  # t_{0.975, 2}
    assert (lo, hi) == (pytest.approx(mean - half), pytest.approx(mean + half))
    assert (round(lo, 1), round(hi, 1)) == (4.9, 12.2)
    assert t_interval([1.0, None, 3.0]) == t_interval([1.0, 3.0])  # missing seeds left out
    assert t_interval([2.0]) is None and t_interval([]) is None
    assert t_interval([2.0, 2.0]) == (2.0, 2.0)  # no spread, no width
    narrow, wide = t_interval([1.0, 3.0], level=0.5), t_interval([1.0, 3.0], level=0.99)
    assert wide[0] < narrow[0] < 2.0 < narrow[1] < wide[1]
