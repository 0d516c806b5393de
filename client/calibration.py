"""Choosing noise multipliers so a whole run fits a node's remaining budget.

Calibration is done against the ledger's full history with the same accountant the ledger uses,
so what is planned is exactly what will be charged. The ledger still checks every charge: a
calibration error can only make the node refuse, never overspend.
"""

from __future__ import annotations

from client.ledger import BudgetExceeded, Mechanism, compute_epsilon

SIGMA_MIN, SIGMA_MAX = 0.3, 500.0


def _smallest_sigma(eps_of_sigma, target: float, what: str, error: type[Exception] = BudgetExceeded) -> float:
    if eps_of_sigma(SIGMA_MAX) > target:
        raise error(f"{what}: even σ={SIGMA_MAX} exceeds the ε target {target:.3f}")
    if eps_of_sigma(SIGMA_MIN) <= target:
        return SIGMA_MIN
    lo, hi = SIGMA_MIN, SIGMA_MAX
    for _ in range(40):
        mid = (lo * hi) ** 0.5  # geometric: σ spans three orders of magnitude
        if eps_of_sigma(mid) > target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.001:
            break
    return hi


def release_sigma(target_eps: float, delta: float, accountant: str = "rdp") -> float:
    """σ of a single Gaussian release (q = 1, one step) costing at most `target_eps` alone."""
    # A request too small to calibrate is a configuration problem, not an exhausted budget.
    return _smallest_sigma(
        lambda s: compute_epsilon([(s, 1.0, 1)], delta, accountant), target_eps, "release", ValueError
    )


def training_sigma(
    history: list[tuple[float, float, int]],
    sample_rate: float,
    steps: int,
    then: list[Mechanism],
    target_eps: float,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """σ for `steps` DP-SGD steps at `sample_rate` so history + training + `then` ≤ target."""
    tail = [m.as_tuple() for m in then]

    def eps(s: float) -> float:
        return compute_epsilon(history + [(s, sample_rate, steps)] + tail, delta, accountant)

    return _smallest_sigma(eps, target_eps, "training")
