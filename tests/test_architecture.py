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


def _long_functions(root: Path, limit: int = 60) -> list[str]:
    import ast

    found = []
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_over_sixty_lines_outside_tests(tmp_path: Path) -> None:
    assert _long_functions(ROOT) == []
    # the check can fail: a copy with one long function is caught
    _copy_tree(tmp_path)
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    (tmp_path / "core" / "long_one.py").write_text(f"def long_one() -> None:\n{body}")
    assert _long_functions(tmp_path) == ["core/long_one.py:1 long_one (62 lines)"]


def test_round_records_need_no_type_ignore() -> None:
    for module in ("server/runner.py", "server/secagg.py"):
        lines = [ln for ln in (ROOT / module).read_text().splitlines() if "type: ignore" in ln and "round" in ln]
        assert lines == [], (module, lines)
