"""`fedalloc sweep`: the privacy–utility grid (ε × seeds × forecast origins) with every baseline,
CSV/JSON/plots/HTML."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

console = Console()


def sweep_command(
    hospitals: int = typer.Option(10, help="Synthetic hospitals per seed (ignored with --data)."),
    epsilons: str = typer.Option("0.5,1,3,8,inf", "--epsilons", help="Comma-separated ε grid per node; 'inf' = no DP."),
    seeds: int = typer.Option(2, help="Number of seeds (0 … seeds−1): synthetic data and model init."),
    rounds: Optional[int] = typer.Option(None, help="Federated rounds (default: the run-config default)."),
    local_epochs: Optional[int] = typer.Option(None, "--local-epochs", help="Local epochs per round."),
    methods: str = typer.Option(",".join(
        ("seasonal_naive", "last_value", "centralised", "local", "federated", "local_dp", "federated_dp")),
        help="Comma-separated subset of methods."),
    data: Optional[Path] = typer.Option(None, "--data", help="Directory of hospital record files (+ hospitals.csv) instead of synthetic ones."),
    start: Optional[str] = typer.Option(None, help="First day of the series (public)."),
    cutoff: Optional[str] = typer.Option(None, help="Train before this date, forecast the horizon after it."),
    origins: int = typer.Option(1, help="Rolling-origin backtest: forecast origins, the last at the cutoff, "
                                        "one horizon apart; a fresh federation at each."),
    run_config: Optional[str] = typer.Option(None, "--run-config", help="More run-config keys, as for "
                                             "`flwr run --run-config`, e.g. \"lags=52 release-blocks=13\"."),
    out: Path = typer.Option(Path("results/sweep"), "--out", help="Output directory."),
    report: bool = typer.Option(True, "--report/--no-report", help="Write PNG plots and report.html."),
) -> None:
    """Run the ε × seed × origin grid: federated DP vs centralised, local-only, federated non-private and naive baselines."""
    from simulations import baselines as B
    from simulations.sweep import parse_epsilons, run_sweep

    try:
        grid = parse_epsilons(epsilons)
    except ValueError as exc:
        console.print(f"[red]--epsilons: {exc}[/red]")
        raise typer.Exit(2)
    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = sorted(set(chosen) - set(B.METHODS))
    if unknown or not chosen:
        console.print(f"[red]--methods: unknown {', '.join(unknown) or '(none given)'}; known: {', '.join(B.METHODS)}[/red]")
        raise typer.Exit(2)
    if seeds < 1:
        console.print("[red]--seeds must be ≥ 1[/red]")
        raise typer.Exit(2)
    if data is not None and not data.is_dir():
        console.print(f"[red]--data {data}: not a directory[/red]")
        raise typer.Exit(2)
    if origins < 1:
        console.print("[red]--origins must be ≥ 1[/red]")
        raise typer.Exit(2)
    from fedalloc.commands_sim import parse_run_config

    overrides = {**parse_run_config(run_config),
                 **{k: v for k, v in {"local-epochs": local_epochs, "start": start, "cutoff": cutoff}.items() if v is not None}}
    try:
        B.run_settings(**overrides)
    except ValueError as exc:
        console.print(f"[red]run config: {exc}[/red]")
        raise typer.Exit(2)
    n_private = sum(m in B.PRIVATE for m in chosen)
    n_plain = sum(m in B.NON_PRIVATE for m in chosen)
    if math.inf in grid:  # the ε = inf private runs reuse (and may need) the plain runs
        n_plain += sum(p in chosen and q not in chosen for p, q in (("local_dp", "local"), ("federated_dp", "federated")))
    total = seeds * origins * (n_plain + n_private * len(grid)) + (1 if report else 0)
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
                               origins=origins)
        except (ValueError, RuntimeError) as exc:
            console.print(f"[red]sweep failed: {exc}[/red]")
            raise typer.Exit(1)
        progress.update(task, completed=total, description="done")
    from simulations.sweep import backtest_summary

    summary = backtest_summary(result.table)
    n_origins = len(result.metrics["config"].get("origins") or [])
    table = Table(title=f"mean ± std over {seeds} seed(s) × {n_origins} origin(s); relative MAE = MAE / better of "
                        "seasonal naive and last value, per origin; bias = Σ(D̂ − D) / Σ D")
    for c in ("method", "ε", "MAE", "rel. MAE", "alloc err (seed)", "bias %", "ε spent (max)"):
        table.add_column(c, justify="left" if c == "method" else "right")

    def pm(row: object, m: str) -> str:
        v, sd = getattr(row, m), getattr(row, f"{m}_std")
        return "∞" if not math.isfinite(v) else f"{v:.4g} ± {sd:.2g}"

    for row in summary.itertuples(index=False):
        table.add_row(row.method, "∞" if math.isinf(row.epsilon) else f"{row.epsilon:g}", pm(row, "mae"),
                      pm(row, "rel_mae"), pm(row, "alloc_error_seed"),
                      "–" if not math.isfinite(row.bias_pct) else f"{row.bias_pct:+.2f}",
                      "–" if not math.isfinite(row.epsilon_spent_max) else f"{row.epsilon_spent_max:.4g}")
    console.print(table)
    console.print(f"results in [bold]{result.path}[/bold] (sweep.csv, per_hospital.csv, rounds.csv, metrics.json"
                  + (", *.png, report.html)" if report else ")"))
