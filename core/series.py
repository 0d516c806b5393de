"""Demand series (period × DRG group) and the training windows cut from them.

Privacy shape of everything here (see docs/DESIGN.md, "Privacy unit"):

* The period grid comes from configuration (``start``/``end``), never from the data, so the
  series' shape and the number of windows are public.
* One encounter record touches exactly one (period, group) cell, by 1 (admissions) or by at most
  ``los_cap`` (bed_days): :func:`cell_sensitivity`.
* Default windows are disjoint, so one cell lies in one training example:
  :func:`window_multiplicity` gives the k for group privacy when they are not.

Pure numpy/pandas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date
from functools import lru_cache

import numpy as np
import pandas as pd

from core.drg import DRG_GROUPS

PERIODS: dict[str, str] = {"week": "W-MON", "day": "D"}
"""Period name -> pandas frequency of the grid. Weeks start on Monday."""

MEASURES: tuple[str, ...] = ("admissions", "bed_days")

_PERIOD_DAYS = {"week": 7, "day": 1}

DateLike = str | date | pd.Timestamp


def _timestamp(value: DateLike, name: str) -> pd.Timestamp:
    ts = pd.Timestamp(value)
    if ts is pd.NaT:
        raise ValueError(f"{name} is not a date")
    if ts.tzinfo is not None:
        ts = ts.tz_localize(None)
    return ts.normalize()


def period_grid(start: DateLike, end: DateLike, period: str = "week") -> pd.DatetimeIndex:
    """Start dates of the complete periods inside ``[start, end)``.

    Weeks start on Monday. A ``start`` that is not a period start is rounded up and an ``end``
    that is not one is rounded down: a partial week at either edge would look like a drop in
    demand, and the last week is the forecaster's most important input. Records in the
    trimmed partial periods are ignored by :func:`demand_series`.
    """
    if period not in PERIODS:
        raise ValueError(f"unknown period {period!r}; expected one of {sorted(PERIODS)}")
    # A copy: callers may rename their index; the cached grid must not change with it.
    return _grid(_timestamp(start, "start"), _timestamp(end, "end"), period).copy()


@lru_cache(maxsize=256)
def _grid(first: pd.Timestamp, stop: pd.Timestamp, period: str) -> pd.DatetimeIndex:
    # Every node of a run asks for the same public grid; a weekly date_range is built in a
    # Python loop (≈ 2-4 ms for four years), so it is built once per (start, end, period).
    days = _PERIOD_DAYS[period]
    if period == "week":
        first = first + pd.Timedelta(days=(7 - first.weekday()) % 7)
    n = max(0, (stop - first).days // days)
    return pd.date_range(first, periods=n, freq=PERIODS[period], name="period").astype("datetime64[ns]")


def cell_sensitivity(measure: str, los_cap: float) -> float:
    """Largest change one encounter record makes to one cell (it touches only one cell)."""
    if measure == "admissions":
        return 1.0
    if measure == "bed_days":
        _check_cap(los_cap)
        return float(los_cap)
    raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES}")


def _check_cap(los_cap: float) -> None:
    if not (math.isfinite(los_cap) and los_cap > 0):
        raise ValueError(f"los_cap must be a positive finite number of days, got {los_cap!r}")


def demand_series(
    records: pd.DataFrame,
    *,
    start: DateLike,
    end: DateLike,
    period: str = "week",
    measure: str = "admissions",
    los_cap: float = 30.0,
    groups: Sequence[str] = DRG_GROUPS,
) -> pd.DataFrame:
    """Demand per period × group, on the public grid ``period_grid(start, end, period)``.

    ``records`` is a typed frame (:func:`core.records.load_records`). Columns are
    ``list(groups)`` in that order, values float, empty cells 0. Records outside the grid or in
    groups not listed are ignored.

    ``measure``:
      * ``"admissions"``: encounters per period.
      * ``"bed_days"``: ``min(length_of_stay, los_cap)`` summed on the *admission* period. The
        whole (clipped) stay is booked to the period the patient was admitted in rather than
        spread over the days occupied, so one record still touches exactly one cell and its
        effect is bounded by ``los_cap``. A record without ``length_of_stay`` counts as
        ``los_cap`` (so one record can never turn an answer into an error); without the column
        at all, ``ValueError``.
    """
    groups = list(groups)
    if len(set(groups)) != len(groups):
        raise ValueError("groups must be unique")
    if measure not in MEASURES:
        raise ValueError(f"unknown measure {measure!r}; expected one of {MEASURES}")
    grid = period_grid(start, end, period)
    n_t, n_g = len(grid), len(groups)
    values = np.zeros(n_t * n_g, dtype=np.float64)
    if n_t and n_g and len(records):
        dates = pd.to_datetime(records["admit_date"]).to_numpy(dtype="datetime64[ns]")
        valid = ~np.isnat(dates)
        delta = np.where(valid, dates - grid[0].to_datetime64(), np.timedelta64(-1, "D"))
        offset = delta // np.timedelta64(1, "D")
        t = offset // _PERIOD_DAYS[period]
        g = _group_index(records["drg_group"], groups)
        keep = valid & (offset >= 0) & (t < n_t) & (g >= 0)
        weights = None
        if measure == "bed_days":
            _check_cap(los_cap)
            if "length_of_stay" not in records.columns:
                raise ValueError("measure 'bed_days' needs a length_of_stay column")
            los = pd.to_numeric(records["length_of_stay"]).to_numpy(dtype=np.float64)[keep]
            # A missing stay counts as the cap: a per-record rule, so whether a node can answer
            # never depends on one record, and one record still moves one cell by ≤ los_cap.
            weights = np.clip(np.where(np.isnan(los), los_cap, los), 0.0, los_cap)
        flat = t[keep] * n_g + g[keep]
        values = np.bincount(flat, weights=weights, minlength=n_t * n_g).astype(np.float64)
    return pd.DataFrame(values.reshape(n_t, n_g), index=grid, columns=groups)


def _group_index(values: pd.Series, groups: list[str]) -> np.ndarray:
    """Position of each record's group in ``groups`` (-1 if absent), matched once per distinct
    value: a node's records hold a few dozen groups in tens of thousands of rows."""
    codes, uniques = pd.factorize(values)
    lookup = np.append(pd.Index(groups).get_indexer(np.asarray(uniques, dtype=object)), -1).astype(np.int64)
    return lookup[codes]  # code -1 (a missing group) takes the appended -1


def _stride(lags: int, horizon: int, stride: int | None) -> int:
    for name, v in (("lags", lags), ("horizon", horizon)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    stride = lags + horizon if stride is None else stride
    if int(stride) != stride or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    return int(stride)


def n_windows(n_periods: int, lags: int, horizon: int, stride: int | None = None) -> int:
    """Number of windows in a series of ``n_periods`` periods (public: depends on no value)."""
    stride = _stride(lags, horizon, stride)
    span = lags + horizon
    return 0 if n_periods < span else (n_periods - span) // stride + 1


def window_multiplicity(lags: int, horizon: int, stride: int | None = None) -> int:
    """Most examples one (period, group) cell can fall in: ``ceil((lags + horizon) / stride)``.

    1 for the default (disjoint) windows; otherwise the k of group privacy.
    """
    stride = _stride(lags, horizon, stride)
    return -(-(lags + horizon) // stride)


def make_windows(
    values: np.ndarray, lags: int, horizon: int, stride: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a (T, G) series into per-group examples of ``lags`` inputs and ``horizon`` targets.

    Returns ``X`` (N, lags), ``Y`` (N, horizon) in the dtype of ``values`` and ``meta`` (N, 2)
    int64 of (window start index, group index), ordered by window then group.
    ``N = n_windows(T, lags, horizon, stride) * G`` — public, independent of the values.

    Windows are aligned to end at the last period, so the most recent data are always used;
    leftover periods at the start are dropped. The default ``stride = lags + horizon`` makes
    windows disjoint: each cell lies in at most one example (``window_multiplicity == 1``).
    A 1-D ``values`` is treated as a single group.
    """
    arr = np.asarray(values)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise ValueError(f"values must be (periods, groups), got shape {arr.shape}")
    stride = _stride(lags, horizon, stride)
    n_t, n_g = arr.shape
    span = lags + horizon
    n_w = n_windows(n_t, lags, horizon, stride)
    starts = (n_t - span) - stride * np.arange(n_w - 1, -1, -1, dtype=np.int64)
    idx = starts[:, None] + np.arange(span, dtype=np.int64)[None, :]  # (n_w, span)
    blocks = arr[idx].transpose(0, 2, 1).reshape(n_w * n_g, span)  # (n_w*G, span)
    x = np.ascontiguousarray(blocks[:, :lags])
    y = np.ascontiguousarray(blocks[:, lags:])
    meta = np.stack(
        [np.repeat(starts, n_g), np.tile(np.arange(n_g, dtype=np.int64), n_w)], axis=1
    ).astype(np.int64).reshape(n_w * n_g, 2)
    return x, y, meta
