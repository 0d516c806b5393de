"""The log-linear forecaster (run-config `model = "loglinear"`) and the DP series-release comparator."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution as pld

from client.dp_training import train_dp
from core.run_config import RunSettings
from forecasting.features import Examples, forecast_inputs, release_window
from forecasting.model import LogLinearForecaster, build_model, model_for


def _run(**extra) -> RunSettings:
    return RunSettings.from_mapping({"model": "loglinear", "lags": 1, "release-blocks": 1, "groups": "a,b,c", **extra})


def _examples(n: int = 40, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    theta = rng.uniform(0, 2 * np.pi, n)
    return Examples(x_log=np.log1p(rng.poisson(50, (n, 1))).astype(np.float32),
                    group=rng.integers(0, 3, n).astype(np.int64),
                    season=np.c_[np.sin(theta), np.cos(theta)].astype(np.float32),
                    y_log=np.repeat(np.log1p(rng.poisson(50, (n, 1))), 4, axis=1).astype(np.float32))


def test_starts_at_the_window_and_trains_under_opacus():
    model = model_for(_run())
    assert isinstance(model, LogLinearForecaster)
    assert sum(p.numel() for p in model.parameters()) == 2 + 3 * 4  # w, b, 2 harmonics × 3 groups
    window = np.array([[37.0, 5.0, 0.0]])
    x, g, s = (torch.from_numpy(a) for a in forecast_inputs(window, pd.Timestamp("2022-06-06")))
    # data-free start: the forecast per period is the last period (last value)
    assert model.mean_forecast(x, g, s).detach().numpy().ravel() == pytest.approx(window.ravel(), abs=1e-4)
    used = train_dp(model, _examples(), noise_multiplier=1.0, max_grad_norm=1.0, batch_size=16, epochs=2,
                    lr=0.05, seed=0)
    assert used.steps == 2 * 3 and used.sample_rate == pytest.approx(1 / 3)  # Opacus: 1 / batches per epoch
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # handed back unhooked: a later autograd pass (the interval's delta method) works on it
    from forecasting.intervals import window_gradient

    assert np.isfinite(window_gradient(model, window, pd.Timestamp("2022-06-06"))).all()


def test_opacus_per_sample_gradients_are_the_per_example_gradients():
    """Clipping bounds one example's gradient only if Opacus's per-sample gradients are exactly
    each example's own gradient: checked against autograd one example at a time."""
    from opacus import GradSampleModule

    model = model_for(_run())
    with torch.no_grad():
        model.profile.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    ex = _examples(8)
    x, g, s, y = (torch.from_numpy(a) for a in (ex.x_log, ex.group, ex.season, ex.y_log))
    gsm = GradSampleModule(build_model(1, 4, 3, kind="loglinear"), loss_reduction="sum")
    gsm._module.load_state_dict(model.state_dict())
    loss = torch.nn.functional.mse_loss(gsm(x, g, s), y, reduction="sum")
    loss.backward()
    for i in range(len(y)):
        model.zero_grad()
        torch.nn.functional.mse_loss(model(x[i:i + 1], g[i:i + 1], s[i:i + 1]), y[i:i + 1], reduction="sum").backward()
        for (name, p), q in zip(model.named_parameters(), gsm._module.parameters()):
            assert torch.allclose(q.grad_sample[i], p.grad, atol=1e-5), name


def test_model_key_is_validated_and_a_node_refuses_the_other_family():
    from client.tasks import check_model

    with pytest.raises(ValueError, match="run-config model 'mlp' is not allowed; choose one of seasonal, loglinear"):
        RunSettings.from_mapping({"model": "mlp"}).check()
    seasonal = build_model(1, 4, 3).state_dict()
    with pytest.raises(Exception, match="wrong arrays"):
        check_model(seasonal, _run())


def test_release_variance_is_the_delta_method_of_the_released_window():
    from forecasting.intervals import release_variance

    model = model_for(_run())
    with torch.no_grad():
        model.lag.weight.fill_(0.85)
        model.profile.weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(2))
    first = pd.Timestamp("2022-06-06")
    window = np.array([[100.0, 20.0, 5.0]])

    def total(w: np.ndarray) -> float:
        x, g, s = (torch.from_numpy(a) for a in forecast_inputs(w, first))
        return float(model.mean_forecast(x, g, s).detach().sum()) * 4

    rng = np.random.default_rng(0)
    draws = [total(release_window(window, 1, 2.0, rng)) for _ in range(2000)]
    assert np.var(draws) == pytest.approx(release_variance(model, first, 3, 1, 2.0, window), rel=0.15)
    with pytest.raises(ValueError, match="needs the released window"):
        release_variance(model, first, 3, 1, 2.0)


def test_a_federation_with_the_loglinear_model_releases_demand_and_intervals(node_configs, run_settings):
    from client.app import make_app
    from client.ledger import Ledger
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    out = run_federation(InProcessGrid(make_app(), node_configs), run_settings(model="loglinear"))
    assert out.error is None
    alloc = pd.read_csv(out.path / "allocations.csv")
    assert (alloc.demand > 0).all() and (alloc.demand_lo <= alloc.demand).all() and (alloc.demand <= alloc.demand_hi).all()
    for cfg in node_configs:
        assert 0 < Ledger.read(cfg["ledger-path"]).epsilon() <= cfg["budget"]


def test_series_release_spends_one_gaussian_and_is_post_processing(sim_data):
    """The released series carries the calibrated noise, and its ε is that of one Gaussian checked
    against dp_accounting built directly (add/remove, Δ = 1 per admission); the forecast is computed
    from the released series only; at ε = inf it is deterministic and noise-free."""
    from client.calibration import release_sigma
    from simulations import baselines as B

    run = B.run_settings(**{"num-server-rounds": 1, "local-epochs": 1, "lags": 4, "release-blocks": 1,
                            "model": "loglinear", "epsilon": 2.0})
    h = B.load_hospitals(sim_data, run)
    noisy, eps = B.release_series(h.series[0], run, np.random.default_rng(0))
    sigma = release_sigma(2.0, 1e-5)
    noise = (noisy - h.series[0]).to_numpy().ravel()
    assert noise.std() == pytest.approx(sigma, rel=0.1) and abs(noise.mean()) < 0.2 * sigma
    reference = pld.from_gaussian_mechanism(
        sigma, sensitivity=1.0, neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    ).get_epsilon_for_delta(1e-5)
    assert reference * (1 - 1e-6) <= eps <= min(reference * 1.01, 2.0 * 1.001)
    pred, eps_all = B.dp_series_release(h, run)
    assert np.isfinite(pred).all() and (pred > 0).all() and eps_all == pytest.approx(np.full(len(h.names), eps))
    inf_run = run.__class__(**{**run.__dict__, "epsilon": math.inf})
    assert B.release_series(h.series[0], inf_run, np.random.default_rng(0))[0] is h.series[0]
    a, eps_inf = B.dp_series_release(h, inf_run)
    assert np.isinf(eps_inf).all() and a == pytest.approx(B.dp_series_release(h, inf_run)[0])
