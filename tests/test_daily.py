"""`period='day'` end to end on a few months of daily records, set with `--run-config`."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from fedalloc.cli import app


def test_daily_run_on_four_months_of_history(tmp_path):
    res = CliRunner().invoke(app, [
        "simulate", "--engine", "inprocess", "--hospitals", "3", "--rounds", "1", "--out", str(tmp_path),
        "--name", "daily", "--start", "2025-08-01", "--cutoff", "2025-12-01",
        "--run-config", "period='day' lags=14 release-blocks=2 horizon=7 local-epochs=1"])
    assert res.exit_code == 0, res.output
    fc = pd.read_csv(tmp_path / "daily" / "forecasts.csv")
    # a 7-day horizon of daily admissions: the truth is a week, not four weeks, of demand
    assert len(fc) == 3 and (fc.true_demand > 0).all() and (fc.released_demand > 0).all()
    weekly = pd.read_csv(tmp_path / "daily" / "nodes" / "hospital_000.csv", parse_dates=["admit_date"])
    week = weekly[(weekly.admit_date >= "2025-12-01") & (weekly.admit_date < "2025-12-08")]
    assert fc.set_index("hospital").loc["hospital_000", "true_demand"] == len(week)


def test_bad_run_config_key_is_one_line(tmp_path):
    res = CliRunner().invoke(app, ["simulate", "--out", str(tmp_path / "r"), "--run-config", "lagz=3"])
    assert res.exit_code == 2 and "unknown run-config key 'lagz'" in res.output
    assert not (tmp_path / "r").exists()
