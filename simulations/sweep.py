"""The privacy–utility sweep: ε grid × seeds × forecast origins, every method on the same hospitals.

For each seed the synthetic hospitals are generated once (deterministic by seed) and every method
sees the same files. Rolling-origin backtest: with `origins = K` every method is evaluated at K
forecast origins, the last at the run's `cutoff`, each one `horizon` periods before the next; at
each origin every method sees only the series before it (the origin is the run's public cutoff),
and the federation is a fresh one (a new run, fresh per-run ledgers for generated hospitals).
Non-private baselines do not depend on ε and run once per (seed, origin); `local_dp` and
`federated_dp` run at every finite ε. At ε = inf they are, by definition, the non-private `local`
and `federated` baselines, whose results are reused rather than retrained.

Ledgers with `data_dir` (`fedalloc sweep --data DIR`): by default (`ledgers="lifetime"`) each
`federated_dp` run charges every hospital's one lifetime ledger `DIR/ledgers/<hospital>.json`, the
one `simulate --data` and `query --data` use, so a backtest of K origins at ε needs K·ε of each
node's lifetime budget and stops at the first origin its budget refuses. `ledgers="sweep"` treats
the backtest as what it is, a simulation by a researcher who already holds every record: each
federation gets fresh per-run ledgers inside this sweep's own folder
(`<out>/runs/<stamp>/<run>/nodes/ledgers/`, budget = that run's ε), exactly like generated
hospitals, and nothing is charged to (or read from) `DIR/ledgers/`. Its ε is then an accounting of
the simulated nodes only: results released beyond the researcher are not covered by the
hospitals' lifetime ledgers. (`simulate --data` and `query --data` always use the lifetime ledger.)

Every result also gets `rel_mae`: its MAE divided by the better (lower-MAE) of the seasonal naive
and last-value forecasts at the same (seed, origin), computed whether or not those two methods
were asked for; `backtest_summary` averages it over origins and seeds. Methods that give an 80 %
interval (federated DP's released one, the naive forecasts' empirical one) also get `coverage_80`
and `wis` (weighted interval score), and their per-hospital rows `pred_lo/median/hi` and `wis`.

Writes into `out_dir`:
- ``sweep.csv``: tidy, one row per (seed, origin, epsilon, method, metric, value), overall metrics;
- ``per_hospital.csv``: one row per (seed, origin, epsilon, method, hospital) with D_i, errors,
  allocations;
- ``rounds.csv``: per-round records (MAE per round of the non-private FedAvg; ε per round of DP runs);
- ``metrics.json``: mean ± std over seeds and origins of every metric per (method, epsilon), and the
  backtest summary;
- plots (PNG) and ``report.html`` (see simulations.report).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from simulations import baselines as B

EPSILONS = (0.5, 1.0, 3.0, 8.0, math.inf)
SEEDS = (0, 1)
NAIVE = ("seasonal_naive", "last_value")
SUMMARY_METRICS = ("mae", "rel_mae", "alloc_error_seed", "alloc_error_proportional", "alloc_error_need_gap",
                   "coverage_80", "wis")
INTERVAL_ALPHA = 0.2  # the released interval is the central 80 % one
PERIOD_DAYS = {"week": 7, "day": 1}
LEDGERS = ("lifetime", "sweep")


@dataclass
class SweepResult:
    path: Path
    table: pd.DataFrame  # tidy overall metrics
    per_hospital: pd.DataFrame
    rounds: pd.DataFrame
    metrics: dict[str, Any]
    report: Path | None = None


def parse_epsilons(text: str | Sequence[Any]) -> list[float]:
    """'0.5,1,3,8,inf' → [0.5, 1.0, 3.0, 8.0, inf]; every value positive."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out = []
    for item in items:
        s = str(item).strip().lower()
        if not s:
            continue
        v = math.inf if s in ("inf", "infinity", "∞") else float(s)
        if not v > 0:
            raise ValueError(f"ε must be positive, got {item!r}")
        out.append(v)
    if not out:
        raise ValueError("the ε grid is empty")
    return sorted(set(out))


def _eps_label(e: float) -> str:
    return "inf" if math.isinf(e) else f"{e:g}"


def forecast_origins(cutoff: str, origins: int, horizon: int, period: str = "week") -> list[str]:
    """`origins` forecast origins (ISO dates), oldest first, the last at `cutoff`, one horizon apart."""
    if int(origins) != origins or origins < 1:
        raise ValueError(f"origins must be a positive integer, got {origins!r}")
    if period not in PERIOD_DAYS:
        raise ValueError(f"unknown period {period!r}")
    last = pd.Timestamp(cutoff).normalize()
    step = pd.Timedelta(days=horizon * PERIOD_DAYS[period])
    return [str((last - step * (origins - 1 - j)).date()) for j in range(int(origins))]


def with_relative_mae(results: Sequence[B.MethodResult], reference: float) -> None:
    """Add `rel_mae` = MAE / `reference` (the better naive MAE at the same seed and origin)."""
    for res in results:
        mae = res.overall.get("mae", math.nan)
        with np.errstate(all="ignore"):
            res.overall["rel_mae"] = float(mae / reference) if reference > 0 else math.nan


def interval_coverage(lo: np.ndarray, hi: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of true totals inside [lo, hi] (both ends included)."""
    lo, hi, truth = (np.asarray(a, dtype=float) for a in (lo, hi, truth))
    return float(np.mean((lo <= truth) & (truth <= hi))) if len(truth) else math.nan


def weighted_interval_score(lo: np.ndarray, median: np.ndarray, hi: np.ndarray, truth: np.ndarray,
                            alpha: float = INTERVAL_ALPHA) -> np.ndarray:
    """WIS per forecast of one central (1 − α) interval and the median (lower is better).

    Bracher, Ray, Gneiting, Reich (2021), "Evaluating epidemic forecasts in an interval format",
    PLoS Comput Biol 17(2): e1008618, section "The weighted interval score":
      IS_α = (u − l) + (2/α)(l − y)·1{y < l} + (2/α)(y − u)·1{y > u}
      WIS = 1/(K + 1/2) · (w_0·|y − m| + Σ_k w_k·IS_{α_k}),  w_0 = 1/2, w_k = α_k/2
    here with K = 1: WIS = (|y − m|/2 + (α/2)·IS_α) / 1.5, in the units of y (admissions).
    """
    lo, median, hi, y = (np.asarray(a, dtype=float) for a in (lo, median, hi, truth))
    score = (hi - lo) + (2 / alpha) * np.maximum(lo - y, 0.0) + (2 / alpha) * np.maximum(y - hi, 0.0)
    return (0.5 * np.abs(y - median) + (alpha / 2) * score) / 1.5


def with_interval_scores(res: B.MethodResult, truth: np.ndarray) -> None:
    """Add `coverage_80` and `wis` (mean over hospitals) for a method that released intervals,
    and the interval beside each hospital's D_i in `per_hospital`."""
    if res.interval is None:
        return
    lo, med, hi = res.interval.T
    res.overall["coverage_80"] = interval_coverage(lo, hi, truth)
    wis = weighted_interval_score(lo, med, hi, truth)
    res.overall["wis"] = float(np.mean(wis))
    if res.per_hospital is not None:
        res.per_hospital = res.per_hospital.assign(pred_lo=lo, pred_median=med, pred_hi=hi, wis=wis)


def backtest_summary(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (method, epsilon): mean and std over (seed, origin) of MAE, relative MAE,
    allocation errors, 80 % interval coverage and WIS (NaN for methods without intervals; with
    the same hospitals in every cell the mean coverage is the pooled share of hospital-origins),
    the bias as a share of total true demand pooled over hospitals, origins
    and seeds (`bias_pct` = 100·Σ signed error / Σ true demand), the largest ε spent, and how many
    (seed, origin) cells were averaged."""
    rows = []
    order = {m: i for i, m in enumerate(B.METHODS)}
    for (method, eps), grp in table.groupby(["method", "epsilon"], sort=False):
        by = {m: g["value"].to_numpy(dtype=float) for m, g in grp.groupby("metric")}
        row: dict[str, Any] = {"method": method, "epsilon": float(eps)}
        with np.errstate(all="ignore"):
            for m in SUMMARY_METRICS:
                v = by.get(m, np.array([]))
                row[m] = float(np.mean(v)) if len(v) else math.nan
                row[f"{m}_std"] = float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
            signed, true = by.get("signed_error", np.array([])), by.get("true_mean", np.array([]))
            row["bias_pct"] = float(100 * np.sum(signed) / np.sum(true)) if len(true) and np.sum(true) > 0 else math.nan
            spent = by.get("epsilon_spent_max", np.array([]))
            row["epsilon_spent_max"] = float(np.max(spent)) if len(spent) else math.nan
        row["cells"] = int(len(by.get("mae", [])))
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out["_o"] = out.method.map(order).fillna(99)
    return out.sort_values(["_o", "epsilon"]).drop(columns="_o").reset_index(drop=True)


def aggregate(table: pd.DataFrame) -> dict[str, Any]:
    """{"method@eps": {metric: {"mean", "std", "n"}}} over seeds and origins (std with ddof=1, 0 for n = 1)."""
    out: dict[str, Any] = {}
    for (method, eps, metric), grp in table.groupby(["method", "epsilon", "metric"], sort=False):
        v = grp["value"].to_numpy(dtype=float)
        with np.errstate(all="ignore"):  # diverged methods: huge or inf values
            mean, std = float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        key = f"{method}@{_eps_label(float(eps))}"
        out.setdefault(key, {"method": method, "epsilon": _eps_label(float(eps))})[metric] = {
            "mean": mean,
            "std": std,
            "n": int(len(v)),
        }
    return out


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return "inf" if obj > 0 else ("-inf" if obj < 0 else None)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def run_sweep(
    out_dir: str | Path,
    *,
    hospitals: int = 10,
    epsilons: Sequence[float] = EPSILONS,
    seeds: Sequence[int] = SEEDS,
    rounds: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    methods: Sequence[str] = B.METHODS,
    data_dir: str | Path | None = None,
    report: bool = True,
    on_step: Callable[[str], None] | None = None,
    origins: int = 1,
    ledgers: str = "lifetime",
) -> SweepResult:
    """Run the grid and write the tidy CSV, metrics.json and (with report=True) plots + HTML.

    Torch runs single-threaded for the duration: the models are tiny, and on a shared machine
    intra-op threads spin against each other (measured: 25× slower local training with 2 threads
    under load). The previous thread count is restored afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_sweep(out_dir, hospitals=hospitals, epsilons=epsilons, seeds=seeds, rounds=rounds,
                          overrides=overrides, methods=methods, data_dir=data_dir, report=report, on_step=on_step,
                          origins=origins, ledgers=ledgers)
    finally:
        torch.set_num_threads(threads)


class _Recorder:
    """The sweep's tidy rows (sweep.csv), per-hospital rows and per-round rows."""

    def __init__(self) -> None:
        self.tidy: list[dict[str, Any]] = []
        self.per_rows: list[pd.DataFrame] = []
        self.round_rows: list[dict[str, Any]] = []

    def record(self, seed: int, origin: str, res: B.MethodResult, eps: float) -> None:
        key = {"seed": seed, "origin": origin, "epsilon": eps, "method": res.method}
        self.tidy += [{**key, "metric": metric, "value": value} for metric, value in res.overall.items()]
        self.per_rows.append(res.per_hospital.assign(**key))
        for rec in res.rounds:
            self.round_rows.append({**key, "round": rec.get("round"),
                                    **{k: rec[k] for k in ("mae", "mean_epsilon", "ok", "asked", "seconds") if k in rec}})

    def frames(self) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
        table = pd.DataFrame(self.tidy, columns=["seed", "origin", "epsilon", "method", "metric", "value"])
        per = pd.concat(self.per_rows, ignore_index=True) if self.per_rows else pd.DataFrame()
        return table, per, pd.DataFrame(self.round_rows)


def _run_sweep(
    out_dir: str | Path,
    *,
    hospitals: int,
    epsilons: Sequence[float],
    seeds: Sequence[int],
    rounds: int | None,
    overrides: Mapping[str, Any] | None,
    methods: Sequence[str],
    data_dir: str | Path | None,
    report: bool,
    on_step: Callable[[str], None] | None,
    origins: int,
    ledgers: str = "lifetime",
) -> SweepResult:
    if ledgers not in LEDGERS:
        raise ValueError(f"ledgers {ledgers!r} is not allowed; choose one of {', '.join(LEDGERS)}")
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    epsilons = parse_epsilons(list(epsilons))
    unknown = sorted(set(methods) - set(B.METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(B.METHODS)}")
    step = on_step or (lambda msg: None)
    rec = _Recorder()
    # every sweep gets its own folder of federation runs: run names are never reused
    runs_dir = out / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    dates: list[str] = []
    for seed in seeds:
        settings = {**(overrides or {}), "seed": int(seed)}
        if rounds is not None:
            settings["num-server-rounds"] = int(rounds)
        base_run = B.run_settings(**settings)
        dates = forecast_origins(base_run.cutoff, origins, base_run.horizon, base_run.period)
        for origin in dates:
            at = {**settings, "cutoff": origin}
            h = _hospitals_at(B.run_settings(**at), data_dir, ledgers, out, hospitals, int(seed))
            for res, eps in _evaluate_cell(h, at, seed, origin, epsilons, methods, runs_dir, step):
                rec.record(seed, origin, res, eps)
    table, per, rounds_df = rec.frames()
    config = {"hospitals": hospitals if data_dir is None else len(per.hospital.unique()),
              "epsilons": list(epsilons), "seeds": list(seeds), "rounds": rounds, "origins": dates,
              "methods": list(methods), "overrides": dict(overrides or {}),
              "data": str(Path(data_dir).resolve()) if data_dir is not None else None,
              "ledgers": (ledgers if data_dir is not None else "sweep")}
    result = _write_sweep(out, table, per, rounds_df, config)
    if report:
        from simulations.report import make_report

        step("report")
        result.report = make_report(out)
    return result


def _hospitals_at(base: Any, data_dir: str | Path | None, ledgers: str, out: Path, hospitals: int,
                  seed: int) -> B.Hospitals:
    if data_dir is not None:
        h = B.load_hospitals(Path(data_dir), base)
        if ledgers == "sweep":  # a backtest is a simulation: per-run ledgers in this sweep's folder
            h = dataclasses.replace(h, synthetic=True)
        return h
    return B.synthetic_hospitals(out / "data" / f"seed{seed}", hospitals, seed, base)


def _evaluate_cell(h: B.Hospitals, at: dict[str, Any], seed: int, origin: str, epsilons: Sequence[float],
                   methods: Sequence[str], runs_dir: Path,
                   step: Callable[[str], None]) -> list[tuple[B.MethodResult, float]]:
    """Every asked method (and ε) at one (seed, origin), with relative MAE and interval scores."""
    base = B.run_settings(**at)
    non_private = [m for m in B.NON_PRIVATE if m in methods]
    private = [m for m in B.PRIVATE if m in methods]
    where = f"seed {seed}, origin {origin}"
    # the reference of rel_mae: the better naive forecast at this (seed, origin)
    naive_ok = [m for m in NAIVE if m != "seasonal_naive" or len(h.series[0]) >= B.season_periods(base.period)]
    naive = {r.method: r for r in B.run_non_private(h, base, naive_ok)}
    reference = min(r.overall["mae"] for r in naive.values())
    # `local` and `federated` are needed for ε = inf of their DP versions even if not asked for
    needed = list(non_private)
    if math.inf in epsilons:
        needed += [plain for dp, plain in B.PLAIN_TWIN.items() if dp in private and plain not in needed]
    cell: list[tuple[B.MethodResult, float]] = []
    plain_results: dict[str, B.MethodResult] = {}
    for m in needed:
        step(f"{where}: {m}")
        plain_results[m] = naive[m] if m in naive else B.run_non_private(h, base, [m])[0]
        if m in non_private:
            cell.append((plain_results[m], math.inf))
    for eps in epsilons:
        for m in private:
            step(f"{where}: {m} at ε={_eps_label(eps)}")
            if math.isinf(eps) and m in B.PLAIN_TWIN:
                src = plain_results[B.PLAIN_TWIN[m]]
                res = B.MethodResult(m, eps, src.pred, src.eps_spent, dict(src.overall), src.per_hospital.copy(),
                                     list(src.rounds))
            else:
                # ε = inf is no run-config value (nodes refuse it); only the series release takes it
                run = (dataclasses.replace(base, epsilon=math.inf) if math.isinf(eps)
                       else B.run_settings(**{**at, "epsilon": eps}))
                res = B.run_private(h, run, runs_dir, f"seed{seed}-{origin}-eps{_eps_label(eps)}", [m])[0]
            cell.append((res, eps))
    with_relative_mae([res for res, _ in cell], reference)
    for res, _ in cell:
        with_interval_scores(res, h.truth)
    return cell


def _write_sweep(out: Path, table: pd.DataFrame, per: pd.DataFrame, rounds_df: pd.DataFrame,
                 config: dict[str, Any]) -> SweepResult:
    table.to_csv(out / "sweep.csv", index=False)
    per.to_csv(out / "per_hospital.csv", index=False)
    rounds_df.to_csv(out / "rounds.csv", index=False)
    metrics = {"config": _json_safe(config), "results": _json_safe(aggregate(table)),
               "backtest": _json_safe(backtest_summary(table).to_dict(orient="records"))}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    return SweepResult(out, table, per, rounds_df, metrics)
