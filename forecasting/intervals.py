"""80 % prediction intervals (and a median) for a node's horizon total D_i, at no extra ε.

The interval is a *calibrated distribution* around the released point forecast D̂ (the mean,
unchanged, so its bias does not move):

    s² = a·D̂ + b·D̂² + v_release,    q_τ = D̂ + z_τ · s     (τ = 0.1, 0.5, 0.9; lo clipped at 0)

- `v_release` is the variance the node's own release noise adds to D̂. The forecast is linear in
  the released block sums (forecasting/model.py, `lag_coefficients`), the Gaussian noise on each
  sum has the public standard deviation σ·Δ, so v_release = (σΔ)² Σ_{g,b} (∂D̂/∂S_{g,b})², a
  function of public values (σ, Δ, the block layout) and of the global model only.
- `a·D̂ + b·D̂²` (Poisson-like plus multiplicative spread) and the standardised residual
  quantiles z_τ are fitted on a **public synthetic calibration cohort**: 40 hospitals drawn like
  the pretraining cohort (forecasting/pretrain.py) but with another public seed, so the residuals
  are out of sample for the pretrained model. The current global model forecasts every one of
  their horizon totals from noise-free windows at every origin of the cohort's span, and (a, b, z)
  are fitted to those residuals. (Calibrated on the pretraining cohort itself, in sample, the
  interval covered 74 % instead of 81 % of the sweep hospitals' held-out totals in
  benchmarks/bench_intervals.py: benchmarks/FORECASTER.md, "Intervals".)

Privacy argument (docs/DESIGN.md, "D_i interval"): the inputs are (1) the node's noisy release
window, already paid for by the D_i release's Gaussian mechanism, (2) the global model, itself a
DP output every node already holds, (3) public values: σ, Δ, the run config and the public cohort
(a fixed public seed; no hospital's records). lo, median and hi are therefore post-processing of
the same release as D_i and cost no ε; two nodes with equal released windows get equal intervals
whatever their private records. The price: the calibration is only as good as the public cohort's
resemblance to the real hospitals (it is drawn from the same generator as the synthetic
hospitals the sweep evaluates on, so the synthetic coverage is optimistic for real data).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from core.drg import DRG_GROUPS
from core.run_config import RunSettings
from forecasting.pretrain import PUBLIC_SEED, PUBLIC_YEARS, public_series

QUANTILES = (0.1, 0.5, 0.9)  # lo, median, hi: the central 80 % interval
LEVEL = 0.8
CALIBRATION_SEED = PUBLIC_SEED + 1  # public, and not the pretraining cohort's seed
CALIBRATION_HOSPITALS = 40  # 1,040 hospital-origins at the default window (bench_intervals.py)


@dataclass(frozen=True)
class Calibration:
    """Spread model fitted on the public cohort: variance a·D̂ + b·D̂², standardised quantiles z."""

    a: float
    b: float
    z: tuple[float, float, float]
    n: int  # public hospital-origins it was fitted on


@dataclass(frozen=True)
class Interval:
    lo: float
    median: float
    hi: float
    sd: float  # the spread s the quantiles were scaled by


def window_coefficients(model: torch.nn.Module, first_target: pd.Timestamp, n_groups: int) -> np.ndarray:
    """(lags, G) c with D̂ = Σ c ⊙ window (before the clamp at 0): ∂D̂/∂ each window cell."""
    from forecasting.features import season_features

    season = torch.from_numpy(np.repeat(season_features(pd.DatetimeIndex([first_target])), n_groups, axis=0))
    coef = model.lag_coefficients(torch.arange(n_groups), season).double().numpy()  # (G, lags)
    return model.horizon * coef.T


def window_gradient(model: torch.nn.Module, window: np.ndarray, first_target: pd.Timestamp) -> np.ndarray:
    """(lags, G) ∂D̂/∂ each cell of the released (block-mean) `window`, by autograd at that window:
    the delta method for a model that is not linear in the window (LogLinearForecaster)."""
    from forecasting.features import season_features

    m = torch.tensor(np.asarray(window, dtype=np.float32).T, requires_grad=True)  # (G, lags)
    n_groups = m.shape[0]
    x = torch.sign(m) * torch.log1p(m.abs())  # the model's input transform (signed log1p)
    season = torch.from_numpy(np.repeat(season_features(pd.DatetimeIndex([first_target])), n_groups, axis=0))
    model.eval()
    total = model.horizon * model.mean_forecast(x, torch.arange(n_groups), season).sum()
    (grad,) = torch.autograd.grad(total, m)
    return grad.double().numpy().T


def release_variance(model: torch.nn.Module, first_target: pd.Timestamp, n_groups: int, blocks: int,
                     noise_std: float, window: np.ndarray | None = None) -> float:
    """Variance of D̂ caused by N(0, noise_std²) on each of the (blocks, G) released block sums.

    A block sum S is spread evenly over its `size` cells (block mean S/size), so ∂D̂/∂S is the sum
    of the block's cell coefficients divided by `size`; the sums' noises are independent. For a
    model that is not linear in the window the coefficients are the gradient at the released
    `window` (post-processing of the release, like D̂ itself).
    """
    if getattr(model, "linear_in_window", True):
        coef = window_coefficients(model, first_target, n_groups)
    elif window is None:
        raise ValueError("release_variance: a model that is not linear in the window needs the released window")
    else:
        coef = window_gradient(model, window, first_target)
    lags = coef.shape[0]
    size = lags // blocks
    per_block = coef.reshape(blocks, size, n_groups).sum(axis=1) / size
    return float(noise_std ** 2 * np.sum(per_block ** 2))


def interval(point: float, release_var: float, cal: Calibration) -> Interval:
    """lo ≤ median ≤ hi around the mean forecast `point` (≥ 0), lo ≥ 0; lo ≤ point ≤ hi."""
    p = max(float(point), 0.0)
    s = float(np.sqrt(max(cal.a * p + cal.b * p * p + release_var, 0.0)))
    z_lo, z_med, z_hi = cal.z
    lo = max(p + min(z_lo, 0.0) * s, 0.0)  # demand is never negative; the mean stays inside
    hi = p + max(z_hi, 0.0) * s
    return Interval(lo, min(max(p + z_med * s, lo), hi), hi, s)


def fit_calibration(pred: np.ndarray, truth: np.ndarray) -> Calibration:
    """(a, b) by least squares of the relative squared residual on (1/D̂, 1), then z quantiles.

    Regressing (r/D̂)² rather than r² keeps the largest hospitals from setting the fit alone;
    the empirical z quantiles then carry the shape (shocks make the residuals skewed), so the
    cohort's coverage is 80 % by construction whatever (a, b) come out.
    """
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    ok = np.isfinite(pred) & np.isfinite(truth) & (pred > 0)
    p, r = pred[ok], truth[ok] - pred[ok]
    if len(p) < 10:
        raise ValueError(f"the public cohort gave {len(p)} usable forecasts; at least 10 are needed")
    design = np.column_stack([1.0 / p, np.ones_like(p)])
    (a, b), *_ = np.linalg.lstsq(design, (r / p) ** 2, rcond=None)
    a, b = max(float(a), 0.0), max(float(b), 0.0)
    if a == 0.0 and b == 0.0:
        a = 1.0  # degenerate fit: fall back to Poisson spread
    z = r / np.sqrt(a * p + b * p * p)
    q = np.quantile(z, QUANTILES)
    return Calibration(a, b, (float(q[0]), float(q[1]), float(q[2])), int(len(p)))


def cohort_key(run: RunSettings) -> tuple:
    """The public values the cohort's windows depend on (not the run's name or seed)."""
    return (run.lags, run.horizon, run.release_blocks, run.period, run.measure, float(run.los_cap),
            str(pd.Timestamp(run.cutoff).date()))


@lru_cache(maxsize=16)
def _cohort_windows(key: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every public hospital-origin: (block-mean windows (N, lags, G), season (N, 2), true totals (N,))."""
    from forecasting.features import block_means, season_features

    lags, horizon, blocks, period, measure, los_cap, cutoff = key
    start = str((pd.Timestamp(cutoff) - pd.Timedelta(days=round(PUBLIC_YEARS * 365.25))).date())
    run = RunSettings.from_mapping({"lags": lags, "horizon": horizon, "release-blocks": blocks, "period": period,
                                    "measure": measure, "los-cap": los_cap, "start": start, "cutoff": cutoff})
    windows, dates, truth = [], [], []
    for s in public_series(run, hospitals=CALIBRATION_HOSPITALS, seed=CALIBRATION_SEED):
        v = s.to_numpy(dtype=np.float64)
        for end in range(lags, len(v) - horizon + 1, horizon):  # public data: overlapping windows are fine
            windows.append(block_means(v[end - lags : end], blocks, axis=0))
            dates.append(s.index[end])
            truth.append(v[end : end + horizon].sum())
    if not windows:
        raise ValueError("the public cohort holds no window for this run's lags and horizon")
    return np.stack(windows), season_features(pd.DatetimeIndex(dates)), np.array(truth)


def cohort_forecasts(model: torch.nn.Module, windows: np.ndarray, season: np.ndarray) -> np.ndarray:
    """Horizon totals D̂ (clamped at 0 per group, as a node's forecast) for (N, lags, G) windows."""
    from forecasting.features import signed_log1p

    n, lags, groups = windows.shape
    x = torch.from_numpy(signed_log1p(windows.transpose(0, 2, 1).reshape(n * groups, lags)))
    g = torch.arange(groups).repeat(n)
    s = torch.from_numpy(np.repeat(season, groups, axis=0))
    model.eval()
    with torch.no_grad():
        mean = model.mean_forecast(x, g, s).clamp(min=0.0).double().numpy().reshape(n, groups)
    return model.horizon * mean.sum(axis=1)


def _fingerprint(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(np.ascontiguousarray(v.detach().numpy()).tobytes())
    return h.hexdigest()


_CALIBRATIONS: dict[tuple, Calibration] = {}
# Normal quantiles ±1.2816 around a Poisson variance: the fallback when no public cohort fits.
POISSON = Calibration(1.0, 0.0, (-1.2815515655446004, 0.0, 1.2815515655446004), 0)


def public_calibration(model: torch.nn.Module, run: RunSettings) -> Calibration:
    """The spread of `model`'s horizon totals on the public cohort (cached per model and cohort:
    every node of a run holds the same global model and computes the same calibration)."""
    if run.group_list != DRG_GROUPS:
        # A custom group catalogue: the synthetic cohort has other groups, so it says nothing
        # about this model (checked first: building the cohort's windows takes seconds).
        return POISSON
    key = (cohort_key(run), _fingerprint(model))
    if key not in _CALIBRATIONS:
        try:
            windows, season, truth = _cohort_windows(cohort_key(run))
        except ValueError:  # no public window fits this run's window shape
            return POISSON
        if windows.shape[2] != model.n_groups:
            # A custom group catalogue: the synthetic cohort has other groups, so it says nothing
            # about this model. Poisson spread plus the release noise only (too narrow when
            # demand has shocks: say so wherever such intervals are reported).
            return POISSON
        if len(_CALIBRATIONS) > 64:
            _CALIBRATIONS.clear()
        try:
            _CALIBRATIONS[key] = fit_calibration(cohort_forecasts(model, windows, season), truth)
        except ValueError:  # a global model that forecasts (almost) nothing positive: no residuals to fit
            return POISSON
    return _CALIBRATIONS[key]
