"""Audit of every message a coordinator receives, against DESIGN.md's allowlist.

Allowed: model arrays with exactly the global model's keys, shapes and dtypes; a MetricRecord
whose keys are public counts, privacy accounting or DP releases; the node's public name; and
error replies with one of the node's fixed reasons. Anything else is a violation: the message is
dropped before any strategy sees it and the run reports it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from client.app import ERRORS
from core.drg import DRG_GROUPS

PUBLIC_METRICS = {"num-examples", "epsilon", "noise-multiplier", "sample-rate", "steps", "release-noise"}
DP_RELEASES = {"demand"} | {f"demand-{g}" for g in DRG_GROUPS}
QUERY_RELEASE = re.compile(r"^query-answer-[0-9]{1,4}$")
NODE_KEYS = {"hospital"}
ERROR_REASONS = {(code, reason) for code, reason in ERRORS.values()}


class AuditViolation(RuntimeError):
    pass


@dataclass
class MessageAudit:
    """Checks replies; `violations` keeps (node id, what) for the run's report."""

    array_spec: dict[str, tuple[tuple[int, ...], str]]
    violations: list[tuple[int, str]] = field(default_factory=list)
    seen: int = 0

    @classmethod
    def for_arrays(cls, arrays: ArrayRecord) -> "MessageAudit":
        spec = {k: (tuple(a.shape), str(a.dtype)) for k, a in arrays.items()}
        return cls(spec)

    def problems(self, msg: Message) -> list[str]:
        if msg.has_error():
            err = msg.error
            if (err.code, err.reason) not in ERROR_REASONS:
                return [f"error reply with non-standard reason (code {err.code})"]
            return []
        out: list[str] = []
        for name, record in msg.content.items():
            if isinstance(record, ArrayRecord):
                out += self._check_arrays(name, record)
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    if key not in PUBLIC_METRICS | DP_RELEASES and not QUERY_RELEASE.match(key):
                        out.append(f"metric {name}.{key} is not on the allowlist")
                    elif not isinstance(value, (int, float)):
                        out.append(f"metric {name}.{key} is not a scalar")
            elif isinstance(record, ConfigRecord):
                for key, value in record.items():
                    if name != "node" or key not in NODE_KEYS or not isinstance(value, str) or len(value) > 64:
                        out.append(f"config {name}.{key} is not on the allowlist")
            else:
                out.append(f"record {name} of type {type(record).__name__} is not allowed")
        return out

    def _check_arrays(self, name: str, record: ArrayRecord) -> list[str]:
        if name != "arrays":
            return [f"array record {name!r} is not allowed"]
        if set(record.keys()) != set(self.array_spec):
            return ["model arrays do not match the global model's keys"]
        bad = [k for k, a in record.items() if (tuple(a.shape), str(a.dtype)) != self.array_spec[k]]
        return [f"array {k} has the wrong shape or dtype" for k in bad]

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
