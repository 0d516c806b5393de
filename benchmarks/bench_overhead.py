"""Where a federated DP round's time goes at one node (default run config, one synthetic hospital).

    /work/venv/bin/python benchmarks/bench_overhead.py [--reps 3] [--threads 1]

Measures, for the default run config: one (cold) PLD `compute_epsilon` call on a node's planned history,
the σ calibration a fresh node does before its first round (`training_sigma` + `release_sigma`,
exactly as client.tasks.noise_plan; the accountant's and calibration's caches are
cleared before each timing, so these are a fresh node's cold calls), one local round of DP-SGD (Opacus, `train_dp`) and the same
round without DP, and the D_i forecast. Medians over --reps.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _clear_accountant_cache() -> None:
    """Time cold calls, as a fresh node process makes them: forget the accountant's stored states
    (client/accounting.py) and the calibration caches (client/calibration.py)."""
    import client.accounting as accounting
    import client.calibration as calibration

    accounting.clear_caches()
    for name in dir(calibration):
        fn = getattr(calibration, name)
        if callable(getattr(fn, "cache_clear", None)):
            fn.cache_clear()


def _time(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        _clear_accountant_cache()
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from client.calibration import release_sigma, training_sigma
    from client.dp_training import plan_steps, train_dp
    from client.ledger import Mechanism, compute_epsilon
    from simulations import baselines as B

    run = B.run_settings()
    h = B.synthetic_hospitals(Path(tempfile.mkdtemp(prefix="bench-overhead-")), 1, 0, run)
    ex = B._examples(h, run)[0]
    plan = plan_steps(len(ex), run.batch_size, run.local_epochs)
    delta = 1e-5
    rel = release_sigma(run.epsilon * run.release_share, delta)
    steps = plan.steps * run.num_server_rounds
    sigma = training_sigma([], plan.sample_rate, steps, [Mechanism(rel, 1.0, 1, "r")], run.epsilon, delta)
    hist = [(sigma, plan.sample_rate, steps), (rel, 1.0, 1)]

    def calibrate() -> None:
        r = release_sigma(run.epsilon * run.release_share, delta)
        training_sigma([], plan.sample_rate, steps, [Mechanism(r, 1.0, 1, "r")], run.epsilon, delta)

    def round_(noise):
        def f() -> None:
            m = B._new_model(run)
            train_dp(m, ex, noise_multiplier=noise, max_grad_norm=run.clip_norm, batch_size=run.batch_size,
                     epochs=run.local_epochs, lr=run.lr, seed=0)
        return f

    model = B._new_model(run)
    round_(None)()  # warm-up (lazy imports)
    round_(sigma)()
    res = {
        "compute_epsilon_s": _time(lambda: compute_epsilon(hist, delta), args.reps),
        "calibration_s": _time(calibrate, args.reps),
        "dp_round_s": _time(round_(sigma), args.reps),
        "plain_round_s": _time(round_(None), args.reps),
        "forecast_s": _time(lambda: B.forecast_total(model, h.series[0], run), args.reps),
    }
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"one node: {len(ex)} examples, batch {run.batch_size}, {plan.steps} steps/round, σ_train={sigma:.3f}, "
          f"σ_release={rel:.3f}, torch threads {torch.get_num_threads()}")
    for k, v in res.items():
        print(f"{k:>18}: {v * 1e3:10.1f} ms")
    print(f"{'DP / plain round':>18}: {res['dp_round_s'] / res['plain_round_s']:10.2f}×")
    print(f"{'calibration / DP round':>18}: {res['calibration_s'] / res['dp_round_s']:10.2f}×")
    return res


if __name__ == "__main__":
    main()
