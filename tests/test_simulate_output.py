"""`fedalloc simulate` prints its progress, the allocation table and where the results are: no
deprecation notices, warnings or tracebacks (on either engine)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
NOISE = {
    "a deprecation notice": re.compile(r"DEPRECATED"),
    # Python warnings print their category: FutureWarning, UserWarning, DeprecationWarning, …
    "a Python warning": re.compile(r"\b[A-Za-z]*Warning\b"),
    # Flower's and Ray's log lines at warning level ("WARNING :   …", "… WARNING worker.py:…").
    "a WARNING log line": re.compile(r"\bWARNING\b"),
    "a traceback": re.compile(r"Traceback"),
}


@pytest.mark.parametrize("engine", ["inprocess", "ray"])
def test_simulate_prints_no_noise(tmp_path, engine):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters
    res = subprocess.run(
        [sys.executable, "-m", "fedalloc", "simulate", "--hospitals", "3", "--rounds", "1", "--out", str(tmp_path),
         "--engine", engine],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    output = ANSI.sub("", res.stdout + res.stderr)
    assert res.returncode == 0, output
    assert "results in" in output, output
    found = {what: m.group(0) for what, rx in NOISE.items() if (m := rx.search(output))}
    assert not found, f"{found} in the output of `fedalloc simulate --engine {engine}`:\n{output}"
    # The command closed its ledgers on the way out: each is one self-contained file, no WAL left.
    ledgers = sorted(tmp_path.glob("*/nodes/ledgers/*.json"))
    assert len(ledgers) == 3, ledgers
    assert not list(tmp_path.glob("**/*-wal")), list(tmp_path.glob("**/*-wal"))


def test_only_the_known_flower_notices_are_filtered():
    import logging

    from simulations.ray_local import quiet_known_noise

    quiet_known_noise()
    quiet_known_noise()  # idempotent
    flwr = logging.getLogger("flwr")
    assert sum(type(f).__name__ == "_KnownNoise" for f in flwr.filters) == 1
    seen: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    flwr.addHandler(handler)
    try:
        flwr.warning("DEPRECATED FEATURE: %s", "The `run_simulation` function is deprecated and will be removed")
        flwr.warning("DEPRECATED FEATURE: %s", "something else")
        flwr.warning("fraction_train is set to 0.0. Federated training will be skipped.")
    finally:
        flwr.removeHandler(handler)
    assert seen == ["DEPRECATED FEATURE: something else",
                    "fraction_train is set to 0.0. Federated training will be skipped."]
