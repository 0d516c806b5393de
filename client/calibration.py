"""Choosing noise multipliers so a whole run fits a node's remaining budget.

Calibration uses the ledger's own accountant (client/accounting.py, record-level relations), so
what is planned is exactly what will be charged. The ledger still checks every charge: a
calibration error can only make the node refuse, never overspend. σ depends only on public values
(q, steps, rounds, ε, δ and the ledger's history), so results are cached per process: every fresh
node of a simulation asks the same question and only the first one searches.

The search composes the node's stored history state (one PLD, client/accounting.py) with the whole
training block self-composed, which is cheap for every candidate σ; the σ it finds is then checked
with the exact fold the charges will make (one entry per round, then `then`) and raised by 0.1 %
steps in the rare case the two differ in the last digits.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

from client.accounting import (REPLACE_ONE, EntryKey, Mechanism, MechanismLike, composed, entry_pld, epsilon,
                               epsilon_of_keys, history_key)
from client.ledger import BudgetExceeded

SIGMA_MIN, SIGMA_MAX = 0.3, 500.0
RELEASE = "gaussian-release"
TRAIN_RELATION = REPLACE_ONE  # DP-SGD on a fixed number of examples (client/accounting.py)
# The search aims this far (relative) below the target so that the exact per-round fold, which
# differs from the self-composed block by ~1e-10 relative (measured), almost never needs a nudge.
SEARCH_MARGIN = 1e-8
NUDGE = 1.001


def _smallest_sigma(eps_of_sigma: Callable[[float], float], target: float, what: str,
                    error: type[Exception] = BudgetExceeded) -> float:
    if eps_of_sigma(SIGMA_MAX) > target:
        raise error(f"{what}: even σ={SIGMA_MAX} exceeds the ε target {target:.3f}")
    lo, hi = SIGMA_MIN, SIGMA_MAX
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5  # geometric: σ spans three orders of magnitude
        if eps_of_sigma(mid) > target:
            lo = mid
        else:
            hi = mid
    # SIGMA_MIN is checked last and only when the search ended next to it: its PLD is the widest
    # and dearest to build (0.78 s CPU of a default plan's cold search, benchmarks/RESULTS.md), and
    # it can only be the answer when every σ tried fitted. Same result as checking it first.
    if lo == SIGMA_MIN and eps_of_sigma(SIGMA_MIN) <= target:
        return SIGMA_MIN
    return hi


@functools.lru_cache(maxsize=1024)
def _release_sigma(target_eps: float, delta: float) -> float:
    # A request too small to calibrate is a configuration problem, not an exhausted budget.
    return _smallest_sigma(lambda s: epsilon([Mechanism(s, 1.0, 1, RELEASE)], delta), target_eps, "release", ValueError)


def release_sigma(target_eps: float, delta: float, accountant: str = "pld") -> float:
    """σ of one Gaussian release (add/remove, q = 1, one step) costing at most `target_eps` alone."""
    return _release_sigma(float(target_eps), float(delta))


def training_sigma(
    history: Sequence[MechanismLike],
    sample_rate: float,
    steps: int,
    then: Sequence[Mechanism],
    target_eps: float,
    delta: float,
    accountant: str = "pld",
    rounds: int = 1,
) -> float:
    """σ for `steps` DP-SGD steps (replace-one) at `sample_rate` so history + training + `then` ≤ target.

    `rounds` > 1 says the steps will be charged as `rounds` equal entries (one per round): the plan
    is then checked against exactly that sequence of charges.
    """
    if rounds < 1 or steps % rounds:
        raise ValueError(f"{steps} steps cannot be split into {rounds} equal rounds")
    return _training_sigma(history_key(history), float(sample_rate), int(steps), history_key(then),
                           float(target_eps), float(delta), int(rounds))


@functools.lru_cache(maxsize=4096)
def _training_sigma(history: tuple[EntryKey, ...], sample_rate: float, steps: int, then: tuple[EntryKey, ...],
                    target_eps: float, delta: float, rounds: int) -> float:
    def approx(s: float) -> float:
        block = entry_pld(s, sample_rate, TRAIN_RELATION, steps)
        pld = block if not history else composed(history).compose(block)
        for e in then:
            pld = pld.compose(entry_pld(*e))
        return float(pld.get_epsilon_for_delta(delta))

    def exact(s: float) -> float:
        per_round = (s, sample_rate, TRAIN_RELATION, steps // rounds)
        return epsilon_of_keys((*history, *[per_round] * rounds, *then), delta)

    sigma = _smallest_sigma(approx, target_eps * (1 - SEARCH_MARGIN), "training")
    while exact(sigma) > target_eps:
        if sigma >= SIGMA_MAX:
            raise BudgetExceeded(f"training: even σ={SIGMA_MAX} exceeds the ε target {target_eps:.3f}")
        sigma = min(sigma * NUDGE, SIGMA_MAX)
    return sigma

