"""Choosing noise multipliers so a whole run fits a node's remaining budget.

Calibration uses the ledger's own accountant (client/accounting.py, record-level relations), so
what is planned is exactly what will be charged. The ledger still checks every charge: a
calibration error can only make the node refuse, never overspend. σ depends only on public values
(q, steps, ε, δ and the ledger's history), so results are cached: every fresh node of a simulation
asks the same question.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

from client.accounting import Mechanism, MechanismLike, as_mechanism, epsilon
from client.ledger import BudgetExceeded

SIGMA_MIN, SIGMA_MAX = 0.3, 500.0
RELEASE = "gaussian-release"


def _smallest_sigma(eps_of_sigma: Callable[[float], float], target: float, what: str,
                    error: type[Exception] = BudgetExceeded) -> float:
    if eps_of_sigma(SIGMA_MAX) > target:
        raise error(f"{what}: even σ={SIGMA_MAX} exceeds the ε target {target:.3f}")
    if eps_of_sigma(SIGMA_MIN) <= target:
        return SIGMA_MIN
    lo, hi = SIGMA_MIN, SIGMA_MAX
    while hi / lo > 1.001:
        mid = (lo * hi) ** 0.5  # geometric: σ spans three orders of magnitude
        if eps_of_sigma(mid) > target:
            lo = mid
        else:
            hi = mid
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
) -> float:
    """σ for `steps` DP-SGD steps (replace-one) at `sample_rate` so history + training + `then` ≤ target."""
    key = tuple(map(as_mechanism, history))
    return _training_sigma(key, float(sample_rate), int(steps), tuple(then), float(target_eps), float(delta))


@functools.lru_cache(maxsize=4096)
def _training_sigma(history: tuple[Mechanism, ...], sample_rate: float, steps: int, then: tuple[Mechanism, ...],
                    target_eps: float, delta: float) -> float:
    def eps(s: float) -> float:
        return epsilon(list(history) + [Mechanism(s, sample_rate, steps)] + list(then), delta)

    return _smallest_sigma(eps, target_eps, "training")
