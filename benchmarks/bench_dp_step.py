"""DP-SGD step time vs the same non-private step, default forecaster, batch sizes 64–1024.

    /work/venv/bin/python benchmarks/bench_dp_step.py [--batches 64,128,256,512,1024] [--reps 30] [--threads 1]

One step = zero_grad, forward, MSE loss, backward, optimizer step. The private step uses Opacus
(GradSampleModule per-sample gradients + DPOptimizer clipping and noise, as `make_private` sets up);
the non-private step is plain torch SGD on an identical model. Private and non-private steps are
interleaved rep by rep, so load on a shared machine hits both alike; the table reports medians
and the ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from forecasting.model import build_model  # noqa: E402
from core.drg import DRG_GROUPS  # noqa: E402
from core.run_config import DEFAULTS  # noqa: E402


def _batch(n: int, lags: int, horizon: int, gen: torch.Generator):
    x = torch.rand(n, lags, generator=gen) * 4
    g = torch.randint(0, len(DRG_GROUPS), (n,), generator=gen)
    s = torch.rand(n, 2, generator=gen) * 2 - 1
    y = torch.rand(n, horizon, generator=gen) * 4
    return x, g, s, y


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="64,128,256,512,1024")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    lags, horizon = int(DEFAULTS["lags"]), int(DEFAULTS["horizon"])
    lr, clip = float(DEFAULTS["lr"]), float(DEFAULTS["clip-norm"])
    loss_fn = nn.MSELoss()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model: Forecaster(lags={lags}, horizon={horizon}, "
          f"groups={len(DRG_GROUPS)}), {sum(p.numel() for p in build_model(lags, horizon, len(DRG_GROUPS)).parameters())} parameters")
    print(f"{'batch':>6} {'plain ms':>9} {'DP ms':>9} {'DP/plain':>9}")
    for b in [int(v) for v in args.batches.split(",")]:
        plain = build_model(lags, horizon, len(DRG_GROUPS))
        opt_plain = torch.optim.SGD(plain.parameters(), lr=lr, momentum=0.9)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            private = GradSampleModule(build_model(lags, horizon, len(DRG_GROUPS)))
            opt_dp = DPOptimizer(torch.optim.SGD(private.parameters(), lr=lr, momentum=0.9), noise_multiplier=1.0,
                                 max_grad_norm=clip, expected_batch_size=b)
        data = _batch(b, lags, horizon, gen)

        def step(model, opt) -> float:
            t = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            x, g, s, y = data
            loss = loss_fn(model(x, g, s), y)
            loss.backward()
            opt.step()
            return time.perf_counter() - t

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(args.warmup):
                step(plain, opt_plain)
                step(private, opt_dp)
            tp, td = [], []
            for _ in range(args.reps):
                tp.append(step(plain, opt_plain))
                td.append(step(private, opt_dp))
        mp, md = statistics.median(tp) * 1e3, statistics.median(td) * 1e3
        ratios = sorted(d / p for d, p in zip(td, tp))
        rows.append({"batch": b, "plain_ms": mp, "dp_ms": md, "ratio": md / mp,
                     "ratio_iqr": (ratios[len(ratios) // 4], ratios[3 * len(ratios) // 4])})
        print(f"{b:>6} {mp:>9.3f} {md:>9.3f} {md / mp:>9.2f}   (per-rep ratio IQR {rows[-1]['ratio_iqr'][0]:.2f}–{rows[-1]['ratio_iqr'][1]:.2f})")
    return rows


if __name__ == "__main__":
    main()
