"""Ledger enforcement: pre-charge, refusal, persistence, crash safety, no silent reset.

The SQLite specifics (migration from JSON, concurrent processes, kill -9, fsyncs) are in
tests/test_ledger_sqlite.py.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from client.ledger import BudgetExceeded, Ledger, LedgerError, Mechanism, compute_epsilon


def open_ledger(path, **kw):
    args = {"node": "h1", "budget": 3.0, "delta": 1e-5}
    args.update(kw)
    return Ledger.open(path, **args)


def test_charge_is_persisted_and_read_back_after_restart(tmp_path):
    path = tmp_path / "l.json"
    led = open_ledger(path)
    eps = led.charge([Mechanism(3.0, 0.1, 50)], run="r1", purpose="train")
    assert eps == pytest.approx(compute_epsilon([(3.0, 0.1, 50)], 1e-5))
    again = open_ledger(path)  # a restarted node
    assert again.history() == [(3.0, 0.1, 50)]
    eps2 = again.charge([Mechanism(3.0, 0.1, 50)], run="r1", purpose="train")
    assert eps2 == pytest.approx(compute_epsilon([(3.0, 0.1, 50)] * 2, 1e-5))
    assert eps2 > eps


def _on_disk(path):
    """What a ledger holds on disk: its file, its write-ahead log and SQLite's commit counter."""
    wal = path.with_name(path.name + "-wal")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as other:
        version = other.execute("PRAGMA data_version").fetchone()[0]
        rows = other.execute("SELECT count(*) FROM entries").fetchone()[0]
    return path.read_bytes(), wal.read_bytes() if wal.exists() else b"", version, rows


def test_refuses_over_budget_and_leaves_file_untouched(tmp_path):
    path = tmp_path / "l.json"
    led = open_ledger(path, budget=1.0)
    led.charge([Mechanism(3.0, 0.1, 10)], run="r", purpose="train")
    before = _on_disk(path)
    with pytest.raises(BudgetExceeded):
        led.charge([Mechanism(0.5, 1.0, 10)], run="r", purpose="train")
    assert _on_disk(path) == before
    assert len(led.entries) == len(open_ledger(path, budget=1.0).entries) == 1


def test_concurrent_handles_cannot_double_spend(tmp_path):
    path = tmp_path / "l.json"
    a, b = open_ledger(path, budget=1.0), open_ledger(path, budget=1.0)
    mech = Mechanism(8.0, 1.0, 1)
    single = compute_epsilon([mech.as_tuple()], 1e-5)
    n_fit = sum(compute_epsilon([mech.as_tuple()] * k, 1e-5) <= 1.0 for k in range(1, 50))
    charged = 0
    for handle in [a, b] * 40:
        try:
            handle.charge([mech], run="r", purpose="x")
            charged += 1
        except BudgetExceeded:
            pass
    assert single < 1.0 and charged == n_fit
    assert Ledger.read(path).epsilon() <= 1.0


def test_corrupt_ledger_is_an_error_never_a_reset(tmp_path):
    path = tmp_path / "l.json"
    path.write_text('{"format": "fedalloc-ledger/1", "entries": [tru')
    with pytest.raises(LedgerError, match="corrupt"):
        open_ledger(path)
    assert path.read_text().endswith("[tru")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.json", "l.json.lock"]  # no backup, no database


def test_ledger_of_another_node_is_refused(tmp_path):
    path = tmp_path / "l.json"
    open_ledger(path, node="hospital_a").charge([Mechanism(2.0, 0.1, 5)], run="r", purpose="x")
    with pytest.raises(LedgerError, match="belongs to node"):
        open_ledger(path, node="hospital_b")


def test_budget_cannot_grow_but_can_shrink(tmp_path):
    path = tmp_path / "l.json"
    open_ledger(path, budget=2.0)
    with pytest.raises(LedgerError, match="cannot grow"):
        open_ledger(path, budget=5.0)
    assert open_ledger(path, budget=1.0).budget == 1.0


def test_malformed_entry_is_detected(tmp_path):
    path = tmp_path / "l.json"
    open_ledger(path).charge([Mechanism(2.0, 0.1, 5)], run="r", purpose="x")
    with sqlite3.connect(path) as other:  # a row written by something other than Ledger.charge
        other.execute("INSERT INTO entries (run, run_id, round, purpose, kind, relation, noise_multiplier, "
                      "sample_rate, steps, sensitivity, epsilon_after, time) "
                      "VALUES ('r', '', 1, 'x', 'dpsgd', 'replace_one', 2.0, 0.1, -5, 1.0, 0.1, '')")
    with pytest.raises(LedgerError, match="entry 1 is malformed"):
        open_ledger(path)


def test_entries_cannot_be_edited_in_place(tmp_path):
    path = tmp_path / "l.json"
    led = open_ledger(path)
    led.charge([Mechanism(2.0, 0.1, 5)], run="r", purpose="x")
    led.set_plan("r", {"rounds": 1})
    with sqlite3.connect(path) as other:
        for sql in ("UPDATE entries SET steps = 1", "DELETE FROM entries",
                    "UPDATE meta SET value = 9 WHERE key = 'budget'", "DELETE FROM plans"):
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                other.execute(sql)


def test_failed_write_keeps_previous_ledger(tmp_path):
    path = tmp_path / "l.json"
    led = open_ledger(path)
    led.charge([Mechanism(2.0, 0.1, 5)], run="r", purpose="x")
    before = _on_disk(path)
    conn = led._db.conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the disk is full
    with pytest.raises(LedgerError, match="full"):
        led.charge([Mechanism(2.0, 0.1, 5)], run="r", purpose="x" * 20_000)
    assert not conn.in_transaction and len(led.entries) == 1
    assert _on_disk(path) == before
    conn.execute("PRAGMA max_page_count = 1073741823")
    led.charge([Mechanism(2.0, 0.1, 5)], run="r", purpose="x")
    assert [e["purpose"] for e in open_ledger(path).entries] == ["x", "x"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith((".new", ".tmp"))] == []


def test_crash_between_charge_and_send_never_under_records(node_configs, run_settings, monkeypatch):
    """The node dies after charging but before its update leaves: the charge is on disk."""
    import client.tasks as tasks
    from forecasting.model import build_model
    from client.node import NodeSettings

    def crash(*a, **k):
        raise SystemExit("power cut during training")

    monkeypatch.setattr(tasks, "train_dp", crash)
    node = NodeSettings.from_config(node_configs[0])
    run = run_settings()
    state = build_model(run.lags, run.horizon, 12).state_dict()
    with pytest.raises(SystemExit):
        tasks.train_task(state, run, node, "run-1", 1)
    led = Ledger.read(node.ledger_path)
    assert len(led.entries) == 1 and led.epsilon() > 0
    # The restarted node continues the same run with the same σ and keeps composing.
    monkeypatch.undo()
    _, metrics = tasks.train_task(state, run, node, "run-1", 2)
    assert metrics["noise-multiplier"] == pytest.approx(led.entries[0]["noise_multiplier"])
    assert metrics["epsilon"] == pytest.approx(Ledger.read(node.ledger_path).epsilon())
    assert np.isclose(metrics["epsilon"], compute_epsilon(Ledger.read(node.ledger_path).history(), 1e-5))
