"""Largest-remainder (Hamilton) apportionment: whole units (beds, ventilators) that sum exactly.

Rounding each hospital's share independently loses or invents units; Hamilton's method floors
every quota and hands the missing units to the largest fractional remainders, so the total is
exact and each hospital ends within one unit of its quota. Ties go to the lower index so results
are reproducible across runs and machines. O(n) via partition, no sort.

Note that Hamilton apportionment is not population-monotone (raising one quota can cost another
hospital a unit); monotonicity holds for the continuous policies, not after rounding.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from core.numeric_checks import as_scalar, as_vector


def _pick_largest(scores: NDArray[np.float64], k: int, all_eligible: bool) -> NDArray[np.bool_]:
    """Mask of the k largest scores (-inf = not eligible); ties broken towards the lower index."""
    if k <= 0:
        return np.zeros(scores.shape, dtype=bool)
    n_eligible = scores.size if all_eligible else int(np.count_nonzero(scores > -np.inf))
    if k > n_eligible:
        raise ValueError(f"cannot place {k} more unit(s): only {n_eligible} hospital(s) have room")
    pos = scores.size - k
    threshold = np.partition(scores, pos)[pos]
    chosen = scores > threshold
    need = k - int(np.count_nonzero(chosen))
    chosen[np.flatnonzero(scores == threshold)[:need]] = True
    return chosen


def largest_remainder(
    quotas: ArrayLike,
    total: int | float,
    *,
    lower: ArrayLike | None = None,
    upper: ArrayLike | None = None,
) -> NDArray[np.int64]:
    """Integers summing to `total`, each the floor or ceiling of its quota when Σ quotas == total.

    `lower`/`upper` are whole-number per-hospital bounds (e.g. a capped policy's floors rounded up
    and caps rounded down); a unit is only ever added below `upper` or removed above `lower`.
    Quotas that sum to `total` only up to floating-point error are fine: the shortfall or excess is
    recomputed in integers, so the result is exact.
    """
    q = as_vector("quotas", quotas)
    t = int(as_scalar("total", total, integer=True))
    n = q.size
    lo = None if lower is None else as_vector("lower", lower, length=n, length_of="quotas")
    hi = None if upper is None else as_vector("upper", upper, length=n, length_of="quotas",
                                              allow_inf=True)
    if n == 0:
        if t:
            raise ValueError(f"cannot apportion {t} unit(s) over zero hospitals")
        return np.zeros(0, dtype=np.int64)
    base_f = np.floor(q)
    if lo is not None:
        np.maximum(base_f, lo, out=base_f)
    if hi is not None:
        np.minimum(base_f, hi, out=base_f)
    base = base_f.astype(np.int64)
    rem = np.subtract(q, base_f, out=base_f)  # base_f is not needed any more
    missing = t - int(base.sum())
    if missing > 0:
        if hi is None:
            base += _pick_largest(rem, missing, all_eligible=True)
        else:
            scores = np.where(base < hi, rem, -np.inf)
            base += _pick_largest(scores, missing, all_eligible=False)
    elif missing < 0:
        # Only reachable through rounding noise or bounds: take back from the smallest remainders.
        floor_ = 0.0 if lo is None else lo
        scores = np.where(base > floor_, -rem, -np.inf)
        base -= _pick_largest(scores, -missing, all_eligible=False)
    return base


def apportion(weights: ArrayLike, total: int | float) -> NDArray[np.int64]:
    """Split `total` whole units in proportion to `weights` (equal split if all weights are 0)."""
    w = as_vector("weights", weights)
    t = as_scalar("total", total, integer=True)
    s = float(w.sum())
    quotas = w * (t / s) if s > 0 else np.full(w.size, t / max(w.size, 1))
    return largest_remainder(quotas, t)
