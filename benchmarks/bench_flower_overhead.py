"""fedalloc's simulation wall time per client-round vs a bare Flower simulation (issue 4).

    /work/venv/bin/python benchmarks/bench_flower_overhead.py [--hospitals 10] [--rounds 2 6]
        [--engines inprocess ray] [--out DIR]

Both sides use the same node files (synthetic hospitals generated once into DIR/data), the same
model (`forecasting.model.build_model(run.lags, run.horizon, 12)` of the default run config), the same training examples (`client.node.series_for`
+ `forecasting.features.training_examples`) and the same local epochs / batch / lr. The bare side is a
minimal ClientApp whose `@app.train()` calls `client.dp_training.train_dp(noise_multiplier=None)`
and a ServerApp running `flwr.serverapp.strategy.FedAvg(fraction_evaluate=0)`: no DP, no ledger,
no calibration, no audit, no predict round, no result files. The fedalloc side is
`simulations.driver.simulate(...)` as shipped (DP-SGD, ledger, calibration, audit, D_i release,
allocation, result files).

In process, both sides start with every node's records already parsed (the benchmark fills
`client.node.series_for`'s cache before the clock), and every round trip of the grid is timed: the
median training round after round 1 (σ calibration), divided by N, is the per-client-round cost
least disturbed by other jobs on a shared machine. (Ray workers are other processes: their caches
start cold.) On Ray the same median is taken from the wall time of each round trip of Flower's
in-memory grid (the ServerApp runs in the benchmark's process), so Ray's start-up, which swamps the
slope at small N, is not in it.

Engines: Flower's Ray simulation (`flwr.simulation.run_simulation`, 2 concurrent actors) and the
in-process grid (`simulations.inprocess.InProcessGrid`). Every (engine, side, rounds) runs in its
own subprocess; the wall time is taken around the run call only (imports excluded). The fixed cost
(Ray start-up, data checks, predict round, the first round's σ calibration, writing results) is
separated by running two round counts: slope = (t(R2) - t(R1)) / (N * (R2 - R1)) seconds per
client-round. For in-process runs the child also times fedalloc's components by wrapping functions
in its own process (`client.tasks.train_dp`, `noise_plan`, `Ledger.charge`, `compute_epsilon`,
`series_for`, the audit, the wire serialisation, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TIMES: dict[str, float] = defaultdict(float)  # self time: time in wrapped callees is subtracted
CALLS: dict[str, int] = defaultdict(int)
_STACK: list[float] = []  # child time accumulated per open frame


def _wrap(obj, name: str, label: str) -> None:
    fn = getattr(obj, name, None)
    if fn is None:  # the code moved on; report what is missing instead of failing the whole run
        print(f"# not instrumented (no {getattr(obj, '__name__', obj)}.{name})", file=sys.stderr)
        return
    nested = label.startswith("(nested)")  # inclusive, outside the self-time stack

    def wrapper(*a, **k):
        t = time.perf_counter()
        if not nested:
            _STACK.append(0.0)
        try:
            return fn(*a, **k)
        finally:
            dt = time.perf_counter() - t
            CALLS[label] += 1
            if nested:
                TIMES[label] += dt
            else:
                children = _STACK.pop()
                TIMES[label] += dt - children
                if _STACK:
                    _STACK[-1] += dt

    setattr(obj, name, wrapper)


def _instrument(side: str) -> None:
    """Wrap the pieces whose time we want to attribute (in-process engine only)."""
    import simulations.inprocess as ip

    _wrap(ip, "_wire", "flower serialisation (both ways)")
    if side == "bare":
        import client.dp_training as dpt
        import client.node as node

        _wrap(dpt, "train_dp", "train_dp (local training)")
        _wrap(node, "series_for", "series_for (load records -> series)")
        return
    import client.calibration as cal
    import client.ledger as led
    import client.tasks as tasks
    import server.audit as audit
    import simulations.driver as drv

    _wrap(tasks, "train_dp", "train_dp (local training)")
    _wrap(tasks, "series_for", "series_for (load records -> series)")
    _wrap(tasks, "noise_plan", "noise_plan (σ calibration, 1st round)")
    _wrap(tasks, "open_ledger", "ledger open (read + verify)")
    _wrap(led.Ledger, "charge", "ledger charge (ε + fsync'd write)")
    _wrap(tasks, "predict_task", "predict_task (D_i release)")
    _wrap(audit.MessageAudit, "filter", "audit of replies")
    _wrap(drv, "prepare_nodes", "driver: prepare/check node files")
    _wrap(drv, "true_demand", "driver: true demand (forecasts.csv)")
    # The coordinator's run moved from server/app.py to server/runner.py; wrap where it lives.
    import importlib

    for mod in ("server.runner", "server.app"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "save_arrays"):
            _wrap(m, "save_arrays", "coordinator checkpoint writes")
        if hasattr(m, "_allocate"):
            _wrap(m, "_allocate", "allocation")
    # Nested inside noise_plan and charge: reported as a count, not added to the breakdown.
    # Both modules import the accountant's `epsilon` by name, so wrap it where it is looked up.
    _wrap(led, "epsilon", "(nested) accountant epsilon")
    _wrap(cal, "epsilon", "(nested) accountant epsilon")


def _bare_apps(node_configs, rounds: int):
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    import client.dp_training as dpt
    import client.node as cnode
    from forecasting.features import training_examples
    from forecasting.model import build_model
    from core.run_config import RunSettings

    run = RunSettings.from_mapping({})
    sim_nodes = dict(enumerate(node_configs))
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        node = cnode.NodeSettings.from_config(context.node_config, sim_nodes)
        series = cnode.series_for(node, run)
        ex = training_examples(series, run.lags, run.horizon, run.window_stride, blocks=run.release_blocks)
        model = build_model(run.lags, run.horizon, 12)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        dpt.train_dp(model, ex, noise_multiplier=None, max_grad_norm=run.clip_norm, batch_size=run.batch_size,
                     epochs=run.local_epochs, lr=run.lr, seed=int(msg.content["config"]["server-round"]))
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(ex), "trained": 1.0})})
        return Message(content=content, reply_to=msg)

    def start(grid: Grid) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=len(node_configs))
        # The model's shape follows the run config (lags, horizon), as on the fedalloc side.
        initial = build_model(run.lags, run.horizon, 12, period=run.period)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(initial.state_dict()),
                                num_rounds=rounds, train_config=ConfigRecord({"lr": run.lr}))
        # Failed ClientApp replies do not raise in Flower: make sure every round aggregated something.
        done = [r for r, m in result.train_metrics_clientapp.items() if "trained" in m]
        if len(done) != rounds:
            raise RuntimeError(f"bare run aggregated {len(done)} of {rounds} rounds (client errors?)")

    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        start(grid)

    return client, server, start


def _warm_up() -> None:
    """First torch/Opacus backward in a process is slow (lazy init); keep it off the clock."""
    import numpy as np

    from client.dp_training import train_dp
    from forecasting.features import Examples
    from forecasting.model import build_model

    from core.run_config import RunSettings

    run = RunSettings.from_mapping({})
    rng = np.random.default_rng(0)
    ex = Examples(rng.random((32, run.lags), dtype=np.float32), rng.integers(0, 12, 32),
                  rng.random((32, 2), dtype=np.float32), rng.random((32, run.horizon), dtype=np.float32))
    for sigma in (None, 1.0):
        train_dp(build_model(run.lags, run.horizon, 12, period=run.period), ex, noise_multiplier=sigma, max_grad_norm=1.0, batch_size=16, epochs=1, lr=0.05, seed=0)


def _one(engine: str, side: str, rounds: int, data: Path, work: Path) -> dict:
    import logging

    from simulations.driver import _quiet_logs, prepare_nodes

    _quiet_logs()
    logging.getLogger("flwr").setLevel(logging.ERROR)
    import client.tasks  # noqa: F401  (torch/opacus imported before the clock starts)
    import flwr.simulation  # noqa: F401

    _warm_up()
    if engine == "inprocess":
        _preload_series(_node_configs(side, engine, rounds, data, work))
        _instrument(side)
        _time_rounds()
    else:
        # The ServerApp runs in this process (a thread of run_simulation) with Flower's in-memory
        # grid; the ClientApps run in Ray's workers, so only wall time means anything here.
        from flwr.superlink.grid.inmemory_grid import InMemoryGrid

        _time_rounds(InMemoryGrid)
    backend = {"client_resources": {"num_cpus": 1},
               "init_args": {"num_cpus": 2, "logging_level": "ERROR", "log_to_driver": False}}
    if side == "fedalloc":
        from simulations.driver import simulate

        n = len([p for p in data.glob("hospital_*.csv")])
        t = time.perf_counter()
        # synthetic_data: per-run ledgers, so the R1 and R2 runs do not share (and exhaust) a budget.
        out = simulate(hospitals=n, rounds=rounds, engine=engine, data_dir=data, resources=data / "hospitals.csv",
                       synthetic_data=True,
                       results_dir=str(work), run_name=f"{engine}-{rounds}")
        wall = time.perf_counter() - t
        if out.error:
            raise SystemExit(f"fedalloc run failed: {out.error}")
    else:
        nodes = prepare_nodes(work / "bare", hospitals=0, seed=0, budget=3.0, data_dir=data,
                              resources=data / "hospitals.csv")
        n = len(nodes.node_configs)
        client, server, start = _bare_apps(nodes.node_configs, rounds)
        t = time.perf_counter()
        if engine == "inprocess":
            from simulations.inprocess import InProcessGrid

            start(InProcessGrid(client, nodes.node_configs))
        else:
            from flwr.simulation import run_simulation

            run_simulation(server_app=server, client_app=client, num_supernodes=n, backend_config=backend)
        wall = time.perf_counter() - t
    return {"engine": engine, "side": side, "rounds": rounds, "nodes": n, "wall": wall,
            "times": dict(TIMES), "calls": dict(CALLS), "round_times": ROUND_TIMES}


ROUND_TIMES: list[tuple[str, float, float]] = []  # (message type, wall s, CPU s) of each round


def _time_rounds(grid_class: type | None = None) -> None:
    """Time every round trip of the grid (one call per round: train, predict, ...)."""
    if grid_class is None:
        from simulations.inprocess import InProcessGrid as grid_class

    real = grid_class.send_and_receive

    def timed(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        messages = list(messages)
        t, c = time.perf_counter(), time.process_time()
        try:
            return real(self, messages, timeout=timeout)
        finally:
            kind = messages[0].metadata.message_type if messages else "empty"
            # CPU time as well: other jobs on a shared machine inflate wall time, not CPU time.
            ROUND_TIMES.append((kind, time.perf_counter() - t, time.process_time() - c))

    grid_class.send_and_receive = timed


def _node_configs(side: str, engine: str, rounds: int, data: Path, work: Path) -> list[dict]:
    """The node configs the side's run will use (the series cache is keyed by the node's paths)."""
    from simulations.driver import prepare_nodes

    # fedalloc: the run folder simulate() will use; prepare_nodes writes nothing for --data files.
    run_path = work / "bare" if side == "bare" else Path(work).expanduser().resolve() / f"{engine}-{rounds}"
    return prepare_nodes(run_path, hospitals=0, seed=0, budget=3.0, data_dir=data, resources=data / "hospitals.csv",
                         synthetic_data=side != "bare").node_configs


def _preload_series(configs: list[dict]) -> None:
    """Both sides with records already in memory: parse every node file into the node's series
    cache (client.node.series_for, the function both ClientApps call) before the clock starts."""
    import client.node as cnode
    from core.run_config import RunSettings

    run = RunSettings.from_mapping({})
    for cfg in configs:
        cnode.series_for(cnode.NodeSettings.from_config(cfg), run)


def _median_train_round(res: dict, col: int = 1) -> float | None:
    """Median wall (col 1) or CPU (col 2) time of the training rounds after the first (σ calibration)."""
    rounds = [r[col] for r in res.get("round_times", []) if r[0] == "train"][1:]
    return statistics.median(rounds) if rounds else None


def _print_medians(results: dict, r2: int, n: int, engine: str = "inprocess") -> None:
    """Median training round after round 1 per client, both sides (Ray: wall only — its clients
    run in Ray's workers, outside this process's CPU clock)."""
    print(f"\n## {engine}: median training round after round 1, per client-round ({r2}-round runs)\n")
    print("| side | median round wall s | per client-round wall ms | median round CPU s | per client-round CPU ms |")
    print("|---|---|---|---|---|")
    med, cpu = {}, {}
    for side in ("bare", "fedalloc"):
        res = results.get((engine, side, r2), {})
        med[side], cpu[side] = _median_train_round(res, 1), _median_train_round(res, 2)
        if med[side] is not None:
            c = f"{cpu[side]:.3f} | {cpu[side] / n * 1000:.1f}" if engine == "inprocess" else "– | –"
            print(f"| {side} | {med[side]:.3f} | {med[side] / n * 1000:.1f} | {c} |")
    if med["bare"] and med["fedalloc"]:
        c = f", CPU {cpu['fedalloc'] / cpu['bare']:.2f}x" if engine == "inprocess" else ""
        print(f"\n{engine}: fedalloc / bare, median training round: wall {med['fedalloc'] / med['bare']:.2f}x{c}")


def _print_breakdown(results: dict, r1: int, r2: int, n: int) -> None:
    """Self time of each wrapped component, in process, both sides."""
    print(f"\n## Where the time goes, in-process, {r2} rounds (seconds summed over all calls; slope from the two runs)\n")
    print("| component | bare s | fedalloc s | fedalloc calls | fedalloc per client-round (slope) ms |")
    print("|---|---|---|---|---|")
    fb = results.get(("inprocess", "bare", r2), {}).get("times", {})
    fa = results.get(("inprocess", "fedalloc", r2), {})
    fa1 = results.get(("inprocess", "fedalloc", r1), {}).get("times", {})
    labels = list(dict.fromkeys([*fb, *fa.get("times", {})]))
    for lab in labels:
        x2 = fa.get("times", {}).get(lab, 0.0)
        x1 = fa1.get(lab, 0.0)
        per = (x2 - x1) / (n * (r2 - r1)) * 1000
        print(f"| {lab} | {fb.get(lab, 0.0):.2f} | {x2:.2f} | {fa.get('calls', {}).get(lab, 0)} | {per:.1f} |")
    rb = results.get(("inprocess", "bare", r2))
    if rb and fa:
        ub = rb["wall"] - sum(v for k, v in rb["times"].items() if not k.startswith("(nested)"))
        ua = fa["wall"] - sum(v for k, v in fa["times"].items() if not k.startswith("(nested)"))
        print(f"| unattributed (strategy, aggregation, Message building, wait, result files) | {ub:.2f} | {ua:.2f} | | |")
        print(f"| **wall** | {rb['wall']:.2f} | {fa['wall']:.2f} | | |")


def _print_slopes(results: dict, engines: list[str], r1: int, r2: int, n: int) -> None:
    """Slope and intercept of wall time over the two round counts, per engine and side."""
    print(f"\n## Per client-round ({n} hospitals, rounds {r1} and {r2})\n")
    print("| engine | side | wall R1 s | wall R2 s | slope s/client-round | fixed s (intercept) | total/(N·R2) s |")
    print("|---|---|---|---|---|---|---|")
    slopes = {}
    for engine in engines:
        for side in ("bare", "fedalloc"):
            a, b = results.get((engine, side, r1)), results.get((engine, side, r2))
            if not (a and b):
                continue
            slope = (b["wall"] - a["wall"]) / (n * (r2 - r1))
            fixed = a["wall"] - slope * n * r1
            slopes[(engine, side)] = slope
            print(f"| {engine} | {side} | {a['wall']:.2f} | {b['wall']:.2f} | {slope:.4f} | {fixed:.2f} | {b['wall'] / (n * r2):.4f} |")
    print("\n| engine | fedalloc/bare (slope) | fedalloc/bare (total at R2) |")
    print("|---|---|---|")
    for engine in engines:
        if (engine, "bare") in slopes and (engine, "fedalloc") in slopes:
            tot = results[(engine, "fedalloc", r2)]["wall"] / results[(engine, "bare", r2)]["wall"]
            print(f"| {engine} | {slopes[(engine, 'fedalloc')] / slopes[(engine, 'bare')]:.2f}x | {tot:.2f}x |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hospitals", type=int, default=10)
    ap.add_argument("--rounds", type=int, nargs=2, default=[2, 6])
    ap.add_argument("--engines", nargs="+", default=["inprocess", "ray"])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--one", nargs=5, metavar=("ENGINE", "SIDE", "ROUNDS", "DATA", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        engine, side, rounds, data, work = args.one
        res = _one(engine, side, int(rounds), Path(data), Path(work))
        print("RESULT " + json.dumps(res), flush=True)
        return

    out = args.out or Path(tempfile.mkdtemp(prefix="bench-flower-"))
    data = out / "data"
    if not (data / "hospitals.csv").exists():
        from core.synthetic import SyntheticConfig, generate

        generate(SyntheticConfig(hospitals=args.hospitals, seed=0), data)
    print(f"# {' '.join(shlex.quote(a) for a in [sys.executable, *sys.argv])}")
    print(f"# data: {data} ({args.hospitals} synthetic hospitals, seed 0)")
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "RAY_DEDUP_LOGS": "1"}
    results: dict[tuple[str, str, int], dict] = {}
    r1, r2 = args.rounds
    for engine in args.engines:
        for rounds in (r1, r2):
            for side in ("bare", "fedalloc"):
                work = out / f"work-{engine}-{side}-{rounds}"
                cmd = [sys.executable, __file__, "--one", engine, side, str(rounds), str(data), str(work)]
                t = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(ROOT))
                line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
                if p.returncode or not line:
                    print(f"{engine} {side} {rounds}: FAILED rc={p.returncode}\n{p.stderr[-3000:]}")
                    continue
                res = json.loads(line[-1][7:])
                res["process"] = time.perf_counter() - t
                results[(engine, side, rounds)] = res
                print(f"{engine:9s} {side:8s} rounds={rounds}: run {res['wall']:.2f} s (process {res['process']:.1f} s)", flush=True)

    n = args.hospitals
    _print_slopes(results, args.engines, r1, r2, n)

    for engine in args.engines:
        _print_medians(results, r2, n, engine)
    if "inprocess" in args.engines:
        _print_breakdown(results, r1, r2, n)
    (out / "results.json").write_text(json.dumps([v for v in results.values()], indent=1))
    print(f"\nraw: {out / 'results.json'}")


if __name__ == "__main__":
    main()
