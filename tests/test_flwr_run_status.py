"""How an operator learns whether a `flwr run` succeeded (README "`flwr run .`", deploy/README.md).

`flwr run --stream` (flwr 1.42) exits 0 as soon as the run was started, even when the ServerApp
then fails. deploy/run_checked.sh asks the SuperLink for the run's status once the log stream
has ended. Here: README's config.toml command on scratch HOMEs; the script's exit code for every
status (a stub `flwr` that answers like flwr 1.42); and the script against a real local SuperLink
(Flower's `:local:` connection, on free ports) for a run that must fail (too few nodes): exit 1,
`finished:failed`. That one takes 20-60 s; the SuperLink it starts is killed by PID with its
children. (A completed run giving `finished:completed` was checked by hand, see README.)
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

PROJECT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT / "deploy" / "run_checked.sh"
BIN = Path(sys.executable).parent

# Exactly the command README's "`flwr run .`" section gives (checked below).
CONFIG_CMD = (
    "mkdir -p ~/.flwr && { grep -qs '^\\[superlink\\.local\\]' ~/.flwr/config.toml "
    "|| printf '\\n[superlink.local]\\naddress = \":local:\"\\n' >> ~/.flwr/config.toml; }"
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _children(table: dict[int, int], root: int) -> list[int]:
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        kids = [p for p, parent in table.items() if parent == pid]
        out += kids
        todo += kids
    return out


def _kill_local_superlinks(home: Path) -> None:
    """Kill the `flower-superlink` whose files are under `home` (ours only) and its descendants."""
    table, ours = {}, []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stat = Path(f"/proc/{entry}/stat").read_text(errors="replace")
        except OSError:
            continue
        table[int(entry)] = int(stat[stat.rfind(")") + 2:].split()[1])
        if "flower-superlink" in cmd and str(home) in cmd:
            ours.append(int(entry))
    for pid in ours:
        for p in [*_children(table, pid), pid]:
            try:
                os.kill(p, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    while ours and time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in ours):
        time.sleep(0.2)
    for pid in ours:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _status_line(out: str) -> str:
    return out.strip().splitlines()[-1]


def test_readme_config_command_is_the_tested_one() -> None:
    assert CONFIG_CMD in (PROJECT / "README.md").read_text()


def test_readme_config_command_keeps_an_existing_config(tmp_path: Path) -> None:
    import tomllib

    cases = {
        "none": None,
        # Flower's own default file already has the connection: nothing is added.
        "flower-default": '[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n',
        # A user's config for another SuperLink, without a final newline.
        "other": '[superlink]\ndefault = "prod"\n\n[superlink.prod]\naddress = "10.0.0.1:9093"',
    }
    for name, text in cases.items():
        home = tmp_path / name
        (home / ".flwr").mkdir(parents=True)
        if text is not None:
            (home / ".flwr" / "config.toml").write_text(text)
        for _ in range(2):  # idempotent
            subprocess.run(["bash", "-c", CONFIG_CMD], env={**os.environ, "HOME": str(home)}, check=True)
        written = (home / ".flwr" / "config.toml").read_text()
        superlink = tomllib.loads(written)["superlink"]  # valid TOML: no duplicate table
        assert superlink["local"] == {"address": ":local:"}, name
        assert written.count("[superlink.local]") == 1
        if text is not None:
            assert written.startswith(text)  # nothing of the user's file is lost
        if name == "other":
            assert superlink["default"] == "prod" and superlink["prod"]["address"] == "10.0.0.1:9093"


STUB_FLWR = """#!/usr/bin/env bash
# Stands in for `flwr`: answers as flwr 1.42 does, with the status from $STUB_STATUS.
case "$1" in
  run) [ "$STUB_STATUS" = not-started ] && { echo '{"success": false, "error-message": "no such connection"}'; exit 0; }
       echo '{"success": true, "run-id": "42", "federation-id": "@none/default"}' ;;
  log) echo "log of run $2" ;;
  ls)  printf '{"success": true, "runs": [{"run-id": "42", "status": "%s", "status-details": "%s"}]}\\n' \\
         "$STUB_STATUS" "$STUB_DETAILS" ;;
esac
"""


@pytest.mark.parametrize(
    ("status", "details", "code", "last"),
    [
        ("finished:completed", "N/A", 0, "run 42: finished:completed"),
        ("finished:failed", "Simulation failed with exception: boom", 1,
         "run 42: finished:failed (Simulation failed with exception: boom)"),
        ("finished:stopped", "N/A", 1, "run 42: finished:stopped"),
        ("not-started", "", 2, None),
    ],
)
def test_run_checked_exit_code_follows_the_status(tmp_path: Path, status: str, details: str, code: int,
                                                  last: str | None) -> None:
    stub = tmp_path / "bin" / "flwr"
    stub.parent.mkdir()
    stub.write_text(STUB_FLWR)
    stub.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub.parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "STUB_STATUS": status, "STUB_DETAILS": details}
    res = subprocess.run(["bash", str(SCRIPT), ".", "local", "--run-config", "num-server-rounds=1"],
                         env=env, capture_output=True, text=True, timeout=30)
    assert res.returncode == code, res.stdout + res.stderr
    if last is None:
        assert "run not started" in res.stderr and "no such connection" in res.stderr
    else:
        assert "log of run 42" in res.stdout
        assert _status_line(res.stdout) == last


def test_run_checked_reports_a_real_failed_run(tmp_path: Path) -> None:
    """Against a real local SuperLink: Flower says the run started, the script says it failed."""
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # Our own local SuperLink, never one another process on this machine started.
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(_free_port()),
    }
    env.pop("FLWR_HOME", None)
    subprocess.run(["bash", "-c", CONFIG_CMD], env=env, check=True)
    results = tmp_path / "results"
    try:
        # One virtual node but two required: the coordinator gives up after round-timeout.
        failed = subprocess.run(
            ["bash", str(SCRIPT), ".", "local", "--federation-config", "num-supernodes=1",
             "--run-config", f"num-server-rounds=1 min-nodes=2 round-timeout=2.0 results-dir='{results}' run-name='fails'"],
            cwd=PROJECT, env=env, capture_output=True, text=True, timeout=240,
        )
        assert failed.returncode == 1, failed.stdout[-3000:] + failed.stderr[-3000:]
        assert failed.stdout.startswith("started run ")  # `flwr run` accepted it
        assert re.fullmatch(r"run \d+: finished:failed \(.*only 1 of the required 2 nodes connected.*\)",
                            _status_line(failed.stdout)), failed.stdout[-3000:]
        assert json.loads((results / "fails" / "metrics.json").read_text())["status"] == "failed"
    finally:
        _kill_local_superlinks(home)
