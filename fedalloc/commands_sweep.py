"""`fedalloc sweep`: the privacy–utility grid (ε × seeds × forecast origins) with every baseline,
CSV/JSON/plots/HTML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

if TYPE_CHECKING:
    from simulations.sweep import SweepResult

console = Console()


def sweep_command(
    hospitals: int = typer.Option(10, help="Synthetic hospitals per seed (ignored with --data)."),
    epsilons: str = typer.Option("0.5,1,3,8,inf", "--epsilons", help="Comma-separated ε grid per node; 'inf' = no DP."),
    seeds: int = typer.Option(2, help="Number of seeds (0 … seeds−1): synthetic data and model init."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds (default: the run-config default)."),
    local_epochs: Optional[int] = typer.Option(None, "--local-epochs", help="Local epochs per round."),
    methods: str = typer.Option(",".join(
        ("seasonal_naive", "last_value", "centralised", "local", "federated", "local_dp", "federated_dp",
         "dp_series_release")),
        help="Comma-separated subset of methods."),
    data: Optional[Path] = typer.Option(None, "--data", help="Directory of hospital record files (+ hospitals.csv) instead of synthetic ones."),
    start: Optional[str] = typer.Option(None, help="First day of the series (public)."),
    cutoff: Optional[str] = typer.Option(None, help="Train before this date, forecast the horizon after it."),
    origins: int = typer.Option(1, help="Rolling-origin backtest: forecast origins, the last at the cutoff, "
                                        "one horizon apart; a fresh federation at each."),
    run_config: Optional[str] = typer.Option(None, "--run-config", help="More run-config keys, as for "
                                             "`flwr run --run-config`, e.g. \"lags=52 release-blocks=13\"."),
    ledgers: str = typer.Option("lifetime", "--ledgers", help="With --data: 'lifetime' charges every federated DP "
                                "run to each hospital's lifetime ledger DIR/ledgers/<hospital>.json (K origins need "
                                "K×ε of its budget); 'sweep' makes the backtest a simulation with fresh per-run "
                                "ledgers in --out/runs/, nothing charged to DIR/ledgers (only for records you hold "
                                "and results you do not release)."),
    out: Path = typer.Option(Path("results/sweep"), "--out", help="Output directory."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write PNG plots and report.html."),
) -> None:
    """Run the ε × seed × origin grid: federated DP vs centralised, local-only, federated non-private and naive baselines."""
    from simulations.sweep import run_sweep

    grid, chosen, overrides = _check_request(epsilons, methods, seeds, data, ledgers, origins, run_config,
                                             {"local-epochs": local_epochs, "start": start, "cutoff": cutoff})
    total = _steps(grid, chosen, seeds, origins, report)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console) as progress:
        task = progress.add_task("sweep", total=total)
        state = {"n": 0}

        def on_step(msg: str) -> None:
            progress.update(task, completed=state["n"], description=msg)
            state["n"] += 1

        try:
            result = run_sweep(out, hospitals=hospitals, epsilons=grid, seeds=list(range(seeds)), rounds=rounds,
                               overrides=overrides, methods=chosen, data_dir=data, report=report, on_step=on_step,
                               origins=origins, ledgers=ledgers)
        except (ValueError, RuntimeError) as exc:
            console.print(f"[red]sweep failed: {exc}[/red]")
            raise typer.Exit(1)
        progress.update(task, completed=total, description="done")
    _print_summary(result, seeds)
    console.print(f"results in [bold]{result.path}[/bold] (sweep.csv, per_hospital.csv, rounds.csv, metrics.json"
                  + (", *.png, report.html)" if report else ")"))


def _check_request(epsilons: str, methods: str, seeds: int, data: Path | None, ledgers: str, origins: int,
                   run_config: str | None, given: dict[str, Any]) -> tuple[list[float], list[str], dict[str, Any]]:
    """(ε grid, methods, run-config overrides), every option checked before anything runs: one line, exit 2."""
    from fedalloc.commands_sim import fail, parse_run_config
    from simulations import baselines as B
    from simulations.sweep import parse_epsilons

    try:
        grid = parse_epsilons(epsilons)
    except ValueError as exc:
        fail(f"--epsilons: {exc}")
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(B.METHODS))
    if unknown or not chosen:
        fail(f"--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(B.METHODS)}")
    if seeds < 1 or origins < 1:
        fail(f"--seeds and --origins must be ≥ 1, got {seeds} and {origins}")
    if data is not None and not data.is_dir():
        fail(f"--data {data}: not a directory")
    if ledgers not in ("lifetime", "sweep"):
        fail(f"--ledgers must be lifetime or sweep, got {ledgers!r}")
    if ledgers == "sweep" and data is None:
        fail("--ledgers sweep needs --data (generated hospitals always get per-run ledgers)")
    overrides = {**parse_run_config(run_config), **{k: v for k, v in given.items() if v is not None}}
    try:
        B.run_settings(**overrides)
    except ValueError as exc:
        fail(f"run config: {exc}")
    return grid, chosen, overrides


def _steps(grid: list[float], chosen: list[str], seeds: int, origins: int, report: bool) -> int:
    """Progress steps of the sweep: one per method run (and the report)."""
    from simulations import baselines as B

    n_private = sum(m in B.PRIVATE for m in chosen)
    n_plain = sum(m in B.NON_PRIVATE for m in chosen)
    if math.inf in grid:  # the ε = inf private runs reuse (and may need) the plain runs
        n_plain += sum(p in chosen and q not in chosen for p, q in B.PLAIN_TWIN.items())
    return seeds * origins * (n_plain + n_private * len(grid)) + (1 if report else 0)


def _print_summary(result: "SweepResult", seeds: int) -> None:
    """The backtest table (one row per method: a DP method at ε = ∞ is its non-private twin) and the
    report's headline sentence."""
    from simulations.report import dedup_rows, headline
    from simulations.sweep import backtest_summary

    summary = dedup_rows(backtest_summary(result.table))
    n_origins = len(result.metrics["config"].get("origins") or [])
    table = Table(title=f"mean ± std over {seeds} seed(s) × {n_origins} origin(s); relative MAE = MAE / better of "
                        "seasonal naive and last value, per origin; bias = Σ(D̂ − D) / Σ D; a DP method at ε = ∞ is its "
                        "no-DP row")
    for c in ("method", "ε", "MAE", "rel. MAE", "alloc err (seed)", "bias %", "80 % cover", "WIS", "ε spent (max)"):
        # the key column keeps its name on one line even in an 80-column terminal
        table.add_column(c, justify="left" if c == "method" else "right", min_width=8 if c == "rel. MAE" else None)

    def pm(row: Any, m: str) -> str:
        v, sd, n = getattr(row, m), getattr(row, f"{m}_std"), row.cells
        if not math.isfinite(v):
            return "∞"
        return f"{v:.4g}" + (f" ± {sd:.2g}" if n > 1 else "")  # one cell has no spread to show

    for row in summary.itertuples(index=False):
        table.add_row(row.label, "∞" if math.isinf(row.epsilon) else f"{row.epsilon:g}", pm(row, "mae"),
                      pm(row, "rel_mae"), pm(row, "alloc_error_seed"),
                      "–" if not math.isfinite(row.bias_pct) else f"{row.bias_pct:+.2f}",
                      # methods without a released interval have NaN here
                      "–" if not math.isfinite(row.coverage_80) else pm(row, "coverage_80"),
                      "–" if not math.isfinite(row.wis) else pm(row, "wis"),
                      "–" if not math.isfinite(row.epsilon_spent_max) else f"{row.epsilon_spent_max:.4g}")
    console.print(table)
    if not result.per_hospital.empty:
        console.print(headline(result.table, result.per_hospital).text, soft_wrap=True)
