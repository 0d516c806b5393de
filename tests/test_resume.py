"""Coordinator checkpoint/resume: the coordinator dies after round 2 of 3 and a restart finishes.

The nodes are the same (same node configs, a fresh in-process grid with the same run id, as a
SuperLink keeps the run id of a run it resumes), so each node's ledger continues: three training
charges at one σ and one D_i release, within budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.clientapp import ClientApp
from typer.testing import CliRunner

from client.app import make_app
from client.ledger import Ledger
from server.app import run_federation
from simulations.inprocess import InProcessGrid

RUN_ID = 7


class CoordinatorDied(Exception):
    """Stands for a coordinator crash; deliberately not a ValueError/RoundFailed."""


def recording_app(seen: list[tuple[int, int, dict[str, np.ndarray]]]) -> ClientApp:
    """The honest app, noting (server-round, round-offset, global arrays) of every train message."""
    honest = make_app()
    app = ClientApp()

    @app.train()
    def train(msg, context):
        cfg = msg.content["config"]
        arrays = {k: a.numpy().copy() for k, a in msg.content["arrays"].items()}
        seen.append((int(cfg["server-round"]), int(cfg.get("round-offset", 0)), arrays))
        return honest(msg, context)

    @app.query("predict")
    def predict(msg, context):
        return honest(msg, context)

    return app


def test_coordinator_crash_then_resume(node_configs, run_settings):
    run = run_settings(**{"num-server-rounds": 3, "run-name": "crashy"})

    def die(r: int, n: int, rec: dict) -> None:
        if r == 2:
            raise CoordinatorDied("coordinator lost power after round 2")

    first: list = []
    with pytest.raises(CoordinatorDied):
        run_federation(InProcessGrid(recording_app(first), node_configs, run_id=RUN_ID), run, on_round=die)

    path = Path(run.results_dir) / run.run_name
    state = json.loads((path / "state.json").read_text())
    assert state["rounds_done"] == 2 and [r["round"] for r in state["rounds"]] == [1, 2]
    assert (path / "checkpoint.npz").exists() and not (path / "allocations.csv").exists()
    with np.load(path / "checkpoint.npz") as data:
        after_round_2 = {k: data[k] for k in data.files}
    for cfg in node_configs:
        assert [e["kind"] for e in Ledger.read(cfg["ledger-path"]).entries] == ["dpsgd", "dpsgd"]

    second: list = []
    out = run_federation(InProcessGrid(recording_app(second), node_configs, run_id=RUN_ID), run, resume=True)
    assert out.error is None, out.error

    # only round 3 was trained again, from the round-2 checkpoint, with the offset the nodes need
    assert {(r, off) for r, off, _ in second} == {(1, 2)} and len(second) == len(node_configs)
    for _, _, arrays in second:
        assert arrays.keys() == after_round_2.keys()
        assert all(np.array_equal(arrays[k], after_round_2[k]) for k in arrays)

    rounds = pd.read_csv(path / "rounds.csv")
    assert list(rounds["round"]) == [1, 2, 3] and (rounds.ok == len(node_configs)).all()
    assert [r["round"] for r in json.loads((path / "metrics.json").read_text())["rounds"]] == [1, 2, 3]
    alloc = pd.read_csv(path / "allocations.csv")
    assert sorted(alloc.hospital) == sorted(c["hospital"] for c in node_configs)

    for cfg in node_configs:
        led = Ledger.read(cfg["ledger-path"])
        kinds = [e["kind"] for e in led.entries]
        assert kinds == ["dpsgd"] * 3 + ["gaussian-release"]
        assert {e["run"] for e in led.entries} == {"crashy"}  # nodes know runs by name
        assert {e["run_id"] for e in led.entries} == {str(RUN_ID)}
        sigmas = [e["noise_multiplier"] for e in led.entries if e["kind"] == "dpsgd"]
        assert sigmas[2] == sigmas[0] == sigmas[1]  # round 3 kept the plan made in round 1
        assert [e["purpose"] for e in led.entries][:3] == [f"train round {i}" for i in (1, 2, 3)]
        assert led.epsilon() <= cfg["budget"]
        assert out.epsilon[cfg["hospital"]] == pytest.approx(led.epsilon())


def test_resume_without_checkpoint_runs_from_scratch(node_configs, run_settings):
    run = run_settings(**{"num-server-rounds": 1, "run-name": "fresh"})
    out = run_federation(InProcessGrid(make_app(), node_configs, run_id=RUN_ID), run, resume=True)
    assert out.error is None and [r["round"] for r in out.rounds] == [1]


def test_cli_resume_requires_a_name(tmp_path):
    from fedalloc.cli import app

    res = CliRunner().invoke(app, ["simulate", "--resume", "--engine", "inprocess", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--name" in res.output
    assert not any(tmp_path.iterdir())


def test_driver_resume_keeps_nodes_and_ledgers(sim_data, tmp_path):
    from simulations.driver import simulate

    common = dict(rounds=2, epsilon=3.0, data_dir=sim_data, resources=sim_data / "hospitals.csv",
                  engine="inprocess", results_dir=str(tmp_path), run_name="sim", overrides={"local-epochs": 1},
                  synthetic_data=True)

    def die(r: int, n: int, rec: dict) -> None:
        if r == 1:
            raise CoordinatorDied("after round 1")

    with pytest.raises(CoordinatorDied):
        simulate(**common, on_round=die)
    ledgers = sorted((tmp_path / "sim" / "nodes" / "ledgers").glob("*.json"))
    assert len(ledgers) == 4
    out = simulate(**common, resume=True)
    assert out.error is None and [r["round"] for r in out.rounds] == [1, 2]
    for f in ledgers:  # the crashed run's charges are still there, continued by the resumed run
        assert [e["kind"] for e in Ledger.read(f).entries] == ["dpsgd", "dpsgd", "gaussian-release"]
    with pytest.raises(ValueError, match="name"):
        simulate(**{**common, "run_name": None}, resume=True)
