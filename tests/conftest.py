"""Shared fixtures: a small synthetic federation generated once per test session."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from core.synthetic import SyntheticConfig, generate

logging.getLogger("flwr").setLevel(logging.WARNING)

# Small but real: 3 years of weekly data so the default windows and cutoff apply.
FAST = {"num-server-rounds": 2, "local-epochs": 1}


@pytest.fixture(scope="session")
def sim_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hospitals")
    generate(SyntheticConfig(hospitals=4, years=3, seed=7), out)
    return out


@pytest.fixture
def node_configs(sim_data: Path, tmp_path: Path) -> list[dict]:
    """One config per hospital, each with a fresh ledger in this test's tmp dir."""
    return [
        {
            "data-path": str(sim_data / f"hospital_{i:03d}.csv"),
            "ledger-path": str(tmp_path / "ledgers" / f"hospital_{i:03d}.json"),
            "hospital": f"hospital_{i:03d}",
            "budget": 3.0,
            # shared synthetic files with a fresh ledger per test: per-run ledgers, no lifetime marker
            "synthetic": True,
        }
        for i in range(4)
    ]


@pytest.fixture
def run_settings(sim_data: Path, tmp_path: Path):
    from core.run_config import RunSettings

    def make(**extra):
        cfg = {**FAST, "results-dir": str(tmp_path / "results"), "run-name": "t",
               "resources-file": str(sim_data / "hospitals.csv")}
        cfg.update({k.replace("_", "-"): v for k, v in extra.items()})
        return RunSettings.from_mapping(cfg)

    return make
