"""Demand-weighted water-filling with per-hospital floors and caps (the `capped` policy).

Every hospital gets A_i = clip(λ·D_i, floor_i, cap_i) for one common level λ chosen so that
Σ A_i = total. Hospitals strictly between their bounds all receive the same allocation per unit of
demand, and within the bounds no hospital's coverage A_i/D_i can be raised without lowering that of
a hospital with no more coverage: max-min fairness in coverage. Hospitals with D_i = 0 sit at their
floor; only when every hospital with demand is already at its cap does the leftover go to the
zero-demand hospitals, as an equal level clip(μ, floor_i, cap_i) (the same max-min rule with unit
weights), so the total is always fully allocated when the bounds allow it.

λ is found exactly (up to floating point) by a selection search over the breakpoints floor_i/D_i and
cap_i/D_i: each round evaluates the sum at the median of a small sample of the remaining breakpoints,
halves the bracket, and retires every hospital whose status (at floor, at cap, or proportional) is
settled inside the bracket. The work shrinks geometrically, so the whole solve is O(n) expected,
with no per-hospital Python loop and no full sort (sorting 2·10^6 breakpoints alone costs more than
the 100 ms budget for 10^6 hospitals). For large n the search starts from a tight bracket around
the level solved on a strided sample of hospitals and checked on the full data, so most hospitals
are retired in the first round and the costly compaction of big arrays happens only once.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

_SAMPLE = 1024  # breakpoints sampled to choose each pivot
_PRESOLVE = 8192  # hospitals in the sample used to estimate λ when n is large


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


def _presolve_bracket(
    w: NDArray[np.float64],
    f: NDArray[np.float64],
    c: NDArray[np.float64],
    target: float,
    scratch: NDArray[np.float64],
) -> tuple[float, float]:
    """A bracket [a, b] with S(a) < target <= S(b), narrow when a sample predicts λ well."""
    if w.size < 8 * _PRESOLVE:
        return 0.0, np.inf
    step = w.size // _PRESOLVE
    ws, fs, cs = w[::step], f[::step], c[::step]
    t_s = min(max(target * ws.size / w.size, float(fs.sum())), float(cs.sum()))
    num, den = _solve_level(ws, fs, cs, t_s)
    with np.errstate(over="ignore"):
        guess = num / den
    if not (np.isfinite(guess) and guess > 0):
        return 0.0, np.inf

    def below(x: float) -> bool:  # S(x) < target on the full data, in a reused buffer
        np.multiply(w, x, out=scratch)
        np.clip(scratch, f, c, out=scratch)
        return float(scratch.sum()) < target

    a, b = 0.0, np.inf
    if below(guess):
        a = guess
        for eps in (0.002, 0.02, 0.2, 2.0):
            x = guess * (1.0 + eps)
            if not below(x):
                return a, x
            a = x
    else:
        b = guess
        for eps in (0.002, 0.02, 0.2, 0.8):
            x = guess * (1.0 - eps)
            if below(x):
                return x, b
            b = x
    return a, b


def _solve_level(
    w: NDArray[np.float64], f: NDArray[np.float64], c: NDArray[np.float64], target: float
) -> tuple[float, float]:
    """(num, den) with λ = num/den >= 0 and Σ clip(λ·w, f, c) == target, Σf <= target <= Σc.

    Hospitals with w_i = 0 stay at f_i. λ is returned as a ratio because with tiny weights it can
    overflow while every allocation λ·w_i = (w_i/den)·num stays representable.
    """
    if w.size == 0:
        return 0.0, 1.0
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        lo = f / w
        hi = c / w
    if not w.all():
        lo[w == 0] = np.inf  # no level lifts a zero-weight hospital off its floor
    scratch = np.empty_like(w)
    a, b = _presolve_bracket(w, f, c, target, scratch)
    # Masked sums are dot products with boolean masks (several times faster than boolean indexing),
    # which needs finite values since inf·0 is NaN; an uncapped hospital is never "at cap", so
    # replacing inf by the largest float changes no selected term.
    c0 = np.minimum(c, np.finfo(np.float64).max, out=scratch)
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


def _apply_level(
    w: NDArray[np.float64], num: float, den: float, f: NDArray[np.float64], c: NDArray[np.float64]
) -> NDArray[np.float64]:
    """clip(λ·w, f, c) for λ = num/den, computed in place in w (the caller's scratch copy)."""
    if num == 0.0:  # λ = 0; avoids inf·0 when w/den overflows for an off-level hospital
        w[:] = 0.0
    else:
        with np.errstate(over="ignore"):
            np.divide(w, den, out=w)
            np.multiply(w, num, out=w)
    return np.clip(w, f, c, out=w)


def water_fill(
    demand: NDArray[np.float64],
    floors: NDArray[np.float64],
    caps: NDArray[np.float64],
    total: float,
) -> NDArray[np.float64]:
    """A_i = clip(λ·D_i, floor_i, cap_i) with Σ A_i = total; see the module docstring."""
    check_bounds(floors, caps, total)
    top = float(demand.max())
    if top == 0.0:
        # No demand anywhere: fall back to the equal level, like proportional's equal split.
        ones = np.ones_like(demand)
        return _apply_level(ones, *_solve_level(ones, floors, caps, total), floors, caps)
    # λ is scale-free; normalising keeps the breakpoints floor/D and cap/D in floating range.
    # This copy is also the buffer the result is written into.
    w = demand / top
    zero = w == 0  # after normalising: demand that underflows to 0 counts as none
    if not zero.any() or float(np.where(zero, floors, caps).sum()) >= total:
        return _apply_level(w, *_solve_level(w, floors, caps, total), floors, caps)
    # Every hospital with demand is capped; spread what is left over the zero-demand hospitals.
    rest = np.flatnonzero(zero)
    out = caps.copy()
    fr, cr = floors.take(rest), caps.take(rest)
    room = total - float(np.where(zero, 0.0, caps).sum())
    ones = np.ones(rest.size)
    out[rest] = _apply_level(ones, *_solve_level(ones, fr, cr, room), fr, cr)
    return out
