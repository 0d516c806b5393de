"""Demand-weighted water-filling with per-hospital floors and caps (the `capped` policy).

Every hospital gets A_i = clip(λ·D_i, floor_i, cap_i) for one common level λ chosen so that
Σ A_i = total. Hospitals below their cap all receive the same allocation per unit of demand, and no
hospital's coverage A_i/D_i can be raised without lowering that of a hospital with no more coverage:
max-min fairness in coverage. Hospitals with D_i = 0 sit at their floor; only when every hospital
with demand is already at its cap does the leftover go to the zero-demand hospitals, as an equal
level clip(μ, floor_i, cap_i) (the same max-min rule with unit weights), so the total is always
fully allocated when the bounds allow it.

λ is found exactly (up to floating point) by a selection search over the breakpoints floor_i/D_i and
cap_i/D_i: each round evaluates the sum at the median of a small sample of the remaining breakpoints,
halves the bracket, and retires every hospital whose status (at floor, at cap, or proportional) is
settled inside the bracket. The work shrinks geometrically, so the whole solve is O(n) expected,
with no per-hospital Python loop and no full sort (sorting 2·10^6 breakpoints alone costs more than
the 100 ms budget for 10^6 hospitals).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

_SAMPLE = 1024


def check_bounds(floors: NDArray[np.float64], caps: NDArray[np.float64], total: float) -> None:
    """Raise a ValueError when no allocation can meet the floors, the caps and the total."""
    crossed = floors > caps
    if crossed.any():
        i = int(np.flatnonzero(crossed)[0])
        raise ValueError(f"floors[{i}] ({floors[i]}) is above caps[{i}] ({caps[i]})")
    low, high = float(floors.sum()), float(caps.sum())
    if low > total:
        raise ValueError(f"infeasible: sum of floors ({low}) exceeds total ({total})")
    if high < total:
        raise ValueError(f"infeasible: sum of caps ({high}) is below total ({total})")


def _dot(x: NDArray[np.float64], y: NDArray[np.float64] | NDArray[np.bool_]) -> float:
    # einsum rather than `@`: multithreaded BLAS dot is several times slower for one vector on a
    # busy 2-core machine, and einsum takes a boolean mask without a float copy.
    return float(np.einsum("i,i->", x, y))


def _solve_level(
    w: NDArray[np.float64], f: NDArray[np.float64], c: NDArray[np.float64], target: float
) -> tuple[float, float]:
    """(num, den) with λ = num/den >= 0 and Σ clip(λ·w, f, c) == target (w > 0, Σf <= target <= Σc).

    λ is returned as a ratio because with tiny weights it can overflow while every allocation
    λ·w_i = (w_i/den)·num stays representable.
    """
    if w.size == 0:
        return 0.0, 1.0
    with np.errstate(over="ignore"):
        lo = f / w
        hi = c / w
    # Masked sums are dot products with boolean masks (several times faster than boolean indexing),
    # which needs finite values since inf·0 is NaN; an uncapped hospital is never "at cap", so
    # replacing inf by the largest float changes no selected term.
    c0 = np.minimum(c, np.finfo(np.float64).max)
    a, b = 0.0, np.inf
    const = 0.0  # contribution of hospitals settled at a floor or a cap
    slope = 0.0  # Σ w of hospitals settled on the proportional part inside [a, b]
    while True:
        at_cap = hi <= a
        at_floor = lo >= b
        linear = (lo <= a) & (hi >= b)
        const += _dot(c0, at_cap) + _dot(f, at_floor)
        slope += _dot(w, linear)
        keep = np.flatnonzero(~(at_cap | at_floor | linear))
        if keep.size == 0:
            break
        if keep.size < w.size:
            w, f, c0, lo, hi = (x.take(keep) for x in (w, f, c0, lo, hi))
        # Every remaining hospital has a breakpoint strictly inside (a, b): lo if lo > a, else hi.
        step = max(1, lo.size // _SAMPLE)
        s_lo, s_hi = lo[::step], hi[::step]
        bp = np.where(s_lo > a, s_lo, s_hi)
        k = (bp.size - 1) // 2
        # An actual breakpoint (lower median), so at least one breakpoint leaves the open bracket
        # each round and the loop must terminate.
        pivot = float(np.partition(bp, k)[k])
        # Σ clip(pivot·w, f, c) written with the breakpoints, which avoids carrying c with its infs.
        s = const + slope * pivot + _dot(w, np.clip(pivot, lo, hi))
        if s < target:
            a = pivot
        else:
            b = pivot
    if slope == 0.0:
        return a, 1.0
    num = target - const
    if a > 0 and num / slope < a:  # floating-point guard: stay inside the bracket
        return a, 1.0
    if num / slope > b:
        return b, 1.0
    return num, slope


def _level(w: NDArray[np.float64], num: float, den: float) -> NDArray[np.float64]:
    if num == 0.0:  # λ = 0; avoids inf·0 when w/den overflows for an off-level hospital
        return np.zeros_like(w)
    with np.errstate(over="ignore"):
        return (w / den) * num


def water_fill(
    demand: NDArray[np.float64],
    floors: NDArray[np.float64],
    caps: NDArray[np.float64],
    total: float,
) -> NDArray[np.float64]:
    """A_i = clip(λ·D_i, floor_i, cap_i) with Σ A_i = total; see the module docstring."""
    check_bounds(floors, caps, total)
    top = float(demand.max())
    if top > 0:
        # λ is scale-free; normalising keeps the breakpoints floor/D and cap/D in floating range.
        demand = demand / top
    pos = np.flatnonzero(demand)  # after normalising: demand that underflows to 0 counts as none
    if pos.size == 0:
        # No demand anywhere: fall back to the equal level, like proportional's equal split.
        ones = np.ones_like(demand)
        return np.clip(_level(ones, *_solve_level(ones, floors, caps, total)), floors, caps)
    if pos.size == demand.size:
        w, f, c, rest = demand, floors, caps, None
        rest_floor = 0.0
    else:
        w, f, c = demand.take(pos), floors.take(pos), caps.take(pos)
        rest = np.flatnonzero(demand == 0)
        rest_floor = float(floors.take(rest).sum())
    pos_cap = float(c.sum())
    if pos_cap + rest_floor >= total:
        ratio = _solve_level(w, f, c, total - rest_floor)
        return np.clip(_level(demand, *ratio), floors, caps)
    # Every hospital with demand is capped; spread what is left over the zero-demand hospitals.
    assert rest is not None  # pos_cap >= total whenever every hospital has demand
    out = caps.copy()
    fr, cr = floors.take(rest), caps.take(rest)
    ones = np.ones(rest.size)
    out[rest] = np.clip(_level(ones, *_solve_level(ones, fr, cr, total - pos_cap)), fr, cr)
    return out
