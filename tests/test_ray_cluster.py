"""`simulate(..., ray_address=...)`: a run on an existing Ray cluster, which it leaves running.

The fixture starts a one-node loopback cluster the way README "Ray cluster" describes
(`ray start --head --node-ip-address=127.0.0.1` with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0), as a
child of this test process: so the cluster's workers descend from the simulation's driver, which
is exactly where a local-run sweep would (wrongly) find and kill them.

The cluster is stopped by PID, not with `ray stop --force`: that kills every Ray process of the
machine, including other people's simulations and test runs. A small reaper process remembers
the cluster's processes (its agents lose the environment marker to setproctitle) and kills them
when the fixture ends, or when this test process dies without tearing down.
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

from simulations.driver import simulate

RAY = Path(sys.executable).with_name("ray")
MARK_ENV = "FEDALLOC_TEST_CLUSTER"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

# Kills the cluster once its stdin closes: at teardown, and also when the test process dies
# without running it (kill -9, or os._exit from the Ray run's own Ctrl-C handler).
REAPER = r"""
import select, shutil, signal, sys, time
import psutil
signal.signal(signal.SIGINT, signal.SIG_IGN)
root, env, mark, temp = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
known = {}
def scan():
    try:
        top = psutil.Process(root)
        found = [top, *top.children(recursive=True)]
    except psutil.Error:
        found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get(env) == mark:
                found.append(p)
        except psutil.Error:
            pass
    for p in found:
        known.setdefault(p.pid, p)
while True:
    ready, _, _ = select.select([sys.stdin], [], [], 0.5)
    if ready and not sys.stdin.buffer.read1(64):
        break
    scan()
deadline = time.monotonic() + 15
while time.monotonic() < deadline:
    scan()
    alive = []
    for p in known.values():
        try:  # is_running() is False for a reused PID; a zombie is dead already
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    if not alive:
        break
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    time.sleep(0.2)
shutil.rmtree(temp, ignore_errors=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join([p.name(), *p.cmdline()])[:120]}"
    except psutil.Error:
        return str(p.pid)


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    return (getattr(addr, "ipv4_mapped", None) or addr).is_loopback


def _listening(procs: list[psutil.Process]) -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every listening TCP / unconnected UDP socket of `procs`."""
    out = []
    for p in procs:
        try:
            conns, name = p.net_connections(kind="inet"), p.name()
        except psutil.Error:
            continue
        for c in conns:
            if c.laddr and (c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr)):
                out.append((p.pid, name, c.laddr.ip, c.laddr.port))
    return out


@dataclass
class Cluster:
    address: str
    root: subprocess.Popen
    mark: str
    seen: dict[int, psutil.Process] = field(default_factory=dict)  # every cluster process ever observed

    def processes(self) -> list[psutil.Process]:
        """The cluster's live processes: `ray start` and its descendants, plus any process with the
        cluster's environment marker (reparented ones). Remembered in `seen`, because Ray's agents
        overwrite their environment with setproctitle and would later be found by neither rule."""
        found: dict[int, psutil.Process] = {}
        try:
            root = psutil.Process(self.root.pid)
            found.update({p.pid: p for p in [root, *root.children(recursive=True)]})
        except psutil.Error:
            pass
        for p in psutil.process_iter():
            try:
                if p.pid not in found and p.environ().get(MARK_ENV) == self.mark:
                    found[p.pid] = p
            except psutil.Error:
                continue
        live = [p for p in found.values() if _alive(p)]
        self.seen.update({p.pid: p for p in live})
        return live


def _stop_cluster(cluster: Cluster) -> list[str]:
    """SIGKILL every process of the cluster (by PID; psutil refuses a reused PID); return what is
    still alive after STOP_TIMEOUT s."""
    deadline = time.monotonic() + STOP_TIMEOUT
    while True:
        targets = {p.pid: p for p in [*cluster.seen.values(), *cluster.processes()] if _alive(p)}
        if not targets or time.monotonic() > deadline:
            break
        for p in targets.values():
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.2)
    try:
        cluster.root.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass
    return [_describe(p) for p in targets.values() if _alive(p)]


@pytest.fixture
def ray_cluster():
    temp = tempfile.mkdtemp(prefix="fa-ray-", dir="/tmp")  # short: Ray's unix sockets live under it
    port, client_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    mark = uuid.uuid4().hex
    env.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", MARK_ENV: mark})
    log_path = Path(temp) / "ray-start.log"
    with open(log_path, "wb") as log:
        root = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
             # the Ray Client server's default port 10001 is fixed: another cluster may hold it
             f"--ray-client-server-port={client_port}", "--include-dashboard=false", "--num-cpus=2",
             "--disable-usage-stats", f"--temp-dir={temp}"],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )
    cluster = Cluster(f"127.0.0.1:{port}", root, mark)
    reaper = subprocess.Popen([sys.executable, "-c", REAPER, str(root.pid), MARK_ENV, mark, temp], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while b"Ray runtime started" not in log_path.read_bytes():
            if root.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up:\n{log_path.read_text(errors='replace')[-2000:]}")
            cluster.processes()
            time.sleep(0.2)
        names = {p.name() for p in cluster.processes()}
        assert {"gcs_server", "raylet"} <= names, names
        yield cluster
    finally:
        reaper.stdin.close()
        try:
            reaper.wait(timeout=STOP_TIMEOUT + 10)
        except subprocess.TimeoutExpired:
            reaper.kill()
        left = _stop_cluster(cluster)  # what the reaper missed, if anything
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"cluster processes still alive {STOP_TIMEOUT:.0f} s after the kill: {left}"


def test_simulation_on_an_existing_cluster_leaves_the_cluster_alone(ray_cluster, tmp_path, monkeypatch):
    head = ray_cluster.processes()  # gcs_server, raylet, agents, monitors: started before the run
    me = psutil.Process()
    kills: list[tuple[int, int]] = []
    real_kill = os.kill

    def spy_kill(pid: int, sig: int) -> None:
        kills.append((pid, sig))
        real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", spy_kill)
    listening: set[tuple[str, str, int]] = set()
    watchdogs: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            cluster = ray_cluster.processes()
            listening.update((name, ip, port) for _, name, ip, port in _listening([*cluster, me]))
            for child in me.children(recursive=True):
                try:
                    if "--watchdog" in child.cmdline():
                        watchdogs.add(_describe(child))
                except psutil.Error:
                    pass
            stop.wait(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = simulate(hospitals=3, rounds=1, engine="ray", ray_address=ray_cluster.address,
                       results_dir=str(tmp_path), run_name="cl", overrides={"local-epochs": 1})
    finally:
        stop.set()
        sampler.join()
        monkeypatch.undo()

    assert out.error is None, out.error
    assert sorted(out.allocations.hospital) == [f"hospital_{i:03d}" for i in range(3)]
    assert (tmp_path / "cl" / "allocations.csv").exists()
    assert [r["round"] for r in out.rounds] == [1] and out.rounds[0]["ok"] == 3

    # Every server of the cluster, its workers and the driver's own listened on loopback only.
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"the sampler saw no Ray servers: {sorted(names)}"
    exposed = sorted((name, ip, port) for name, ip, port in listening if not _is_loopback(ip))
    assert not exposed, f"listened beyond loopback: {exposed}"

    # The run did not try to clean up the cluster: no watchdog, no signal to any of its processes.
    signalled = [(pid, sig) for pid, sig in kills if pid in ray_cluster.seen]
    dead = [_describe(p) for p in head if not _alive(p)]
    problems = ([f"the run signalled cluster processes: {signalled}"] if signalled else []) + \
        ([f"a connected run started a process sweeper: {sorted(watchdogs)}"] if watchdogs else []) + \
        ([f"the run ended head processes: {dead}"] if dead else [])
    assert not problems, "\n".join(problems)
    with socket.create_connection(("127.0.0.1", int(ray_cluster.address.rsplit(":", 1)[1])), timeout=5):
        pass  # the GCS still accepts connections
    # Ray itself ends the job's actors once the driver has disconnected.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        actors = [p for p in ray_cluster.processes() if "ClientAppActor" in _describe(p)]
        if not actors:
            break
        time.sleep(0.3)
    assert not actors, f"the job's actors outlived the run: {[_describe(p) for p in actors]}"


@pytest.mark.parametrize("address, engine, problem", [
    ("127.0.0.1:6379", "inprocess", "needs --engine ray"),
    ("ray://10.0.0.5:10001", "ray", "Ray Client"),
    ("10.0.0.5", "ray", "HOST:PORT"),
    ("10.0.0.5:0", "ray", "HOST:PORT"),
    (":6379", "ray", "HOST:PORT"),
    ("127.0.0.1:1", "ray", "no Ray head answers"),  # Ray itself would retry for ever
])
def test_bad_ray_address_is_refused_before_anything_runs(tmp_path, address, engine, problem):
    with pytest.raises(ValueError, match=problem):
        simulate(hospitals=3, rounds=1, engine=engine, ray_address=address, results_dir=str(tmp_path), run_name="x")
    assert not any(tmp_path.iterdir())


def test_cli_passes_the_ray_address_through(tmp_path):
    from typer.testing import CliRunner

    from fedalloc.cli import app

    res = CliRunner().invoke(app, ["simulate", "--engine", "inprocess", "--ray-address", "127.0.0.1:6379",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 2 and "--ray-address needs --engine ray" in res.output
    assert not any(tmp_path.iterdir())


def test_backend_config_for_a_cluster_only_connects():
    from simulations.ray_local import backend_config

    init = backend_config(address="10.0.0.5:6379")["init_args"]
    assert init["address"] == "10.0.0.5:6379"
    # Ray refuses these when connecting (num_cpus, resources) or they would be wrong off-loopback.
    assert not {"num_cpus", "num_gpus", "resources", "_node_ip_address"} & set(init)
    local = backend_config(num_cpus=2)["init_args"]
    assert local["address"] == "local" and local["_node_ip_address"] == "127.0.0.1" and local["num_cpus"] == 2
