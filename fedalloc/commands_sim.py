"""`fedalloc simulate` and `fedalloc ledger show`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()
err_console = Console(stderr=True)


def parse_run_config(text: str | None) -> dict:
    """`key=value …` with Flower's own parser (the syntax of `flwr run --run-config`)."""
    if not text:
        return {}
    from flwr.common.config import parse_config_args

    try:
        return dict(parse_config_args([text]))
    except Exception as exc:  # Flower raises several types for bad TOML
        fail(f"--run-config: cannot parse {text!r} ({exc})")
        raise  # unreachable: fail() exits


def fail(message: str, code: int = 2) -> None:
    """One line on stderr, non-zero exit: what went wrong and, where it helps, what is allowed."""
    err_console.print(f"fedalloc: error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def simulate_command(
    hospitals: int = typer.Option(10, help="Synthetic hospitals to generate (ignored with --data)."),
    rounds: Optional[int] = typer.Option(None, help="Federated training rounds [default: run config's num-server-rounds, 5]."),
    epsilon: Optional[float] = typer.Option(None, help="ε each node may spend in this run [default: run config's epsilon, 3]."),
    budget: Optional[float] = typer.Option(None, help="Each node's lifetime ε budget (synthetic: default --epsilon; "
                                           "--data: the budget recorded in DATA/ledgers, or 3.0 for a new ledger)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Directory with one encounter-records file per hospital."),
    resources: Optional[Path] = typer.Option(None, "--resources", help="CSV with hospital,resources (R_i)."),
    total: Optional[float] = typer.Option(None, help="A_total to allocate [default: 1000]."),
    policy: Optional[str] = typer.Option(None, help="Allocation policy: seed, proportional, need_gap, capped or drg_budget [default: seed]."),
    strategy: Optional[str] = typer.Option(None, help="fedavg, fedtrimmedavg or krum [default: fedavg]."),
    engine: str = typer.Option("ray", help="ray (Flower simulation engine) or inprocess (fast, one process)."),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="HOST:PORT of an existing Ray cluster's head "
                                              "to run on (engine ray; default: a local loopback-only Ray)."),
    start: Optional[str] = typer.Option(None, help="First day of the series (public) [default: 2023-01-02]."),
    cutoff: Optional[str] = typer.Option(None, help="Train on records before this date, forecast after it [default: 2025-12-01]."),
    out: Path = typer.Option(Path("results"), "--out", help="Results directory."),
    name: Optional[str] = typer.Option(None, help="Run name (default: timestamp)."),
    seed: int = typer.Option(0, help="Seed of the synthetic hospitals and the initial model."),
    secagg: bool = typer.Option(False, "--secagg", help="Secure aggregation (Flower SecAgg+): the coordinator sees only masked updates."),
    resume: bool = typer.Option(False, "--resume", help="Continue run --name from its last checkpoint (keeps its nodes and ledgers)."),
    run_config: Optional[str] = typer.Option(None, "--run-config", help="More run-config keys, as for `flwr run --run-config`, "
                                             "e.g. \"period='day' lags=14 horizon=7\"; checked before anything runs."),
    workers: int = typer.Option(1, "--workers", help="Engine inprocess: run the nodes in N worker processes (1: in this one)."),
) -> None:
    """Run a whole federation locally: DP training, D_i release, allocation."""
    from simulations.driver import InvalidNodeFiles, check_request, simulate

    _check_paths_and_workers(data, workers, engine)
    rounds, epsilon, overrides = _overrides(rounds, epsilon, run_config, total=total, policy=policy,
                                            strategy=strategy, start=start, cutoff=cutoff)
    try:
        check_request(hospitals=hospitals, rounds=rounds, epsilon=epsilon, data_dir=data, engine=engine,
                      results_dir=str(out), run_name=name, seed=seed, overrides=overrides, resume=resume, secagg=secagg,
                      ray_address=ray_address, workers=workers)
    except ValueError as exc:  # a request that cannot succeed: refused before anything is spent
        fail(str(exc))
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} rounds"),
                  TimeElapsedColumn(), console=console) as progress:
        on_round = _round_progress(progress, progress.add_task("federated DP training", total=rounds))
        try:
            outcome = simulate(
                hospitals=hospitals, rounds=rounds, epsilon=epsilon, budget=budget, data_dir=data, resources=resources,
                engine=engine, results_dir=str(out), run_name=name, seed=seed, on_round=on_round, resume=resume, secagg=secagg,
                overrides=overrides, ray_address=ray_address, workers=workers,
            )
        except InvalidNodeFiles as exc:
            progress.stop()
            console.print("[red]invalid node files, nothing was run:[/red]")
            console.print(str(exc), markup=False, highlight=False)
            raise typer.Exit(2)
        except ValueError as exc:  # a request that cannot succeed: refused before anything is spent
            progress.stop()
            fail(str(exc))
    if outcome.error:
        console.print(f"[red]run failed: {outcome.error}[/red]")
        console.print(f"details in {outcome.path}/metrics.json")
        raise typer.Exit(1)
    _print_allocations(outcome, overrides.get("policy"))
    console.print(f"results in [bold]{outcome.path}[/bold] (allocations.csv, forecasts.csv, rounds.csv, metrics.json)")


def _check_paths_and_workers(data: Path | None, workers: int, engine: str) -> None:
    """--data must be a folder; --workers N: 1..4×cores, and only for the in-process engine (Ray
    schedules its own workers)."""
    import os

    if data is not None and not data.is_dir():
        fail(f"--data {data}: not a directory")
    limit = (os.cpu_count() or 1) * 4  # simulations.inprocess.max_workers(), without importing flwr
    if not 1 <= workers <= limit:
        fail(f"--workers {workers} is not allowed; choose 1..{limit}")
    if workers != 1 and engine != "inprocess":
        fail(f"--workers needs --engine inprocess (got --engine {engine})")


def _overrides(rounds: int | None, epsilon: float | None, run_config: str | None,
               **given: Any) -> tuple[int, float, dict[str, Any]]:
    """(rounds, ε, run-config overrides): options left out are not sent, so core/run_config.py
    DEFAULTS stays the one source of defaults; --rounds/--epsilon win over --run-config."""
    from core.run_config import DEFAULTS

    overrides = {**parse_run_config(run_config), **{k: v for k, v in given.items() if v is not None}}
    rounds_ = int(overrides.pop("num-server-rounds", DEFAULTS["num-server-rounds"]))
    epsilon_ = float(overrides.pop("epsilon", DEFAULTS["epsilon"]))
    return (rounds_ if rounds is None else rounds), (epsilon_ if epsilon is None else epsilon), overrides


def _round_progress(progress: Progress, task: Any) -> Callable[[int, int, dict], None]:
    def on_round(r: int, n: int, rec: dict) -> None:
        eps = rec.get("mean_epsilon")
        progress.update(task, completed=r, description=(
            f"round {r}/{n}: {rec['ok']}/{rec['asked']} nodes"
            + (f", {rec['failed']} failed" if rec["failed"] else "")
            + (f", ε≈{eps:.2f}" if eps is not None else "")))

    return on_round


def _print_allocations(outcome: Any, policy: str | None) -> None:
    from core.run_config import DEFAULTS
    from fedalloc.commands_allocate import print_fairness

    table = Table(title="allocations")
    alloc = outcome.allocations
    has_interval = {"demand_lo", "demand_hi"} <= set(alloc.columns)
    cols = ("hospital", "demand", *(("80% interval",) if has_interval else ()), "resources", "weight", "allocation", "ε")
    for col in cols:
        table.add_column(col, justify="right", min_width=12 if col == "hospital" else None)
    for row in alloc.itertuples():
        interval = (f"{row.demand_lo:.0f}–{row.demand_hi:.0f}",) if has_interval else ()
        table.add_row(row.hospital, f"{row.demand:.1f}", *interval, f"{row.resources:.1f}", f"{row.weight:.4f}",
                      f"{row.allocation:.2f}", f"{outcome.epsilon.get(row.hospital, float('nan')):.3f}")
    console.print(table)
    print_fairness(console, outcome.fairness, policy or str(DEFAULTS["policy"]))


ledger_app = typer.Typer(help="Inspect a node's privacy ledger.", no_args_is_help=True)


@ledger_app.command("show")
def ledger_show_command(
    path: Path = typer.Argument(..., help="The node's ledger file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable summary with the full history."),
) -> None:
    """Spending per run and the remaining budget."""
    from client.ledger import Ledger, LedgerError

    try:
        ledger = Ledger.read(path)
    except LedgerError as exc:
        console.print(f"[red]{exc}[/red]")
        raise typer.Exit(1)
    summary = ledger.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    table = Table(title=f"ledger of {ledger.node} ({ledger.accountant} accountant, δ={ledger.delta:g})")
    for col in ("run", "mechanisms", "steps", "ε after run"):
        table.add_column(col, justify="right")
    by_run: dict[str, list[dict]] = {}
    for e in ledger.entries:
        by_run.setdefault(e["run"], []).append(e)
    for run, entries in by_run.items():
        table.add_row(run, str(len(entries)), str(sum(e["steps"] for e in entries)), f"{entries[-1]['epsilon_after']:.4f}")
    console.print(table)
    spent = summary["epsilon_spent"]
    console.print(f"ε spent {spent:.4f} of {ledger.budget:.4f}; remaining {max(ledger.budget - spent, 0):.4f}")
