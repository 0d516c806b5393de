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
