"""Cost of the privacy accountant: one charge against the history length, and σ calibration
amortised over many fresh nodes (issue 13).

    /work/venv/bin/python benchmarks/bench_accounting.py [--lengths 10 50 100 200] [--nodes 1000]
        [--rounds 10] [--q 0.5] [--steps 4] [--old PATH/TO/old/client/accounting.py]

Charge: a node whose ledger holds n DP-SGD round entries (σ, q, steps) charges one more; timed is
the ε after the charge as `Ledger.charge` computes it, with the node's history state warm from its
previous charge (what a long-lived node or simulation process has). With `--old`, the same with an
older `client/accounting.py` loaded from that file (before 2026-11-26 15:00 UTC it grouped identical
entries and self-composed each group afresh whenever its step count changed).

Calibration: `release_sigma` + `training_sigma` exactly as `client.tasks.noise_plan` calls them,
for `--nodes` fresh nodes with the default plan, starting from empty accountant caches; reported
as total / nodes, plus the first (cold) node alone. `rounds=1` is how client/tasks.py calls it
today (one block of steps); `rounds=R` plans the R per-round charges exactly (/tmp diff).
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
DELTA = 1e-5


def _load(path: Path):  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("old_accounting", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["old_accounting"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def charge_cost(acc, n: int, sigma: float, q: float, steps: int, reps: int = 3) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median (wall, CPU) seconds of ε(history + 1 entry) with ε(history) already computed."""
    out, cpu = [], []
    for r in range(reps):
        s = sigma * (1 + 1e-6 * (r + 1))  # a fresh history per rep: no answer is cached
        hist = [acc.Mechanism(s, q, steps)] * n
        acc.epsilon(hist, DELTA)  # the previous charge
        t, c = time.perf_counter(), time.process_time()
        acc.epsilon(hist + [acc.Mechanism(s, q, steps)], DELTA)
        out.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return statistics.median(out), statistics.median(cpu)


def calibration_cost(nodes: int, rounds: int, q: float, steps: int, eps: float, share: float,
                     exact_rounds: bool) -> tuple[float, float, float, float]:
    """(first node s, total s / nodes) wall and CPU for `nodes` fresh nodes with the same plan."""
    from client import accounting
    from client.calibration import RELEASE, _release_sigma, _training_sigma, release_sigma, training_sigma

    accounting.clear_caches()
    _release_sigma.cache_clear()
    _training_sigma.cache_clear()
    first = first_cpu = 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(nodes):
        t, c = time.perf_counter(), time.process_time()
        rel = release_sigma(eps * share, DELTA)
        kw = {"rounds": rounds} if exact_rounds else {}
        training_sigma([], q, steps * rounds, [accounting.Mechanism(rel, 1.0, 1, RELEASE)], eps, DELTA, **kw)
        if i == 0:
            first, first_cpu = time.perf_counter() - t, time.process_time() - c
    return first, (time.perf_counter() - t0) / nodes, first_cpu, (time.process_time() - c0) / nodes


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[10, 50, 100, 200])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--q", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--sigma", type=float, default=5.0)
    ap.add_argument("--old", type=Path, default=None)
    args = ap.parse_args(argv)
    from client import accounting

    print(f"# {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    import dp_accounting  # noqa: F401  (import cost off the clock)

    old = _load(args.old) if args.old else None
    print(f"\n## One charge after n entries (σ {args.sigma}, q {args.q}, {args.steps} steps each), median of 3\n")
    print("| n entries | incremental ms wall (CPU) |" + (" old ms wall (CPU) | old / incremental (CPU) |" if old else ""))
    print("|---|---|" + ("---|---|" if old else ""))
    for n in args.lengths:
        new, new_c = charge_cost(accounting, n, args.sigma, args.q, args.steps)
        row = f"| {n} | {new * 1e3:.1f} ({new_c * 1e3:.1f}) |"
        if old:
            o, o_c = charge_cost(old, n, args.sigma, args.q, args.steps)
            row += f" {o * 1e3:.1f} ({o_c * 1e3:.1f}) | {o_c / new_c:.1f}x |"
        print(row, flush=True)
    print(f"\n## σ calibration, {args.nodes} fresh nodes, {args.rounds} rounds × {args.steps} steps at q {args.q}, ε 3\n")
    print("| plan checked as | first node ms wall (CPU) | amortised ms / node wall (CPU) |\n|---|---|---|")
    for exact in (False, True):
        first, per, first_c, per_c = calibration_cost(args.nodes, args.rounds, args.q, args.steps, 3.0, 0.15, exact)
        label = f"{args.rounds} per-round charges" if exact else "one block (client/tasks.py today)"
        print(f"| {label} | {first * 1e3:.0f} ({first_c * 1e3:.0f}) | {per * 1e3:.2f} ({per_c * 1e3:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
