"""Import contracts (pyproject.toml [tool.importlinter]): core is plain analytics, the forecaster
is shared, the coordinator imports no node code and the node no simulation code."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("core", "forecasting", "client", "server", "simulations", "fedalloc")


def _lint(cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("lint-imports")
    # The checked tree must be the one in cwd, not the installed package.
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([str(exe), "--no-cache"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_contracts_hold() -> None:
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


def _copy_tree(dst: Path) -> None:
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, dst / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def test_contracts_catch_a_coordinator_importing_node_code(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    with open(tmp_path / "server" / "audit.py", "a") as f:
        f.write("\nfrom client.node import NodeSettings  # a violation\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "server is not allowed to import client" in res.stdout
    assert "server.audit -> client.node" in res.stdout


def test_contracts_catch_torch_in_core(tmp_path: Path) -> None:
    _copy_tree(tmp_path)
    with open(tmp_path / "core" / "series.py", "a") as f:
        f.write("\n\ndef _lazy():\n    import torch  # a violation, even inside a function\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert "core is not allowed to import torch" in res.stdout
