"""Allocation policies: worked examples, properties (hypothesis), edge cases and input errors."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from core.allocation import POLICIES, AllocationResult, allocate, allocate_array
from core.apportion import apportion, largest_remainder
from core.waterfill import water_fill

CONTINUOUS = ("seed", "proportional", "need_gap", "capped")
# Kept small so the suite stays fast; FEDALLOC_PROPERTY_EXAMPLES=2000 for a thorough local run.
SETTINGS = settings(max_examples=int(os.environ.get("FEDALLOC_PROPERTY_EXAMPLES", "40")), deadline=None)


def _close(a: float, b: float, scale: float = 1.0) -> bool:
    return bool(np.isclose(a, b, rtol=1e-9, atol=1e-9 * max(scale, 1.0)))


# ── worked seed example ──────────────────────────────────────────────────────────────────────


def test_seed_worked_example_by_hand() -> None:
    d = [Fraction(100), Fraction(200), Fraction(300)]
    r = [Fraction(8, 10), Fraction(6, 10), Fraction(5, 10)]
    sd, sr = sum(d), sum(r)  # 600 and 19/10
    w = [di / sd * ri / sr for di, ri in zip(d, r)]
    assert w == [Fraction(100, 600) * Fraction(8, 19), Fraction(200, 600) * Fraction(6, 19),
                 Fraction(300, 600) * Fraction(5, 19)]
    # W_i ∝ D_i·R_i = 80, 120, 150 (sum 350), so A = 1000·(80, 120, 150)/350.
    expected_a = [Fraction(1600, 7), Fraction(2400, 7), Fraction(3000, 7)]
    assert [wi / sum(w) * 1000 for wi in w] == expected_a

    res = allocate([100, 200, 300], [0.8, 0.6, 0.5], 1000, "seed")
    np.testing.assert_allclose(res.table["weight"], [float(x) for x in w], rtol=1e-12)
    np.testing.assert_allclose(res.table["weight"], [0.0701754385965, 0.1052631578947,
                                                     0.1315789473684], rtol=1e-11)
    np.testing.assert_allclose(res.allocation, [float(x) for x in expected_a], rtol=1e-12)
    np.testing.assert_allclose(res.allocation, [228.5714285714, 342.8571428571, 428.5714285714],
                               rtol=1e-11)
    # Not the seed sketch's bug: scaling by ΣR = 1.9 would give a sum of 1.9, not 1000.
    assert res.allocation.sum() == pytest.approx(1000.0)


def test_integer_units_worked() -> None:
    # Quotas 1000·(1, 2, 3)/6 = 166.67, 333.33, 500: floors sum to 999 and the one missing unit
    # goes to the largest remainder (.67, hospital 0).
    out = allocate_array([100, 200, 300], [0.8, 0.6, 0.5], 1000, "proportional", integer=True)
    assert out.dtype == np.int64
    assert out.tolist() == [167, 333, 500]


def test_result_table_and_fairness_shape() -> None:
    res = allocate([1, 2], [1, 1], 10, "proportional", hospitals=["a", "b"])
    assert isinstance(res, AllocationResult)
    assert list(res.table.columns) == ["hospital", "demand", "resources", "weight", "allocation"]
    assert res.table["hospital"].tolist() == ["a", "b"]
    assert set(res.fairness) == {"max_share_gap", "misallocated_share", "min_coverage", "max_relative_shortfall",
                                 "gini", "jain"}  # issue #12: share gap and coverage vs demand share
    assert res.fairness["gini"] == pytest.approx(0.0)
    assert res.fairness["jain"] == pytest.approx(1.0)
    np.testing.assert_allclose(res.allocation, allocate_array([1, 2], [1, 1], 10, "proportional"))


# ── other policies, worked ───────────────────────────────────────────────────────────────────


def test_proportional_and_need_gap_worked() -> None:
    np.testing.assert_allclose(allocate_array([1, 3], None, 8, "proportional"), [2, 6])
    # gaps: max(10-4,0)=6, max(5-7,0)=0, max(9-6,0)=3 → 6:0:3 of 90
    np.testing.assert_allclose(allocate_array([10, 5, 9], [4, 7, 6], 90, "need_gap"), [60, 0, 30])


def test_need_gap_falls_back_to_proportional_when_no_gap() -> None:
    np.testing.assert_allclose(allocate_array([1, 3], [5, 5], 8, "need_gap"), [2, 6])


def test_capped_worked_level() -> None:
    # A = (λ, min(λ, 1), 2λ) with λ = 7/3: 7/3 + 1 + 14/3 = 8.
    out = allocate_array([1, 1, 2], None, 8, "capped", caps=[10, 1, 10])
    np.testing.assert_allclose(out, [7 / 3, 1, 14 / 3], rtol=1e-12)


def test_capped_floor_binds() -> None:
    # Floor 5 on hospital 0 lifts it above λ·D; the rest share 5 in proportion 1:4.
    out = allocate_array([1, 1, 4], None, 10, "capped", floors=[5, 0, 0])
    np.testing.assert_allclose(out, [5, 1, 4], rtol=1e-12)


def test_capped_leftover_goes_to_zero_demand_hospitals() -> None:
    out = allocate_array([1, 0, 0], None, 5, "capped", caps=[1, 10, 1])
    np.testing.assert_allclose(out, [1, 3, 1])


def test_capped_without_bounds_is_proportional() -> None:
    d = [3.0, 1.0, 6.0]
    np.testing.assert_allclose(allocate_array(d, None, 50, "capped"),
                               allocate_array(d, None, 50, "proportional"), rtol=1e-12)


def test_capped_integer_respects_rounded_bounds() -> None:
    out = allocate_array([1, 1, 1], None, 10, "capped", floors=[2.2, 0, 0], caps=[9, 3.7, 9],
                         integer=True)
    assert out.sum() == 10
    assert out[0] >= 3 and out[1] <= 3


def test_drg_budget_worked() -> None:
    gd = pd.DataFrame({"cardiac": [10, 0], "respiratory": [0, 10]})
    # weights from core.drg: cardiac 1.6, respiratory 1.1; base rate 100 → 1600, 1100.
    res = allocate(None, None, None, "drg_budget", group_demand=gd, base_rate=100)
    np.testing.assert_allclose(res.allocation, [1600, 1100])
    np.testing.assert_allclose(res.table["weight"], [16 / 27, 11 / 27])
    capped = allocate_array(None, None, None, "drg_budget", group_demand=gd, base_rate=100,
                            budget=2000)
    np.testing.assert_allclose(capped, [1600 * 2000 / 2700, 1100 * 2000 / 2700])
    # total is the same amount as budget for drg_budget
    np.testing.assert_allclose(
        allocate_array(None, None, 2000, "drg_budget", group_demand=gd, base_rate=100), capped)
    # a budget above the raw sum does not inflate payments
    np.testing.assert_allclose(
        allocate_array(None, None, None, "drg_budget", group_demand=gd, base_rate=100, budget=10**6),
        [1600, 1100])
    ints = allocate_array(None, None, None, "drg_budget", group_demand=gd, base_rate=100,
                          budget=2000, integer=True)
    assert ints.sum() == 2000 and ints.tolist() == [1185, 815]


def test_drg_budget_array_input_and_custom_weights() -> None:
    gd = np.array([[1.0, 2.0], [3.0, 0.0]])
    out = allocate_array(None, None, None, "drg_budget", group_demand=gd,
                         relative_weights=[2.0, 0.5], base_rate=10)
    np.testing.assert_allclose(out, [30, 60])
    res = allocate(None, None, None, "drg_budget", group_demand=gd, relative_weights=[2.0, 0.5])
    assert res.table["demand"].tolist() == [3.0, 3.0]  # row sums when demand is not given
    assert res.fairness["max_relative_shortfall"] == 0.0  # nothing scaled down


def test_quantile_shifts_demand_by_normal_quantile() -> None:
    z975 = 1.959963984540054  # Φ⁻¹(0.975)
    res = allocate([100, 100], None, 1000, "proportional", quantile=0.975, demand_std=[10, 0])
    d_q = np.array([100 + z975 * 10, 100])
    np.testing.assert_allclose(res.table["demand_q"], d_q, rtol=1e-12)
    np.testing.assert_allclose(res.allocation, 1000 * d_q / d_q.sum(), rtol=1e-12)
    # the median is the mean
    np.testing.assert_allclose(
        allocate_array([1, 3], None, 8, "proportional", quantile=0.5, demand_std=[5, 5]), [2, 6])


def test_quantile_clips_at_zero() -> None:
    res = allocate([1, 10], None, 10, "proportional", quantile=0.01, demand_std=[5, 0])
    assert res.table["demand_q"].tolist()[0] == 0.0
    np.testing.assert_allclose(res.allocation, [0, 10])


# ── edge cases ───────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize("policy", ["seed", "proportional", "need_gap", "capped"])
def test_zero_total_demand_gives_equal_split(policy: str) -> None:
    np.testing.assert_allclose(allocate_array([0, 0, 0, 0], [1, 2, 3, 4], 8, policy), [2, 2, 2, 2])


def test_seed_zero_resources_falls_back_to_demand_shares() -> None:
    np.testing.assert_allclose(allocate_array([1, 3], [0, 0], 8, "seed"), [2, 6])


def test_seed_no_hospital_with_both_demand_and_resources_falls_back() -> None:
    np.testing.assert_allclose(allocate_array([1, 0], [0, 5], 8, "seed"), [8, 0])


@pytest.mark.parametrize("policy", CONTINUOUS)
@pytest.mark.parametrize("integer", [False, True])
def test_single_hospital_gets_everything(policy: str, integer: bool) -> None:
    out = allocate_array([7], [3], 12, policy, integer=integer)
    assert out.tolist() == [12]


@pytest.mark.parametrize("policy", CONTINUOUS)
@pytest.mark.parametrize("integer", [False, True])
def test_zero_total_gives_zeros(policy: str, integer: bool) -> None:
    out = allocate_array([5, 1, 0], [1, 1, 1], 0, policy, integer=integer)
    assert out.tolist() == [0, 0, 0]


@pytest.mark.parametrize("policy", CONTINUOUS)
def test_extreme_magnitudes_stay_finite(policy: str) -> None:
    for d in ([1.0, 5e-324], [1e300, 1e-300, 0.0], [1e308, 1e308]):
        out = allocate_array(d, [1.0] * len(d), 1e5, policy)
        assert np.isfinite(out).all() and (out >= 0).all()
        assert out.sum() == pytest.approx(1e5, rel=1e-9)
    out = allocate_array([4.0, 2.2e-308], None, 0, "capped", caps=[0, np.inf])
    assert out.tolist() == [0.0, 0.0]


# ── input errors ─────────────────────────────────────────────────────────────────────────────


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"demand": [1, 2, 3, -2.0]}, r"^demand\[3\] is negative \(-2\.0\)$"),
        ({"demand": [1, np.nan]}, r"^demand\[1\] is NaN$"),
        ({"demand": [np.inf, 1]}, r"^demand\[0\] is infinite \(inf\)$"),
        ({"resources": [1, -1, 1]}, r"^resources\[1\] is negative"),
        ({"resources": [1, 1]}, r"resources has length 2 but demand has length 3"),
        ({"total": -1}, r"total is negative"),
        ({"total": float("nan")}, r"total is NaN"),
        ({"total": None}, r"total is required"),
        ({"demand": []}, r"demand is empty"),
        ({"demand": [[1, 2]]}, r"demand must be 1-dimensional"),
        ({"demand": ["a", "b", "c"]}, r"demand must be numeric"),
        ({"policy": "greedy"}, r"unknown policy 'greedy'"),
        ({"caps": [1, 1, 1]}, r"caps does not apply to policy 'seed'"),
        ({"budget": 5}, r"budget does not apply to policy 'seed'"),
        ({"integer": True, "total": 10.5}, r"total must be a whole number"),
        ({"quantile": 0.9}, r"quantile and demand_std must be given together"),
        ({"quantile": 1.0, "demand_std": [1, 1, 1]}, r"strictly between 0 and 1"),
        ({"quantile": 0.9, "demand_std": [1, -1, 1]}, r"demand_std\[1\] is negative"),
        ({"hospitals": ["a"]}, r"hospitals has 1 labels but there are 3 hospitals"),
    ],
)
def test_bad_input_raises_value_error(kwargs: dict, message: str) -> None:
    args = {"demand": [1.0, 2.0, 3.0], "resources": [1.0, 1.0, 1.0], "total": 10, "policy": "seed"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        allocate(args.pop("demand"), args.pop("resources"), args.pop("total"), **args)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"floors": [5, 5, 5]}, r"sum of floors \(15\.0\) exceeds total \(10\.0\)"),
        ({"caps": [1, 1, 1]}, r"sum of caps \(3\.0\) is below total \(10\.0\)"),
        ({"floors": [2, 0, 0], "caps": [1, 9, 9]}, r"floors\[0\] \(2\.0\) is above caps\[0\] \(1\.0\)"),
        ({"caps": [1, np.nan, 1]}, r"caps\[1\] is NaN"),
        ({"floors": [0, -1, 0]}, r"floors\[1\] is negative"),
        ({"floors": [2.2, 0, 0], "caps": [2.8, 9, 9], "integer": True},
         r"no whole number between floors\[0\] \(2\.2\) and caps\[0\] \(2\.8\)"),
    ],
)
def test_capped_bound_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        allocate([1, 2, 3], None, 10, "capped", **kwargs)


def test_drg_errors() -> None:
    gd = pd.DataFrame({"cardiac": [1, 2]})
    with pytest.raises(ValueError, match="group_demand is required"):
        allocate(None, None, 10, "drg_budget")
    with pytest.raises(ValueError, match="'plastic' is not a known DRG group"):
        allocate(None, None, 10, "drg_budget", group_demand=pd.DataFrame({"plastic": [1]}))
    with pytest.raises(ValueError, match=r"group_demand\['cardiac'\]\[1\] is negative"):
        allocate(None, None, 10, "drg_budget", group_demand=pd.DataFrame({"cardiac": [1, -3]}))
    with pytest.raises(ValueError, match=r"group_demand\[1, 0\] is NaN"):
        allocate(None, None, 10, "drg_budget", group_demand=np.array([[1.0], [np.nan]]),
                 relative_weights=[1.0])
    with pytest.raises(ValueError, match="relative_weights has 12 entries but group_demand has 2"):
        allocate(None, None, 10, "drg_budget", group_demand=np.ones((3, 2)))
    with pytest.raises(ValueError, match="budget=5.0 and total=10.0"):
        allocate(None, None, 10, "drg_budget", group_demand=gd, budget=5)
    with pytest.raises(ValueError, match="quantile does not apply"):
        allocate(None, None, 10, "drg_budget", group_demand=gd, quantile=0.9, demand_std=[1, 1])
    with pytest.raises(ValueError, match=r"demand has length 3 but group_demand has length 2"):
        allocate([1, 2, 3], None, 10, "drg_budget", group_demand=gd)
    with pytest.raises(ValueError, match="base_rate is negative"):
        allocate(None, None, 10, "drg_budget", group_demand=gd, base_rate=-1)


def test_group_demand_rejected_for_other_policies() -> None:
    with pytest.raises(ValueError, match="group_demand does not apply to policy 'proportional'"):
        allocate([1], None, 1, "proportional", group_demand=np.ones((1, 12)))


# ── properties ───────────────────────────────────────────────────────────────────────────────

# Magnitudes like 1e-300 only probe floating-point range, not the policies; a unit test above
# covers them. Exact zeros are drawn separately (that is where the fallbacks live).
amounts = st.floats(min_value=1e-6, max_value=1e6)
small = st.floats(min_value=1e-6, max_value=1e3)


@st.composite
def instances(draw: st.DrawFn, bounded: bool = False) -> dict:
    n = draw(st.integers(1, 25))
    # Mix exact zeros in: they are where the fallbacks and the water-filling corner cases live.
    demand = draw(st.lists(st.one_of(st.just(0.0), amounts), min_size=n, max_size=n))
    resources = draw(st.lists(st.one_of(st.just(0.0), small), min_size=n, max_size=n))
    out = {"demand": np.array(demand), "resources": np.array(resources)}
    if bounded:
        floors = np.array(draw(st.lists(st.one_of(st.just(0.0), small), min_size=n, max_size=n)))
        room = draw(st.lists(st.one_of(st.just(np.inf), st.just(0.0), small), min_size=n, max_size=n))
        caps = floors + np.array(room)
        lo, hi = floors.sum(), caps.sum()
        frac = draw(st.floats(0, 1))
        total = lo + frac * (min(hi, lo + 1e5) - lo)
        out.update(floors=floors, caps=caps, total=total)
    else:
        out["total"] = draw(st.one_of(st.just(0.0), amounts))
    return out


def _run(case: dict, policy: str, **kw) -> np.ndarray:
    extra = {"floors": case["floors"], "caps": case["caps"]} if "caps" in case else {}
    return allocate_array(case["demand"], case["resources"], case["total"], policy, **extra, **kw)


@SETTINGS
@given(case=instances(), policy=st.sampled_from(CONTINUOUS))
def test_property_continuous_nonnegative_and_sums_to_total(case: dict, policy: str) -> None:
    out = _run(case, policy)
    assert out.shape == case["demand"].shape
    assert (out >= 0).all()
    assert _close(out.sum(), case["total"], case["total"])


@SETTINGS
@given(case=instances(), policy=st.sampled_from(CONTINUOUS))
def test_property_integer_nonnegative_and_exact_sum(case: dict, policy: str) -> None:
    total = int(case["total"])
    case = {**case, "total": total}
    out = _run(case, policy, integer=True)
    cont = _run(case, policy)
    assert out.dtype == np.int64
    assert (out >= 0).all()
    assert int(out.sum()) == total
    # Hamilton: each hospital within one unit of its continuous quota.
    assert (np.abs(out - cont) < 1 + 1e-6).all()


@SETTINGS
@given(case=instances(bounded=True))
def test_property_capped_respects_bounds_and_sum(case: dict) -> None:
    out = _run(case, "capped")
    tol = 1e-9 * max(case["total"], 1.0)
    assert (out >= case["floors"] - tol).all()
    assert (out <= case["caps"] + tol).all()
    assert _close(out.sum(), case["total"], case["total"])


@SETTINGS
@given(case=instances(bounded=True))
def test_property_capped_is_a_common_level(case: dict) -> None:
    """Max-min certificate: one λ with free hospitals at λ, capped ≤ λ, floored ≥ λ (coverage)."""
    d, f, c = case["demand"], case["floors"], case["caps"]
    out = _run(case, "capped")
    tol = 1e-7 * max(case["total"], 1.0)
    pos = d > 0
    free = pos & (out > f + tol) & (out < c - tol)
    cov = np.divide(out, d, out=np.zeros_like(out), where=pos)
    if free.any():
        lam = cov[free]
        assert np.allclose(lam, lam[0], rtol=1e-6)
        # A hospital pinned at both bounds (floor == cap) constrains nothing.
        at_cap = pos & (out >= c - tol) & (out > f + tol)
        at_floor = pos & (out <= f + tol) & (out < c - tol)
        assert (cov[at_cap] <= lam[0] * (1 + 1e-6) + tol).all()
        assert (cov[at_floor] >= lam[0] * (1 - 1e-6) - tol).all()


@SETTINGS
@given(case=instances(bounded=True))
def test_property_capped_integer_respects_bounds(case: dict) -> None:
    # Whole-number-compatible bounds built directly (filtering with assume would starve hypothesis).
    f = np.ceil(case["floors"])
    c = np.maximum(np.floor(case["caps"]), f)
    total = int(np.clip(np.floor(case["total"]), f.sum(), min(c.sum(), 10**7)))
    out = allocate_array(case["demand"], None, total, "capped", floors=f, caps=c, integer=True)
    assert int(out.sum()) == total
    assert (out >= f).all()
    assert (out <= c).all()


@SETTINGS
@given(case=instances(), policy=st.sampled_from(CONTINUOUS), i=st.integers(0, 24),
       bump=st.floats(min_value=1e-3, max_value=1e5))
def test_property_monotone_in_own_demand(case: dict, policy: str, i: int, bump: float) -> None:
    i %= case["demand"].size
    before = _run(case, policy)
    raised = case["demand"].copy()
    raised[i] += bump
    after = _run({**case, "demand": raised}, policy)
    assert after[i] >= before[i] - 1e-9 * max(case["total"], 1.0)


@SETTINGS
@given(case=instances(bounded=True), i=st.integers(0, 24),
       bump=st.floats(min_value=1e-3, max_value=1e5))
def test_property_capped_monotone_with_bounds(case: dict, i: int, bump: float) -> None:
    i %= case["demand"].size
    before = _run(case, "capped")
    raised = case["demand"].copy()
    raised[i] += bump
    after = _run({**case, "demand": raised}, "capped")
    assert after[i] >= before[i] - 1e-7 * max(case["total"], 1.0)


@SETTINGS
@given(case=instances(), k=st.floats(min_value=1e-3, max_value=1e3), which=st.sampled_from(["D", "R"]))
def test_property_seed_scale_invariant(case: dict, k: float, which: str) -> None:
    base = _run(case, "seed")
    key = "demand" if which == "D" else "resources"
    scaled = _run({**case, key: case[key] * k}, "seed")
    np.testing.assert_allclose(scaled, base, rtol=1e-9, atol=1e-9 * max(case["total"], 1.0))


@SETTINGS
@given(
    n=st.integers(1, 20),
    data=st.data(),
    base_rate=st.floats(min_value=0, max_value=1e4),
    budget=st.one_of(st.none(), st.integers(0, 10**7)),
    integer=st.booleans(),
)
def test_property_drg_budget(n: int, data: st.DataObject, base_rate: float, budget: int | None,
                             integer: bool) -> None:
    gd = np.array(data.draw(st.lists(st.lists(st.one_of(st.just(0.0), small), min_size=3, max_size=3),
                                     min_size=n, max_size=n)))
    w = np.array([1.1, 1.6, 0.8])
    raw = gd @ w * base_rate
    assume(budget is not None or not integer or raw.sum() < 1e12)
    out = allocate_array(None, None, None, "drg_budget", group_demand=gd, relative_weights=w,
                         base_rate=base_rate, budget=budget, integer=integer)
    assert (out >= 0).all()
    target = raw.sum() if budget is None else min(raw.sum(), budget)
    if integer:
        assert abs(int(out.sum()) - target) <= 0.5 + 1e-9 * target
        if budget is not None and raw.sum() > budget:
            assert int(out.sum()) == budget
    else:
        assert _close(out.sum(), target, target)
        assert (out <= raw * (1 + 1e-12) + 1e-9).all()  # scaling only ever lowers payments


# ── water-filling and apportionment internals ───────────────────────────────────────────────


def _waterfill_by_bisection(d: np.ndarray, f: np.ndarray, c: np.ndarray, t: float) -> np.ndarray:
    lo, hi = 0.0, 1.0
    while np.clip(hi * d, f, c).sum() < t:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if np.clip(mid * d, f, c).sum() < t else (lo, mid)
    return np.clip(hi * d, f, c)


def test_water_fill_matches_bisection_at_scale() -> None:
    # Large enough that the breakpoint search samples rather than scanning everything.
    rng = np.random.default_rng(7)
    n = 50_000
    d = rng.lognormal(3, 1, n) * (rng.random(n) > 0.05)
    f = np.where(rng.random(n) < 0.3, rng.random(n) * 20, 0.0)
    c = np.where(rng.random(n) < 0.5, f + rng.random(n) * 60, np.inf)
    t = 0.5 * (f.sum() + d.sum())
    got = water_fill(d, f, c, t)
    np.testing.assert_allclose(got, _waterfill_by_bisection(d, f, c, t), rtol=1e-9, atol=1e-6)
    assert got.sum() == pytest.approx(t, rel=1e-12)


def test_largest_remainder_basic_and_ties() -> None:
    assert largest_remainder([2.6, 3.3, 4.1], 10).tolist() == [3, 3, 4]
    assert largest_remainder([1.5, 1.5, 1.0], 4).tolist() == [2, 1, 1]  # tie → lower index
    assert apportion([1, 1, 1], 10).tolist() == [4, 3, 3]
    assert apportion([0, 0], 3).tolist() == [2, 1]


def test_largest_remainder_bounds_and_errors() -> None:
    # Without the bound index 0 would take the extra unit (remainder .9).
    assert largest_remainder([2.9, 3.1, 4.0], 10, upper=[2, 9, 9]).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="only 0 hospital"):
        largest_remainder([1.0, 1.0], 4, upper=[1, 1])
    with pytest.raises(ValueError, match="total must be a whole number"):
        largest_remainder([1.0], 1.5)


@SETTINGS
@given(weights=st.lists(small, min_size=1, max_size=30), total=st.integers(0, 10**6))
def test_property_apportion_exact(weights: list[float], total: int) -> None:
    out = apportion(weights, total)
    assert int(out.sum()) == total and (out >= 0).all()
    w = np.array(weights)
    quota = w / w.sum() * total if w.sum() > 0 else np.full(w.size, total / w.size)
    assert (np.abs(out - quota) < 1 + 1e-6).all()


def test_policies_constant_lists_all() -> None:
    assert set(POLICIES) == {"seed", "proportional", "need_gap", "capped", "drg_budget"}
