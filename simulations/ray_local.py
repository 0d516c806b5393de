"""Flower's Ray engine as a local tool: loopback only, quiet, and stopped cleanly by Ctrl-C.

Three problems of `flwr.simulation.run_simulation` on Ray 2.55 / Flower 1.42 are handled here, so
`simulations/driver.py` only calls `run_ray_simulation(...)`:

* **Loopback only.** Ray has no authentication, and by default gcs_server, raylet, every worker and
  the driver listen on all interfaces, the runtime-env agent on the external address.
  `ray.init(_node_ip_address="127.0.0.1")` does not help: Ray 2.55 turns a loopback node address
  back into the external one (`services.resolve_ip_for_localhost`) unless
  `ray_constants.ENABLE_RAY_CLUSTER` is false, which is what `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`
  sets (the single-machine mode Ray uses on macOS/Windows). With it the node address is 127.0.0.1
  and every Ray server binds 127.0.0.1. `address="local"` makes sure a fresh local instance is
  started even when `RAY_ADDRESS` points at some cluster.
* **Noise.** Flower's deprecation notice for `run_simulation`, FedAvg's notice that federated
  evaluation is skipped, and Ray's FutureWarning about accelerator env vars are silenced by
  filters that match those exact messages and nothing else.
* **Ctrl-C / SIGTERM / kill -9.** Flower joins its worker threads from the main thread, so Python
  never runs the KeyboardInterrupt while Ray is busy (the progress bar froze; a second Ctrl-C
  crashed in Ray's C++ code). Here a helper thread is woken through `signal.set_wakeup_fd`
  whichever thread the kernel delivers the signal to; it kills every Ray process of the run and
  exits the process (130 for SIGINT, 143 for SIGTERM). The run's processes are found through a
  per-run marker in their environment and the driver's process tree (see `run_processes`); a tiny
  watchdog process removes them at the end of the run and also if the driver dies by SIGKILL.

**An existing cluster** (`address="HOST:PORT"`, `fedalloc simulate --ray-address`): the run only
connects a driver. Nothing is started, so nothing is swept: no watchdog, no kill of any process
(the cluster's raylet starts the workers, and they belong to the cluster). Ray itself ends the
job's actors when the driver disconnects or dies; Ctrl-C/SIGTERM just end this process. Ray
refuses `num_cpus` (and resources) when connecting, so only the address and quiet settings are
passed; the driver takes the node address of the cluster's raylet on this machine. A loopback
address is connected to in the loopback mode above: otherwise Ray rewrites 127.0.0.1 to the
external address and retries the GCS there for ever (the run hung). The driver connects before
Flower starts, so a failing connection raises instead of waiting out the round timeout.

Only the standard library is imported at module level: the watchdog runs this file as a script.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

# Ray reads this at import time into ray._private.ray_constants.ENABLE_RAY_CLUSTER; when false,
# services.get_node_ip_address() answers the loopback address and nothing binds elsewhere.
SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Marker every process of one local Ray run inherits from the driver.
RUN_MARK_ENV = "FEDALLOC_RAY_RUN"
LOOPBACK = "127.0.0.1"

KNOWN_FLWR_NOISE = (
    # run_simulation is the only Python API that runs a ServerApp/ClientApp pair given as objects
    # in this process (progress callback, results handed back in memory); see README "Ray engine".
    "The `run_simulation` function is deprecated",
)
RAY_ACCELERATOR_TIP = r"Tip: In future versions of Ray, Ray will no longer override accelerator"


def backend_config(num_cpus: int | None = None, address: str | None = None) -> dict[str, Any]:
    """Flower backend_config: a loopback-only, fresh, quiet local Ray instance, or (with
    `address`) a connection to an existing cluster.

    Flower's RayBackend passes `init_args` to `ray.init` unchanged (adding only a runtime_env
    with the driver's PYTHONPATH). When connecting, Ray refuses num_cpus/num_gpus/resources and
    `_node_ip_address` would be wrong on any machine but a loopback one, so neither is passed.
    """
    quiet = {"include_dashboard": False, "logging_level": "ERROR", "log_to_driver": False}
    if address is not None:
        return {"client_resources": {"num_cpus": 1}, "init_args": {"address": address, **quiet}}
    return {
        "client_resources": {"num_cpus": 1},
        "init_args": {
            "num_cpus": num_cpus or os.cpu_count() or 2,
            "address": "local",
            "_node_ip_address": LOOPBACK,
            **quiet,
        },
    }


def check_ray_address(address: str) -> str:
    """`HOST:PORT` of a cluster's head (GCS), as `ray start --head` prints it; one-line errors."""
    text = address.strip()
    if "://" in text:
        raise ValueError(f"--ray-address {address!r}: Ray Client addresses (ray://) are not supported; run fedalloc "
                         "on a machine of the cluster and give the head's HOST:PORT")
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--ray-address {address!r}: expected HOST:PORT of the cluster's head, e.g. 10.0.0.5:6379")
    return text


def is_loopback_address(address: str) -> bool:
    host = address.strip().rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        import ipaddress

        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _KnownNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # a malformed record is not ours to judge
            return True
        return not any(s in text for s in KNOWN_FLWR_NOISE)


def quiet_known_noise() -> None:
    """Drop the Flower log lines listed in KNOWN_FLWR_NOISE (idempotent; other lines untouched)."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, _KnownNoise) for f in logger.filters):
        logger.addFilter(_KnownNoise())


@contextmanager
def loopback_only() -> Iterator[None]:
    """Make a Ray instance started inside this block bind 127.0.0.1 only."""
    old = os.environ.get(SINGLE_MACHINE_ENV)
    os.environ[SINGLE_MACHINE_ENV] = "0"  # inherited by gcs_server, raylet, agents and workers
    from ray._private import ray_constants as consts  # read the variable at import: patch it too

    consts.ENABLE_RAY_CLUSTER = False
    try:
        _refuse_foreign_ray()
        yield
    finally:
        if old is None:
            os.environ.pop(SINGLE_MACHINE_ENV, None)
        else:
            os.environ[SINGLE_MACHINE_ENV] = old
        consts.ENABLE_RAY_CLUSTER = consts.env_bool(SINGLE_MACHINE_ENV, not consts.IS_WINDOWS_OR_OSX)


@contextmanager
def cluster_connection(address: str) -> Iterator[None]:
    """A connection to the cluster at `address` (nothing is started here).

    A loopback cluster (`ray start --head --node-ip-address=127.0.0.1` with
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0) is connected to in the same loopback mode, so the driver's
    own servers bind 127.0.0.1 too. Flower reuses a Ray that is already initialised in this
    process whatever its address, so that is refused.
    """
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        raise RuntimeError(f"a Ray instance is already initialised in this process; call ray.shutdown() first so "
                           f"that the simulation connects to {address}")
    with (loopback_only() if is_loopback_address(address) else nullcontext()):
        _connect(address)
        try:
            yield
        finally:
            import ray

            if ray.is_initialized():  # Flower disconnects at the end of a run; not after an error
                ray.shutdown()


def _connect(address: str) -> None:
    """`ray.init` in this thread with what Flower's RayBackend.init_ray would pass (its init_args
    and a runtime_env carrying the driver's sys.path as PYTHONPATH); Flower then reuses it.

    If Flower's backend fails to connect it logs the error and then joins the ServerApp thread,
    which waits for replies up to its round timeout (10 min by default); here the error is raised
    before anything else starts. (An address where nothing listens is refused earlier still, by
    `probe_ray_address`: Ray retries that for ever.)
    """
    import ray

    pythonpath = os.pathsep.join(sys.path)
    if os.environ.get("PYTHONPATH"):
        pythonpath = f"{pythonpath}{os.pathsep}{os.environ['PYTHONPATH']}"
    os.environ["PYTHONPATH"] = pythonpath
    ray.init(runtime_env={"env_vars": {"PYTHONPATH": pythonpath}}, **backend_config(address=address)["init_args"])


def probe_ray_address(address: str, timeout: float = 3.0) -> None:
    """Refuse an address where nothing listens (a typo, a head not started): Ray would retry for ever."""
    host, _, port = address.strip().rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ValueError(f"--ray-address {address}: no Ray head answers there ({exc.strerror or type(exc).__name__}); "
                         "start it with `ray start --head` first (README, 'Ray cluster')") from None


def _refuse_foreign_ray() -> None:
    """Flower reuses an already initialised Ray; only accept one that is confined to loopback."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    node = getattr(getattr(ray, "_private").worker, "_global_node", None)
    ip = getattr(node, "node_ip_address", None)
    if ip not in (LOOPBACK, "::1", "localhost"):
        raise RuntimeError(
            f"a Ray instance is already running in this process on {ip!r}; call ray.shutdown() "
            "first so that the simulation starts its own loopback-only instance")


# --- processes of one run ------------------------------------------------------------------------
#
# A process belongs to the run if it carries the run's marker in its initial environment (gcs_server,
# raylet, monitors and workers inherit it), or if it is a Ray process ("ray::…" title or a file under
# the ray package) that descends from the driver and started after the run began. The second rule is
# needed for Ray's agents: they rewrite their argv/environ area with setproctitle, so /proc no longer
# shows the marker. Linux only (/proc); elsewhere nothing is swept and Ray's own cleanup applies.

def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, start time in clock ticks since boot), for every visible process."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] != b"Z":  # zombies are dead already
            table[int(name)] = (int(fields[1]), int(fields[19]))
    return table


def _now_ticks() -> int:
    try:
        with open("/proc/uptime") as fh:
            return int(float(fh.read().split()[0]) * os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError):
        return 0


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError:
        return b""


def _is_marked(pid: int, mark: str) -> bool:
    return f"{RUN_MARK_ENV}={mark}".encode() in _read(f"/proc/{pid}/environ").split(b"\0")


def _is_ray(pid: int) -> bool:
    cmd = _read(f"/proc/{pid}/cmdline")
    return cmd.startswith(b"ray::") or b"/ray/" in cmd


def run_processes(mark: str, root: int, since: int, exclude: set[int] | frozenset[int] = frozenset(),
                  anywhere: bool = True) -> dict[int, int]:
    """pid -> start time of the run's live processes (see the rules above); `anywhere` also looks
    for marked processes outside the driver's tree (reparented after their parent died)."""
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, int] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, []))
        if table[pid][1] >= since and (_is_marked(pid, mark) or _is_ray(pid)):
            found[pid] = table[pid][1]
    if anywhere:
        for pid, (_, started) in table.items():
            if pid not in found and _is_marked(pid, mark):
                found[pid] = started
    for pid in exclude:
        found.pop(pid, None)
    return found


def kill_run(mark: str, root: int, since: int, exclude: set[int] | frozenset[int] = frozenset(),
             known: dict[int, int] | None = None, timeout: float = 3.0) -> int:
    """SIGKILL the run's processes (and `known` ones, if still the same process), sweeping again
    until none is left: Ray may start a worker while its siblings die."""
    killed: set[int] = set()
    deadline = time.monotonic() + timeout
    while True:
        targets = run_processes(mark, root, since, exclude)
        if known:
            table = _proc_table()
            targets.update({p: st for p, st in known.items() if table.get(p, (0, -1))[1] == st})
        if not targets or time.monotonic() > deadline:
            return len(killed)
        for pid in targets:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except OSError:
                pass
        time.sleep(0.05)


def _start_watchdog(mark: str, since: int) -> Any:
    """A process that kills the run's Ray processes once its stdin pipe closes: at the end of the
    run, and also when this process dies by SIGKILL (Ray's agents would outlive it)."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != RUN_MARK_ENV}
    try:
        return subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--watchdog", mark, str(os.getpid()), str(since)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, close_fds=True,
        )
    except OSError:
        return None


def _watchdog(mark: str, parent: int, since: int) -> None:
    import select

    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    known: dict[int, int] = {}  # remembered while the tree is intact: agents lose their marker
    fd = sys.stdin.fileno()
    while True:
        readable, _, _ = select.select([fd], [], [], 1.0)
        if readable:
            try:
                if not os.read(fd, 4096):
                    break
            except OSError:
                break
        else:
            known.update(run_processes(mark, parent, since, {os.getpid()}, anywhere=False))
    kill_run(mark, parent, since, exclude={os.getpid(), parent}, known=known, timeout=10.0)


# --- signals ----------------------------------------------------------------------------------------

class _Interrupts:
    """SIGINT/SIGTERM while Ray runs: kill the run's Ray processes, then leave the process."""

    def __init__(self, mark: str | None, since: int, exclude: set[int]) -> None:
        self.mark, self.since, self.exclude = mark, since, exclude
        self.active = False

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is not threading.main_thread():
            return self  # signal handlers can only be set from the main thread
        self._rsock, self._wsock = socket.socketpair()
        self._wsock.setblocking(False)
        self._old_handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._old_fd = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        except ValueError:
            self._close_socks()
            return self
        for s in self._old_handlers:
            # The Python-level handler only has to exist so that CPython's C handler writes the
            # signal number to the wakeup fd; the work is done by the watcher thread.
            signal.signal(s, lambda signum, frame: None)
        self.active = True
        threading.Thread(target=self._watch, name="fedalloc-ray-interrupts", daemon=True).start()
        return self

    def _watch(self) -> None:
        while True:
            try:
                data = self._rsock.recv(64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                if signum in (signal.SIGINT, signal.SIGTERM):
                    self._stop(signum)

    def _stop(self, signum: int) -> None:
        name = "interrupted" if signum == signal.SIGINT else "terminated"
        _write(2, f"\nfedalloc: {name}; stopping the Ray simulation\n")
        if self.mark is not None:  # None: a connected cluster, whose processes are not ours to kill
            kill_run(self.mark, os.getpid(), self.since, exclude=self.exclude, timeout=3.0)
        if _isatty(1):
            _write(1, "\x1b[?25h")  # the progress bar hides the cursor
        os._exit(128 + signum)

    def __exit__(self, *exc: Any) -> None:
        if not self.active:
            return
        signal.set_wakeup_fd(self._old_fd)
        for s, h in self._old_handlers.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._close_socks()
        self.active = False

    def _close_socks(self) -> None:
        for s in (self._wsock, self._rsock):
            try:
                s.close()
            except OSError:
                pass


def _write(fd: int, text: str) -> None:
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


@contextmanager
def ray_run(handle_signals: bool = True, address: str | None = None) -> Iterator[str | None]:
    """One local Ray run: marked processes, loopback only, swept at the end whatever happens.

    With `handle_signals` (and on the main thread), SIGINT/SIGTERM kill the run's Ray processes
    and end this process within a couple of seconds instead of raising KeyboardInterrupt.

    With `address` (an existing cluster) nothing is marked, watched or killed; SIGINT/SIGTERM
    only end this process, and Ray ends the job's actors when the driver is gone. Yields None.
    """
    if address is not None:
        with cluster_connection(address), (_Interrupts(None, 0, set()) if handle_signals else nullcontext()):
            yield None
        return
    mark, since = uuid.uuid4().hex, _now_ticks() - 2  # ticks: a little slack for clock rounding
    watchdog = _start_watchdog(mark, since)
    exclude = {os.getpid()} | ({watchdog.pid} if watchdog is not None else set())
    old_mark = os.environ.get(RUN_MARK_ENV)
    os.environ[RUN_MARK_ENV] = mark
    try:
        with loopback_only(), (_Interrupts(mark, since, exclude) if handle_signals else nullcontext()):
            yield mark
    finally:
        if old_mark is None:
            os.environ.pop(RUN_MARK_ENV, None)
        else:
            os.environ[RUN_MARK_ENV] = old_mark
        kill_run(mark, os.getpid(), since, exclude=exclude, timeout=3.0)  # what ray.shutdown() left behind
        if watchdog is not None:
            try:
                watchdog.stdin.close()
                watchdog.wait(timeout=5)
            except Exception:
                pass


def run_ray_simulation(*, server_app: Any, client_app: Any, num_supernodes: int,
                       num_cpus: int | None = None, handle_signals: bool = True, address: str | None = None) -> None:
    """`flwr.simulation.run_simulation` on a loopback-only local Ray that Ctrl-C stops cleanly,
    or (`address="HOST:PORT"`) on an existing Ray cluster, whose processes are left alone."""
    quiet_known_noise()
    if address is not None:
        address = check_ray_address(address)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=RAY_ACCELERATOR_TIP, category=FutureWarning)
        from flwr.simulation import run_simulation

        with ray_run(handle_signals=handle_signals, address=address):  # a cluster is connected to here
            run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                           backend_config=backend_config(num_cpus, address))


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "--watchdog":
    _watchdog(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
