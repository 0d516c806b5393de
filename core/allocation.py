"""Allocation policies behind one entry point: who gets how much of A_total, and how fair it is.

Policies (D = forecast demand, R = current resources, T = total to allocate):

- ``seed``: W_i = D_i/ΣD · R_i/ΣR and A_i = W_i/ΣW · T (the seed sketch scaled by ΣR instead of
  T; that was a bug). Note that the seed policy rewards existing resources: a hospital with R_i = 0
  gets nothing however large its demand. Fallbacks: ΣD = 0 → equal split; ΣR = 0, or ΣW = 0
  because no hospital has both demand and resources → demand shares (proportional).
- ``proportional``: A_i ∝ D_i; ΣD = 0 → equal split.
- ``need_gap``: A_i ∝ max(D_i − R_i, 0); when no hospital has a gap → proportional.
- ``capped``: A_i = clip(λ·D_i, floor_i, cap_i) with one level λ (see core.waterfill);
  Σfloor > T or Σcap < T → ValueError.
- ``drg_budget``: payment_i = Σ_g D_{i,g}·w_g·base_rate, scaled down uniformly when Σ payment
  exceeds the budget. For this policy `budget` and `total` are the same thing (the money to
  share out); pass either. Without a budget the raw payments are the allocation.

``integer=True`` turns any policy's continuous result into whole units by largest remainder, with
Σ A_i == T exactly (T must be a whole number). For ``capped`` the bounds become ceil(floor_i) and
floor(cap_i) before filling, so the integer result still respects the given floors and caps.

``quantile=q`` with ``demand_std`` allocates on max(D_i + z_q·std_i, 0) (a normal quantile of the
forecast) instead of the mean, then applies the policy. Fairness is still measured against the
mean demand D, the best single estimate of need.

The ``weight`` column is the policy's weight before scaling to T: W_i for seed (as in the formula,
not normalised), the demand/gap share for proportional/need_gap, A_i/T for capped (0 when T = 0),
and the payment share for drg_budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike, NDArray

from core.apportion import largest_remainder
from core.drg import RELATIVE_WEIGHTS
from core.fairness import fairness_summary
from core.numeric_checks import as_array, as_scalar, as_vector, check_values
from core.waterfill import water_fill

POLICIES: tuple[str, ...] = ("seed", "proportional", "need_gap", "capped", "drg_budget")
_NEEDS_RESOURCES = ("seed", "need_gap")

Vector = NDArray[np.float64]


@dataclass(frozen=True)
class AllocationResult:
    """Per-hospital table (hospital, demand, resources, …, weight, allocation) and fairness."""

    table: pd.DataFrame
    fairness: dict[str, float]
    policy: str

    @property
    def allocation(self) -> np.ndarray:
        return self.table["allocation"].to_numpy()


@dataclass
class _Outcome:
    allocation: np.ndarray
    weight: Vector
    columns: dict[str, np.ndarray]  # table columns before weight
    reference: Vector  # what fairness compares the allocation with


def _unit_max(x: Vector) -> Vector:
    """x scaled so its largest entry is 1: shares are scale-free, and this keeps Σx finite."""
    top = float(x.max())
    return x / top if top > 0 else x


def _shares(x: Vector) -> Vector:
    """x/Σx, or an equal split when Σx = 0 (nobody has a stronger claim than anyone else)."""
    x = _unit_max(x)
    s = float(x.sum())
    if s > 0:
        return x / s
    return np.full(x.size, 1.0 / x.size)


def _seed_weights(d: Vector, r: Vector) -> Vector:
    d, r = _unit_max(d), _unit_max(r)  # W is invariant to rescaling D or R
    sd, sr = float(d.sum()), float(r.sum())
    if sd == 0:
        return _shares(d)
    if sr == 0:
        return d / sd
    w = (d / sd) * (r / sr)
    return w if float(w.sum()) > 0 else d / sd


def _need_gap_weights(d: Vector, r: Vector) -> Vector:
    gap = np.maximum(d - r, 0.0)
    return _shares(gap) if gap.any() else _shares(d)


def _scale(weight: Vector, total: float) -> Vector:
    s = float(weight.sum())
    return weight * (total / s) if s > 0 else np.zeros_like(weight)


def _reject_unused(policy: str, **given: Any) -> None:
    for name, value in given.items():
        if value is not None:
            raise ValueError(f"{name} does not apply to policy {policy!r}")


def _checked_std(d: Vector, quantile: float | None, demand_std: ArrayLike | None) -> Vector | None:
    if quantile is None and demand_std is None:
        return None
    if quantile is None or demand_std is None:
        raise ValueError("quantile and demand_std must be given together")
    q = float(quantile)
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be strictly between 0 and 1, got {quantile}")
    return as_vector("demand_std", demand_std, length=d.size)


def _capped_bounds(
    n: int, floors: ArrayLike | None, caps: ArrayLike | None, columns: dict[str, np.ndarray]
) -> tuple[Vector, Vector]:
    """Validated floors (default 0) and caps (default +inf); given ones go into the table."""
    f = np.zeros(n) if floors is None else as_vector("floors", floors, length=n)
    c = np.full(n, np.inf) if caps is None else as_vector("caps", caps, length=n, allow_inf=True)
    if floors is not None:
        columns["floor"] = f
    if caps is not None:
        columns["cap"] = c
    return f, c


def _whole_bounds(f: Vector, c: Vector) -> tuple[Vector, Vector]:
    """Bounds rounded inwards (ceil floors, floor caps): whole units must sit inside them."""
    fi, ci = np.ceil(f), np.floor(c)
    empty = (fi > ci) & (f <= c)  # f > c is reported by water_fill with the original values
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise ValueError(f"no whole number between floors[{i}] ({f[i]}) and caps[{i}] ({c[i]})")
    return fi, ci


def _group_matrix(
    group_demand: Any, relative_weights: Mapping[str, float] | ArrayLike | None
) -> tuple[Vector, Vector]:
    """(n, G) demand matrix and the matching (G,) relative weights.

    A DataFrame is validated column by column (errors name the group); a plain array is returned
    unchecked and validated by _drg_budget during its first pass over the matrix.
    """
    rw: Any = RELATIVE_WEIGHTS if relative_weights is None else relative_weights
    if isinstance(group_demand, pd.DataFrame):
        names = [str(c) for c in group_demand.columns]
        cols = [as_vector(f"group_demand[{name!r}]", group_demand[col])
                for name, col in zip(names, group_demand.columns)]
        m = np.column_stack(cols) if cols else np.zeros((len(group_demand), 0))
        if isinstance(rw, Mapping):
            unknown = [n for n in names if n not in rw]
            if unknown:
                raise ValueError(
                    f"group_demand column {unknown[0]!r} is not a known DRG group "
                    f"(known: {', '.join(map(str, rw))})"
                )
            w = [rw[n] for n in names]
        else:
            w = rw
    else:
        m = as_array("group_demand", group_demand, ndim=2, check=False)
        w = list(rw.values()) if isinstance(rw, Mapping) else rw
    wv = as_vector("relative_weights", w)
    if wv.size != m.shape[1]:
        raise ValueError(
            f"relative_weights has {wv.size} entries but group_demand has {m.shape[1]} groups"
        )
    return m, wv


def _drg_budget(
    demand: ArrayLike | None,
    resources: ArrayLike | None,
    total: float | None,
    *,
    integer: bool,
    group_demand: Any,
    relative_weights: Mapping[str, float] | ArrayLike | None,
    base_rate: float,
    budget: float | None,
) -> _Outcome:
    if group_demand is None:
        raise ValueError("group_demand is required for policy 'drg_budget'")
    m, w = _group_matrix(group_demand, relative_weights)
    n = m.shape[0]
    if n == 0:
        raise ValueError("group_demand has no rows: need at least one hospital")
    rate = as_scalar("base_rate", base_rate)
    b = None if budget is None else as_scalar("budget", budget, integer=integer)
    t = None if total is None else as_scalar("total", total, integer=integer)
    if b is not None and t is not None and b != t:
        raise ValueError(
            f"for drg_budget, budget and total both name the money to share out; got budget={b} "
            f"and total={t}: pass one"
        )
    cap = b if b is not None else t
    # Matrix-vector products (BLAS gemv) rather than m.sum(axis=1), which is several times slower
    # for short rows. The row sums double as the NaN/inf check (both propagate into a sum) so the
    # (n, G) matrix is read three times in all, not five.
    rows = m @ np.ones(m.shape[1])
    if m.size and not (float(m.min()) >= 0 and bool(np.isfinite(rows).all())):
        check_values("group_demand", m)
    raw = m @ (w * rate)
    if demand is None:
        d = rows
    else:
        d = as_vector("demand", demand, length=n, length_of="group_demand")
    r = np.full(n, np.nan) if resources is None else as_vector("resources", resources, length=n)
    s = float(raw.sum())
    scaled = cap is not None and s > cap
    alloc = raw * (cap / s) if scaled else raw
    if integer:
        # Scaled payments share exactly the budget; unscaled ones round to the nearest whole total,
        # which cannot exceed a whole-number budget.
        target = int(cap) if scaled else int(np.floor(s + 0.5))
        alloc = largest_remainder(alloc, target)
    weight = raw / s if s > 0 else np.zeros(n)
    return _Outcome(alloc, weight, {"demand": d, "resources": r, "raw_payment": raw}, raw)


def _checked_inputs(policy: str, demand: ArrayLike | None, resources: ArrayLike | None, total: float | None,
                    integer: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(demand, resources — NaN where the policy needs none —, total), each checked."""
    if demand is None:
        raise ValueError(f"demand is required for policy {policy!r}")
    d = as_vector("demand", demand)
    if d.size == 0:
        raise ValueError("demand is empty: need at least one hospital")
    if resources is None:
        if policy in _NEEDS_RESOURCES:
            raise ValueError(f"resources is required for policy {policy!r}")
        r = np.full(d.size, np.nan)
    else:
        r = as_vector("resources", resources, length=d.size)
    if total is None:
        raise ValueError(f"total is required for policy {policy!r}")
    return d, r, as_scalar("total", total, integer=integer)


def _compute(
    demand: ArrayLike | None,
    resources: ArrayLike | None,
    total: float | None,
    policy: str,
    *,
    integer: bool = False,
    caps: ArrayLike | None = None,
    floors: ArrayLike | None = None,
    group_demand: Any = None,
    relative_weights: Mapping[str, float] | ArrayLike | None = None,
    base_rate: float = 1.0,
    budget: float | None = None,
    quantile: float | None = None,
    demand_std: ArrayLike | None = None,
) -> _Outcome:
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if policy != "capped":
        _reject_unused(policy, caps=caps, floors=floors)
    if policy == "drg_budget":
        _reject_unused(policy, quantile=quantile, demand_std=demand_std)
        return _drg_budget(
            demand, resources, total, integer=integer, group_demand=group_demand,
            relative_weights=relative_weights, base_rate=base_rate, budget=budget,
        )
    _reject_unused(policy, group_demand=group_demand, relative_weights=relative_weights, budget=budget)

    d, r, t = _checked_inputs(policy, demand, resources, total, integer)
    n = d.size
    columns: dict[str, np.ndarray] = {"demand": d, "resources": r}
    d_alloc = d
    std = _checked_std(d, quantile, demand_std)
    if std is not None:
        z = NormalDist().inv_cdf(float(quantile))  # type: ignore[arg-type]
        d_alloc = np.maximum(d + z * std, 0.0)
        columns["demand_std"] = std
        columns["demand_q"] = d_alloc

    lower = upper = None
    if policy == "capped":
        f, c = _capped_bounds(n, floors, caps, columns)
        if integer:
            f, c = lower, upper = _whole_bounds(f, c)
        cont = water_fill(d_alloc, f, c, t)
        weight = cont / t if t > 0 else np.zeros(n)
    else:
        if policy == "seed":
            weight = _seed_weights(d_alloc, r)
        elif policy == "proportional":
            weight = _shares(d_alloc)
        else:
            weight = _need_gap_weights(d_alloc, r)
        cont = _scale(weight, t)

    alloc: np.ndarray = largest_remainder(cont, t, lower=lower, upper=upper) if integer else cont
    return _Outcome(alloc, weight, columns, d)


def allocate_array(
    demand: ArrayLike | None,
    resources: ArrayLike | None,
    total: float | None,
    policy: str = "seed",
    *,
    integer: bool = False,
    caps: ArrayLike | None = None,
    floors: ArrayLike | None = None,
    group_demand: Any = None,
    relative_weights: Mapping[str, float] | ArrayLike | None = None,
    base_rate: float = 1.0,
    budget: float | None = None,
    quantile: float | None = None,
    demand_std: ArrayLike | None = None,
) -> np.ndarray:
    """The allocation vector only (float64, or int64 with integer=True); no table, no fairness."""
    return _compute(
        demand, resources, total, policy, integer=integer, caps=caps, floors=floors,
        group_demand=group_demand, relative_weights=relative_weights, base_rate=base_rate,
        budget=budget, quantile=quantile, demand_std=demand_std,
    ).allocation


def allocate(
    demand: ArrayLike | None,
    resources: ArrayLike | None,
    total: float | None,
    policy: str = "seed",
    *,
    integer: bool = False,
    caps: ArrayLike | None = None,
    floors: ArrayLike | None = None,
    group_demand: Any = None,
    relative_weights: Mapping[str, float] | ArrayLike | None = None,
    base_rate: float = 1.0,
    budget: float | None = None,
    quantile: float | None = None,
    demand_std: ArrayLike | None = None,
    hospitals: Sequence[Any] | ArrayLike | None = None,
) -> AllocationResult:
    """Allocate `total` across hospitals under `policy`; see the module docstring for the rules.

    Returns the per-hospital table and the fairness summary of core.fairness (share gap and
    coverage against the demand-proportional share, Gini and Jain of coverage A_i/D_i; for
    drg_budget measured against the raw payments).

    Invalid input (negative, NaN or infinite values, mismatched lengths, infeasible bounds, options
    that do not apply to the policy) raises ValueError naming the argument and, where there is one,
    the index.
    """
    out = _compute(
        demand, resources, total, policy, integer=integer, caps=caps, floors=floors,
        group_demand=group_demand, relative_weights=relative_weights, base_rate=base_rate,
        budget=budget, quantile=quantile, demand_std=demand_std,
    )
    n = out.allocation.size
    if hospitals is None:
        labels: Any = np.arange(n)
    else:
        labels = np.asarray(hospitals)
        if labels.ndim != 1 or labels.size != n:
            raise ValueError(f"hospitals has {labels.size} labels but there are {n} hospitals")
    table = pd.DataFrame(
        {"hospital": labels, **out.columns, "weight": out.weight, "allocation": out.allocation}
    )
    return AllocationResult(table, fairness_summary(out.allocation, out.reference), policy)
