"""The privacy–utility sweep: ε grid × seeds, every method on the same hospitals per seed.

For each seed the synthetic hospitals are generated once (deterministic by seed) and every method
sees the same files. Non-private baselines do not depend on ε and run once per seed; `local_dp`
and `federated_dp` run at every finite ε. At ε = inf they are, by definition, the non-private
`local` and `federated` baselines, whose results are reused rather than retrained.

Writes into `out_dir`:
- ``sweep.csv``: tidy, one row per (seed, epsilon, method, metric, value), overall metrics;
- ``per_hospital.csv``: one row per (seed, epsilon, method, hospital) with D_i, errors, allocations;
- ``rounds.csv``: per-round records (MAE per round of the non-private FedAvg; ε per round of DP runs);
- ``metrics.json``: mean ± std over seeds of every metric per (method, epsilon);
- plots (PNG) and ``report.html`` (see simulations.report).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from simulations import baselines as B

EPSILONS = (0.5, 1.0, 3.0, 8.0, math.inf)
SEEDS = (0, 1)


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


def aggregate(table: pd.DataFrame) -> dict[str, Any]:
    """{"method@eps": {metric: {"mean", "std", "n"}}} over seeds (std with ddof=1, 0 for n = 1)."""
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
                          overrides=overrides, methods=methods, data_dir=data_dir, report=report, on_step=on_step)
    finally:
        torch.set_num_threads(threads)


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
) -> SweepResult:
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    epsilons = parse_epsilons(list(epsilons))
    unknown = sorted(set(methods) - set(B.METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(B.METHODS)}")
    non_private = [m for m in B.NON_PRIVATE if m in methods]
    private = [m for m in B.PRIVATE if m in methods]
    tidy: list[dict[str, Any]] = []
    per_rows: list[pd.DataFrame] = []
    round_rows: list[dict[str, Any]] = []

    def record(seed: int, res: B.MethodResult, eps: float) -> None:
        for metric, value in res.overall.items():
            tidy.append({"seed": seed, "epsilon": eps, "method": res.method, "metric": metric, "value": value})
        per_rows.append(res.per_hospital.assign(seed=seed, epsilon=eps, method=res.method))
        for rec in res.rounds:
            row = {"seed": seed, "epsilon": eps, "method": res.method, "round": rec.get("round")}
            for k in ("mae", "mean_epsilon", "ok", "asked", "seconds"):
                if k in rec:
                    row[k] = rec[k]
            round_rows.append(row)

    def step(msg: str) -> None:
        if on_step:
            on_step(msg)

    for seed in seeds:
        settings = {**(overrides or {}), "seed": int(seed)}
        if rounds is not None:
            settings["num-server-rounds"] = int(rounds)
        base_run = B.run_settings(**settings)
        if data_dir is not None:
            h = B.load_hospitals(Path(data_dir), base_run)
        else:
            h = B.synthetic_hospitals(out / "data" / f"seed{seed}", hospitals, int(seed), base_run)
        # `local` and `federated` are needed for ε = inf of their DP versions even if not asked for
        needed = list(non_private)
        if math.inf in epsilons:
            for dp, plain in (("local_dp", "local"), ("federated_dp", "federated")):
                if dp in private and plain not in needed:
                    needed.append(plain)
        plain_results: dict[str, B.MethodResult] = {}
        for m in needed:
            step(f"seed {seed}: {m}")
            res = B.run_non_private(h, base_run, [m])[0]
            plain_results[m] = res
            if m in non_private:
                record(seed, res, math.inf)
        for eps in epsilons:
            for m in private:
                step(f"seed {seed}: {m} at ε={_eps_label(eps)}")
                if math.isinf(eps):
                    src = plain_results["local" if m == "local_dp" else "federated"]
                    res = B.MethodResult(m, eps, src.pred, src.eps_spent, dict(src.overall),
                                         src.per_hospital.copy(), list(src.rounds))
                else:
                    run = B.run_settings(**{**settings, "epsilon": eps})
                    res = B.run_private(h, run, out / "runs", f"seed{seed}-eps{_eps_label(eps)}", [m])[0]
                record(seed, res, eps)

    table = pd.DataFrame(tidy, columns=["seed", "epsilon", "method", "metric", "value"])
    per = pd.concat(per_rows, ignore_index=True) if per_rows else pd.DataFrame()
    rounds_df = pd.DataFrame(round_rows)
    table.to_csv(out / "sweep.csv", index=False)
    per.to_csv(out / "per_hospital.csv", index=False)
    rounds_df.to_csv(out / "rounds.csv", index=False)
    metrics = {
        "config": _json_safe({"hospitals": hospitals if data_dir is None else len(per.hospital.unique()),
                              "epsilons": list(epsilons), "seeds": list(seeds), "rounds": rounds,
                              "methods": list(methods), "overrides": dict(overrides or {})}),
        "results": _json_safe(aggregate(table)),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    result = SweepResult(out, table, per, rounds_df, metrics)
    if report:
        from simulations.report import make_report

        step("report")
        result.report = make_report(out)
    return result
