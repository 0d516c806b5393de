"""Demand series and windows: public grid, exact counts, one record -> one cell, disjoint windows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.drg import DRG_GROUPS
from core.series import (
    PERIODS,
    cell_sensitivity,
    demand_series,
    make_windows,
    n_windows,
    period_grid,
    window_multiplicity,
)


def records(rows: list[tuple[str, str, float]]) -> pd.DataFrame:
    dates, groups, los = zip(*rows) if rows else ((), (), ())
    return pd.DataFrame(
        {
            "admit_date": pd.to_datetime(list(dates)).astype("datetime64[ns]"),
            "drg_group": pd.Series(list(groups), dtype="str"),
            "length_of_stay": np.asarray(los, dtype=float),
        }
    )


# --------------------------------------------------------------------------- grid


def test_period_grid_weeks_start_monday_and_are_complete():
    grid = period_grid("2023-01-04", "2023-02-01")  # Wednesday .. Wednesday
    assert list(grid) == list(pd.to_datetime(["2023-01-09", "2023-01-16", "2023-01-23"]))
    assert all(d.weekday() == 0 for d in grid)
    assert grid.dtype == "datetime64[ns]"
    aligned = period_grid("2023-01-02", "2023-01-30")
    assert len(aligned) == 4 and aligned[-1] == pd.Timestamp("2023-01-23")


def test_period_grid_days_and_unknown_period():
    assert list(period_grid("2023-01-30", "2023-02-02", "day")) == list(
        pd.date_range("2023-01-30", "2023-02-01", freq="D")
    )
    assert set(PERIODS) == {"week", "day"}
    with pytest.raises(ValueError):
        period_grid("2023-01-02", "2023-02-02", "month")
    assert len(period_grid("2023-02-02", "2023-01-02")) == 0


def test_grid_comes_from_configuration_not_data():
    # Data only covers two weeks in the middle; the series still spans the configured range.
    recs = records([("2023-03-07", "cardiac", 1), ("2023-03-15", "renal", 1)])
    series = demand_series(recs, start="2023-01-02", end="2023-06-05")
    assert series.index.equals(period_grid("2023-01-02", "2023-06-05"))
    assert len(series) == 22
    empty = demand_series(records([]), start="2023-01-02", end="2023-06-05")
    assert empty.index.equals(series.index)
    assert (empty.to_numpy() == 0).all()


# --------------------------------------------------------------------------- counts


def test_admissions_match_hand_built_example():
    recs = records(
        [
            ("2023-01-02", "cardiac", 1),  # week 0
            ("2023-01-08", "cardiac", 1),  # Sunday: still week 0
            ("2023-01-09", "cardiac", 1),  # week 1
            ("2023-01-10", "renal", 1),  # week 1
            ("2023-01-16", "renal", 1),  # week 2
            ("2023-01-16", "renal", 1),
            ("2023-01-01", "renal", 1),  # before start: ignored
            ("2023-01-23", "renal", 1),  # on end (exclusive): ignored
            ("2023-01-10", "unknown", 1),  # group not configured: ignored
        ]
    )
    got = demand_series(recs, start="2023-01-02", end="2023-01-23", groups=["renal", "cardiac"])
    expected = pd.DataFrame(
        {"renal": [0.0, 1.0, 2.0], "cardiac": [2.0, 1.0, 0.0]},
        index=period_grid("2023-01-02", "2023-01-23"),
    )
    pd.testing.assert_frame_equal(got, expected)


def test_default_columns_are_the_catalogue():
    series = demand_series(records([("2023-01-02", "cardiac", 1)]), start="2023-01-02", end="2023-01-09")
    assert list(series.columns) == list(DRG_GROUPS)
    assert series.to_numpy().dtype == np.float64
    assert series.loc["2023-01-02", "cardiac"] == 1.0 and series.to_numpy().sum() == 1.0


def test_daily_admissions():
    recs = records([("2023-01-02", "cardiac", 1), ("2023-01-04", "cardiac", 1), ("2023-01-04", "cardiac", 1)])
    s = demand_series(recs, start="2023-01-02", end="2023-01-05", period="day", groups=["cardiac"])
    assert s["cardiac"].tolist() == [1.0, 0.0, 2.0]


def test_bed_days_clip_at_cap_on_admission_period():
    recs = records([("2023-01-02", "cardiac", 3), ("2023-01-03", "cardiac", 45), ("2023-01-10", "renal", 0)])
    s = demand_series(
        recs, start="2023-01-02", end="2023-01-16", measure="bed_days", los_cap=30, groups=["cardiac", "renal"]
    )
    assert s.to_numpy().tolist() == [[33.0, 0.0], [0.0, 0.0]]  # 45-day stay booked as 30, in week 0


def test_bed_days_missing_los_counts_as_the_cap():
    """A record without LOS must not turn the node's answer into an error (a one-record side channel)."""
    recs = records([("2023-01-02", "cardiac", np.nan), ("2023-01-03", "cardiac", 2)])
    s = demand_series(recs, start="2023-01-02", end="2023-01-09", measure="bed_days", los_cap=14, groups=["cardiac"])
    assert s["cardiac"].tolist() == [16.0]
    with pytest.raises(ValueError):
        demand_series(recs.drop(columns="length_of_stay"), start="2023-01-02", end="2023-01-09", measure="bed_days")
    # admissions do not need LOS at all
    assert demand_series(recs, start="2023-01-02", end="2023-01-09").to_numpy().sum() == 2


def test_bad_arguments():
    recs = records([("2023-01-02", "cardiac", 1)])
    with pytest.raises(ValueError):
        demand_series(recs, start="2023-01-02", end="2023-01-09", measure="visits")
    with pytest.raises(ValueError):
        demand_series(recs, start="2023-01-02", end="2023-01-09", groups=["a", "a"])
    with pytest.raises(ValueError):
        cell_sensitivity("bed_days", 0.0)


def test_cell_sensitivity_values():
    assert cell_sensitivity("admissions", 30.0) == 1.0
    assert cell_sensitivity("bed_days", 14.0) == 14.0


@settings(max_examples=40, deadline=None)
@given(
    days=st.lists(st.integers(min_value=-10, max_value=80), max_size=25),
    groups=st.lists(st.sampled_from(["cardiac", "renal", "other"]), min_size=25, max_size=25),
    extra_day=st.integers(min_value=-10, max_value=80),
    extra_group=st.sampled_from(["cardiac", "renal", "other"]),
    extra_los=st.floats(min_value=0, max_value=400),
    measure=st.sampled_from(["admissions", "bed_days"]),
    period=st.sampled_from(["week", "day"]),
)
def test_one_record_changes_at_most_one_cell_by_sensitivity(
    days, groups, extra_day, extra_group, extra_los, measure, period
):
    base = pd.Timestamp("2023-01-02")
    rows = [(str((base + pd.Timedelta(days=d)).date()), g, 5.0) for d, g in zip(days, groups)]
    neighbour = rows + [(str((base + pd.Timedelta(days=extra_day)).date()), extra_group, extra_los)]
    kw = dict(start="2023-01-02", end="2023-03-06", period=period, measure=measure, los_cap=21.0,
              groups=["cardiac", "renal"])
    diff = demand_series(records(neighbour), **kw).to_numpy() - demand_series(records(rows), **kw).to_numpy()
    assert np.count_nonzero(diff) <= 1
    assert np.abs(diff).max() <= cell_sensitivity(measure, 21.0)


# --------------------------------------------------------------------------- windows


def test_windows_shapes_order_and_alignment_to_end():
    t, g, lags, horizon = 11, 2, 3, 1
    values = np.arange(t * g, dtype=float).reshape(t, g)
    x, y, meta = make_windows(values, lags, horizon)
    # 11 periods, span 4 -> 2 windows ending at the last period; periods 0..2 dropped.
    assert x.shape == (4, 3) and y.shape == (4, 1) and meta.shape == (4, 2)
    assert meta.dtype == np.int64
    assert meta.tolist() == [[3, 0], [3, 1], [7, 0], [7, 1]]
    assert y[-1, 0] == values[-1, 1] and y[-2, 0] == values[-1, 0]
    np.testing.assert_array_equal(x[1], values[3:6, 1])
    np.testing.assert_array_equal(y[1], values[6:7, 1])


def test_default_windows_are_disjoint():
    t, g = 53, 12
    ids = np.arange(t * g).reshape(t, g)  # every (t, g) cell has a unique id
    x, y, _ = make_windows(ids, lags=8, horizon=4)
    used = np.concatenate([x.ravel(), y.ravel()])
    assert len(used) == len(np.unique(used))  # no cell in two examples
    assert len(used) == (t // 12) * 12 * g
    assert set(ids[-1].tolist()) <= set(used.tolist())  # the most recent period is used


@pytest.mark.parametrize("lags,horizon,stride", [(4, 1, 1), (4, 2, 2), (6, 3, 4), (3, 3, 7), (5, 1, None)])
def test_cell_count_bounded_by_multiplicity(lags, horizon, stride):
    t, g = 60, 3
    ids = np.arange(t * g).reshape(t, g)
    x, y, _ = make_windows(ids, lags, horizon, stride)
    counts = np.bincount(np.concatenate([x.ravel(), y.ravel()]), minlength=t * g)
    k = window_multiplicity(lags, horizon, stride)
    assert counts.max() == k  # bound is attained on a long series, so it is tight


def test_window_multiplicity_values():
    assert window_multiplicity(8, 4) == 1
    assert window_multiplicity(8, 4, 12) == 1
    assert window_multiplicity(8, 4, 1) == 12
    assert window_multiplicity(4, 2, 4) == 2
    with pytest.raises(ValueError):
        window_multiplicity(0, 1)
    with pytest.raises(ValueError):
        window_multiplicity(2, 1, 0)


@settings(max_examples=40, deadline=None)
@given(
    t=st.integers(min_value=0, max_value=40),
    g=st.integers(min_value=1, max_value=4),
    lags=st.integers(min_value=1, max_value=8),
    horizon=st.integers(min_value=1, max_value=4),
    stride=st.one_of(st.none(), st.integers(min_value=1, max_value=10)),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_number_of_examples_depends_only_on_public_shape(t, g, lags, horizon, stride, seed):
    rng = np.random.default_rng(seed)
    a = rng.poisson(5.0, size=(t, g)).astype(float)
    b = rng.normal(size=(t, g)) * 1e6
    xa, ya, ma = make_windows(a, lags, horizon, stride)
    xb, yb, mb = make_windows(b, lags, horizon, stride)
    assert xa.shape == xb.shape == (n_windows(t, lags, horizon, stride) * g, lags)
    assert ya.shape == yb.shape
    np.testing.assert_array_equal(ma, mb)


def test_too_short_series_gives_empty_arrays():
    x, y, meta = make_windows(np.zeros((4, 3)), lags=4, horizon=1)
    assert x.shape == (0, 4) and y.shape == (0, 1) and meta.shape == (0, 2)


# --------------------------------------------------------------------------- patient cap


