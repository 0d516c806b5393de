"""Fairness metrics: known values, agreement with the textbook formulas, edge cases, errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.allocation import allocate
from core.fairness import (
    allocation_change,
    allocation_error,
    coverage,
    demand_shares,
    fairness_summary,
    gini,
    jain,
    max_relative_shortfall,
    proportional_reference,
    relative_coverage,
    share_gap,
    units_moved,
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
    assert {k: s[k] for k in ("gini", "jain", "max_relative_shortfall")} == {
        "gini": pytest.approx(0.0), "jain": pytest.approx(1.0), "max_relative_shortfall": 0.0}
    # Coverage 0.5 and 1.0 (the zero-demand hospital is left out).
    s = fairness_summary([1, 4, 9], [2, 4, 0])
    assert s["gini"] == pytest.approx(gini([0.5, 1.0]))
    assert s["jain"] == pytest.approx(2.25 / 2.5)
    # This assertion was `== 0.5`: the shortfall of A = 1 against D = 2, allocation units against
    # demand units (issue #12's bug). It is now against the demand-proportional share of the 14
    # units allocated: hospital 0 should get 14·2/6 = 4.67 and gets 1.
    assert s["max_relative_shortfall"] == pytest.approx(1 - 1 / (14 * 2 / 6))
    np.testing.assert_allclose(coverage([1, 4, 9], [2, 4, 0]), [0.5, 1.0])


def test_share_gap_and_coverage_on_a_hand_built_example() -> None:
    # 100 units; demand 50/30/20 → demand shares 0.5/0.3/0.2; allocation 40/40/20.
    alloc, demand = [40.0, 40.0, 20.0], [500.0, 300.0, 200.0]
    np.testing.assert_allclose(demand_shares(demand), [0.5, 0.3, 0.2])
    np.testing.assert_allclose(share_gap(alloc, demand), [-0.1, 0.1, 0.0], atol=1e-12)
    assert share_gap(alloc, demand).sum() == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(proportional_reference(alloc, demand), [50, 30, 20])
    np.testing.assert_allclose(relative_coverage(alloc, demand), [0.8, 4 / 3, 1.0])
    s = fairness_summary(alloc, demand)
    assert s["max_share_gap"] == pytest.approx(0.1)
    assert s["misallocated_share"] == pytest.approx(0.1)  # 10 of the 100 units sit at the wrong hospital
    assert s["min_coverage"] == pytest.approx(0.8)
    assert s["max_relative_shortfall"] == pytest.approx(0.2)
    # the misallocated share is the units moved away from the demand-proportional split
    assert units_moved(alloc, proportional_reference(alloc, demand)) / 100 == pytest.approx(0.1)


def test_shortfall_compares_like_with_like() -> None:
    """Regression for the 0.989 on every run: 1000 allocation units split exactly in proportion
    to ≈ 10^4 admissions per hospital is perfectly demand-proportional, not 99 % short."""
    demand = np.array([9000.0, 12000.0, 30000.0, 41000.0])
    res = allocate(demand, None, 1000, "proportional")
    assert res.fairness["max_relative_shortfall"] == pytest.approx(0.0, abs=1e-12)
    assert res.fairness["min_coverage"] == pytest.approx(1.0)
    assert res.fairness["misallocated_share"] == pytest.approx(0.0, abs=1e-12)
    assert max_relative_shortfall(res.allocation, demand) > 0.95  # what the old summary reported


def test_seed_policy_share_gap_follows_resources() -> None:
    # Equal demand, resources 3:1: seed gives 75/25, demand-proportional is 50/50.
    res = allocate([100, 100], [3, 1], 100, "seed")
    assert res.fairness["max_share_gap"] == pytest.approx(0.25)
    assert res.fairness["misallocated_share"] == pytest.approx(0.25)
    assert res.fairness["min_coverage"] == pytest.approx(0.5)


def test_fairness_edge_cases() -> None:
    np.testing.assert_allclose(share_gap([0, 0], [1, 3]), [0, 0])  # nothing allocated: nothing unfair
    assert fairness_summary([0, 0], [1, 3])["min_coverage"] == 1.0
    np.testing.assert_allclose(share_gap([1, 3], [0, 0]), [-0.25, 0.25])  # ΣD = 0: equal split reference
    s = fairness_summary([5, 5], [0, 0])
    assert s["max_share_gap"] == 0.0 and s["min_coverage"] == 1.0


def test_allocation_change_is_zero_without_noise_and_flags_the_smallest() -> None:
    true_d = np.array([500.0, 20.0, 300.0, 60.0])
    a_true = allocate(true_d, [5, 1, 4, 2], 1000, "seed").allocation
    same = allocation_change(a_true, a_true, true_d, smallest=2)
    assert (same.change == 0).all() and (same.change_pct == 0).all()
    assert units_moved(a_true, a_true) == 0.0
    assert same.index.tolist() == [1, 3, 2, 0]  # smallest first
    assert same.smallest.tolist() == [True, True, False, False]
    released = true_d + np.array([0.0, 15.0, 0.0, -15.0])  # DP noise on the two small hospitals
    a_rel = allocate(released, [5, 1, 4, 2], 1000, "seed").allocation
    ch = allocation_change(a_rel, a_true, true_d, smallest=2)
    assert ch.change.sum() == pytest.approx(0.0, abs=1e-9)  # same total: one's gain is another's loss
    assert ch.loc[1, "change"] > 0 and ch.loc[3, "change"] < 0
    assert ch.loc[1, "change_pct"] == pytest.approx(100 * (a_rel[1] - a_true[1]) / a_true[1])
    assert units_moved(a_rel, a_true) == pytest.approx(allocation_error(a_rel, a_true, 1000) * 1000 / 2)


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


@SETTINGS
@given(d=values, data=st.data(), k=st.floats(min_value=1e-3, max_value=1e3))
def test_property_share_gap_sums_to_zero_and_summary_is_unit_free(d: list[float], data: st.DataObject,
                                                                   k: float) -> None:
    a = data.draw(st.lists(st.floats(min_value=0, max_value=1e6), min_size=len(d), max_size=len(d)))
    gap = share_gap(a, d)
    if sum(a) > 0:
        assert gap.sum() == pytest.approx(0.0, abs=1e-9)
    # allocation units and demand units are independent: rescaling either changes nothing
    base = fairness_summary(a, d)
    for other in (fairness_summary(np.array(a) * k, d), fairness_summary(a, np.array(d) * k)):
        assert other == pytest.approx(base, rel=1e-6, abs=1e-9)
    assert 0.0 <= base["misallocated_share"] <= 1.0 and 0.0 <= base["max_relative_shortfall"] <= 1.0
