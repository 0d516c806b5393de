"""`fedalloc validate` and `fedalloc generate`: checking and making encounter-record files.

pandas is imported inside the commands so `fedalloc --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

FORMAT_CHOICES = ("csv", "csv.gz", "parquet")


def validate_command(
    path: Annotated[Path, typer.Argument(help="Encounter records (.csv, .csv.gz, .parquet, .pq).")],
    groups: Annotated[Path | None, typer.Option(
        "--groups", help="The run's group catalogue (CSV group,weight; run-config groups-file). "
        "Default: the built-in 12 DRG groups.", show_default=False)] = None,
) -> None:
    """Check an encounter-records file; print every problem with its row and column.

    Exit 1 when the node would refuse the file. Groups outside the catalogue (--groups, default
    the built-in DRG groups) are warnings (exit 0 when they are the only finding): the node
    accepts the file but drops those records from its demand series. They are listed with the
    errors, in row order, when there are both.
    """
    from core.records import (
        MAX_LISTED,
        RecordsError,
        catalogue_warnings,
        read_records,
        to_typed,
        validate_records,
    )

    try:
        raw = read_records(path)
    except RecordsError as err:
        typer.echo(str(err), err=True)
        typer.echo(f"INVALID: {len(err.problems)} problem(s) in {path.name}", err=True)
        raise typer.Exit(1) from None
    catalogue, where = _catalogue_option(groups)
    errors = validate_records(raw, path.name)
    warnings = catalogue_warnings(raw, path.name, catalogue.groups, name=where)

    # Warnings (one per unknown group, so few) are never crowded out by a long list of errors.
    shown = sorted(errors[:MAX_LISTED] + warnings[:MAX_LISTED], key=lambda p: p.row or 0)
    hidden = len(errors) + len(warnings) - len(shown)
    listing = [str(p) for p in shown] + ([f"... and {hidden} more"] if hidden else [])
    if errors:
        typer.echo("\n".join(listing), err=True)
        tail = f", and {len(warnings)} warning(s)" if warnings else ""
        typer.echo(f"INVALID: {len(errors)} problem(s) in {path.name}{tail}", err=True)
        raise typer.Exit(1)

    records = to_typed(raw)
    first = records["admit_date"].min().date()
    last = records["admit_date"].max().date()
    present = sorted(records["drg_group"].unique())
    typer.echo(f"OK: {len(records)} records, {first} to {last}, {len(present)} groups ({', '.join(present)})")
    if warnings:
        outside = int((~records["drg_group"].isin(catalogue.groups)).sum())
        typer.echo("\n".join(listing), err=True)
        typer.echo(
            f"{len(warnings)} warning(s) in {path.name}: {outside} record(s) in groups outside the {where}",
            err=True,
        )


def _catalogue_option(groups: Path | None) -> tuple[Any, str]:
    """The --groups catalogue (default: built-in) and how warnings name it; a bad file exits 2."""
    from core.drg import default_catalogue, load_catalogue

    try:
        catalogue = load_catalogue(groups) if groups is not None else default_catalogue()
    except ValueError as exc:
        typer.echo(f"error: --groups {exc}", err=True)
        raise typer.Exit(2) from None
    # The built-in list keeps its historical name; a custom one is named by its file.
    return catalogue, "DRG catalogue" if groups is None else f"catalogue {groups.name}"


def generate_command(
    hospitals: Annotated[int, typer.Option(min=1, help="Number of hospitals.")] = 20,
    years: Annotated[int, typer.Option(min=1, help="Years of data per hospital.")] = 3,
    out: Annotated[Path, typer.Option(help="Output directory.")] = Path("data"),
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    start: Annotated[str, typer.Option(help="First admission date (YYYY-MM-DD).")] = "2023-01-02",
    fmt: Annotated[str, typer.Option("--fmt", "--format", help="csv, csv.gz or parquet.")] = "csv",
    groups: Annotated[Path | None, typer.Option(
        "--groups", help="Group catalogue (CSV group,weight) the hospitals treat; default the built-in 12.",
        show_default=False)] = None,
) -> None:
    """Write synthetic hospitals' encounter records plus a public hospitals.csv."""
    import pandas as pd
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from core.synthetic import SyntheticConfig, end_date, generate

    if fmt not in FORMAT_CHOICES:
        raise typer.BadParameter(f"expected one of {', '.join(FORMAT_CHOICES)}", param_hint="--fmt")
    try:
        pd.Timestamp(start)
    except ValueError:
        raise typer.BadParameter("expected a date like 2023-01-02", param_hint="--start") from None

    catalogue, _ = _catalogue_option(groups)
    cfg = SyntheticConfig(hospitals=hospitals, years=years, start=start, seed=seed, groups=catalogue.groups)
    with Progress(
        TextColumn("generating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        transient=False,
    ) as progress:
        task = progress.add_task("hospitals", total=hospitals)
        table = generate(cfg, out, fmt, on_hospital=lambda _i: progress.advance(task))
    last = (end_date(cfg) - pd.Timedelta(days=1)).date()
    typer.echo(
        f"Wrote {len(table)} hospitals ({start} to {last}) to {out}/ "
        f"as hospital_NNN.{fmt} plus hospitals.csv"
    )


data_app = typer.Typer(help="Node files from public data.", no_args_is_help=True)


@data_app.command("public")
def public_command(
    name: Annotated[str, typer.Argument(help="Public dataset: peru-dengue (simulations/public_data.py).")],
    out: Annotated[Path, typer.Option(help="Output directory (one records file per region + hospitals.csv).")],
    regions: Annotated[int, typer.Option(min=1, help="Nodes: the regions with most cases.")] = 10,
    fmt: Annotated[str, typer.Option("--fmt", "--format", help="csv, csv.gz or parquet.")] = "csv",
) -> None:
    """Turn a real public surveillance dataset shipped in a package into node record files (one row per case)."""
    from simulations.public_data import MissingPackage, write_public

    if fmt not in FORMAT_CHOICES:
        raise typer.BadParameter(f"expected one of {', '.join(FORMAT_CHOICES)}", param_hint="--fmt")
    try:
        info = write_public(name, out, regions=regions, fmt=fmt)
    except (MissingPackage, ValueError) as exc:
        typer.echo(f"fedalloc data public: {exc}", err=True)
        raise typer.Exit(1) from None
    cases = sum(n["cases"] for n in info["nodes"])
    typer.echo(f"Wrote {len(info['nodes'])} nodes ({cases} records, weeks from {info['start']} to "
               f"{info['last_week_end']}) to {out}/ plus hospitals.csv and source.json; "
               f"use --start {info['start']} with sweep/simulate")
