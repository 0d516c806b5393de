"""Turning a node's demand series into model examples, and the D_i release's noisy input.

One example is one (window, group) pair, so under the default disjoint windows one encounter
record touches at most one example: the DP-SGD guarantee is then per record (docs/DESIGN.md "Privacy unit").

Inputs. The model sees its lag window as `blocks` block means, per cell transformed with the
signed log1p `sign(v)·log1p(|v|)` (= log1p for counts). The D_i release noises block *sums*:
one record changes one sum by at most the cell sensitivity, and the block sums of one window are
disjoint, so the whole vector is one Gaussian mechanism with L2 sensitivity Δ however many blocks
there are: a year of 4-week block sums costs what two blocks cost. Training inputs get the same
block averaging, so the model is trained on what it is later shown.

The noisy sums are *not* clipped at 0: clipping then taking log1p biased small hospitals' D_i
down (benchmarks/FORECASTER.md). The signed transform keeps negative noisy values, and the
forecaster (forecasting/model.py) is linear in the window values, so zero-mean noise stays zero-mean.

Target. `y_log` is log1p of the *mean* demand per period over the horizon, repeated `horizon`
times. D_i is a horizon total, and a least-squares fit in log space estimates the mean of the
log, which is below the log of the mean by about half the variance (Jensen): per single period
of a small group that was a −5 % bias on D_i; the horizon mean has `horizon`× less variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.series import make_windows


@dataclass(frozen=True)
class Examples:
    x_log: np.ndarray  # (N, lags) signed log1p of the input block means
    group: np.ndarray  # (N,) group index
    season: np.ndarray  # (N, 2) calendar position of the first target period (public)
    y_log: np.ndarray  # (N, horizon) log1p of the horizon's mean per period, repeated

    def __len__(self) -> int:
        return len(self.group)


def signed_log1p(x: np.ndarray) -> np.ndarray:
    """Per-cell transform of model inputs: log1p for counts, defined for negative noisy values."""
    return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)


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

    Every cell of the window is in exactly one block sum, so one record moves the vector of
    sums by at most Δ in L2 (noise_std = σ·Δ). Only the noisy sums are used afterwards, so
    everything derived from them is post-processing. The sums are returned unclipped (they can
    be negative): clipping at 0 biases small counts upwards and log1p then biased them down.
    """
    lags, groups = window.shape
    if blocks < 1 or lags % blocks:
        raise ValueError(f"{blocks} blocks do not divide a window of {lags}")
    size = lags // blocks
    sums = window.reshape(blocks, size, groups).sum(axis=1)
    noisy = sums + rng.normal(0.0, noise_std, size=sums.shape)
    return np.repeat(noisy / size, size, axis=0)


def horizon_mean_target(y: np.ndarray) -> np.ndarray:
    """(N, horizon) counts → log1p of each row's mean, repeated over the horizon (float32)."""
    mean = np.clip(y, 0, None).mean(axis=1, keepdims=True)
    return np.repeat(np.log1p(mean), y.shape[1], axis=1).astype(np.float32)


def training_examples(series: pd.DataFrame, lags: int, horizon: int, stride: int | None = None, *, blocks: int) -> Examples:
    """`blocks` must match the run's `release-blocks`: the model is trained on what it is later shown."""
    values = series.to_numpy(dtype=np.float64)
    x, y, meta = make_windows(values, lags, horizon, stride)
    x = block_means(x, blocks, axis=1)
    first_target = series.index[meta[:, 0] + lags]
    return Examples(
        x_log=signed_log1p(x),
        group=meta[:, 1].astype(np.int64),
        season=season_features(first_target),
        y_log=horizon_mean_target(y),
    )


def forecast_inputs(last_window: np.ndarray, first_target: pd.Timestamp) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model inputs for forecasting every group from a (lags, G) window (already noised)."""
    lags, n_groups = last_window.shape
    x_log = signed_log1p(np.asarray(last_window, dtype=np.float64).T)
    group = np.arange(n_groups, dtype=np.int64)
    season = np.repeat(season_features(pd.DatetimeIndex([first_target])), n_groups, axis=0)
    return x_log, group, season
