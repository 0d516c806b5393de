"""The hospital node's Flower ClientApp (Message API).

Handlers: `train` (DP-SGD on local records, reply weights + public metrics) and `query.predict`
(reply the DP-released D_i). On any failure the reply is a Flower Error whose reason is one of a
few fixed phrases; the details, which may mention record content, stay in the node's own log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.ledger import BudgetExceeded, LedgerError
from client.limits import ModelRefused, OutsidePlan
from client.node import NodeSettings
from core.protocol import ERRORS
from core.records import RecordsError
from core.run_config import RunSettings

log = logging.getLogger("fedalloc.node")
# Node details (which may quote a record) go only to the node's own log file, never the console.
log.propagate = False
log.addHandler(logging.NullHandler())
logging.getLogger("flwr").propagate = False  # opacus calls logging.basicConfig; avoid double lines
_FILE_HANDLERS: dict[str, logging.Handler] = {}


def _classify(exc: BaseException) -> str:
    if isinstance(exc, RecordsError):
        return "records"
    if isinstance(exc, BudgetExceeded):
        return "budget"
    if isinstance(exc, LedgerError):
        return "ledger"
    if isinstance(exc, OutsidePlan):
        return "limits"
    if isinstance(exc, ModelRefused):
        return "model"
    if isinstance(exc, (ValueError, KeyError, FileNotFoundError)):
        return "config"
    return "internal"


def node_log_path(node_config: Mapping[str, Any]) -> Path | None:
    """`log-path` from the node config, else `<ledger-path>.log`; None if neither is known."""
    path = node_config.get("log-path") or (f"{node_config['ledger-path']}.log" if node_config.get("ledger-path") else "")
    return Path(str(path)).expanduser() if path else None


def _log_to(path: Path | None) -> None:
    if path is None or str(path) in _FILE_HANDLERS:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handler.addFilter(lambda record: getattr(record, "log_path", None) == str(path))
    _FILE_HANDLERS[str(path)] = handler
    log.addHandler(handler)


def error_reply(msg: Message, exc: BaseException, log_path: Path | None = None) -> Message:
    kind = _classify(exc)
    _log_to(log_path)
    log.error("node refused %s: %s", msg.metadata.message_type, exc, extra={"log_path": str(log_path)})
    code, reason = ERRORS[kind]
    return Message(Error(code=code, reason=reason), reply_to=msg)


SimNodes = Mapping[int, Mapping[str, Any]]


def _settings(msg: Message, context: Context, sim_nodes: SimNodes | None) -> tuple[RunSettings, NodeSettings, str]:
    cfg = dict(msg.content["config"]) if "config" in msg.content else {}
    run = RunSettings.from_mapping(cfg)
    node = NodeSettings.from_config(context.node_config, sim_nodes, context.run_config, str(context.run_id))
    return run, node, str(context.run_id)


def _guarded(fn: Callable[[Message, Context], Message], sim_nodes: SimNodes | None) -> Callable[[Message, Context], Message]:
    """Every failure becomes a fixed-phrase error reply; details go to the node's own log."""

    def handler(msg: Message, context: Context) -> Message:
        try:
            return fn(msg, context)
        except Exception as exc:
            cfg = dict(context.node_config)
            pid = cfg.get("partition-id")
            if "ledger-path" not in cfg and sim_nodes is not None and pid is not None:
                cfg.update(sim_nodes.get(int(pid), {}))
            return error_reply(msg, exc, node_log_path(cfg))

    handler.__name__ = fn.__name__
    return handler


def make_app(sim_nodes: SimNodes | None = None) -> ClientApp:
    """A ClientApp. `sim_nodes` maps simulation partition ids to node configs (simulation only)."""
    app = ClientApp()

    def settings(msg: Message, context: Context) -> tuple[RunSettings, NodeSettings, str]:
        return _settings(msg, context, sim_nodes)

    def guarded(fn: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        return _guarded(fn, sim_nodes)

    @app.train()
    @guarded
    def train(msg: Message, context: Context) -> Message:
        from client.tasks import train_task  # torch/opacus only when there is work

        run, node, run_id = settings(msg, context)
        server_round = int(msg.content["config"].get("server-round", 1)) + int(
            msg.content["config"].get("round-offset", 0)
        )
        state = msg.content["arrays"].to_torch_state_dict()
        new_state, metrics = train_task(state, run, node, run_id, server_round)
        content = RecordDict({"arrays": ArrayRecord(new_state), "metrics": MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)

    @app.query("predict")
    @guarded
    def predict(msg: Message, context: Context) -> Message:
        from client.tasks import predict_task

        run, node, run_id = settings(msg, context)
        state = msg.content["arrays"].to_torch_state_dict()
        metrics = predict_task(state, run, node, run_id)
        content = RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord({"hospital": node.hospital})})
        return Message(content=content, reply_to=msg)

    @app.query("analytics")
    @guarded
    def analytics(msg: Message, context: Context) -> Message:
        from client.query_task import query_task
        from core.queries import QuerySpec

        _, node, run_id = settings(msg, context)
        spec = QuerySpec.from_config(dict(msg.content["query"]))  # re-validated here: never trust the sender
        metrics = query_task(run_id, spec, node)
        content = RecordDict({"metrics": MetricRecord(metrics), "node": ConfigRecord({"hospital": node.hospital})})
        return Message(content=content, reply_to=msg)

    return app


app = make_app()
