"""DP analytics queries: spec validation, sensitivity, noise scale vs (ε, δ), unbiasedness,
clipping, budget refusal and the message audit.

Many-seed statistics call core/client functions directly (not through the grid) to stay fast.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from client.app import make_app
from client.calibration import release_sigma
from client.ledger import Ledger, Mechanism, compute_epsilon
from client.node import NodeSettings
from client.query_task import node_records, noisy_release, plan_release, query_task
from core.queries import QuerySpec, combine, exact_statistic, local_answer, sensitivity
from server.audit import MessageAudit
from server.queries import make_query_app, run_query
from simulations.inprocess import InProcessGrid
from core.synthetic import SyntheticConfig, generate

DELTA = 1e-5
SEEDS = 2000
CATS = ["respiratory", "cardiac", "neonatal", "renal"]
WINDOW = {"start": "2023-03-01", "end": "2023-08-31"}
SPECS = {
    "count": QuerySpec(statistic="count", group_by="drg_group", categories=CATS, epsilon=0.5, **WINDOW),
    "sum": QuerySpec(statistic="sum", column="length_of_stay", lower=0, upper=20, group_by="drg_group",
                     categories=CATS, epsilon=0.5, **WINDOW),
    "mean": QuerySpec(statistic="mean", column="cost", lower=0, upper=30000, group_by="drg_group",
                      categories=CATS[:3], epsilon=0.5, **WINDOW),
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("query-hospitals")
    generate(SyntheticConfig(hospitals=3, years=1, seed=3), out)
    return out


def _node(data_dir: Path, tmp: Path, i: int = 0, budget: float = 3.0) -> NodeSettings:
    return NodeSettings.from_config({"data-path": str(data_dir / f"hospital_{i:03d}.csv"),
                                     "ledger-path": str(tmp / f"ledger_{i}.json"),
                                     "hospital": f"hospital_{i:03d}", "budget": budget, "synthetic": True})


def _configs(data_dir: Path, tmp: Path, budgets=(3.0, 3.0, 3.0)) -> list[dict]:
    return [{"data-path": str(data_dir / f"hospital_{i:03d}.csv"), "ledger-path": str(tmp / f"h{i}.json"),
             "hospital": f"hospital_{i:03d}", "budget": b, "debug-seed": 11 + i,
             "synthetic": True} for i, b in enumerate(budgets)]


def _truth(records: list[pd.DataFrame], spec: QuerySpec) -> np.ndarray:
    """Independent of core.queries: plain pandas on the pooled records."""
    df = pd.concat(records)
    sel = df[(df.admit_date >= spec.start) & (df.admit_date <= spec.end) & df.drg_group.isin(spec.categories)]
    if spec.statistic == "count":
        out = sel.groupby("drg_group").size()
    else:
        v = sel[spec.column].clip(spec.lower, spec.upper)
        out = v.groupby(sel.drg_group).sum() if spec.statistic == "sum" else v.groupby(sel.drg_group).mean()
    return out.reindex(spec.categories, fill_value=0).to_numpy(dtype=float)


def _analytic_gaussian_delta(sigma: float, eps: float) -> float:
    """Exact δ(ε) of a Gaussian mechanism with noise multiplier σ (Balle & Wang 2018, Thm 8)."""
    phi = NormalDist().cdf
    return phi(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * phi(-1 / (2 * sigma) - eps * sigma)


# -- spec ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(statistic="median", epsilon=1), "statistic"),
        (dict(statistic="count", epsilon=0), "epsilon"),
        (dict(statistic="count", epsilon=float("nan")), "epsilon"),
        (dict(statistic="sum", column="cost", epsilon=1), "bounds"),
        (dict(statistic="mean", column="cost", lower=5, upper=5, epsilon=1), "lower must be < upper"),
        (dict(statistic="mean", lower=0, upper=5, epsilon=1), "column"),
        (dict(statistic="sum", column="patient_id", lower=0, upper=5, epsilon=1), "column"),
        (dict(statistic="count", lower=0, upper=5, epsilon=1), "bounds apply only"),
        (dict(statistic="count", group_by="drg_group", epsilon=1), "categories"),
        (dict(statistic="count", group_by="patient_id", categories=["a"], epsilon=1), "group_by"),
        (dict(statistic="count", group_by="drg_group", categories=["a", "a"], epsilon=1), "unique"),
        (dict(statistic="count", categories=["a"], epsilon=1), "only meaningful with group_by"),
        (dict(statistic="count", start="2024-02-30", epsilon=1), "valid date"),
        (dict(statistic="count", start="01/02/2024", epsilon=1), "YYYY-MM-DD"),
        (dict(statistic="count", start="2024-05-01", end="2024-04-01", epsilon=1), "after"),
    ],
)
def test_invalid_specs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuerySpec(**kwargs)


def test_spec_round_trips_through_config_and_json():
    spec = QuerySpec(statistic="mean", column="cost", lower=0, upper=5e4, group_by="drg_group",
                     categories=["cardiac", "renal"], start="2024-01-01", end="2024-12-31", epsilon=0.5)
    cfg = spec.to_config()
    assert all(isinstance(v, (str, float, int)) for v in cfg.values())
    assert QuerySpec.from_config(dict(ConfigRecord(cfg))) == spec
    assert QuerySpec.from_json(spec.to_json()) == spec
    assert QuerySpec.from_json('{"statistic": "count", "group-by": "drg_group", "categories": ["renal"], "epsilon": 1}') \
        == QuerySpec(statistic="count", group_by="drg_group", categories=["renal"], epsilon=1.0)
    with pytest.raises(ValueError, match="unknown"):
        QuerySpec.from_config({**cfg, "noise": 0.0})
    with pytest.raises(ValueError, match="unknown"):
        QuerySpec.from_json('{"statistic": "count", "epsilon": 1, "grupby": "drg_group"}')


# -- local answer, clipping and sensitivity -------------------------------------------------------


def _hand_built() -> pd.DataFrame:
    return pd.DataFrame({
        "admit_date": pd.to_datetime(["2024-01-01", "2024-01-05", "2024-02-01", "2023-12-31", "2024-03-01",
                                      "2024-12-31", "2025-01-01", "2024-12-31 15:00"], format="ISO8601"),
        "drg_group": ["cardiac", "cardiac", "respiratory", "cardiac", "oncology",
                      "respiratory", "respiratory", "respiratory"],
        "cost": [50.0, 500.0, 5.0, 60.0, 70.0, np.nan, 30.0, 30.0],
    })


def test_bounds_dates_and_categories_are_enforced():
    rec = _hand_built()
    common = dict(group_by="drg_group", categories=["cardiac", "respiratory", "neonatal"],
                  start="2024-01-01", end="2024-12-31", epsilon=1)
    # count: date range inclusive at both ends, undeclared 'oncology' dropped, empty bin still present
    assert local_answer(rec, QuerySpec(statistic="count", **common)).tolist() == [2, 3, 0]
    # with a column, records missing that value are not counted
    assert local_answer(rec, QuerySpec(statistic="count", column="cost", **common)).tolist() == [2, 2, 0]
    # 500 is clipped to 100 and 5 to 10
    bounded = dict(column="cost", lower=10, upper=100, **common)
    assert local_answer(rec, QuerySpec(statistic="sum", **bounded)).tolist() == [150, 40, 0]
    mean = QuerySpec(statistic="mean", **bounded)
    got = exact_statistic(rec, mean)
    assert got[:2].tolist() == [75, 20] and np.isnan(got[2])
    # the released mean vector is [Σ(clip(v) - c)/h, n] with c = 55, h = 45
    np.testing.assert_allclose(local_answer(rec, mean), [40 / 45, -70 / 45, 0, 2, 2, 0])
    # no grouping: one bin, every category counted
    assert local_answer(rec, QuerySpec(statistic="count", epsilon=1)).tolist() == [8]
    with pytest.raises(ValueError, match="no column"):
        local_answer(rec.drop(columns="cost"), QuerySpec(statistic="sum", **bounded))


@pytest.mark.parametrize("spec", [
    QuerySpec(statistic="count", group_by="drg_group", categories=["cardiac", "respiratory"], epsilon=1),
    QuerySpec(statistic="sum", column="cost", lower=-200, upper=100, group_by="drg_group",
              categories=["cardiac", "respiratory"], epsilon=1),
    QuerySpec(statistic="sum", column="cost", lower=10, upper=100, epsilon=1),
    QuerySpec(statistic="mean", column="cost", lower=10, upper=100, group_by="drg_group",
              categories=["cardiac", "respiratory"], epsilon=1),
])
def test_sensitivity_bounds_every_neighbour_and_is_tight(spec):
    rec = pd.concat([_hand_built(), pd.DataFrame({
        "admit_date": pd.to_datetime(["2024-06-01", "2024-06-02"]),
        "drg_group": ["cardiac", "respiratory"], "cost": [-1e6, 1e6]})], ignore_index=True)
    full = local_answer(rec, spec)
    diffs = [np.linalg.norm(full - local_answer(rec.drop(index=i), spec)) for i in rec.index]
    assert max(diffs) <= sensitivity(spec) + 1e-9
    assert max(diffs) == pytest.approx(sensitivity(spec))  # an extreme record attains it


# -- noise scale vs (ε, δ) ------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SPECS))
def test_noise_scale_matches_epsilon(name, data_dir, tmp_path):
    spec = SPECS[name]
    node = _node(data_dir, tmp_path)
    metrics = query_task("run-1", spec, node, rng=np.random.default_rng(123))
    led = Ledger.read(node.ledger_path)
    # the ledger's accountant says this one query cost the requested ε (within 1 %, never more)
    assert led.epsilon() == pytest.approx(spec.epsilon, rel=0.01) and led.epsilon() <= spec.epsilon
    assert metrics["epsilon"] == pytest.approx(led.epsilon())
    [entry] = led.entries
    sigma = entry["noise_multiplier"]
    assert (entry["sample_rate"], entry["steps"]) == (1.0, 1)
    assert sigma == pytest.approx(release_sigma(spec.epsilon, DELTA))
    # independent of Opacus: the exact analytic Gaussian bound at this σ meets (ε, δ)
    assert _analytic_gaussian_delta(sigma, spec.epsilon) <= DELTA
    stated = sigma * sensitivity(spec)
    assert metrics["release-noise"] == pytest.approx(stated)
    # the reply is exactly the exact answer plus noisy_release's noise, so its many-seed std is the noise std
    exact = local_answer(node_records(node), spec)
    plan = plan_release(spec, DELTA)
    released = np.array([metrics[f"query-answer-{i}"] for i in range(spec.answer_length)])
    np.testing.assert_allclose(released, noisy_release(exact, plan, np.random.default_rng(123)))
    noise = np.stack([noisy_release(exact, plan, np.random.default_rng(s)) - exact for s in range(SEEDS)])
    empirical = noise.std(axis=0, ddof=1)
    assert np.all(np.abs(empirical / stated - 1) < 0.10), (empirical, stated)
    assert abs(noise.std(ddof=1) / stated - 1) < 0.04
    assert np.all(np.abs(noise.mean(axis=0)) < 4 * stated / math.sqrt(SEEDS))


@pytest.mark.parametrize("name", list(SPECS))
def test_answers_are_unbiased_and_intervals_cover(name, data_dir):
    spec = SPECS[name]
    records = [node_records(_node(data_dir, data_dir, i)) for i in range(3)]
    truth = _truth(records, spec)
    exact = [local_answer(r, spec) for r in records]
    plan = plan_release(spec, DELTA)
    ests, covered, covered_delta = [], [], []
    for s in range(SEEDS):
        rng = np.random.default_rng(s)
        answers = [noisy_release(e, plan, rng) for e in exact]
        est = combine(spec, answers, [plan.noise_std] * 3)
        ests.append(est.estimate)
        covered.append((est.low <= truth) & (truth <= est.high))
        if spec.statistic == "mean":
            d = combine(spec, answers, [plan.noise_std] * 3, mean_interval="delta")
            covered_delta.append((d.low <= truth) & (truth <= d.high))
    ests, covered = np.array(ests), np.array(covered)
    if spec.statistic == "mean":
        # ratio estimator: std from the delta method; bias O(s²/n²) is negligible at these counts
        se = est.std / math.sqrt(SEEDS)
        assert np.all(covered.mean(axis=0) >= 0.95)  # conservative interval: a guarantee
        assert np.all(np.abs(np.mean(covered_delta, axis=0) - 0.95) < 0.02)  # delta method: approximate
    else:
        se = np.full(spec.n_bins, plan.noise_std * math.sqrt(3) / math.sqrt(SEEDS))
        assert np.all(np.abs(covered.mean(axis=0) - 0.95) < 0.02)
        assert est.std == pytest.approx(np.full(spec.n_bins, plan.noise_std * math.sqrt(3)))
    assert np.all(np.abs(ests.mean(axis=0) - truth) < 4 * se), (ests.mean(axis=0), truth, se)


def test_mean_interval_is_uninformative_when_count_is_noise():
    spec = QuerySpec(statistic="mean", column="cost", lower=0, upper=100, epsilon=1)
    est = combine(spec, [np.array([0.5, 1.0])], [10.0])
    assert (est.low[0], est.high[0]) == (0.0, 100.0)


# -- through the grid: refusals and audit -----------------------------------------------------------


def test_queries_refused_once_budget_is_spent(data_dir, tmp_path):
    configs = _configs(data_dir, tmp_path, budgets=(0.6, 3.0, 3.0))
    seen: list[Message] = []
    grid = InProcessGrid(make_app(), configs, tap=seen.append)
    spec = SPECS["count"]
    first = run_query(grid, spec)
    assert first.n_answered == 3 and first.refused == []
    poor = Path(configs[0]["ledger-path"])
    before = poor.read_bytes()
    seen.clear()
    second = run_query(grid, spec)
    assert second.answered == ["hospital_001", "hospital_002"]
    assert second.refused == [(1001, "budget exhausted")]
    [err] = [m for m in seen if m.has_error()]
    assert (err.error.code, err.error.reason) == (4002, "budget exhausted")
    assert poor.read_bytes() == before  # a refused query charges nothing
    assert Ledger.read(poor).epsilon() == pytest.approx(0.5, rel=0.01)
    # the estimate now covers two hospitals; its noise std says so
    assert second.estimate.std[0] == pytest.approx(first.estimate.std[0] * math.sqrt(2 / 3))
    assert second.violations == []


def test_audit_accepts_query_replies(data_dir, tmp_path):
    seen: list[Message] = []
    grid = InProcessGrid(make_app(), _configs(data_dir, tmp_path), tap=seen.append)
    audit = MessageAudit(array_spec={})
    for spec in [*SPECS.values(), QuerySpec(statistic="count", epsilon=0.1)]:
        seen.clear()
        result = run_query(grid, spec)
        assert result.n_answered == 3 and result.violations == []
        assert [p for m in seen for p in audit.problems(m)] == []
        for m in seen:
            keys = set(m.content["metrics"].keys())
            assert keys == {f"query-answer-{i}" for i in range(spec.answer_length)} | {"release-noise", "epsilon"}
            assert set(m.content.keys()) == {"metrics", "node"}
        # one hospital's answer is within a few noise std of its exact answer
        truth = _truth([node_records(_node(data_dir, tmp_path, i)) for i in range(3)], spec) \
            if spec.group_by else None
        if truth is not None:
            width = result.estimate.high - result.estimate.low
            assert np.all(np.abs(result.estimate.estimate - truth) <= width)


def test_node_refuses_malformed_query_without_charging(data_dir, tmp_path):
    configs = _configs(data_dir, tmp_path)[:1]
    grid = InProcessGrid(make_app(), configs)
    bad = [
        {**SPECS["count"].to_config(), "categories": json.dumps(["cardiac", "cardiac"])},  # would double count
        {**SPECS["count"].to_config(), "noise": 0.0},
        {"statistic": "count", "epsilon": 1e-6},  # needs σ beyond the calibrator's range
    ]
    for cfg in bad:
        msg = Message(RecordDict({"query": ConfigRecord(cfg)}), dst_node_id=1001, message_type="query.analytics",
                      group_id="analytics")
        [reply] = grid.send_and_receive([msg])
        assert (reply.error.code, reply.error.reason) == (4004, "configuration invalid")
        assert MessageAudit(array_spec={}).problems(reply) == []
    ledger = Path(configs[0]["ledger-path"])
    assert not ledger.exists() or Ledger.read(ledger).entries == []


def test_query_server_app(data_dir, tmp_path):
    from flwr.app import Context

    outcome: list = []
    app = make_query_app(SPECS["sum"], outcome)
    grid = InProcessGrid(make_app(), _configs(data_dir, tmp_path))
    app(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={}))
    [result] = outcome
    assert result.n_answered == 3 and list(result.table().bin) == CATS


def test_cli_query(data_dir, tmp_path):
    import typer
    from typer.testing import CliRunner

    from fedalloc.commands_query import query_command

    app = typer.Typer()
    app.command("query")(query_command)
    app.command("other")(lambda: None)  # two commands so the sub-command name is kept
    args = ["query", "--statistic", "count", "--group-by", "drg_group", "--categories", "respiratory,cardiac",
            "--start", "2023-03-01", "--end", "2023-08-31", "--epsilon", "0.5", "--data", str(data_dir),
            "--ledgers", str(tmp_path / "led")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "respiratory" in res.output and "3 of 3 node(s) answered" in res.output
    res = CliRunner().invoke(app, [*args, "--json"])
    out = json.loads(res.output)
    assert [b["bin"] for b in out["bins"]] == ["respiratory", "cardiac"]
    # ledgers persist between invocations: two ε=0.5 releases, composed by the ledger's accountant
    two = compute_epsilon([Mechanism(release_sigma(0.5, DELTA), 1.0, 1, "query-release")] * 2, DELTA)
    assert all(e == pytest.approx(two) for e in out["epsilon_per_node"].values())
    res = CliRunner().invoke(app, ["query", "--statistic", "sum", "--epsilon", "1", "--data", str(data_dir)])
    assert res.exit_code == 2 and "needs a column" in res.output
