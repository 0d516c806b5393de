"""The coordinator side of federated analytics queries (see core/queries.py for the semantics).

`run_query` sends one `query.analytics` message per node, audits every reply (the same allowlist
as training: only `query-answer-<i>`, `release-noise`, `epsilon` and the node's public name may
come back), sums the noisy answers and reports estimates with confidence intervals. Nodes that
refuse (budget exhausted, invalid records, ...) or do not reply are listed, never silently
dropped: an estimate from fewer hospitals is an estimate of a different population.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from core.queries import Estimate, QuerySpec, combine
from server.audit import AuditingGrid, MessageAudit

log = logging.getLogger("fedalloc.coordinator")

MESSAGE_TYPE = "query.analytics"


@dataclass
class QueryResult:
    """Estimates per bin plus who answered; `violations` are replies the audit dropped."""

    spec: QuerySpec
    estimate: Estimate
    answered: list[str] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    noise: dict[str, float] = field(default_factory=dict)
    violations: list[tuple[int, str]] = field(default_factory=list)

    @property
    def n_answered(self) -> int:
        return len(self.answered)

    def table(self) -> pd.DataFrame:
        """One row per bin: label, estimate, noise std, interval (plus the noisy count for a mean)."""
        e = self.estimate
        df = pd.DataFrame(
            {"bin": e.labels, "estimate": e.estimate, "noise_std": e.std, "ci_low": e.low, "ci_high": e.high}
        )
        if e.noisy_count is not None:
            df["noisy_count"] = e.noisy_count
        return df

    def to_dict(self) -> dict[str, Any]:
        def num(x: float) -> float | None:
            return None if not math.isfinite(float(x)) else float(x)

        return {
            "query": self.spec.to_dict(),
            "interval": self.estimate.interval,
            "level": self.estimate.level,
            "bins": [{k: (num(v) if not isinstance(v, str) else v) for k, v in row.items()}
                     for row in self.table().to_dict(orient="records")],
            "answered": self.answered,
            "refused": [{"node": n, "reason": r} for n, r in self.refused],
            "epsilon_per_node": self.epsilon,
            "release_noise_per_node": self.noise,
            "audit_violations": [{"node": n, "problem": p} for n, p in self.violations],
        }


def query_messages(grid: Grid, spec: QuerySpec) -> list[Message]:
    config = ConfigRecord(spec.to_config())
    return [
        Message(RecordDict({"query": config}), dst_node_id=n, message_type=MESSAGE_TYPE, group_id="analytics")
        for n in sorted(grid.get_node_ids())
    ]


def run_query(
    grid: Grid, spec: QuerySpec, timeout: float | None = 600.0, level: float = 0.95, mean_interval: str = "conservative"
) -> QueryResult:
    """Ask every node for `spec`, combine the noisy answers; never raises for a refusing node.

    Intervals: see :func:`core.queries.combine` (exact for count/sum; for mean a conservative
    union-bound interval by default, or the delta method with ``mean_interval="delta"``).
    """
    audit = MessageAudit(array_spec={})  # no arrays may come back from a query
    audited = AuditingGrid(grid, audit)
    msgs = query_messages(audited, spec)
    asked = {m.metadata.dst_node_id for m in msgs}
    replies = list(audited.send_and_receive(msgs, timeout=timeout))
    answers: list[np.ndarray] = []
    stds: list[float] = []
    if mean_interval not in ("conservative", "delta"):
        raise ValueError(f"mean_interval must be 'conservative' or 'delta', got {mean_interval!r}")
    out = QueryResult(spec=spec, estimate=combine(spec, [], []))
    replied: set[int] = set()
    for msg in replies:
        node_id = msg.metadata.src_node_id
        replied.add(node_id)
        if msg.has_error():
            out.refused.append((node_id, msg.error.reason))
            continue
        try:
            vector, noise, eps, hospital = _parse(msg, spec)
        except (KeyError, TypeError, ValueError) as exc:
            out.refused.append((node_id, f"malformed reply ({exc})"))
            continue
        answers.append(vector)
        stds.append(noise)
        out.answered.append(hospital)
        out.epsilon[hospital] = eps
        out.noise[hospital] = noise
    # Replies the audit dropped never reach us; they are reported as violations, not as silence.
    dropped = {n for n, _ in audit.violations}
    for node_id in sorted(asked - replied):
        out.refused.append((node_id, "reply failed the audit" if node_id in dropped else "no reply"))
    out.violations = list(audit.violations)
    out.estimate = combine(spec, answers, stds, level, mean_interval)
    for node_id, reason in out.refused:
        log.info("node %s did not answer the query: %s", node_id, reason)
    return out


def _parse(msg: Message, spec: QuerySpec) -> tuple[np.ndarray, float, float, str]:
    m = msg.content["metrics"]
    n = spec.answer_length
    expected = {f"query-answer-{i}" for i in range(n)} | {"release-noise", "epsilon"}
    if set(m.keys()) != expected:
        raise ValueError(f"expected {n} answers plus release-noise and epsilon")
    vector = np.array([float(m[f"query-answer-{i}"]) for i in range(n)])
    noise = float(m["release-noise"])
    if not (np.all(np.isfinite(vector)) and math.isfinite(noise) and noise > 0):
        # A zero or missing noise std would make the interval claim a precision nobody paid for.
        raise ValueError("non-finite answer or non-positive noise")
    return vector, noise, float(m["epsilon"]), str(msg.content["node"]["hospital"])


def make_query_app(spec: QuerySpec, outcome: list[QueryResult] | None = None, level: float = 0.95) -> ServerApp:
    """A ServerApp that runs one query (deployment / Ray simulation); results go to `outcome`.

    The timeout is the run config's `round-timeout` (default 600 s).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        timeout = float(dict(context.run_config).get("round-timeout", 600.0))
        result = run_query(grid, spec, timeout=timeout, level=level)
        if outcome is not None:
            outcome.append(result)
        log.info("query %s: %d node(s) answered, %d refused", spec.describe(), result.n_answered, len(result.refused))

    return app
