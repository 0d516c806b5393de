"""The demand forecaster.

`build_model` returns :class:`SeasonalForecaster` (run-config `model = "seasonal"`, the default), a
structured model with ~100 parameters:

    forecast mean per period = Σ_j w_j · m_{g,j} · s_g(target) / s_g(period j)

where m_{g,j} is the (block-mean) demand of group g in lag period j of the example's own window,
s_g(t) = exp(f_g(day of year)) is a per-group seasonal index with a learned Fourier log-profile
f_g (2 harmonics), and w is a learned weighting of the lag periods (softmax, times one learned
scale). With a year-long window (lags = 52 weeks) the same weeks last year, the latest weeks and
everything between are all inputs; which to trust is what w learns.

Why this shape (measured in benchmarks/FORECASTER.md):

- **DP-SGD noise grows with the parameter count**: per step the noise on the averaged gradient
  has norm ≈ σ·C·√d / B, while the gradient itself is at most C. The former MLP had d = 5,428
  (13.7 C at σ 2.97, B 16); this model has d = 12·4 + lags + 1: 61 at lags 8 (1.5 C at the same
  σ), 101 at lags 52 (4.0 C at the σ ≈ 6.3 that 24 examples per node need for ε = 3).
- **Unbiased in the inputs**: the forecast is *linear* in the window values, so zero-mean noise
  on the released block sums gives zero-mean error on D_i; the log is taken only of the forecast,
  and negative noisy values are kept (signed log1p, see forecasting/features.py) rather than clipped.
- The seasonal profile is shared by construction (one row per DRG group), which is what public
  pretraining (forecasting/pretrain.py) can teach and DP fine-tuning can adjust.

Inputs are per-cell transforms of the example's own window (no node-wide statistic, docs/DESIGN.md
"Privacy unit") plus the public calendar position of the first target period. The output is
the log1p of the forecast mean per period, repeated `horizon` times (the training target is the
log1p of the horizon's mean, forecasting/features.py).

Opacus computes per-sample gradients through the two parametrised submodules: an `nn.Embedding`
(the per-group profile) and `LagMix`, whose closed-form per-sample gradient is registered with
Opacus in client/dp_training.py (hooks mode; the functorch fallback was most of a DP step). The calendar length
of one period is a buffer (`period_days`) carried in the state dict, so a node that rebuilds the
model with the default and loads the global state uses the coordinator's period.

`LogLinearForecaster` (`model = "loglinear"`) is the alternative for epidemic counts: linear in
the *log* of the window, so it can shrink a hospital's latest level toward a common one (what beat
last value on real surveillance data, where the linear model could only reproduce it); it gives up
the exact unbiasedness under release noise (see its docstring).

`Forecaster` (the former MLP) is kept for the membership-inference audit (simulations/mia.py).
"""

from __future__ import annotations

import copy
import functools
import math

import torch
from torch import nn
from torch.nn.utils import skip_init

YEAR_DAYS = 365.25
PERIOD_DAYS = {"week": 7.0, "day": 1.0}
HARMONICS = 2
PROFILE_LIMIT = 3.0  # |f_g| ≤ 3: a seasonal index between e^-3 and e^3 (exp cannot overflow)
SCALE_LIMIT = 10.0  # |log scale| ≤ 10: a crafted global model cannot make a forecast overflow


def signed_expm1(x: torch.Tensor) -> torch.Tensor:
    """Inverse of the per-cell input transform sign(v)·log1p(|v|) (forecasting/features.py)."""
    return torch.sign(x) * torch.expm1(x.abs())


class LagMix(nn.Module):
    """Weighted mean of the deseasonalised lag periods: softmax(logits) · z, times exp(log_scale)."""

    def __init__(self, lags: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(lags))
        self.log_scale = nn.Parameter(torch.zeros(1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        scale = torch.exp(self.log_scale.clamp(-SCALE_LIMIT, SCALE_LIMIT))
        return (z * torch.softmax(self.logits, dim=0)).sum(dim=1, keepdim=True) * scale


class SeasonalProfile(nn.Module):
    """What both forecasters share: the window shape, the per-group Fourier log-profile f_g (one
    Embedding row of (a_k, b_k) per group: f = Σ a_k sin kθ + b_k cos kθ) and the period length."""

    def __init__(self, lags: int, horizon: int, n_groups: int, harmonics: int = HARMONICS,
                 period: str = "week") -> None:
        super().__init__()
        if period not in PERIOD_DAYS:
            raise ValueError(f"unknown period {period!r}; expected one of {sorted(PERIOD_DAYS)}")
        self.lags, self.horizon, self.n_groups, self.harmonics = lags, horizon, n_groups, harmonics
        # A given weight skips Embedding's random init: no RNG draw, and ~20x cheaper than skip_init
        # (which runs the init on the meta device), paid by every node on every message.
        self.profile = nn.Embedding(n_groups, 2 * harmonics, _weight=torch.zeros(n_groups, 2 * harmonics))
        self.register_buffer("period_days", torch.tensor([PERIOD_DAYS[period]]))

    def profile_at(self, group: torch.Tensor, season: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """f_g at periods first … last − 1 counted from the first target period (season holds its
        sin/cos), (N, last − first)."""
        theta_t = torch.atan2(season[:, 0], season[:, 1])
        step = 2 * math.pi * self.period_days.to(season.dtype) / YEAR_DAYS
        offsets = torch.arange(first, last, dtype=season.dtype) * step
        return log_profile(self.profile(group), theta_t[:, None] + offsets[None, :], self.harmonics)


class SeasonalForecaster(SeasonalProfile):
    def __init__(self, lags: int, horizon: int, n_groups: int, harmonics: int = HARMONICS,
                 period: str = "week") -> None:
        super().__init__(lags, horizon, n_groups, harmonics, period)
        self.mix = LagMix(lags)

    def mean_forecast(self, x: torch.Tensor, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        """Forecast mean demand per period over the horizon, (N, 1), in the data's units."""
        m = signed_expm1(x)  # (N, lags) block means of the window
        f = self.profile_at(group, season, -self.lags, self.horizon)  # (N, lags + horizon)
        target_index = torch.exp(f[:, self.lags :]).mean(dim=1, keepdim=True)
        return self.mix(m * torch.exp(-f[:, : self.lags])) * target_index

    @torch.no_grad()
    def lag_coefficients(self, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        """(N, lags) c such that mean_forecast = Σ_j c_j · m_j (m = the window's block means).

        The forecast is linear in the window values, so these coefficients say exactly how
        zero-mean noise on the released window moves D_i (forecasting/intervals.py). Same
        formula as `mean_forecast` and `LagMix.forward`; a test checks the two agree.
        """
        f = self.profile_at(group, season, -self.lags, self.horizon)
        target_index = torch.exp(f[:, self.lags :]).mean(dim=1, keepdim=True)
        scale = torch.exp(self.mix.log_scale.clamp(-SCALE_LIMIT, SCALE_LIMIT))
        weights = torch.softmax(self.mix.logits, dim=0)[None, :] * scale
        return weights * torch.exp(-f[:, : self.lags]) * target_index

    def forward(self, x: torch.Tensor, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        mean = self.mean_forecast(x, group, season).clamp(min=0.0)
        return torch.log1p(mean).expand(-1, self.horizon)


class Forecaster(nn.Module):
    """The former default: an MLP over the lag window with a DRG-group embedding (5,428 parameters
    at lags 8). Kept for the membership-inference audit; not used by the federation."""

    def __init__(self, lags: int, horizon: int, n_groups: int, hidden: int = 64, emb: int = 4) -> None:
        super().__init__()
        self.lags, self.horizon, self.n_groups = lags, horizon, n_groups
        self.group_emb = nn.Embedding(n_groups, emb)
        self.net = nn.Sequential(
            nn.Linear(lags + emb + 2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, horizon),
        )

    def forward(self, x_log: torch.Tensor, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        level = x_log.mean(dim=1, keepdim=True)
        h = torch.cat([x_log - level, self.group_emb(group), season], dim=1)
        return level + self.net(h)


# The log-linear model's inputs are centred here (log1p(19): ~19 per group and period) before
# they are weighted. It changes only the parametrisation, not the family; but DP-SGD noise on a weight
# moves the forecast by (noise · |x − centre|), and the per-sample gradient of the weight scales
# with |x − centre| too, so uncentred inputs (x ≈ 5 for 150 a week) both amplified the noise and
# starved the bias of clipped gradient (Peru dengue validation origins, relative MAE at ε = 3 and
# lr 0.05: 1.16 uncentred (1 seed), 0.94 centred at 3, 1.00 at 4 (3 seeds); benchmarks/FORECASTER.md).
# A public constant, not a statistic of any node's data.
LOG_CENTRE = 3.0


class LogLinearForecaster(SeasonalProfile):
    """log1p(forecast mean per period) = b + Σ_j w_j · (x_j − c) + f_g(target),  x_j = the window's
    block means in signed log1p (the model's input), f_g the per-group Fourier log-profile
    averaged over the horizon's periods.

    A power law in the window (D̂ ≈ e^b · m^Σw · seasonal index), so with Σw < 1 it shrinks a
    hospital's latest level toward a common one and the profile says where the season goes next:
    on epidemic counts that beat last value where the linear model could only reproduce it
    (benchmarks/FORECASTER.md, "Real public data"). 2 + lags + 2·harmonics·G parameters
    (6 at lags 1 with one group). Unlike SeasonalForecaster it is *not* linear in the window, so
    zero-mean release noise moves D̂ by a Jensen term (small when the noise is small next to the
    counts) and the interval's release variance is a delta-method approximation
    (forecasting/intervals.py). Starts at the window's geometric mean (w = 1/lags, b = c = LOG_CENTRE,
    flat profile), i.e. at last value for lags = 1.
    """

    linear_in_window = False

    def __init__(self, lags: int, horizon: int, n_groups: int, harmonics: int = HARMONICS,
                 period: str = "week") -> None:
        super().__init__(lags, horizon, n_groups, harmonics, period)
        self.lag = _unit_linear(lags)  # a stock layer (Opacus has its per-sample gradient); set below
        with torch.no_grad():
            self.lag.weight.fill_(1.0 / lags)
            self.lag.bias.fill_(LOG_CENTRE)

    def forward(self, x: torch.Tensor, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        f = self.profile_at(group, season, 0, self.horizon).mean(dim=1, keepdim=True)
        return (self.lag(x - LOG_CENTRE) + f).expand(-1, self.horizon)

    def mean_forecast(self, x: torch.Tensor, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        """Forecast mean demand per period over the horizon, (N, 1), in the data's units."""
        return torch.expm1(self.forward(x, group, season)[:, :1].clamp(max=PROFILE_OUTPUT_LIMIT))


def _unit_linear(lags: int) -> nn.Linear:
    """A stock nn.Linear(lags, 1) with no RNG draw: a copy of one made once per shape (skip_init
    costs ~0.4 ms per call, and Opacus finds per-sample gradients by the exact type)."""
    return copy.deepcopy(_linear_template(lags))


@functools.cache
def _linear_template(lags: int) -> nn.Linear:
    return skip_init(nn.Linear, lags, 1)


# exp(30) ≈ 10^13, far above any demand; keeps a crafted global model's forecast finite.
PROFILE_OUTPUT_LIMIT = 30.0


def log_profile(coef: torch.Tensor, theta: torch.Tensor, harmonics: int) -> torch.Tensor:
    """f_g at angles `theta` (N, T) for per-row coefficients `coef` (N, 2K) → (N, T), |f| ≤ 3."""
    k = torch.arange(1, harmonics + 1, dtype=theta.dtype)
    kt = theta[..., None] * k  # (N, T, K)
    a, b = coef[:, None, :harmonics], coef[:, None, harmonics:]
    return (a * torch.sin(kt) + b * torch.cos(kt)).sum(dim=-1).clamp(-PROFILE_LIMIT, PROFILE_LIMIT)


MODEL_CLASSES = {"seasonal": SeasonalForecaster, "loglinear": LogLinearForecaster}


def build_model(lags: int, horizon: int, n_groups: int, seed: int = 0, period: str = "week",
                kind: str = "seasonal") -> nn.Module:
    """Deterministic initial model: every node and the coordinator build the same one.

    The initial weights are data-free (no seasonality, equal lag weights: the window mean);
    `forecasting.pretrain.initial_model(run)` loads weights pretrained on public synthetic hospitals.
    """
    if kind not in MODEL_CLASSES:
        raise ValueError(f"run-config model {kind!r} is not allowed; choose one of {', '.join(MODEL_CLASSES)}")
    # No random draw anywhere in either constructor, so no generator is seeded (that cost 1–3 ms
    # per node and round); `seed` is accepted for callers.
    return MODEL_CLASSES[kind](lags, horizon, n_groups, period=period)


def model_for(run: "RunSettings") -> nn.Module:  # noqa: F821  (core.run_config, imported lazily)
    """The run's data-free model: its family, window shape, period and group catalogue."""
    return build_model(run.lags, run.horizon, len(run.group_list), seed=run.seed, period=run.period, kind=run.model)
