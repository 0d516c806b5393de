"""Fairness metrics: known values, agreement with the textbook formulas, edge cases, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.allocation import allocate
from core.fairness import (
    allocation_error,
    coverage,
    fairness_summary,
    gini,
    jain,
    max_relative_shortfall,
)

SETTINGS = settings(max_examples=int(os.environ.get("FEDALLOC_PROPERTY_EXAMPLES", "40")), deadline=None)
values = st.lists(st.one_of(st.just(0.0), st.floats(min_value=1e-6, max_value=1e6)), min_size=1,
                  max_size=40)


def test_gini_known_values() -> None:
    assert gini([5, 5, 5]) == 0.0
    assert gini([0, 0, 0, 1]) == pytest.approx(0.75)  # one holds everything: (n-1)/n
    assert gini([1, 2, 3]) == pytest.approx(2 / 9)  # Σ|xi−xj| = 8, 2·n·Σx = 36
    assert gini([0, 0]) == 0.0
    assert gini([]) == 0.0


def test_jain_known_values() -> None:
    assert jain([3, 3, 3]) == pytest.approx(1.0)
    assert jain([1, 0]) == pytest.approx(0.5)
    assert jain([1, 2, 3]) == pytest.approx(36 / 42)
    assert jain([0, 0, 0]) == 1.0


def test_max_relative_shortfall_known_values() -> None:
    assert max_relative_shortfall([50, 200], [100, 100]) == pytest.approx(0.5)
    assert max_relative_shortfall([0, 7], [0, 5]) == 0.0  # D=0 is skipped, surplus is no shortfall
    assert max_relative_shortfall([1, 1], [0, 0]) == 0.0
    assert max_relative_shortfall([0, 3], [4, 3]) == 1.0


def test_allocation_error_known_values() -> None:
    assert allocation_error([1, 2], [2, 1], 3) == pytest.approx(2 / 3)
    assert allocation_error([1, 2], [1, 2], 3) == 0.0
    assert allocation_error([0, 0], [0, 0], 0) == 0.0
    assert allocation_error([1, 0], [0, 1], 0) == float("inf")


def test_summary_is_on_coverage() -> None:
    # Proportional split: every hospital covered at the same rate → perfectly fair.
    s = fairness_summary([10, 20, 30], [1, 2, 3])
    assert s == {"gini": pytest.approx(0.0), "jain": pytest.approx(1.0),
                 "max_relative_shortfall": 0.0}
    # Coverage 0.5 and 1.0 (the zero-demand hospital is left out).
    s = fairness_summary([1, 4, 9], [2, 4, 0])
    assert s["gini"] == pytest.approx(gini([0.5, 1.0]))
    assert s["jain"] == pytest.approx(2.25 / 2.5)
    assert s["max_relative_shortfall"] == pytest.approx(0.5)
    np.testing.assert_allclose(coverage([1, 4, 9], [2, 4, 0]), [0.5, 1.0])


def test_allocate_reports_summary_of_its_allocation() -> None:
    res = allocate([100, 200, 300], [0.8, 0.6, 0.5], 1000, "seed")
    assert res.fairness == pytest.approx(fairness_summary(res.allocation, [100, 200, 300]))
    # seed coverage ∝ R_i: (0.8, 0.6, 0.5)/something, so it is not perfectly fair
    assert res.fairness["gini"] == pytest.approx(gini([0.8, 0.6, 0.5]))
    assert res.fairness["jain"] < 1.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: gini([1, -1]), r"x\[1\] is negative \(-1\.0\)"),
        (lambda: jain([np.nan]), r"x\[0\] is NaN"),
        (lambda: max_relative_shortfall([1, 2], [1]), r"alloc has length 2 but demand has length 1"),
        (lambda: fairness_summary([1], [np.inf]), r"demand\[0\] is infinite"),
        (lambda: allocation_error([1], [1, 2], 3), r"alloc_pred has length 1 but alloc_true has length 2"),
        (lambda: allocation_error([1], [1], -3), r"total is negative"),
    ],
)
def test_bad_input(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


@SETTINGS
@given(x=values)
def test_property_gini_matches_pairwise_definition(x: list[float]) -> None:
    v = np.array(x)
    expected = 0.0 if v.sum() == 0 else np.abs(v[:, None] - v[None, :]).sum() / (2 * v.size * v.sum())
    assert gini(v) == pytest.approx(expected, abs=1e-9)
    assert 0.0 <= gini(v) <= 1.0 - 1.0 / v.size + 1e-12


@SETTINGS
@given(x=values, k=st.floats(min_value=1e-3, max_value=1e3))
def test_property_jain_bounds_and_scale_invariance(x: list[float], k: float) -> None:
    v = np.array(x)
    j = jain(v)
    assert 1.0 / v.size - 1e-12 <= j <= 1.0 + 1e-12
    assert jain(v * k) == pytest.approx(j, rel=1e-9)
    assert gini(v * k) == pytest.approx(gini(v), abs=1e-9)


@SETTINGS
@given(d=values, data=st.data())
def test_property_shortfall_in_unit_interval(d: list[float], data: st.DataObject) -> None:
    a = data.draw(st.lists(st.floats(min_value=0, max_value=1e6), min_size=len(d), max_size=len(d)))
    s = max_relative_shortfall(a, d)
    assert 0.0 <= s <= 1.0
    assert max_relative_shortfall(np.array(d), d) == 0.0  # meeting demand exactly: no shortfall
