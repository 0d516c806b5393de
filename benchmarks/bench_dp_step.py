"""DP-SGD step time per Opacus grad-sample mode vs the same non-private step, and one node's DP round.

    /work/venv/bin/python benchmarks/bench_dp_step.py [--batches 16,64,256,1024] [--reps 30] [--threads 1]
        [--modes hooks,hooks-vmap,functorch,ew,ghost] [--round-reps 30] [--baseline FILE]

Steps: the default forecaster (`build_model` at the default run config's lags and horizon, 12
groups). One step = zero_grad, forward, clamp, MSE loss, backward, optimizer step, as in
`client.dp_training._train`. The private step is Opacus (per-sample gradients + DPOptimizer
clipping and noise, σ = 1, the run config's clip norm); the plain step is torch SGD on an identical
model. Modes:

- `hooks`: GradSampleModule, hooks, with `client.dp_training`'s closed-form LagMix grad sampler
  registered (what train_dp uses);
- `hooks-vmap`: the same without that sampler, so Opacus falls back to a functorch vmap for LagMix
  (what train_dp used before);
- `functorch`: GradSampleModule(force_functorch=True), a vmap per layer;
- `ew`: GradSampleModuleExpandedWeights; `ghost`: GradSampleModuleFastGradientClipping with
  DPOptimizerFastGradientClipping and DPLossFastGradientClipping (two backward passes, per-sample
  norms only). A mode Opacus rejects for this model is reported with its error.

Round (`--round-reps` > 0): one node's local round at the default run config (one synthetic
hospital, seed 0: its examples, batch, 2 local epochs, lr, clip norm) through `train_dp`, DP
(σ = 2) and plain (noise_multiplier=None), model built and loaded as a node does. With
`--baseline FILE` (another dp_training.py, e.g. `git show HEAD:client/dp_training.py > FILE`) its
train_dp is timed in the same loop, without the LagMix sampler registered, so before/after are
ratios from one run. All timings are interleaved rep by rep (load on a shared machine hits every
variant alike); the tables report medians of CPU time (`time.process_time`: on an oversubscribed
machine wall time mostly measures the wait for a core), the round table also wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from client.dp_training import LOG_BOUND, _opacus_engine, train_dp  # noqa: E402
from core.drg import DRG_GROUPS  # noqa: E402
from core.run_config import DEFAULTS  # noqa: E402
from forecasting.model import LagMix, build_model  # noqa: E402

MODES = ("hooks", "hooks-vmap", "functorch", "ew", "ghost")


@contextlib.contextmanager
def without_lagmix_sampler():
    """Opacus as shipped: no grad sampler for LagMix (it falls back to functorch)."""
    from opacus.grad_sample import GradSampleHooks, GradSampleHooksFastGradientClipping

    saved = [(reg, reg.pop(LagMix)) for reg in (GradSampleHooks.GRAD_SAMPLERS,
                                                GradSampleHooksFastGradientClipping.GRAD_SAMPLERS) if LagMix in reg]
    try:
        yield
    finally:
        for reg, fn in saved:
            reg[LagMix] = fn


class _PerSampleMSE(nn.Module):
    """MSE whose reduction="none" is one loss per example (mean over the horizon), as ghost clipping needs."""

    def __init__(self) -> None:
        super().__init__()
        self.reduction = "mean"

    def forward(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        per = ((pred - y) ** 2).mean(dim=1)
        return per if self.reduction == "none" else per.mean()


def _batch(n: int, lags: int, horizon: int, gen: torch.Generator):
    x = torch.rand(n, lags, generator=gen) * 4
    g = torch.randint(0, len(DRG_GROUPS), (n,), generator=gen)
    s = torch.rand(n, 2, generator=gen) * 2 - 1
    y = torch.rand(n, horizon, generator=gen) * 4
    return x, g, s, y


def _private(mode: str, b: int, lags: int, horizon: int, lr: float, clip: float):
    """(model, optimizer, loss function, context) of one mode."""
    from opacus import GradSampleModule
    from opacus.grad_sample import GradSampleModuleExpandedWeights, GradSampleModuleFastGradientClipping
    from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
    from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

    base = build_model(lags, horizon, len(DRG_GROUPS))
    ctx = without_lagmix_sampler if mode == "hooks-vmap" else contextlib.nullcontext
    kw = {"noise_multiplier": 1.0, "max_grad_norm": clip, "expected_batch_size": b}
    if mode == "ghost":
        model = GradSampleModuleFastGradientClipping(base, max_grad_norm=clip, use_ghost_clipping=True)
        opt = DPOptimizerFastGradientClipping(torch.optim.SGD(model.parameters(), lr=lr), **kw)
        return model, opt, DPLossFastGradientClipping(model, opt, _PerSampleMSE()), ctx
    if mode == "ew":
        model = GradSampleModuleExpandedWeights(base)
    else:
        with ctx():
            model = GradSampleModule(base, force_functorch=mode == "functorch")
    return model, DPOptimizer(torch.optim.SGD(model.parameters(), lr=lr), **kw), nn.MSELoss(), ctx


def _step(model, opt, loss_fn, data) -> float:
    t = time.process_time()
    opt.zero_grad(set_to_none=True)
    x, g, s, y = data
    loss = loss_fn(model(x, g, s).clamp(-LOG_BOUND, LOG_BOUND), y)
    loss.backward()
    opt.step()
    return time.process_time() - t


def bench_steps(batches: list[int], modes: list[str], reps: int, warmup: int) -> list[dict]:
    lags, horizon = int(DEFAULTS["lags"]), int(DEFAULTS["horizon"])
    lr, clip = float(DEFAULTS["lr"]), float(DEFAULTS["clip-norm"])
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"\n## One step, CPU ms (median of {reps}); DP/plain in brackets\n")
    print("| batch | plain | " + " | ".join(modes) + " |")
    print("|---|---|" + "---|" * len(modes))
    for b in batches:
        data = _batch(b, lags, horizon, gen)
        plain = build_model(lags, horizon, len(DRG_GROUPS))
        variants = {"plain": (plain, torch.optim.SGD(plain.parameters(), lr=lr), nn.MSELoss(), contextlib.nullcontext)}
        errors = {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for mode in modes:
                try:
                    variants[mode] = _private(mode, b, lags, horizon, lr, clip)
                    with variants[mode][3]():
                        for _ in range(warmup):
                            _step(*variants[mode][:3], data)
                except Exception as e:  # noqa: BLE001  (a mode this model cannot use: report why)
                    variants.pop(mode, None)
                    errors[mode] = f"{type(e).__name__}: {str(e).splitlines()[0][:90]}"
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(reps):
                for k, (m, o, lf, ctx) in variants.items():
                    with ctx():
                        times[k].append(_step(m, o, lf, data))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        cells = [f"{med[m]:.3f} ({med[m] / med['plain']:.2f}×)" if m in med else "fails" for m in modes]
        print(f"| {b} | {med['plain']:.3f} | " + " | ".join(cells) + " |")
        rows.append({"batch": b, "ms": med, "errors": errors})
    for mode, err in {m: e for r in rows for m, e in r["errors"].items()}.items():
        print(f"\n{mode}: {err}")
    return rows


def _load_baseline(path: Path):
    spec = importlib.util.spec_from_file_location("dp_training_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.train_dp


def bench_round(reps: int, baseline: Path | None) -> dict:
    from simulations import baselines as B

    run = B.run_settings()
    ex = B._examples(B.synthetic_hospitals(Path(tempfile.mkdtemp(prefix="bench-dp-step-")), 1, 0, run), run)[0]
    state = B._new_model(run).state_dict()

    def one(fn, sigma, ctx=contextlib.nullcontext):
        def go() -> tuple[float, float]:
            t, c = time.perf_counter(), time.process_time()
            model = build_model(run.lags, run.horizon, len(DRG_GROUPS), period=run.period)
            model.load_state_dict(state)
            with ctx():
                fn(model, ex, noise_multiplier=sigma, max_grad_norm=run.clip_norm, batch_size=run.batch_size,
                   epochs=run.local_epochs, lr=run.lr, seed=0)
            return time.perf_counter() - t, time.process_time() - c
        return go

    variants = {"plain": one(train_dp, None), "DP": one(train_dp, 2.0)}
    if baseline is not None:
        old = _load_baseline(baseline)
        variants.update({"plain (baseline)": one(old, None), "DP (baseline)": one(old, 2.0, without_lagmix_sampler)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for go in variants.values():
            for _ in range(3):
                go()
        times: dict[str, list[tuple[float, float]]] = {k: [] for k in variants}
        for _ in range(reps):
            for k, go in variants.items():
                times[k].append(go())
    wall = {k: statistics.median(w for w, _ in v) * 1e3 for k, v in times.items()}
    med = {k: statistics.median(c for _, c in v) * 1e3 for k, v in times.items()}
    plan = train_dp(B._new_model(run), ex, noise_multiplier=1.0, max_grad_norm=run.clip_norm,
                    batch_size=run.batch_size, epochs=run.local_epochs, lr=run.lr, seed=0)
    print(f"\n## One node's local round (train_dp), ms (median of {reps}): {len(ex)} examples, batch "
          f"{run.batch_size}, {run.local_epochs} epochs, q = {plan.sample_rate:.4g}, {plan.steps} steps\n")
    print("| code | plain CPU ms | DP CPU ms | DP / plain, CPU | plain wall ms | DP wall ms | DP / plain, wall |")
    print("|---|---|---|---|---|---|---|")
    for tag in ("", " (baseline)"):
        if f"DP{tag}" in med:
            p, d = "plain" + tag, "DP" + tag
            print(f"| {'baseline' if tag else 'this tree'} | {med[p]:.2f} | {med[d]:.2f} | {med[d] / med[p]:.2f}× | "
                  f"{wall[p]:.2f} | {wall[d]:.2f} | {wall[d] / wall[p]:.2f}× |")
    if baseline is not None:
        print(f"\nDP round, this tree / baseline: CPU {med['DP'] / med['DP (baseline)']:.2f}×, "
              f"wall {wall['DP'] / wall['DP (baseline)']:.2f}×")
    return {"cpu_ms": med, "wall_ms": wall}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="16,64,256,1024")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--round-reps", type=int, default=30)
    ap.add_argument("--baseline", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.exit(2, f"error: --modes {','.join(bad)} not allowed; choose from {','.join(MODES)}\n")
    if args.baseline is not None and not args.baseline.is_file():
        ap.exit(2, f"error: --baseline {args.baseline} is not a file (a dp_training.py to compare with)\n")
    torch.set_num_threads(args.threads)
    _opacus_engine()  # registers the LagMix sampler, as train_dp does
    lags, horizon = int(DEFAULTS["lags"]), int(DEFAULTS["horizon"])
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, model: build_model(lags={lags}, "
          f"horizon={horizon}, groups={len(DRG_GROUPS)}), "
          f"{sum(p.numel() for p in build_model(lags, horizon, len(DRG_GROUPS)).parameters())} parameters")
    out = {"steps": bench_steps([int(v) for v in args.batches.split(",") if v], modes, args.reps, args.warmup)}
    if args.round_reps > 0:
        out["round"] = bench_round(args.round_reps, args.baseline)
    return out


if __name__ == "__main__":
    main()
