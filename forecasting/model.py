"""The demand forecaster.

`build_model` returns :class:`SeasonalForecaster`, a structured model with ~100 parameters:

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
(the per-group profile) and `LagMix`, a single-input module (functorch path). The calendar length
of one period is a buffer (`period_days`) carried in the state dict, so a node that rebuilds the
model with the default and loads the global state uses the coordinator's period.

`Forecaster` (the former MLP) is kept for the membership-inference audit (simulations/mia.py).
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


class SeasonalForecaster(nn.Module):
    def __init__(self, lags: int, horizon: int, n_groups: int, harmonics: int = HARMONICS,
                 period: str = "week") -> None:
        super().__init__()
        if period not in PERIOD_DAYS:
            raise ValueError(f"unknown period {period!r}; expected one of {sorted(PERIOD_DAYS)}")
        self.lags, self.horizon, self.n_groups, self.harmonics = lags, horizon, n_groups, harmonics
        self.profile = nn.Embedding(n_groups, 2 * harmonics)  # (a_k, b_k): f = Σ a_k sin kθ + b_k cos kθ
        nn.init.zeros_(self.profile.weight)
        self.mix = LagMix(lags)
        self.register_buffer("period_days", torch.tensor([PERIOD_DAYS[period]]))

    def _log_index(self, coef: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """f_g at angles `theta` (N, T) for per-row coefficients `coef` (N, 2K) → (N, T)."""
        k = torch.arange(1, self.harmonics + 1, dtype=theta.dtype)
        kt = theta[..., None] * k  # (N, T, K)
        a, b = coef[:, None, : self.harmonics], coef[:, None, self.harmonics :]
        return (a * torch.sin(kt) + b * torch.cos(kt)).sum(dim=-1).clamp(-PROFILE_LIMIT, PROFILE_LIMIT)

    def mean_forecast(self, x: torch.Tensor, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        """Forecast mean demand per period over the horizon, (N, 1), in the data's units."""
        m = signed_expm1(x)  # (N, lags) block means of the window
        theta_t = torch.atan2(season[:, 0], season[:, 1])  # angle of the first target period
        step = 2 * math.pi * self.period_days.to(x.dtype) / YEAR_DAYS
        offsets = torch.arange(-self.lags, self.horizon, dtype=x.dtype) * step
        theta = theta_t[:, None] + offsets[None, :]  # (N, lags + horizon)
        f = self._log_index(self.profile(group), theta)
        target_index = torch.exp(f[:, self.lags :]).mean(dim=1, keepdim=True)
        return self.mix(m * torch.exp(-f[:, : self.lags])) * target_index

    @torch.no_grad()
    def lag_coefficients(self, group: torch.Tensor, season: torch.Tensor) -> torch.Tensor:
        """(N, lags) c such that mean_forecast = Σ_j c_j · m_j (m = the window's block means).

        The forecast is linear in the window values, so these coefficients say exactly how
        zero-mean noise on the released window moves D_i (forecasting/intervals.py). Same
        formula as `mean_forecast` and `LagMix.forward`; a test checks the two agree.
        """
        theta_t = torch.atan2(season[:, 0], season[:, 1])
        step = 2 * math.pi * self.period_days.to(season.dtype) / YEAR_DAYS
        offsets = torch.arange(-self.lags, self.horizon, dtype=season.dtype) * step
        f = self._log_index(self.profile(group), theta_t[:, None] + offsets[None, :])
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


def build_model(lags: int, horizon: int, n_groups: int, seed: int = 0, period: str = "week") -> SeasonalForecaster:
    """Deterministic initial model: every node and the coordinator build the same one.

    The initial weights are data-free (no seasonality, equal lag weights: the window mean);
    `forecasting.pretrain.initial_model(run)` loads weights pretrained on public synthetic hospitals.
    `seed` is kept for callers; this model's initialisation does not draw random numbers.
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return SeasonalForecaster(lags, horizon, n_groups, period=period)
    finally:
        torch.random.set_rng_state(gen_state)
