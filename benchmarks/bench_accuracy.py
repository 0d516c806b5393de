"""Accuracy of federated DP vs the baselines: 10 synthetic hospitals, ε = 3, default rounds.

    /work/venv/bin/python benchmarks/bench_accuracy.py [--hospitals 10] [--epsilon 3] [--seed 0] [--out DIR]

Prints MAE / RMSE / sMAPE of D_i and the allocation error (seed policy) for every method, the
ε each private method spent per node, and a comparison on the smallest half of the hospitals.
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


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hospitals", type=int, default=10)
    ap.add_argument("--epsilon", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=None, help="default: the run-config default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: tiny models, shared machine)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench-accuracy-"))
    settings = {"epsilon": args.epsilon, "seed": args.seed}
    if args.rounds:
        settings["num-server-rounds"] = args.rounds
    run = B.run_settings(**settings)
    t0 = time.monotonic()
    h = B.synthetic_hospitals(out / "data", args.hospitals, args.seed, run)
    results = B.run_non_private(h, run)
    results += B.run_private(h, run, out / "runs", "federated-dp")
    seconds = time.monotonic() - t0
    table = B.summary_table(results)
    cols = ["method", "epsilon", "mae", "rmse", "smape", "alloc_error_seed", "alloc_error_proportional",
            "alloc_error_need_gap", "epsilon_spent_max"]
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"{args.hospitals} synthetic hospitals (seed {args.seed}), ε = {args.epsilon}, rounds = {run.num_server_rounds}, "
          f"local-epochs = {run.local_epochs}, horizon = {run.horizon} weeks after {run.cutoff}; {seconds:.0f} s")
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.float_format", "{:.4g}".format):
        print(table[cols].to_string(index=False))
    # smallest half of the hospitals by true demand
    order = np.argsort(h.truth)
    small = order[: len(order) // 2]
    print(f"\nsmallest half by true D_i: {', '.join(h.names[i] for i in small)}")
    rows = []
    for r in results:
        e = np.abs(r.pred - h.truth)[small]
        rows.append({"method": r.method, "mae_small": float(e.mean()), "smape_small": float(B.smape(r.pred, h.truth)[small].mean())})
    with pd.option_context("display.float_format", "{:.4g}".format):
        print(pd.DataFrame(rows).to_string(index=False))
    per = pd.concat([r.per_hospital.assign(method=r.method) for r in results])
    per.to_csv(out / "per_hospital.csv", index=False)
    table.to_csv(out / "summary.csv", index=False)
    print(f"\nper-hospital CSV: {out / 'per_hospital.csv'}")
    return table


if __name__ == "__main__":
    main()
