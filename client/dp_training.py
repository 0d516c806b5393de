"""One local DP-SGD round with Opacus, and forecasting with a trained model."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.features import Examples


@dataclass(frozen=True)
class StepPlan:
    """What Opacus will do for N examples: Poisson rate q = 1/#batches, #batches steps/epoch."""

    sample_rate: float
    steps: int


def plan_steps(n_examples: int, batch_size: int, epochs: int) -> StepPlan:
    batches = max(math.ceil(n_examples / batch_size), 1)
    return StepPlan(sample_rate=1.0 / batches, steps=batches * epochs)


def train_dp(
    model: nn.Module,
    ex: Examples,
    *,
    noise_multiplier: float | None,
    max_grad_norm: float,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
) -> StepPlan:
    """Train `model` in place. `noise_multiplier=None` trains without DP (baselines only).

    Returns the (q, steps) Opacus actually used, so the caller can check it against what was
    charged to the ledger beforehand.
    """
    # The forecaster is tiny: extra intra-op threads only contend (measured 26x slower with 2
    # threads on a 2-core machine running several virtual nodes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, ex, noise_multiplier, max_grad_norm, batch_size, epochs, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train(model: nn.Module, ex: Examples, noise_multiplier: float | None, max_grad_norm: float,
           batch_size: int, epochs: int, lr: float, seed: int) -> StepPlan:
    torch.manual_seed(seed)
    data = TensorDataset(
        torch.from_numpy(ex.x_log), torch.from_numpy(ex.group), torch.from_numpy(ex.season), torch.from_numpy(ex.y_log)
    )
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen)
    # Plain SGD: momentum accumulates DP noise across steps, and with 0.9 single-hospital DP
    # training diverged (benchmarks/RESULTS.md, "Training defaults").
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_model: nn.Module = model
    if noise_multiplier is not None:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            # Opacus warns that secure RNG is off; fine for research, documented in README.
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            train_model, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=noise_multiplier,
                max_grad_norm=max_grad_norm,
                poisson_sampling=True,
            )
    loss_fn = nn.MSELoss()
    train_model.train()
    steps = 0
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for _ in range(epochs):
        for x, g, s, y in loader:
            optimizer.zero_grad(set_to_none=True)
            pred = train_model(x, g, s)
            # Poisson sampling can draw an empty batch: backprop a zero loss so Opacus still
            # takes (and accounts) a pure-noise step, as the analysis assumes.
            loss = loss_fn(pred, y) if len(g) else pred.sum() * 0.0
            loss.backward()
            optimizer.step()
            steps += 1
    if noise_multiplier is not None:
        hist = engine.accountant.history
        return StepPlan(sample_rate=float(hist[0][1]), steps=int(sum(h[2] for h in hist)))
    return StepPlan(sample_rate=1.0 / max(len(loader), 1), steps=steps)


@torch.no_grad()
def predict_log(model: nn.Module, x_log: np.ndarray, group: np.ndarray, season: np.ndarray) -> np.ndarray:
    model.eval()
    out = model(torch.from_numpy(x_log), torch.from_numpy(group), torch.from_numpy(season))
    return out.numpy().astype(np.float64)


def predict_counts(model: nn.Module, x_log: np.ndarray, group: np.ndarray, season: np.ndarray) -> np.ndarray:
    """Forecast counts per (example, horizon period), clipped at 0."""
    # Clamp the log forecast: a diverged model must give a huge finite number, not inf/overflow.
    return np.clip(np.expm1(np.clip(predict_log(model, x_log, group, season), None, 30.0)), 0, None)
