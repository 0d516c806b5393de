"""Turning a node's demand series into model examples, and the D_i release's noisy input.

One example is one (window, group) pair, so under the default disjoint windows one encounter
record touches at most one example: the DP-SGD guarantee is then per record (DESIGN.md "Unit").

The model sees its lag window as `blocks` block means. The D_i release noises block *sums*: one
record changes one sum by at most the cell sensitivity, so the noise is the same as on a single
cell while the signal is `lags/blocks` times larger. Per-cell noise swamped small hospitals'
weekly counts and, through clipping at 0 and log1p, biased their forecasts down (measured: mean
release bias −80 admissions per 4 weeks with per-cell noise on the 10-hospital default).
Training inputs get the same block averaging, so the model is trained on what it is later shown.
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


def block_means(x: np.ndarray, blocks: int, axis: int) -> np.ndarray:
    """Replace each of `blocks` equal runs along `axis` by its mean (same shape as `x`)."""
    n = x.shape[axis]
    if blocks < 1 or n % blocks:
        raise ValueError(f"{blocks} blocks do not divide a window of {n}")
    parts = np.split(x, blocks, axis=axis)
    return np.concatenate([np.repeat(p.mean(axis=axis, keepdims=True), n // blocks, axis=axis) for p in parts], axis=axis)


def release_window(window: np.ndarray, blocks: int, noise_std: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian mechanism on the (blocks, G) block sums of a (lags, G) window, expanded back.

    Only the noisy sums are used afterwards, so everything derived from them is post-processing.
    """
    lags, groups = window.shape
    size = lags // blocks
    sums = window.reshape(blocks, size, groups).sum(axis=1)
    noisy = np.clip(sums + rng.normal(0.0, noise_std, size=sums.shape), 0.0, None)
    return np.repeat(noisy / size, size, axis=0)


def training_examples(series: pd.DataFrame, lags: int, horizon: int, stride: int | None = None, *, blocks: int) -> Examples:
    """`blocks` must match the run's `release-blocks`: the model is trained on what it is later shown."""
    values = series.to_numpy(dtype=np.float64)
    x, y, meta = make_windows(values, lags, horizon, stride)
    x = block_means(x, blocks, axis=1)
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
