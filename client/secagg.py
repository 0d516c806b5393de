"""The hospital node's ClientApp for SecAgg+ runs (Flower's legacy fit format + `secaggplus_mod`).

Record-level privacy is still client-side DP-SGD: the train handler calls `client.tasks.train_task`
unchanged (ledger charged before training, σ calibrated for the whole run). SecAgg+ is added on
top so the coordinator sees only the weighted *sum* of the nodes' models, never one node's model:
`secaggplus_mod` quantises the reply's parameters, adds pairwise and private masks, sends the
masked vector and clears the plaintext `fitres.parameters` record.

What still travels in plain text in each fit reply (Flower puts it outside the masked vector):
`fitres.num_examples` (the FedAvg weight) and `fitres.metrics`. Both hold only PUBLIC_FIT_METRICS:
the number of training windows (fixed by the public date range and windowing), and privacy
accounting values (ε, σ, sample rate, steps), none of which is computed from record contents.

`query.predict` / `query.analytics` are answered by the normal node app (`client.app.make_app`):
`secaggplus_mod` only acts on `train` messages.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_STATE
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat

from client.app import error_reply, make_app
from client.node import NodeSettings
from core.protocol import FIT_STATUS_MESSAGE, PUBLIC_FIT_METRICS
from core.run_config import RunSettings

log = logging.getLogger("fedalloc.node")



def model_keys(run: RunSettings) -> list[str]:
    """The global model's state-dict keys, in the order the legacy parameter list uses."""
    from forecasting.model import model_for

    return list(model_for(run).state_dict().keys())


def _guard_mod(msg: Message, context: Context, call_next: Any) -> Message:
    """Outermost mod: any failure (in training or in the protocol) → a fixed-phrase error reply.

    `secaggplus_mod` cannot pass an error reply through (it reads the reply's content), so the
    train handler raises and the failure is turned into one of the node's fixed reasons here;
    details stay in the node's own log.
    """
    try:
        return call_next(msg, context)
    except Exception as exc:
        return error_reply(msg, exc)


def _check_weight_bound(run: RunSettings, node: NodeSettings, context: Context) -> None:
    """Refuse (before the ledger is charged) if num_examples exceeds the protocol's max_weight.

    The mask arithmetic scales the model by num_examples / max_weight; above 1 the weighted
    parameters may be clipped or overflow the modulus and the sum would be silently wrong.
    """
    from client.node import examples_for

    state = context.state.config_records.get(RECORD_KEY_STATE)
    max_weight = float(state["max_weight"]) if state is not None and "max_weight" in state else 0.0
    n = len(examples_for(node, run))
    if max_weight <= 0 or n > max_weight:
        raise ValueError(f"num_examples {n} exceeds the SecAgg+ max_weight {max_weight}")


def make_secagg_app(sim_nodes: Mapping[int, Mapping[str, Any]] | None = None) -> ClientApp:
    """A SecAgg+ ClientApp. `sim_nodes` maps simulation partition ids to node configs."""
    plain = make_app(sim_nodes)  # query.predict / query.analytics exactly as in a normal run
    app = ClientApp(mods=[_guard_mod, secaggplus_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # Reached only in the collect-masked-vectors stage: the mod answers the key stages itself.
        import torch

        from client.tasks import train_task  # torch/opacus only when there is work

        fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        cfg = dict(fitins.config)
        run = RunSettings.from_mapping(cfg)
        node = NodeSettings.from_config(context.node_config, sim_nodes, context.run_config, str(context.run_id))
        server_round = int(cfg.get("server-round", 1)) + int(cfg.get("round-offset", 0))
        _check_weight_bound(run, node, context)
        keys = model_keys(run)
        arrays = parameters_to_ndarrays(fitins.parameters)
        if len(arrays) != len(keys):
            raise ValueError(f"got {len(arrays)} parameter arrays, the model has {len(keys)}")
        state = {k: torch.from_numpy(np.array(a, copy=True)) for k, a in zip(keys, arrays)}
        new_state, metrics = train_task(state, run, node, str(context.run_id), server_round)
        fitres = FitRes(
            status=Status(code=Code.OK, message=FIT_STATUS_MESSAGE),
            parameters=ndarrays_to_parameters([new_state[k].detach().cpu().numpy() for k in keys]),
            num_examples=int(metrics["num-examples"]),
            metrics={k: float(metrics[k]) for k in PUBLIC_FIT_METRICS},
        )
        return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)

    @app.query("predict")
    def predict(msg: Message, context: Context) -> Message:
        return plain(msg, context)

    @app.query("analytics")
    def analytics(msg: Message, context: Context) -> Message:
        return plain(msg, context)

    return app


app = make_secagg_app()
