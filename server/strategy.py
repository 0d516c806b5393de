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

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedTrimmedAvg, Krum, Strategy

from core.run_config import RunSettings


class RoundFailed(RuntimeError):
    pass


class RoundGuard:
    """Mixin placed before a Flower strategy class in the MRO."""

    min_train_nodes: int

    def _guard_init(self) -> None:
        self.rounds: list[dict[str, Any]] = []
        self.round_offset = 0  # rounds finished before a resume: messages name the run's round
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
            "round": server_round,
            "asked": len(self._asked),
            "ok": len(ok),
            "failed": len(failed),
            "missing": len(missing),
            "failed_nodes": failed,
            "missing_nodes": missing,
            "seconds": time.monotonic() - self._t0,
        }
        self.rounds.append(record)
        if len(ok) < max(self.min_train_nodes, 1):
            reasons = sorted(set(failed.values())) or ["no reply"]
            raise RoundFailed(
                f"round {server_round + self.round_offset}: {len(ok)} of {len(self._asked)} nodes contributed "
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


def make_strategy(run: RunSettings) -> Strategy:
    common = dict(
        fraction_train=run.fraction_train,
        min_train_nodes=run.min_nodes,
        min_evaluate_nodes=0,
        min_available_nodes=run.min_nodes,
    )
    name = run.strategy.lower()
    if name == "fedavg":
        strategy: Strategy = GuardedFedAvg(**common)
    elif name in ("fedtrimmedavg", "trimmed"):
        strategy = GuardedFedTrimmedAvg(beta=run.trim_beta, **common)
    elif name == "krum":
        strategy = GuardedKrum(num_malicious_nodes=run.krum_byzantine, **common)
    else:
        raise ValueError(f"strategy must be fedavg, fedtrimmedavg or krum, got {run.strategy!r}")
    strategy._guard_init()  # type: ignore[attr-defined]
    return strategy
