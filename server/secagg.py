"""The coordinator with Flower's SecAgg+ (legacy workflow stack, the only one that has it in 1.42).

Training: `DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))` with the legacy `FedAvg`. Each
round the nodes train with DP-SGD (client-side DP, their own ledgers), then mask their quantised,
example-weighted models; the coordinator can only unmask the sum over the round's nodes, from
which it computes the FedAvg average. It never holds one node's model.

After training, the final model goes out in the normal `query.predict` round (Message API, same
helpers as `server.app`), and the allocation and results files are written exactly as in a
normal run. Every reply, including every SecAgg+ protocol message, passes a message audit first
(`SecAggAudit`): plaintext fit metrics are limited to public values and `fitres.parameters` must
arrive empty (the update travels only masked).

What the coordinator still sees in plain text per node and round: `num_examples` (public: fixed
by the date range), ε / σ / sample rate / steps (public accounting), the node's SecAgg+ public
keys, the encrypted key shares it forwards, one masked vector, and — in the unmask stage — the
shares needed to remove masks. With at least `threshold` honest nodes the masked vectors reveal
nothing beyond their sum. The predict round is not secure-aggregated: each node's D_i is released
individually under its own DP noise, as in a normal run.

Run config (optional, SecAgg+ only; not part of RunSettings): `secagg-num-shares` (default: the
number of nodes), `secagg-threshold` (default max(2, n-1)), `secagg-max-weight` (an upper bound
on any node's num_examples, default 1000; a node with more refuses before charging its ledger), `secagg-clipping-range` (|weighted parameter| bound
before quantisation, default 8.0).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

from core.protocol import FIT_STATUS_MESSAGE, PUBLIC_FIT_METRICS
from core.run_config import RunSettings
from server.audit import MessageAudit
from server.runner import RoundCallback, RoundFailed, RoundLog, RunOutcome, public_plan, run_federation

log = logging.getLogger("fedalloc.coordinator")
logging.getLogger("flwr").propagate = False

SECAGG_KEYS = ("secagg-num-shares", "secagg-threshold", "secagg-max-weight", "secagg-clipping-range")
# What a node may put in the SecAgg+ protocol record of a reply (public keys, encrypted key
# shares for its neighbours, its masked vector, mask-removal shares).
PROTOCOL_REPLY_KEYS = {Key.PUBLIC_KEY_1, Key.PUBLIC_KEY_2, Key.DESTINATION_LIST, Key.CIPHERTEXT_LIST,
                       Key.MASKED_PARAMETERS, Key.NODE_ID_LIST, Key.SHARE_LIST}
FIT_RECORDS = {"fitres.parameters", "fitres.metrics", "fitres.num_examples", "fitres.status"}


@dataclass(frozen=True)
class SecAggSettings:
    num_shares: int | None = None
    threshold: int | None = None
    max_weight: float = 1000.0
    clipping_range: float = 8.0

    @classmethod
    def split(cls, *layers: Mapping[str, Any]) -> tuple["SecAggSettings", dict[str, Any]]:
        """(SecAgg+ settings, the remaining run config for RunSettings)."""
        merged: dict[str, Any] = {}
        for layer in layers:
            merged.update(layer)
        sa = {k: merged.pop(k) for k in SECAGG_KEYS if k in merged}
        return cls(
            num_shares=int(sa["secagg-num-shares"]) if sa.get("secagg-num-shares") not in (None, "", 0) else None,
            threshold=int(sa["secagg-threshold"]) if sa.get("secagg-threshold") not in (None, "", 0) else None,
            max_weight=float(sa.get("secagg-max-weight", cls.max_weight)),
            clipping_range=float(sa.get("secagg-clipping-range", cls.clipping_range)),
        ), merged

    def resolve(self, n_nodes: int) -> tuple[int, int]:
        """(num_shares, threshold) for a federation of n nodes, checked like Flower does."""
        if n_nodes < 3:
            raise ValueError(f"SecAgg+ needs at least 3 nodes (got {n_nodes}): with 2 the sum reveals the other's update")
        shares = self.num_shares or n_nodes
        threshold = self.threshold or max(2, n_nodes - 1)
        if not 3 <= shares <= n_nodes:
            raise ValueError(f"secagg-num-shares must be in [3, {n_nodes}], got {shares}")
        if not 2 <= threshold < shares:
            raise ValueError(f"secagg-threshold must be in [2, num_shares), got {threshold}")
        if 2 * threshold <= shares:
            # Flower's nodes do not check the coordinator's active/dead lists; with 2t > shares a
            # coordinator that lies about dropouts cannot collect both kinds of shares of a node.
            raise ValueError(f"secagg-threshold must exceed num_shares / 2, got {threshold} of {shares}")
        return shares, threshold


class SecAggAudit(MessageAudit):
    """The normal allowlist, plus the legacy fit replies of the SecAgg+ stages."""

    def problems(self, msg: Message) -> list[str]:
        if msg.has_error() or not (set(msg.content.keys()) & (FIT_RECORDS | {RECORD_KEY_CONFIGS})):
            return super().problems(msg)
        out: list[str] = []
        for name, record in msg.content.items():
            if name == RECORD_KEY_CONFIGS and isinstance(record, ConfigRecord):
                out += [f"secagg record key {k} is not on the allowlist" for k in record if k not in PROTOCOL_REPLY_KEYS]
            elif name == "fitres.parameters" and isinstance(record, ArrayRecord):
                if len(record):
                    out.append("fitres.parameters is not empty: a model update arrived unmasked")
            elif name == "fitres.metrics" and isinstance(record, ConfigRecord):
                for key, value in record.items():
                    if key not in PUBLIC_FIT_METRICS:
                        out.append(f"metric {name}.{key} is not on the allowlist")
                    elif isinstance(value, bool) or not isinstance(value, (int, float)):
                        out.append(f"metric {name}.{key} is not a scalar")
            elif name == "fitres.num_examples" and isinstance(record, MetricRecord):
                if set(record.keys()) != {"num_examples"}:
                    out.append("fitres.num_examples holds more than num_examples")
            elif name == "fitres.status" and isinstance(record, ConfigRecord):
                if dict(record) != {"code": 0, "message": FIT_STATUS_MESSAGE}:
                    out.append("fitres.status is not the fixed OK status")
            else:
                out.append(f"record {name} of type {type(record).__name__} is not allowed")
        if (FIT_RECORDS & set(msg.content.keys())) and not (
            FIT_RECORDS <= set(msg.content.keys())
            and Key.MASKED_PARAMETERS in msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
        ):
            out.append("fit reply without a masked vector")
        return out


class GuardedLegacyFedAvg(LegacyFedAvg):
    """Legacy FedAvg that records each round like server.strategy.RoundGuard and enforces min-nodes."""

    def __init__(self, min_train_nodes: int, log: RoundLog, **kw: Any) -> None:
        super().__init__(**kw)
        self.min_train_nodes = min_train_nodes
        self.log = log
        self.t0 = time.monotonic()
        self.asked = 0

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        out = super().configure_fit(server_round, parameters, client_manager)
        self.asked = len(out)
        self.t0 = time.monotonic()
        return out

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Flower's SecAgg+ workflow appends a stage-2 error reply twice; count each reply once.
        unique = list({id(f.args[0]) if getattr(f, "args", None) else id(f): f for f in failures}.values())
        reasons = [getattr(f.args[0], "reason", "failure") if getattr(f, "args", None) else "failure" for f in unique]
        record = self.record(server_round, ok=len(results), failed=len(unique))
        record["failed_nodes"] = {str(i): r for i, r in enumerate(reasons)}  # Flower keeps no node ids here
        total = sum(r.num_examples for _, r in results)
        if total:
            record["mean_num-examples"] = sum(r.num_examples ** 2 for _, r in results) / total
            for key in PUBLIC_FIT_METRICS:
                record[f"mean_{key}"] = sum(r.num_examples * float(r.metrics.get(key, 0.0)) for _, r in results) / total
        self.log.add(record)
        if len(results) < max(self.min_train_nodes, 1):
            raise RoundFailed(
                f"round {record['round']}: {len(results)} of {self.asked} nodes contributed (minimum "
                f"{self.min_train_nodes}); failures: {', '.join(sorted(set(reasons))) or 'none'}"
            )
        return super().aggregate_fit(server_round, results, failures)

    def record(self, server_round: int, ok: int, failed: int) -> dict[str, Any]:
        """The round's record, numbered as in the run (`log.offset` rounds before a resume)."""
        return {"round": server_round + self.log.offset, "asked": self.asked, "ok": ok, "failed": failed,
                "missing": max(self.asked - ok - failed, 0), "failed_nodes": {}, "missing_nodes": [],
                "seconds": time.monotonic() - self.t0, "secure_aggregation": True}


def _state_to_parameters(arrays: ArrayRecord) -> Parameters:
    return ndarrays_to_parameters([a.numpy() for a in arrays.values()])


@dataclass
class SecAggWorkflow:
    """Training rounds under Flower's SecAgg+ (legacy DefaultWorkflow); resumable like the rest."""

    settings: SecAggSettings = field(default_factory=SecAggSettings)
    context: Context | None = None

    def audit(self, initial: ArrayRecord, run: RunSettings) -> MessageAudit:
        return SecAggAudit.for_arrays(initial, public_plan(run), run.group_list)

    def min_nodes(self, run: RunSettings) -> int:
        return max(run.min_nodes, 3)

    def train(self, grid: Grid, run: RunSettings, arrays: ArrayRecord, nodes: list[int], log: RoundLog) -> ArrayRecord:
        num_shares, threshold = self.settings.resolve(len(nodes))
        keys = list(arrays.keys())
        strategy = self._strategy(run, arrays, len(nodes), log)
        secure_fit = SecAggPlusWorkflow(num_shares=num_shares, reconstruction_threshold=threshold,
                                        max_weight=self.settings.max_weight,
                                        clipping_range=self.settings.clipping_range, timeout=run.round_timeout)

        def fit_workflow(g: Grid, ctx: Context) -> None:
            current = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            before = len(log.records)
            secure_fit(g, ctx)
            if len(log.records) == before:  # the protocol halted before aggregation
                log.add(strategy.record(current, ok=0, failed=0))
                raise RoundFailed(f"round {current + log.offset}: secure aggregation halted "
                                  "(too few nodes completed the protocol)")
            log.commit(current + log.offset, _params_record(ctx, keys))

        base = self.context or Context(run_id=int(grid.run.run_id), node_id=0, node_config={}, state=RecordDict(),
                                       run_config={})
        legacy = LegacyContext(
            Context(run_id=base.run_id, node_id=base.node_id, node_config=base.node_config, state=RecordDict(),
                    run_config=base.run_config),
            config=ServerConfig(num_rounds=run.num_server_rounds - log.offset, round_timeout=run.round_timeout),
            strategy=strategy,
        )
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        return _params_record(legacy, keys)

    @staticmethod
    def _strategy(run: RunSettings, arrays: ArrayRecord, n: int, log: RoundLog) -> GuardedLegacyFedAvg:
        return GuardedLegacyFedAvg(
            min_train_nodes=run.min_nodes,
            log=log,
            fraction_fit=1.0,  # SecAgg+ hides single updates only within a large enough round: ask all
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_evaluate_clients=0,
            min_available_clients=n,
            initial_parameters=_state_to_parameters(arrays),
            # Nodes plan and charge by the run's round: Flower counts the resumed part from 1.
            on_fit_config_fn=lambda r: {**run.node_config(), "server-round": r, "round-offset": log.offset},
            fit_metrics_aggregation_fn=lambda _: {},
        )


def run_secagg_federation(grid: Grid, run: RunSettings, secagg: SecAggSettings | None = None, *,
                          context: Context | None = None, on_round: RoundCallback | None = None,
                          resume: bool = False) -> RunOutcome:
    """N SecAgg+ FedAvg rounds, then the normal predict round and allocation (server/runner.py)."""
    return run_federation(grid, run, SecAggWorkflow(secagg or SecAggSettings(), context), on_round=on_round,
                          resume=resume)


def _params_record(ctx: Context, keys: list[str]) -> ArrayRecord:
    params = compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    nds = parameters_to_ndarrays(params)
    if len(nds) != len(keys):
        raise ValueError(f"aggregated model has {len(nds)} arrays, expected {len(keys)}")
    return ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, nds)})


def make_secagg_server_app(overrides: Mapping[str, Any] | None = None,
                           on_finish: Callable[[RunOutcome], None] | None = None,
                           on_round: RoundCallback | None = None, resume: bool = False) -> ServerApp:
    """The SecAgg+ ServerApp (`server.app.make_app(secure=True)`)."""
    from server.app import make_app

    return make_app(overrides, on_round=on_round, on_finish=on_finish, resume=resume, secure=True)


app = make_secagg_server_app()
