"""`fedalloc audit`: membership-inference audit of DP-SGD training (attack AUC vs the (ε, δ) bound)."""

from __future__ import annotations

import math
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def audit_command(
    out: Path = typer.Option(Path("results/audit"), "--out", help="Output directory (audit.csv, audit_summary.csv, audit.png, audit.html)."),
    seeds: int = typer.Option(2, help="Seeds 0 … seeds−1 (synthetic pool, member split, model init)."),
    epsilons: str = typer.Option("1,3,8,inf", "--epsilons", help="Comma-separated ε of training; 'inf' = no DP (overfitted)."),
    hospitals: int = typer.Option(3, help="Synthetic hospitals feeding the example pool."),
    epochs: int = typer.Option(80, help="Training epochs (same for every ε)."),
    hidden: int = typer.Option(256, help="Hidden width of the audited forecaster."),
    shadows: int = typer.Option(0, help="Reference models per (ε, seed) for the calibrated (offline LiRA-style) attack; 0 = loss attack only."),
    delta: float = typer.Option(1e-5, help="δ of the DP guarantee being audited."),
) -> None:
    """Train forecasters on random member halves of a synthetic pool and attack them (loss threshold)."""
    from simulations.mia import AuditConfig, run_audit, summary, write_audit
    from simulations.sweep import parse_epsilons

    try:
        grid = parse_epsilons(epsilons)
    except ValueError as exc:
        console.print(f"[red]--epsilons: {exc}[/red]")
        raise typer.Exit(2)
    if seeds < 1 or hospitals < 1 or epochs < 1 or hidden < 1 or shadows < 0 or not (0 < delta < 1):
        console.print("[red]need seeds, hospitals, epochs, hidden ≥ 1, shadows ≥ 0 and 0 < δ < 1[/red]")
        raise typer.Exit(2)
    cfg = AuditConfig(hospitals=hospitals, epochs=epochs, hidden=hidden, shadows=shadows, delta=delta)
    with console.status("auditing") as status:
        df = run_audit(grid, seeds, cfg, on_step=lambda msg: status.update(msg), keep_scores=True)
    paths = write_audit(df, out)

    table = Table(title=f"membership inference vs (ε, δ={delta:g}) bound, {df.seed.nunique()} seed(s)")
    for col in ("attack", "ε", "AUC mean", "AUC max", "AUC bound", "adv.", "adv. bound", "ε lower bound", "σ", "ok"):
        table.add_column(col, justify="left" if col == "attack" else "right", no_wrap=col == "attack")
    for r in summary(df).itertuples(index=False):
        table.add_row(r.attack, "∞" if math.isinf(r.eps) else f"{r.eps:g}", f"{r.auc_mean:.3f}", f"{r.auc_max:.3f}",
                      f"{r.auc_bound:.3f}", f"{r.advantage_mean:.3f}", f"{r.advantage_bound:.3f}",
                      f"{r.eps_lower_bound_max:.2f}", "—" if r.sigma != r.sigma else f"{r.sigma:.2f}",
                      "[green]yes[/green]" if r.all_within_bound else "[red]NO[/red]")
    console.print(table)
    console.print(f"results in [bold]{paths['csv'].parent}[/bold] (audit.csv, audit_summary.csv, audit.png, audit.html)")
    if not df.within_bound.all():
        raise typer.Exit(1)
