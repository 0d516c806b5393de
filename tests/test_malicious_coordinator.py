"""A coordinator that crafts its messages gets nothing a single record could change.

- malformed, non-finite or oversized global models are refused before any data is touched;
- a model crafted to overflow only on some inputs still yields finite updates on D and D + r;
- for each measure, neighbouring record sets (D, D + r) reply the same way;
- the coordinator's audit flags replies whose values break the public plan;
- a query for an undeclared category is refused before any charge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from client.ledger import Ledger
from client.limits import ModelRefused
from forecasting.model import build_model
from client.node import NodeSettings
from core.records import load_records


def _state(run):
    return build_model(run.lags, run.horizon, 12).state_dict()


@pytest.mark.parametrize("poison", ["nan", "inf", "huge", "shape", "dtype", "missing"])
def test_bad_global_models_are_refused_and_nothing_is_charged(node_configs, run_settings, poison):
    from client.tasks import predict_task, train_task

    run = run_settings()
    node = NodeSettings.from_config(node_configs[0])
    good = _state(run)
    train_task(good, run, node, "1", 1)  # the ledger exists and holds one charge
    before = Ledger.read(node.ledger_path).summary()  # the main file alone misses the WAL
    state = {k: v.clone() for k, v in good.items()}
    key = next(iter(state))
    if poison == "nan":
        state[key].view(-1)[0] = float("nan")
    elif poison == "inf":
        state[key].view(-1)[0] = float("inf")
    elif poison == "huge":
        state[key].view(-1)[0] = 10 * run.weight_bound
    elif poison == "shape":
        state[key] = torch.zeros(3, 3)
    elif poison == "dtype":
        state[key] = state[key].to(torch.int64)
    else:
        del state[key]
    for task in (lambda: train_task(state, run, node, "1", 2), lambda: predict_task(state, run, node, "1")):
        with pytest.raises(ModelRefused):
            task()
    assert Ledger.read(node.ledger_path).summary() == before


def _overflow_model(run, bound: float) -> dict[str, torch.Tensor]:
    """Every parameter at the largest magnitude allowed (alternating sign): activations, losses
    and gradients as large as the bound permits (the issue's finding 1 used such weights)."""
    model = build_model(run.lags, run.horizon, 12)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(bound * torch.where(torch.arange(p.numel()) % 2 == 0, 1.0, -1.0).reshape(p.shape))
    return model.state_dict()


def test_crafted_overflow_model_gives_finite_updates_on_neighbours(sim_data, run_settings):
    run = run_settings(**{"weight-bound": 1e4})
    d = load_records(sim_data / "hospital_000.csv")
    # r: a burst in the newest week of the newest training window (one record, but many copies
    # would be needed to move a log-count much; one is what DP must hide)
    last = pd.Timestamp(run.cutoff) - pd.Timedelta(days=7 * (run.horizon + 1))
    r = d.iloc[:1].copy()
    r["admit_date"] = last
    r["encounter_id"] = "extra-1"
    # Within the plan's largest weight bound, and (as if the node's model check were missing)
    # at 1e20, where the same training without the guards gives NaN updates (8 of 8 runs).
    for crafted in (_overflow_model(run, run.weight_bound), _overflow_model(run, 1e20)):
        _finite_updates_on_neighbours(crafted, d, r, run)


def _finite_updates_on_neighbours(crafted, d, r, run) -> None:
    from client.dp_training import train_dp
    from forecasting.features import training_examples
    from core.drg import DRG_GROUPS
    from core.series import demand_series

    for records in (d, pd.concat([d, r], ignore_index=True)):
        series = demand_series(records, start=run.start, end=run.cutoff, period=run.period, measure=run.measure,
                               los_cap=run.los_cap, groups=DRG_GROUPS)
        ex = training_examples(series, run.lags, run.horizon, run.window_stride, blocks=run.release_blocks)
        for seed in range(20):
            model = build_model(run.lags, run.horizon, 12)
            model.load_state_dict(crafted)
            train_dp(model, ex, noise_multiplier=1.0, max_grad_norm=run.clip_norm, batch_size=run.batch_size,
                     epochs=1, lr=run.lr, seed=seed)
            assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("measure", ["admissions", "bed_days"])
def test_neighbouring_record_sets_reply_the_same_way(sim_data, tmp_path, run_settings, measure):
    """For schema-valid r (missing LOS, huge LOS, unknown group, outside the span): D and D + r
    both succeed on train and predict. Whether a node answers cannot reveal r."""
    from client.tasks import predict_task, train_task

    run = run_settings(measure=measure, **{"num-server-rounds": 1})
    d = pd.read_csv(sim_data / "hospital_001.csv")
    row = d.iloc[[0]].copy()
    variants = {"missing_los": {"length_of_stay": np.nan}, "huge_los": {"length_of_stay": 10_000},
                "unknown_group": {"drg_group": "not_in_catalogue"}, "outside_span": {"admit_date": "2030-01-01"}}
    outcomes = {}
    for name, change in [("D", None), *variants.items()]:
        records = d if change is None else pd.concat([d, row.assign(encounter_id=f"x-{name}", **change)], ignore_index=True)
        path = tmp_path / name / "hospital_001.csv"
        path.parent.mkdir()
        records.to_csv(path, index=False)
        load_records(path)  # r is schema-valid
        node = NodeSettings.from_config({"data-path": str(path), "ledger-path": str(tmp_path / name / "l.json"),
                                         "hospital": "hospital_001", "budget": 3.0})
        state, metrics = train_task(_state(run), run, node, "1", 1)
        released = predict_task(state, run, node, "1")
        outcomes[name] = (sorted(metrics), sorted(released), metrics["num-examples"])
        assert np.isfinite(released["demand"]) and len(Ledger.read(node.ledger_path).entries) == 2
    assert len(set(map(repr, outcomes.values()))) == 1, outcomes


def _reply(metrics: dict, node: int = 1001, hospital: str | None = None, arrays=None) -> Message:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1  # as InProcessGrid does
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if hospital is not None:
        content["node"] = ConfigRecord({"hospital": hospital})
    if arrays is not None:
        content["arrays"] = arrays
    msg = Message(content=content, dst_node_id=0, message_type="train")
    msg.metadata.__dict__["_src_node_id"] = node
    return msg


def test_value_level_audit_flags_what_breaks_the_plan(run_settings):
    from server.app import public_plan
    from server.audit import MessageAudit

    run = run_settings()
    arrays = ArrayRecord(_state(run))
    plan = public_plan(run)
    honest = {"num-examples": plan["examples"], "sample-rate": plan["sample_rate"], "steps": plan["steps"],
              "noise-multiplier": 2.5, "epsilon": 1.0}

    def problems(*replies: Message) -> list[str]:
        audit = MessageAudit.for_arrays(arrays, plan)
        found = []
        for r in replies:
            found = audit.problems(r)
        return found

    assert problems(_reply(honest, arrays=arrays)) == []
    bad_arrays = ArrayRecord({k: v.clone().fill_(float("nan")) for k, v in _state(run).items()})
    assert any("not finite" in p for p in problems(_reply(honest, arrays=bad_arrays)))
    assert any("num-examples" in p for p in problems(_reply({**honest, "num-examples": 4321})))  # a record's cost
    assert any("noise-multiplier" in p for p in problems(_reply(honest), _reply({**honest, "noise-multiplier": 45.0})))
    assert any("epsilon" in p for p in problems(_reply(honest), _reply({**honest, "epsilon": 1234.5})))
    assert any("epsilon" in p for p in problems(_reply(honest), _reply({**honest, "epsilon": 0.5})))
    assert any("not finite" in p for p in problems(_reply({"demand": float("nan"), "epsilon": 1.0})))
    assert any("sum of its groups" in p for p in problems(_reply({"demand": 10.0, "demand-cardiac": 3.0, "epsilon": 1.0})))
    assert any("hospital name" in p for p in problems(_reply({"epsilon": 1.0}, hospital="P-123|2024-01-02|cardiac")))
    assert any("another node" in p for p in problems(_reply({"epsilon": 1.0}, 1001, "h1"),
                                                        _reply({"epsilon": 1.0}, 1002, "h1")))


def test_query_for_an_undeclared_category_is_refused_before_any_charge(node_configs, tmp_path):
    from typer.testing import CliRunner

    from fedalloc.cli import app as cli

    data = Path(node_configs[0]["data-path"]).parent
    res = CliRunner().invoke(cli, ["query", "--data", str(data), "--statistic", "count", "--group-by", "drg_group",
                                   "--categories", "cardiology", "--epsilon", "0.5", "--ledgers", str(tmp_path / "l")])
    assert res.exit_code != 0 and "not in the public catalogue" in res.output
    assert not (tmp_path / "l").exists()


def test_refusal_details_go_to_the_node_log_not_the_console(node_configs, run_settings, capfd):
    from client.app import make_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    configs = [{**c, "max-epsilon-per-run": 1.0} for c in node_configs]
    out = run_federation(InProcessGrid(make_app(), configs), run_settings())
    assert out.error is not None and "request outside node limits or run plan" in out.error
    console = capfd.readouterr()
    assert "max-epsilon-per-run" not in console.out + console.err
    log = Path(configs[0]["ledger-path"] + ".log").read_text()
    assert "max-epsilon-per-run" in log and "node refused train" in log


def test_unexpected_cli_errors_are_one_line_and_debug_has_no_locals(monkeypatch, capsys):
    """No Rich traceback with local variables (record frames, node paths) ever; --debug prints a
    plain traceback."""
    import sys

    import fedalloc.cli as cli_module

    def boom() -> None:
        secret_record = "P-123|2024-01-02|cardiac"  # noqa: F841  (a local a Rich traceback would print)
        raise RuntimeError("node data at /hospital/records.csv\nsecond line")

    for argv, debug in ((["fedalloc"], False), (["fedalloc", "--debug"], True)):
        monkeypatch.setattr(cli_module, "app", boom)
        monkeypatch.setattr(sys, "argv", argv)
        with pytest.raises(SystemExit) as exit_info:
            cli_module.main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 1 and "P-123" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith("fedalloc: error: RuntimeError: node data at") and "second line" not in last
        assert ("Traceback" in err) == debug
