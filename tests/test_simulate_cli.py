"""`fedalloc simulate --data DIR` on a user's own node files."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedalloc.cli import app


def test_simulate_on_user_files(sim_data, tmp_path):
    data = tmp_path / "data"  # the user's own copy: its lifetime ledgers go to data/ledgers
    shutil.copytree(sim_data, data)
    res = CliRunner().invoke(app, [
        "simulate", "--data", str(data), "--resources", str(data / "hospitals.csv"), "--engine", "inprocess",
        "--rounds", "1", "--total", "120", "--out", str(tmp_path), "--name", "mine"])
    assert res.exit_code == 0, res.output
    assert "results in" in res.output
    alloc = pd.read_csv(tmp_path / "mine" / "allocations.csv")
    assert sorted(alloc.hospital) == [f"hospital_{i:03d}" for i in range(4)]
    assert alloc.allocation.sum() == pytest.approx(120)
    fc = pd.read_csv(tmp_path / "mine" / "forecasts.csv")
    assert (fc.true_demand > 0).all()
    # what the released (noisy) D_i moved: the seed policy on the true D_i, same resources and total
    from core.allocation import allocate_array

    res_i = alloc.set_index("hospital").loc[fc.hospital, "resources"].to_numpy()
    expected = allocate_array(fc.true_demand.to_numpy(), res_i, 120.0, "seed")
    assert fc.alloc_true.to_numpy() == pytest.approx(expected)
    assert fc.alloc_change.to_numpy() == pytest.approx(
        alloc.set_index("hospital").loc[fc.hospital, "allocation"].to_numpy() - expected)
    assert fc.alloc_change.sum() == pytest.approx(0, abs=1e-9)
    assert (fc.demand_lo <= fc.released_demand).all() and (fc.released_demand <= fc.demand_hi).all()


def test_bad_node_file_is_named_and_nothing_runs(sim_data, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(sim_data, data)
    bad = data / "hospital_002.csv"
    lines = bad.read_text().splitlines()
    lines[4] = lines[4].replace(lines[4].split(",")[2], "2024-13-45")  # admit_date of CSV line 5
    bad.write_text("\n".join(lines) + "\n")
    res = CliRunner().invoke(app, ["simulate", "--data", str(data), "--engine", "inprocess", "--rounds", "1",
                                   "--out", str(tmp_path / "out"), "--name", "bad"])
    assert res.exit_code == 2
    assert "hospital_002.csv" in res.output and "row 5" in res.output and "admit_date" in res.output
    assert not (tmp_path / "out" / "bad" / "rounds.csv").exists()


def test_simulate_with_secure_aggregation(tmp_path):
    res = CliRunner().invoke(app, ["simulate", "--secagg", "--hospitals", "3", "--rounds", "1", "--engine", "inprocess",
                                   "--out", str(tmp_path), "--name", "sa"])
    assert res.exit_code == 0, res.output
    metrics = __import__("json").loads((tmp_path / "sa" / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["audit_violations"] == []
    assert pd.read_csv(tmp_path / "sa" / "allocations.csv").allocation.sum() == pytest.approx(1000)
