"""What a node enforces whatever the coordinator asks, and one lifetime ledger on every path.

- a run's plan (σ, q, steps, rounds, training config) is fixed at its first request; rounds past
  it, a changed plan, or a run beyond the node's own limits are refused before any charge;
- a round asked again (a resumed coordinator) gets the identical, already paid-for update;
- `simulate --data` runs and `query --data` on the same files charge one ledger per hospital;
- a deleted lifetime ledger is refused, never restarted at 0;
- a request that cannot succeed is one line from the CLI and leaves no ledger anywhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from client.ledger import Ledger, LedgerError
from client.limits import OutsidePlan
from client.node import NodeSettings
from fedalloc.cli import app as cli


def _node(cfg: dict, **extra) -> NodeSettings:
    return NodeSettings.from_config({**cfg, **extra})


def _state(run):
    from forecasting.model import build_model

    return build_model(run.lags, run.horizon, 12).state_dict()


def test_rounds_past_the_plan_are_refused_and_a_repeat_is_free(node_configs, run_settings):
    from client.tasks import train_task

    run = run_settings(**{"num-server-rounds": 2, "run-name": "plan"})
    node = _node(node_configs[0], **{"debug-seed": 1})
    state = _state(run)
    first, m1 = train_task(state, run, node, "1", 1)
    second, m2 = train_task(first, run, node, "1", 2)
    ledger_before = Ledger.read(node.ledger_path).summary()  # the main file alone misses the WAL
    for r in (3, 39, 0):
        with pytest.raises(OutsidePlan):
            train_task(second, run, node, "1", r)
    # the same round with the same input model: the stored update, no new charge, no new noise
    again, m2_again = train_task(first, run, node, "1", 2)
    assert all(np.array_equal(again[k].numpy(), second[k].numpy()) for k in second) and m2_again == m2
    # the same round for another model would be a second release of that round
    with pytest.raises(OutsidePlan):
        train_task(second, run, node, "1", 2)
    # a coordinator cannot change the plan of a running run (σ would follow)
    with pytest.raises(OutsidePlan):
        train_task(first, run_settings(**{"num-server-rounds": 40, "run-name": "plan"}), node, "1", 2)
    with pytest.raises(OutsidePlan):
        train_task(first, run_settings(**{"num-server-rounds": 2, "run-name": "plan", "clip-norm": 5.0}), node, "1", 2)
    assert Ledger.read(node.ledger_path).summary() == ledger_before
    assert [e["round"] for e in Ledger.read(node.ledger_path).entries] == [1, 2]


def test_node_limits_refuse_before_any_charge(node_configs, run_settings):
    from client.tasks import train_task

    node = _node(node_configs[0], **{"max-epsilon-per-run": 1.0, "max-rounds-per-run": 3})
    for run in (run_settings(epsilon=2.0), run_settings(**{"num-server-rounds": 39})):
        with pytest.raises(OutsidePlan):
            train_task(_state(run), run, node, "1", 1)
    assert not node.ledger_path.exists()


def test_query_above_the_node_query_limit_is_refused(node_configs):
    from client.query_task import query_task
    from core.queries import QuerySpec

    node = _node(node_configs[0], **{"max-epsilon-per-query": 0.5})
    with pytest.raises(OutsidePlan):
        query_task("q", QuerySpec(statistic="count", epsilon=0.8), node)
    assert not node.ledger_path.exists()


def test_bad_run_config_values_are_refused():
    from core.run_config import RunSettings

    for key, value in (("clip-norm", -1), ("epsilon", 0), ("epsilon", float("inf")), ("policy", "foo"),
                       ("strategy", "foo"), ("num-server-rounds", 0), ("min-nodes", 0), ("lags", 500)):
        with pytest.raises(ValueError, match=key.split("-")[0]):
            RunSettings.from_mapping({key: value})


def test_resume_after_a_crash_between_a_node_charge_and_the_checkpoint(node_configs, run_settings):
    """Nodes charged and answered round 3; the coordinator died before checkpointing it."""
    from client.app import make_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    class Died(Exception):
        pass

    run = run_settings(**{"num-server-rounds": 3, "run-name": "crash3"})
    seen = {"n": 0}

    def tap(reply) -> None:
        if reply.metadata.message_type == "train" and reply.has_content():
            seen["n"] += 1
            if seen["n"] == 2 * len(node_configs) + 2:  # two nodes have answered round 3
                raise Died("coordinator lost power during round 3")

    with pytest.raises(Died):
        run_federation(InProcessGrid(make_app(), node_configs, tap=tap), run)
    charged = [len(Ledger.read(c["ledger-path"]).entries) for c in node_configs]
    assert sorted(charged) == [2, 2, 3, 3]
    out = run_federation(InProcessGrid(make_app(), node_configs), run, resume=True)
    assert out.error is None, out.error
    for cfg in node_configs:
        kinds = [(e["kind"], e["round"]) for e in Ledger.read(cfg["ledger-path"]).entries]
        assert kinds == [("dpsgd", 1), ("dpsgd", 2), ("dpsgd", 3), ("gaussian-release", None)]
        assert Ledger.read(cfg["ledger-path"]).epsilon() <= 3.0


@pytest.fixture
def real_data(sim_data: Path, tmp_path: Path) -> Path:
    """Three hospital files the researcher owns (lifetime ledgers go to DATA/ledgers)."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(3):
        shutil.copy(sim_data / f"hospital_{i:03d}.csv", data / f"hospital_{i:03d}.csv")
    return data


def test_simulate_data_and_query_data_share_one_lifetime_ledger(real_data, tmp_path):
    from simulations.driver import simulate

    kw = dict(data_dir=real_data, rounds=1, epsilon=1.5, budget=4.0, engine="inprocess", results_dir=str(tmp_path / "r"),
              overrides={"local-epochs": 1})
    assert simulate(run_name="one", **kw).error is None
    assert simulate(run_name="two", **kw).error is None
    res = CliRunner().invoke(cli, ["query", "--data", str(real_data), "--statistic", "count", "--epsilon", "0.5",
                                   "--budget", "4.0"])
    assert res.exit_code == 0, res.output
    third = simulate(run_name="three", **kw)  # would exceed the lifetime budget of 4
    assert third.error is not None and "budget exhausted" in third.error
    for i in range(3):
        ledger = Ledger.read(real_data / "ledgers" / f"hospital_{i:03d}.json")
        runs = [e["run"] for e in ledger.entries]
        assert runs.count("one") == 2 and runs.count("two") == 2 and len(set(runs)) == 3
        assert ledger.epsilon() <= 4.0
    assert not (tmp_path / "r" / "one" / "nodes" / "ledgers").exists()


def test_a_deleted_lifetime_ledger_is_refused(real_data, tmp_path):
    cfg = {"data-path": str(real_data / "hospital_000.csv"), "ledger-path": str(real_data / "ledgers" / "h0.json"),
           "hospital": "hospital_000"}
    from client.node import open_ledger

    node = _node(cfg)
    open_ledger(node)
    node.ledger_path.unlink()
    with pytest.raises(LedgerError, match="ledger missing"):
        open_ledger(node)
    with pytest.raises(LedgerError, match="keeps its ledger at"):
        open_ledger(_node(cfg, **{"ledger-path": str(tmp_path / "elsewhere.json")}))
    assert not node.ledger_path.exists()


@pytest.mark.parametrize("args,phrase", [
    (["--policy", "foo"], "policy"),
    (["--strategy", "foo"], "strategy"),
    (["--epsilon", "0"], "epsilon"),
    (["--engine", "foo"], "engine"),
    (["--hospitals", "1"], "min-nodes"),
    (["--secagg", "--hospitals", "2"], "secure aggregation"),
])
def test_bad_simulate_request_is_one_line_and_spends_nothing(tmp_path, args, phrase):
    res = CliRunner().invoke(cli, ["simulate", "--out", str(tmp_path / "r"), *args])
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("fedalloc: error:") and phrase in lines[0], res.output
    assert not (tmp_path / "r").exists()


def test_reusing_a_run_name_never_deletes_its_ledgers(tmp_path):
    from simulations.driver import check_request

    run = tmp_path / "r" / "old"
    (run / "nodes" / "ledgers").mkdir(parents=True)
    (run / "nodes" / "ledgers" / "h.json").write_text(json.dumps({"keep": True}))
    with pytest.raises(ValueError, match="already exists"):
        check_request(hospitals=3, rounds=1, epsilon=1.0, data_dir=None, engine="inprocess", results_dir=str(tmp_path / "r"),
                      run_name="old", seed=0, overrides=None, resume=False, secagg=False)
    assert json.loads((run / "nodes" / "ledgers" / "h.json").read_text()) == {"keep": True}
