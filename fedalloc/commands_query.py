"""`fedalloc query`: one DP analytics query over the hospital files in a directory.

Each file is one simulated node with its own lifetime ledger (default DIR/ledgers/, so repeated
queries keep spending the same budget, as they would in deployment). Without --data, synthetic
hospitals are generated into a temporary directory (ledgers included, so they vanish with it).
Registered in fedalloc.cli with ``app.command("query")(query_command)``.
"""

# No `from __future__ import annotations`: typer reads these annotations at runtime.

import json
import math
import tempfile
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from core.queries import QuerySpec

EXIT_BAD_INPUT = 2
EXIT_NO_ANSWER = 1
RECORD_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")


class MeanInterval(str, Enum):
    conservative = "conservative"
    delta = "delta"


class Statistic(str, Enum):
    count = "count"
    sum = "sum"
    mean = "mean"


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    Console(stderr=True, soft_wrap=True).print(f"error: {message}", markup=False, highlight=False)
    raise typer.Exit(code=code)


def node_files(data: Path, pattern: str) -> list[Path]:
    """Records files in `data` matching `pattern` (hospitals.csv, the public table, is skipped)."""
    files = [p for p in sorted(data.glob(pattern))
             if p.is_file() and p.name.lower().endswith(RECORD_SUFFIXES) and p.name != "hospitals.csv"]
    return files


def _num(x: float) -> str:
    if not math.isfinite(x):
        return "–"
    return f"{x:,.2f}" if abs(x) >= 1 or x == 0 else f"{x:.4g}"


def query_command(
    statistic: Annotated[Statistic, typer.Option("--statistic", help="count, sum or mean.")] = Statistic.count,
    column: Annotated[str | None, typer.Option(
        "--column", help="Value column for sum/mean (length_of_stay, cost, age).", show_default=False)] = None,
    lower: Annotated[float | None, typer.Option(
        "--lower", help="Public lower bound; values are clipped to it (sum/mean).", show_default=False)] = None,
    upper: Annotated[float | None, typer.Option(
        "--upper", help="Public upper bound; values are clipped to it (sum/mean).", show_default=False)] = None,
    group_by: Annotated[str | None, typer.Option(
        "--group-by", help="Histogram by this column (drg_group).", show_default=False)] = None,
    categories: Annotated[str | None, typer.Option(
        "--categories", help="Comma-separated public categories (required with --group-by).",
        show_default=False)] = None,
    start: Annotated[str | None, typer.Option(
        "--start", help="First admit_date included (YYYY-MM-DD).", show_default=False)] = None,
    end: Annotated[str | None, typer.Option(
        "--end", help="Last admit_date included (YYYY-MM-DD).", show_default=False)] = None,
    epsilon: Annotated[float | None, typer.Option(
        "--epsilon", help="ε this query costs every node.", show_default=False)] = None,
    spec_file: Annotated[Path | None, typer.Option(
        "--spec", help="JSON query spec instead of the options above.", show_default=False)] = None,
    data: Annotated[Path | None, typer.Option(
        "--data", help="Directory of hospital records files (default: synthetic, in a temp dir).",
        show_default=False)] = None,
    pattern: Annotated[str, typer.Option("--pattern", help="Glob for the node files in --data.")] = "hospital_*",
    ledgers: Annotated[Path | None, typer.Option(
        "--ledgers", help="Ledger directory (default: DATA/ledgers).", show_default=False)] = None,
    budget: Annotated[float, typer.Option("--budget", help="Each node's lifetime ε budget.")] = 3.0,
    delta: Annotated[float, typer.Option("--delta", help="Each node's δ.")] = 1e-5,
    level: Annotated[float, typer.Option("--level", help="Confidence level of the intervals.")] = 0.95,
    mean_interval: Annotated[MeanInterval, typer.Option(
        "--mean-interval", help="mean only: conservative (guaranteed) or delta (approximate, narrower).")
    ] = MeanInterval.conservative,
    hospitals: Annotated[int, typer.Option("--hospitals", min=1, help="Synthetic hospitals (no --data).")] = 5,
    years: Annotated[int, typer.Option("--years", min=1, help="Synthetic years of data (no --data).")] = 3,
    seed: Annotated[int, typer.Option("--seed", help="Synthetic data seed (no --data).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    run_config: Annotated[str | None, typer.Option(
        "--run-config", help="Run-config keys as for `flwr run --run-config`; a query uses "
        "groups-file (the public group catalogue its categories come from) and groups.",
        show_default=False)] = None,
) -> None:
    """Run one differentially private query (count, bounded sum or mean, optionally by category)."""
    groups = _query_catalogue(run_config)
    given = {"--column": column, "--lower": lower, "--upper": upper, "--group-by": group_by,
             "--categories": categories, "--start": start, "--end": end, "--epsilon": epsilon}
    spec = _query_spec(statistic, given, spec_file, groups)
    if not 0 < level < 1:
        _fail(f"--level must be between 0 and 1, got {level}")

    with tempfile.TemporaryDirectory(prefix="fedalloc-query-") as tmp:
        synthetic = data is None
        data, files = _records(data, pattern, Path(tmp), (hospitals, years, seed, groups))
        ledger_dir = ledgers if ledgers is not None else data / "ledgers"
        result = _run(spec, files, ledger_dir, budget, delta, level, mean_interval.value, synthetic=synthetic)

    _emit(result, len(files), as_json)
    if result.n_answered == 0:
        raise typer.Exit(code=EXIT_NO_ANSWER)


def _emit(result: Any, n_files: int, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=1))
    else:
        _print(result, n_files)


def _records(data: Path | None, pattern: str, tmp: Path, synthetic: tuple) -> tuple[Path, list[Path]]:
    """(records folder, node files): `data`, or synthetic hospitals generated into `tmp`."""
    if data is None:
        from core.synthetic import SyntheticConfig, generate

        hospitals, years, seed, groups = synthetic
        data = tmp
        generate(SyntheticConfig(hospitals=hospitals, years=years, seed=seed, groups=groups), data)
    elif not data.is_dir():
        _fail(f"{data}: not a directory")
    files = node_files(data, pattern)
    if not files:
        _fail(f"{data}: no records files matching {pattern!r}")
    return data, files


def _query_spec(statistic: Statistic, given: dict, spec_file: Path | None, groups: tuple[str, ...]) -> "QuerySpec":
    """The query from --spec or from the options in `given` (keyed by flag); bad input exits 2."""
    from core.queries import QuerySpec

    try:
        if spec_file is not None:
            clash = [k for k, v in given.items() if v is not None]
            if clash or statistic is not Statistic.count:
                _fail(f"--spec replaces the query options; drop {', '.join(clash) or '--statistic'}")
            try:
                return QuerySpec.from_json(spec_file.read_text(), catalogue=groups)
            except OSError as exc:
                _fail(f"{spec_file}: cannot read ({exc.strerror or exc})")
        if given["--epsilon"] is None:
            _fail("--epsilon is required (every query spends budget; there is no default)")
        cats = given["--categories"].split(",") if given["--categories"] is not None else None
        return QuerySpec(statistic=statistic.value, column=given["--column"], lower=given["--lower"],
                         upper=given["--upper"], group_by=given["--group-by"], categories=cats,
                         start=given["--start"], end=given["--end"], epsilon=given["--epsilon"], catalogue=groups)
    except ValueError as exc:
        _fail(f"invalid query: {exc}")


QUERY_RUN_CONFIG = ("groups-file", "groups")


def _query_catalogue(text: str | None) -> tuple[str, ...]:
    """The run's catalogue groups from --run-config (the built-in 12 without it); other keys are
    refused rather than silently ignored (a query has no rounds, model or allocation)."""
    from core.run_config import RunSettings
    from fedalloc.commands_sim import parse_run_config

    overrides = parse_run_config(text)
    other = sorted(set(overrides) - set(QUERY_RUN_CONFIG))
    if other:
        _fail(f"--run-config: fedalloc query uses only {', '.join(QUERY_RUN_CONFIG)}; drop {', '.join(other)}")
    try:
        return RunSettings.from_mapping(overrides).group_list
    except ValueError as exc:
        _fail(str(exc))


def _run(spec, files, ledger_dir, budget, delta, level, mean_interval, synthetic=False):  # type: ignore[no-untyped-def]
    from client.app import make_app
    from server.queries import run_query
    from simulations.inprocess import InProcessGrid

    configs = []
    for f in files:
        name = f.name.split(".")[0]
        configs.append({"data-path": str(f), "ledger-path": str(ledger_dir / f"{name}.json"),
                        "hospital": name, "budget": budget, "delta": delta, "synthetic": synthetic})
    grid = InProcessGrid(make_app(), configs)
    result = run_query(grid, spec, timeout=None, level=level, mean_interval=mean_interval)
    # People know hospitals, not Flower node ids: the grid numbers nodes 1001.. in config order.
    names = {1001 + i: c["hospital"] for i, c in enumerate(configs)}
    result.refused = [(names.get(n, n), why) for n, why in result.refused]
    return result


def _print(result, n_nodes: int) -> None:  # type: ignore[no-untyped-def]
    console = Console()
    e = result.estimate
    table = Table(title=result.spec.describe(), show_header=True, header_style="bold")
    for col, justify in (("bin", "left"), ("estimate", "right"), ("±", "right"),
                         (f"{e.level:.0%} CI", "right"), ("noise std", "right")):
        table.add_column(col, justify=justify)
    if e.noisy_count is not None:
        table.add_column("noisy count", justify="right")
    for i, label in enumerate(e.labels):
        half = (e.high[i] - e.low[i]) / 2
        row = [label, _num(e.estimate[i]), _num(half), f"[{_num(e.low[i])}, {_num(e.high[i])}]", _num(e.std[i])]
        if e.noisy_count is not None:
            row.append(_num(e.noisy_count[i]))
        table.add_row(*row)
    console.print(table)
    console.print(f"interval: {e.interval}", soft_wrap=True)
    console.print(f"{result.n_answered} of {n_nodes} node(s) answered", soft_wrap=True)
    for node_id, reason in result.refused:
        console.print(f"  {node_id} refused: {reason}", soft_wrap=True)
    if result.epsilon:
        eps = result.epsilon.values()
        console.print(f"ε spent per node after this query: {min(eps):.3f} – {max(eps):.3f}", soft_wrap=True)
    if result.violations:
        console.print(f"[red]audit: {len(result.violations)} reply/replies violated the allowlist[/red]")
