"""One real Ray-backed Flower simulation, as `fedalloc simulate` runs it (slowest test)."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from simulations.driver import simulate


def test_simulate_on_flower_ray_engine(tmp_path):
    rounds_seen = []
    out = simulate(
        hospitals=3, rounds=2, epsilon=3.0, engine="ray", results_dir=str(tmp_path), run_name="ray",
        overrides={"local-epochs": 1}, on_round=lambda r, n, rec: rounds_seen.append((r, rec["ok"])),
    )
    assert out.error is None
    assert rounds_seen == [(1, 3), (2, 3)]
    alloc = pd.read_csv(out.path / "allocations.csv")
    assert alloc.allocation.sum() == pytest.approx(1000.0)
    fc = pd.read_csv(out.path / "forecasts.csv")
    # issue #12 added the released 80 % interval and the allocation change the released D_i caused
    assert list(fc.columns) == ["hospital", "released_demand", "demand_lo", "demand_hi", "true_demand", "abs_error",
                                "alloc_true", "alloc_change"]
    assert (fc.true_demand > 0).all() and (fc.released_demand > 0).all()
    metrics = json.loads((out.path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["audit_violations"] == []
    assert all(0 < e <= 3.0 for e in metrics["epsilon_per_node"].values())
