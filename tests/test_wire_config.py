"""What the coordinator sends a node: the public training plan, never its own settings."""

from __future__ import annotations

from flwr.clientapp import ClientApp

from client.app import make_app
from core.run_config import COORDINATOR_KEYS, DEFAULTS, PLAN_KEYS, RunSettings
from server.runner import run_federation
from simulations.inprocess import InProcessGrid


def test_keys_are_split_by_owner():
    assert set(PLAN_KEYS) <= set(DEFAULTS) and set(COORDINATOR_KEYS) <= set(DEFAULTS)
    assert not set(PLAN_KEYS) & set(COORDINATOR_KEYS)
    run = RunSettings.from_mapping({"resources-file": "/coordinator/private/path.csv", "policy": "need_gap"})
    assert set(run.plan()) == set(PLAN_KEYS) and set(run.plan()) <= set(run.node_config())
    assert not set(run.node_config()) & set(COORDINATOR_KEYS)


def test_nodes_receive_no_coordinator_setting(node_configs, run_settings):
    honest = make_app()
    received: list[dict] = []
    app = ClientApp()

    @app.train()
    def train(msg, context):
        received.append(dict(msg.content["config"]))
        return honest(msg, context)

    @app.query("predict")
    def predict(msg, context):
        received.append(dict(msg.content["config"]))
        return honest(msg, context)

    run = run_settings(**{"num-server-rounds": 1, "policy": "capped", "total": 777.0})
    out = run_federation(InProcessGrid(app, node_configs[:2]), run)
    assert out.error is None, out.error
    assert len(received) == 4  # one train and one predict message per node
    for cfg in received:
        assert not set(cfg) & set(COORDINATOR_KEYS), sorted(set(cfg) & set(COORDINATOR_KEYS))
        assert {k: cfg[k] for k in PLAN_KEYS} == run.plan()
        assert run.resources_file not in map(str, cfg.values())
