"""`fedalloc generate` and `fedalloc validate` through the real CLI app."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from fedalloc.cli import app

runner = CliRunner()


def test_generate_writes_files(tmp_path):
    out = tmp_path / "data"
    result = runner.invoke(app, ["generate", "--hospitals", "2", "--years", "1", "--out", str(out), "--seed", "3"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["hospital_000.csv", "hospital_001.csv", "hospitals.csv"]
    assert len(pd.read_csv(out / "hospitals.csv")) == 2
    assert "Wrote 2 hospitals" in result.output


def test_generate_parquet_and_bad_format(tmp_path):
    result = runner.invoke(app, ["generate", "--hospitals", "1", "--years", "1", "--out", str(tmp_path), "--fmt", "parquet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "hospital_000.parquet").is_file()
    result = runner.invoke(app, ["validate", str(tmp_path / "hospital_000.parquet")])
    assert result.exit_code == 0 and result.output.startswith("OK: ")
    bad = runner.invoke(app, ["generate", "--out", str(tmp_path / "x"), "--fmt", "xlsx"])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()


def test_validate_ok(tmp_path):
    runner.invoke(app, ["generate", "--hospitals", "1", "--years", "1", "--out", str(tmp_path)])
    path = tmp_path / "hospital_000.csv"
    n = len(pd.read_csv(path))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"OK: {n} records, 2023-01-02 to 2023-12-31, 12 groups")


def test_validate_bad_file_names_file_row_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "admit_date,drg_group,length_of_stay\n"
        "2023-01-02,cardiac,2\n"
        "2023-01-03,cardiac,-3\n"
        "2023-01-04,,1\n"
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "bad.csv: row 3, column length_of_stay: negative value (-3)" in result.output
    assert "bad.csv: row 4, column drg_group: missing value" in result.output
    assert "OK:" not in result.output


def test_validate_missing_file_and_unknown_group(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "nope.csv")])
    assert result.exit_code == 1 and "nope.csv: file not found" in result.output
    path = tmp_path / "odd.csv"
    path.write_text("admit_date,drg_group\n2023-01-02,Cardiac\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0 and "warning" in result.output and "Cardiac" in result.output


UNKNOWN_ONLY = (
    "admit_date,drg_group\n"
    "2023-01-02,cardiac\n"
    "2023-01-03,Cardiac\n"
    "2023-01-04,plastic\n"
    "2023-01-05,Cardiac\n"
)


def test_validate_lists_unknown_groups_with_row_column_and_fate(tmp_path):
    path = tmp_path / "odd.csv"
    path.write_text(UNKNOWN_ONLY)
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output  # the node runs; the records are just not used
    assert result.stdout.startswith("OK: 4 records")
    warnings = result.stderr.strip().splitlines()
    assert warnings[0] == (
        "warning: odd.csv: row 3, column drg_group: 'Cardiac' is not in the DRG catalogue: the node drops its "
        "2 records from its demand series (no training, no D_i); did you mean 'cardiac'?")
    assert warnings[1].startswith("warning: odd.csv: row 4, column drg_group: 'plastic' is not in the DRG catalogue")
    assert "drops its 1 record from its demand series" in warnings[1]
    assert warnings[-1] == "2 warning(s) in odd.csv: 3 record(s) in groups outside the DRG catalogue"


def test_validate_lists_unknown_groups_together_with_errors(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(
        "admit_date,drg_group,length_of_stay\n"
        "2023-01-02,cardiac,-3\n"
        "2023-01-03,Cardiac,1\n"
        "2023-01-04,,1\n"
    )
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "bad.csv: row 2, column length_of_stay: negative value (-3)"
    assert lines[1].startswith("warning: bad.csv: row 3, column drg_group: 'Cardiac' is not in the DRG catalogue")
    assert lines[2] == "bad.csv: row 4, column drg_group: missing value"
    assert lines[3] == "INVALID: 2 problem(s) in bad.csv, and 1 warning(s)"
    assert "OK:" not in result.output


def test_validate_keeps_unknown_groups_visible_among_many_errors(tmp_path):
    rows = "".join(f"2023-01-02,cardiac,-{i + 1}\n" for i in range(30))
    path = tmp_path / "bad.csv"
    path.write_text("admit_date,drg_group,length_of_stay\n" + rows + "2023-02-01,Neuro,1\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "warning: bad.csv: row 32, column drg_group: 'Neuro'" in result.stderr
    assert "... and 10 more" in result.stderr
    assert "INVALID: 30 problem(s) in bad.csv, and 1 warning(s)" in result.stderr
