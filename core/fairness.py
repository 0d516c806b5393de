"""Fairness metrics for allocations.

`gini` and `jain` are the textbook indices of a non-negative vector. `fairness_summary` applies them
to coverage A_i/D_i (allocation per unit of demand) over hospitals with D_i > 0, not to raw
allocations: hospitals differ in size, so unequal raw allocations are expected, and what should be
equal is how much of each hospital's need is met (Jain et al. normalise by the fair share for the
same reason). A demand-proportional split therefore scores Gini 0 and Jain 1.
"""

from __future__ import annotations

import numpy as np
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


def fairness_summary(alloc: ArrayLike, demand: ArrayLike) -> dict[str, float]:
    """Gini and Jain of coverage A_i/D_i, and the max relative shortfall (see module docstring)."""
    cov = coverage(alloc, demand)
    return {
        "gini": gini(cov),
        "jain": jain(cov),
        "max_relative_shortfall": max_relative_shortfall(alloc, demand),
    }


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
