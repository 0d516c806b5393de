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

import dataclasses
import logging
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.compat.common import recorddict_compat as compat
from flwr.server import ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.serverapp import Grid, ServerApp

from client.pretrain import initial_model
from client.secagg import FIT_STATUS_MESSAGE, PUBLIC_FIT_METRICS
from core.run_config import RunSettings
from server.app import RunOutcome, RoundCallback, _allocate, _write, finish, predict_round, wait_for_nodes
from server.audit import AuditingGrid, MessageAudit
from server.results import commit_round, run_dir
from server.strategy import RoundFailed

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

    def __init__(self, min_train_nodes: int, **kw: Any) -> None:
        super().__init__(**kw)
        self.min_train_nodes = min_train_nodes
        self.rounds: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self.asked = 0

    def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
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
        record: dict[str, Any] = {
            "round": server_round,
            "asked": self.asked,
            "ok": len(results),
            "failed": len(unique),
            "missing": max(self.asked - len(results) - len(unique), 0),
            "failed_nodes": {str(i): r for i, r in enumerate(reasons)},  # node ids are not kept by Flower here
            "missing_nodes": [],
            "seconds": time.monotonic() - self.t0,
            "secure_aggregation": True,
        }
        total = sum(r.num_examples for _, r in results)
        if total:
            record["mean_num-examples"] = sum(r.num_examples ** 2 for _, r in results) / total
            for key in PUBLIC_FIT_METRICS:
                record[f"mean_{key}"] = sum(r.num_examples * float(r.metrics.get(key, 0.0)) for _, r in results) / total
        self.rounds.append(record)
        if len(results) < max(self.min_train_nodes, 1):
            raise RoundFailed(
                f"round {server_round}: {len(results)} of {self.asked} nodes contributed (minimum "
                f"{self.min_train_nodes}); failures: {', '.join(sorted(set(reasons))) or 'none'}"
            )
        return super().aggregate_fit(server_round, results, failures)


def _state_to_parameters(arrays: ArrayRecord) -> Parameters:
    return ndarrays_to_parameters([a.numpy() for a in arrays.values()])


def run_secagg_federation(
    grid: Grid,
    run: RunSettings,
    secagg: SecAggSettings | None = None,
    *,
    context: Context | None = None,
    on_round: RoundCallback | None = None,
) -> RunOutcome:
    """N SecAgg+ FedAvg rounds, then the normal predict round and allocation."""
    secagg = secagg or SecAggSettings()
    name = run.run_name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    run = dataclasses.replace(run, run_name=name)  # nodes key their run plan by this name
    out = RunOutcome(path=run_dir(run.results_dir, name))
    # The first global model is pretrained on public synthetic hospitals (no ε, client/pretrain.py).
    model = initial_model(run)
    initial = ArrayRecord(model.state_dict())
    keys = list(initial.keys())
    audit = SecAggAudit.for_arrays(initial)
    grid = AuditingGrid(grid, audit)
    t0 = time.monotonic()
    strategy: GuardedLegacyFedAvg | None = None
    nodes: list[int] = []
    try:
        # Nodes may still be registering (Ray starts them alongside the ServerApp).
        nodes = wait_for_nodes(grid, max(run.min_nodes, 3), run.round_timeout)
        num_shares, threshold = secagg.resolve(len(nodes))
        n = len(nodes)
        strategy = GuardedLegacyFedAvg(
            min_train_nodes=run.min_nodes,
            fraction_fit=1.0,  # SecAgg+ hides single updates only within a large enough round: ask all
            fraction_evaluate=0.0,
            min_fit_clients=n,
            min_evaluate_clients=0,
            min_available_clients=n,
            initial_parameters=_state_to_parameters(initial),
            on_fit_config_fn=lambda r: {**run.as_config(), "server-round": r},
            fit_metrics_aggregation_fn=lambda _: {},
        )
        secure_fit = SecAggPlusWorkflow(
            num_shares=num_shares,
            reconstruction_threshold=threshold,
            max_weight=secagg.max_weight,
            clipping_range=secagg.clipping_range,
            timeout=run.round_timeout,
        )

        def fit_workflow(g: Grid, ctx: Context) -> None:
            assert strategy is not None
            current = int(ctx.state.config_records[MAIN_CONFIGS_RECORD][WorkflowKey.CURRENT_ROUND])
            before = len(strategy.rounds)
            secure_fit(g, ctx)
            if len(strategy.rounds) == before:  # the protocol halted before aggregation
                strategy.rounds.append({"round": current, "asked": strategy.asked, "ok": 0, "failed": 0,
                                        "missing": strategy.asked, "failed_nodes": {}, "missing_nodes": [],
                                        "seconds": time.monotonic() - strategy.t0, "secure_aggregation": True})
                raise RoundFailed(f"round {current}: secure aggregation halted (too few nodes completed the protocol)")
            arrays = _params_record(ctx, keys)
            commit_round(out.path, current, arrays, {"rounds_done": current, "rounds": strategy.rounds})
            if on_round:
                on_round(current, run.num_server_rounds, strategy.rounds[-1])

        base = context or Context(run_id=int(grid.run.run_id), node_id=0, node_config={}, state=RecordDict(), run_config={})
        legacy = LegacyContext(
            Context(run_id=base.run_id, node_id=base.node_id, node_config=base.node_config, state=RecordDict(),
                    run_config=base.run_config),
            config=ServerConfig(num_rounds=run.num_server_rounds, round_timeout=run.round_timeout),
            strategy=strategy,
        )
        DefaultWorkflow(fit_workflow=fit_workflow)(grid, legacy)
        arrays = _params_record(legacy, keys)
        replies = predict_round(grid, arrays, ConfigRecord(run.as_config()), run.round_timeout)
        out.allocations, out.fairness, out.epsilon = _allocate(run, replies)
    except (RoundFailed, ValueError) as exc:
        out.error = str(exc)
        log.error("run %s failed: %s", name, exc)
    out.rounds = strategy.rounds if strategy is not None else []
    out.violations = audit.violations
    _write(out, run, time.monotonic() - t0, len(nodes), audit.seen)
    return out


def _params_record(ctx: Context, keys: list[str]) -> ArrayRecord:
    params = compat.arrayrecord_to_parameters(ctx.state.array_records[MAIN_PARAMS_RECORD], keep_input=True)
    nds = parameters_to_ndarrays(params)
    if len(nds) != len(keys):
        raise ValueError(f"aggregated model has {len(nds)} arrays, expected {len(keys)}")
    return ArrayRecord({k: Array(np.ascontiguousarray(a)) for k, a in zip(keys, nds)})


def make_secagg_server_app(
    overrides: Mapping[str, Any] | None = None,
    outcome: list[RunOutcome] | None = None,
    on_round: RoundCallback | None = None,
) -> ServerApp:
    """A SecAgg+ ServerApp; `overrides` win over the run config (the Python simulation has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        secagg, rest = SecAggSettings.split(dict(context.run_config), overrides or {})
        run = RunSettings.from_mapping(rest)
        finish(run_secagg_federation(grid, run, secagg, context=context, on_round=on_round), outcome)

    return app


app = make_secagg_server_app()
