"""Flower strategies with a round guard.

Flower's strategies aggregate whatever comes back, and return the initial model if nothing does.
The guard records, per round, which nodes were asked, which answered, which failed (with the
node's fixed error reason) and which never answered, and stops the run when fewer than the
configured minimum of nodes contributed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg, Krum

from core.run_config import RunSettings
from server.audit import MessageAudit
from server.runner import RoundFailed, RoundLog, public_plan

__all__ = ["RoundFailed", "StrategyWorkflow", "make_strategy"]


class RoundGuard:
    """Mixin placed before a Flower strategy class in the MRO."""

    min_train_nodes: int

    def _guard_init(self, log: RoundLog) -> None:
        self.log = log  # records carry the run's round: log.offset rounds were done before a resume
        self._asked: list[int] = []
        self._t0 = time.monotonic()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        msgs = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self._asked = [m.metadata.dst_node_id for m in msgs]
        self._t0 = time.monotonic()
        return msgs

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        # No federated evaluation: a loss on private data would be an un-noised release.
        return []

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        ok = [m for m in replies if m.has_content()]
        failed = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
        answered = {m.metadata.src_node_id for m in replies}
        missing = [n for n in self._asked if n not in answered]
        record = {
            "round": server_round + self.log.offset,
            "asked": len(self._asked),
            "ok": len(ok),
            "failed": len(failed),
            "missing": len(missing),
            "failed_nodes": failed,
            "missing_nodes": missing,
            "seconds": time.monotonic() - self._t0,
        }
        self.log.add(record)
        if len(ok) < max(self.min_train_nodes, 1):
            reasons = sorted(set(failed.values())) or ["no reply"]
            raise RoundFailed(
                f"round {record['round']}: {len(ok)} of {len(self._asked)} nodes contributed "
                f"(minimum {self.min_train_nodes}); failures: {', '.join(reasons)}; "
                f"{len(missing)} never answered"
            )
        arrays, metrics = super().aggregate_train(server_round, ok)  # type: ignore[misc]
        if metrics is not None:
            record.update({f"mean_{k}": float(v) for k, v in metrics.items()})
        return arrays, metrics


class GuardedFedAvg(RoundGuard, FedAvg):
    pass


class GuardedFedTrimmedAvg(RoundGuard, FedTrimmedAvg):
    pass


class GuardedKrum(RoundGuard, Krum):
    pass


Guarded = GuardedFedAvg | GuardedFedTrimmedAvg | GuardedKrum


def make_strategy(run: RunSettings, log: RoundLog | None = None) -> Guarded:
    common = dict(
        fraction_train=run.fraction_train,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=run.min_nodes,
    )
    name = run.strategy.lower()
    strategy: Guarded
    if name == "fedavg":
        strategy = GuardedFedAvg(**common)
    elif name in ("fedtrimmedavg", "trimmed"):
        strategy = GuardedFedTrimmedAvg(beta=run.trim_beta, **common)
    elif name == "krum":
        strategy = GuardedKrum(num_malicious_nodes=run.krum_byzantine, **common)
    else:
        raise ValueError(f"strategy must be fedavg, fedtrimmedavg or krum, got {run.strategy!r}")
    strategy._guard_init(log or RoundLog())
    return strategy


@dataclass
class StrategyWorkflow:
    """Training with the run config's Flower strategy (Message API), every reply audited."""

    def audit(self, initial: ArrayRecord, run: RunSettings) -> MessageAudit:
        return MessageAudit.for_arrays(initial, public_plan(run), run.group_list)

    def min_nodes(self, run: RunSettings) -> int:
        return run.min_nodes

    def train(self, grid: Grid, run: RunSettings, arrays: ArrayRecord, nodes: list[int], log: RoundLog) -> ArrayRecord:
        strategy = make_strategy(run, log)

        def after_round(server_round: int, current: ArrayRecord) -> MetricRecord | None:
            if server_round > 0:  # Flower calls it once before round 1
                log.commit(server_round + log.offset, current)
            return None

        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            num_rounds=run.num_server_rounds - log.offset,
            timeout=run.round_timeout,
            train_config=ConfigRecord({**run.node_config(), "round-offset": log.offset}),
            evaluate_fn=after_round,
        )
        return result.arrays
