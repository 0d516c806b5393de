"""The coordinator's Flower ServerApp.

N rounds of DP-SGD federated training with a Flower strategy, a final `query.predict` round in
which each node releases its D_i under DP, then the allocation core. Every reply passes the
message audit first; a round with too few contributing nodes stops the run with a clear error.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from client.pretrain import initial_model
from core.allocation import allocate
from core.drg import DRG_GROUPS
from core.run_config import RunSettings, plan_steps, public_examples
from server.audit import AuditingGrid, MessageAudit
from server.results import commit_round, resume_point, rounds_frame, run_dir, write_json
from server.strategy import RoundFailed, make_strategy

log = logging.getLogger("fedalloc.coordinator")
logging.getLogger("flwr").propagate = False

RoundCallback = Callable[[int, int, dict[str, Any]], None]


@dataclass
class RunOutcome:
    """What a finished (or failed) run produced; also written to results/<run>/."""

    path: Path
    allocations: pd.DataFrame | None = None
    fairness: dict[str, float] = field(default_factory=dict)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    epsilon: dict[str, float] = field(default_factory=dict)
    violations: list[tuple[int, str]] = field(default_factory=list)
    error: str | None = None


def read_resources(path: str) -> dict[str, float]:
    """The coordinator's public `hospital,resources` file → {hospital: R_i}."""
    df = pd.read_csv(path)
    missing = {"hospital", "resources"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    values = pd.to_numeric(df["resources"], errors="coerce")
    bad = df.index[values.isna() | (values < 0)]
    if len(bad):
        raise ValueError(f"{path}: row {bad[0] + 2}, column resources: not a non-negative number")
    return dict(zip(df["hospital"].astype(str), values.astype(float)))


def predict_round(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> list[Message]:
    nodes = sorted(grid.get_node_ids())
    msgs = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type="query.predict", group_id="predict")
        for n in nodes
    ]
    return list(grid.send_and_receive(msgs, timeout=timeout))


def wait_for_nodes(grid: Grid, minimum: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Connected node ids once at least `minimum` are there; RoundFailed after `timeout` s.

    Flower's own sampling waits forever for `min_available_nodes`; a coordinator should say
    that the federation never assembled instead.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = list(grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise RoundFailed(f"only {len(nodes)} of the required {minimum} nodes connected within {timeout:.0f} s")
        time.sleep(poll)


def public_plan(run: RunSettings) -> dict[str, float]:
    """What every honest node's reply must say, computed from public values only."""
    examples = public_examples(run, len(DRG_GROUPS))
    steps = plan_steps(examples, run.batch_size, run.local_epochs)
    return {"examples": examples, "sample_rate": steps.sample_rate, "steps": steps.steps,
            "weight_bound": run.weight_bound, "run_epsilon": run.epsilon}


def run_federation(
    grid: Grid,
    run: RunSettings,
    *,
    on_round: RoundCallback | None = None,
    resume: bool = False,
) -> RunOutcome:
    name = run.run_name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    # Nodes key their run plan and ledger entries by this public name, so it must be sent.
    run = dataclasses.replace(run, run_name=name)
    out = RunOutcome(path=run_dir(run.results_dir, name))
    # The first global model is pretrained on public synthetic hospitals (no ε, client/pretrain.py).
    model = initial_model(run)
    arrays = ArrayRecord(model.state_dict())
    audit = MessageAudit.for_arrays(arrays, public_plan(run))
    grid = AuditingGrid(grid, audit)
    strategy = make_strategy(run)
    done = 0
    point = resume_point(out.path) if resume else None
    if point is not None:
        arrays, state = point
        done = int(state.get("rounds_done", 0))
        strategy.rounds = state.get("rounds", [])[:done]  # type: ignore[attr-defined]
        log.info("resuming %s after round %d", name, done)
    restored = len(strategy.rounds)  # type: ignore[attr-defined]
    strategy.round_offset = done  # type: ignore[attr-defined]

    def absolute_rounds() -> None:
        # The strategy counts the resumed part from 1; records carry the run's absolute round.
        for i, rec in enumerate(strategy.rounds[restored:]):  # type: ignore[attr-defined]
            rec["round"] = done + i + 1

    def after_round(server_round: int, current: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        absolute = server_round + done
        absolute_rounds()
        commit_round(out.path, absolute, current, {"rounds_done": absolute, "rounds": strategy.rounds})  # type: ignore[attr-defined]
        if on_round:
            on_round(absolute, run.num_server_rounds, strategy.rounds[-1])  # type: ignore[attr-defined]
        return None

    train_config = ConfigRecord({**run.as_config(), "round-offset": done})
    t0 = time.monotonic()
    nodes: list[int] = []
    try:
        nodes = wait_for_nodes(grid, run.min_nodes, run.round_timeout)
        if done < run.num_server_rounds:
            result = strategy.start(
                grid=grid,
                initial_arrays=arrays,
                num_rounds=run.num_server_rounds - done,
                timeout=run.round_timeout,
                train_config=train_config,
                evaluate_fn=after_round,
            )
            arrays = result.arrays
        replies = predict_round(grid, arrays, ConfigRecord(run.as_config()), run.round_timeout)
        out.allocations, out.fairness, out.epsilon = _allocate(run, replies)
    except (RoundFailed, ValueError) as exc:
        out.error = str(exc)
        log.error("run %s failed: %s", name, exc)
    # Anything else (a crashing callback, KeyboardInterrupt, a dying coordinator) propagates: the
    # checkpoint of the last finished round is on disk and `resume=True` continues from it.
    absolute_rounds()
    out.rounds = strategy.rounds  # type: ignore[attr-defined]
    out.violations = audit.violations
    # Nodes may join after the run starts; count those connected at the end.
    _write(out, run, time.monotonic() - t0, max(len(nodes), len(list(grid.get_node_ids()))), audit.seen)
    return out


def _allocate(run: RunSettings, replies: list[Message]) -> tuple[pd.DataFrame, dict[str, float], dict[str, float]]:
    rows = []
    for msg in replies:
        if msg.has_error():
            log.warning("node %s did not release D_i: %s", msg.metadata.src_node_id, msg.error.reason)
            continue
        m = msg.content["metrics"]
        hospital = str(msg.content["node"]["hospital"])
        rows.append({"hospital": hospital, "demand": float(m["demand"]), "epsilon": float(m["epsilon"]),
                     **{f"demand_{g}": float(m[f"demand-{g}"]) for g in DRG_GROUPS}})
    if len(rows) < max(run.min_nodes, 1):
        raise RoundFailed(f"predict round: only {len(rows)} nodes released D_i (minimum {run.min_nodes})")
    released = pd.DataFrame(rows).sort_values("hospital").reset_index(drop=True)
    if run.resources_file:
        resources = read_resources(run.resources_file)
        missing = sorted(set(released.hospital) - set(resources))
        if missing:
            raise ValueError(f"{run.resources_file}: no resources for hospital(s) {', '.join(missing)}")
        r = released.hospital.map(resources).astype(float).to_numpy()
    else:
        log.warning("no resources-file given: every hospital gets R_i = 1")
        r = [1.0] * len(released)
    group_demand = released[[f"demand_{g}" for g in DRG_GROUPS]].to_numpy() if run.policy == "drg_budget" else None
    result = allocate(
        released.demand.to_numpy(),
        r,
        run.total,
        run.policy,
        integer=run.integer,
        group_demand=group_demand,
        hospitals=released.hospital.tolist(),
    )
    table = result.table
    eps = dict(zip(released.hospital, released.epsilon))
    per_group = released.drop(columns=["demand", "epsilon"])
    table = table.merge(per_group, on="hospital", how="left")
    return table, dict(result.fairness), eps


def _write(out: RunOutcome, run: RunSettings, seconds: float, n_nodes: int, seen: int) -> None:
    if out.allocations is not None:
        out.allocations.to_csv(out.path / "allocations.csv", index=False)
    rounds_frame(out.rounds).to_csv(out.path / "rounds.csv", index=False)
    write_json(
        out.path / "metrics.json",
        {
            "status": "failed" if out.error else "ok",
            "error": out.error,
            "config": run.as_config(),
            "nodes": n_nodes,
            "seconds": seconds,
            "epsilon_per_node": out.epsilon,
            "epsilon_max": max(out.epsilon.values(), default=None),
            "fairness": out.fairness,
            "rounds": out.rounds,
            "messages_audited": seen,
            "audit_violations": [{"node": n, "problem": p} for n, p in out.violations],
        },
    )


def make_app(overrides: Mapping[str, Any] | None = None, on_round: RoundCallback | None = None,
             outcome: list[RunOutcome] | None = None, resume: bool = False) -> ServerApp:
    """A ServerApp; `overrides` win over the run config (the Python simulation has none)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run = RunSettings.from_mapping(dict(context.run_config), overrides or {})
        finish(run_federation(grid, run, on_round=on_round, resume=resume), outcome)

    return app


def finish(result: RunOutcome, outcome: list[RunOutcome] | None) -> None:
    """Hand the outcome to a simulation driver, say where results are, fail the run on error."""
    if outcome is not None:
        outcome.append(result)
    log.info("results written to %s", result.path)
    print(f"fedalloc: results in {result.path}")
    if result.error:
        # A clear last line for operators; `flwr run` itself exits 0 either way (deploy/README.md).
        print(f"fedalloc: run FAILED: {result.error}")
        raise RuntimeError(result.error)
    print("fedalloc: run OK")


app = make_app()
