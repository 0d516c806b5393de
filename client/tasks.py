"""What a node does for the coordinator, independent of how the request arrived.

Each task follows the same order: load and validate the node's own data, compute what this work
will cost, charge the ledger durably, and only then do the work whose result leaves the node.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import torch

from client.accounting import DPSGD, Mechanism
from client.calibration import RELEASE, release_sigma, training_sigma
from client.dp_training import plan_steps, predict_counts, train_dp
from forecasting.features import forecast_inputs, release_window
from forecasting.intervals import interval, public_calibration, release_variance
from core.protocol import DEMAND_HI, DEMAND_LO, DEMAND_MEDIAN
from client.ledger import BudgetExceeded, Ledger
from client.limits import OutsidePlan, check_global_model
from client.releases import ReleaseStore, fingerprint
from forecasting.model import build_model, model_for
from client.node import NodeSettings, examples_for, open_ledger, series_for
from core.run_config import RunSettings
from core.series import cell_sensitivity

log = logging.getLogger("fedalloc.node")

TRAIN = DPSGD


@dataclass(frozen=True)
class NoisePlan:
    train_sigma: float
    release_sigma: float
    sample_rate: float
    steps_per_round: int
    rounds: int


def run_key(run: RunSettings, run_id: str) -> str:
    """Runs are known to a node by their public name (stable across a coordinator's restarts)."""
    return run.run_name or f"flwr-run-{run_id}"


def check_model(state: dict[str, torch.Tensor], run: RunSettings) -> None:
    expected = _expected_arrays(run.model, run.lags, run.horizon, len(run.group_list), run.period)
    check_global_model({k: v.numpy() for k, v in state.items()}, expected, run.weight_bound)


@lru_cache(maxsize=32)
def _expected_arrays(kind: str, lags: int, horizon: int, n_groups: int, period: str) -> dict[str, tuple]:
    """Names, shapes and dtypes of the run's model (public; built once per shape, not per message)."""
    model = build_model(lags, horizon, n_groups, period=period, kind=kind)
    return {k: (tuple(v.shape), str(v.numpy().dtype)) for k, v in model.state_dict().items()}


def check_limits(run: RunSettings, node: NodeSettings) -> None:
    if run.epsilon > node.max_epsilon_per_run:
        raise OutsidePlan(f"run asks ε {run.epsilon} > this node's max-epsilon-per-run {node.max_epsilon_per_run}")
    if run.num_server_rounds > node.max_rounds_per_run:
        raise OutsidePlan(f"run asks {run.num_server_rounds} rounds > this node's max-rounds-per-run "
                          f"{node.max_rounds_per_run}")


def noise_plan(ledger: Ledger, run: RunSettings, node: NodeSettings, key: str, server_round: int,
               n_examples: int) -> NoisePlan:
    """The run's one σ plan: recorded at its first request, enforced on every later one.

    A new run calibrates against the full ledger history plus every round still to come plus the
    release, so the final predict round can never be refused for lack of budget.
    """
    recorded = ledger.plan(key)
    if recorded is None:
        if not 1 <= server_round <= run.num_server_rounds:
            raise OutsidePlan(f"round {server_round} is outside the run's {run.num_server_rounds} rounds")
        steps = plan_steps(n_examples, run.batch_size, run.local_epochs)
        rel_sigma = release_sigma(run.epsilon * run.release_share, ledger.delta)
        rounds_left = run.num_server_rounds - server_round + 1
        target = ledger.epsilon() + run.epsilon
        if target > ledger.budget:
            # Refuse rather than quietly train with more noise than the coordinator planned for.
            raise BudgetExceeded(f"run asks ε {run.epsilon}; only {ledger.remaining():.3f} of the lifetime budget left")
        # rounds=: the plan is checked against the exact per-round charges the ledger will fold.
        sigma = training_sigma(ledger.mechanisms(), steps.sample_rate, steps.steps * rounds_left,
                               [Mechanism(rel_sigma, 1.0, 1, RELEASE)], target, ledger.delta, rounds=rounds_left)
        recorded = ledger.set_plan(key, {
            "config": run.plan(), "train_sigma": sigma, "release_sigma": rel_sigma,
            "sample_rate": steps.sample_rate, "steps_per_round": steps.steps, "rounds": run.num_server_rounds,
            "first_round": server_round})
    if recorded["config"] != run.plan():
        raise OutsidePlan(f"run {key!r} changed its training plan after it started")
    if recorded["train_sigma"] is None or not recorded["first_round"] <= server_round <= recorded["rounds"]:
        raise OutsidePlan(f"round {server_round} is outside run {key!r}'s plan "
                          f"(rounds {recorded['first_round']}..{recorded['rounds']})")
    return NoisePlan(float(recorded["train_sigma"]), float(recorded["release_sigma"]), float(recorded["sample_rate"]),
                     int(recorded["steps_per_round"]), int(recorded["rounds"]))


def train_task(
    global_state: dict[str, torch.Tensor], run: RunSettings, node: NodeSettings, run_id: str, server_round: int
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    check_limits(run, node)  # before the ledger is even opened: nothing is created for a refused run
    check_model(global_state, run)
    ex = examples_for(node, run)
    ledger = open_ledger(node)
    key = run_key(run, run_id)
    plan = noise_plan(ledger, run, node, key, server_round, len(ex))
    store = ReleaseStore(node.ledger_path, key)
    input_fp = fingerprint({k: v.numpy() for k, v in global_state.items()})
    if ledger.charged(key, TRAIN, server_round):
        stored = store.get_update(server_round)
        if stored is not None:
            # Asked again (a resumed coordinator): the same input gets the same, already paid-for
            # update; a different input would need a second release of this round.
            if stored[0] != input_fp:
                raise OutsidePlan(f"round {server_round} of run {key!r} was already answered for another model")
            return {k: torch.from_numpy(v) for k, v in stored[1].items()}, stored[2]
        eps = ledger.epsilon()  # charged, but nothing was stored, so nothing left the node
    else:
        eps = ledger.charge([Mechanism(plan.train_sigma, plan.sample_rate, plan.steps_per_round, TRAIN,
                                       sensitivity=run.clip_norm)],
                            run=key, purpose=f"train round {server_round}", round_=server_round, run_id=run_id)
    model = model_for(run)
    model.load_state_dict(global_state)
    used = train_dp(
        model,
        ex,
        noise_multiplier=plan.train_sigma,
        max_grad_norm=run.clip_norm,
        batch_size=run.batch_size,
        epochs=run.local_epochs,
        lr=run.lr,
        seed=debug_noise_seed(node.debug_seed, len(ledger.entries)),
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
    state = model.state_dict()
    store.put_update(server_round, input_fp, {k: v.numpy() for k, v in state.items()}, metrics)
    return state, metrics


def debug_noise_seed(debug_seed: int | None, salt: int) -> int | None:
    """None (OS entropy) unless the node operator pinned a debug seed (tests, debugging).

    The salt (ledger length) keeps two mechanisms of one debug node from sharing noise.
    """
    if debug_seed is None:
        return None
    return int(np.random.SeedSequence([debug_seed, salt]).generate_state(1, np.uint64)[0])


def predict_task(
    global_state: dict[str, torch.Tensor], run: RunSettings, node: NodeSettings, run_id: str, rng: np.random.Generator | None = None
) -> dict[str, float]:
    """Release D_i: Gaussian noise on the latest window's block sums, then the public model forecasts.

    The noisy window is the DP release (charged once per run and stored); the forecast from it is
    post-processing, so a re-asked predict round costs nothing more.
    """
    check_model(global_state, run)
    series = series_for(node, run)
    if len(series) < run.lags:
        raise ValueError(f"series has {len(series)} periods, fewer than lags={run.lags}")
    ledger = open_ledger(node)
    key = run_key(run, run_id)
    check_limits(run, node)
    recorded = ledger.plan(key)
    if recorded is None:
        # A node asked to release without having trained in this run (it joined late, or was
        # refused training): a release-only plan, after which no training round is accepted.
        rel_sigma = release_sigma(run.epsilon * run.release_share, ledger.delta)
        if ledger.epsilon([Mechanism(rel_sigma, 1.0, 1, RELEASE)]) > ledger.budget:
            raise BudgetExceeded(f"the D_i release needs more than the {ledger.remaining():.3f} left")
        recorded = ledger.set_plan(key, {"config": run.plan(), "train_sigma": None, "release_sigma": rel_sigma,
                                         "sample_rate": None, "steps_per_round": None, "rounds": run.num_server_rounds,
                                         "first_round": run.num_server_rounds + 1})
    if recorded["config"] != run.plan():
        raise OutsidePlan(f"run {key!r} changed its training plan after it started")
    sens = cell_sensitivity(run.measure, run.los_cap)
    rel_sigma = float(recorded["release_sigma"])
    store = ReleaseStore(node.ledger_path, key)
    stored = store.get_window()
    if stored is not None:
        noisy, meta = stored
        eps = float(meta["epsilon"])
    else:
        if ledger.charged(key, RELEASE):
            eps = ledger.epsilon()  # charged, but nothing was stored, so nothing left the node
        else:
            eps = ledger.charge([Mechanism(rel_sigma, 1.0, 1, RELEASE, sensitivity=sens)], run=key,
                                purpose="demand release", run_id=run_id)
        window = series.to_numpy(dtype=np.float64)[-run.lags :]
        rng = rng or np.random.default_rng(debug_noise_seed(node.debug_seed, len(ledger.entries)))
        noisy = release_window(window, run.release_blocks, rel_sigma * sens, rng)
        store.put_window(noisy, {"epsilon": eps})
    first_target = series.index[-1] + (series.index[-1] - series.index[-2])
    model = model_for(run)
    model.load_state_dict(global_state)
    counts = predict_counts(model, *forecast_inputs(noisy, first_target))  # (G, horizon)
    per_group = counts.sum(axis=1)
    out = {"demand": float(per_group.sum()), "epsilon": eps, "release-noise": rel_sigma * sens}
    out.update({f"demand-{g}": float(v) for g, v in zip(run.group_list, per_group)})
    out.update(demand_interval(model, run, out["demand"], first_target, rel_sigma * sens, noisy))
    return out


def demand_interval(model: torch.nn.Module, run: RunSettings, demand: float, first_target: pd.Timestamp,
                    release_std: float, released_window: np.ndarray) -> dict[str, float]:
    """The 80 % interval and median of D_i (forecasting/intervals.py), at no extra ε.

    Privacy: inputs are the released D_i (itself computed from the stored noisy window), the global
    model (a DP output every node holds), the public release noise std σ·Δ and the public
    synthetic cohort; no record is read here, so this is post-processing of the D_i release. Two
    nodes with equal released windows get equal intervals (tests/test_intervals.py).
    """
    cal = public_calibration(model, run)
    var = release_variance(model, first_target, model.n_groups, run.release_blocks, release_std, released_window)
    iv = interval(demand, var, cal)
    return {DEMAND_LO: iv.lo, DEMAND_MEDIAN: iv.median, DEMAND_HI: iv.hi}
