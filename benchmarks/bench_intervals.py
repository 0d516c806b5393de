"""Which public cohort calibrates D_i's 80 % interval (benchmarks/FORECASTER.md, "Intervals").

A fast stand-in for the sweep: the public pretrained model (no DP fine-tuning), the real release
(Gaussian noise on the 13 block sums at the release σ of ε = 3, 7.75) and the real interval code,
on the sweep's hospitals (generator seeds 0, 1, 2, 10 hospitals each) at its 8 origins. Each
row calibrates on another public cohort:

    python benchmarks/bench_intervals.py

No private data: the cohorts are public synthetic hospitals; the evaluation hospitals are the
sweep's synthetic ones.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from core.drg import DRG_GROUPS
from core.run_config import RunSettings
from core.series import demand_series
from core.synthetic import SyntheticConfig, generate_hospital_records
from forecasting import intervals as I
from forecasting.features import block_means, release_window, season_features
from forecasting.pretrain import PUBLIC_SEED, initial_model, public_series

RELEASE_STD = 7.75  # σ·Δ of the D_i release at ε = 3, release share 0.15 (FORECASTER.md)
COHORTS = {  # name → (public seed, hospitals)
    "pretraining cohort itself (in sample), 20": (PUBLIC_SEED, 20),
    "held-out seed +1, 20": (PUBLIC_SEED + 1, 20),
    "held-out seed +2, 20": (PUBLIC_SEED + 2, 20),
    "held-out seed +1, 40 (shipped)": (PUBLIC_SEED + 1, 40),
}


def calibration(model: torch.nn.Module, run: RunSettings, seed: int, hospitals: int) -> I.Calibration:
    windows, dates, truth = [], [], []
    for s in public_series(run, hospitals=hospitals, seed=seed):
        v = s.to_numpy(float)
        for end in range(run.lags, len(v) - run.horizon + 1, run.horizon):
            windows.append(block_means(v[end - run.lags : end], run.release_blocks, axis=0))
            dates.append(s.index[end])
            truth.append(v[end : end + run.horizon].sum())
    pred = I.cohort_forecasts(model, np.stack(windows), season_features(pd.DatetimeIndex(dates)))
    return I.fit_calibration(pred, np.array(truth))


def evaluate(model: torch.nn.Module, run: RunSettings, cals: dict[str, I.Calibration]) -> pd.DataFrame:
    rows = []
    for seed in (0, 1, 2):
        cfg = SyntheticConfig(hospitals=10, seed=seed)
        for i in range(10):
            ser = demand_series(generate_hospital_records(cfg, i), start=run.start, end="2026-01-01", period="week",
                                measure="admissions", los_cap=30, groups=DRG_GROUPS)
            v = ser.to_numpy(float)
            for k in range(8):
                cut = pd.Timestamp(run.cutoff) - pd.Timedelta(weeks=run.horizon * k)
                end = ser.index.get_loc(cut)
                rng = np.random.default_rng(100 * seed + 10 * i + k)
                win = release_window(v[end - run.lags : end], run.release_blocks, RELEASE_STD, rng)
                point = I.cohort_forecasts(model, win[None], season_features(pd.DatetimeIndex([cut])))[0]
                var = I.release_variance(model, cut, len(DRG_GROUPS), run.release_blocks, RELEASE_STD)
                y = v[end : end + run.horizon].sum()
                row = {"size": point}
                for name, cal in cals.items():
                    iv = I.interval(point, var, cal)
                    row[name] = float(iv.lo <= y <= iv.hi)
                    row[name + " width"] = (iv.hi - iv.lo) / max(point, 1e-9)
                rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    torch.set_num_threads(1)
    run = RunSettings.from_mapping({})
    model = initial_model(run)
    cals = {name: calibration(model, run, seed, n) for name, (seed, n) in COHORTS.items()}
    df = evaluate(model, run, cals)
    df["third"] = pd.qcut(df["size"], 3, labels=["small", "mid", "large"])
    print(f"{len(df)} hospital-origins; coverage of the 80 % interval, mean relative width, by size third")
    for name, cal in cals.items():
        by = df.groupby("third", observed=True)[name].mean()
        print(f"{name:42s} cover {df[name].mean():.3f}  width {df[name + ' width'].mean():.3f}  "
              f"small/mid/large {by['small']:.2f}/{by['mid']:.2f}/{by['large']:.2f}  "
              f"a={cal.a:.3g} b={cal.b:.3g} z={tuple(round(z, 2) for z in cal.z)}")


if __name__ == "__main__":
    main()
