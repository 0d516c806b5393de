"""A public group catalogue of the run's own codes (issue #12): three ward codes flow through
validate, simulate, query and drg_budget; the loader's errors; out-of-catalogue records are
dropped and counted; coordinator and node cannot silently disagree on the list."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from core.drg import DRG_GROUPS, default_catalogue, load_catalogue
from core.run_config import COORDINATOR_KEYS, RunSettings
from core.synthetic import SyntheticConfig, generate, write_records
from fedalloc.cli import app

WARDS = {"ward_a": 1.0, "ward_b": 2.0, "ward_c": 0.5}
# Short windows keep the federation quick; the catalogue is what is under test.
SMALL = "lags=8 release-blocks=4 local-epochs=1 pretrain-hospitals=0 min-nodes=2"


@pytest.fixture
def wards(tmp_path: Path) -> Path:
    path = tmp_path / "wards.csv"
    path.write_text("group,weight\n" + "".join(f"{g},{w}\n" for g, w in WARDS.items()))
    return path


@pytest.fixture
def ward_data(tmp_path: Path) -> Path:
    """Three hospitals whose records use the ward codes; hospital_000 has two records of a code
    outside the catalogue (ward_z), one on line 3 of its file."""
    out = tmp_path / "data"
    generate(SyntheticConfig(hospitals=3, years=3, seed=5, groups=tuple(WARDS)), out)
    path = out / "hospital_000.csv"
    df = pd.read_csv(path, parse_dates=["admit_date"])
    df.loc[[1, 40], "drg_group"] = "ward_z"
    write_records(df, path)
    return out


# --------------------------------------------------------------------------- loader


@pytest.mark.parametrize("text, message", [
    ("", "c.csv: line 1: file is empty"),
    ("group,weight\n", "c.csv: no groups after the header"),
    ("group,cost\na,1\n", "c.csv: line 1, column 'weight': missing required column (have: group, cost)"),
    ("group,weight\na,1\n\nb,1\na,2\n", "c.csv: line 5, column 'group': duplicate group 'a' (first on line 2)"),
    ("group,weight\na,1\nb,0\n", "c.csv: line 3, column 'weight': must be > 0 ('0')"),
    ("group,weight\na,-2\n", "c.csv: line 2, column 'weight': must be > 0 ('-2')"),
    ("group,weight\na,inf\n", "c.csv: line 2, column 'weight': must be finite ('inf')"),
    ("group,weight\na,nan\n", "c.csv: line 2, column 'weight': NaN is not allowed"),
    ("group,weight\na,heavy\n", "c.csv: line 2, column 'weight': not a number ('heavy')"),
    ("group,weight\n,1\n", "c.csv: line 2, column 'group': empty value"),
    ('group,weight\n"a,b",1\n', "c.csv: line 2, column 'group': 'a,b' is not a group code"),
    ("group,weight\na,1\nhi,1\n", "c.csv: line 3, column 'group': 'hi' is reserved"),
])
def test_loader_errors_are_one_line_naming_file_row_and_column(tmp_path, text, message):
    path = tmp_path / "c.csv"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_catalogue(path)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_loader_reads_order_and_weights_and_rereads_a_changed_file(wards):
    cat = load_catalogue(wards)
    assert cat.groups == tuple(WARDS) and cat.weights == WARDS and not cat.is_default
    assert default_catalogue().groups == DRG_GROUPS and default_catalogue().is_default
    wards.write_text("group,weight\nward_b,2.0\nward_a,1.0\n")
    os.utime(wards, ns=(0, wards.stat().st_mtime_ns + 10**9))  # cached by (path, mtime): a new version
    assert load_catalogue(wards).groups == ("ward_b", "ward_a")


# --------------------------------------------------------------------------- run config


def test_run_config_sends_nodes_the_list_never_the_path(wards):
    run = RunSettings.from_mapping({"groups-file": str(wards)})
    assert run.group_list == tuple(WARDS) and run.catalogue.weights == WARDS
    wire = run.node_config()
    assert "groups-file" in COORDINATOR_KEYS and "groups-file" not in wire
    assert wire["groups"] == "ward_a,ward_b,ward_c" and run.plan()["groups"] == wire["groups"]
    node_side = RunSettings.from_mapping(wire)  # what a node builds from the message
    assert node_side.group_list == tuple(WARDS)
    assert RunSettings.from_mapping({}).group_list == DRG_GROUPS
    with pytest.raises(ValueError, match="run-config groups-file/groups: .*differ from groups-file wards.csv"):
        RunSettings.from_mapping({"groups-file": str(wards), "groups": "ward_a,ward_c"})
    with pytest.raises(ValueError, match="run-config groups-file/groups: .*missing required column"):
        bad = wards.with_name("bad.csv")
        bad.write_text("code,weight\nx,1\n")
        RunSettings.from_mapping({"groups-file": str(bad)})


def test_node_refuses_a_run_whose_list_differs_from_its_own_copy(wards, ward_data, tmp_path):
    from client.node import NodeSettings, series_for

    run = RunSettings.from_mapping({"groups-file": str(wards), "lags": 8, "release-blocks": 4})
    other = tmp_path / "other.csv"
    other.write_text("group,weight\nward_a,1\nward_c,1\nward_b,1\n")  # same codes, another order
    base = {"data-path": str(ward_data / "hospital_001.csv"), "ledger-path": str(tmp_path / "l" / "h1.json")}
    assert list(series_for(NodeSettings.from_config({**base, "groups-file": str(wards)}), run).columns) == list(WARDS)
    with pytest.raises(ValueError, match="differs from this node's groups-file"):
        series_for(NodeSettings.from_config({**base, "groups-file": str(other)}), run)


def test_out_of_catalogue_records_are_dropped_and_counted_in_the_node_log(wards, ward_data, tmp_path):
    from client.node import NodeSettings, series_for

    run = RunSettings.from_mapping({"groups-file": str(wards), "lags": 8, "release-blocks": 4})
    log = tmp_path / "node.log"
    node = NodeSettings.from_config({"data-path": str(ward_data / "hospital_000.csv"),
                                     "ledger-path": str(tmp_path / "l" / "h0.json"), "log-path": str(log)})
    series = series_for(node, run)
    assert list(series.columns) == list(WARDS)  # the shape is the catalogue's, whatever the records hold
    records = pd.read_csv(ward_data / "hospital_000.csv", parse_dates=["admit_date"])
    inside = records[(records.admit_date >= series.index[0]) & (records.admit_date < pd.Timestamp(run.cutoff))]
    assert series.to_numpy().sum() == (inside.drg_group != "ward_z").sum()  # ward_z counted nowhere
    text = log.read_text()
    assert "2 record(s) in 1 group(s) outside the run's catalogue are dropped" in text and "'ward_z': 2" in text


def test_audit_rejects_demand_keys_of_another_catalogue():
    from server.audit import MessageAudit
    from tests.test_malicious_coordinator import _reply

    audit = MessageAudit(array_spec={}, groups=tuple(WARDS))
    ok = {"demand": 6.0, "epsilon": 1.0, "demand-ward_a": 1.0, "demand-ward_b": 2.0, "demand-ward_c": 3.0}
    assert audit.problems(_reply(ok)) == []
    assert any("not on the allowlist" in p for p in audit.problems(_reply({"demand": 1.0, "demand-cardiac": 1.0})))
    assert any("the run's catalogue 3" in p for p in audit.problems(_reply({"demand": 1.0, "demand-ward_a": 1.0})))


def test_pretrained_model_maps_onto_a_custom_catalogue_by_name():
    import torch

    from forecasting.pretrain import onto_catalogue

    state = {"profile.weight": torch.arange(48, dtype=torch.float32).reshape(12, 4),
             "mix.logits": torch.ones(8), "mix.log_scale": torch.tensor([0.3]), "period_days": torch.tensor([7.0])}
    out = onto_catalogue(state, ("ward_a", "cardiac", "ward_b"))
    assert out["profile.weight"].shape == (3, 4)
    assert torch.equal(out["profile.weight"][1], state["profile.weight"][DRG_GROUPS.index("cardiac")])
    assert not out["profile.weight"][[0, 2]].any()  # an unknown ward starts flat (data-free)
    assert torch.equal(out["mix.logits"], state["mix.logits"]) and onto_catalogue(state, DRG_GROUPS) is state


# --------------------------------------------------------------------------- end to end (CLI)


def test_validate_reports_records_outside_the_catalogue_with_rows(wards, ward_data):
    res = CliRunner().invoke(app, ["validate", str(ward_data / "hospital_000.csv"), "--groups", str(wards)])
    assert res.exit_code == 0, res.output
    assert ("warning: hospital_000.csv: row 3, column drg_group: 'ward_z' is not in the catalogue wards.csv: "
            "the node drops its 2 records from its demand series") in res.output
    assert "1 warning(s) in hospital_000.csv: 2 record(s) in groups outside the catalogue wards.csv" in res.output
    clean = CliRunner().invoke(app, ["validate", str(ward_data / "hospital_001.csv"), "--groups", str(wards)])
    assert clean.exit_code == 0 and "warning" not in clean.output
    # Against the built-in catalogue every ward record would be dropped: validate says so.
    builtin = CliRunner().invoke(app, ["validate", str(ward_data / "hospital_001.csv")])
    assert "'ward_a' is not in the DRG catalogue" in builtin.output
    bad = CliRunner().invoke(app, ["validate", str(ward_data / "hospital_001.csv"), "--groups", str(ward_data / "hospital_001.csv")])
    assert bad.exit_code == 2 and "column 'group': missing required column" in bad.output


def test_simulate_with_ward_catalogue_allocates_drg_budget_by_its_weights(wards, tmp_path):
    res = CliRunner().invoke(app, [
        "simulate", "--engine", "inprocess", "--hospitals", "3", "--rounds", "1", "--out", str(tmp_path / "res"),
        "--name", "wards", "--run-config", f"groups-file='{wards}' policy='drg_budget' {SMALL}"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "res" / "wards"
    table = pd.read_csv(run / "allocations.csv")
    cols = [f"demand_{g}" for g in WARDS]
    group_cols = {f"demand_{g}" for g in (*WARDS, *DRG_GROUPS)}  # (other demand_* columns: intervals)
    assert [c for c in table.columns if c in group_cols] == cols
    # drg_budget priced each ward's released demand at the catalogue weight
    expected = table[cols].to_numpy() @ np.array(list(WARDS.values()))
    assert np.allclose(table["raw_payment"], expected)
    assert np.allclose(table["demand"], table[cols].sum(axis=1))
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["audit_violations"] == []
    assert metrics["config"]["groups"] == "ward_a,ward_b,ward_c"
    # the generated hospitals treat exactly the catalogue's wards
    assert set(pd.read_csv(run / "nodes" / "hospital_000.csv").drg_group) == set(WARDS)


def test_query_by_ward_uses_the_run_catalogue(wards, ward_data, tmp_path):
    args = ["query", "--data", str(ward_data), "--statistic", "count", "--group-by", "drg_group",
            "--categories", "ward_a,ward_c", "--epsilon", "0.5", "--ledgers", str(tmp_path / "l"), "--json"]
    res = CliRunner().invoke(app, [*args, "--run-config", f"groups-file='{wards}'"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert [b["bin"] for b in out["bins"]] == ["ward_a", "ward_c"] and len(out["answered"]) == 3
    assert out["query"]["catalogue"] == list(WARDS)
    refused = CliRunner().invoke(app, [*args[:-1]])  # without the catalogue, ward codes are not categories
    assert refused.exit_code != 0 and "not in the public catalogue" in refused.output


def test_allocate_cli_prices_groups_with_the_catalogue(wards, tmp_path):
    demand = tmp_path / "d.csv"
    demand.write_text("hospital,demand,resources,demand_ward_a,demand_ward_b,demand_ward_c\n"
                      "h1,30,1,10,10,10\nh2,10,1,10,0,0\n")
    res = CliRunner().invoke(app, ["allocate", str(demand), "--policy", "drg_budget", "--budget", "1000",
                                   "--groups", str(wards), "--out", str(tmp_path / "a.csv")])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "a.csv")["raw_payment"].tolist() == [35.0, 10.0]
    plain = CliRunner().invoke(app, ["allocate", str(demand), "--policy", "drg_budget", "--budget", "1000"])
    assert plain.exit_code != 0 and "ward_a" in plain.output


def test_generate_writes_hospitals_over_the_catalogue(wards, tmp_path):
    res = CliRunner().invoke(app, ["generate", "--hospitals", "1", "--years", "1", "--out", str(tmp_path / "g"),
                                   "--groups", str(wards)])
    assert res.exit_code == 0, res.output
    assert set(pd.read_csv(tmp_path / "g" / "hospital_000.csv").drg_group) == set(WARDS)
