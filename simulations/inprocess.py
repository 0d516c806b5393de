"""An in-process Flower Grid: runs the ClientApp of every virtual node in this process, or in a
small pool of worker processes.

Every message still goes through Flower's own protobuf serialisation both ways, so what a node
receives and what the coordinator gets back is exactly what would cross the wire. Used by fast
tests and by `fedalloc simulate --engine inprocess`; the Ray simulation engine is the default.

With `workers=N > 1` the nodes' ClientApps run in N worker processes (`NodePool`). Each worker
owns the Contexts (node_config, persistent state) of the nodes assigned to it (node index % N)
for the whole run, builds its own ClientApp from an importable factory, and receives
(node, message protobuf bytes), answering with the reply's protobuf bytes. `drop` and `tap` stay
in this process.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

# Flower's own code for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 0
# forkserver: one interpreter imports torch/Opacus once (preloaded) and every worker is forked
# from it, without the parent's torch threads (fork is fragile), and much faster than spawn,
# where every worker imports torch again (2 workers with torch imported: 5.8 s forkserver,
# 9.7–12.3 s spawn, 0.08 s fork; 2 cores at load ≈3).
START_METHOD = "forkserver"
# What a node's first message imports (torch, Opacus, the PLD accountant, and torch._dynamo, which
# the first optimiser step pulls in: seconds each), so that every worker forks with it in memory
# instead of importing it again (measured: a worker's CPU time in a 30-node round 1 went from 8.1 s to 3–4 s).
PRELOAD = ("simulations.inprocess", "client.app", "client.tasks", "opacus", "opacus.grad_sample", "dp_accounting",
           "dp_accounting.pld.privacy_loss_distribution", "dp_accounting.pld.pld_pmf", "torch._dynamo", "torch.optim")
STOP_GRACE_S = 2.0  # how long an idle worker gets to leave after the run before it is terminated


def max_workers() -> int:
    """The largest pool `--workers` accepts: more processes than this only add overhead."""
    return (os.cpu_count() or 1) * 4


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


def _to_bytes(msg: Message) -> bytes:
    return message_to_proto(msg).SerializeToString()


def _from_bytes(data: bytes) -> Message:
    return message_from_proto(ProtoMessage.FromString(data))


def _serve(app: ClientApp, incoming: Message, context: Context) -> Message:
    """The node's reply to `incoming`, as Flower would send it (an exception becomes an Error)."""
    try:
        reply = app(incoming, context)
    except Exception as exc:  # Flower turns a raising ClientApp into an error reply
        reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
    reply.metadata.__dict__["_message_id"] = str(uuid4())
    return reply


class InProcessGrid(Grid):
    """Virtual nodes with ids 1001.. and per-node Context (node_config, persistent state).

    `drop(node_id, round_group)` may return True to simulate a node that never answers; `tap`
    sees every reply as it would arrive at the coordinator (message audits in tests).

    `workers > 1` runs the nodes in a process pool built from `app_factory` (a picklable,
    importable callable returning the ClientApp, e.g. `client.app.make_app`); `client_app` is
    then unused and `contexts` holds only the nodes' initial Contexts (their state lives in the
    workers). Use the grid as a context manager, or call `close()`, to stop the workers.
    """

    def __init__(
        self,
        client_app: ClientApp | None,
        node_configs: list[Mapping[str, Any]],
        run_id: int = 1,
        run_config: Mapping[str, Any] | None = None,
        drop: Callable[[int, str], bool] | None = None,
        tap: Callable[[Message], None] | None = None,
        *,
        workers: int = 1,
        app_factory: Callable[[], ClientApp] | None = None,
    ) -> None:
        if not 1 <= workers <= max_workers():
            raise ValueError(f"workers {workers} is not allowed; choose 1..{max_workers()}")
        if workers > 1 and app_factory is None:
            raise ValueError("workers > 1 needs app_factory, an importable ClientApp factory "
                             "(a ClientApp object cannot be sent to worker processes)")
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1001 + i: Context(run_id=run_id, node_id=1001 + i, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config or {}))
            for i, cfg in enumerate(node_configs)
        }
        self.drop = drop
        self.tap = tap
        self._replies: dict[str, Message] = {}
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1
        self.pool = NodePool(app_factory, self.contexts, workers) if workers > 1 else None  # type: ignore[arg-type]

    def close(self) -> None:
        """Stop the worker processes (nothing to do with workers=1); safe to call twice."""
        if self.pool is not None:
            self.pool.close()

    def __enter__(self) -> "InProcessGrid":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if self.pool is not None:
            # An interrupt or error: the workers' current work is abandoned (node writes are atomic).
            self.pool.close(grace=STOP_GRACE_S if exc_type is None else 0.0)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids, delivered = self._accept(messages)
        if self.pool is not None:
            self._push_to_pool(delivered)
            return ids
        for msg_id, node, msg in delivered:
            reply = _wire(_serve(self.client_app, _wire(msg), self.contexts[node]))  # type: ignore[arg-type]
            if self.tap:
                self.tap(reply)
            self._replies[msg_id] = reply
        return ids

    def _accept(self, messages: Iterable[Message]) -> tuple[list[str], list[tuple[str, int, Message]]]:
        """Give every message its id; (all ids, the (id, node, message) not dropped, in order)."""
        ids, delivered = [], []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            if not (self.drop and self.drop(node, msg.metadata.group_id)):
                delivered.append((msg_id, node, msg))
        return ids, delivered

    def _push_to_pool(self, delivered: list[tuple[str, int, Message]]) -> None:
        """All messages of the batch run concurrently across the workers; replies are tapped and
        stored in the order of the messages, as with one process."""
        incoming = {msg_id: _to_bytes(msg) for msg_id, _, msg in delivered}
        jobs = [(msg_id, node, incoming[msg_id]) for msg_id, node, _ in delivered]
        answers = self.pool.run(jobs)  # type: ignore[union-attr]
        for msg_id, _, _ in jobs:
            answer = answers[msg_id]
            if isinstance(answer, bytes):
                reply = _from_bytes(answer)
            else:  # the node's worker is gone: what Flower reports for a crashed ClientApp
                reply = Message(Error(code=ErrorCode.CLIENT_APP_CRASHED, reason=answer), reply_to=_from_bytes(incoming[msg_id]))
                reply.metadata.__dict__["_message_id"] = str(uuid4())
                reply = _wire(reply)
            if self.tap:
                self.tap(reply)
            self._replies[msg_id] = reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


# --- the process pool ------------------------------------------------------------------------------

Job = tuple[str, int, bytes]  # (message id, node id, message protobuf bytes)


class NodePool:
    """N worker processes, each serving a fixed share of the nodes (node index % N) for the run.

    `run(jobs)` answers every job with the reply's protobuf bytes, or with a one-line reason
    when the job's worker died (its nodes then stay unavailable for the rest of the run). While
    the pool is open on the main thread, SIGTERM unwinds like Ctrl-C (SystemExit 143), so the
    caller's `with`/`finally` stops the workers; SIGINT is the usual KeyboardInterrupt (the
    workers ignore it: Ctrl-C reaches the whole process group, and the coordinator decides).
    """

    def __init__(self, app_factory: Callable[[], ClientApp], contexts: Mapping[int, Context], workers: int,
                 start_method: str = START_METHOD, preload: Sequence[str] = PRELOAD) -> None:
        self._ctx = mp.get_context(start_method)
        self._factory = app_factory
        self.owner = {node: i % workers for i, node in enumerate(contexts)}
        self._nodes = [{n: (dict(c.node_config), dict(c.run_config), c.run_id)
                        for n, c in contexts.items() if self.owner[n] == w} for w in range(workers)]
        self.dead: dict[int, str] = {}
        self.procs: list[Any] = []
        self.conns: list[Connection] = []
        self._sigterm: list[Any] = []  # the handler this pool replaced, while it is installed
        self._wakeup: tuple[socket.socket, socket.socket, int] | None = None
        self._install_signals()
        if start_method == "forkserver":
            # Start the forkserver now without waiting for it: it imports torch/Opacus while the
            # coordinator prepares its first round; the workers are forked at the first message.
            from multiprocessing import forkserver

            self._ctx.set_forkserver_preload(list(dict.fromkeys([*preload, _module_of(app_factory)])))
            forkserver.ensure_running()

    def _start(self) -> None:
        try:
            for w, mine in enumerate(self._nodes):
                here, there = self._ctx.Pipe()
                proc = self._ctx.Process(target=_worker_main, name=f"fedalloc-node-worker-{w}", daemon=True,
                                         args=(there, self._factory, mine, logging.getLogger("flwr").level))
                self.procs.append(proc)
                self.conns.append(here)
                proc.start()
                there.close()
        except BaseException:
            self.close(grace=0.0)
            raise

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def run(self, jobs: list[Job]) -> dict[str, bytes | str]:
        if not self.procs:
            self._start()
        answers: dict[str, bytes | str] = {}
        batches: dict[int, list[Job]] = {}
        for job in jobs:
            w = self.owner[job[1]]
            if w in self.dead:
                answers[job[0]] = self.dead[w]
            else:
                batches.setdefault(w, []).append(job)
        pending = {w: {job[0] for job in batch} for w, batch in batches.items()}
        for w, batch in batches.items():
            try:
                self.conns[w].send(batch)
            except OSError:  # the worker is gone; its sentinel tells the rest below
                pass
        while pending:
            self._collect(pending, answers)
        return answers

    def _collect(self, pending: dict[int, set[str]], answers: dict[str, bytes | str]) -> None:
        """Wait for the next replies (or a worker's death) and file them."""
        by_waitable: dict[Any, int] = {self.conns[w]: w for w in pending} | {self.procs[w].sentinel: w for w in pending}
        if self._wakeup is not None:
            by_waitable[self._wakeup[0]] = -1
        for ready in wait(list(by_waitable)):
            w = by_waitable[ready]
            if w == -1:  # a signal arrived (on any thread): its Python handler runs on return from wait()
                _drain_wakeup(self._wakeup[0])  # type: ignore[index]
                continue
            if w not in pending:
                continue
            alive = self._drain(w, pending[w], answers)
            if not alive or (ready == self.procs[w].sentinel):
                self._mark_dead(w)
                for msg_id in pending[w]:
                    answers[msg_id] = self.dead[w]
                pending[w].clear()
            if not pending[w]:
                del pending[w]

    def _drain(self, w: int, todo: set[str], answers: dict[str, bytes | str]) -> bool:
        """File every reply worker `w` has sent so far; False if its pipe is closed."""
        conn = self.conns[w]
        try:
            while todo and conn.poll():
                msg_id, answer = conn.recv()
                answers[msg_id] = answer
                todo.discard(msg_id)
        except (EOFError, OSError):
            return False
        return True

    def _mark_dead(self, w: int) -> None:
        if w in self.dead:
            return
        proc = self.procs[w]
        proc.join(timeout=1.0)
        nodes = sorted(n for n, o in self.owner.items() if o == w)
        self.dead[w] = (f"node worker process {w} (pid {proc.pid}) died (exit code {proc.exitcode}); "
                        f"its {len(nodes)} node(s) cannot answer for the rest of the run")
        log.error("%s: nodes %s", self.dead[w], nodes)

    def close(self, grace: float = STOP_GRACE_S) -> None:
        """Ask idle workers to leave, then terminate (and if need be kill) the rest; no orphans."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + grace
        self.procs = [p for p in self.procs if p.pid is not None]  # an interrupted start() left one unstarted
        for proc in self.procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=1.0)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        self._restore_signals()

    def _install_signals(self) -> None:
        """SIGTERM unwinds; and a signal delivered to another thread (torch's, rich's) must still
        wake the main thread out of wait(), or Ctrl-C would wait for the next reply: CPython writes
        every signal number to the wakeup fd, which wait() watches."""
        if threading.current_thread() is not threading.main_thread():  # handlers live on the main thread
            return
        self._sigterm = [signal.signal(signal.SIGTERM, _terminated)]
        r, w = socket.socketpair()
        r.setblocking(False)
        w.setblocking(False)
        try:
            self._wakeup = (r, w, signal.set_wakeup_fd(w.fileno(), warn_on_full_buffer=False))
        except ValueError:
            r.close()
            w.close()

    def _restore_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        if self._sigterm:
            old = self._sigterm.pop()
            signal.signal(signal.SIGTERM, old if old is not None else signal.SIG_DFL)
        if self._wakeup is not None:
            r, w, old_fd = self._wakeup
            signal.set_wakeup_fd(old_fd)
            r.close()
            w.close()
            self._wakeup = None


def _drain_wakeup(sock: socket.socket) -> None:
    try:
        while sock.recv(512):
            pass
    except (BlockingIOError, InterruptedError):
        pass


def _terminated(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _module_of(factory: Callable[..., Any]) -> str:
    return str(getattr(getattr(factory, "func", factory), "__module__", "__main__"))


def _worker_main(conn: Connection, app_factory: Callable[[], ClientApp],
                 nodes: Mapping[int, tuple[dict[str, Any], dict[str, Any], int]], flwr_log_level: int) -> None:
    """One worker: build the ClientApp, keep its nodes' Contexts, answer batches until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the coordinator process
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _die_with_parent()
    import torch

    torch.set_num_threads(1)  # N workers share the cores; one thread each avoids oversubscription
    logging.getLogger("flwr").setLevel(flwr_log_level)
    app = app_factory()
    contexts = {n: Context(run_id=run_id, node_id=n, node_config=cfg, state=RecordDict(), run_config=run_cfg)
                for n, (cfg, run_cfg, run_id) in nodes.items()}
    TaskIdentity.run_id = next(iter(nodes.values()))[2] if nodes else 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    TaskIdentity.task_id = 1
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):  # the coordinator is gone
            return
        if batch is None:
            return
        for msg_id, node, data in batch:
            try:
                answer: bytes | str = _to_bytes(_serve(app, _from_bytes(data), contexts[node]))
            except Exception as exc:  # not the ClientApp's own failure (that is an Error reply)
                answer = f"node worker could not handle the message: {type(exc).__name__}: {exc}"
            try:
                conn.send((msg_id, answer))
            except OSError:
                return


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker if its parent (our process, or the forkserver, which
    leaves with our process) goes away, e.g. after kill -9 of the coordinator."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def random_dropout(rate: float, seed: int = 0) -> Callable[[int, str], bool]:
    """Each (node, round) fails independently with probability `rate`; the predict round too."""
    rng = random.Random(seed)
    return lambda node, group: rng.random() < rate
