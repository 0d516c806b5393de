"""A node answers one federated analytics query (core/queries.py) under DP, charged to its ledger.

Order: load and validate records, compute the exact answer (nothing leaves yet, so a query that
cannot be answered, e.g. a missing column, costs no budget), plan σ for the query's ε, charge the
ledger durably (refusing if the lifetime budget would be exceeded), then add Gaussian noise and
return the release. The charge is on disk before the noisy answer exists.

One query is one Gaussian release (σ, q = 1, one step) of the whole answer vector with the L2
sensitivity from :func:`core.queries.sensitivity`; for a mean that vector holds the scaled sum and
the count of every bin, so the ledger's ε after the query is exactly the requested ε.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd

from client.calibration import release_sigma
from client.ledger import Mechanism
from client.limits import OutsidePlan
from client.node import NodeSettings, check_catalogue, open_ledger
from core.drg import DRG_GROUPS
from core.queries import QuerySpec, local_answer, sensitivity
from core.records import load_records

log = logging.getLogger("fedalloc.node")

QUERY = "query-release"


@dataclass(frozen=True)
class ReleasePlan:
    """Noise for one query: multiplier σ, L2 sensitivity Δ, per-component std σ·Δ."""

    sigma: float
    sensitivity: float

    @property
    def noise_std(self) -> float:
        return self.sigma * self.sensitivity

    def mechanism(self) -> Mechanism:
        return Mechanism(self.sigma, 1.0, 1, QUERY, sensitivity=self.sensitivity)


def plan_release(spec: QuerySpec, delta: float, accountant: str = "rdp") -> ReleasePlan:
    """σ so that one Gaussian release costs the query's ε with the ledger's own accountant.

    A query ε so small that even the largest σ the calibrator tries cannot meet it is a bad
    query, not a spent budget, so it is reported as a configuration error.
    """
    return ReleasePlan(release_sigma(spec.epsilon, delta, accountant), sensitivity(spec))  # ValueError if too small


def noisy_release(exact: np.ndarray, plan: ReleasePlan, rng: np.random.Generator) -> np.ndarray:
    """The released vector: every component gets independent N(0, (σΔ)²) noise."""
    return exact + rng.normal(0.0, plan.noise_std, size=exact.shape)


def node_records(node: NodeSettings) -> pd.DataFrame:
    """The node's validated records (cached per file version; callers must not modify them)."""
    stat = os.stat(node.data_path)
    return _records_cached(str(node.data_path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=4)
def _records_cached(path: str, mtime: int, size: int) -> pd.DataFrame:
    return load_records(path)


def query_task(
    run_id: str, spec: QuerySpec, node: NodeSettings, rng: np.random.Generator | None = None
) -> dict[str, float]:
    """Answer `spec` on this node's records; return the MetricRecord content of the reply.

    Keys: ``query-answer-<i>`` for each component of the released vector, ``release-noise`` (the
    noise std actually used, σ·Δ) and ``epsilon`` (the node's total ε after this charge).
    Raises BudgetExceeded (ledger untouched) when the node cannot afford the query.
    """
    if spec.epsilon > node.max_epsilon_per_query:
        raise OutsidePlan(f"query asks ε {spec.epsilon} > this node's max-epsilon-per-query {node.max_epsilon_per_query}")
    if spec.group_by is not None:
        # Bins come from the query's catalogue: a node with its own copy refuses another list.
        check_catalogue(node, spec.catalogue or DRG_GROUPS)
    exact = local_answer(node_records(node), spec)
    ledger = open_ledger(node)
    plan = plan_release(spec, ledger.delta, ledger.accountant)
    eps = ledger.charge([plan.mechanism()], run=run_id, purpose=f"analytics query: {spec.describe()}")
    if rng is None:
        # debug_seed pins the noise for tests only; mixing in the ledger length keeps two queries
        # of one debug node from sharing a noise draw (their difference would cancel the noise).
        rng = np.random.default_rng(None if node.debug_seed is None else [node.debug_seed, len(ledger.entries)])
    noisy = noisy_release(exact, plan, rng)
    log.info("answered analytics query (%s); ε now %.3f", spec.describe(), eps)
    out: dict[str, float] = {f"query-answer-{i}": float(v) for i, v in enumerate(noisy)}
    out["release-noise"] = plan.noise_std
    out["epsilon"] = eps
    return out
