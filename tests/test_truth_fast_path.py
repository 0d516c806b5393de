"""The driver's true demand (forecasts.csv) without parsing every node file again after the run:
taken from the check pass for researcher files, or read column-wise for validated files. Both
must equal the demand computed from the fully validated records (`load_records`)."""

from __future__ import annotations

import shutil

import pytest

from core.records import load_records
from simulations.driver import horizon_demand, prepare_nodes, true_demand


def reference(configs, run) -> dict[str, float]:
    return {c["hospital"]: horizon_demand(load_records(c["data-path"]), run) for c in configs}


@pytest.mark.parametrize("measure", ["admissions", "bed_days"])
def test_column_reader_matches_validated_records(node_configs, run_settings, measure):
    run = run_settings(measure=measure)
    got = true_demand(node_configs, run).set_index("hospital").true_demand.to_dict()
    want = reference(node_configs, run)
    assert got == want and all(v > 0 for v in want.values())


def test_truth_of_researcher_files_comes_from_the_check_pass(sim_data, tmp_path, run_settings, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(sim_data, data)
    run = run_settings(measure="bed_days")
    nodes = prepare_nodes(tmp_path / "run", hospitals=0, seed=0, budget=3.0, data_dir=data,
                          resources=data / "hospitals.csv", truth_run=run)
    assert nodes.truth == reference(nodes.node_configs, run)

    import simulations.driver as drv

    def no_reading(*a, **k):
        raise AssertionError("a node file was parsed again after the run")

    monkeypatch.setattr(drv, "_truth_records", no_reading)
    got = true_demand(nodes.node_configs, run, known=nodes.truth).set_index("hospital").true_demand.to_dict()
    assert got == nodes.truth


def test_truth_of_generated_hospitals_comes_from_the_generator(tmp_path, run_settings, monkeypatch):
    run = run_settings(measure="bed_days")
    nodes = prepare_nodes(tmp_path / "run", hospitals=3, seed=5, budget=3.0, truth_run=run)
    assert nodes.truth == reference(nodes.node_configs, run)
