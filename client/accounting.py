"""Privacy accounting under the record-level relation, with Google's dp_accounting PLDs.

The privacy unit is one encounter record (docs/DESIGN.md, "Privacy unit"). What one record does to
each mechanism's *input* decides how that mechanism is accounted:

- DP-SGD: the number of training examples is fixed by the public date grid, so adding or removing
  a record never adds or removes an example; it *changes* one. Under Poisson subsampling that is
  the replace-one relation (`REPLACE_ONE`), whose loss is larger than the add/remove loss Opacus's
  accountants assume (Lebeda et al. 2024). Sensitivity: the clipped gradient moves from g to g'
  with ‖g‖, ‖g'‖ ≤ C, which dp_accounting models as shifts of ±C, i.e. `sensitivity=1` in units
  of the noise std σ·C.
- Gaussian releases (D_i, queries): adding or removing one record moves the released vector by at
  most its L2 sensitivity Δ, noise std σ·Δ: add/remove, q = 1.

ε of a history is the composition of its entries *in ledger order*: the node keeps the composed
privacy-loss distribution (PLD) of every prefix it has seen (content-addressed, shared by every
node of a simulation process with the same history), so a charge composes one mechanism onto the
stored state instead of recomputing the whole history. Calibration plans with the same fold (one
entry per round, then the release), so what is planned is bit for bit what the charges will cost.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import math
import os
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

REPLACE_ONE = "replace_one"
ADD_REMOVE = "add_remove"
RELATIONS = (REPLACE_ONE, ADD_REMOVE)
DPSGD = "dpsgd"
# A pessimistic discretisation: always an upper bound on ε; 1e-3 is within 1e-5 relative of 1e-4
# on the default run (4.96451 vs 4.96447) at a tenth of the cost.
DISCRETISATION = 1e-3


@dataclass(frozen=True)
class Mechanism:
    """One accounted mechanism: `steps` compositions of a Gaussian with noise multiplier σ.

    `relation` is the neighbouring relation of the mechanism's input under one added/removed
    record. By default DP-SGD entries are replace-one and every other kind add/remove.
    `sensitivity` is the L2 sensitivity of one record in the data's units (noise std is
    σ·sensitivity); it is recorded for auditors, the accountant works in units of it.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    kind: str = DPSGD
    relation: str = ""
    sensitivity: float = 1.0

    def __post_init__(self) -> None:
        if not self.relation:
            object.__setattr__(self, "relation", REPLACE_ONE if self.kind == DPSGD else ADD_REMOVE)
        if self.relation not in RELATIONS:
            raise ValueError(f"relation must be one of {RELATIONS}, got {self.relation!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0
                and 0 < self.sample_rate <= 1 and int(self.steps) >= 1 and self.sensitivity > 0):
            raise ValueError(f"invalid mechanism {self}")

    def as_tuple(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def key(self) -> tuple[float, float, str]:
        return (float(self.noise_multiplier), float(self.sample_rate), self.relation)


MechanismLike = Mechanism | tuple[float, float, int]


def as_mechanism(m: MechanismLike) -> Mechanism:
    """Tuples (σ, q, steps) are DP-SGD entries, accounted replace-one (the conservative choice)."""
    return m if isinstance(m, Mechanism) else Mechanism(float(m[0]), float(m[1]), int(m[2]))


EntryKey = tuple[float, float, str, int]  # (σ, q, relation, steps): all the accountant needs


def entry_key(m: MechanismLike) -> EntryKey:
    m = as_mechanism(m)
    return (float(m.noise_multiplier), float(m.sample_rate), m.relation, int(m.steps))


def history_key(history: Iterable[MechanismLike]) -> tuple[EntryKey, ...]:
    return tuple(map(entry_key, history))


def grouped(history: Iterable[MechanismLike]) -> tuple[tuple[float, float, str, int], ...]:
    """The history as sorted (σ, q, relation, total steps); kept for readers of old results."""
    steps: dict[tuple[float, float, str], int] = {}
    for s, q, r, n in history_key(history):
        steps[(s, q, r)] = steps.get((s, q, r), 0) + n
    return tuple(sorted((s, q, r, n) for (s, q, r), n in steps.items()))


def epsilon(history: Sequence[MechanismLike], delta: float) -> float:
    """ε at `delta` of the composition of every mechanism in `history` (0 for an empty one)."""
    return epsilon_of_keys(history_key(history), delta)


def epsilon_of_keys(keys: tuple[EntryKey, ...], delta: float) -> float:
    """`epsilon` of a history given as entry keys (σ, q, relation, steps), in ledger order."""
    if not keys:
        return 0.0
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return _epsilon(keys, float(delta))


@functools.lru_cache(maxsize=65536)
def _epsilon(keys: tuple[EntryKey, ...], delta: float) -> float:
    return float(composed(keys).get_epsilon_for_delta(delta))


# Composed PLD of each history prefix seen, most recently used last. A prefix is its own key
# (no hash digest): two different histories can never share a state. A PLD is ~0.2-1 MB, so the
# store is bounded; an evicted state is rebuilt from the longest stored prefix.
_STATES: "OrderedDict[tuple[EntryKey, ...], Any]" = OrderedDict()
_STATES_LOCK = threading.Lock()
MAX_STATE_BYTES = 512 * 2**20
_state_bytes = 0


def composed(keys: tuple[EntryKey, ...]) -> Any:
    """PLD of the entries `keys` composed left to right, reusing the longest stored prefix.

    A node charging entry n+1 finds the state of its first n entries and composes one mechanism.
    """
    if not keys:
        raise ValueError("an empty history has no privacy-loss distribution")
    k, state = len(keys), None
    with _STATES_LOCK:
        while k > 0:
            state = _STATES.get(keys[:k])
            if state is not None:
                _STATES.move_to_end(keys[:k])
                break
            k -= 1
    for i in range(k, len(keys)):
        one = entry_pld(*keys[i])
        state = one if state is None else state.compose(one)
        _remember(keys[: i + 1], state)
    return state


def _remember(prefix: tuple[EntryKey, ...], state: Any) -> None:
    global _state_bytes
    with _STATES_LOCK:
        if prefix not in _STATES:
            _state_bytes += _nbytes(state)
        _STATES[prefix] = state
        _STATES.move_to_end(prefix)
        while _state_bytes > MAX_STATE_BYTES and len(_STATES) > 1:
            _state_bytes -= _nbytes(_STATES.popitem(last=False)[1])


def _nbytes(pld: Any) -> int:
    pmfs = {id(p): p for p in (getattr(pld, "_pmf_remove", None), getattr(pld, "_pmf_add", None)) if p is not None}
    return sum(getattr(getattr(p, "_probs", None), "nbytes", 4096) for p in pmfs.values()) or 4096


def clear_caches() -> None:
    """Forget every stored state (benchmarks measuring cold costs; tests)."""
    global _state_bytes
    with _STATES_LOCK:
        _STATES.clear()
        _state_bytes = 0
    _epsilon.cache_clear()
    entry_pld.cache_clear()


# Calibration tries ~25 σ per plan; each PLD is up to ~1 MB, hence a small cache.
@functools.lru_cache(maxsize=256)
def entry_pld(sigma: float, q: float, relation: str, steps: int) -> Any:
    """PLD of one ledger entry: `steps` self-compositions of a (subsampled) Gaussian."""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld

    rel = (dp_accounting.NeighboringRelation.REPLACE_ONE if relation == REPLACE_ONE
           else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE)
    single = pld.from_gaussian_mechanism(
        sigma, sensitivity=1.0, sampling_prob=q, neighboring_relation=rel,
        value_discretization_interval=DISCRETISATION, pessimistic_estimate=True)
    return single.self_compose(steps) if steps > 1 else single


# -- the composed state on disk, beside a node's ledger ------------------------------------------
# A deployed node handles every message in a fresh process, where the in-memory store above is
# empty. The ledger saves its composed state after each charge, so the next process composes one
# mechanism onto it instead of folding the whole history. It is a cache, not a record: it is used
# only if the entry keys it was composed from are exactly a prefix of the ledger's history, and a
# missing, torn or stale file is ignored (the history is folded again from the ledger entries).
STATE_FORMAT = "fedalloc-pld-state/1"


def has_state(keys: tuple[EntryKey, ...]) -> bool:
    with _STATES_LOCK:
        return keys in _STATES


def save_state(path: Path, keys: tuple[EntryKey, ...]) -> None:
    """Write the composed PLD of `keys` to `path` (temp file + rename; no fsync: a cache)."""
    state = composed(keys)
    arrays: dict[str, np.ndarray] = {}
    pmfs = [("remove", state._pmf_remove)] + ([] if state._symmetric else [("add", state._pmf_add)])
    meta: dict[str, Any] = {"format": STATE_FORMAT, "discretisation": DISCRETISATION,
                            "keys": [list(k) for k in keys], "pmfs": []}
    for name, pmf in pmfs:
        meta["pmfs"].append(_pmf_meta(name, pmf, arrays))
    buf = io.BytesIO()
    np.savez(buf, __meta__=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8), **arrays)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        tmp.write_bytes(buf.getvalue())
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def load_state(path: Path, keys: tuple[EntryKey, ...]) -> bool:
    """Store the state saved at `path` if it was composed from a prefix of `keys`; True if so."""
    try:
        with np.load(path) as data:
            meta = json.loads(data["__meta__"].tobytes().decode())
            stored = tuple((float(s), float(q), str(r), int(n)) for s, q, r, n in meta["keys"])
            if (meta.get("format") != STATE_FORMAT or meta.get("discretisation") != DISCRETISATION
                    or not stored or stored != keys[: len(stored)]):
                return False
            pmfs = {m["name"]: _pmf_from(m, data) for m in meta["pmfs"]}
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return False
    from dp_accounting.pld import privacy_loss_distribution as pld

    _remember(stored, pld.PrivacyLossDistribution(pmfs["remove"], pmfs.get("add")))
    return True


def _pmf_meta(name: str, pmf: Any, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    from dp_accounting.pld import pld_pmf

    meta = {"name": name, "discretization": pmf._discretization, "infinity_mass": pmf._infinity_mass,
            "pessimistic": bool(pmf._pessimistic_estimate)}
    if isinstance(pmf, pld_pmf.DensePLDPmf):
        arrays[f"{name}_probs"] = np.asarray(pmf._probs, dtype=np.float64)
        return {**meta, "kind": "dense", "lower_loss": int(pmf._lower_loss)}
    losses = sorted(pmf._loss_probs)
    arrays[f"{name}_losses"] = np.asarray(losses, dtype=np.int64)
    arrays[f"{name}_probs"] = np.asarray([pmf._loss_probs[k] for k in losses], dtype=np.float64)
    return {**meta, "kind": "sparse"}


def _pmf_from(meta: dict[str, Any], data: Any) -> Any:
    from dp_accounting.pld import pld_pmf

    name, probs = meta["name"], data[f"{meta['name']}_probs"]
    if meta["kind"] == "dense":
        return pld_pmf.DensePLDPmf(float(meta["discretization"]), int(meta["lower_loss"]), probs,
                                   float(meta["infinity_mass"]), bool(meta["pessimistic"]))
    losses = data[f"{name}_losses"]
    return pld_pmf.SparsePLDPmf({int(k): float(v) for k, v in zip(losses, probs)}, float(meta["discretization"]),
                                float(meta["infinity_mass"]), bool(meta["pessimistic"]))
