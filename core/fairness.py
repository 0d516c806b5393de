"""Fairness metrics for allocations, in terms a planner can act on.

An allocation A_i (beds, staff hours, money: allocation units) is compared with the split that
follows demand alone: hospital i's **demand-proportional share** A·D_i/ΣD of what was allocated
(A = ΣA_i). Both sides are then in allocation units, and the numbers read directly:

- ``share_gap`` A_i/A − D_i/ΣD: how far each hospital's share of the total is from its share of
  demand (in share points; the gaps sum to 0: one hospital's surplus is another's deficit).
  ``misallocated_share`` = ½Σ|gap| is the part of the total that would have to move to make the
  split demand-proportional; ``max_share_gap`` is the largest single deviation.
- ``relative_coverage`` A_i / (A·D_i/ΣD): 1 = the hospital gets exactly its demand share, 0.8 =
  20 % less. ``min_coverage`` is the worst-served hospital; ``max_relative_shortfall`` =
  max(0, 1 − min_coverage) is the largest fraction of its demand share a hospital does not get.
- ``gini`` / ``jain`` of coverage A_i/D_i (scale-free, so the same as of relative coverage): how
  unequal the coverage is. Read them as a property of the *policy*: under the seed policy
  A_i ∝ D_i·R_i, so coverage ∝ R_i and Gini/Jain are those of the resources R_i whatever D_i is;
  they cannot show forecast error or DP noise. Use the share gap and ``allocation_change`` for that.

Why the old summary misled: ``max_relative_shortfall`` used to compare A_i with D_i directly,
i.e. allocation units with admissions. With 1000 units shared among hospitals forecasting
≈ 10^4 admissions every hospital looked ≈ 99 % short (0.989 on every run), whatever the policy.
It is now measured against the demand-proportional share, in the same units. (The function
``max_relative_shortfall`` itself is unchanged: it is right when both arguments share units.)

``allocation_change`` compares two allocations of the same total per hospital, e.g. the one from
the released (noisy) D_i with the one from the true D_i in a simulation: how many units DP noise
and forecast error move, and to whom, with the smallest hospitals flagged (they have the least
signal per unit of noise).

Hospitals with D_i = 0 have no coverage to rate and are left out of coverage-based metrics (their
share gap is still defined). With ΣD = 0 the reference is an equal split (as in the allocation
core); with nothing allocated (A = 0) every gap is 0 and coverage is 1 (nothing to share unfairly).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from core.numeric_checks import as_scalar, as_vector


def gini(x: ArrayLike) -> float:
    """Gini coefficient in [0, 1 - 1/n]; 0 for an empty or all-zero vector (nothing is unequal)."""
    v = np.sort(as_vector("x", x))
    n, s = v.size, float(v.sum())
    if n == 0 or s == 0.0:
        return 0.0
    ranks = np.arange(1, n + 1, dtype=np.float64)
    g = 2.0 * float(ranks @ v) / (n * s) - (n + 1) / n
    return float(min(max(g, 0.0), 1.0))


def jain(x: ArrayLike) -> float:
    """Jain's index (Σx)²/(n·Σx²) in [1/n, 1]; 1.0 for an empty or all-zero vector."""
    v = as_vector("x", x)
    sq = float(v @ v)
    if v.size == 0 or sq == 0.0:
        return 1.0
    return float(v.sum()) ** 2 / (v.size * sq)


def _pair(alloc: ArrayLike, demand: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    d = as_vector("demand", demand)
    a = as_vector("alloc", alloc, length=d.size)
    return a, d


def max_relative_shortfall(alloc: ArrayLike, demand: ArrayLike) -> float:
    """max_i max(D_i − A_i, 0)/D_i over hospitals with D_i > 0; 0 if no hospital has demand."""
    a, d = _pair(alloc, demand)
    has = d > 0
    if not has.any():
        return 0.0
    return float(np.max(np.maximum(d[has] - a[has], 0.0) / d[has]))


def coverage(alloc: ArrayLike, demand: ArrayLike) -> np.ndarray:
    """A_i/D_i for the hospitals with D_i > 0 (hospitals without demand have no coverage to rate)."""
    a, d = _pair(alloc, demand)
    has = d > 0
    return a[has] / d[has]


def demand_shares(demand: ArrayLike) -> np.ndarray:
    """D_i/ΣD; an equal split when ΣD = 0 (nobody has a stronger claim, as in the allocation core)."""
    d = as_vector("demand", demand)
    s = float(d.sum())
    if d.size == 0:
        return d
    return d / s if s > 0 else np.full(d.size, 1.0 / d.size)


def share_gap(alloc: ArrayLike, demand: ArrayLike) -> np.ndarray:
    """A_i/ΣA − D_i/ΣD per hospital (sums to 0); all zeros when nothing is allocated."""
    a, d = _pair(alloc, demand)
    total = float(a.sum())
    if total == 0.0:
        return np.zeros(a.size)
    return a / total - demand_shares(d)


def proportional_reference(alloc: ArrayLike, demand: ArrayLike) -> np.ndarray:
    """Each hospital's demand-proportional share ΣA·D_i/ΣD of what was allocated (allocation units)."""
    a, d = _pair(alloc, demand)
    return float(a.sum()) * demand_shares(d)


def relative_coverage(alloc: ArrayLike, demand: ArrayLike) -> np.ndarray:
    """A_i over its demand-proportional share, for hospitals with D_i > 0 (1 = exactly its share)."""
    a, d = _pair(alloc, demand)
    has = d > 0
    ref = proportional_reference(a, d)[has]
    if float(a.sum()) == 0.0:
        return np.ones(int(has.sum()))
    return a[has] / ref


def fairness_summary(alloc: ArrayLike, demand: ArrayLike) -> dict[str, float]:
    """Planner-facing fairness of `alloc` against `demand` (see the module docstring for each key).

    Keys: max_share_gap, misallocated_share, min_coverage, max_relative_shortfall (all against the
    demand-proportional share, in allocation units), gini and jain (of coverage; under the seed
    policy they depend on R_i only).
    """
    a, d = _pair(alloc, demand)
    gap = share_gap(a, d)
    rel = relative_coverage(a, d)
    cov = coverage(a, d)
    return {
        "max_share_gap": float(np.max(np.abs(gap))) if gap.size else 0.0,
        "misallocated_share": 0.5 * float(np.abs(gap).sum()),
        "min_coverage": float(rel.min()) if rel.size else 1.0,
        # same units on both sides now (see the module docstring for the old bug)
        "max_relative_shortfall": max_relative_shortfall(a, proportional_reference(a, d)),
        "gini": gini(cov),
        "jain": jain(cov),
    }


def allocation_change(
    alloc: ArrayLike, alloc_reference: ArrayLike, size: ArrayLike, smallest: int = 3
) -> pd.DataFrame:
    """Per hospital: how `alloc` differs from `alloc_reference` (e.g. released vs true D_i).

    Columns: size (e.g. true D_i), reference, allocation, change (units, signed), change_pct (of the
    reference allocation; NaN where it is 0) and smallest (True for the `smallest` hospitals by
    size, which DP noise moves most in relative terms). Rows sorted by size, smallest first;
    the index is the hospital's position in the inputs.
    """
    ref = as_vector("alloc_reference", alloc_reference)
    a = as_vector("alloc", alloc, length=ref.size, length_of="alloc_reference")
    n = as_vector("size", size, length=ref.size, length_of="alloc_reference")
    change = a - ref
    with np.errstate(divide="ignore", invalid="ignore"):
        pct = np.where(ref > 0, 100.0 * change / np.where(ref > 0, ref, 1.0), np.nan)
    out = pd.DataFrame({"size": n, "reference": ref, "allocation": a, "change": change, "change_pct": pct})
    out = out.sort_values("size", kind="stable")
    out["smallest"] = np.arange(len(out)) < max(int(smallest), 0)
    return out


def units_moved(alloc: ArrayLike, alloc_reference: ArrayLike) -> float:
    """½Σ|A_i − A_ref,i|: allocation units that go to another hospital (equal totals assumed)."""
    ref = as_vector("alloc_reference", alloc_reference)
    a = as_vector("alloc", alloc, length=ref.size, length_of="alloc_reference")
    return 0.5 * float(np.abs(a - ref).sum())


def allocation_error(alloc_pred: ArrayLike, alloc_true: ArrayLike, total: float) -> float:
    """Σ|pred − true| / total: the share of the total that went to the wrong hospital, times two.

    With total == 0 the error is 0 when the allocations agree and inf otherwise.
    """
    t = as_vector("alloc_true", alloc_true)
    p = as_vector("alloc_pred", alloc_pred, length=t.size, length_of="alloc_true")
    tot = as_scalar("total", total)
    l1 = float(np.abs(p - t).sum())
    if tot == 0.0:
        return 0.0 if l1 == 0.0 else float("inf")
    return l1 / tot
