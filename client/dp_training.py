"""One local DP-SGD round with Opacus, and forecasting with a trained model."""

from __future__ import annotations

import functools
import secrets
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from forecasting.features import Examples
from forecasting.model import SCALE_LIMIT, LagMix
from core.run_config import StepPlan, plan_steps  # noqa: F401  (re-exported for callers)


# Bound on the forecaster's log1p outputs: e^30 ≈ 10^13 is far above any hospital's demand.
LOG_BOUND = 30.0
# Opacus per-sample gradient mode. "hooks" with LagMix's closed-form grad sampler registered was the
# fastest (benchmarks/RESULTS.md, "DP-SGD step"): "functorch" runs a vmap per layer per step, "ew"
# rejects the group embedding's 1-D input, and "ghost" was slower and never stores per-sample
# gradients, so zero_nonfinite_samples could not zero a non-finite one before clipping.
GRAD_SAMPLE_MODE = "hooks"


def train_dp(
    model: nn.Module,
    ex: Examples,
    *,
    noise_multiplier: float | None,
    max_grad_norm: float,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int | None = None,
) -> StepPlan:
    """Train `model` in place. `noise_multiplier=None` trains without DP (baselines only).

    `seed=None` (every node's default) draws the DP noise and the Poisson sampling from
    generators seeded with 64 bits of OS entropy each: a seed the coordinator could guess or
    replay would let it subtract the noise. An int pins both (tests, debugging; node-only).
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


def entropy_generator(seed: int | None = None) -> torch.Generator:
    """A torch generator seeded with 64 bits of OS entropy (or with `seed`, when pinned).

    torch's generator is a Mersenne Twister whose full seed space is 64 bits; Opacus's CSPRNG
    option needs torchcsprng, which has no build for this torch (docs/DESIGN.md, "Noise").
    """
    return torch.Generator().manual_seed(secrets.randbits(64) if seed is None else int(seed) % 2**64)


def _train(model: nn.Module, ex: Examples, noise_multiplier: float | None, max_grad_norm: float,
           batch_size: int, epochs: int, lr: float, seed: int | None) -> StepPlan:
    data = ExampleTensors(torch.from_numpy(ex.x_log), torch.from_numpy(ex.group), torch.from_numpy(ex.season),
                          torch.from_numpy(ex.y_log))
    gen = entropy_generator(seed)
    noise_gen = entropy_generator(None if seed is None else seed + 1)
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=_rows_to_batch)
    # Plain SGD: momentum accumulates DP noise across steps, and with 0.9 single-hospital DP
    # training diverged (benchmarks/RESULTS.md, "Training defaults").
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    train_model: nn.Module = model
    if noise_multiplier is not None:
        PrivacyEngine = _opacus_engine()
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
                noise_generator=noise_gen,
                grad_sample_mode=GRAD_SAMPLE_MODE,
            )
    loss_fn = nn.MSELoss()
    train_model.train()
    steps = 0
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    for _ in range(epochs):
        for x, g, s, y in loader:
            optimizer.zero_grad(set_to_none=True)
            # Clamped outputs bound the loss whatever global model arrived (docs/DESIGN.md,
            # "Side channels"): a crafted model must not turn one record into an overflow.
            pred = train_model(x, g, s).clamp(-LOG_BOUND, LOG_BOUND)
            # Poisson sampling can draw an empty batch: backprop a zero loss so Opacus still
            # takes (and accounts) a pure-noise step, as the analysis assumes.
            loss = loss_fn(pred, y) if len(g) else pred.sum() * 0.0
            loss.backward()
            if noise_multiplier is not None:
                zero_nonfinite_samples(train_model)
            optimizer.step()
            steps += 1
    with torch.no_grad():  # post-processing of the DP output: the update leaving the node is finite
        for p in model.parameters():
            torch.nan_to_num_(p, nan=0.0, posinf=0.0, neginf=0.0)
    if noise_multiplier is not None:
        # Opacus wraps `model` in place; unhook it so the caller gets a plain module back (a later
        # autograd pass on it, e.g. the interval's delta method, would otherwise hit stale hooks).
        train_model._close()
        hist = engine.accountant.history
        return StepPlan(sample_rate=float(hist[0][1]), steps=int(sum(h[2] for h in hist)))
    return StepPlan(sample_rate=1.0 / max(len(loader), 1), steps=steps)


def zero_nonfinite_samples(model: nn.Module) -> None:
    """A per-sample gradient with any non-finite entry counts as zero before clipping.

    Zero lies inside the clipping ball, so the sensitivity is unchanged; without this a NaN from
    one example would poison the noisy sum, and noise cannot hide a NaN.
    """
    grads = [p.grad_sample for p in model.parameters() if getattr(p, "grad_sample", None) is not None]
    if not grads:
        return
    n = grads[0].shape[0]
    # One check over all samples first: the common all-finite case then costs a few tensor ops.
    ok = torch.isfinite(torch.cat([gs.reshape(n, -1) for gs in grads], dim=1)).all(dim=1)
    if not bool(ok.all()):
        for gs in grads:
            gs[~ok] = 0.0


class ExampleTensors(Dataset):
    """The examples as four tensors; a batch is fetched with one index per tensor.

    Same rows as a TensorDataset (Opacus's DPDataLoader samples the indices, Poisson); torch's
    DataLoader calls `__getitems__` once per batch instead of indexing and collating row by row.
    """

    def __init__(self, *tensors: torch.Tensor) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        return tuple(t[i] for t in self.tensors)

    def __getitems__(self, indices: list[int]) -> "_Rows":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return _Rows(tuple(t[idx] for t in self.tensors))


class _Rows:
    """A fetched batch; its len() is the number of rows, which Opacus's empty-batch collate checks."""

    def __init__(self, tensors: tuple[torch.Tensor, ...]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return len(self.tensors[0])


def _rows_to_batch(rows: _Rows) -> tuple[torch.Tensor, ...]:
    return rows.tensors


def lagmix_grad_sample(layer: LagMix, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample gradients of LagMix in closed form (an Opacus grad sampler, "hooks" mode).

    out_n = s · a_n with a_n = Σ_j w_j z_nj, w = softmax(logits), s = exp(clamp(log_scale)), so
    ∂out_n/∂logits_k = s · w_k · (z_nk − a_n) and ∂out_n/∂log_scale = s · a_n (0 where the clamp
    binds, as torch's clamp backward). Without it Opacus runs a functorch vmap for this layer on
    every step (most of a DP step's cost). tests/test_dp_step_modes.py checks it against Opacus's
    functorch per-sample gradients: same gradients, so the same clipping and sensitivity.
    """
    z = activations[0]
    b = backprops.reshape(-1, 1)
    log_scale = layer.log_scale.detach()
    scale = torch.exp(log_scale.clamp(-SCALE_LIMIT, SCALE_LIMIT))
    w = torch.softmax(layer.logits.detach(), dim=0)
    a = (z * w).sum(dim=1, keepdim=True)
    inside = (log_scale >= -SCALE_LIMIT) & (log_scale <= SCALE_LIMIT)
    g_scale = torch.where(inside, b * a * scale, torch.zeros((), dtype=z.dtype))
    return {layer.logits: (b * scale) * w * (z - a), layer.log_scale: g_scale}


@functools.cache
def _opacus_engine() -> type:
    """Opacus's PrivacyEngine, with LagMix's grad sampler registered (once per process)."""
    from opacus import PrivacyEngine
    from opacus.grad_sample import register_grad_sampler

    register_grad_sampler(LagMix)(lagmix_grad_sample)
    return PrivacyEngine


@torch.no_grad()
def predict_log(model: nn.Module, x_log: np.ndarray, group: np.ndarray, season: np.ndarray) -> np.ndarray:
    model.eval()
    out = model(torch.from_numpy(x_log), torch.from_numpy(group), torch.from_numpy(season))
    return torch.nan_to_num(out.clamp(-LOG_BOUND, LOG_BOUND), nan=0.0).numpy().astype(np.float64)


def predict_counts(model: nn.Module, x_log: np.ndarray, group: np.ndarray, season: np.ndarray) -> np.ndarray:
    """Forecast counts per (example, horizon period), clipped at 0."""
    # Clamp the log forecast: a diverged model must give a huge finite number, not inf/overflow.
    return np.clip(np.expm1(np.clip(predict_log(model, x_log, group, season), None, 30.0)), 0, None)
