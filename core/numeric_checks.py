"""Input checks for the allocation core: one clear ValueError naming the argument and the index.

The checks are vectorised (a couple of passes over the array) so validating 10^6 hospitals costs a
few milliseconds; only the first offending element is described, because one precise message is more
useful to a coordinator than a wall of them.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray


def _describe(value: float) -> str:
    if math.isnan(value):
        return "is NaN"
    if math.isinf(value):
        return f"is infinite ({value})"
    return f"is negative ({value})"


def check_values(name: str, arr: NDArray[np.float64], allow_inf: bool = False) -> None:
    """Raise ValueError naming the first NaN, infinite (unless allowed) or negative element."""
    if arr.size == 0:
        return
    # Fast path without temporaries: NaN and ±inf propagate into the sum (and NaN into the min),
    # so a finite sum and a non-negative min prove the array clean. Only on failure (or a
    # legitimate overflow of the sum) do we pay for the element-wise search.
    with np.errstate(over="ignore"):
        total, low = float(arr.sum()), float(arr.min())
    if low >= 0 and (not math.isnan(total) if allow_inf else math.isfinite(total)):
        return
    ok = ~np.isnan(arr) if allow_inf else np.isfinite(arr)
    ok &= ~(arr < 0)
    if ok.all():
        return
    flat = int(np.flatnonzero(~ok.ravel())[0])
    idx = np.unravel_index(flat, arr.shape)
    where = ", ".join(str(int(i)) for i in idx)
    raise ValueError(f"{name}[{where}] {_describe(float(arr[idx]))}")


def as_array(
    name: str, values: Any, *, ndim: int = 1, allow_inf: bool = False, check: bool = True
) -> NDArray[np.float64]:
    """`values` as a float64 array of `ndim` dimensions, finite (or +inf if allowed) and >= 0.

    check=False only converts, for callers that can validate more cheaply in a pass they make
    anyway (then they call check_values on failure).
    """
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric: {exc}") from None
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-dimensional, got shape {arr.shape}")
    if check:
        check_values(name, arr, allow_inf)
    return arr


def as_vector(
    name: str,
    values: ArrayLike,
    *,
    length: int | None = None,
    length_of: str = "demand",
    allow_inf: bool = False,
) -> NDArray[np.float64]:
    """A non-negative 1-d float vector, optionally of a given length (one entry per hospital)."""
    arr = as_array(name, values, ndim=1, allow_inf=allow_inf)
    if length is not None and arr.shape[0] != length:
        raise ValueError(
            f"{name} has length {arr.shape[0]} but {length_of} has length {length}"
        )
    return arr


def as_scalar(name: str, value: Any, *, integer: bool = False) -> float:
    """A finite, non-negative number; with integer=True it must also be a whole number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(x) or math.isinf(x) or x < 0:
        raise ValueError(f"{name} {_describe(x)}")
    if integer and not x.is_integer():
        raise ValueError(f"{name} must be a whole number when integer=True, got {x}")
    return x
