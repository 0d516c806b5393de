"""`fedalloc audit`: record-level privacy audit of the node's DP-SGD (an ε lower bound from canaries),
plus the example-level membership-inference attack as a sanity plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

console = Console()

EXIT_REFUTED = 1  # the honest node's claimed ε is refuted (or the sanity attack exceeded its bound)
EXIT_INCONCLUSIVE = 3  # the planted-bug control was not refuted: the audit had no power at this size


def audit_command(
    out: Path = typer.Option(Path("results/audit"), "--out", help="Output directory (audit.html, privacy_audit.csv/png, audit.csv, audit_summary.csv, audit.png)."),
    claimed_epsilon: float = typer.Option(3.0, "--claimed-epsilon", help="ε the node's DP-SGD training claims (σ is calibrated to it with dp_accounting PLD, replace-one)."),
    canaries: int = typer.Option(500, help="Canaries m (pooled over training runs)."),
    canaries_per_run: int = typer.Option(20, "--canaries-per-run", help="Canary slots per training run of the node's examples."),
    rounds: int = typer.Option(1, help="Node rounds per training run (each one train_dp call of the run config's local epochs)."),
    beta: float = typer.Option(0.05, help="1 − confidence of the ε lower bound."),
    seed: int = typer.Option(0, "--seed", help="Seed of the canaries, their signs and the DP noise of the privacy audit."),
    control_scale: float = typer.Option(0.2, "--control-scale", help="σ multiplier of the planted-bug control run (0: no control)."),
    mia: bool = typer.Option(True, "--mia/--no-mia", help="Also run the example-level membership-inference sanity plot."),
    seeds: int = typer.Option(2, help="Sanity plot: seeds 0 … seeds−1 (synthetic pool, member split, model init)."),
    epsilons: str = typer.Option("1,3,8,inf", "--epsilons", help="Sanity plot: comma-separated ε of training; 'inf' = no DP (overfitted)."),
    hospitals: int = typer.Option(3, help="Sanity plot: synthetic hospitals feeding the example pool."),
    epochs: int = typer.Option(80, help="Sanity plot: training epochs (same for every ε)."),
    hidden: int = typer.Option(256, help="Sanity plot: hidden width of the attacked MLP."),
    shadows: int = typer.Option(0, help="Sanity plot: reference models per (ε, seed) for the calibrated attack; 0 = loss attack only."),
    delta: float = typer.Option(1e-5, help="δ of the DP guarantee being audited."),
) -> None:
    """Privacy audit of the node's DP-SGD (exit 1 if the claimed ε is refuted, 3 if the control run
    was not refuted), then the membership-inference sanity plot."""
    from simulations.privacy_audit import (PrivacyAuditConfig, audit_page, html_section, run_privacy_audit,
                                           write_privacy_audit)
    from simulations.sweep import parse_epsilons

    try:
        grid = parse_epsilons(epsilons) if mia else []
    except ValueError as exc:
        console.print(f"[red]--epsilons: {exc}[/red]")
        raise typer.Exit(2)
    if (seeds < 1 or hospitals < 1 or epochs < 1 or hidden < 1 or shadows < 0 or not (0 < delta < 1)
            or not (claimed_epsilon > 0) or canaries < 2 or canaries_per_run < 1 or rounds < 1 or not (0 < beta < 1)
            or not (0 <= control_scale < 1)):
        console.print("[red]need seeds, hospitals, epochs, hidden, rounds, canaries-per-run ≥ 1, canaries ≥ 2, "
                      "shadows ≥ 0, claimed ε > 0, 0 < δ < 1, 0 < β < 1 and 0 ≤ control-scale < 1[/red]")
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)

    pcfg = PrivacyAuditConfig(claimed_epsilon=claimed_epsilon, delta=delta, beta=beta, canaries=canaries,
                              canaries_per_run=canaries_per_run, rounds=rounds)
    with console.status("privacy audit") as status:
        pdf = run_privacy_audit(pcfg, seed=seed, control_scale=control_scale or None,
                                on_step=lambda msg: status.update(f"privacy audit — {msg}"))
    ppaths = write_privacy_audit(pdf, out)
    _print_privacy_audit(pdf, pcfg, control_scale)
    honest = pdf.iloc[0]
    control = pdf.iloc[1] if len(pdf) > 1 else None
    sections = [html_section(pdf, ppaths["png"])]
    mia_ok = True
    if mia:
        section, mia_ok = _mia_sanity_plot(grid, seeds, out, hospitals=hospitals, epochs=epochs, hidden=hidden,
                                           shadows=shadows, delta=delta)
        sections.append(section)
    page = out / "audit.html"
    page.write_text(audit_page(sections), encoding="utf-8")
    console.print(f"results in [bold]{out}[/bold] (audit.html, privacy_audit.csv, privacy_audit.png"
                  + (", audit.csv, audit_summary.csv, audit.png" if mia else "") + ")")
    if honest.flagged or not mia_ok:
        raise typer.Exit(EXIT_REFUTED)
    if control is not None and not control.flagged:
        raise typer.Exit(EXIT_INCONCLUSIVE)


def _print_privacy_audit(pdf: Any, pcfg: Any, control_scale: float) -> None:
    table = Table(title=f"Privacy audit (record level): ε lower bound at {1 - pcfg.beta:.0%} confidence vs claimed "
                        f"ε = {pcfg.claimed_epsilon:g}, δ = {pcfg.delta:g}; max = largest bound {pcfg.canaries} "
                        "canaries can show")
    for col in ("run", "σ used", "σ charged", "true ε", "right/guesses", "ε ≥", "max", "verdict"):
        table.add_column(col, justify="left" if col == "run" else "right")
    for r in pdf.itertuples(index=False):
        table.add_row(r.label, f"{r.noise_multiplier:.3f}", f"{r.charged_noise_multiplier:.3f}", f"{r.true_epsilon:.2f}",
                      f"{r.correct}/{r.guesses}", f"{r.eps_lower_bound:.2f}", f"{r.max_possible_bound:.2f}",
                      "[red]REFUTED[/red]" if r.flagged else "[green]not refuted[/green]")
    console.print(table)
    for r in pdf.itertuples(index=False):
        console.print(f"{r.label}: ε ≥ {r.eps_lower_bound:.2f} at {r.confidence:.0%} confidence ({r.correct}/{r.guesses} "
                      f"guesses right; at most {r.max_possible_bound:.2f} possible with {r.canaries} canaries) vs claimed "
                      f"ε = {r.claimed_epsilon:g}: {'REFUTED' if r.flagged else 'not refuted'} ({r.seconds:.0f} s)",
                      soft_wrap=True)
    if len(pdf) > 1 and not pdf.iloc[1].flagged:
        console.print(f"[yellow]the control run (σ × {control_scale:g}) was not refuted: at {pcfg.canaries} canaries this "
                      f"audit cannot refute ε = {pcfg.claimed_epsilon:g} (largest possible bound "
                      f"{pdf.iloc[0].max_possible_bound:.2f}); the honest result is inconclusive[/yellow]")


def _mia_sanity_plot(grid: list[float], seeds: int, out: Path, **config: Any) -> tuple[str, bool]:
    """(HTML section, every attack within its bound) of the membership-inference sanity plot."""
    from simulations.mia import AuditConfig, run_audit, summary, write_audit
    from simulations.mia import html_section as mia_section

    cfg = AuditConfig(**config)
    with console.status("sanity plot: membership inference") as status:
        df = run_audit(grid, seeds, cfg, on_step=lambda msg: status.update(f"sanity plot — {msg}"), keep_scores=True)
    paths = write_audit(df, out)
    mt = Table(title=f"Sanity plot, not an audit: example-level membership inference vs (ε, δ={cfg.delta:g}) bound, "
                     f"{df.seed.nunique()} seed(s)")
    for col in ("attack", "ε", "AUC mean", "AUC max", "AUC bound", "adv.", "adv. bound", "ε lower bound", "σ", "ok"):
        mt.add_column(col, justify="left" if col == "attack" else "right", no_wrap=col == "attack")
    for r in summary(df).itertuples(index=False):
        mt.add_row(r.attack, "∞" if math.isinf(r.eps) else f"{r.eps:g}", f"{r.auc_mean:.3f}", f"{r.auc_max:.3f}",
                   f"{r.auc_bound:.3f}", f"{r.advantage_mean:.3f}", f"{r.advantage_bound:.3f}",
                   f"{r.eps_lower_bound_max:.2f}", "—" if r.sigma != r.sigma else f"{r.sigma:.2f}",
                   "[green]yes[/green]" if r.all_within_bound else "[red]NO[/red]")
    console.print(mt)
    console.print("[dim]The sanity plot attacks examples of a centrally trained MLP; with ~100 evaluation points its "
                  "ε lower bound cannot exceed ≈ 3, so it cannot refute a claim. The privacy audit above is the audit.[/dim]")
    return mia_section(df, paths["png"]), bool(df.within_bound.all())
