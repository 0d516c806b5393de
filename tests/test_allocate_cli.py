"""`fedalloc allocate`: good files produce the table and CSV, bad files one precise error."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import typer
from typer.testing import CliRunner

from core.allocation_io import DemandFileError, read_demand_csv
from fedalloc.commands_allocate import allocate_command

# A local app keeps these tests independent of the other sub-commands wired into fedalloc.cli.
app = typer.Typer()
app.command("allocate")(allocate_command)


@app.callback()
def _group() -> None:
    """Forces sub-command dispatch, as in the real CLI."""


runner = CliRunner()

GOOD = """hospital,demand,resources,cap,floor,demand_std,demand_respiratory,demand_cardiac
St Mary,100,0.8,500,300,10,60,40
General,200,0.6,250,,50,150,50
Rural,300,0.5,,0,0,100,200
"""


def _write(tmp_path: Path, text: str, name: str = "demand.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def _run(*args: str | Path):
    return runner.invoke(app, ["allocate", *map(str, args)])


def test_seed_writes_csv_with_columns_and_sum(tmp_path: Path) -> None:
    src, out = _write(tmp_path, GOOD), tmp_path / "alloc.csv"
    res = _run(src, "--total", "1000", "--out", out)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert list(table.columns)[:3] == ["hospital", "demand", "resources"]
    assert {"weight", "allocation"} <= set(table.columns)
    assert table["hospital"].tolist() == ["St Mary", "General", "Rural"]
    assert table["allocation"].sum() == pytest.approx(1000)
    assert table["allocation"].tolist() == pytest.approx([1600 / 7, 2400 / 7, 3000 / 7])
    assert "gini" in res.stdout and "jain" in res.stdout and "shortfall" in res.stdout
    assert "only apply to --policy capped" in res.stdout  # cap/floor present but unused


def test_capped_integer_respects_file_bounds(tmp_path: Path) -> None:
    src, out = _write(tmp_path, GOOD), tmp_path / "alloc.csv"
    res = _run(src, "--total", "1000", "--policy", "capped", "--integer", "--out", out)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert table["allocation"].dtype.kind == "i"
    assert table["allocation"].sum() == 1000
    # St Mary floor 300, General cap 250; the blank cap reads as uncapped, the blank floor as 0.
    assert table["allocation"].tolist() == [300, 250, 450]
    assert {"cap", "floor"} <= set(table.columns)


def test_drg_budget_from_group_columns(tmp_path: Path) -> None:
    src, out = _write(tmp_path, GOOD), tmp_path / "alloc.csv"
    res = _run(src, "--policy", "drg_budget", "--budget", "50000", "--base-rate", "200", "--out", out)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    # raw = 200·(1.1·resp + 1.6·card) = 26000, 49000, 86000 → scaled to 50000
    assert table["raw_payment"].tolist() == pytest.approx([26000, 49000, 86000])
    assert table["allocation"].sum() == pytest.approx(50000)
    assert table["allocation"][0] == pytest.approx(26000 * 50000 / 161000)


def test_quantile_uses_demand_std(tmp_path: Path) -> None:
    src, out = _write(tmp_path, GOOD), tmp_path / "alloc.csv"
    res = _run(src, "--total", "1000", "--policy", "proportional", "--quantile", "0.9", "--out", out)
    assert res.exit_code == 0, res.output
    table = pd.read_csv(out)
    assert table["demand_q"][2] == pytest.approx(300)  # std 0
    assert table["demand_q"][1] > 200
    assert table["allocation"].sum() == pytest.approx(1000)


def test_show_limits_printed_rows(tmp_path: Path) -> None:
    rows = "".join(f"h{i},{i + 1},1\n" for i in range(30))
    src = _write(tmp_path, "hospital,demand,resources\n" + rows)
    res = _run(src, "--total", "100", "--policy", "proportional", "--show", "5")
    assert res.exit_code == 0, res.output
    assert "h4" in res.stdout and "h29" not in res.stdout
    assert "25 more rows" in res.stdout


def test_hospital_names_are_not_markup(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand,resources\n[bold]St Mary[/bold],1,1\nB,1,1\n")
    res = _run(src, "--total", "2", "--policy", "proportional")
    assert res.exit_code == 0, res.output
    assert "[bold]St Mary[/bold]" in res.stdout


BAD_FILES = [
    ("hospital,demand,resources\nA,1,1\nB,abc,1\n", 3, "demand", "not a number ('abc')"),
    ("hospital,demand,resources\nA,1,1\nB,-4,1\n", 3, "demand", "must be >= 0 ('-4')"),
    ("hospital,demand,resources\nA,1,1\n\nB,2,\n", 4, "resources", "empty value"),  # blank line 3 counts
    ("hospital,demand,resources\nA,1,nan\n", 2, "resources", "NaN is not allowed"),
    ("hospital,demand,resources\nA,inf,1\n", 2, "demand", "must be finite"),
    ("hospital,demand\nA,1\n", 1, "resources", "missing required column"),
    ("hospital,demand,resources\nA,1,1\nA,2,1\n", 3, "hospital", "duplicate hospital 'A' (first on line 2)"),
    ("hospital,demand,resources\n,1,1\n", 2, "hospital", "empty value"),
    ("hospital,demand,resources,cap,floor\nA,1,1,5,2\nB,1,1,1,3\n", 3, "floor", "floor 3.0 is above cap 1.0"),
    ("hospital,demand,resources,demand_std\nA,1,1,x\n", 2, "demand_std", "not a number"),
]


@pytest.mark.parametrize(("text", "line", "column", "problem"), BAD_FILES)
def test_bad_file_names_file_line_and_column(tmp_path: Path, text: str, line: int, column: str,
                                            problem: str) -> None:
    src, out = _write(tmp_path, text, "bad.csv"), tmp_path / "alloc.csv"
    res = _run(src, "--total", "10", "--out", out)
    assert res.exit_code == 2
    err = res.stderr.strip()
    assert "\n" not in err  # one line
    assert err.startswith("error: ") and str(src) in err
    assert f"line {line}" in err and f"column '{column}'" in err and problem in err
    assert not out.exists()
    assert res.stdout == ""


def test_drg_unknown_group_column(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand,resources,demand_plastic\nA,1,1,3\n")
    res = _run(src, "--policy", "drg_budget", "--total", "100")
    assert res.exit_code == 2
    assert "line 1, column 'demand_plastic': unknown DRG group 'plastic'" in res.stderr
    # the same file is fine for a policy that does not read group columns
    assert _run(src, "--policy", "proportional", "--total", "100").exit_code == 0


def test_drg_without_group_columns(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand,resources\nA,1,1\n")
    res = _run(src, "--policy", "drg_budget", "--total", "100")
    assert res.exit_code == 2 and "demand_<group>" in res.stderr


@pytest.mark.parametrize(
    ("text", "args", "message"),
    [
        ("hospital,demand,resources,cap\nA,1,1,2\nB,1,1,3\n", ["--policy", "capped", "--total", "10"],
         "infeasible: sum of caps (5.0) is below total (10.0)"),
        ("hospital,demand,resources,cap,floor\nA,1,1,9,2.2\nB,1,1,2.8,2.2\n",
         ["--policy", "capped", "--integer", "--total", "5"],
         "line 3, column 'floor': no whole number between floors[1] (2.2) and caps[1] (2.8)"),
        ("hospital,demand,resources\nA,1,1\n", ["--quantile", "0.9", "--total", "1"],
         "line 1: --quantile needs a demand_std column"),
    ],
)
def test_infeasible_or_incomplete_input(tmp_path: Path, text: str, args: list[str], message: str) -> None:
    src, out = _write(tmp_path, text), tmp_path / "alloc.csv"
    res = _run(src, *args, "--out", out)
    assert res.exit_code == 2
    assert message in res.stderr and str(src) in res.stderr
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--total is required for policy seed"),
        (["--total", "-5"], "--total is negative (-5.0)"),
        (["--total", "10.5", "--integer"], "--total must be a whole number"),
        (["--total", "10", "--quantile", "1.5"], "--quantile must be strictly between 0 and 1"),
        (["--total", "10", "--budget", "5"], "--budget only applies to --policy drg_budget"),
        (["--policy", "drg_budget", "--total", "10", "--budget", "5"], "name the same amount"),
    ],
)
def test_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    src = _write(tmp_path, GOOD)
    res = _run(src, *args)
    assert res.exit_code == 2
    assert message in res.stderr


def test_missing_and_empty_files(tmp_path: Path) -> None:
    res = _run(tmp_path / "nope.csv", "--total", "1")
    assert res.exit_code == 2 and "nope.csv: file not found" in res.stderr
    res = _run(_write(tmp_path, ""), "--total", "1")
    assert res.exit_code == 2 and "file is empty" in res.stderr
    res = _run(_write(tmp_path, "hospital,demand,resources\n"), "--total", "1")
    assert res.exit_code == 2 and "no hospital rows" in res.stderr


def test_unknown_policy_rejected_by_cli(tmp_path: Path) -> None:
    res = _run(_write(tmp_path, GOOD), "--total", "1", "--policy", "greedy")
    assert res.exit_code != 0


def test_reader_returns_line_numbers_and_groups(tmp_path: Path) -> None:
    data = read_demand_csv(_write(tmp_path, "hospital,demand,resources,demand_cardiac\nA,1,2,3\n\nB,4,5,6\n"))
    assert data.lines.tolist() == [2, 4]
    assert list(data.group_demand.columns) == ["cardiac"]
    assert data.cap is None and data.floor is None
    with pytest.raises(DemandFileError) as err:
        read_demand_csv(_write(tmp_path, "hospital,demand,resources\nA,1,2\nB,x,5\n"))
    assert (err.value.line, err.value.column) == (3, "demand")


def test_registered_on_main_cli() -> None:
    from fedalloc.cli import app as main_app

    names = {c.name for c in main_app.registered_commands}
    assert "allocate" in names


# -- every problem at once, capped note, output file format -----------------------------------

MANY_BAD = (
    "hospital,demand,resources,cap,floor\n"
    "A,1,1,5,2\n"
    "B,abc,1,,\n"        # line 3: demand
    "A,2,-1,,\n"         # line 4: duplicate hospital, resources < 0
    ",3,1,1,4\n"         # line 5: empty hospital, floor above cap
    "C,inf,,x,\n"        # line 6: demand not finite, resources empty, cap not a number
)


def test_every_problem_in_the_file_is_reported(tmp_path: Path) -> None:
    src, out = _write(tmp_path, MANY_BAD, "bad.csv"), tmp_path / "alloc.csv"
    res = _run(src, "--total", "10", "--out", out)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    expected = [
        (3, "demand", "not a number ('abc')"),
        (4, "hospital", "duplicate hospital 'A' (first on line 2)"),
        (4, "resources", "must be >= 0 ('-1')"),
        (5, "hospital", "empty value"),
        (5, "floor", "floor 4.0 is above cap 1.0"),
        (6, "demand", "must be finite ('inf')"),
        (6, "resources", "empty value"),
        (6, "cap", "not a number ('x')"),
    ]
    assert lines[:-1] == [f"error: {src}: line {n}, column '{c}': {p}" for n, c, p in expected]
    assert lines[-1] == f"{len(expected)} problems in {src}; nothing allocated"
    assert res.stdout == "" and not out.exists()


def test_missing_column_and_bad_cells_reported_together(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand\nA,x\nB,-2\n", "bad.csv")
    res = _run(src, "--total", "10")
    assert res.exit_code == 2
    err = res.stderr
    assert f"{src}: line 1, column 'resources': missing required column" in err
    assert f"{src}: line 2, column 'demand': not a number ('x')" in err
    assert f"{src}: line 3, column 'demand': must be >= 0 ('-2')" in err
    assert "3 problems in" in err


def test_long_problem_lists_are_capped(tmp_path: Path) -> None:
    rows = "".join(f"h{i},bad{i},1\n" for i in range(30))
    src = _write(tmp_path, "hospital,demand,resources\n" + rows, "bad.csv")
    res = _run(src, "--total", "10")
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 22  # 20 problems, "... and 10 more", the summary
    assert lines[0].endswith("line 2, column 'demand': not a number ('bad0')")
    assert lines[20] == "... and 10 more"
    assert lines[21] == f"30 problems in {src}; nothing allocated"


def test_reader_collects_every_problem(tmp_path: Path) -> None:
    with pytest.raises(DemandFileError) as err:
        read_demand_csv(_write(tmp_path, MANY_BAD))
    got = [(p.line, p.column) for p in err.value.problems]
    assert got == [(3, "demand"), (4, "hospital"), (4, "resources"), (5, "hospital"), (5, "floor"),
                   (6, "demand"), (6, "resources"), (6, "cap")]
    assert (err.value.line, err.value.column) == (3, "demand")  # the first one, as before


def test_drg_unknown_groups_and_bad_cells_together(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand,resources,demand_plastic,demand_cardiac,demand_x\nA,1,1,3,q,2\n")
    res = _run(src, "--policy", "drg_budget", "--total", "100")
    assert res.exit_code == 2
    assert "line 1, column 'demand_plastic': unknown DRG group 'plastic'" in res.stderr
    assert "line 1, column 'demand_x': unknown DRG group 'x'" in res.stderr
    assert "line 2, column 'demand_cardiac': not a number ('q')" in res.stderr


def test_capped_without_cap_column_says_it_is_proportional(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand,resources\nA,1,5\nB,3,1\n")
    capped = _run(src, "--total", "100", "--policy", "capped", "--out", tmp_path / "c.csv")
    prop = _run(src, "--total", "100", "--policy", "proportional", "--out", tmp_path / "p.csv")
    assert capped.exit_code == 0 and prop.exit_code == 0, capped.output + prop.output
    assert "note: no cap column; capped = proportional" in capped.stdout
    assert "note:" not in prop.stdout
    assert pd.read_csv(tmp_path / "c.csv")["allocation"].tolist() == pytest.approx(
        pd.read_csv(tmp_path / "p.csv")["allocation"].tolist())


def test_capped_with_floor_but_no_cap_says_so(tmp_path: Path) -> None:
    src = _write(tmp_path, "hospital,demand,resources,floor\nA,1,5,40\nB,3,1,0\n")
    res = _run(src, "--total", "100", "--policy", "capped")
    assert res.exit_code == 0, res.output
    assert "note: no cap column; capped = proportional above the floors" in res.stdout
    # with a cap column there is nothing to say
    src = _write(tmp_path, "hospital,demand,resources,cap\nA,1,5,\nB,3,1,60\n", "capped.csv")
    res = _run(src, "--total", "100", "--policy", "capped")
    assert res.exit_code == 0 and "no cap column" not in res.stdout


@pytest.mark.parametrize("args", [
    ["--total", "1000"],
    ["--total", "1000", "--policy", "capped", "--integer"],
    ["--total", "1000", "--policy", "proportional", "--quantile", "0.9"],
    ["--policy", "drg_budget", "--budget", "5000"],
])
def test_out_csv_ends_with_one_newline(tmp_path: Path, args: list[str]) -> None:
    src, out = _write(tmp_path, GOOD), tmp_path / "alloc.csv"
    res = _run(src, *args, "--out", out)
    assert res.exit_code == 0, res.output
    data = out.read_bytes()
    assert data.endswith(b"\n") and not data.endswith(b"\n\n")
    assert b"\r" not in data
    assert data.count(b"\n") == 4  # header + 3 hospitals, every line terminated
