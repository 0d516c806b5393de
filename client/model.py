"""The demand forecaster: a small MLP over the lag window with a DRG-group embedding.

Inputs are per-cell log1p counts (no node-wide scaling statistic, see DESIGN.md "Preprocessing")
plus the public calendar position of the forecast. The network predicts the log1p demand of the
next `horizon` periods as an offset from the window's mean level, which lets one shared model
serve hospitals whose volumes differ by orders of magnitude.
"""

from __future__ import annotations

import torch
from torch import nn


class Forecaster(nn.Module):
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


def build_model(lags: int, horizon: int, n_groups: int, seed: int = 0) -> Forecaster:
    """Deterministic initial model: every node and the coordinator build the same one."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return Forecaster(lags, horizon, n_groups)
    finally:
        torch.random.set_rng_state(gen_state)
