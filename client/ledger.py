"""A node's persistent privacy ledger.

Every mechanism the node runs is one entry (noise multiplier σ, sample rate q, steps): DP-SGD
rounds are subsampled Gaussians, a Gaussian release is (σ, 1.0, 1). ε is always recomputed from
the whole history with one Opacus accountant, so heterogeneous mechanisms compose correctly and
anyone holding the history can recompute it with another accountant.

The charge is written (temp file + fsync + rename + directory fsync) *before* the work it pays
for is done or sent, so a crash can waste budget but never under-record it.
"""

from __future__ import annotations

import contextlib
import functools
import fcntl
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

FORMAT = "fedalloc-ledger/1"
ACCOUNTANTS = ("rdp", "prv")
# Opacus's default RDP orders stop at 63; strongly noised single releases need larger orders
# for a tight bound, so the ledger always uses this extended (fixed, recorded) set.
RDP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 257, 4)) + [320, 512, 1024]


class LedgerError(RuntimeError):
    """The ledger file is unusable (corrupt, or belongs to another node). Never reset silently."""


class BudgetExceeded(RuntimeError):
    """Running the requested mechanism would push ε past the node's lifetime budget."""


@dataclass(frozen=True)
class Mechanism:
    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: str = "dpsgd"

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def compute_epsilon(
    history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp"
) -> float:
    """ε after composing every (σ, q, steps) in `history`, via Opacus's accountant."""
    if not history:
        return 0.0
    key = tuple((float(s), float(q), int(n)) for s, q, n in history)
    return _epsilon_cached(key, float(delta), accountant)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    # Calibration evaluates the same histories many times; the accountant is pure, so cache it.
    from opacus.accountants import PRVAccountant, RDPAccountant

    if accountant == "rdp":
        acc = RDPAccountant()
        acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
        with warnings.catch_warnings():
            # At the largest order the bound is merely loose (conservative), never optimistic.
            warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
            return float(acc.get_epsilon(delta=delta, alphas=RDP_ORDERS))
    acc = PRVAccountant()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    return float(acc.get_epsilon(delta=delta))


class Ledger:
    """One node's ledger file. Create with `Ledger.open(path, node=…, budget=…, delta=…)`."""

    def __init__(self, path: Path, data: dict[str, Any], limit: float | None = None) -> None:
        self.path = path
        self._data = data
        # A node config may lower (never raise) the lifetime budget recorded in the file.
        self._limit = limit

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        node: str,
        budget: float,
        delta: float,
        accountant: str = "rdp",
    ) -> "Ledger":
        """Read the ledger at `path`, or create it if the file does not exist.

        A file that exists but cannot be parsed, or that names another node, raises LedgerError:
        replacing it would erase spent budget.
        """
        path = Path(path)
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
        if not budget > 0:
            raise ValueError(f"budget must be positive, got {budget}")
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if path.exists():
            data = _read(path)
            if data["node"] != node:
                raise LedgerError(
                    f"{path}: ledger belongs to node {data['node']!r}, not {node!r}"
                )
            if float(data["delta"]) != float(delta) or data["accountant"] != accountant:
                raise LedgerError(
                    f"{path}: ledger was created with delta={data['delta']} "
                    f"accountant={data['accountant']}; node config asks delta={delta} "
                    f"accountant={accountant}"
                )
            if float(budget) > float(data["budget"]):
                raise LedgerError(
                    f"{path}: node config budget {budget} exceeds the lifetime budget "
                    f"{data['budget']} recorded in the ledger; a lifetime budget cannot grow"
                )
            return cls(path, data, limit=min(float(budget), float(data["budget"])))
        data = {
            "format": FORMAT,
            "node": node,
            "budget": float(budget),
            "delta": float(delta),
            "accountant": accountant,
            "created": _now(),
            "entries": [],
        }
        ledger = cls(path, data)
        path.parent.mkdir(parents=True, exist_ok=True)
        with ledger._locked():
            if not path.exists():
                _atomic_write(path, data)
        return cls(path, _read(path))

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
        return str(self._data["accountant"])

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"]]

    def history(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self._data["entries"]]

    def epsilon(self, extra: list[Mechanism] | None = None) -> float:
        hist = self.history() + [m.as_tuple() for m in (extra or [])]
        return compute_epsilon(hist, self.delta, self.accountant)

    def remaining(self) -> float:
        return max(self.budget - self.epsilon(), 0.0)

    def run_entries(self, run: str) -> list[dict[str, Any]]:
        return [dict(e) for e in self._data["entries"] if e.get("run") == run]

    # -- charging -------------------------------------------------------------------------
    def charge(self, mechanisms: list[Mechanism], *, run: str, purpose: str) -> float:
        """Record `mechanisms` durably, then return the new ε. Refuse if it would exceed budget.

        Re-reads the file under an exclusive lock so two processes of one node (deployment
        runs one process per message) cannot both spend the same remaining budget.
        """
        for m in mechanisms:
            if not (m.noise_multiplier > 0 and 0 < m.sample_rate <= 1 and m.steps >= 1):
                raise ValueError(f"invalid mechanism {m}")
        with self._locked():
            self._data = _read(self.path)
            eps_after = self.epsilon(mechanisms)
            if eps_after > self.budget:
                raise BudgetExceeded(
                    f"{purpose} would bring ε to {eps_after:.3f} > lifetime budget "
                    f"{self.budget:.3f} (spent {self.epsilon():.3f})"
                )
            stamp = _now()
            for m in mechanisms:
                self._data["entries"].append(
                    {
                        "run": run,
                        "purpose": purpose,
                        "kind": m.kind,
                        "noise_multiplier": float(m.noise_multiplier),
                        "sample_rate": float(m.sample_rate),
                        "steps": int(m.steps),
                        "epsilon_after": eps_after,
                        "time": stamp,
                    }
                )
            _atomic_write(self.path, self._data)
        return eps_after

    def summary(self) -> dict[str, Any]:
        """The public, recomputable view printed by `fedalloc ledger show --json`."""
        return {
            "node": self.node,
            "budget": self.budget,
            "delta": self.delta,
            "accountant": self.accountant,
            "epsilon_spent": self.epsilon(),
            "history": [
                {
                    "noise_multiplier": e["noise_multiplier"],
                    "sample_rate": e["sample_rate"],
                    "steps": e["steps"],
                    "kind": e["kind"],
                    "run": e["run"],
                    "purpose": e["purpose"],
                }
                for e in self._data["entries"]
            ],
        }

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LedgerError(f"{path}: ledger file is corrupt ({exc.__class__.__name__}); "
                          "refusing to reset it — restore it from backup") from exc
    required = {"format", "node", "budget", "delta", "accountant", "entries"}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not required <= set(data):
        raise LedgerError(f"{path}: not a {FORMAT} ledger file")
    for i, e in enumerate(data["entries"]):
        try:
            ok = float(e["noise_multiplier"]) > 0 and 0 < float(e["sample_rate"]) <= 1 and int(e["steps"]) >= 1
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise LedgerError(f"{path}: ledger entry {i} is malformed")
    return data


def _atomic_write(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
