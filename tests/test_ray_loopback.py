"""The Ray engine as a local tool: it listens on loopback only and leaves no process behind.

Ray has no authentication; every server it starts for `fedalloc simulate --engine ray` must bind the
loopback interface. A Ctrl-C (or SIGTERM) must end the run within 5 s, and even a kill -9 of the
driver must not leave Ray's agents or workers running.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from simulations.driver import simulate

REPO = Path(__file__).resolve().parents[1]


def _listening(pids_root: int) -> list[tuple[int, str, str, int]]:
    """(pid, name, ip, port) of every listening TCP socket / unconnected UDP socket in the tree."""
    out = []
    try:
        root = psutil.Process(pids_root)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return out
    for p in procs:
        try:
            conns = p.net_connections(kind="inet")
            name = p.name()
        except psutil.Error:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr)
            if listening and c.laddr:
                out.append((p.pid, name, c.laddr.ip, c.laddr.port))
    return out


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # Ray's gRPC servers bind [::ffff:127.0.0.1]
    return (mapped or addr).is_loopback


def _ray_processes(root_pid: int) -> list[psutil.Process]:
    try:
        kids = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []
    return [k for k in kids if _mentions_ray(k)]


def _mentions_ray(p: psutil.Process) -> bool:
    try:
        return "ray" in (p.name() + " " + " ".join(p.cmdline())).lower()
    except psutil.Error:
        return False


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _marked(mark: str) -> list[psutil.Process]:
    """Processes anywhere that inherited the test's environment marker (catches reparented ones)."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FEDALLOC_TEST_MARK") == mark and _alive(p):
                found.append(p)
        except psutil.Error:
            continue
    return found


def test_ray_simulation_listens_on_loopback_only(tmp_path):
    seen: list[tuple[int, str, str, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.extend(_listening(os.getpid()))
            stop.wait(0.3)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out = simulate(hospitals=3, rounds=1, engine="ray", results_dir=str(tmp_path), run_name="lo",
                       overrides={"local-epochs": 1})
    finally:
        stop.set()
        sampler.join()
    assert out.error is None
    names = {name for _, name, _, _ in seen}
    assert {"gcs_server", "raylet"} <= names, f"the sampler saw no Ray servers: {sorted(names)}"
    exposed = sorted({(name, ip, port) for _, name, ip, port in seen if not _is_loopback(ip)})
    assert not exposed, f"Ray listened beyond loopback: {exposed}"
    # A normal end leaves nothing behind either.
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in _ray_processes(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in _ray_processes(os.getpid()) if _alive(p)]


def _start_sim(tmp_path: Path, mark: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["FEDALLOC_TEST_MARK"] = mark
    return subprocess.Popen(
        [sys.executable, "-m", "fedalloc", "simulate", "--hospitals", "3", "--rounds", "3", "--engine", "ray",
         "--out", str(tmp_path), "--name", "int"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
    )


def _wait_mid_run(proc: subprocess.Popen, timeout: float = 240) -> list[psutil.Process]:
    """Wait until ClientApp actors exist (training is under way); return the Ray processes then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read().decode(errors="replace")
        ray_procs = _ray_processes(proc.pid)
        if any("ClientAppActor" in " ".join(_cmdline(p)) for p in ray_procs):
            time.sleep(1.0)  # let the actors start on their first message
            return _ray_processes(proc.pid)
        time.sleep(0.2)
    raise AssertionError("the Ray simulation did not start its ClientApp actors in time")


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return [p.name(), *p.cmdline()]
    except psutil.Error:
        return []


def _cleanup(proc: subprocess.Popen, procs: list[psutil.Process], mark: str) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    for p in [*procs, *_marked(mark)]:
        try:
            p.kill()
        except psutil.Error:
            pass


def _survivors(procs: list[psutil.Process], mark: str, grace: float = 1.0) -> list[str]:
    deadline = time.monotonic() + grace
    while True:
        left = {p.pid: p for p in [*procs, *_marked(mark)] if _alive(p)}
        if not left or time.monotonic() > deadline:
            return [f"{pid} {' '.join(_cmdline(p))[:120]}" for pid, p in left.items()]
        time.sleep(0.1)


def test_ctrl_c_stops_a_ray_simulation_within_5s_and_leaves_no_ray_process(tmp_path):
    mark = uuid.uuid4().hex
    proc = _start_sim(tmp_path, mark)
    procs: list[psutil.Process] = []
    try:
        procs = _wait_mid_run(proc)
        assert any(_cmdline(p)[:1] == ["raylet"] for p in procs)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pytest.fail("the simulation still ran 5 s after SIGINT")
        elapsed = time.monotonic() - t0
        output = proc.stdout.read().decode(errors="replace")
        assert proc.returncode == 130, output
        assert "interrupted" in output and "Traceback" not in output, output
        left = _survivors(procs, mark)
        assert not left, f"Ray processes left {elapsed:.1f} s after SIGINT: {left}"
    finally:
        _cleanup(proc, procs, mark)


def test_kill_9_of_the_driver_leaves_no_ray_process(tmp_path):
    mark = uuid.uuid4().hex
    proc = _start_sim(tmp_path, mark)
    procs: list[psutil.Process] = []
    try:
        procs = _wait_mid_run(proc)
        proc.kill()
        proc.wait(timeout=5)
        left = _survivors(procs, mark, grace=5.0)
        assert not left, f"Ray processes left 5 s after kill -9 of the driver: {left}"
    finally:
        _cleanup(proc, procs, mark)
