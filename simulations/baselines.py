"""Baselines for the federated DP forecaster, on the same hospitals and the same held-out horizon.

Every method forecasts D_i, the total demand of hospital i over the `horizon` periods starting at
the public cutoff, from the series over [start, cutoff). The researcher owns every node's records
here, so the true D_i is known and each forecast can be scored, per hospital and overall, and fed
to the allocation core to measure how much of A_total a forecast error moves to the wrong hospital.

Methods (name → what it does):

- ``seasonal_naive``: the same `horizon` weeks one year (52 weeks) earlier.
- ``last_value``: the last observed week × horizon.
  Both also give an 80 % interval from their own past relative errors (`empirical_interval`).
- ``centralised``: one forecaster trained without DP on the pooled windows of all hospitals.
- ``local``: each hospital trains alone, no DP.
- ``local_dp``: each hospital trains alone with DP-SGD at the run's ε, calibrated exactly like a
  federation node (client.calibration: same σ search, same release share, same accountant), and
  releases D_i through the same Gaussian mechanism on its input window.
- ``federated``: FedAvg over the same nodes without DP (train_dp with noise_multiplier=None).
- ``federated_dp``: the real system, `simulations.driver.simulate(engine="inprocess")`.
- ``dp_series_release``: the honest comparator of issue #12. Each node releases its whole training
  series once, every (period, group) count plus N(0, (σΔ)²), σ of one Gaussian release at the full ε
  (the cells are disjoint, so one record moves the released vector by at most Δ in L2: one Gaussian
  mechanism however long the series). The same model is then fitted centrally, without DP-SGD, on
  every window of the noisy series (post-processing, so overlapping windows cost nothing), and D_i
  is its forecast from each node's noisy last window. At ε = ∞ nothing is noised.

All model-based methods use the same model, the same initial weights (the public pretrained model
of `forecasting.pretrain.initial_model(run)`, which is also the federation's first global model), and the
same total number of local epochs (rounds × local-epochs), so the only differences are pooling,
federation and privacy.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from core.allocation import allocate_array
from core.fairness import allocation_error, fairness_summary
from core.records import load_records
from core.run_config import RunSettings
from core.series import cell_sensitivity, demand_series

POLICIES = ("seed", "proportional", "need_gap")
NON_PRIVATE = ("seasonal_naive", "last_value", "centralised", "local", "federated")
PRIVATE = ("local_dp", "federated_dp", "dp_series_release")
# A DP method at ε = inf is its non-private twin (dp_series_release handles ε = inf itself).
PLAIN_TWIN = {"local_dp": "local", "federated_dp": "federated"}
METHODS = NON_PRIVATE + PRIVATE
SEASON_WEEKS = 52
BIG = 1e300  # stand-in for an infinite forecast in the allocation core


@dataclass
class Hospitals:
    """Everything the researcher knows: per-hospital training series, truth and resources."""

    names: list[str]
    series: list[pd.DataFrame]  # (periods before cutoff) × groups
    truth: np.ndarray  # true D_i over the horizon
    resources: np.ndarray
    node_configs: list[dict[str, Any]] = field(default_factory=list)
    data_dir: Path | None = None
    resources_file: Path | None = None
    # Generated hospitals get per-run ledgers; a researcher's own files their lifetime ledgers.
    synthetic: bool = False


def run_settings(**overrides: Any) -> RunSettings:
    return RunSettings.from_mapping(overrides)


def load_hospitals(data_dir: Path, run: RunSettings, resources_file: Path | None = None) -> Hospitals:
    """Series (start..cutoff) and true horizon demand of every hospital file in `data_dir`."""
    from simulations.driver import record_files, true_demand

    data_dir = Path(data_dir)
    files = record_files(data_dir)
    names = [f.name.split(".")[0] for f in files]
    configs = [{"data-path": str(f), "hospital": n} for f, n in zip(files, names)]
    series = [
        demand_series(load_records(f), start=run.start, end=run.cutoff, period=run.period, measure=run.measure,
                      los_cap=run.los_cap, groups=run.group_list)
        for f in files
    ]
    truth = true_demand(configs, run).set_index("hospital").loc[names, "true_demand"].to_numpy(dtype=float)
    resources_file = Path(resources_file) if resources_file else data_dir / "hospitals.csv"
    if resources_file.exists():
        from server.runner import read_resources

        table = read_resources(str(resources_file))
        missing = sorted(set(names) - set(table))
        if missing:
            raise ValueError(f"{resources_file}: no resources for hospital(s) {', '.join(missing)}")
        resources = np.array([table[n] for n in names], dtype=float)
    else:
        resources_file = None
        resources = np.ones(len(names))
    return Hospitals(names, series, truth, resources, configs, data_dir, resources_file)


def synthetic_hospitals(out_dir: Path, hospitals: int, seed: int, run: RunSettings) -> Hospitals:
    from core.synthetic import SyntheticConfig, generate

    out_dir = Path(out_dir)
    if not (out_dir / "hospitals.csv").exists():
        generate(SyntheticConfig(hospitals=hospitals, seed=seed, groups=run.group_list), out_dir)
    return dataclasses.replace(load_hospitals(out_dir, run), synthetic=True)


# ---------------------------------------------------------------- naive forecasts


def season_periods(period: str) -> int:
    """Periods in one season (52 weeks, or 364 days: the same weekdays a year earlier)."""
    return SEASON_WEEKS if period == "week" else 7 * SEASON_WEEKS


def seasonal_naive(series: pd.DataFrame | np.ndarray, horizon: int, season: int = SEASON_WEEKS) -> float:
    """Σ of the `horizon` periods exactly one season before the forecast horizon.

    The horizon starts right after the series' last row (index n), so last year's same weeks are
    rows n − season … n − season + horizon − 1.
    """
    values = np.asarray(series, dtype=float)
    n = values.shape[0]
    if n < season:
        raise ValueError(f"seasonal naive needs ≥ {season} periods, the series has {n}")
    return float(values[n - season : n - season + horizon].sum())


def last_value(series: pd.DataFrame | np.ndarray, horizon: int) -> float:
    values = np.asarray(series, dtype=float)
    return float(values[-1].sum() * horizon)


def empirical_interval(series: pd.DataFrame | np.ndarray, horizon: int, forecast: Callable[[np.ndarray], float],
                       min_history: int, quantiles: Sequence[float] = (0.1, 0.5, 0.9)) -> np.ndarray:
    """(lo, median, hi) of a naive forecast from its own past relative errors (non-private baselines).

    The forecast is replayed at every earlier origin of the hospital's own series, one horizon
    apart (each origin sees only the rows before it), and the quantiles of true/forecast − 1
    scale today's forecast. NaN when fewer than 8 past origins are available.
    """
    values = np.asarray(series, dtype=float)
    n = values.shape[0]
    ratios = []
    for o in range(n - horizon, min_history - 1, -horizon):
        past = forecast(values[:o])
        if past > 0:
            ratios.append(values[o : o + horizon].sum() / past - 1.0)
    if len(ratios) < 8:
        return np.full(len(quantiles), np.nan)
    point = forecast(values)
    return np.maximum(point * (1.0 + np.quantile(ratios, quantiles)), 0.0)


# ---------------------------------------------------------------- model-based forecasts


def _examples(h: Hospitals, run: RunSettings) -> list[Any]:
    from forecasting.features import training_examples

    return [training_examples(s, run.lags, run.horizon, run.window_stride, blocks=run.release_blocks) for s in h.series]


def _pool(examples: Sequence[Any]) -> Any:
    from forecasting.features import Examples

    return Examples(
        x_log=np.concatenate([e.x_log for e in examples]),
        group=np.concatenate([e.group for e in examples]),
        season=np.concatenate([e.season for e in examples]),
        y_log=np.concatenate([e.y_log for e in examples]),
    )


def _new_model(run: RunSettings) -> Any:
    from forecasting.pretrain import initial_model

    return initial_model(run)


def forecast_total(model: Any, series: pd.DataFrame, run: RunSettings, noise_std: float = 0.0,
                   rng: np.random.Generator | None = None) -> float:
    """D_i from the last `lags` periods (optionally noised exactly as a node releases it)."""
    from client.dp_training import predict_counts
    from forecasting.features import block_means, forecast_inputs, release_window

    window = series.to_numpy(dtype=np.float64)[-run.lags:]
    if noise_std > 0:  # exactly the node's release (client.tasks.predict_task)
        window = release_window(window, run.release_blocks, noise_std, rng or np.random.default_rng())
    else:
        window = block_means(window, run.release_blocks, axis=0)
    first_target = series.index[-1] + (series.index[-1] - series.index[-2])
    with np.errstate(over="ignore"):  # a diverged model forecasts inf; score() reports it
        return float(predict_counts(model, *forecast_inputs(window, first_target)).sum())


def _train(model: Any, ex: Any, run: RunSettings, epochs: int, seed: int, sigma: float | None = None) -> Any:
    from client.dp_training import train_dp

    return train_dp(model, ex, noise_multiplier=sigma, max_grad_norm=run.clip_norm, batch_size=run.batch_size,
                    epochs=epochs, lr=run.lr, seed=seed)


def centralised(h: Hospitals, run: RunSettings) -> np.ndarray:
    model = _new_model(run)
    _train(model, _pool(_examples(h, run)), run, run.num_server_rounds * run.local_epochs, run.seed)
    return np.array([forecast_total(model, s, run) for s in h.series])


def local(h: Hospitals, run: RunSettings) -> np.ndarray:
    out = []
    for i, (s, ex) in enumerate(zip(h.series, _examples(h, run))):
        model = _new_model(run)
        _train(model, ex, run, run.num_server_rounds * run.local_epochs, run.seed * 1000 + i)
        out.append(forecast_total(model, s, run))
    return np.array(out)


@dataclass(frozen=True)
class LocalDPPlan:
    train_sigma: float
    release_sigma: float
    sample_rate: float
    steps: int
    epsilon: float  # what the whole plan spends (training + release), by the ledger's accountant


def local_dp_plan(n_examples: int, run: RunSettings, delta: float = 1e-5, accountant: str = "rdp") -> LocalDPPlan:
    """The same calibration a federation node makes for a fresh ledger (client.tasks.noise_plan)."""
    return _local_dp_plan(n_examples, run.batch_size, run.local_epochs, run.num_server_rounds, run.epsilon,
                          run.release_share, delta, accountant)


@lru_cache(maxsize=64)
def _local_dp_plan(n_examples: int, batch_size: int, local_epochs: int, rounds: int, epsilon: float,
                   release_share: float, delta: float, accountant: str) -> LocalDPPlan:
    # Cached: the σ search runs the accountant dozens of times, and hospitals with the same
    # (public) number of windows get the same plan.
    from client.calibration import release_sigma, training_sigma
    from client.dp_training import plan_steps
    from client.ledger import Mechanism, compute_epsilon

    plan = plan_steps(n_examples, batch_size, local_epochs)
    rel = release_sigma(epsilon * release_share, delta, accountant)
    steps = plan.steps * rounds
    sigma = training_sigma([], plan.sample_rate, steps, [Mechanism(rel, 1.0, 1, "gaussian-release")],
                           epsilon, delta, accountant)
    eps = compute_epsilon([Mechanism(sigma, plan.sample_rate, steps), Mechanism(rel, 1.0, 1, "gaussian-release")], delta)
    return LocalDPPlan(sigma, rel, plan.sample_rate, steps, eps)


def local_dp(h: Hospitals, run: RunSettings) -> tuple[np.ndarray, np.ndarray]:
    """Each hospital alone under DP at run.epsilon; returns (D_i released, ε spent per node)."""
    if math.isinf(run.epsilon):
        return local(h, run), np.full(len(h.names), math.inf)
    sens = cell_sensitivity(run.measure, run.los_cap)
    preds, eps = [], []
    for i, (s, ex) in enumerate(zip(h.series, _examples(h, run))):
        plan = local_dp_plan(len(ex), run)
        model = _new_model(run)
        used = _train(model, ex, run, run.num_server_rounds * run.local_epochs, run.seed * 1000 + i, plan.train_sigma)
        if used.steps != plan.steps:
            raise RuntimeError(f"local DP: Opacus ran {used.steps} steps, planned {plan.steps}")
        rng = np.random.default_rng([run.seed, i, 7])
        preds.append(forecast_total(model, s, run, plan.release_sigma * sens, rng))
        eps.append(plan.epsilon)
    return np.array(preds), np.array(eps)


def release_series(series: pd.DataFrame, run: RunSettings, rng: np.random.Generator,
                   delta: float = 1e-5) -> tuple[pd.DataFrame, float]:
    """One node's whole series plus N(0, (σΔ)²) per cell, σ one Gaussian release at run.epsilon;
    returns (released series, ε it costs by the ledger's accountant). ε = inf: unchanged, inf."""
    from client.calibration import release_sigma
    from client.ledger import Mechanism, compute_epsilon

    if math.isinf(run.epsilon):
        return series, math.inf
    sigma = release_sigma(run.epsilon, delta)
    noise_std = sigma * cell_sensitivity(run.measure, run.los_cap)
    return (series + rng.normal(0.0, noise_std, size=series.shape),
            compute_epsilon([Mechanism(sigma, 1.0, 1, "gaussian-release")], delta))


def dp_series_release(h: Hospitals, run: RunSettings) -> tuple[np.ndarray, np.ndarray]:
    """(D_i, ε spent per node) of the series-release comparator (module docstring)."""
    from forecasting.features import training_examples

    rng = np.random.default_rng([run.seed, 11])
    released = [release_series(s, run, rng) for s in h.series]
    noisy = [r[0] for r in released]
    # stride 1: every window of the released series (post-processing of one release)
    model = _new_model(run)
    pooled = _pool([training_examples(s, run.lags, run.horizon, 1, blocks=run.release_blocks) for s in noisy])
    _train(model, pooled, run, run.num_server_rounds * run.local_epochs, run.seed)
    preds = np.array([forecast_total(model, s, run) for s in noisy])
    return preds, np.array([r[1] for r in released])


def federated(h: Hospitals, run: RunSettings,
              on_round: Callable[[int, np.ndarray], None] | None = None) -> np.ndarray:
    """Plain FedAvg without DP: each round every node trains local-epochs from the global model,
    the coordinator averages the weights (weighted by number of examples, as Flower's FedAvg)."""
    import torch

    examples = _examples(h, run)
    weights = np.array([len(e) for e in examples], dtype=float)
    weights = weights / weights.sum()
    global_model = _new_model(run)
    for r in range(1, run.num_server_rounds + 1):
        states = []
        for i, ex in enumerate(examples):
            model = _new_model(run)
            model.load_state_dict(global_model.state_dict())
            _train(model, ex, run, run.local_epochs, run.seed * 100003 + r * 1000 + i)
            states.append(model.state_dict())
        avg = {k: sum(float(w) * st[k].to(torch.float64) for w, st in zip(weights, states)).to(states[0][k].dtype)
               for k in states[0]}
        global_model.load_state_dict(avg)
        if on_round:
            on_round(r, np.array([forecast_total(global_model, s, run) for s in h.series]))
    return np.array([forecast_total(global_model, s, run) for s in h.series])


def federated_dp(h: Hospitals, run: RunSettings, results_dir: Path, run_name: str,
                 on_round: Callable[[int, int, dict[str, Any]], None] | None = None) -> tuple[np.ndarray, np.ndarray, Any]:
    """The real federation (in-process Flower grid, per-node ledgers); (D_i, ε per node, outcome)."""
    from simulations.driver import simulate

    if math.isinf(run.epsilon):
        raise ValueError("federated_dp needs a finite ε; ε = inf is the non-private `federated` baseline")
    # Every run-config key except those simulate() sets itself (release-blocks and the rest must
    # reach the nodes: the model is trained on the block structure it is later shown).
    own = {"num-server-rounds", "epsilon", "results-dir", "run-name", "seed", "resources-file"}
    overrides = {k: v for k, v in run.as_config().items() if k not in own}
    outcome = simulate(hospitals=len(h.names), rounds=run.num_server_rounds, epsilon=run.epsilon,
                       data_dir=h.data_dir, resources=h.resources_file, engine="inprocess",
                       results_dir=str(results_dir), run_name=run_name, seed=run.seed, overrides=overrides,
                       on_round=on_round, synthetic_data=h.synthetic)
    if outcome.error or outcome.allocations is None:
        raise RuntimeError(f"federated DP run failed: {outcome.error}")
    table = outcome.allocations.set_index("hospital")
    preds = table.loc[h.names, "demand"].to_numpy(dtype=float)
    eps = np.array([outcome.epsilon.get(n, math.nan) for n in h.names], dtype=float)
    return preds, eps, outcome


# ---------------------------------------------------------------- scoring


def smape(pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Symmetric APE per hospital in percent (0 when both are 0)."""
    pred, true = np.asarray(pred, float), np.asarray(true, float)
    den = np.abs(pred) + np.abs(true)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, 200.0 * np.abs(pred - true) / den, 0.0)
    # a diverged (infinite) forecast of a finite truth is the worst case, 200 %; NaN stays NaN
    return np.where(np.isinf(pred) & np.isfinite(true), 200.0, out)


def _rmse(err: np.ndarray) -> float:
    """RMSE without overflow for huge (diverged but finite) errors: scale by the largest first."""
    top = float(np.max(np.abs(err))) if len(err) else 0.0
    if top == 0.0 or not math.isfinite(top):
        return top
    return top * float(np.sqrt(np.mean((err / top) ** 2)))


def score(pred: np.ndarray, h: Hospitals, total: float = 1000.0,
          policies: Sequence[str] = POLICIES) -> tuple[dict[str, float], pd.DataFrame]:
    """(overall metrics, per-hospital frame) of D_i forecasts `pred` against the truth."""
    pred = np.asarray(pred, dtype=float)
    true = h.truth
    err = pred - true
    per = pd.DataFrame({"hospital": h.names, "true_demand": true, "pred_demand": pred, "abs_error": np.abs(err),
                        "smape": smape(pred, true), "resources": h.resources})
    overall: dict[str, float] = {
        "mae": float(np.mean(np.abs(err))),
        "rmse": _rmse(err),
        "smape": float(np.mean(per.smape)),
        # signed: Σ over hospitals and origins of signed_error / Σ of true_mean is the bias share
        "signed_error": float(np.mean(err)),
        "true_mean": float(np.mean(true)),
    }
    overall["nonfinite"] = float(np.sum(~np.isfinite(pred)))  # diverged forecasts (inf/NaN)
    # The allocation core rejects negative and non-finite demand: a forecast < 0 means 0, and a
    # diverged one (inf) is allocated as a huge finite demand, so it still takes (almost) everything.
    safe = np.minimum(np.nan_to_num(np.clip(pred, 0, None), nan=0.0, posinf=BIG), BIG)
    for policy in policies:
        a_true = allocate_array(true, h.resources, total, policy)
        a_pred = allocate_array(safe, h.resources, total, policy)
        per[f"alloc_true_{policy}"] = a_true
        per[f"alloc_pred_{policy}"] = a_pred
        overall[f"alloc_error_{policy}"] = allocation_error(a_pred, a_true, total)
        ft, fp = fairness_summary(a_true, true), fairness_summary(a_pred, true)
        overall[f"gini_true_{policy}"] = ft["gini"]
        overall[f"gini_pred_{policy}"] = fp["gini"]
        overall[f"jain_true_{policy}"] = ft["jain"]
        overall[f"jain_pred_{policy}"] = fp["jain"]
    return overall, per


@dataclass
class MethodResult:
    method: str
    epsilon: float  # the run's ε target (inf for non-private methods)
    pred: np.ndarray
    eps_spent: np.ndarray  # per node (inf: non-private)
    overall: dict[str, float] = field(default_factory=dict)
    per_hospital: pd.DataFrame | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)
    # (n, 3) released 80 % interval per hospital: lo, median, hi (None: the method has none)
    interval: np.ndarray | None = None


def evaluate(method: str, pred: np.ndarray, eps_spent: np.ndarray, epsilon: float, h: Hospitals,
             total: float, rounds: list[dict[str, Any]] | None = None) -> MethodResult:
    overall, per = score(pred, h, total)
    per.insert(1, "epsilon_spent", eps_spent)
    overall["epsilon_spent_max"] = float(np.max(eps_spent)) if len(eps_spent) else math.nan
    return MethodResult(method, epsilon, np.asarray(pred), np.asarray(eps_spent), overall, per, rounds or [])


def run_non_private(h: Hospitals, run: RunSettings,
                    methods: Sequence[str] = NON_PRIVATE) -> list[MethodResult]:
    """The baselines that do not depend on ε (computed once per seed and origin)."""
    inf = np.full(len(h.names), math.inf)
    out = []
    for m in methods:
        rounds: list[dict[str, Any]] = []
        interval = None
        if m == "seasonal_naive":
            season = season_periods(run.period)
            pred = np.array([seasonal_naive(s, run.horizon, season) for s in h.series])
            interval = np.array([empirical_interval(s, run.horizon, lambda v: seasonal_naive(v, run.horizon, season),
                                                    season) for s in h.series])
        elif m == "last_value":
            pred = np.array([last_value(s, run.horizon) for s in h.series])
            interval = np.array([empirical_interval(s, run.horizon, lambda v: last_value(v, run.horizon), 1)
                                 for s in h.series])
        elif m == "centralised":
            pred = centralised(h, run)
        elif m == "local":
            pred = local(h, run)
        elif m == "federated":
            def cb(r: int, p: np.ndarray) -> None:
                rounds.append({"round": r, "mae": float(np.mean(np.abs(p - h.truth)))})
            pred = federated(h, run, on_round=cb)
        else:
            raise ValueError(f"unknown non-private method {m!r}; known: {', '.join(NON_PRIVATE)}")
        out.append(evaluate(m, pred, inf, math.inf, h, run.total, rounds))
        if interval is not None and np.isfinite(interval).all():
            out[-1].interval = interval
    return out


def run_private(h: Hospitals, run: RunSettings, results_dir: Path, run_name: str,
                methods: Sequence[str] = PRIVATE,
                on_round: Callable[[int, int, dict[str, Any]], None] | None = None) -> list[MethodResult]:
    """local_dp and federated_dp at run.epsilon (at ε = inf they are local and federated)."""
    out = []
    for m in methods:
        if m == "local_dp":
            pred, eps = local_dp(h, run)
            out.append(evaluate(m, pred, eps, run.epsilon, h, run.total))
        elif m == "dp_series_release":
            pred, eps = dp_series_release(h, run)
            out.append(evaluate(m, pred, eps, run.epsilon, h, run.total))
        elif m == "federated_dp":
            if math.isinf(run.epsilon):
                rounds: list[dict[str, Any]] = []
                pred = federated(h, run, on_round=lambda r, p: rounds.append(
                    {"round": r, "mae": float(np.mean(np.abs(p - h.truth)))}))
                out.append(evaluate(m, pred, np.full(len(h.names), math.inf), run.epsilon, h, run.total, rounds))
            else:
                pred, eps, outcome = federated_dp(h, run, results_dir, run_name, on_round=on_round)
                out.append(evaluate(m, pred, eps, run.epsilon, h, run.total, list(outcome.rounds)))
                cols = ["demand_lo", "demand_median", "demand_hi"]
                if set(cols) <= set(outcome.allocations.columns):  # the nodes' released intervals
                    out[-1].interval = outcome.allocations.set_index("hospital").loc[h.names, cols].to_numpy(float)
        else:
            raise ValueError(f"unknown private method {m!r}; known: {', '.join(PRIVATE)}")
    return out


def summary_table(results: Sequence[MethodResult]) -> pd.DataFrame:
    rows = [{"method": r.method, "epsilon": r.epsilon, **r.overall} for r in results]
    return pd.DataFrame(rows)
