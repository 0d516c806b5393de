"""`fedalloc allocate`: split a total across hospitals from a demand CSV and report fairness.

Registered in fedalloc.cli with ``app.command("allocate")(allocate_command)``. Only the light
allocation core is imported (numpy, pandas), never flwr or torch.
"""

# No `from __future__ import annotations`: typer reads these annotations at runtime.

import re
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import numpy as np
import pandas as pd
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from core.allocation import POLICIES, allocate
from core.allocation_io import DemandFileError, DemandTable, read_demand_csv, write_allocation_csv
from core.drg import Catalogue, default_catalogue, load_catalogue
from core.numeric_checks import as_scalar

Policy = Enum("Policy", {name: name for name in POLICIES}, type=str)  # type: ignore[misc]

EXIT_BAD_INPUT = 2
MAX_LISTED = 20  # problems printed for a bad file; the rest are counted
# Core errors name an argument and an index ("floors[3] ..."); map them back to the file's column.
_ARG_TO_COLUMN = {"demand": "demand", "resources": "resources", "floors": "floor", "caps": "cap",
                  "demand_std": "demand_std"}
_INDEXED = re.compile(r"\b(\w+)\[(\d+)\]")


def _fail(message: str) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code=EXIT_BAD_INPUT)


def _fail_file(exc: DemandFileError) -> NoReturn:
    """Every problem of a bad demand file, one `error:` line each (at most MAX_LISTED), then a count."""
    err = Console(stderr=True, soft_wrap=True)
    for problem in exc.problems[:MAX_LISTED]:
        err.print(f"error: {problem}", markup=False, highlight=False)
    if len(exc.problems) > MAX_LISTED:
        err.print(f"... and {len(exc.problems) - MAX_LISTED} more", markup=False, highlight=False)
    if len(exc.problems) > 1:
        err.print(f"{len(exc.problems)} problems in {exc.path}; nothing allocated", markup=False,
                  highlight=False)
    raise typer.Exit(code=EXIT_BAD_INPUT)


def _locate(exc: ValueError, data: DemandTable) -> str:
    msg = str(exc)
    m = _INDEXED.search(msg)
    if m and m.group(1) in _ARG_TO_COLUMN and int(m.group(2)) < len(data):
        line = int(data.lines[int(m.group(2))])
        return f"{data.path}: line {line}, column {_ARG_TO_COLUMN[m.group(1)]!r}: {msg}"
    return f"{data.path}: {msg}"


def _fmt(value: Any) -> str:
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        if np.isnan(value):
            return "–"
        if np.isinf(value):
            return "∞"
        return f"{value:,.4f}" if abs(value) < 1 else f"{value:,.2f}"
    return str(value)


def _print_table(console: Console, table: pd.DataFrame, show: int) -> None:
    view = table if show <= 0 else table.head(show)
    out = Table(show_header=True, header_style="bold")
    for col in view.columns:
        out.add_column(str(col), justify="left" if col == "hospital" else "right")
    for row in view.itertuples(index=False):
        # Text, not str: a hospital named "[b]…" must print as written, not as rich markup.
        out.add_row(*(Text(_fmt(v)) for v in row))
    console.print(out)
    hidden = len(table) - len(view)
    if hidden > 0:
        console.print(f"… {hidden:,} more rows (--show 0 prints all; --out writes the CSV)")


def _catalogue_option(groups: Path | None, policy: str) -> Catalogue:
    """The --groups catalogue whose weights price drg_budget (default: the built-in 12)."""
    if groups is not None and policy != "drg_budget":
        _fail(f"--groups only applies to --policy drg_budget, not {policy}")
    try:
        return load_catalogue(groups) if groups is not None else default_catalogue()
    except ValueError as exc:
        _fail(f"--groups {exc}")


def allocate_command(
    demand_csv: Annotated[Path, typer.Argument(
        help="CSV with hospital,demand,resources [,cap,floor,demand_std,demand_<group>…]",
        show_default=False)],
    total: Annotated[float | None, typer.Option(
        "--total", show_default=False,
        help="Amount to allocate (for drg_budget: the payment budget, same as --budget).")] = None,
    policy: Annotated[Policy, typer.Option("--policy", help="Allocation policy.")] = Policy.seed,
    integer: Annotated[bool, typer.Option(
        "--integer", help="Whole units (beds, ventilators): largest remainder, sums exactly.")
    ] = False,
    quantile: Annotated[float | None, typer.Option(
        "--quantile", show_default=False,
        help="Allocate on this normal quantile of demand (needs a demand_std column).")] = None,
    budget: Annotated[float | None, typer.Option(
        "--budget", help="drg_budget: global payment cap.", show_default=False)] = None,
    base_rate: Annotated[float, typer.Option(
        "--base-rate", help="drg_budget: payment per unit of relative weight.")] = 1.0,
    groups: Annotated[Path | None, typer.Option(
        "--groups", help="drg_budget: the group catalogue (CSV group,weight; run-config groups-file) "
        "whose weights price each demand_<group>. Default: the built-in 12 DRG groups.", show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Write the allocation table to this CSV.", show_default=False)] = None,
    show: Annotated[int, typer.Option("--show", help="Rows to print (0 = all).")] = 20,
) -> None:
    """Allocate a total across hospitals under a policy; print the table and fairness summary."""
    name = policy.value
    _check_options(name, total, budget, base_rate, quantile, integer)
    catalogue = _catalogue_option(groups, name)
    try:
        data = read_demand_csv(demand_csv, known_groups=catalogue.groups if name == "drg_budget" else None)
    except DemandFileError as exc:
        _fail_file(exc)
    if quantile is not None and data.demand_std is None:
        _fail(f"{data.path}: line 1: --quantile needs a demand_std column")
    console = Console()
    _note_ignored_columns(console, data, name)
    amount = budget if name == "drg_budget" and budget is not None else total
    kwargs: dict[str, Any] = {"integer": integer, "hospitals": data.hospital}
    if name == "capped":
        kwargs.update(caps=data.cap, floors=data.floor)
    if quantile is not None:
        kwargs.update(quantile=quantile, demand_std=data.demand_std)
    if name == "drg_budget":
        kwargs.update(group_demand=data.group_demand, base_rate=base_rate, relative_weights=catalogue.weights)
    try:
        result = allocate(data.demand, data.resources, amount, name, **kwargs)
    except ValueError as exc:
        _fail(_locate(exc, data))
    if out is not None:
        try:
            write_allocation_csv(result.table, out)
        except OSError as exc:
            _fail(f"{out}: cannot write ({exc.strerror or exc})")
    _print_table(console, result.table, show)
    console.print(f"policy {name} · {len(data):,} hospitals · "
                  f"Σ allocation {_fmt(result.table['allocation'].sum())} of {_fmt(float(amount))}", soft_wrap=True)
    print_fairness(console, result.fairness, name)
    if out is not None:
        console.print(f"wrote {out}")


def _check_options(name: str, total: float | None, budget: float | None, base_rate: float,
                   quantile: float | None, integer: bool) -> None:
    """Option errors are reported as such, before the file is read, so they never point at the file."""
    is_drg = name == "drg_budget"
    if total is None and not (is_drg and budget is not None):
        _fail(f"--total is required for policy {name}" + (" (or give --budget)" if is_drg else ""))
    if not is_drg and budget is not None:
        _fail(f"--budget only applies to --policy drg_budget, not {name}")
    if is_drg and quantile is not None:
        _fail("--quantile does not apply to --policy drg_budget")
    if is_drg and None not in (total, budget) and total != budget:
        _fail(f"for drg_budget --total and --budget name the same amount; got {total} and {budget}")
    for flag, value, whole in (("--total", total, integer), ("--budget", budget, integer),
                               ("--base-rate", base_rate, False)):
        if value is not None:
            try:
                as_scalar(flag, value, integer=whole)
            except ValueError as exc:
                _fail(str(exc))
    if quantile is not None and not 0.0 < quantile < 1.0:
        _fail(f"--quantile must be strictly between 0 and 1, got {quantile}")


def _note_ignored_columns(console: Console, data: DemandTable, name: str) -> None:
    unused = [c for c, v in (("cap", data.cap), ("floor", data.floor)) if v is not None]
    if unused and name != "capped":
        console.print(f"note: column(s) {', '.join(unused)} only apply to --policy capped; ignored")
    if name == "capped" and data.cap is None:
        # Without caps the one level λ is never clipped from above: A_i = max(λ·D_i, floor_i).
        console.print("note: no cap column; capped = proportional"
                      + (" above the floors" if data.floor is not None else ""))


def print_fairness(console: Console, f: dict[str, float], policy: str) -> None:
    """The fairness summary in planner terms: against a demand-proportional split, in units."""
    console.print(
        f"fairness vs a demand-proportional split: {100 * f['misallocated_share']:.1f} % of the total "
        f"goes elsewhere · largest share gap {100 * f['max_share_gap']:.1f} points · worst-served "
        f"hospital gets {100 * f['min_coverage']:.0f} % of its demand share "
        f"(max relative shortfall {f['max_relative_shortfall']:.4f})",
        soft_wrap=True,
    )
    # Gini/Jain rate the policy, not the forecast: under seed coverage ∝ R_i (core/fairness.py).
    console.print(
        f"coverage inequality A/D: gini {f['gini']:.4f} · jain {f['jain']:.4f}"
        + (" (seed policy: set by resources R_i alone)" if policy == "seed" else ""),
        soft_wrap=True,
    )
