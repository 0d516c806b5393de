"""D_i's 80 % interval (forecasting/intervals.py): what a node releases, what the coordinator
accepts and allocates on, how the sweep scores it, and that it is post-processing of the release.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from core.protocol import DEMAND_HI, DEMAND_LO, DEMAND_MEDIAN


def _model(run):
    """A data-free model with a non-trivial seasonal profile and lag weighting (no pretraining: fast)."""
    from forecasting.model import build_model

    model = build_model(run.lags, run.horizon, 12)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        model.profile.weight.copy_(0.3 * torch.randn(model.profile.weight.shape, generator=gen))
        model.mix.logits.copy_(torch.randn(model.mix.logits.shape, generator=gen))
    return model


def _state(run):
    return _model(run).state_dict()


def test_wis_and_coverage_on_a_hand_built_example():
    from simulations.sweep import interval_coverage, weighted_interval_score

    lo, med, hi = np.array([80.0, 80.0, 80.0]), np.array([100.0, 100.0, 100.0]), np.array([120.0, 120.0, 120.0])
    y = np.array([130.0, 100.0, 80.0])
    # by hand, α = 0.2 (2/α = 10), WIS = (|y − m|/2 + 0.1·IS) / 1.5:
    #   y = 130: IS = 40 + 10·10 = 140 → (15 + 14)/1.5 = 19.333…
    #   y = 100: IS = 40 → (0 + 4)/1.5 = 2.666…
    #   y =  80: on the bound, IS = 40 → (10 + 4)/1.5 = 9.333…
    assert weighted_interval_score(lo, med, hi, y) == pytest.approx([29 / 1.5, 4 / 1.5, 14 / 1.5])
    assert interval_coverage(lo, hi, y) == pytest.approx(2 / 3)


def test_forecast_is_linear_in_the_window_and_release_variance_matches_simulation(run_settings):
    from forecasting.features import forecast_inputs, release_window
    from forecasting.intervals import release_variance, window_coefficients

    run = run_settings()
    model = _model(run)
    first = pd.Timestamp(run.cutoff)
    window = np.random.default_rng(0).poisson(20.0, size=(run.lags, 12)).astype(float)
    coef = window_coefficients(model, first, 12)

    def total(w: np.ndarray) -> float:
        x, g, s = (torch.from_numpy(a) for a in forecast_inputs(w, first))
        return float(model.mean_forecast(x, g, s).detach().double().sum()) * run.horizon

    assert total(window) == pytest.approx(float((coef * window).sum()), rel=1e-5)
    rng = np.random.default_rng(1)
    draws = [total(release_window(window, run.release_blocks, 8.0, rng)) for _ in range(400)]
    var = release_variance(model, first, 12, run.release_blocks, 8.0)
    assert np.var(draws) == pytest.approx(var, rel=0.2)  # 400 draws: ±14 % at 2 sd


def test_interval_brackets_the_mean_and_never_goes_below_zero():
    from forecasting.intervals import Calibration, interval

    cal = Calibration(a=1.0, b=0.01, z=(-1.2, 0.1, 1.1), n=100)
    for point, var in [(0.0, 0.0), (3.0, 400.0), (500.0, 25.0)]:
        iv = interval(point, var, cal)
        assert 0.0 <= iv.lo <= iv.median <= iv.hi and iv.lo <= point <= iv.hi
    assert interval(500.0, 0.0, cal).hi - 500.0 == pytest.approx(1.1 * math.sqrt(500 + 0.01 * 500**2))


def _loglinear_state(run):
    from forecasting.model import model_for

    model = model_for(run)
    with torch.no_grad():
        model.profile.weight.copy_(0.3 * torch.randn(model.profile.weight.shape, generator=torch.Generator().manual_seed(3)))
        model.lag.weight.fill_(0.9 / run.lags)
    return model.state_dict()


@pytest.mark.parametrize("kind", ["seasonal", "loglinear"])
def test_reply_carries_the_interval_and_equal_released_windows_give_equal_intervals(sim_data, tmp_path, run_settings,
                                                                                     kind):
    """A neighbouring pair D, D + r (r inside the release window) whose stored released windows are
    equal: the replies, interval included, are identical. The interval reads no record (for the
    log-linear model it reads the released window: still post-processing)."""
    from client.node import NodeSettings
    from client.releases import ReleaseStore
    from client.tasks import predict_task

    run = run_settings(**{"run-name": "iv", "model": kind})
    state = _state(run) if kind == "seasonal" else _loglinear_state(run)
    d = pd.read_csv(sim_data / "hospital_001.csv")
    r = d.iloc[[0]].assign(encounter_id="x-r", admit_date=str((pd.Timestamp(run.cutoff) - pd.Timedelta(days=3)).date()))
    window = np.random.default_rng(5).normal(30.0, 6.0, size=(run.lags, 12))
    replies = []
    for name, records in (("D", d), ("D+r", pd.concat([d, r], ignore_index=True))):
        path = tmp_path / name / "hospital_001.csv"
        path.parent.mkdir()
        records.to_csv(path, index=False)
        node = NodeSettings.from_config({"data-path": str(path), "ledger-path": str(tmp_path / name / "l.json"),
                                         "hospital": "hospital_001", "budget": 3.0, "synthetic": True})
        # the release already happened (same noisy window for both): everything now is post-processing
        ReleaseStore(node.ledger_path, "iv").put_window(window, {"epsilon": 0.5})
        replies.append(predict_task(state, run, node, "1"))
    a, b = replies
    assert 0 <= a[DEMAND_LO] <= a[DEMAND_MEDIAN] <= a[DEMAND_HI] and a[DEMAND_LO] <= a["demand"] <= a[DEMAND_HI]
    assert a[DEMAND_LO] < a[DEMAND_HI]
    assert a == b


def _reply(metrics: dict) -> Message:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, SUPERLINK_NODE_ID, 1
    msg = Message(content=RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=0, message_type="query.predict")
    msg.metadata.__dict__["_src_node_id"] = 1001
    return msg


@pytest.mark.parametrize("bounds, phrase", [
    ({DEMAND_LO: 12.0, DEMAND_MEDIAN: 10.0, DEMAND_HI: 8.0}, "lo ≤ median ≤ hi"),
    ({DEMAND_LO: 8.0, DEMAND_MEDIAN: 10.0, DEMAND_HI: float("inf")}, "not finite"),
    ({DEMAND_LO: float("nan"), DEMAND_MEDIAN: 10.0, DEMAND_HI: 12.0}, "not finite"),
    ({DEMAND_LO: 10.5, DEMAND_MEDIAN: 11.0, DEMAND_HI: 12.0}, "outside its interval"),
    ({DEMAND_LO: 8.0, DEMAND_HI: 12.0}, "incomplete"),
])
def test_audit_refuses_a_broken_interval(run_settings, bounds, phrase):
    from forecasting.model import build_model
    from flwr.app import ArrayRecord
    from server.audit import MessageAudit

    run = run_settings()
    audit = MessageAudit.for_arrays(ArrayRecord(build_model(run.lags, run.horizon, 12).state_dict()))
    groups = {f"demand-{g}": (10.0 if i == 0 else 0.0) for i, g in enumerate(run.group_list)}
    honest = {"demand": 10.0, "epsilon": 1.0, **groups}
    assert audit.problems(_reply({**honest, DEMAND_LO: 8.0, DEMAND_MEDIAN: 10.0, DEMAND_HI: 12.0})) == []
    assert any(phrase in p for p in audit.problems(_reply({**honest, **bounds})))


def _predict_reply(hospital: str, demand: float, lo: float, hi: float, groups) -> Message:
    msg = _reply({"demand": demand, "epsilon": 1.0, DEMAND_LO: lo, DEMAND_MEDIAN: demand, DEMAND_HI: hi,
                  **{f"demand-{g}": (demand if i == 0 else 0.0) for i, g in enumerate(groups)}})
    msg.content["node"] = ConfigRecord({"hospital": hospital})
    return msg


@pytest.mark.parametrize("allocate_on", ["mean", "q10", "q90"])
def test_allocation_uses_the_chosen_bound(run_settings, allocate_on):
    from core.fairness import fairness_summary
    from server.runner import allocate_released

    run = run_settings(policy="proportional", total=100.0, **{"allocate-on": allocate_on, "resources-file": ""})
    demand, lo, hi = np.array([100.0, 100.0]), np.array([90.0, 50.0]), np.array([110.0, 200.0])
    replies = [_predict_reply(f"h{i}", demand[i], lo[i], hi[i], run.group_list) for i in range(2)]
    table, fairness, _ = allocate_released(run, replies)
    used = {"mean": demand, "q10": lo, "q90": hi}[allocate_on]
    assert table.allocation.to_numpy() == pytest.approx(100.0 * used / used.sum())
    assert list(table.columns[:5]) == ["hospital", "demand", "demand_lo", "demand_median", "demand_hi"]
    # fairness is measured against the mean demand whatever the policy allocated on
    assert fairness == pytest.approx(fairness_summary(table.allocation.to_numpy(), demand))


def test_allocate_on_is_validated(run_settings):
    with pytest.raises(ValueError, match="allocate-on"):
        run_settings(**{"allocate-on": "q95"})
    with pytest.raises(ValueError, match="allocate-on"):
        run_settings(policy="drg_budget", **{"allocate-on": "q90"})


def test_naive_baseline_interval_from_its_own_past_errors():
    from simulations.baselines import empirical_interval, last_value

    steady = np.full((40, 2), 5.0)  # a naive forecast that was always right: a zero-width interval
    assert empirical_interval(steady, 4, lambda v: last_value(v, 4), 1) == pytest.approx([40.0, 40.0, 40.0])
    # one-step last value: past relative errors are v[o]/v[o−1] − 1 at every origin o ≥ 1, and the
    # interval is today's forecast (v[−1] = 1) scaled by their 10/50/90 % quantiles
    v = np.ones((41, 1))
    v[1::8], v[5::8] = 1.1, 0.9
    lo, med, hi = empirical_interval(v, 1, lambda x: last_value(x, 1), 1)
    ratios = v[1:, 0] / v[:-1, 0] - 1
    assert (lo, med, hi) == pytest.approx(list(1 + np.quantile(ratios, (0.1, 0.5, 0.9))))
    assert np.isnan(empirical_interval(steady[:5], 4, lambda x: last_value(x, 4), 1)).all()  # too little history


def test_calibration_recovers_a_known_spread_and_covers_80_percent_out_of_sample():
    from forecasting.intervals import fit_calibration, interval

    rng = np.random.default_rng(0)
    mean = rng.uniform(50, 2000, size=4000)
    truth = rng.normal(mean, np.sqrt(1.0 * mean + 0.002 * mean**2))  # Poisson-like + 4.5 % multiplicative
    cal = fit_calibration(mean[:2000], truth[:2000])
    assert cal.a == pytest.approx(1.0, abs=0.6) and cal.b == pytest.approx(0.002, rel=0.2)
    assert cal.z[0] == pytest.approx(-1.28, abs=0.1) and cal.z[2] == pytest.approx(1.28, abs=0.1)
    inside = [(iv.lo <= y <= iv.hi) for m, y in zip(mean[2000:], truth[2000:]) for iv in [interval(m, 0.0, cal)]]
    assert np.mean(inside) == pytest.approx(0.8, abs=0.03)


def test_allocating_on_a_bound_needs_every_node_to_have_released_one(run_settings):
    from server.runner import allocate_released

    run = run_settings(policy="proportional", total=100.0, **{"allocate-on": "q90", "resources-file": ""})
    replies = [_predict_reply("h0", 100.0, 90.0, 110.0, run.group_list), _predict_reply("h1", 50.0, 40.0, 60.0, run.group_list)]
    for key in (DEMAND_LO, DEMAND_MEDIAN, DEMAND_HI):  # h1 is an older node: no interval
        del replies[1].content["metrics"][key]
    with pytest.raises(ValueError, match="h1 released no interval"):
        allocate_released(run, replies)
    table, _, _ = allocate_released(run_settings(**{"resources-file": ""}), replies)  # mean: fine, NaN bounds
    assert np.isnan(table.set_index("hospital").loc["h1", "demand_hi"])
