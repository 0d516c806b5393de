"""A node's persistent, lifetime privacy ledger.

Every mechanism the node runs is one entry: noise multiplier σ, sample rate q, steps, the
neighbouring relation of its input and the L2 sensitivity of one record (client/accounting.py).
ε is the composition of the whole history with dp_accounting's privacy-loss distributions, so anyone
holding `fedalloc ledger show --json` can recompute it with another accountant. A charge composes
its mechanism onto the composed state of the history before it (kept in memory, and saved beside
the ledger as `<ledger>.pld-state.npz` by a process that started cold), not the whole history.

Durability: a charge is written (temp file + fsync + rename + directory fsync) under an exclusive
file lock *before* the work it pays for is done or sent, so a crash can waste budget but never
under-record it. A corrupt ledger, one of another node, or a missing one that existed before is an
error, never a reset: the node refuses to work (docs/DESIGN.md, "Ledger").

A ledger also holds one *plan* per run (σ, q, steps, rounds, ε), written at the run's first
request: later requests of that run must match it, so a coordinator cannot change a run's noise
or stretch it past its planned rounds.
"""

from __future__ import annotations

import contextlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from core.atomic import atomic_write_bytes
from client.accounting import (ADD_REMOVE, DPSGD, REPLACE_ONE, Mechanism, MechanismLike, epsilon, has_state,
                               history_key, load_state, save_state)

FORMAT = "fedalloc-ledger/2"
READABLE = ("fedalloc-ledger/1", FORMAT)
ACCOUNTANT = "pld"

__all__ = ["Ledger", "LedgerError", "BudgetExceeded", "Mechanism", "compute_epsilon"]


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
    """One node's ledger file. Create or open with `Ledger.open(path, node=…, budget=…, delta=…)`."""

    def __init__(self, path: Path, data: dict[str, Any], limit: float | None = None) -> None:
        self.path = path
        self._data = data
        # A node config may lower (never raise) the lifetime budget recorded in the file.
        self._limit = limit
        self._state_tried = False  # looked for the saved composed state (client/accounting.py)

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
        with _lock(path):
            known = _read_marker(marker_path, node) if marker_path else None
            if known is not None and Path(known["ledger"]) != path:
                raise LedgerError(f"node {node!r} keeps its ledger at {known['ledger']}, not {path}; "
                                  "point ledger-path there (a node has one lifetime ledger)")
            if not path.exists():
                if known is not None:
                    raise LedgerError(
                        f"{path}: ledger missing; node {node!r} has had one since {known['created']}. "
                        "Restore it from backup (see docs/DESIGN.md, 'Ledger recovery'); it is never restarted at 0")
                data = _new(node, 3.0 if budget is None else float(budget), delta)
                if marker_path:
                    _write_marker(marker_path, node, path, data["created"])
                path.parent.mkdir(parents=True, exist_ok=True)
                _atomic_write(path, data)
            data = _read(path)
            if data["node"] != node:
                raise LedgerError(f"{path}: ledger belongs to node {data['node']!r}, not {node!r}")
            if marker_path and known is None:
                _write_marker(marker_path, node, path, str(data.get("created", _now())))
        if float(data["delta"]) != float(delta):
            raise LedgerError(f"{path}: ledger was created with delta={data['delta']}; node config asks delta={delta}")
        if budget is not None and float(budget) > float(data["budget"]):
            raise LedgerError(
                f"{path}: node config budget {budget} exceeds the lifetime budget "
                f"{data['budget']} recorded in the ledger; a lifetime budget cannot grow")
        return cls(path, data, limit=None if budget is None else min(float(budget), float(data["budget"])))

    @classmethod
    def read(cls, path: str | Path) -> "Ledger":
        """Open an existing ledger for inspection only."""
        path = Path(path)
        if not path.exists():
            raise LedgerError(f"{path}: no such ledger file")
        return cls(path, _read(path))

    # -- queries --------------------------------------------------------------------------
    @property
    def node(self) -> str:
        return str(self._data["node"])

    @property
    def budget(self) -> float:
        recorded = float(self._data["budget"])
        return recorded if self._limit is None else min(recorded, self._limit)

    @property
    def delta(self) -> float:
        return float(self._data["delta"])

    @property
    def accountant(self) -> str:
        return ACCOUNTANT

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"]]

    def mechanisms(self) -> list[Mechanism]:
        return [_mechanism(e) for e in self._data["entries"]]

    def history(self) -> list[tuple[float, float, int]]:
        """(σ, q, steps) of every entry; use `mechanisms()` for the relation and kind too."""
        return [(m.noise_multiplier, m.sample_rate, m.steps) for m in self.mechanisms()]

    def epsilon(self, extra: list[Mechanism] | None = None) -> float:
        self._warm_state()
        return epsilon(self.mechanisms() + list(extra or []), self.delta)

    @property
    def state_path(self) -> Path:
        """The composed privacy-loss state of this ledger's history (a cache; client/accounting.py)."""
        return self.path.with_name(self.path.name + ".pld-state.npz")

    def _warm_state(self) -> bool:
        """True if the history's composed state was already in memory (a long-lived process).

        Otherwise (a fresh process: deployment runs one per message) start from the state the
        last charge saved, so the next charge composes one mechanism instead of the history.
        """
        keys = history_key(self.mechanisms())
        if not keys or has_state(keys):
            return True
        if not self._state_tried:
            self._state_tried = True
            load_state(self.state_path, keys)
        return False

    def remaining(self) -> float:
        return max(self.budget - self.epsilon(), 0.0)

    def run_entries(self, run: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"] if e.get("run") == run]

    def charged(self, run: str, kind: str, round_: int | None = None) -> bool:
        return any(e.get("run") == run and e["kind"] == kind and e.get("round") == round_
                   for e in self._data["entries"])

    def plan(self, run: str) -> dict[str, Any] | None:
        plan = self._data.get("plans", {}).get(run)
        return dict(plan) if plan is not None else None

    # -- writing --------------------------------------------------------------------------
    def set_plan(self, run: str, plan: dict[str, Any]) -> dict[str, Any]:
        """Record `plan` for `run` unless one exists; return the plan in force (first wins)."""
        with _lock(self.path):
            self._data = _read(self.path)
            plans = self._data.setdefault("plans", {})
            if run not in plans:
                plans[run] = dict(plan)
                _atomic_write(self.path, self._data)
            return dict(plans[run])

    def charge(self, mechanisms: list[Mechanism], *, run: str, purpose: str, round_: int | None = None,
               run_id: str = "") -> float:
        """Record `mechanisms` durably, then return the new ε. Refuse if it would exceed budget.

        Re-reads the file under an exclusive lock so two processes of one node (deployment
        runs one process per message) cannot both spend the same remaining budget.
        """
        with _lock(self.path):
            self._data = _read(self.path)
            self._state_tried = False  # the file may have moved on since this handle last looked
            warm = self._warm_state()
            eps_after = self.epsilon(mechanisms)
            if eps_after > self.budget:
                raise BudgetExceeded(
                    f"{purpose} would bring ε to {eps_after:.3f} > lifetime budget "
                    f"{self.budget:.3f} (spent {self.epsilon():.3f})")
            stamp = _now()
            for m in mechanisms:
                self._data["entries"].append({
                    "run": run,
                    "run_id": run_id,
                    "round": round_,
                    "purpose": purpose,
                    "kind": m.kind,
                    "relation": m.relation,
                    "noise_multiplier": float(m.noise_multiplier),
                    "sample_rate": float(m.sample_rate),
                    "steps": int(m.steps),
                    "sensitivity": float(m.sensitivity),
                    "epsilon_after": eps_after,
                    "time": stamp,
                })
            _atomic_write(self.path, self._data)
            if not warm:
                # This process started cold: leave the state for the next one (a cache, so a
                # failure to write it never fails the charge, which is already on disk).
                with contextlib.suppress(Exception):
                    save_state(self.state_path, history_key(self.mechanisms()))
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
            "plans": dict(self._data.get("plans", {})),
        }


def _mechanism(e: dict[str, Any]) -> Mechanism:
    return Mechanism(float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]), str(e["kind"]),
                     str(e["relation"]), float(e.get("sensitivity", 1.0)))


def _new(node: str, budget: float, delta: float) -> dict[str, Any]:
    return {"format": FORMAT, "node": node, "budget": budget, "delta": float(delta), "accountant": ACCOUNTANT,
            "created": _now(), "entries": [], "plans": {}}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: ledger file is corrupt ({exc.__class__.__name__}); "
                          "refusing to reset it — restore it from backup") from exc
    required = {"format", "node", "budget", "delta", "entries"}
    if not isinstance(data, dict) or data.get("format") not in READABLE or not required <= set(data):
        raise LedgerError(f"{path}: not a fedalloc ledger file")
    if data["format"] != FORMAT:
        _upgrade(data)
    for i, e in enumerate(data["entries"]):
        try:
            _mechanism(e)
        except (KeyError, TypeError, ValueError) as exc:
            raise LedgerError(f"{path}: ledger entry {i} is malformed") from exc
    return data


def _upgrade(data: dict[str, Any]) -> None:
    """A format-1 ledger did not record relations: its DP-SGD entries are re-accounted replace-one."""
    for e in data["entries"]:
        if isinstance(e, dict):
            e.setdefault("relation", REPLACE_ONE if e.get("kind") == DPSGD else ADD_REMOVE)
            e.setdefault("sensitivity", 1.0)
            e.setdefault("round", None)
    data.update(format=FORMAT, accountant=ACCOUNTANT)
    data.setdefault("plans", {})


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


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    atomic_write_bytes(path, json.dumps(data, indent=1).encode())
