"""SecAgg+ on top of client-side DP-SGD, run in process (Flower's serialisation on every message).

Shows: the run completes and trains; the coordinator only ever gets masked model vectors and
allowlisted public plaintext; the unmasked sum equals the FedAvg of the nodes' true models; every
node's ledger was charged and stays within budget.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import Message
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key

import client.tasks
from client.ledger import Ledger
from forecasting.model import build_model
from client.secagg import make_secagg_app
from core.protocol import PUBLIC_FIT_METRICS
from core.drg import DRG_GROUPS
from server.results import load_arrays
from server.secagg import SecAggAudit, SecAggSettings, run_secagg_federation
from simulations.inprocess import InProcessGrid


@pytest.fixture
def secagg_run(node_configs, run_settings, monkeypatch):
    """3 nodes × 2 rounds; records each node's true (unmasked) local model and every reply."""
    true_models: list[tuple[str, int, dict, int]] = []
    real_train = client.tasks.train_task

    def spy(state, run, node, run_id, server_round):
        new_state, metrics = real_train(state, run, node, run_id, server_round)
        true_models.append((node.hospital, server_round, {k: v.detach().numpy().copy() for k, v in new_state.items()},
                            int(metrics["num-examples"])))
        return new_state, metrics

    monkeypatch.setattr(client.tasks, "train_task", spy)
    configs = node_configs[:3]
    run = run_settings(**{"resources-file": "", "min-nodes": 3})
    seen: list[Message] = []
    grid = InProcessGrid(make_secagg_app(), configs, tap=seen.append)
    out = run_secagg_federation(grid, run, SecAggSettings())
    return out, seen, true_models, configs, run


def test_secagg_run_trains_and_masks_updates(secagg_run):
    out, seen, true_models, configs, run = secagg_run
    assert out.error is None, out.error
    assert [r["ok"] for r in out.rounds] == [3, 3]

    # (a) the aggregated model moved away from the initial one ...
    initial = build_model(run.lags, run.horizon, len(DRG_GROUPS), seed=run.seed).state_dict()
    final = {k: a.numpy() for k, a in load_arrays(out.path / "checkpoint.npz").items()}
    assert set(final) == set(initial)
    assert max(float(np.abs(final[k] - initial[k].numpy()).max()) for k in final) > 1e-3
    # ... and it is exactly (up to quantisation) the FedAvg of the nodes' true last-round models,
    # although no true model ever reached the coordinator.
    last = [(m, n) for _, r, m, n in true_models if r == 2]
    assert len(last) == 3
    total = sum(n for _, n in last)
    # SecAgg+ quantises the weighted model (weight n / max_weight) in steps of 2·clipping_range/2^22
    sa = SecAggSettings()
    step = 2 * sa.clipping_range / 2**22 * sa.max_weight / min(n for _, n in last)
    for k in final:
        expected = sum(n * m[k] for m, n in last) / total
        np.testing.assert_allclose(final[k], expected, atol=max(1e-4, 2 * step))

    # (b) what the coordinator received during fit: masked vectors and allowlisted public values
    fit = [m for m in seen if m.metadata.message_type == "train"]
    assert fit and not any(m.has_error() for m in fit)
    masked = [m for m in fit if "fitres.parameters" in m.content]
    assert len(masked) == 3 * 2
    for m in masked:
        assert len(m.content["fitres.parameters"]) == 0  # the plaintext model slot is empty
        assert set(m.content["fitres.metrics"].keys()) <= set(PUBLIC_FIT_METRICS)
        assert set(m.content["fitres.num_examples"].keys()) == {"num_examples"}
        vec = [bytes_to_ndarray(b) for b in m.content[RECORD_KEY_CONFIGS][Key.MASKED_PARAMETERS]]
        flat = np.concatenate([v.ravel() for v in vec[1:]]).astype(np.float64)  # vec[0] is the weight factor
        # masked entries look uniform over [0, 2^32): unlike the quantised model (< 2^22) ...
        assert flat.max() > 2**31 and flat.mean() > 2**30
        # ... and they equal no node's true parameters
        for _, _, model, _ in true_models:
            true_flat = np.concatenate([model[k].ravel() for k in model])
            assert flat.shape == true_flat.shape and not np.allclose(flat, true_flat)
    # every reply (all protocol stages + predict) is on the allowlist; nothing else left a node
    assert out.violations == []
    audit = SecAggAudit.for_arrays(load_arrays(out.path / "checkpoint.npz"))
    assert [p for m in seen for p in audit.problems(m)] == []
    assert {k for m in fit for k in m.content} <= {
        RECORD_KEY_CONFIGS, "fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status"}
    assert {k for m in fit for k in m.content[RECORD_KEY_CONFIGS]} <= {
        Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
        Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}

    # (c) every ledger was charged for both rounds and the release, and stays within budget
    metrics = json.loads((out.path / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["audit_violations"] == []
    for cfg in configs:
        led = Ledger.read(cfg["ledger-path"])
        assert [e["kind"] for e in led.entries] == ["dpsgd", "dpsgd", "gaussian-release"]
        assert led.epsilon() <= cfg["budget"]
        assert metrics["epsilon_per_node"][cfg["hospital"]] == pytest.approx(led.epsilon())
    alloc = pd.read_csv(out.path / "allocations.csv")
    assert sorted(alloc.hospital) == [c["hospital"] for c in configs]
    assert alloc.allocation.sum() == pytest.approx(run.total)


def test_audit_rejects_an_unmasked_update_and_private_metrics():
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    arrays = ArrayRecord(build_model(8, 4, len(DRG_GROUPS)).state_dict())
    audit = SecAggAudit.for_arrays(arrays)
    content = RecordDict({
        "fitres.parameters": arrays,  # a node that did not mask
        "fitres.metrics": ConfigRecord({"epsilon": 1.0, "raw-length-of-stay": 12.0}),
        "fitres.num_examples": MetricRecord({"num_examples": 144}),
        "fitres.status": ConfigRecord({"code": 0, "message": "ok"}),
        RECORD_KEY_CONFIGS: ConfigRecord({Key.MASKED_PARAMETERS: [b"x"], "patient_id": "P1"}),
    })
    problems = audit.problems(Message(content, dst_node_id=1, message_type="train"))
    assert any("unmasked" in p for p in problems)
    assert any("raw-length-of-stay" in p for p in problems)
    assert any("patient_id" in p for p in problems)


def test_settings_for_small_federations():
    assert SecAggSettings().resolve(3) == (3, 2)
    assert SecAggSettings().resolve(10) == (10, 9)
    with pytest.raises(ValueError):
        SecAggSettings().resolve(2)
    with pytest.raises(ValueError):  # a minority threshold would let a lying coordinator unmask one node
        SecAggSettings(num_shares=5, threshold=2).resolve(5)
    sa, rest = SecAggSettings.split({"epsilon": 2.0, "secagg-threshold": 3, "secagg-max-weight": 500})
    assert rest == {"epsilon": 2.0} and sa.threshold == 3 and sa.max_weight == 500.0


def test_secagg_on_flower_ray_engine(node_configs, run_settings, tmp_path):
    """The same ServerApp/ClientApp pair under Flower's Ray simulation (3 nodes, 1 round)."""
    import os

    from client.secagg import make_secagg_app as make_client
    from server.secagg import make_secagg_server_app
    from simulations.ray_local import run_ray_simulation

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    configs = node_configs[:3]
    settings = {"num-server-rounds": 1, "local-epochs": 1, "results-dir": str(tmp_path / "results"),
                "run-name": "ray", "min-nodes": 3, "secagg-num-shares": 3, "secagg-threshold": 2}
    outcome: list = []
    run_ray_simulation(  # loopback-only Ray, as `fedalloc simulate` uses it
        server_app=make_secagg_server_app(settings, outcome.append),
        client_app=make_client(dict(enumerate(configs))),
        num_supernodes=3, num_cpus=2, handle_signals=False,
    )
    assert outcome and outcome[0].error is None, outcome and outcome[0].error
    out = outcome[0]
    metrics = json.loads((out.path / "metrics.json").read_text())
    # 4 protocol stages × 3 nodes for the round, then 3 predict replies, all on the allowlist
    assert metrics["status"] == "ok" and metrics["audit_violations"] == []
    assert metrics["messages_audited"] == 4 * 3 + 3
    run = run_settings()
    initial = build_model(run.lags, run.horizon, len(DRG_GROUPS), seed=run.seed).state_dict()
    final = {k: a.numpy() for k, a in load_arrays(out.path / "checkpoint.npz").items()}
    assert max(float(np.abs(final[k] - initial[k].numpy()).max()) for k in final) > 1e-3
    for cfg in configs:
        led = Ledger.read(cfg["ledger-path"])
        assert [e["kind"] for e in led.entries] == ["dpsgd", "gaussian-release"]
        assert 0 < led.epsilon() <= cfg["budget"]


def test_a_node_refusing_mid_protocol_is_tolerated(node_configs, run_settings):
    """A node out of budget refuses in the masked-vector stage; SecAgg+ recovers its pairwise masks."""
    configs = [dict(c) for c in node_configs[:3]]
    configs[0]["budget"] = 0.01
    run = run_settings(**{"num-server-rounds": 1, "resources-file": "", "min-nodes": 2})
    seen: list[Message] = []
    out = run_secagg_federation(InProcessGrid(make_secagg_app(), configs, tap=seen.append), run)
    assert out.error is None, out.error
    (rec,) = out.rounds
    assert rec["ok"] == 2 and rec["failed"] == 1 and list(rec["failed_nodes"].values()) == ["budget exhausted"]
    refused = [m for m in seen if m.has_error()]
    assert refused and all(m.error.reason == "budget exhausted" for m in refused)
    assert Ledger.read(configs[0]["ledger-path"]).entries == []
    assert set(pd.read_csv(out.path / "allocations.csv").hospital) == {"hospital_001", "hospital_002"}
    assert out.violations == []


def test_secagg_run_resumes_after_a_coordinator_crash(node_configs, run_settings):
    """The coordinator dies after round 1 of 2; `resume=True` trains round 2 only, from the round-1
    checkpoint, and the nodes charge it as round 2 (same σ plan), as in a normal run."""
    from tests.test_resume import CoordinatorDied

    configs = node_configs[:3]
    run = run_settings(**{"num-server-rounds": 2, "resources-file": "", "min-nodes": 3, "run-name": "sa-crash"})

    def die(r: int, n: int, rec: dict) -> None:
        if r == 1:
            raise CoordinatorDied("coordinator lost power after round 1")

    with pytest.raises(CoordinatorDied):
        run_secagg_federation(InProcessGrid(make_secagg_app(), configs, run_id=11), run, on_round=die)
    path = Path(run.results_dir) / run.run_name
    assert json.loads((path / "state.json").read_text())["rounds_done"] == 1
    with np.load(path / "checkpoint.npz") as data:
        after_round_1 = {k: data[k] for k in data.files}
    for cfg in configs:
        assert [e["kind"] for e in Ledger.read(cfg["ledger-path"]).entries] == ["dpsgd"]

    seen: list[Message] = []
    out = run_secagg_federation(InProcessGrid(make_secagg_app(), configs, run_id=11, tap=seen.append), run,
                                resume=True)
    assert out.error is None, out.error
    assert [r["round"] for r in out.rounds] == [1, 2] and all(r["secure_aggregation"] for r in out.rounds)
    assert list(pd.read_csv(out.path / "rounds.csv")["round"]) == [1, 2]
    final = {k: a.numpy() for k, a in load_arrays(out.path / "checkpoint.npz").items()}
    assert max(float(np.abs(final[k] - after_round_1[k]).max()) for k in final) > 0  # round 2 trained on
    assert set(pd.read_csv(out.path / "allocations.csv").hospital) == {c["hospital"] for c in configs}
    for cfg in configs:
        led = Ledger.read(cfg["ledger-path"])
        assert [e["kind"] for e in led.entries] == ["dpsgd", "dpsgd", "gaussian-release"]
        assert [e["purpose"] for e in led.entries][:2] == ["train round 1", "train round 2"]
        sigmas = {e["noise_multiplier"] for e in led.entries if e["kind"] == "dpsgd"}
        assert len(sigmas) == 1 and led.epsilon() <= cfg["budget"]
