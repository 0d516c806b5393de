"""One coordinator runner, whatever trains the model.

A run is: the public initial model, the message audit, wait for the federation, N training
rounds by a `Workflow` (Flower strategies in `server/strategy.py`, SecAgg+ in `server/secagg.py`),
a `query.predict` round in which every node releases its D_i under DP, the allocation core, and
the results folder. Round records, checkpoints and resume, the predict round, the allocation and
the results are written here once; a workflow only trains and reports its rounds to the
`RoundLog` it is given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from statistics import NormalDist
from typing import Any, Callable, Protocol

import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from core.allocation import allocate
from core.protocol import DEMAND, DEMAND_HI, DEMAND_LO, DEMAND_MEDIAN, EPSILON, demand_key
from core.tables import numeric, read_text_table, unique_names
from core.run_config import RunSettings, plan_steps, public_examples
from forecasting.pretrain import initial_model
from server.audit import AuditingGrid, MessageAudit
from server.results import commit_round, resume_point, rounds_frame, run_dir, write_json

log = logging.getLogger("fedalloc.coordinator")
logging.getLogger("flwr").propagate = False

RoundCallback = Callable[[int, int, dict[str, Any]], None]


class RoundFailed(RuntimeError):
    pass


@dataclass
class RoundLog:
    """The run's round records (one per finished or failed round, numbered as in the run) and
    the commit of a finished round's model. `offset` rounds were finished before a resume."""

    offset: int = 0
    records: list[dict[str, Any]] = field(default_factory=list)
    on_commit: Callable[[int, ArrayRecord], None] = lambda r, a: None

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def commit(self, round_: int, arrays: ArrayRecord) -> None:
        self.on_commit(round_, arrays)


class Workflow(Protocol):
    """How the model is trained: rounds `log.offset + 1 … run.num_server_rounds` from `arrays`."""

    def audit(self, initial: ArrayRecord, run: RunSettings) -> MessageAudit: ...

    def min_nodes(self, run: RunSettings) -> int: ...

    def train(self, grid: Grid, run: RunSettings, arrays: ArrayRecord, nodes: list[int], log: RoundLog) -> ArrayRecord: ...


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


def public_plan(run: RunSettings) -> dict[str, float]:
    """What every honest node's reply must say, computed from public values only."""
    examples = public_examples(run, len(run.group_list))
    steps = plan_steps(examples, run.batch_size, run.local_epochs)
    return {"examples": examples, "sample_rate": steps.sample_rate, "steps": steps.steps,
            "weight_bound": run.weight_bound, "run_epsilon": run.epsilon}


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


def predict_round(grid: Grid, arrays: ArrayRecord, config: ConfigRecord, timeout: float) -> list[Message]:
    nodes = sorted(grid.get_node_ids())
    msgs = [
        Message(RecordDict({"arrays": arrays, "config": config}), dst_node_id=n, message_type="query.predict", group_id="predict")
        for n in nodes
    ]
    return list(grid.send_and_receive(msgs, timeout=timeout))


def run_federation(grid: Grid, run: RunSettings, workflow: Workflow | None = None, *,
                   on_round: RoundCallback | None = None, resume: bool = False) -> RunOutcome:
    """Train with `workflow` (default: the run config's Flower strategy), release, allocate.

    `resume=True` continues from the last committed round of the named run. A RoundFailed or
    a bad request ends the run with `error` set and the results written; anything else (a
    crashing callback, KeyboardInterrupt) propagates with the last checkpoint on disk.
    """
    if workflow is None:
        from server.strategy import StrategyWorkflow

        workflow = StrategyWorkflow()
    name = run.run_name or datetime.now().strftime("run-%Y%m%d-%H%M%S")
    # Nodes key their run plan and ledger entries by this public name, so it must be sent.
    run = dataclasses.replace(run, run_name=name)
    out = RunOutcome(path=run_dir(run.results_dir, name))
    # The first global model is pretrained on public synthetic hospitals (no ε, forecasting/pretrain.py).
    arrays = ArrayRecord(initial_model(run).state_dict())
    audit = workflow.audit(arrays, run)
    grid = AuditingGrid(grid, audit)
    rounds = RoundLog()
    point = resume_point(out.path) if resume else None
    if point is not None:
        arrays, state = point
        rounds.offset = int(state.get("rounds_done", 0))
        rounds.records = list(state.get("rounds", []))[: rounds.offset]
        log.info("resuming %s after round %d", name, rounds.offset)
    rounds.on_commit = _committer(out.path, run, rounds, on_round)
    t0 = time.monotonic()
    nodes: list[int] = []
    try:
        # Read once, up front: a bad file fails the run before any node spends ε.
        resources = read_resources(run.resources_file) if run.resources_file else None
        nodes = wait_for_nodes(grid, workflow.min_nodes(run), run.round_timeout)
        if rounds.offset < run.num_server_rounds:
            arrays = workflow.train(grid, run, arrays, nodes, rounds)
        replies = predict_round(grid, arrays, ConfigRecord(run.node_config()), run.round_timeout)
        out.allocations, out.fairness, out.epsilon = allocate_released(run, replies, resources)
    except (RoundFailed, ValueError) as exc:
        out.error = str(exc)
        log.error("run %s failed: %s", name, exc)
    out.rounds = rounds.records
    out.violations = audit.violations
    # Nodes may join after the run starts; count those connected at the end.
    write_results(out, run, time.monotonic() - t0, max(len(nodes), len(list(grid.get_node_ids()))), audit.seen)
    return out


def _committer(path: Path, run: RunSettings, rounds: RoundLog,
               on_round: RoundCallback | None) -> Callable[[int, ArrayRecord], None]:
    def commit(round_: int, arrays: ArrayRecord) -> None:
        commit_round(path, round_, arrays, {"rounds_done": round_, "rounds": rounds.records})
        if on_round:
            on_round(round_, run.num_server_rounds, rounds.records[-1])

    return commit


def read_resources(path: str) -> dict[str, float]:
    """The coordinator's public `hospital,resources` file → {hospital: R_i}."""
    frame, lines, problems = read_text_table(path, ("hospital", "resources"), "hospital rows")
    names = unique_names(frame, lines, "hospital", problems, "hospital") if "hospital" in frame.columns else None
    values = numeric(frame, lines, "resources", problems) if "resources" in frame.columns else None
    problems.raise_if_any()
    assert names is not None and values is not None  # a missing column is a problem raised above
    return dict(zip(names, values.tolist()))


def released_demand(run: RunSettings, replies: list[Message]) -> pd.DataFrame:
    """One row per node that released D_i: hospital, demand, its 80 % interval (demand_lo,
    demand_median, demand_hi; NaN from a node that sent none), epsilon, demand_<group>."""
    rows = []
    for msg in replies:
        if msg.has_error():
            log.warning("node %s did not release D_i: %s", msg.metadata.src_node_id, msg.error.reason)
            continue
        m = msg.content["metrics"]
        rows.append({"hospital": str(msg.content["node"]["hospital"]), "demand": float(m[DEMAND]),
                     **{col: float(m.get(key, math.nan)) for col, key in INTERVAL_COLUMNS.items()},
                     "epsilon": float(m[EPSILON]), **{f"demand_{g}": float(m[demand_key(g)]) for g in run.group_list}})
    if len(rows) < max(run.min_nodes, 1):
        raise RoundFailed(f"predict round: only {len(rows)} nodes released D_i (minimum {run.min_nodes})")
    return pd.DataFrame(rows).sort_values("hospital").reset_index(drop=True)


INTERVAL_COLUMNS = {"demand_lo": DEMAND_LO, "demand_median": DEMAND_MEDIAN, "demand_hi": DEMAND_HI}
Z90 = NormalDist().inv_cdf(0.9)


def quantile_args(run: RunSettings, released: pd.DataFrame) -> dict[str, Any]:
    """allocate()'s quantile arguments for run-config `allocate-on` (none for "mean").

    The allocation core allocates on max(D + z_q·std, 0); with q = 0.9 and std = (hi − D)/z_0.9
    that is exactly the released hi (q = 0.1, std = (D − lo)/z_0.9: lo), so the policy uses the
    chosen bound while fairness is still measured against the mean D. `demand_std` in the table
    is that normal-equivalent spread, not a separate estimate.
    """
    if run.allocate_on == "mean":
        return {}
    missing = released.hospital[released[["demand_lo", "demand_hi"]].isna().any(axis=1)].tolist()
    if missing:
        raise ValueError(f"allocate-on {run.allocate_on}: hospital(s) {', '.join(missing)} released no interval")
    d = released.demand.to_numpy()
    if run.allocate_on == "q90":
        return {"quantile": 0.9, "demand_std": (released.demand_hi.to_numpy() - d) / Z90}
    return {"quantile": 0.1, "demand_std": (d - released.demand_lo.to_numpy()) / Z90}


def allocate_released(run: RunSettings, replies: list[Message], resources: dict[str, float] | None = None,
                      ) -> tuple[pd.DataFrame, dict[str, float], dict[str, float]]:
    """(allocation table, fairness, ε per hospital) from the predict round's replies; `resources`
    as read by `read_resources(run.resources_file)` (read here if not given)."""
    released = released_demand(run, replies)
    if resources is None and run.resources_file:
        resources = read_resources(run.resources_file)
    if resources is not None:
        missing = sorted(set(released.hospital) - set(resources))
        if missing:
            raise ValueError(f"{run.resources_file}: no resources for hospital(s) {', '.join(missing)}")
        r = released.hospital.map(resources).astype(float).to_numpy()
    else:
        log.warning("no resources-file given: every hospital gets R_i = 1")
        r = [1.0] * len(released)
    cat = run.catalogue
    group_demand = released[[f"demand_{g}" for g in cat.groups]].to_numpy() if run.policy == "drg_budget" else None
    # drg_budget pays each group's demand at the catalogue's relative weight (same order as the columns).
    result = allocate(released.demand.to_numpy(), r, run.total, run.policy, integer=run.integer,
                      group_demand=group_demand, hospitals=released.hospital.tolist(),
                      relative_weights=[cat.weights[g] for g in cat.groups] if group_demand is not None else None,
                      **quantile_args(run, released))
    table = result.table.merge(released.drop(columns=["demand", "epsilon"]), on="hospital", how="left")
    # The interval next to the mean it belongs to.
    cols = [c for c in table.columns if c not in INTERVAL_COLUMNS]
    at = cols.index("demand") + 1
    table = table[cols[:at] + list(INTERVAL_COLUMNS) + cols[at:]]
    return table, dict(result.fairness), dict(zip(released.hospital, released.epsilon))


def write_results(out: RunOutcome, run: RunSettings, seconds: float, n_nodes: int, seen: int) -> None:
    if out.allocations is not None:
        out.allocations.to_csv(out.path / "allocations.csv", index=False)
    rounds_frame(out.rounds).to_csv(out.path / "rounds.csv", index=False)
    write_json(out.path / "metrics.json", {
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
    })


def finish(result: RunOutcome, on_finish: Callable[[RunOutcome], None] | None = None) -> None:
    """Hand the outcome to a simulation driver, say where results are, fail the run on error."""
    if on_finish is not None:
        on_finish(result)
    log.info("results written to %s", result.path)
    print(f"fedalloc: results in {result.path}")
    if result.error:
        # A clear last line for operators; `flwr run` itself exits 0 either way (deploy/README.md).
        print(f"fedalloc: run FAILED: {result.error}")
        raise RuntimeError(result.error)
    print("fedalloc: run OK")
