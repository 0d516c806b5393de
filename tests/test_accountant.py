"""ε claims checked against an independent accountant (Google's dp_accounting)."""

from __future__ import annotations

import json

import dp_accounting
import pytest
from dp_accounting import rdp
from typer.testing import CliRunner

from client.calibration import release_sigma, training_sigma
from client.ledger import Ledger, Mechanism, compute_epsilon
from fedalloc.cli import app as cli

ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 257, 4)) + [320, 512, 1024]


def independent_epsilon(history: list[dict], delta: float) -> float:
    acc = rdp.RdpAccountant(ORDERS)
    for h in history:
        gauss = dp_accounting.GaussianDpEvent(h["noise_multiplier"])
        event = gauss if h["sample_rate"] == 1.0 else dp_accounting.PoissonSampledDpEvent(h["sample_rate"], gauss)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, h["steps"]))
    return acc.get_epsilon(delta)


@pytest.mark.parametrize(
    "history",
    [
        [(1.1, 0.01, 1000)],
        [(0.8, 0.25, 20), (0.8, 0.25, 20), (12.0, 1.0, 1)],
        [(2.0, 0.1, 90), (5.0, 1.0, 1), (1.5, 0.05, 300)],
    ],
)
def test_ledger_epsilon_matches_independent_accountant(history):
    ours = compute_epsilon(history, 1e-5)
    theirs = independent_epsilon([{"noise_multiplier": s, "sample_rate": q, "steps": n} for s, q, n in history], 1e-5)
    assert ours == pytest.approx(theirs, rel=0.01)


def test_reported_epsilon_of_a_federated_run_is_recomputable(node_configs, run_settings):
    """What a node reported equals an independent computation over `ledger show --json`."""
    from client.app import make_app
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    out = run_federation(InProcessGrid(make_app(), node_configs), run_settings())
    assert out.error is None
    for cfg in node_configs:
        res = CliRunner().invoke(cli, ["ledger", "show", cfg["ledger-path"], "--json"])
        assert res.exit_code == 0, res.output
        summary = json.loads(res.output)
        assert set(summary) >= {"budget", "delta", "epsilon_spent", "history"}
        assert all(set(h) >= {"noise_multiplier", "sample_rate", "steps"} for h in summary["history"])
        recomputed = independent_epsilon(summary["history"], summary["delta"])
        assert out.epsilon[cfg["hospital"]] == pytest.approx(recomputed, rel=0.01)
        assert summary["epsilon_spent"] == pytest.approx(recomputed, rel=0.01)


def test_ledger_show_human_readable(tmp_path):
    path = tmp_path / "l.json"
    Ledger.open(path, node="h", budget=2.0, delta=1e-5).charge([Mechanism(2.0, 0.1, 10)], run="r1", purpose="t")
    res = CliRunner().invoke(cli, ["ledger", "show", str(path)])
    assert res.exit_code == 0 and "r1" in res.output and "remaining" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    res = CliRunner().invoke(cli, ["ledger", "show", str(bad)])
    assert res.exit_code == 1 and "corrupt" in res.output


def test_opacus_engine_accounts_exactly_what_the_ledger_charged():
    """train_dp reports the (q, steps) Opacus's own accountant recorded: the planned charge."""
    import numpy as np

    from client.dp_training import plan_steps, train_dp
    from client.features import Examples
    from client.model import build_model

    rng = np.random.default_rng(0)
    n = 37
    ex = Examples(rng.random((n, 8), dtype=np.float32), rng.integers(0, 12, n), rng.random((n, 2), dtype=np.float32),
                  rng.random((n, 4), dtype=np.float32))
    used = train_dp(build_model(8, 4, 12), ex, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8, epochs=3, lr=0.01, seed=0)
    assert used == plan_steps(n, 8, 3)


def test_calibration_spends_close_to_but_not_over_target():
    rel = release_sigma(0.3, 1e-5)
    assert compute_epsilon([(rel, 1.0, 1)], 1e-5) == pytest.approx(0.3, rel=0.01)
    history = [(2.0, 0.1, 50)]
    sigma = training_sigma(history, 0.1, 100, [Mechanism(rel, 1.0, 1)], 3.0, 1e-5)
    total = compute_epsilon(history + [(sigma, 0.1, 100), (rel, 1.0, 1)], 1e-5)
    assert 2.97 <= total <= 3.0
