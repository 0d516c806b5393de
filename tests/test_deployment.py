"""End-to-end deployment on loopback: a real SuperLink (TLS + SuperNode authentication), three
hospital SuperNodes with their own files, `flwr run` of this project, and an intruder node.

Everything the commands in deploy/README.md do, in the same form. Slow (about two minutes on a
2-core machine: every message starts a fresh `flwr-clientapp` process that imports torch and
opacus). Every process is started in its own session, logs to tmp_path, and is killed by process
group together with the `flower-superexec` / `flwr-*app` children it spawned.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest

PROJECT = Path(__file__).resolve().parents[1]
MAKE_CERTS = PROJECT / "deploy" / "make_certs.sh"
BIN = Path(sys.executable).parent
HOSPITALS = [f"hospital_{i:03d}" for i in range(3)]
BUDGET = 3.0
TOTAL = 1000.0
CONNECTION = "fedalloc"  # the SuperLink connection name in $FLWR_HOME/config.toml


def _exe(name: str) -> str:
    local = BIN / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: install the project (pip install -e .) first")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- process bookkeeping ------------------------------------------------------------------------
# A process is identified by (pid, start time) so that a recycled pid is never signalled.
Proc = tuple[int, int]


def _proc_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (ppid, pgid, start time) for every live (non-zombie) process, read from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read().decode(errors="replace")
        except OSError:
            continue
        # comm may contain spaces/parentheses: the fields after the last ')' are fixed.
        fields = stat[stat.rfind(")") + 2 :].split()
        if fields[0] == "Z":  # zombie: nothing left to kill
            continue
        table[int(entry)] = (int(fields[1]), int(fields[2]), int(fields[19]))
    return table


def _tree(roots: set[int], table: dict[int, tuple[int, int, int]]) -> set[Proc]:
    """Live `roots`, every process in their process groups, and all their descendants.

    flower-superexec calls setsid(), so it leaves its parent's process group: follow ppid too.
    """
    found = {p for p in roots if p in table} | {p for p, (_, g, _) in table.items() if g in roots}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _, _) in table.items():
            if ppid in found and pid not in found:
                found.add(pid)
                changed = True
    return {(p, table[p][2]) for p in found}


class Cluster:
    """Processes of one deployment test; `stop()` kills all of them and their children."""

    def __init__(self, root: Path, env: dict[str, str]) -> None:
        self.root = root
        self.env = env
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self._seen: set[Proc] = set()  # our processes and every descendant observed so far

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "wb")
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.env, cwd=self.root, start_new_session=True,
        )
        log.close()
        self.procs[name] = proc
        self._observe()
        return proc

    def run(self, name: str, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        """A short command (e.g. make_certs.sh), logged like the long-lived processes."""
        proc = self.start(name, argv)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"`{' '.join(argv)}` did not finish within {timeout:.0f} s\n{self.tails()}")
        return subprocess.CompletedProcess(argv, proc.returncode, self.log(name), "")

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def tails(self, lines: int = 30) -> str:
        out = []
        for path in sorted(self.logs.glob("*.log")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"----- {path.name} (last {len(tail)} lines) -----\n" + "\n".join(tail))
        return "\n".join(out)

    def wait_for(self, what: str, predicate: Callable[[], bool], timeout: float,
                 must_live: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for name in must_live:
                if self.procs[name].poll() is not None:
                    pytest.fail(f"{name} exited with {self.procs[name].returncode} while waiting "
                                f"for {what}\n{self.tails()}")
            self._observe()
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{self.tails()}")

    def _observe(self) -> set[Proc]:
        table = _proc_table()
        live = {(pid, t) for pid, t in self._seen if pid in table and table[pid][2] == t}
        roots = {p.pid for p in self.procs.values() if p.returncode is None} | {pid for pid, _ in live}
        tree = _tree(roots, table)
        self._seen |= tree
        return live | tree

    def stop(self) -> None:
        """SIGTERM every live process we started or saw descend from one, then SIGKILL."""
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            alive = self._observe()
            for pid, _ in alive:
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass
            deadline = time.monotonic() + grace
            while alive and time.monotonic() < deadline:
                time.sleep(0.2)
                for p in self.procs.values():
                    p.poll()  # reap our direct children
                alive = self._observe()
            if not alive:
                break
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def cluster(tmp_path: Path):
    flwr_home = tmp_path / "flwr_home"
    flwr_home.mkdir()
    env = dict(os.environ)
    env.update(
        FLWR_HOME=str(flwr_home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PYTHONUNBUFFERED="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    c = Cluster(tmp_path, env)
    try:
        yield c
    finally:
        c.stop()


# -- the test -----------------------------------------------------------------------------------
def test_tls_node_auth_deployment(cluster: Cluster, tmp_path: Path) -> None:
    for tool in ("openssl", "ssh-keygen", "bash"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: the deployment test needs it to make certificates and keys")
    superlink_bin, supernode_bin, flwr_bin = (
        _exe("flower-superlink"), _exe("flower-supernode"), _exe("flwr"))
    t0 = time.monotonic()

    # 1. Three synthetic hospitals (each node's private records) and the public resources table.
    from core.synthetic import SyntheticConfig, generate

    data = tmp_path / "data"
    generate(SyntheticConfig(hospitals=3, years=3), data)
    ledgers = tmp_path / "ledgers"

    # 2. CA, SuperLink certificate, 4 node key pairs (node3 is never registered).
    certs = tmp_path / "certs"
    made = cluster.run("make_certs", ["bash", str(MAKE_CERTS), str(certs), "4"], timeout=60)
    assert made.returncode == 0, f"make_certs.sh failed\n{cluster.tails()}"

    # 3. SuperLink: TLS, SuperNode authentication, no runtime `uv sync`.
    port = _free_port()
    address = f"127.0.0.1:{port}"
    cluster.start("superlink", [
        superlink_bin, "--host", "127.0.0.1", "--port", str(port),
        "--ssl-ca-certfile", str(certs / "ca.crt"),
        "--ssl-certfile", str(certs / "server.pem"),
        "--ssl-keyfile", str(certs / "server.key"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ])
    cluster.wait_for("the SuperLink to listen with TLS",
                     lambda: f"running on https://{address}" in cluster.log("superlink"),
                     timeout=60, must_live=("superlink",))

    # 4. The CLI connection (what an operator puts in ~/.flwr/config.toml).
    (tmp_path / "flwr_home" / "config.toml").write_text(
        "[superlink]\n"
        f'default = "{CONNECTION}"\n\n'
        f"[superlink.{CONNECTION}]\n"
        f'address = "{address}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )

    # 5. The coordinator registers the three hospitals' public keys (three CLI calls in parallel).
    regs = [cluster.start(f"register{k}", [flwr_bin, "supernode", "register",
                                           str(certs / f"node{k}.pub"), CONNECTION])
            for k in range(3)]
    cluster.wait_for("`flwr supernode register` x3", lambda: all(r.poll() is not None for r in regs),
                     timeout=60, must_live=("superlink",))
    for k, reg in enumerate(regs):
        assert reg.returncode == 0 and "registered successfully" in cluster.log(f"register{k}"), (
            f"registering node{k}.pub failed\n{cluster.tails()}")

    # 6. Three hospital SuperNodes, each with its own files, key and the CA certificate.
    for k, hospital in enumerate(HOSPITALS):
        node_config = (f"data-path='{data / (hospital + '.csv')}' "
                       f"ledger-path='{ledgers / (hospital + '.json')}' "
                       f"hospital='{hospital}' budget={BUDGET}")
        cluster.start(f"supernode{k}", [
            supernode_bin, "--superlink", address, "--port", str(_free_port()),
            "--root-certificates", str(certs / "ca.crt"),
            "--auth-supernode-private-key", str(certs / f"node{k}"),
            "--node-config", node_config,
        ])
    nodes = tuple(f"supernode{k}" for k in range(3))
    cluster.wait_for(
        "3 SuperNodes to be activated",
        lambda: all("SuperNode ID:" in cluster.log(n) for n in nodes),
        timeout=90, must_live=("superlink", *nodes))

    # 7. The run: this project, against the TLS connection, with absolute paths for the coordinator.
    results = tmp_path / "results"
    run_config = (f"num-server-rounds=2 local-epochs=1 results-dir='{results}' run-name='deploy' "
                  f"resources-file='{data / 'hospitals.csv'}' min-nodes=3 total={TOTAL}")
    run = cluster.start("flwr_run", [flwr_bin, "run", str(PROJECT), CONNECTION, "--stream",
                                     "--run-config", run_config])
    out = results / "deploy"
    cluster.wait_for("`flwr run` to finish", lambda: run.poll() is not None,
                     timeout=420, must_live=("superlink", *nodes))
    cluster.wait_for("allocations.csv", (out / "allocations.csv").exists, timeout=30)
    run_seconds = time.monotonic() - t0
    assert run.returncode == 0, f"flwr run exited with {run.returncode}\n{cluster.tails()}"

    # 8. The coordinator's results: one row per hospital, allocations summing to the total.
    alloc = pd.read_csv(out / "allocations.csv")
    assert sorted(alloc["hospital"].astype(str)) == HOSPITALS, f"{alloc}\n{cluster.tails()}"
    assert math.isclose(alloc["allocation"].sum(), TOTAL, rel_tol=1e-9), alloc
    assert (alloc["allocation"] >= 0).all(), alloc
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok", metrics.get("error")
    assert metrics["nodes"] == 3
    assert metrics["audit_violations"] == [], metrics["audit_violations"]
    assert len(metrics["rounds"]) == 2, metrics["rounds"]

    # 9. Each hospital's ledger: on the node's disk, charged, and within the node's own budget.
    from client.ledger import Ledger

    for hospital in HOSPITALS:
        path = ledgers / f"{hospital}.json"
        assert path.exists(), f"{path} missing\n{cluster.tails()}"
        ledger = Ledger.read(path)
        assert ledger.node == hospital
        purposes = [e["purpose"] for e in ledger.entries]
        assert len(purposes) >= 3, purposes  # 2 training rounds + the D_i release
        eps = ledger.epsilon()
        assert 0 < eps <= BUDGET, f"{hospital}: ε {eps} vs budget {BUDGET}"
        assert metrics["epsilon_per_node"][hospital] <= BUDGET + 1e-9

    # 10. A node whose key was never registered is refused (HTTP 412, exit code 305).
    intruder = cluster.start("intruder", [
        supernode_bin, "--superlink", address, "--port", str(_free_port()),
        "--root-certificates", str(certs / "ca.crt"),
        "--auth-supernode-private-key", str(certs / "node3"),
        "--node-config", f"data-path='{data / 'hospital_000.csv'}' "
                         f"ledger-path='{tmp_path / 'intruder.json'}' hospital='intruder'",
    ])
    cluster.wait_for("the unregistered SuperNode to be refused",
                     lambda: intruder.poll() is not None, timeout=60, must_live=("superlink",))
    assert intruder.returncode != 0, cluster.tails()
    assert "Exit Code: 305" in cluster.log("intruder"), cluster.tails()
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 412' in cluster.log("superlink"), cluster.tails()
    assert not (tmp_path / "intruder.json").exists()

    print(f"deployment test: run finished after {run_seconds:.0f} s, "
          f"total {time.monotonic() - t0:.0f} s")
