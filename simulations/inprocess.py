"""An in-process Flower Grid: runs the ClientApp of every virtual node in this process.

Every message still goes through Flower's own protobuf serialisation both ways, so what a node
receives and what the coordinator gets back is exactly what would cross the wire. Used by fast
tests and by `fedalloc simulate --engine inprocess`; the Ray simulation engine is the default.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from typing import Any, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

# Flower's own code for an exception raised inside a ClientApp.
CLIENT_APP_RAISED_EXCEPTION = 0


def _wire(msg: Message) -> Message:
    return message_from_proto(message_to_proto(msg))


class InProcessGrid(Grid):
    """Virtual nodes with ids 1001.. and per-node Context (node_config, persistent state).

    `drop(node_id, round_group)` may return True to simulate a node that never answers; `tap`
    sees every reply as it would arrive at the coordinator (message audits in tests).
    """

    def __init__(
        self,
        client_app: ClientApp,
        node_configs: list[Mapping[str, Any]],
        run_id: int = 1,
        run_config: Mapping[str, Any] | None = None,
        drop: Callable[[int, str], bool] | None = None,
        tap: Callable[[Message], None] | None = None,
    ) -> None:
        self.client_app = client_app
        self._run = Run.create_empty(run_id)
        self.contexts = {
            1001 + i: Context(run_id=run_id, node_id=1001 + i, node_config=dict(cfg), state=RecordDict(), run_config=dict(run_config or {}))
            for i, cfg in enumerate(node_configs)
        }
        self.drop = drop
        self.tap = tap
        self._replies: dict[str, Message] = {}
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[no-untyped-def]
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = str(uuid4())
            msg.metadata.__dict__["_message_id"] = msg_id
            ids.append(msg_id)
            node = msg.metadata.dst_node_id
            if self.drop and self.drop(node, msg.metadata.group_id):
                continue
            incoming = _wire(msg)
            try:
                reply = self.client_app(incoming, self.contexts[node])
            except Exception as exc:  # Flower turns a raising ClientApp into an error reply
                reply = Message(Error(code=CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(exc).__name__}: {exc}"), reply_to=incoming)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            reply = _wire(reply)
            if self.tap:
                self.tap(reply)
            self._replies[msg_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))


def random_dropout(rate: float, seed: int = 0) -> Callable[[int, str], bool]:
    """Each (node, round) fails independently with probability `rate`; the predict round too."""
    rng = random.Random(seed)
    return lambda node, group: rng.random() < rate
