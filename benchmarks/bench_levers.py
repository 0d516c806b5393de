"""The forecaster levers of issue #12, one at a time, on a fast stand-in for the federation.

    /work/venv/bin/python benchmarks/bench_levers.py [--seeds 0,1] [--origins 4] [--hospitals 10] [--only NAME,…]

Each configuration is run at every (seed, origin): 10 synthetic hospitals per seed (the sweep's
generator and seeds), origins one horizon apart ending at the cutoff, each with only the series
before it. "Federated DP" here is FedAvg written out in this script over the nodes' examples, with
the real pieces: `client.dp_training.train_dp` (Opacus, Poisson sampling) at the σ a fresh node
calibrates (`simulations.baselines.local_dp_plan`, i.e. `client.calibration` as a black box, for
the same ε, rounds, epochs, batch and release share), and the D_i release through
`forecasting.features.release_window` at the calibrated release σ. No Flower, no ledgers: it measures
the forecaster, not the system (the system's numbers come from `fedalloc sweep`).

Levers (a configuration sets any of them; the rest are the current defaults):
  model    mlp (the former 5,428-parameter MLP) | structured (forecasting.model, ~100 parameters)
  target   week (log1p of each horizon period, the former target) | mean (log1p of the horizon mean)
  clip     clip the noisy block means at 0 before the log (the former release) | signed log (current)
  lags/blocks, pretrain (forecasting.pretrain), rounds, epochs, batch, lr, clip_norm, share (release share), eps

Prints one line per configuration: MAE, relative MAE (mean over (seed, origin) of MAE / the better
of seasonal naive and last value there), allocation error (seed policy) and the naive ones, bias
(Σ(D̂ − D)/Σ D), σ of DP-SGD and of the release. DP noise is drawn fresh: rows vary run to run.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forecasting.features import Examples, block_means, forecast_inputs, horizon_mean_target, release_window, season_features, signed_log1p  # noqa: E402
from core.drg import DRG_GROUPS  # noqa: E402
from core.series import demand_series, make_windows  # noqa: E402
from simulations import baselines as B  # noqa: E402
from simulations.sweep import forecast_origins  # noqa: E402

H = 4
BASE = dict(model="structured", target="mean", clip=False, lags=8, blocks=2, pretrain=False, rounds=5, epochs=2,
            batch=16, lr=0.2, share=0.15, eps=3.0, clip_norm=1.0)
OLD = dict(model="mlp", target="week", clip=True)
Y52 = dict(lags=52, blocks=13)
CONFIGS: dict[str, dict[str, Any]] = {
    "before: MLP, per-week target, clipped release (lags 8)": OLD,
    "structured model, per-week target, clipped release": dict(target="week", clip=True),
    "structured model (fewer parameters)": dict(),
    "structured, lr 0.05": dict(lr=0.05),
    "structured, pretrained, lr 0.01": dict(pretrain=True, lr=0.01),
    "year window (lags 52 / 13 blocks), lr 0.05": dict(**Y52, lr=0.05),
    "year window, pretrained, no DP fine-tuning": dict(**Y52, pretrain=True, rounds=0),
    "year window, pretrained, lr 0.2": dict(**Y52, pretrain=True, lr=0.2),
    "year window, pretrained, lr 0.05": dict(**Y52, pretrain=True, lr=0.05),
    "year window, pretrained, lr 0.01": dict(**Y52, pretrain=True, lr=0.01),
    "year window, pretrained, lr 0.01, batch 24 (q = 1)": dict(**Y52, pretrain=True, lr=0.01, batch=24),
    "year window, pretrained, lr 0.01, 10 rounds × 1 epoch": dict(**Y52, pretrain=True, lr=0.01, rounds=10, epochs=1),
    "year window, pretrained, lr 0.01, release share 0.3": dict(**Y52, pretrain=True, lr=0.01, share=0.3),
    "year window, pretrained, lr 0.01, clipped release": dict(**Y52, pretrain=True, lr=0.01, clip=True),
    "year window, pretrained, lr 0.005": dict(**Y52, pretrain=True, lr=0.005),
    "year window, pretrained, lr 0.01, clip norm 0.5": dict(**Y52, pretrain=True, lr=0.01, clip_norm=0.5),
    "year window, pretrained, lr 0.02, clip norm 0.3": dict(**Y52, pretrain=True, lr=0.02, clip_norm=0.3),
    "year window, pretrained, no DP at all (ε = ∞)": dict(**Y52, pretrain=True, lr=0.01, eps=math.inf),
}


def hospitals(seed: int, n: int) -> tuple[list[pd.DataFrame], np.ndarray]:
    from core.synthetic import SyntheticConfig, end_date, generate_hospital_records, hospital_params

    cfg = SyntheticConfig(hospitals=n, seed=seed)
    series = [demand_series(generate_hospital_records(cfg, i), start=cfg.start, end=end_date(cfg), groups=DRG_GROUPS)
              for i in range(n)]
    return series, np.array([hospital_params(cfg, i).beds for i in range(n)], dtype=float)


def examples(hist: pd.DataFrame, c: dict[str, Any]) -> Examples:
    x, y, meta = make_windows(hist.to_numpy(dtype=np.float64), c["lags"], H)
    y_log = horizon_mean_target(y) if c["target"] == "mean" else np.log1p(y).astype(np.float32)
    return Examples(signed_log1p(block_means(x, c["blocks"], axis=1)), meta[:, 1].astype(np.int64),
                    season_features(hist.index[meta[:, 0] + c["lags"]]), y_log)


def new_model(c: dict[str, Any], run: Any) -> Any:
    import torch

    from forecasting.model import Forecaster
    from forecasting.pretrain import initial_model

    if c["model"] == "mlp":
        torch.manual_seed(run.seed)
        return Forecaster(c["lags"], H, len(DRG_GROUPS))
    return initial_model(run, hospitals=None if c["pretrain"] else 0)


def fedavg(model: Any, exs: list[Examples], c: dict[str, Any], sigma: float | None) -> None:
    from client.dp_training import train_dp

    w = np.array([len(e) for e in exs], dtype=float)
    w /= w.sum()
    for _ in range(c["rounds"]):
        states = []
        for e in exs:
            m = copy.deepcopy(model)
            train_dp(m, e, noise_multiplier=sigma, max_grad_norm=c["clip_norm"], batch_size=c["batch"], epochs=c["epochs"],
                     lr=c["lr"], seed=None)
            states.append(m.state_dict())
        model.load_state_dict({k: sum(float(wi) * s[k] for wi, s in zip(w, states)) for k in states[0]})


def forecast(model: Any, hist: pd.DataFrame, c: dict[str, Any], noise_std: float, rng: np.random.Generator) -> float:
    from client.dp_training import predict_counts

    window = hist.to_numpy(dtype=np.float64)[-c["lags"]:]
    w = release_window(window, c["blocks"], noise_std, rng) if noise_std > 0 else block_means(window, c["blocks"], axis=0)
    if c["clip"]:
        w = np.clip(w, 0, None)
    return float(predict_counts(model, *forecast_inputs(w, hist.index[-1] + pd.Timedelta(weeks=1))).sum())


def evaluate(c: dict[str, Any], seeds: list[int], n_origins: int, n_hospitals: int) -> dict[str, float]:
    rows = []
    for seed in seeds:
        series, beds = hospitals(seed, n_hospitals)
        for origin in forecast_origins("2025-12-01", n_origins, H):
            run = B.run_settings(**{"lags": c["lags"], "release-blocks": c["blocks"], "cutoff": origin, "seed": seed,
                                    "lr": c["lr"], "batch-size": c["batch"], "release-share": c["share"],
                                    "num-server-rounds": max(c["rounds"], 1), "local-epochs": c["epochs"],
                                    "epsilon": 3.0 if math.isinf(c["eps"]) else c["eps"]})
            hs = [s.loc[s.index < origin] for s in series]
            truth = np.array([s.loc[s.index >= origin].iloc[:H].to_numpy().sum() for s in series])
            exs = [examples(h, c) for h in hs]
            model = new_model(c, run)
            if math.isinf(c["eps"]):
                sigma, rel = None, 0.0
            else:
                plan = B.local_dp_plan(len(exs[0]), run)
                sigma, rel = plan.train_sigma, plan.release_sigma
            fedavg(model, exs, c, sigma)
            rng = np.random.default_rng()
            pred = np.array([forecast(model, h, c, rel, rng) for h in hs])
            sn = np.array([B.seasonal_naive(h, H) for h in hs])
            lv = np.array([B.last_value(h, H) for h in hs])
            best = min(np.mean(np.abs(sn - truth)), np.mean(np.abs(lv - truth)))
            a_true = B.allocate_array(truth, beds, 1000.0, "seed")

            def alloc(p: np.ndarray) -> float:
                safe = np.minimum(np.nan_to_num(np.clip(p, 0, None), nan=0.0, posinf=B.BIG), B.BIG)
                return B.allocation_error(B.allocate_array(safe, beds, 1000.0, "seed"), a_true, 1000.0)

            rows.append(dict(mae=np.mean(np.abs(pred - truth)), rel=np.mean(np.abs(pred - truth)) / best,
                             signed=np.sum(pred - truth), true=np.sum(truth), ae=alloc(pred), ae_sn=alloc(sn),
                             ae_lv=alloc(lv), sigma=sigma or 0.0, rel_sigma=rel))
    df = pd.DataFrame(rows)
    return dict(mae=df.mae.mean(), rel_mae=df.rel.mean(), alloc=df.ae.mean(), alloc_sn=df.ae_sn.mean(),
                alloc_lv=df.ae_lv.mean(), bias_pct=100 * df.signed.sum() / df.true.sum(), sigma=df.sigma.mean(),
                release_sigma=df.rel_sigma.mean(), cells=len(df))


def main(argv: list[str] | None = None) -> pd.DataFrame:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--origins", type=int, default=4)
    ap.add_argument("--hospitals", type=int, default=10)
    ap.add_argument("--only", default="", help="comma-separated substrings of configuration names")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    seeds = [int(s) for s in args.seeds.split(",")]
    wanted = [w.strip() for w in args.only.split(",") if w.strip()]
    out = []
    print(f"seeds {seeds}, {args.origins} origins ending 2025-12-01, {args.hospitals} hospitals, ε = 3 unless said")
    for name, over in CONFIGS.items():
        if wanted and not any(w in name for w in wanted):
            continue
        c = {**BASE, **over}
        t0 = time.monotonic()
        r = evaluate(c, seeds, args.origins, args.hospitals)
        out.append({"config": name, **r, "seconds": time.monotonic() - t0})
        print(f"{name:58s} MAE {r['mae']:6.1f}  rel {r['rel_mae']:.3f}  alloc {r['alloc']:.4f} "
              f"(naive {r['alloc_sn']:.4f}/{r['alloc_lv']:.4f})  bias {r['bias_pct']:+.2f} %  "
              f"σ {r['sigma']:.2f}  σ_rel {r['release_sigma']:.2f}  [{time.monotonic() - t0:.0f} s]", flush=True)
    return pd.DataFrame(out)


if __name__ == "__main__":
    main()
