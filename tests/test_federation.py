"""Whole federations in process: results, message audit, failures noticed, dropouts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord

from client.app import make_app
from client.ledger import Ledger
from server.app import run_federation
from server.audit import MessageAudit
from simulations.inprocess import InProcessGrid, random_dropout


def run_inprocess(node_configs, run, client_app=None, **grid_kw):
    seen: list[Message] = []
    grid = InProcessGrid(client_app or make_app(), node_configs, tap=seen.append, **grid_kw)
    return run_federation(grid, run), seen


def test_end_to_end_results(node_configs, run_settings):
    run = run_settings(total=500.0)
    out, _ = run_inprocess(node_configs, run)
    assert out.error is None
    alloc = pd.read_csv(out.path / "allocations.csv")
    assert sorted(alloc.hospital) == [c["hospital"] for c in node_configs]
    assert alloc.allocation.sum() == pytest.approx(500.0)
    assert (alloc.demand > 0).all()
    rounds = pd.read_csv(out.path / "rounds.csv")
    assert list(rounds["round"]) == [1, 2] and (rounds.ok == 4).all()
    metrics = json.loads((out.path / "metrics.json").read_text())
    for cfg in node_configs:
        led = Ledger.read(cfg["ledger-path"])
        # ε reported to the coordinator is the ledger's ε, which never exceeds the budget
        assert metrics["epsilon_per_node"][cfg["hospital"]] == pytest.approx(led.epsilon())
        assert led.epsilon() <= cfg["budget"]
        # the run was calibrated to use most of its ε request, not a tiny fraction
        assert led.epsilon() > 0.9 * run.epsilon
        kinds = [e["kind"] for e in led.entries]
        assert kinds == ["dpsgd", "dpsgd", "gaussian-release"]
    assert metrics["audit_violations"] == [] and metrics["messages_audited"] == 4 * 3


def test_every_message_is_on_the_allowlist(node_configs, run_settings):
    run = run_settings()
    out, seen = run_inprocess(node_configs, run)
    assert out.error is None and len(seen) == 4 * 3
    from forecasting.model import build_model
    from flwr.app import ArrayRecord

    audit = MessageAudit.for_arrays(ArrayRecord(build_model(run.lags, run.horizon, 12).state_dict()))
    assert [p for m in seen for p in audit.problems(m)] == []
    # and nothing in the replies is a per-record value: only these keys ever leave a node
    keys = {k for m in seen for rec in m.content.values() for k in rec.keys()}
    assert keys - set(ArrayRecord(build_model(run.lags, run.horizon, 12).state_dict()).keys()) <= (
        {"num-examples", "epsilon", "noise-multiplier", "sample-rate", "steps", "demand", "release-noise", "hospital"}
        | {k for k in keys if k.startswith("demand-")}
    )


def leaky_app():
    """A compromised node that smuggles one raw encounter record into its metrics."""
    honest = make_app()
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg, context):
        reply = honest(msg, context)
        rec = pd.read_csv(context.node_config["data-path"], nrows=1).iloc[0]
        reply.content["metrics"]["raw-length-of-stay"] = float(rec["length_of_stay"])
        reply.content["leak"] = ConfigRecord({"patient_id": str(rec["patient_id"])})
        return reply

    @app.query("predict")
    def predict(msg, context):
        return honest(msg, context)

    return app


def test_audit_catches_an_injected_raw_record(node_configs, run_settings):
    out, seen = run_inprocess(node_configs, run_settings(), client_app=leaky_app())
    problems = [p for _, p in out.violations]
    assert any("raw-length-of-stay" in p for p in problems)
    assert any("leak.patient_id" in p for p in problems)
    # violating replies are dropped before aggregation, so the first round fails loudly
    assert out.error is not None and "round 1" in out.error
    metrics = json.loads((out.path / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["audit_violations"]


def test_round_with_no_usable_replies_is_reported(node_configs, run_settings, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("admit_date,drg_group\nnot-a-date,cardiac\n")
    configs = [{**c, "data-path": str(bad)} for c in node_configs]
    out, seen = run_inprocess(configs, run_settings())
    assert out.error is not None and "records invalid" in out.error and "0 of 4" in out.error
    # the node said what failed, and nothing about the record
    assert all(m.has_error() and m.error.reason == "records invalid" for m in seen)
    assert not (out.path / "allocations.csv").exists()
    for c in configs:  # nothing charged for work that never happened
        assert not __import__("pathlib").Path(c["ledger-path"]).exists() or Ledger.read(c["ledger-path"]).entries == []


def test_budget_exhausted_node_refuses_and_sends_nothing(node_configs, run_settings):
    configs = [dict(c) for c in node_configs]
    configs[0]["budget"] = 0.01  # cannot even afford one round
    out, seen = run_inprocess(configs, run_settings(**{"min-nodes": 3}))
    assert out.error is None
    refused = [m for m in seen if m.metadata.src_node_id == 1001]
    assert refused and all(m.has_error() and m.error.reason == "budget exhausted" for m in refused)
    assert Ledger.read(configs[0]["ledger-path"]).entries == []
    assert "hospital_000" not in set(pd.read_csv(out.path / "allocations.csv").hospital)
    rounds = pd.read_csv(out.path / "rounds.csv")
    assert (rounds.failed == 1).all() and (rounds.ok == 3).all()


def test_dropouts_still_complete_and_are_reported(sim_data, tmp_path, run_settings):
    configs = [
        {"data-path": str(sim_data / f"hospital_{i % 4:03d}.csv"), "ledger-path": str(tmp_path / f"l{i}.json"),
         "hospital": f"hospital_{i % 4:03d}" if i < 4 else f"copy_{i}", "budget": 3.0, "synthetic": True}
        for i in range(10)
    ]
    run = run_settings(**{"num-server-rounds": 3, "min-nodes": 3, "resources-file": ""})
    out, _ = run_inprocess(configs, run, drop=random_dropout(0.3, seed=1))
    assert out.error is None, out.error
    missing = sum(r["missing"] for r in out.rounds)
    assert missing > 0 and all(r["ok"] >= 3 for r in out.rounds)
    assert len(out.rounds) == 3
    rounds = pd.read_csv(out.path / "rounds.csv")
    assert rounds.missing_nodes.notna().any()


def test_federation_that_never_assembles_fails_clearly(node_configs, run_settings):
    grid = InProcessGrid(make_app(), node_configs[:1])
    out = run_federation(grid, run_settings(**{"min-nodes": 2, "round-timeout": 1.0}))
    assert out.error is not None and "only 1 of the required 2 nodes" in out.error
    assert json.loads((out.path / "metrics.json").read_text())["status"] == "failed"


def test_release_noises_block_sums_with_the_stated_scale():
    """One record moves one block sum by 1, so noise of std σ on each block sum is the Gaussian
    mechanism with sensitivity 1; the expanded window is post-processing of those sums."""
    from forecasting.features import release_window

    window = np.arange(16, dtype=float).reshape(8, 2) + 10
    rng = np.random.default_rng(0)
    draws = np.stack([release_window(window, 2, 3.0, rng) for _ in range(4000)])
    block_sums = draws.reshape(4000, 2, 4, 2).sum(axis=2)
    true = window.reshape(2, 4, 2).sum(axis=1)
    assert np.allclose(block_sums.mean(axis=0), true, atol=0.3)
    assert np.allclose(block_sums.std(axis=0), 3.0, rtol=0.05)
    # within a block every period carries the same value: nothing but the noisy sum is used
    assert np.allclose(draws[:, :4], draws[:, :1]) and np.allclose(draws[:, 4:], draws[:, 4:5])


def test_corrupt_or_foreign_ledger_stops_the_node_and_is_never_reset(node_configs, run_settings, tmp_path):
    from pathlib import Path

    configs = [dict(c) for c in node_configs]
    corrupt = Path(configs[0]["ledger-path"])
    corrupt.parent.mkdir(parents=True, exist_ok=True)
    corrupt.write_text('{"format": "fedalloc-ledger/1", "entr')
    foreign = Path(configs[1]["ledger-path"])
    Ledger.open(foreign, node="some_other_hospital", budget=3.0, delta=1e-5)
    before = (corrupt.read_bytes(), foreign.read_bytes())
    out, seen = run_inprocess(configs, run_settings())
    assert out.error is None  # the two healthy nodes carry the run (min-nodes 2)
    for node_id in (1001, 1002):
        replies = [m for m in seen if m.metadata.src_node_id == node_id]
        assert replies and all(m.has_error() and m.error.reason == "ledger unusable" for m in replies)
    assert (corrupt.read_bytes(), foreign.read_bytes()) == before


def test_coordinator_cannot_redirect_a_node_or_fix_its_noise(node_configs, run_settings):
    """Paths, budget and noise seed are node config only; a run config naming them is refused."""
    from forecasting.model import build_model
    from client.node import NodeSettings
    from client.tasks import train_task
    from core.run_config import RunSettings

    for key in ("data-path", "ledger-path", "budget", "debug-seed"):
        with pytest.raises(ValueError, match="unknown run-config key"):
            RunSettings.from_mapping({key: "x"})
    run = run_settings()
    node = NodeSettings.from_config({**node_configs[0], "budget": 6.0, "max-epsilon-per-run": 3.0})
    state = build_model(run.lags, run.horizon, 12).state_dict()
    # two runs (nodes know runs by name; the same round of one run would get its stored update)
    a, _ = train_task(state, run_settings(run_name="r-a"), node, "1", 1)
    b, _ = train_task(state, run_settings(run_name="r-b"), node, "2", 1)
    # same data, model and σ: only fresh OS-entropy noise (and Poisson batches) differ
    assert any(not np.allclose(a[k].numpy(), b[k].numpy()) for k in a)
