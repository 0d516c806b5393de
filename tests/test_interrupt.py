"""Ctrl-C during `fedalloc simulate`, then `--resume`: the run stops at once and finishes later.

SIGINT goes to the command's process group (what Ctrl-C in a terminal does) once round 1 is
checkpointed and, if it comes soon, once a node has paid for round 2: the interrupt then lands in
the middle of round 2. The command must be gone within 5 s with one "fedalloc: interrupted" line,
leaving a checkpoint and state.json that agree. `--resume` finishes the run, and every node has paid
exactly once per round: a round charged before the interrupt is re-sent from the node's stored
update, not trained and charged again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from client.ledger import Ledger, LedgerError

REPO = Path(__file__).resolve().parents[1]
ROUNDS = 4
HOSPITALS = [f"hospital_{i:03d}" for i in range(3)]


def _command(engine: str, out: Path, resume: bool = False, workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "fedalloc", "simulate", "--engine", engine, "--hospitals", "3",
            "--rounds", str(ROUNDS), "--name", "R", "--out", str(out), *(["--resume"] if resume else []),
            *(["--workers", str(workers)] if workers != 1 else [])]


def _foreground_sigint() -> None:
    """The command as started from a terminal: SIGINT at its default. A suite run in the background
    of a non-interactive shell (`bash .ci/run &`) inherits SIGINT ignored, and Python then keeps
    ignoring it: the command would finish its run instead of stopping (seen on such a run)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "RAY_ADDRESS")}


def _rounds_done(run: Path) -> int:
    try:
        return int(json.loads((run / "state.json").read_text())["rounds_done"])
    except (OSError, ValueError, KeyError):
        return 0


def _ledgers(run: Path) -> list[Path]:
    return sorted((run / "nodes" / "ledgers").glob("*.json"))


def _charged(run: Path, round_: int) -> bool:
    for f in _ledgers(run):
        try:
            if any(e["kind"] == "dpsgd" and e["round"] == round_ for e in Ledger.read(f).entries):
                return True
        except LedgerError:
            continue
    return False


def _interrupt_mid_run(proc: subprocess.Popen, run: Path, timeout: float) -> tuple[float, str, str]:
    """SIGINT once round 1 is done (and, within 10 s more, a node has charged round 2); return
    (seconds to exit, stdout, stderr)."""
    deadline = time.monotonic() + timeout
    while _rounds_done(run) < 1:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"the run ended (exit {proc.returncode}) before round 1 was checkpointed:\n{out}\n{err}")
        if time.monotonic() > deadline:
            pytest.fail("round 1 was not checkpointed in time")
        time.sleep(0.02)
    until = time.monotonic() + 10
    while not _charged(run, 2) and time.monotonic() < until and proc.poll() is None:
        time.sleep(0.02)
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail("the command still ran 5 s after SIGINT")
    return time.monotonic() - t0, out, err


def _check_interrupted_state(run: Path) -> int:
    """state.json and checkpoint.npz describe the same finished rounds; nothing was paid twice."""
    state = json.loads((run / "state.json").read_text())
    done = state["rounds_done"]
    assert 1 <= done < ROUNDS, f"the interrupt came too late to test anything: rounds_done={done}"
    assert [r["round"] for r in state["rounds"]] == list(range(1, done + 1))
    assert all(r["ok"] == 3 for r in state["rounds"])
    with np.load(run / "checkpoint.npz") as data:
        assert data.files and all(np.isfinite(data[k]).all() for k in data.files)
    assert not (run / "allocations.csv").exists()
    for f in _ledgers(run):
        rounds = [e["round"] for e in Ledger.read(f).entries if e["kind"] == "dpsgd"]
        kinds = {e["kind"] for e in Ledger.read(f).entries}
        assert kinds <= {"dpsgd"}, f"{f.name}: {kinds}"
        # rounds up to the checkpoint, perhaps the one under way, each charged once
        assert rounds in (list(range(1, done + 1)), list(range(1, done + 2))), f"{f.name}: {rounds}"
    return done


def _check_resumed(run: Path) -> None:
    assert list(pd.read_csv(run / "rounds.csv")["round"]) == list(range(1, ROUNDS + 1))
    assert sorted(pd.read_csv(run / "allocations.csv").hospital) == HOSPITALS
    ledgers = _ledgers(run)
    assert [f.stem for f in ledgers] == HOSPITALS
    for f in ledgers:
        led = Ledger.read(f)
        dpsgd = [e for e in led.entries if e["kind"] == "dpsgd"]
        assert [e["round"] for e in dpsgd] == list(range(1, ROUNDS + 1)), f"{f.name}: {led.entries}"
        assert [e["kind"] for e in led.entries].count("gaussian-release") == 1
        assert len(led.entries) == ROUNDS + 1
        assert len({e["noise_multiplier"] for e in dpsgd}) == 1  # the run's one σ plan
        assert led.epsilon() <= 3.0 + 1e-9, f"{f.name}: ε {led.epsilon()}"


def _group_gone(pgid: int, within: float = 3.0) -> bool:
    """No process of the command's process group (its workers included) is left."""
    until = time.monotonic() + within
    while time.monotonic() < until:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _interrupt_then_resume(engine: str, out: Path, start_timeout: float, run_timeout: float, workers: int = 1) -> None:
    run = out / "R"
    proc = subprocess.Popen(_command(engine, out, workers=workers), cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_foreground_sigint)
    try:
        elapsed, stdout, stderr = _interrupt_mid_run(proc, run, start_timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0, stdout + stderr
    lines = [line for line in stderr.splitlines() if line.startswith("fedalloc: interrupted")]
    assert len(lines) == 1, f"stderr after SIGINT ({elapsed:.1f} s):\n{stderr}"
    assert "Traceback" not in stderr + stdout, stderr
    if workers > 1:  # the node workers (and Python's forkserver) left with the command
        assert _group_gone(proc.pid), "a process of the interrupted command is still running"
    done = _check_interrupted_state(run)

    res = subprocess.run(_command(engine, out, resume=True, workers=workers), cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=run_timeout, start_new_session=True)
    assert res.returncode == 0, f"resume after round {done} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    _check_resumed(run)


def test_ctrl_c_on_the_inprocess_engine_then_resume(tmp_path):
    _interrupt_then_resume("inprocess", tmp_path, start_timeout=180, run_timeout=300)


def test_ctrl_c_on_the_inprocess_engine_with_two_workers_then_resume(tmp_path):
    _interrupt_then_resume("inprocess", tmp_path, start_timeout=180, run_timeout=300, workers=2)


def test_ctrl_c_on_the_ray_engine_then_resume(tmp_path):
    _interrupt_then_resume("ray", tmp_path, start_timeout=240, run_timeout=400)


def test_interrupt_between_checkpoint_and_state_still_resumes(tmp_path, monkeypatch):
    """Round 2's model file is saved, the interrupt lands before state.json names it: resume
    continues from round 1's committed pair and the nodes re-send round 2 (server/results.py)."""
    import server.results as server_results
    from simulations.driver import simulate

    real = server_results.write_json

    def interrupted_write(path: Path, obj: object) -> None:
        if path.name == "state.json" and obj["rounds_done"] == 2:  # type: ignore[index]
            raise KeyboardInterrupt  # Ctrl-C right after round 2's checkpoint was saved
        real(path, obj)

    common = dict(hospitals=3, rounds=2, engine="inprocess", results_dir=str(tmp_path), run_name="W",
                  overrides={"local-epochs": 1})
    monkeypatch.setattr(server_results, "write_json", interrupted_write)
    with pytest.raises(KeyboardInterrupt):
        simulate(**common)
    monkeypatch.setattr(server_results, "write_json", real)
    out = simulate(**common, resume=True)
    assert out.error is None, out.error
