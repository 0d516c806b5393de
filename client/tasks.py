"""What a node does for the coordinator, independent of how the request arrived.

Each task follows the same order: load and validate the node's own data, compute what this work
will cost, charge the ledger durably, and only then do the work whose result leaves the node.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from client.calibration import release_sigma, training_sigma
from client.dp_training import plan_steps, predict_counts, train_dp
from client.features import forecast_inputs, release_window, training_examples
from client.ledger import Ledger, Mechanism
from client.model import build_model
from client.node import NodeSettings, series_for
from core.drg import DRG_GROUPS
from core.run_config import RunSettings
from core.series import cell_sensitivity

log = logging.getLogger("fedalloc.node")

TRAIN = "dpsgd"
RELEASE = "gaussian-release"


@dataclass(frozen=True)
class NoisePlan:
    train_sigma: float
    release_sigma: float
    sample_rate: float
    steps_per_round: int


def open_ledger(node: NodeSettings) -> Ledger:
    return Ledger.open(node.ledger_path, node=node.hospital, budget=node.budget, delta=node.delta, accountant=node.accountant)


def noise_plan(ledger: Ledger, run: RunSettings, run_id: str, server_round: int, n_examples: int) -> NoisePlan:
    """σ for DP-SGD and for the D_i release so this whole run fits the node's budget.

    A run that already charged rounds reuses their σ (a restarted node keeps its plan); a new
    run calibrates against the full ledger history plus every round still to come plus the
    release, so the final predict round can never be refused for lack of budget.
    """
    plan = plan_steps(n_examples, run.batch_size, run.local_epochs)
    rel_sigma = release_sigma(run.epsilon * run.release_share, ledger.delta, ledger.accountant)
    earlier = [e for e in ledger.run_entries(run_id) if e["kind"] == TRAIN]
    if earlier:
        sigma = float(earlier[0]["noise_multiplier"])
    else:
        rounds_left = run.num_server_rounds - server_round + 1
        target = min(ledger.budget, ledger.epsilon() + run.epsilon)
        sigma = training_sigma(
            ledger.history(),
            plan.sample_rate,
            plan.steps * rounds_left,
            [Mechanism(rel_sigma, 1.0, 1, RELEASE)],
            target,
            ledger.delta,
            ledger.accountant,
        )
    return NoisePlan(sigma, rel_sigma, plan.sample_rate, plan.steps)


def train_task(
    global_state: dict[str, torch.Tensor], run: RunSettings, node: NodeSettings, run_id: str, server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    series = series_for(node, run)
    ex = training_examples(series, run.lags, run.horizon, run.window_stride, blocks=run.release_blocks)
    ledger = open_ledger(node)
    plan = noise_plan(ledger, run, run_id, server_round, len(ex))
    eps = ledger.charge(
        [Mechanism(plan.train_sigma, plan.sample_rate, plan.steps_per_round, TRAIN)],
        run=run_id,
        purpose=f"train round {server_round}",
    )
    model = build_model(run.lags, run.horizon, len(DRG_GROUPS))
    model.load_state_dict(global_state)
    used = train_dp(
        model,
        ex,
        noise_multiplier=plan.train_sigma,
        max_grad_norm=run.clip_norm,
        batch_size=run.batch_size,
        epochs=run.local_epochs,
        lr=run.lr,
        # DP noise must be unpredictable to the coordinator: a seed derived from public values
        # would let it subtract the noise. Only a node operator can pin it (tests, debugging).
        seed=secrets.randbits(31) if node.debug_seed is None
        else int(np.random.SeedSequence([node.debug_seed, len(ledger.entries)]).generate_state(1)[0] >> 1),
    )
    if abs(used.sample_rate - plan.sample_rate) > 1e-12 or used.steps != plan.steps_per_round:
        # The ledger already holds the planned charge; a mismatch means the accounting is wrong,
        # so the update must not leave the node.
        raise RuntimeError(f"Opacus ran {used} but the ledger charged {plan}")
    metrics = {
        "num-examples": len(ex),
        "epsilon": eps,
        "noise-multiplier": plan.train_sigma,
        "sample-rate": plan.sample_rate,
        "steps": plan.steps_per_round,
    }
    return model.state_dict(), metrics


def predict_task(
    global_state: dict[str, torch.Tensor], run: RunSettings, node: NodeSettings, run_id: str, rng: np.random.Generator | None = None
) -> dict[str, float]:
    """Release D_i: Gaussian noise on the latest window's block sums, then the public model forecasts."""
    series = series_for(node, run)
    if len(series) < run.lags:
        raise ValueError(f"series has {len(series)} periods, fewer than lags={run.lags}")
    ledger = open_ledger(node)
    sens = cell_sensitivity(run.measure, run.los_cap)
    rel_sigma = release_sigma(run.epsilon * run.release_share, ledger.delta, ledger.accountant)
    eps = ledger.charge([Mechanism(rel_sigma, 1.0, 1, RELEASE)], run=run_id, purpose="demand release")
    window = series.to_numpy(dtype=np.float64)[-run.lags :]
    # A pinned debug seed is mixed with the ledger length so two releases never share noise.
    rng = rng or np.random.default_rng(None if node.debug_seed is None else [node.debug_seed, len(ledger.entries)])
    noisy = release_window(window, run.release_blocks, rel_sigma * sens, rng)
    first_target = series.index[-1] + (series.index[-1] - series.index[-2])
    model = build_model(run.lags, run.horizon, len(DRG_GROUPS))
    model.load_state_dict(global_state)
    counts = predict_counts(model, *forecast_inputs(noisy, first_target))  # (G, horizon)
    per_group = counts.sum(axis=1)
    out = {"demand": float(per_group.sum()), "epsilon": eps, "release-noise": rel_sigma * sens}
    out.update({f"demand-{g}": float(v) for g, v in zip(DRG_GROUPS, per_group)})
    return out
