"""Accuracy of federated DP vs the baselines: synthetic hospitals, ε = 3, rolling forecast origins.

    /work/venv/bin/python benchmarks/bench_accuracy.py [--hospitals 10] [--epsilon 3] [--seed 0]
        [--origins 1] [--run-config "lags=52 release-blocks=13 lr=0.01"] [--out DIR]

Prints, over the origins (the last at the cutoff, one horizon apart), every method's MAE, MAE
relative to the better of the seasonal naive and last-value forecasts at the same origin, sMAPE,
allocation error (seed policy), bias (Σ(D̂ − D)/Σ D) and the ε each private method spent per
node, then the same errors on the smallest half of the hospitals.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from simulations import baselines as B  # noqa: E402
from simulations.sweep import NAIVE, backtest_summary, forecast_origins, with_relative_mae  # noqa: E402


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hospitals", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=None, help="default: the run-config default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--origins", type=int, default=1, help="forecast origins, the last at the cutoff")
    ap.add_argument("--run-config", default="", help='more run-config keys, e.g. "lags=52 release-blocks=13"')
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models, shared machine)")
    args = ap.parse_args(argv)
    import torch

    from fedalloc.commands_sim import parse_run_config

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    settings = {**parse_run_config(args.run_config), "epsilon": args.epsilon, "seed": args.seed}
    if args.rounds:
        settings["num-server-rounds"] = args.rounds
    run = B.run_settings(**settings)
    t0 = time.monotonic()
    rows, per_rows, small_rows = [], [], []
    for origin in forecast_origins(run.cutoff, args.origins, run.horizon, run.period):
        at = B.run_settings(**{**settings, "cutoff": origin})
        h = B.synthetic_hospitals(out / "data", args.hospitals, args.seed, at)
        results = B.run_non_private(h, at)
        results += B.run_private(h, at, out / "runs", f"federated-dp-{origin}")
        reference = min(r.overall["mae"] for r in results if r.method in NAIVE)
        with_relative_mae(results, reference)
        small = np.argsort(h.truth)[: len(h.truth) // 2]
        for r in results:
            for metric, value in r.overall.items():
                rows.append({"seed": args.seed, "origin": origin, "epsilon": r.epsilon, "method": r.method,
                             "metric": metric, "value": value})
            per_rows.append(r.per_hospital.assign(origin=origin, method=r.method))
            e = np.abs(r.pred - h.truth)[small]
            small_rows.append({"origin": origin, "method": r.method, "mae_small": float(e.mean()),
                               "smape_small": float(B.smape(r.pred, h.truth)[small].mean())})
    seconds = time.monotonic() - t0
    table = pd.DataFrame(rows)
    summary = backtest_summary(table)
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"{args.hospitals} synthetic hospitals (seed {args.seed}), ε = {args.epsilon}, rounds = {run.num_server_rounds}, "
          f"local-epochs = {run.local_epochs}, lags = {run.lags}, release-blocks = {run.release_blocks}, "
          f"lr = {run.lr}, horizon = {run.horizon} {run.period}s, {args.origins} origin(s) ending {run.cutoff}; "
          f"{seconds:.0f} s")
    smape = table[table.metric == "smape"].groupby(["method", "epsilon"]).value.mean().rename("smape")
    summary = summary.merge(smape.reset_index(), on=["method", "epsilon"], how="left")
    cols = ["method", "epsilon", "mae", "rel_mae", "smape", "alloc_error_seed", "alloc_error_need_gap", "bias_pct",
            "epsilon_spent_max"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(summary[cols].to_string(index=False))
    print("\nsmallest half of the hospitals by true D_i at each origin (mean over origins):")
    with pd.option_context("display.float_format", "{:.4g}".format):
        print(pd.DataFrame(small_rows).groupby("method", sort=False)[["mae_small", "smape_small"]].mean().to_string())
    pd.concat(per_rows).to_csv(out / "per_hospital.csv", index=False)
    table.to_csv(out / "sweep.csv", index=False)
    summary.to_csv(out / "summary.csv", index=False)
    print(f"\nper-hospital CSV: {out / 'per_hospital.csv'}")
    return summary


if __name__ == "__main__":
    main()
