"""A node's persistent, lifetime privacy ledger.

Every mechanism the node runs is one entry: noise multiplier σ, sample rate q, steps, the
neighbouring relation of its input and the L2 sensitivity of one record (client/accounting.py).
ε is the composition of the whole history with dp_accounting's privacy-loss distributions, so anyone
holding `fedalloc ledger show --json` can recompute it with another accountant. A charge composes
its mechanism onto the composed state of the history before it (kept in memory, and saved beside
the ledger as `<ledger>.pld-state.npz` by a process that started cold), not the whole history.

The ledger is a SQLite database (standard library; format "fedalloc-ledger/3": tables meta,
entries, plans; entries and plans are append-only). Durability: a charge is one `BEGIN IMMEDIATE`
transaction — read the entries this handle has not seen, compute ε, refuse (roll back) or insert
and commit — and the commit returns only once the write-ahead log is fsync'd (WAL,
synchronous=FULL): the charge is on disk *before* the work it pays for is done or sent, so a
crash can waste budget but never under-record it. A torn WAL write belongs to a commit that never
returned (its work never ran); SQLite's frame checksums discard it on recovery. `BEGIN IMMEDIATE`
takes the database's write lock, so processes of one node (deployment runs one per message)
charge one after another and cannot both spend the same remaining budget. A corrupt ledger, one
of another node, or a missing one that existed before is an error, never a reset: the node refuses
to work (docs/DESIGN.md, "Ledger"). JSON ledgers (formats 1 and 2) are migrated on first open and
kept beside it as `<ledger>.v<N>.json.bak`.

A ledger also holds one *plan* per run (σ, q, steps, rounds, ε), written at the run's first
request: later requests of that run must match it, so a coordinator cannot change a run's noise
or stretch it past its planned rounds.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import os
import sqlite3
import tempfile
import threading
from collections import OrderedDict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

from filelock import FileLock

from core.atomic import atomic_write_bytes, fsync_path
from client.accounting import (ADD_REMOVE, DPSGD, REPLACE_ONE, EntryKey, Mechanism, MechanismLike, entry_key,
                               epsilon, epsilon_of_keys, has_state, history_key, load_state, save_state)

FORMAT = "fedalloc-ledger/3"
JSON_FORMATS = ("fedalloc-ledger/1", "fedalloc-ledger/2")
ACCOUNTANT = "pld"
# How long a charge waits for another process of the node to finish its own (one ε + one fsync).
BUSY_TIMEOUT = 30.0
SQLITE_MAGIC = b"SQLite format 3\x00"

__all__ = ["Ledger", "LedgerError", "BudgetExceeded", "Mechanism", "compute_epsilon", "close_connections"]

# Entry fields in the order `ledger show --json` prints them. NULL means "absent" (entries migrated
# from format 1 have no run_id), except for round, where NULL is the JSON null of a release.
COLUMNS = ("run", "run_id", "round", "purpose", "kind", "relation", "noise_multiplier", "sample_rate", "steps",
           "sensitivity", "epsilon_after", "time")
_SCHEMA = [
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value NOT NULL)",
    "CREATE TABLE entries (id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT, run_id TEXT, round INTEGER,"
    " purpose TEXT, kind TEXT NOT NULL, relation TEXT NOT NULL, noise_multiplier REAL NOT NULL,"
    " sample_rate REAL NOT NULL, steps INTEGER NOT NULL, sensitivity REAL, epsilon_after REAL, time TEXT,"
    " extra TEXT)",
    "CREATE TABLE plans (id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL UNIQUE, plan TEXT NOT NULL)",
] + [f"CREATE TRIGGER {t}_{op.lower()} BEFORE {op} ON {t} BEGIN SELECT RAISE(ABORT, 'the ledger is append-only'); END"
     for t in ("meta", "entries", "plans") for op in ("UPDATE", "DELETE")]
_INSERT_ENTRY = f"INSERT INTO entries ({', '.join(COLUMNS)}, extra) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"


class LedgerError(RuntimeError):
    """The ledger is unusable (corrupt, another node's, or missing). Never reset silently."""


class BudgetExceeded(RuntimeError):
    """Running the requested mechanism would push ε past the node's lifetime budget."""


def compute_epsilon(history: list[MechanismLike], delta: float, accountant: str = ACCOUNTANT) -> float:
    """ε after composing `history` (Mechanisms, or (σ, q, steps) DP-SGD tuples).

    `accountant` is accepted for old callers; the only accountant is dp_accounting's PLD.
    """
    return epsilon(history, delta)


class Ledger:
    """One node's ledger. Create or open with `Ledger.open(path, node=…, budget=…, delta=…)`.

    A Ledger is a view of the first entries and plans its database connection had read when the
    view was last synced (at open, and inside every charge and set_plan).
    """

    def __init__(self, path: Path, db: "_Db", limit: float | None = None) -> None:
        self.path = path
        self._db = db
        # A node config may lower (never raise) the lifetime budget recorded in the file.
        self._limit = limit
        self._state_tried = False  # looked for the saved composed state (client/accounting.py)
        self._sync()

    def _sync(self) -> None:
        self._n, self._plans_seen = len(self._db.entries), self._db.plans_seen

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        node: str,
        budget: float | None,
        delta: float,
        marker: str | Path | None = None,
    ) -> "Ledger":
        """Read the ledger at `path`, or create it (budget None: the default 3.0).

        `marker` is a small file kept apart from the ledger (beside the node's records): it
        remembers that this node has a ledger and where. A ledger that is missing while its
        marker exists is refused — starting again from 0 would erase spent budget.
        """
        path = Path(path).expanduser().resolve()
        if budget is not None and not budget > 0:
            raise ValueError(f"budget must be positive, got {budget}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        marker_path = Path(marker).expanduser().resolve() if marker else None
        known = _read_marker(marker_path, node) if marker_path else None
        if known is not None and Path(known["ledger"]) != path:
            raise LedgerError(f"node {node!r} keeps its ledger at {known['ledger']}, not {path}; "
                              "point ledger-path there (a node has one lifetime ledger)")
        if not path.exists():
            if known is not None:
                raise LedgerError(
                    f"{path}: ledger missing; node {node!r} has had one since {known['created']}. "
                    "Restore it from backup (see docs/DESIGN.md, 'Ledger recovery'); it is never restarted at 0")
            _create(path, node, 3.0 if budget is None else float(budget), float(delta))
        db = _attach(path)
        meta = db.meta
        if meta["node"] != node:
            raise LedgerError(f"{path}: ledger belongs to node {meta['node']!r}, not {node!r}")
        if marker_path and known is None:
            _write_marker(marker_path, node, path, str(meta["created"]))
        if float(meta["delta"]) != float(delta):
            raise LedgerError(f"{path}: ledger was created with delta={meta['delta']}; node config asks delta={delta}")
        if budget is not None and float(budget) > float(meta["budget"]):
            raise LedgerError(
                f"{path}: node config budget {budget} exceeds the lifetime budget "
                f"{meta['budget']} recorded in the ledger; a lifetime budget cannot grow")
        return cls(path, db, limit=None if budget is None else min(float(budget), float(meta["budget"])))

    @classmethod
    def read(cls, path: str | Path) -> "Ledger":
        """Open an existing ledger for inspection only (a JSON ledger is migrated first)."""
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"{path}: no such ledger file")
        return cls(path, _attach(path.expanduser().resolve()))

    # -- queries --------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return str(self._db.meta["node"])

    @property
    def budget(self) -> float:
        recorded = float(self._db.meta["budget"])
        return recorded if self._limit is None else min(recorded, self._limit)

    @property
    def delta(self) -> float:
        return float(self._db.meta["delta"])

    @property
    def accountant(self) -> str:
        return ACCOUNTANT

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._db.entries[: self._n]]

    def mechanisms(self) -> list[Mechanism]:
        return self._db.mechanisms[: self._n]

    def _keys(self) -> tuple[EntryKey, ...]:
        return tuple(self._db.keys[: self._n])

    def history(self) -> list[tuple[float, float, int]]:
        """(σ, q, steps) of every entry; use `mechanisms()` for the relation and kind too."""
        return [(m.noise_multiplier, m.sample_rate, m.steps) for m in self.mechanisms()]

    def epsilon(self, extra: list[Mechanism] | None = None) -> float:
        self._warm_state()
        return epsilon_of_keys(self._keys() + history_key(extra or []), self.delta)

    @property
    def state_path(self) -> Path:
        """The composed privacy-loss state of this ledger's history (a cache; client/accounting.py)."""
        return self.path.with_name(self.path.name + ".pld-state.npz")

    def _warm_state(self) -> bool:
        """True if the history's composed state was already in memory (a long-lived process).

        Otherwise (a fresh process: deployment runs one per message) start from the state the
        last charge saved, so the next charge composes one mechanism instead of the history.
        """
        keys = self._keys()
        if not keys or has_state(keys):
            return True
        if not self._state_tried:
            self._state_tried = True
            load_state(self.state_path, keys)
        return False

    def remaining(self) -> float:
        return max(self.budget - self.epsilon(), 0.0)

    def run_entries(self, run: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self._db.entries[: self._n] if e.get("run") == run]

    def charged(self, run: str, kind: str, round_: int | None = None) -> bool:
        return any(e.get("run") == run and e["kind"] == kind and e.get("round") == round_
                   for e in self._db.entries[: self._n])

    def plan(self, run: str) -> dict[str, Any] | None:
        found = self._db.plans.get(run)
        return json.loads(found[1]) if found is not None and found[0] <= self._plans_seen else None

    def _plans(self) -> dict[str, Any]:
        return {run: json.loads(text) for run, (pid, text) in self._db.plans.items() if pid <= self._plans_seen}

    # -- writing --------------------------------------------------------------------------
    def set_plan(self, run: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Record `plan` for `run` unless one exists; return the plan in force (first wins)."""
        db = self._db
        with db.write("record the run's plan"):
            if run not in db.plans:
                db.conn.execute("INSERT INTO plans (run, plan) VALUES (?, ?)", (run, json.dumps(plan)))
        self._sync()
        return dict(json.loads(db.plans[run][1]))

    def charge(self, mechanisms: list[Mechanism], *, run: str, purpose: str, round_: int | None = None,
               run_id: str = "") -> float:
        """Record `mechanisms` durably, then return the new ε. Refuse if it would exceed budget.

        One IMMEDIATE transaction: it holds the ledger's write lock while it reads the entries
        other processes of this node added, computes ε and inserts, so two processes cannot both
        spend the same remaining budget; the commit returns once it is on disk.
        """
        db = self._db
        with db.write("record the charge"):
            self._sync()
            self._state_tried = False  # the ledger may have moved on since this handle last looked
            warm = self._warm_state()
            eps_after = self.epsilon(mechanisms)
            if eps_after > self.budget:
                raise BudgetExceeded(
                    f"{purpose} would bring ε to {eps_after:.3f} > lifetime budget "
                    f"{self.budget:.3f} (spent {self.epsilon():.3f})")
            stamp = _now()
            db.conn.executemany(_INSERT_ENTRY, [
                (run, run_id, round_, purpose, m.kind, m.relation, float(m.noise_multiplier), float(m.sample_rate),
                 int(m.steps), float(m.sensitivity), eps_after, stamp, None) for m in mechanisms])
        self._sync()
        if not warm:
            # This process started cold: leave the state for the next one (a cache, so a
            # failure to write it never fails the charge, which is already on disk).
            with contextlib.suppress(Exception):
                save_state(self.state_path, self._keys())
        return eps_after

    def summary(self) -> dict[str, Any]:
        """The public, recomputable view printed by `fedalloc ledger show --json`: every field."""
        return {
            "node": self.node,
            "budget": self.budget,
            "delta": self.delta,
            "accountant": ACCOUNTANT,
            "epsilon_spent": self.epsilon(),
            "history": self.entries,
            "plans": self._plans(),
        }


# -- the database connection of one ledger, one per process --------------------------------------
class _Db:
    """One ledger file as this process knows it: its meta, every entry and plan read so far
    (append-only, so a refresh reads only rows past the last id) and a connection to it.

    A lock serialises this process's threads on the connection; `BEGIN IMMEDIATE` serialises
    processes. The connection may be closed to bound open files and is reopened on demand.
    """

    def __init__(self, path: Path, conn: sqlite3.Connection, ident: tuple[int, int], meta: dict[str, Any]) -> None:
        self.path, self.ident, self.meta, self.pid = path, ident, meta, os.getpid()
        self._conn: sqlite3.Connection | None = conn
        self.wal_ident = _wal_ident(path)  # the log this connection opened with its first read
        self.lock = threading.RLock()
        self.entries: list[dict[str, Any]] = []
        self.mechanisms: list[Mechanism] = []
        self.keys: list[EntryKey] = []
        self.last_id = 0
        self.plans: dict[str, tuple[int, str]] = {}
        self.plans_seen = 0
        _opened(self)

    @property
    def conn(self) -> sqlite3.Connection:
        """The open connection (reopened if it was closed); the caller holds `lock`."""
        if self.pid != os.getpid():
            raise LedgerError(f"{self.path}: this ledger was opened before the process forked; open it again here")
        if self._conn is None:
            if not self.same_file():
                raise _replaced(self.path)
            self._conn = _open_connection(self.path)
            self.wal_ident = _wal_ident(self.path)
            _opened(self)
        else:
            _touch(self)
        return self._conn

    def close(self) -> None:
        """Close the connection; the caller holds `lock`. (SQLite neither checkpoints nor deletes
        the log of a file that was moved or deleted while open.)"""
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def same_file(self) -> bool:
        try:
            return _ident(self.path) == self.ident
        except FileNotFoundError:
            return False

    def refresh(self) -> None:
        """Read the entries and plans committed since this process last looked."""
        with self.lock:  # held until the rows are appended: two threads must not both add them
            with _sql(self.path, "read the ledger"):
                rows = self.conn.execute(f"SELECT id, {', '.join(COLUMNS)}, extra FROM entries WHERE id > ? "
                                         "ORDER BY id", (self.last_id,)).fetchall()
                plans = self.conn.execute("SELECT id, run, plan FROM plans WHERE id > ? ORDER BY id",
                                          (self.plans_seen,)).fetchall()
            self._add(rows, plans)

    def _add(self, rows: list[tuple[Any, ...]], plans: list[tuple[int, str, str]]) -> None:
        for row in rows:
            e = dict(zip(COLUMNS, row[1:-1]))
            try:
                if row[-1] is not None or None in row[1:3] or None in row[4:-1]:  # migrated from JSON
                    e = {k: v for k, v in e.items() if v is not None or k == "round"}
                    e.update(json.loads(row[-1]) if row[-1] else {})
                    m = _mechanism(e)
                    key = entry_key(m)
                else:
                    m, key = _row_mechanism(*row[5:11])
            except (KeyError, TypeError, ValueError) as exc:
                raise LedgerError(f"{self.path}: ledger entry {len(self.entries)} is malformed") from exc
            self.entries.append(e)
            self.mechanisms.append(m)
            self.keys.append(key)
            self.last_id = row[0]
        for pid, run, text in plans:
            self.plans.setdefault(run, (pid, text))
            self.plans_seen = pid

    @contextlib.contextmanager
    def write(self, doing: str) -> Iterator[None]:
        """One IMMEDIATE transaction, committed if the block returns, rolled back if it raises."""
        with self.lock:
            if not self.same_file():
                raise _replaced(self.path)
            conn = self.conn
            with _sql(self.path, doing):
                conn.execute("BEGIN IMMEDIATE")
            try:
                self.refresh()
                with _sql(self.path, doing):
                    yield
                    conn.execute("COMMIT")
            finally:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
            self.refresh()  # our own rows, read back only once committed


def _replaced(path: Path) -> LedgerError:
    return LedgerError(f"{path}: ledger file was removed or replaced while in use; refusing to write to the old one")


_CONNS: dict[tuple[int, str], _Db] = {}
_CONNS_LOCK = threading.Lock()
# Open connections, least recently used first. Each holds 3 files (database, WAL, shared
# memory); ledgers may use half of the process's file descriptors (1,024: 170 ledgers), so a
# simulation of more nodes closes the least recently used and reopens it when used again
# (a reopen costs a cold open, and the close a checkpoint).
_OPEN: "OrderedDict[int, _Db]" = OrderedDict()
_OPEN_LOCK = threading.Lock()
# Connections a forked child inherited: never used nor closed there (SQLite forbids both).
_ABANDONED: list[sqlite3.Connection] = []


def _max_open() -> int:
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 64
    return 4096 if soft == resource.RLIM_INFINITY else max(8, soft // 6)


MAX_OPEN = _max_open()


def _opened(db: _Db) -> None:
    with _OPEN_LOCK:
        _OPEN[id(db)] = db
        _OPEN.move_to_end(id(db))
        excess = len(_OPEN) - MAX_OPEN
        for key, victim in list(_OPEN.items()):
            if excess <= 0:
                break
            # Never wait for a connection in use (its thread may be waiting for this lock).
            if victim is not db and victim.lock.acquire(blocking=False):
                try:
                    victim.close()
                finally:
                    victim.lock.release()
                del _OPEN[key]
                excess -= 1


def _touch(db: _Db) -> None:
    with _OPEN_LOCK:
        if id(db) in _OPEN:
            _OPEN.move_to_end(id(db))


def _after_fork_in_child() -> None:
    """A forked child never uses, nor closes, its parent's connections (SQLite forbids both)."""
    global _CONNS_LOCK, _OPEN_LOCK
    _CONNS_LOCK, _OPEN_LOCK = threading.Lock(), threading.Lock()
    _ABANDONED.extend(db._conn for db in _CONNS.values() if db._conn is not None)
    _CONNS.clear()
    _OPEN.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _attach(path: Path) -> _Db:
    """This process's view of the ledger at `path`: connected once, then refreshed."""
    key = (os.getpid(), str(path))
    with _CONNS_LOCK:
        db = _CONNS.get(key)
        if db is not None and not db.same_file():
            if db.wal_ident is not None and _wal_ident(path) == db.wal_ident:
                raise LedgerError(
                    f"{path}: ledger file was replaced while this process had it open, and the old ledger's "
                    f"write-ahead log {path}-wal is still there (SQLite would replay it into the new file); stop "
                    "the node's processes and move that log away (docs/DESIGN.md, 'Ledger recovery')")
            _forget(db)
            db = None
        if db is None:
            db = _CONNS[key] = _connect(path)
            return db
    db.refresh()
    return db


def close_connections() -> None:
    """Close this process's ledger connections and forget what they read (a restarted node)."""
    with _CONNS_LOCK:
        for key in [k for k in _CONNS if k[0] == os.getpid()]:
            _forget(_CONNS.pop(key))


# At exit, not at teardown: the last connection to close folds the WAL into the ledger file, and
# the CLI skips teardown's garbage collection (fedalloc/cli.py), which would otherwise close them.
atexit.register(close_connections)


def _forget(db: _Db) -> None:
    with db.lock:
        db.close()
    with _OPEN_LOCK:
        _OPEN.pop(id(db), None)


def _open_connection(path: Path) -> sqlite3.Connection:
    # mode=rw: a ledger that vanished in between is an error, never a new empty database.
    conn = sqlite3.connect(f"file:{quote(str(path))}?mode=rw", uri=True, timeout=BUSY_TIMEOUT,
                           isolation_level=None, check_same_thread=False)
    try:
        with _sql(path, "open the ledger"):
            conn.execute("PRAGMA synchronous=FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def _connect(path: Path) -> _Db:
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(SQLITE_MAGIC))
    except OSError as exc:
        raise LedgerError(f"{path}: cannot read the ledger ({exc.strerror})") from exc
    if head != SQLITE_MAGIC:
        _migrate(path)
    ident = _ident(path)
    conn = _open_connection(path)
    try:
        with _sql(path, "open the ledger"):
            meta = _check(conn, path)
            if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
    except BaseException:
        conn.close()
        raise
    db = _Db(path, conn, ident, meta)
    try:
        db.refresh()
    except BaseException:
        _forget(db)
        raise
    return db


def _check(conn: sqlite3.Connection, path: Path) -> dict[str, Any]:
    """The ledger's meta row, once SQLite finds the file intact and it is a fedalloc ledger.

    The main file never holds bytes past its last page (the ledger never shrinks, and a
    checkpoint only copies pages of the snapshot this read holds), so any is damage.
    """
    conn.execute("BEGIN")
    try:
        problems = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise LedgerError(f"{path}: ledger file is corrupt ({problems[0]}); "
                              "refusing to reset it — restore it from backup")
        pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
        if os.path.getsize(path) > pages:
            raise LedgerError(f"{path}: ledger file is corrupt (bytes after its last page); "
                              "refusing to reset it — restore it from backup")
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    finally:
        conn.execute("COMMIT")
    if (not {"meta", "entries", "plans"} <= tables or meta.get("format") != FORMAT
            or not {"node", "budget", "delta", "created"} <= set(meta)):
        raise LedgerError(f"{path}: not a fedalloc ledger file")
    return meta


@contextlib.contextmanager
def _sql(path: Path, doing: str) -> Iterator[None]:
    """SQLite's errors as one-line LedgerErrors."""
    try:
        yield
    except sqlite3.DatabaseError as exc:
        name = getattr(exc, "sqlite_errorname", "")
        if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            raise LedgerError(f"{path}: cannot {doing}: the ledger is busy (another process of this node held it; "
                              f"waited up to {BUSY_TIMEOUT:g} s)") from exc
        if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or type(exc) is sqlite3.DatabaseError:
            raise LedgerError(f"{path}: ledger file is corrupt ({exc}); "
                              "refusing to reset it — restore it from backup") from exc
        raise LedgerError(f"{path}: cannot {doing} ({exc})") from exc


# -- creating and migrating ----------------------------------------------------------------------
def _create(path: Path, node: str, budget: float, delta: float) -> None:
    """Put a new, complete ledger at `path`, unless one appears there meanwhile (then keep that one).

    Built beside it and hard-linked into place, so the path never shows a half-made ledger.
    """
    if os.path.lexists(f"{path}-wal") and not os.path.lexists(path):  # not one a racing creator just made
        raise _stale_wal(path)
    meta = {"format": FORMAT, "node": node, "budget": budget, "delta": delta, "accountant": ACCOUNTANT,
            "created": _now()}
    tmp = _build(path, meta, [], {})
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            return
        except OSError:  # a filesystem without hard links: check-and-rename under a lock instead
            with FileLock(str(path) + ".lock"):
                if os.path.lexists(path):
                    return
                os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _build(path: Path, meta: dict[str, Any], entries: list[dict[str, Any]], plans: dict[str, Any]) -> Path:
    """A complete ledger database in a temp file beside `path`, fsync'd; the caller moves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        conn = sqlite3.connect(tmp, isolation_level=None)
        try:
            with _sql(path, "write the new ledger"):
                _fill(conn, meta, entries, plans)
        finally:
            conn.close()  # the last connection: checkpoints the WAL into the file and removes it
        if os.path.exists(f"{tmp}-wal"):
            raise LedgerError(f"{path}: could not finish writing the new ledger ({tmp}-wal remains)")
        fsync_path(tmp)
    except BaseException:
        for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        raise
    return tmp


def _fill(conn: sqlite3.Connection, meta: dict[str, Any], entries: list[dict[str, Any]],
          plans: dict[str, Any]) -> None:
    # No journal and no syncs while nobody can see the file: it is fsync'd once, at the end.
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN IMMEDIATE")
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
    conn.executemany(_INSERT_ENTRY, [_entry_row(e) for e in entries])
    conn.executemany("INSERT INTO plans (run, plan) VALUES (?, ?)",
                     [(run, json.dumps(plan)) for run, plan in plans.items()])
    conn.execute("COMMIT")
    conn.execute("PRAGMA journal_mode=WAL")  # recorded in the file's header


def _entry_row(e: dict[str, Any]) -> tuple[Any, ...]:
    extra = {k: v for k, v in e.items() if k not in COLUMNS}
    return tuple(e.get(k) for k in COLUMNS) + (json.dumps(extra) if extra else None,)


def _migrate(path: Path) -> None:
    """A JSON ledger (format 1 or 2) becomes a SQLite ledger with every entry and plan.

    Under the lock the JSON ledger's writers took, so none of them can write in between; the JSON
    is kept as `<path>.v<N>.json.bak` (fsync'd) before the database replaces it.
    """
    with FileLock(str(path) + ".lock"):
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise LedgerError(f"{path}: cannot read the ledger ({exc.strerror})") from exc
        if raw.startswith(SQLITE_MAGIC):
            return  # another process migrated it while this one waited for the lock
        data, version = _read_json(path, raw)
        if os.path.lexists(f"{path}-wal"):
            raise _stale_wal(path)
        backup = path.with_name(f"{path.name}.v{version}.json.bak")
        if backup.exists() and backup.read_bytes() != raw:
            backup = path.with_name(f"{path.name}.v{version}.{datetime.now(timezone.utc):%Y%m%dT%H%M%S%f}.json.bak")
        atomic_write_bytes(backup, raw)
        meta = {"format": FORMAT, "node": str(data["node"]), "budget": float(data["budget"]),
                "delta": float(data["delta"]), "accountant": ACCOUNTANT, "created": str(data.get("created") or _now())}
        tmp = _build(path, meta, data["entries"], data["plans"])
        try:
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        fsync_path(path.parent)


def _read_json(path: Path, raw: bytes) -> tuple[dict[str, Any], str]:
    """A format 1 or 2 ledger as format 2 presents it, and its format's version number."""
    try:
        data = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: ledger file is corrupt ({exc.__class__.__name__}); "
                          "refusing to reset it — restore it from backup") from exc
    required = {"format", "node", "budget", "delta", "entries"}
    if (not isinstance(data, dict) or data.get("format") not in JSON_FORMATS or not required <= set(data)
            or not isinstance(data["entries"], list) or not isinstance(data.get("plans", {}), dict)):
        raise LedgerError(f"{path}: not a fedalloc ledger file")
    version = str(data["format"]).rsplit("/", 1)[-1]
    _upgrade(data)
    for i, e in enumerate(data["entries"]):
        try:
            _mechanism(e)
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{path}: ledger entry {i} is malformed") from exc
    return data, version


def _upgrade(data: dict[str, Any]) -> None:
    """A format-1 ledger did not record relations: its DP-SGD entries are re-accounted replace-one."""
    if data["format"] == JSON_FORMATS[-1]:
        data.setdefault("plans", {})
        return
    for e in data["entries"]:
        if isinstance(e, dict):
            e.setdefault("relation", REPLACE_ONE if e.get("kind") == DPSGD else ADD_REMOVE)
            e.setdefault("sensitivity", 1.0)
            e.setdefault("round", None)
    data.update(format=JSON_FORMATS[-1], accountant=ACCOUNTANT)
    data.setdefault("plans", {})


@functools.lru_cache(maxsize=4096)
def _row_mechanism(kind: Any, relation: Any, sigma: Any, q: Any, steps: Any, sensitivity: Any
                   ) -> tuple[Mechanism, EntryKey]:
    """An entry's columns as a checked Mechanism; a node's entries repeat few mechanisms."""
    m = Mechanism(float(sigma), float(q), int(steps), str(kind), str(relation), float(sensitivity))
    return m, entry_key(m)


def _mechanism(e: dict[str, Any]) -> Mechanism:
    return Mechanism(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]), str(e["kind"]),
                     str(e["relation"]), float(e.get("sensitivity", 1.0)))


def _ident(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _wal_ident(path: Path) -> tuple[int, int] | None:
    try:
        return _ident(Path(f"{path}-wal"))
    except FileNotFoundError:
        return None


def _stale_wal(path: Path) -> LedgerError:
    """SQLite finds a database's log by name: a ledger put at `path` would replay this one."""
    return LedgerError(f"{path}: no SQLite ledger here but a write-ahead log {path}-wal remains (a ledger deleted "
                       "while in use?); restore the ledger, or stop its processes and remove the log")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_marker(marker: Path, node: str) -> dict[str, Any] | None:
    if not marker.exists():
        return None
    try:
        known = json.loads(marker.read_text())
        return {"ledger": str(known["ledger"]), "created": str(known["created"]), "node": str(known["node"])}
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LedgerError(f"{marker}: ledger marker is corrupt; restore it (it says where node {node!r}'s "
                          "ledger lives)") from exc


def _write_marker(marker: Path, node: str, ledger: Path, created: str) -> None:
    try:
        atomic_write_bytes(marker, json.dumps({"node": node, "ledger": str(ledger), "created": created}).encode())
    except OSError as exc:
        raise LedgerError(f"{marker}: cannot write the ledger marker beside the node's records ({exc.strerror})") from exc
