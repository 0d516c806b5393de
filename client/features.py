"""Turning a node's demand series into model examples.

One example is one (window, group) pair, so under the default disjoint windows one encounter
record touches at most one example: the DP-SGD guarantee is then per record (DESIGN.md "Unit").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.series import make_windows


@dataclass(frozen=True)
class Examples:
    x_log: np.ndarray  # (N, lags) log1p of the input cells
    group: np.ndarray  # (N,) group index
    season: np.ndarray  # (N, 2) calendar position of the first target period (public)
    y_log: np.ndarray  # (N, horizon) log1p of the target cells

    def __len__(self) -> int:
        return len(self.group)


def season_features(dates: pd.DatetimeIndex | pd.Series) -> np.ndarray:
    """sin/cos of the day of year: public, depends only on the calendar."""
    doy = pd.DatetimeIndex(dates).day_of_year.to_numpy(dtype=np.float64)
    angle = 2 * np.pi * doy / 365.25
    return np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32)


def training_examples(series: pd.DataFrame, lags: int, horizon: int, stride: int | None = None) -> Examples:
    values = series.to_numpy(dtype=np.float64)
    x, y, meta = make_windows(values, lags, horizon, stride)
    first_target = series.index[meta[:, 0] + lags]
    return Examples(
        x_log=np.log1p(np.clip(x, 0, None)).astype(np.float32),
        group=meta[:, 1].astype(np.int64),
        season=season_features(first_target),
        y_log=np.log1p(np.clip(y, 0, None)).astype(np.float32),
    )


def forecast_inputs(last_window: np.ndarray, first_target: pd.Timestamp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs for forecasting every group from a (lags, G) window (already noised)."""
    lags, n_groups = last_window.shape
    x_log = np.log1p(np.clip(last_window.T, 0, None)).astype(np.float32)
    group = np.arange(n_groups, dtype=np.int64)
    season = np.repeat(season_features(pd.DatetimeIndex([first_target])), n_groups, axis=0)
    return x_log, group, season
