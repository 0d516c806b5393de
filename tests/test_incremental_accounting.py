"""The incremental accountant (a charge composes one mechanism onto the node's stored state)
against a full recomputation of the whole history, and calibration against the charges it plans.

The full recomputation starts from empty caches and groups identical (σ, q, relation) entries into
one self-composed PLD each (the accountant before it became incremental), so it shares no stored
state with the ledger. Both are pessimistic PLDs at the same discretisation: they must agree to far
better than the 1 % the independent reference in tests/test_accountant.py allows.
"""

from __future__ import annotations

import random

import dp_accounting
import pytest
from dp_accounting.pld import privacy_loss_distribution as pld

from client import accounting
from client.accounting import ADD_REMOVE, DISCRETISATION, REPLACE_ONE, Mechanism
from client.calibration import release_sigma, training_sigma
from client.ledger import Ledger, compute_epsilon

DELTA = 1e-5
REL = dp_accounting.NeighboringRelation


def full_recomputation(history: list[Mechanism], delta: float) -> float:
    """ε of the whole history from scratch: grouped, self-composed, no stored state."""
    steps: dict[tuple[float, float, str], int] = {}
    for m in history:
        key = (m.noise_multiplier, m.sample_rate, m.relation)
        steps[key] = steps.get(key, 0) + m.steps
    total = None
    for (sigma, q, relation), n in sorted(steps.items()):
        rel = REL.REPLACE_ONE if relation == REPLACE_ONE else REL.ADD_OR_REMOVE_ONE
        one = pld.from_gaussian_mechanism(sigma, sensitivity=1.0, sampling_prob=q, neighboring_relation=rel,
                                          value_discretization_interval=DISCRETISATION, pessimistic_estimate=True)
        one = one.self_compose(n) if n > 1 else one
        total = one if total is None else total.compose(one)
    return float(total.get_epsilon_for_delta(delta))


def random_history(seed: int, n: int) -> list[Mechanism]:
    """A node's life: DP-SGD rounds of a few runs, D_i releases and queries, interleaved."""
    rng = random.Random(seed)
    runs = [(rng.uniform(3.0, 9.0), rng.choice([0.05, 1 / 9, 0.25, 0.5]), rng.choice([2, 4, 18])) for _ in range(3)]
    out = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.7:
            sigma, q, steps = rng.choice(runs)
            out.append(Mechanism(sigma, q, steps))
        elif kind < 0.85:
            out.append(Mechanism(rng.uniform(20.0, 60.0), 1.0, 1, "gaussian-release"))
        else:
            out.append(Mechanism(rng.uniform(20.0, 60.0), 1.0, 1, "query-release", relation=ADD_REMOVE))
    return out


@pytest.mark.parametrize("seed", [0, 1])
def test_every_charge_matches_a_full_recomputation(tmp_path, seed):
    history = random_history(seed, 12)
    led = Ledger.open(tmp_path / "l.json", node="h", budget=1e6, delta=DELTA)
    reported = [led.charge([m], run="r", purpose="x") for m in history]
    for i, eps in enumerate(reported):
        full = full_recomputation(history[: i + 1], DELTA)
        assert eps >= full * (1 - 1e-9), f"charge {i}: incremental ε {eps} below the full recomputation {full}"
        assert eps <= full * (1 + 1e-6), f"charge {i}: incremental ε {eps} differs from the full recomputation {full}"
    # A restarted node (empty caches) folds the file's history to the same ε, bit for bit.
    accounting.clear_caches()
    assert Ledger.read(tmp_path / "l.json").epsilon() == reported[-1]


def test_a_charge_composes_one_mechanism_onto_the_stored_state(tmp_path, monkeypatch):
    """The cost of a charge does not grow with the history: one new PLD, one composition."""
    led = Ledger.open(tmp_path / "l.json", node="h", budget=1e6, delta=DELTA)
    for m in random_history(2, 8):
        led.charge([m], run="r", purpose="x")
    built: list[tuple] = []
    real = accounting.entry_pld.__wrapped__

    def counting(*key):  # every entry PLD the accountant builds (cache misses included)
        built.append(key)
        return real(*key)

    monkeypatch.setattr(accounting, "entry_pld", counting)
    led.charge([Mechanism(7.5, 0.2, 3)], run="r", purpose="x")
    assert built == [(7.5, 0.2, REPLACE_ONE, 3)]


def test_eviction_rebuilds_from_the_longest_stored_prefix(monkeypatch):
    history = random_history(3, 6)
    want = full_recomputation(history, DELTA)
    accounting.clear_caches()
    monkeypatch.setattr(accounting, "MAX_STATE_BYTES", 1)  # keep only the newest state
    assert compute_epsilon(history, DELTA) == pytest.approx(want, rel=1e-6)
    assert compute_epsilon(history[:3], DELTA) == pytest.approx(full_recomputation(history[:3], DELTA), rel=1e-6)
    accounting.clear_caches()


@pytest.mark.parametrize("rounds", [1, 5])
def test_calibrated_plan_is_what_the_charges_cost(tmp_path, rounds):
    """σ planned for `rounds` charges of `steps` each, then the release: the ledger accepts them
    all and ends close to, never above, the target."""
    steps, q, target = 4, 0.5, 3.0
    rel = Mechanism(release_sigma(0.45, DELTA), 1.0, 1, "gaussian-release")
    led = Ledger.open(tmp_path / "l.json", node="h", budget=target, delta=DELTA)
    led.charge([Mechanism(20.0, 1.0, 1, "query-release")], run="q", purpose="query")  # a prior history
    sigma = training_sigma(led.mechanisms(), q, steps * rounds, [rel], target, DELTA, rounds=rounds)
    for r in range(rounds):
        led.charge([Mechanism(sigma, q, steps)], run="t", purpose=f"train {r}")
    final = led.charge([rel], run="t", purpose="release")
    assert 0.99 * target <= final <= target
    assert full_recomputation(led.mechanisms(), DELTA) <= target * (1 + 1e-9)


def test_a_fresh_process_starts_from_the_saved_state(tmp_path, monkeypatch):
    """Deployment handles each message in a new process: the saved state spares the fold."""
    path = tmp_path / "l.json"
    history = random_history(4, 8)
    led = Ledger.open(path, node="h", budget=1e6, delta=DELTA)
    for m in history:
        led.charge([m], run="r", purpose="x")
    accounting.clear_caches()  # "a new process"
    Ledger.open(path, node="h", budget=1e6, delta=DELTA).charge([history[0]], run="r", purpose="x")
    assert Ledger.open(path, node="h", budget=1e6, delta=DELTA).state_path.exists()
    accounting.clear_caches()
    built: list[tuple] = []
    real = accounting.entry_pld.__wrapped__
    monkeypatch.setattr(accounting, "entry_pld", lambda *k: built.append(k) or real(*k))
    new = Mechanism(6.5, 0.25, 2)
    eps = Ledger.open(path, node="h", budget=1e6, delta=DELTA).charge([new], run="r", purpose="x")
    assert built == [accounting.entry_key(new)]
    assert eps == pytest.approx(full_recomputation(history + [history[0], new], DELTA), rel=1e-6)


@pytest.mark.parametrize("damage", ["torn", "other history", "garbage"])
def test_a_damaged_or_stale_state_is_ignored(tmp_path, damage):
    path = tmp_path / "l.json"
    history = random_history(5, 5)
    led = Ledger.open(path, node="h", budget=1e6, delta=DELTA)
    for m in history:
        led.charge([m], run="r", purpose="x")
    accounting.clear_caches()
    Ledger.open(path, node="h", budget=1e6, delta=DELTA).charge([history[0]], run="r", purpose="x")
    state = led.state_path
    if damage == "torn":
        state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    elif damage == "garbage":
        state.write_bytes(b"\0" * 100)
    else:  # a state composed from a different (smaller) history must not be taken for this one
        other = tmp_path / "o.json"
        o = Ledger.open(other, node="h", budget=1e6, delta=DELTA)
        o.charge([Mechanism(400.0, 1.0, 1, "query-release")], run="r", purpose="x")
        accounting.clear_caches()
        Ledger.open(other, node="h", budget=1e6, delta=DELTA).charge([Mechanism(400.0, 1.0, 1, "query-release")],
                                                                     run="r", purpose="x")
        state.write_bytes(o.state_path.read_bytes())
    accounting.clear_caches()
    eps = Ledger.read(path).epsilon()
    assert eps == pytest.approx(full_recomputation(history + [history[0]], DELTA), rel=1e-6)
