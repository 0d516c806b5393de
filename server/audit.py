"""Audit of every message a coordinator receives (docs/DESIGN.md, "Threat model and what crosses the wire").

Keys: model arrays with exactly the global model's keys, shapes and dtypes; a MetricRecord whose
keys are public counts, privacy accounting or DP releases; the node's public name; error replies
with one of the fixed reasons. Values (when the audit knows the run's public plan): arrays finite
and within the plan's weight bound; `num-examples`, `sample-rate` and `steps` equal to what the
public date grid implies; σ the same in every reply of a node; ε finite, never decreasing and
growing by at most the run's ε; D_i and query answers finite, D_i equal to the sum of its groups
and inside its 80 % interval (0 ≤ lo ≤ median ≤ hi);
a node's name well-formed, stable and not claimed by another node. Violators are dropped before
any strategy sees them and the run reports them.

What an audit at the receiver cannot do: prove a value honest. A node can still send a wrong
number inside these checks (a D_i that is not its forecast); privacy is enforced at the node.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from core.protocol import DEMAND_HI, DEMAND_INTERVAL, DEMAND_LO, DEMAND_MEDIAN, ERRORS
from core.drg import DRG_GROUPS

PUBLIC_METRICS = {"num-examples", "epsilon", "noise-multiplier", "sample-rate", "steps", "release-noise"}
DP_RELEASES = {"demand"} | {f"demand-{g}" for g in DRG_GROUPS}
QUERY_RELEASE = re.compile(r"^query-answer-[0-9]{1,4}$")
NODE_KEYS = {"hospital"}
HOSPITAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,63}$")
SIGMA_RANGE = (0.3, 500.0)  # client/calibration.py's search range
ERROR_REASONS = {(code, reason) for code, reason in ERRORS.values()}


class AuditViolation(RuntimeError):
    pass


def _interval_problems(m: dict[str, Any]) -> list[str]:
    """D_i's interval (optional: older nodes do not send it): all three keys, 0 ≤ lo ≤ median ≤ hi,
    lo ≤ D ≤ hi (finiteness is checked for every metric). A crafted interval cannot leak more than
    any other value a node may send; this keeps a broken one out of the allocation."""
    present = [k for k in DEMAND_INTERVAL if k in m]
    if not present:
        return []
    if len(present) != len(DEMAND_INTERVAL):
        return [f"metric demand interval is incomplete (has {', '.join(present)})"]
    if "demand" not in m:
        return ["metric demand interval without demand"]
    lo, med, hi, d = (float(m[k]) for k in (DEMAND_LO, DEMAND_MEDIAN, DEMAND_HI, "demand"))
    if not 0.0 <= lo <= med <= hi:
        return ["metric demand interval is not 0 ≤ lo ≤ median ≤ hi"]
    if not lo <= d <= hi:
        return ["metric demand is outside its interval"]
    return []


@dataclass
class MessageAudit:
    """Checks replies; `violations` keeps (node id, what) for the run's report."""

    array_spec: dict[str, tuple[tuple[int, ...], str]]
    violations: list[tuple[int, str]] = field(default_factory=list)
    seen: int = 0
    # The run's public plan (server.app passes it): weight bound, examples, q, steps, run ε.
    plan: dict[str, float] | None = None
    names: dict[int, str] = field(default_factory=dict)
    # The run's catalogue decides which `demand-<group>` keys a D_i reply must carry (all of them).
    groups: tuple[str, ...] = DRG_GROUPS
    _sigma: dict[int, float] = field(default_factory=dict)
    _epsilon: dict[int, float] = field(default_factory=dict)

    @classmethod
    def for_arrays(cls, arrays: ArrayRecord, plan: dict[str, float] | None = None,
                   groups: tuple[str, ...] = DRG_GROUPS) -> "MessageAudit":
        spec = {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}
        return cls(spec, plan=plan, groups=tuple(groups))

    @property
    def releases(self) -> set[str]:
        return {"demand"} | {f"demand-{g}" for g in self.groups} | set(DEMAND_INTERVAL)

    def problems(self, msg: Message) -> list[str]:
        if msg.has_error():
            err = msg.error
            if (err.code, err.reason) not in ERROR_REASONS:
                return [f"error reply with non-standard reason (code {err.code})"]
            return []
        out: list[str] = []
        node = msg.metadata.src_node_id
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                out += self._check_arrays(name, record)
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    if key not in PUBLIC_METRICS | self.releases and not QUERY_RELEASE.match(key):
                        out.append(f"metric {name}.{key} is not on the allowlist")
                    elif isinstance(value, bool) or not isinstance(value, (int, float)):
                        out.append(f"metric {name}.{key} is not a scalar")
                    elif not math.isfinite(float(value)):
                        out.append(f"metric {name}.{key} is not finite")
                if not out:
                    out += self._check_metrics(node, dict(record))
            elif isinstance(record, ConfigRecord):
                for key, value in record.items():
                    if name != "node" or key not in NODE_KEYS or not isinstance(value, str):
                        out.append(f"config {name}.{key} is not on the allowlist")
                    else:
                        out += self._check_name(node, value)
            else:
                out.append(f"record {name} of type {type(record).__name__} is not allowed")
        return out

    def _check_name(self, node: int, name: str) -> list[str]:
        if not HOSPITAL_NAME.match(name):
            return ["config node.hospital is not a well-formed hospital name"]
        if self.names.get(node, name) != name:
            return [f"node changed its name from {self.names[node]!r}"]
        if any(other == name and n != node for n, other in self.names.items()):
            return [f"hospital name {name!r} is already used by another node"]
        self.names[node] = name
        return []

    def _check_metrics(self, node: int, m: dict[str, Any]) -> list[str]:
        out: list[str] = []
        plan = self.plan or {}
        public = {"num-examples": plan.get("examples"), "sample-rate": plan.get("sample_rate"), "steps": plan.get("steps")}
        for key, expected in public.items():
            if key in m and expected is not None and abs(float(m[key]) - expected) > 1e-9 * max(1.0, abs(expected)):
                out.append(f"metric {key} = {m[key]} differs from the public plan ({expected})")
        if "noise-multiplier" in m:
            sigma = float(m["noise-multiplier"])
            if not SIGMA_RANGE[0] <= sigma <= SIGMA_RANGE[1]:
                out.append("metric noise-multiplier is outside the calibration range")
            elif self._sigma.setdefault(node, sigma) != sigma:
                out.append("metric noise-multiplier changed within the run")
        if "epsilon" in m:
            eps, before = float(m["epsilon"]), self._epsilon.get(node)
            if eps < 0 or (before is not None and eps < before - 1e-9):
                out.append("metric epsilon decreased or is negative")
            elif before is not None and "run_epsilon" in plan and eps - before > plan["run_epsilon"] + 1e-6:
                out.append("metric epsilon grew by more than the run's ε")
            else:
                self._epsilon[node] = eps
        out += _interval_problems(m)
        if "demand" in m:
            groups = [float(v) for k, v in m.items() if k.startswith("demand-") and k not in DEMAND_INTERVAL]
            if len(groups) != len(self.groups):
                # A node on another catalogue must fail loudly, not be misaligned column by column.
                out.append(f"metric demand has {len(groups)} groups, the run's catalogue {len(self.groups)}")
            if float(m["demand"]) < 0 or min(groups, default=0.0) < 0:
                out.append("metric demand is negative")
            elif groups and abs(sum(groups) - float(m["demand"])) > 1e-6 * max(1.0, float(m["demand"])):
                out.append("metric demand is not the sum of its groups")
        return out

    def _check_arrays(self, name: str, record: ArrayRecord) -> list[str]:
        if name != "arrays":
            return [f"array record {name!r} is not allowed"]
        if set(record.keys()) != set(self.array_spec):
            return ["model arrays do not match the global model's keys"]
        bad = [k for k, a in record.items() if (tuple(a.shape), str(a.dtype)) != self.array_spec[k]]
        if bad:
            return [f"array {k} has the wrong shape or dtype" for k in bad]
        bound = (self.plan or {}).get("weight_bound")
        out = []
        for k, a in record.items():
            values = a.numpy()
            if values.size and not np.isfinite(values).all():
                out.append(f"array {k} is not finite")
            elif bound is not None and values.size and float(np.abs(values).max()) > bound:
                out.append(f"array {k} exceeds the plan's weight bound {bound}")
        return out

    def filter(self, replies: Iterable[Message]) -> list[Message]:
        kept = []
        for msg in replies:
            self.seen += 1
            found = self.problems(msg)
            if found:
                self.violations += [(msg.metadata.src_node_id, p) for p in found]
            else:
                kept.append(msg)
        return kept


class AuditingGrid(Grid):
    """Wraps the Grid a ServerApp is given so every reply passes the audit first."""

    def __init__(self, inner: Grid, audit: MessageAudit) -> None:
        self.inner = inner
        self.audit = audit

    def set_run(self, run: Run) -> None:
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        return self.inner.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.audit.filter(self.inner.pull_messages(message_ids))

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.audit.filter(self.inner.send_and_receive(messages, timeout=timeout))
