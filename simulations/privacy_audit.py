"""Record-level privacy audit of a node's DP-SGD: one-run auditing with canaries.

What is audited is the claim the ledger makes: "this node's DP-SGD training (noise multiplier σ,
Poisson rate q, T steps, clip C) is (ε, δ)-DP for one changed example", where one example is one
(window, group) pair and a record changes one example (docs/DESIGN.md "Privacy unit": the
neighbouring relation is *replace-one*). The audit runs the node's own training code,
`client.dp_training.train_dp` (Opacus, same clipping, Poisson sampling, expected batch size, lr and
epochs as the node), on the node's own examples (synthetic hospital → `demand_series` →
`training_examples` with the run configuration), with canaries inserted at the node.

Method (Steinke, Nasr & Jagielski 2023, "Privacy Auditing with One (1) Training Run", NeurIPS;
the p-value is their Corollary on (ε, δ)-DP, code from their Appendix D):

1. Canaries. m canary slots replace m of the node's examples, `canaries_per_run` per training run.
   Canary i has fixed inputs (lag window, group, calendar position) and a target shifted by
   ±`canary_target` in one horizon period; a fair coin S_i ∈ {−1, +1}, drawn independently of
   everything else, picks the sign. The two versions of slot i are replace-one neighbours (the
   relation the claimed ε is accounted under) and its worst case: their loss is so large that their
   per-example gradients are always clipped, to opposite directions a_i ≈ −b_i of norm C, so a
   sampled slot moves the noisy sum by the full 2C the replace-one accountant allows. The auditor
   draws candidate inputs at random (lag values independent per period, unlike a hospital's
   block-averaged windows) and keeps the most identifiable ones (largest matched-filter SNR at θ_0
   against the node's examples and the canaries already kept, at the charged σ).
2. Training. The slots plus the node's remaining examples (so the dataset size, hence q and T, are
   the node's) are trained with `train_dp` at the σ under audit. A forward pre-hook on the model
   records the parameters before every step: white-box access to every iterate, which DP-SGD's
   accounting covers (it composes every noisy step). Independent runs pool their canaries: flipping
   one S_i still changes one example of one run.
3. Score. Any function of the iterates (and of what the auditor knows: every example, both
   versions of every canary, q, lr, B) is allowed; the bound's validity does not depend on it. It
   must not, and does not, use the signs or which examples Poisson sampling picked. At step t,
   Δ_t = (θ_t − θ_{t+1})·B/(lr·C) = Σ_sampled clipped gradients + N(0, σ²I). The auditor recomputes
   every clipped gradient at θ_t, subtracts Δ_t's expectation, and applies the matched filter
   f_i = (σ̂²I + C_t)⁻¹(a_i − b_i), C_t the covariance of everything else a step adds (Poisson
   sampling of the node's examples and of the other canaries). The noise σ̂ is measured from the
   iterates (‖Δ_t − EΔ_t‖² = dσ² + tr C_t), i.e. it is the σ the training really used. Per canary
   the score is Σ_t log[(1−q)N(x_t; μ₀, v) + qN(x_t; μ₊, v)] − log[… μ₋ …], the likelihood ratio of
   "+" vs "−" with the slot sampled with probability q. This works for any model size: the MLP
   (d = 5,428 > #examples) and the ~60-parameter seasonal forecaster (d < #examples).
4. Guesses, fixed in advance: the r/2 highest scores are guessed "+", the r/2 lowest "−", the rest
   abstain (r = `guess_fraction`·m). With v of r correct, ε_lb is the largest ε whose p-value
   P[≥ v correct | (ε, δ)-DP] is below β: "the training is not (ε_lb, δ)-DP", confidence 1 − β.

The largest ε_lb this sample size can show is `max_eps_lower_bound(m, r, δ, β)` (v = r: 4.18 for
m = 500, r = 200). The audit can only refute a claimed ε below that, which is why the default
claimed ε is 3 (the node's default run ε) and not 8: one run with hundreds of canaries cannot
certify ε ≈ 8 (that needs ~2·10⁴ canaries, all guessed right). The one-run bound is loose for
honest runs (measured 0.34–0.87 over 10 seeds at ε = 3); it refutes gross violations (a 5× noise
cut, true ε ≈ 58: ε_lb 3.72–4.18 over 10 seeds) but not σ calibrated under add/remove instead of
replace-one (σ × 0.81, true ε 4.0: ε_lb 0.5–0.8). Numbers and commands: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Callable
from typing import Any
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_CLAIMED_EPSILON = 3.0


# ---------------------------------------------------------------------------------------------
# One-run auditing statistics (Steinke, Nasr & Jagielski 2023, Appendix D)
# ---------------------------------------------------------------------------------------------


def p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """P[≥ v of r guesses correct] for m canaries if the training is (ε, δ)-DP (App. D)."""
    from scipy.stats import binom

    if not (0 <= v <= r <= m):
        raise ValueError(f"need 0 ≤ v ≤ r ≤ m, got v={v}, r={r}, m={m}")
    if not (eps >= 0 and 0 <= delta <= 1):
        raise ValueError("need ε ≥ 0 and 0 ≤ δ ≤ 1")
    q = 1.0 / (1.0 + math.exp(-eps))  # accuracy of ε-DP randomised response
    tail = float(binom.sf(v - 1, r, q))  # P[Binomial(r, q) ≥ v]
    if delta == 0:
        return min(tail, 1.0)
    alpha, acc = 0.0, 0.0
    pmf = binom.pmf(np.arange(v - 1, -1, -1), r, q) if v > 0 else np.zeros(0)  # pmf(v−i), i = 1..v
    for i, p in enumerate(pmf, start=1):
        acc += float(p)  # P[v > Binomial(r, q) ≥ v − i]
        if acc > i * alpha:
            alpha = acc / i
    return min(tail + alpha * delta * 2 * m, 1.0)


def eps_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """Largest ε rejected at level β by v correct out of r guesses on m canaries (App. D bisection).

    Returns the conservative (low) end of the bracket; 0 when nothing can be rejected.
    """
    if not (0 < beta < 1):
        raise ValueError("need 0 < β < 1")
    lo, hi = 0.0, 1.0
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    while p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi + 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def max_eps_lower_bound(m: int, r: int, delta: float, beta: float) -> float:
    """The largest bound the audit can show with m canaries and r guesses: every guess correct."""
    return eps_lower_bound(m, r, r, delta, beta)


# ---------------------------------------------------------------------------------------------
# Accounting: DP-SGD under replace-one (Google dp_accounting PLD)
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=256)
def replace_one_epsilon(sigma: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε of `steps` Poisson-subsampled Gaussian steps under the replace-one relation (PLD)."""
    import dp_accounting
    from dp_accounting.pld import privacy_loss_distribution as pld

    dist = pld.from_gaussian_mechanism(
        sigma, sensitivity=1.0, sampling_prob=sample_rate,
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE,
        value_discretization_interval=1e-3)
    return float(dist.self_compose(steps).get_epsilon_for_delta(delta))


@lru_cache(maxsize=64)
def replace_one_sigma(eps: float, sample_rate: float, steps: int, delta: float) -> float:
    """Smallest σ (to 0.1 %, rounded up) with replace_one_epsilon(σ) ≤ ε."""
    lo, hi = 0.05, 1000.0
    if replace_one_epsilon(hi, sample_rate, steps, delta) > eps:
        raise ValueError(f"even σ={hi} exceeds ε={eps}")
    while hi / lo > 1.001:
        mid = math.sqrt(lo * hi)
        if replace_one_epsilon(mid, sample_rate, steps, delta) > eps:
            lo = mid
        else:
            hi = mid
    return hi


# ---------------------------------------------------------------------------------------------
# Configuration, node data, canaries
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrivacyAuditConfig:
    claimed_epsilon: float = DEFAULT_CLAIMED_EPSILON
    delta: float = 1e-5
    beta: float = 0.05  # 1 − confidence of the lower bound
    canaries: int = 500  # m, pooled over runs
    canaries_per_run: int = 20  # slots replaced in one training run of the node's examples
    guess_fraction: float = 0.4  # r = guess_fraction·m guesses: r/2 top "+", r/2 bottom "−"
    rounds: int = 1  # node rounds trained (each one train_dp call of local-epochs epochs)
    hospital: int = 0  # synthetic hospital whose examples are the node's data
    data_seed: int = 0
    canary_target: float = 1000.0  # |target shift| of a canary (log1p scale): always clipped
    canary_input_scale: float = 2.0  # canary lag inputs uniform in [0, scale × the data's largest input]
    canary_pool: int = 10  # candidates per canary; the most identifiable are kept
    run_overrides: dict = field(default_factory=dict)  # run-config keys, e.g. {"batch-size": 32}

    @property
    def guesses(self) -> int:
        r = int(round(self.guess_fraction * self.canaries))
        return max(2, min(self.canaries - self.canaries % 2, r - r % 2))

    def check(self) -> None:
        if not (self.claimed_epsilon > 0 and 0 < self.delta < 1 and 0 < self.beta < 1):
            raise ValueError("need ε > 0, 0 < δ < 1 and 0 < β < 1")
        if self.canaries < 2 or self.canaries_per_run < 1 or self.rounds < 1 or self.canary_pool < 1:
            raise ValueError("need ≥ 2 canaries, ≥ 1 canary per run, ≥ 1 round and a pool ≥ 1")
        if not (0 < self.guess_fraction <= 1 and self.canary_input_scale > 0):
            raise ValueError("need 0 < guess_fraction ≤ 1 and canary_input_scale > 0")


def run_settings(cfg: PrivacyAuditConfig):
    from core.run_config import RunSettings

    return RunSettings.from_mapping(cfg.run_overrides)


def node_model(run):
    """The model a node starts from: `forecasting.model.build_model` for the run (data-free init)."""
    from forecasting.model import build_model
    from core.drg import DRG_GROUPS

    kwargs = {"period": run.period} if "period" in inspect.signature(build_model).parameters else {}
    return build_model(run.lags, run.horizon, len(DRG_GROUPS), **kwargs)


def node_examples(cfg: PrivacyAuditConfig):
    """The node's training examples, built as a node builds them from its records."""
    from forecasting.features import training_examples
    from core.drg import DRG_GROUPS
    from core.series import demand_series
    from core.synthetic import SyntheticConfig, generate_hospital_records

    run = run_settings(cfg)
    scfg = SyntheticConfig(hospitals=cfg.hospital + 1, seed=cfg.data_seed, start=run.start)
    records = generate_hospital_records(scfg, cfg.hospital)
    series = demand_series(records, start=run.start, end=run.cutoff, period=run.period, measure=run.measure,
                           los_cap=run.los_cap, groups=DRG_GROUPS)
    return training_examples(series, run.lags, run.horizon, run.window_stride, blocks=run.release_blocks)


def _subset_examples(ex, idx: np.ndarray):
    from forecasting.features import Examples

    return Examples(x_log=ex.x_log[idx], group=ex.group[idx], season=ex.season[idx], y_log=ex.y_log[idx])


@dataclass(frozen=True)
class Canaries:
    """Canaries with fixed inputs whose target in horizon period `period` is shifted by ±`target`."""

    x_log: np.ndarray  # (m, lags)
    group: np.ndarray  # (m,)
    season: np.ndarray  # (m, 2)
    period: np.ndarray  # (m,) horizon index that is shifted
    horizon: int
    target: float

    def __len__(self) -> int:
        return len(self.group)

    def subset(self, idx: np.ndarray) -> "Canaries":
        return replace(self, x_log=self.x_log[idx], group=self.group[idx], season=self.season[idx],
                       period=self.period[idx])

    def y_log(self, signs: np.ndarray) -> np.ndarray:
        """Targets for the given signs (±1 each): the window's mean input, except ±target in `period`."""
        y = np.repeat(self.x_log.mean(axis=1, keepdims=True), self.horizon, axis=1)
        y[np.arange(len(self)), self.period] = np.asarray(signs, dtype=np.float64) * self.target
        return y.astype(np.float32)


def make_canaries(rng: np.random.Generator, m: int, *, lags: int, horizon: int, n_groups: int, target: float,
                  input_max: float) -> Canaries:
    """Candidates: lag inputs drawn independently per period (a hospital's windows are block means,
    so these point the gradient where the data's do not), a random group, calendar position and
    shifted period."""
    angle = rng.uniform(0, 2 * np.pi, m)
    return Canaries(
        x_log=rng.uniform(0.0, input_max, (m, lags)).astype(np.float32),
        group=rng.integers(0, n_groups, m).astype(np.int64),
        season=np.stack([np.sin(angle), np.cos(angle)], axis=1).astype(np.float32),
        period=rng.integers(0, horizon, m).astype(np.int64),
        horizon=horizon,
        target=float(target),
    )


def with_canaries(ex, slots: np.ndarray, canaries: Canaries, signs: np.ndarray):
    """The node's examples with example `slots[i]` replaced by canary i with sign `signs[i]`."""
    from forecasting.features import Examples

    x, g, s, y = ex.x_log.copy(), ex.group.copy(), ex.season.copy(), ex.y_log.copy()
    x[slots], g[slots], s[slots], y[slots] = canaries.x_log, canaries.group, canaries.season, canaries.y_log(signs)
    return Examples(x_log=x, group=g, season=s, y_log=y)


# ---------------------------------------------------------------------------------------------
# Per-example clipped gradients, recomputed by the auditor
# ---------------------------------------------------------------------------------------------


def _flat_params(module):
    import torch

    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).to(torch.float64)  # a copy


def _per_example_grad_fn(run):
    """(θ flat, examples) → per-example gradients of the node's loss (mean squared error over the
    horizon, which is what Opacus clips for train_dp's MSELoss), as one vmap over the examples."""
    import torch
    from torch.func import functional_call, grad, vmap

    template = node_model(run)
    names = [n for n, _ in template.named_parameters()]
    shapes = [p.shape for _, p in template.named_parameters()]
    sizes = [p.numel() for _, p in template.named_parameters()]

    def loss(theta, x, g, s, y):
        params = {n: t.reshape(sh) for n, t, sh in zip(names, torch.split(theta, sizes), shapes)}
        pred = functional_call(template, params, (x[None], g[None], s[None]))
        return ((pred - y[None]) ** 2).mean()

    return vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))


def _clipped(fn, theta, x, g, s, y, clip: float):
    """Opacus's flat per-sample clipping, g · min(1, C / (‖g‖ + 1e-6)), in units of C (float64)."""
    import torch

    gr = fn(theta.to(torch.float32), torch.from_numpy(x), torch.from_numpy(g), torch.from_numpy(s), torch.from_numpy(y))
    gr = torch.nan_to_num(gr, nan=0.0, posinf=0.0, neginf=0.0)
    norms = gr.norm(dim=1, keepdim=True)
    return (gr * (clip / (norms + 1e-6)).clamp(max=1.0)).to(torch.float64) / clip


@dataclass
class StepGradients:
    data: "torch.Tensor"  # noqa: F821 (n_data, d) clipped gradients of the node's other examples
    plus: "torch.Tensor"  # noqa: F821 (m, d) canaries' "+" versions
    minus: "torch.Tensor"  # noqa: F821 (m, d) canaries' "−" versions


def _step_gradients(fn, theta, base, canaries: Canaries, clip: float) -> StepGradients:
    m, n_data = len(canaries), len(base)
    x = np.concatenate([base.x_log, canaries.x_log, canaries.x_log])
    g = np.concatenate([base.group, canaries.group, canaries.group])
    s = np.concatenate([base.season, canaries.season, canaries.season])
    y = np.concatenate([base.y_log, canaries.y_log(np.ones(m)), canaries.y_log(-np.ones(m))])
    grads = _clipped(fn, theta, x, g, s, y, clip)
    return StepGradients(grads[:n_data], grads[n_data:n_data + m], grads[n_data + m:])


def _filter_rows(gr: StepGradients, q: float):
    """Rows U of the covariance UᵀU the matched filter guards against, besides the noise.

    The node's examples each enter a step with probability q: many small independent terms, so
    their covariance q(1−q)·ddᵀ is a good Gaussian model. A canary enters as a rare, large jump
    (probability q, norm ≈ C), which a Gaussian with variance q/2·(aaᵀ + bbᵀ) under-weights: one
    sampled canary with a direction close to canary i's would then read as strong evidence about
    canary i. So the filter weighs every canary at 1/2·(aaᵀ + bbᵀ), as if always present, which
    nearly projects the other canaries out (its own term is along its own direction and does not
    change its filter's direction)."""
    import torch

    return torch.cat([math.sqrt(q * (1 - q)) * gr.data, math.sqrt(0.5) * gr.plus, math.sqrt(0.5) * gr.minus])


def _whiten(u, vectors, sigma2: float):
    """(σ²I + UᵀU)⁻¹ vectorsᵀ for the rows `vectors`, as rows (Woodbury when U has fewer rows than d)."""
    import torch

    k, d = u.shape
    if k < d:
        gram = sigma2 * torch.eye(k, dtype=u.dtype) + u @ u.T
        y = torch.linalg.solve(gram, u @ vectors.T)
        return (vectors - (u.T @ y).T) / sigma2
    cov = sigma2 * torch.eye(d, dtype=u.dtype) + u.T @ u
    return torch.linalg.solve(cov, vectors.T).T


def select_canaries(pool: Canaries, base, count: int, theta, run, *, q: float, sigma: float) -> np.ndarray:
    """Greedily pick `count` candidates with the largest matched-filter SNR wᵀ(σ²I + C)⁻¹w at θ_0
    (w = a − b), where C is what the filter guards against (`_filter_rows`): the node's examples and
    the canaries already picked. Depends on the data, θ_0 and σ only, never on the signs, so the
    bound stays valid."""
    import torch

    fn = _per_example_grad_fn(run)
    gr = _step_gradients(fn, theta, base, pool, run.clip_norm)
    w = gr.plus - gr.minus
    # work in an orthonormal basis of the span of every vector involved (the noise is isotropic)
    allv = torch.cat([gr.data, gr.plus, gr.minus])
    if allv.shape[0] < allv.shape[1]:
        basis, _ = torch.linalg.qr(allv.T)
        coords = lambda v: v @ basis  # noqa: E731
    else:
        coords = lambda v: v  # noqa: E731
    dc, ac, bc, wc = coords(gr.data), coords(gr.plus), coords(gr.minus), coords(w)
    k = dc.shape[1]
    cov = sigma ** 2 * torch.eye(k, dtype=dc.dtype) + q * (1 - q) * dc.T @ dc
    inv = torch.linalg.inv(cov)
    sw = wc @ inv  # rows: (Σ⁻¹ w_c)ᵀ
    chosen: list[int] = []
    for _ in range(min(count, len(pool))):
        snr = (sw * wc).sum(dim=1)
        snr[chosen] = -math.inf
        c = int(torch.argmax(snr))
        chosen.append(c)
        for v in (math.sqrt(0.5) * ac[c], math.sqrt(0.5) * bc[c]):  # Sherman–Morrison: Σ += vvᵀ (as in the filter)
            iv = inv @ v
            denom = 1.0 + float(v @ iv)
            inv = inv - torch.outer(iv, iv) / denom
            sw = sw - torch.outer(wc @ iv, iv) / denom
    return np.array(chosen, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Training through the node's train_dp, recording every iterate
# ---------------------------------------------------------------------------------------------


def train_with_transcript(ex, *, sigma: float, run, rounds: int, seed: int):
    """`rounds` successive `train_dp` calls (as a node does, each from the previous model) on `ex`.

    Returns (iterates θ_0 … θ_T as float64 tensors, sample rate q, steps T). The hook sees only the
    parameters, never the batch, so the scores cannot use which examples were sampled.
    """
    from client.dp_training import train_dp

    accepts_seed = "seed" in inspect.signature(train_dp).parameters
    seeds = np.random.SeedSequence(seed).generate_state(rounds, dtype=np.uint64)
    state, iterates, q, steps, final = None, [], None, 0, None
    for k in range(rounds):
        model = node_model(run)
        if state is not None:
            model.load_state_dict(state)
        seen: list = []
        hook = model.register_forward_pre_hook(lambda module, args: seen.append(_flat_params(module)))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = train_dp(model, ex, noise_multiplier=sigma, max_grad_norm=run.clip_norm, batch_size=run.batch_size,
                            epochs=run.local_epochs, lr=run.lr,
                            **({"seed": int(seeds[k] >> np.uint64(2))} if accepts_seed else {}))
        hook.remove()
        if len(seen) != plan.steps:
            raise RuntimeError(f"train_dp ran {plan.steps} steps but the model was called {len(seen)} times: "
                               "the audit's one-forward-per-step transcript no longer matches train_dp")
        iterates.extend(seen)
        q, steps = plan.sample_rate, steps + plan.steps
        state = {name: v.detach().clone() for name, v in model.state_dict().items()}
        final = _flat_params(model)
    iterates.append(final)
    return iterates, float(q), int(steps)


# ---------------------------------------------------------------------------------------------
# Scoring: a matched filter per canary and step, then a likelihood ratio over the steps
# ---------------------------------------------------------------------------------------------


@dataclass
class RunStatistics:
    x: np.ndarray  # (T, m) filtered statistic
    mu_none: np.ndarray  # (T, m) its mean if the slot was not sampled
    mu_plus: np.ndarray  # (T, m) … if sampled with the "+" version
    mu_minus: np.ndarray  # (T, m) … if sampled with the "−" version
    var: np.ndarray  # (T, m) its variance from the noise and every other example
    sigma_hat: float  # noise multiplier measured from the iterates


def run_statistics(iterates, base, canaries: Canaries, *, q: float, lr: float, clip: float, expected_batch: int,
                   run) -> RunStatistics:
    """Per step t the update is Δ_t = (θ_t − θ_{t+1})·B/(lr·C) = Σ_sampled clipped gradients + N(0, σ²I).

    The auditor knows every example and both versions of every canary, so at θ_t it recomputes all
    clipped gradients, subtracts Δ_t's expectation over Poisson sampling and the unknown signs, and
    projects the rest on f_i = (σ̂²I + C_t)⁻¹(a_i − b_i): the matched filter for "canary i is + or −"
    against the noise and the interference C_t of everything else (see `_filter_rows`). σ̂ is measured first, from
    ‖Δ_t − E Δ_t‖² = dσ² + tr C_t (it is the σ the training really used, whatever was charged).
    """
    import torch

    fn = _per_example_grad_fn(run)
    steps = len(iterates) - 1
    deltas = [(iterates[t] - iterates[t + 1]) * (expected_batch / (lr * clip)) for t in range(steps)]

    def expectation(gr: StepGradients):
        return q * gr.data.sum(dim=0) + q * (gr.plus + gr.minus).sum(dim=0) / 2

    total, dims = 0.0, 0
    for t in range(steps):  # pass 1: σ̂ (moment estimator)
        gr = _step_gradients(fn, iterates[t], base, canaries, clip)
        r = deltas[t] - expectation(gr)
        trace = (q * (1 - q) * (gr.data ** 2).sum() + q / 2 * ((gr.plus ** 2).sum() + (gr.minus ** 2).sum())
                 - q * q / 4 * ((gr.plus + gr.minus) ** 2).sum())
        total += float(r @ r - trace)
        dims += r.numel()
    sigma_hat = math.sqrt(max(total / max(dims, 1), 1e-8))

    out = {k: [] for k in ("x", "mu_none", "mu_plus", "mu_minus", "var")}
    for t in range(steps):  # pass 2: matched filters
        gr = _step_gradients(fn, iterates[t], base, canaries, clip)
        r = deltas[t] - expectation(gr)
        w = gr.plus - gr.minus
        f = _whiten(_filter_rows(gr, q), w, sigma_hat ** 2)  # (m, d) one filter per canary
        af, bf = (gr.plus * f).sum(1), (gr.minus * f).sum(1)
        sf = af + bf
        # variance of ⟨r, f⟩ from the noise, the node's examples and the *other* canaries (each in
        # with probability q as + or −), in the Gaussian approximation the likelihood uses
        fa, fb = f @ gr.plus.T, f @ gr.minus.T  # (m, m): ⟨f_i, a_j⟩, ⟨f_i, b_j⟩
        var = (sigma_hat ** 2 * (f * f).sum(1) + q * (1 - q) * ((f @ gr.data.T) ** 2).sum(1)
               + q / 2 * ((fa ** 2).sum(1) + (fb ** 2).sum(1)) - q / 2 * (af ** 2 + bf ** 2))
        out["x"].append((f @ r).numpy())
        out["mu_none"].append((-q * sf / 2).numpy())
        out["mu_plus"].append((af - q * sf / 2).numpy())
        out["mu_minus"].append((bf - q * sf / 2).numpy())
        out["var"].append(var.clamp_min(0.0).numpy())
    return RunStatistics(**{k: np.array(v) for k, v in out.items()}, sigma_hat=sigma_hat)


def step_llrs(st: RunStatistics, q: float) -> np.ndarray:
    """(T, m) log p(x_t | +) − log p(x_t | −), p = (1−q)·N(μ_none, v) + q·N(μ_±, v)."""
    ok = st.var > 1e-12
    v = np.where(ok, st.var, 1.0)

    def logp(mu):
        return np.logaddexp(math.log1p(-q) - 0.5 * (st.x - st.mu_none) ** 2 / v,
                            math.log(q) - 0.5 * (st.x - mu) ** 2 / v)

    return np.where(ok, logp(st.mu_plus) - logp(st.mu_minus), 0.0)


def llr_scores(st: RunStatistics, q: float) -> np.ndarray:
    """Per canary, the log-likelihood ratio of "+" vs "−" over all steps (steps independent given θ_t)."""
    return step_llrs(st, q).sum(axis=0)


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


@dataclass
class AuditResult:
    label: str
    claimed_epsilon: float
    delta: float
    confidence: float
    noise_multiplier: float  # σ the training actually used
    charged_noise_multiplier: float  # σ the claimed ε was computed for
    true_epsilon: float  # replace-one PLD ε of the σ actually used
    sample_rate: float
    steps: int
    canaries: int
    guesses: int
    correct: int
    eps_lower_bound: float
    max_possible_bound: float
    flagged: bool  # eps_lower_bound > claimed ε: the claim is refuted at confidence 1 − β
    measured_noise_multiplier: float  # σ̂ from the iterates (diagnostic, mean over runs)
    runs: int
    seed: int
    seconds: float
    scores: np.ndarray = field(repr=False, default=None)  # per canary (plots); not in as_row
    signs: np.ndarray = field(repr=False, default=None)

    def as_row(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("scores", "signs")}


def node_plan(cfg: PrivacyAuditConfig, n_examples: int) -> tuple[float, int]:
    """(q, T) the node's train_dp uses for `rounds` rounds on n examples."""
    from client.dp_training import plan_steps

    run = run_settings(cfg)
    plan = plan_steps(n_examples, run.batch_size, run.local_epochs)
    return plan.sample_rate, plan.steps * cfg.rounds


def charged_sigma(eps: float, sample_rate: float, steps: int, delta: float) -> float:
    """The σ a node charges for ε: the node's own calibration (`client.calibration.training_sigma`,
    replace-one PLD), falling back to this module's independent `replace_one_sigma` on an older
    calibration API. `replace_one_epsilon` (independent of the node's accountant) reports the true ε."""
    try:
        from client.calibration import training_sigma

        return float(training_sigma([], sample_rate, steps, [], eps, delta))
    except TypeError:  # an older signature
        return replace_one_sigma(eps, sample_rate, steps, delta)


def guess_and_count(scores: np.ndarray, signs: np.ndarray, r: int) -> int:
    """Guess "+" for the r/2 highest scores and "−" for the r/2 lowest; return how many are right."""
    order = np.argsort(scores, kind="mergesort")
    guess = np.zeros(len(scores), dtype=np.int64)
    guess[order[len(scores) - r // 2:]] = 1
    guess[order[: r - r // 2]] = -1
    return int(np.sum(guess == signs))


def audit_dp_sgd(cfg: PrivacyAuditConfig, *, noise_scale: float = 1.0, label: str = "honest", seed: int = 0,
                 on_step: Callable[[str], None] | None = None) -> AuditResult:
    """Audit DP-SGD whose σ is `noise_scale` × the σ charged for `cfg.claimed_epsilon`.

    noise_scale = 1 is the honest node; noise_scale < 1 plants the bug "less noise than charged".
    The canary designs and signs depend on `seed` only (not on noise_scale).
    """
    import torch

    cfg.check()
    t0 = time.perf_counter()
    run = run_settings(cfg)
    ex = node_examples(cfg)
    n = len(ex)
    per_run = min(cfg.canaries_per_run, n)
    q, steps = node_plan(cfg, n)
    charged = charged_sigma(cfg.claimed_epsilon, q, steps, cfg.delta)
    sigma = charged * noise_scale
    expected_batch = int(n * q)  # as Opacus: int(len(dataset) * sample_rate)
    input_max = cfg.canary_input_scale * max(float(np.abs(ex.x_log).max()), 1.0)

    root = np.random.SeedSequence([seed, 0x5EED])
    design_rng, sign_rng, slot_rng, noise_seq = (np.random.default_rng(s) for s in root.spawn(4))
    signs = sign_rng.choice(np.array([-1, 1]), cfg.canaries)  # S: fair coins, looked at only when counting
    scores = np.zeros(cfg.canaries)
    sigma_hats = []
    starts = list(range(0, cfg.canaries, per_run))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        theta0 = _flat_params(node_model(run))
        for k, start in enumerate(starts):
            idx = np.arange(start, min(start + per_run, cfg.canaries))
            if on_step:
                on_step(f"{label}: run {k + 1}/{len(starts)} ({len(idx)} canaries)")
            slots = slot_rng.choice(n, len(idx), replace=False)
            base = _subset_examples(ex, np.setdiff1d(np.arange(n), slots))
            pool = make_canaries(design_rng, cfg.canary_pool * len(idx), lags=run.lags, horizon=run.horizon,
                                 n_groups=_n_groups(),
                                 target=cfg.canary_target, input_max=input_max)
            # designed for the charged σ: the auditor does not know what is wrong, if anything
            canaries = pool.subset(select_canaries(pool, base, len(idx), theta0, run, q=q, sigma=charged))
            data = with_canaries(ex, slots, canaries, signs[idx])
            iterates, q_used, t_used = train_with_transcript(data, sigma=sigma, run=run, rounds=cfg.rounds,
                                                             seed=int(noise_seq.integers(2**62)))
            if abs(q_used - q) > 1e-12 or t_used != steps:
                raise RuntimeError(f"train_dp used q={q_used}, T={t_used}; the audit planned q={q}, T={steps}")
            st = run_statistics(iterates, base, canaries, q=q, lr=run.lr, clip=run.clip_norm,
                                expected_batch=expected_batch, run=run)
            sigma_hats.append(st.sigma_hat)
            scores[idx] = llr_scores(st, q)
    finally:
        torch.set_num_threads(threads)

    return _verdict(cfg, label=label, noise_multiplier=sigma, charged_noise_multiplier=charged, sample_rate=q,
                    steps=steps, measured_noise_multiplier=float(np.mean(sigma_hats)), runs=len(starts), seed=seed,
                    seconds=time.perf_counter() - t0, scores=scores, signs=signs)


def _verdict(cfg: PrivacyAuditConfig, **run: Any) -> AuditResult:
    """Guess the canaries' signs from their scores and turn the count into an ε lower bound."""
    r = cfg.guesses
    correct = guess_and_count(run["scores"], run["signs"], r)
    lb = eps_lower_bound(cfg.canaries, r, correct, cfg.delta, cfg.beta)
    return AuditResult(
        claimed_epsilon=cfg.claimed_epsilon, delta=cfg.delta, confidence=1 - cfg.beta,
        true_epsilon=replace_one_epsilon(run["noise_multiplier"], run["sample_rate"], run["steps"], cfg.delta),
        canaries=cfg.canaries, guesses=r, correct=correct, eps_lower_bound=lb,
        max_possible_bound=max_eps_lower_bound(cfg.canaries, r, cfg.delta, cfg.beta),
        flagged=bool(lb > cfg.claimed_epsilon), **run,
    )


def _n_groups() -> int:
    from core.drg import DRG_GROUPS

    return len(DRG_GROUPS)


# ---------------------------------------------------------------------------------------------
# Honest run + planted-bug control, and the report
# ---------------------------------------------------------------------------------------------

RESULT_COLUMNS = ("label", "claimed_epsilon", "eps_lower_bound", "confidence", "max_possible_bound", "flagged",
                  "canaries", "guesses", "correct", "noise_multiplier", "charged_noise_multiplier",
                  "measured_noise_multiplier", "true_epsilon", "delta", "sample_rate", "steps", "runs", "seed",
                  "seconds")


def run_privacy_audit(cfg: PrivacyAuditConfig | None = None, *, seed: int = 0, control_scale: float | None = 0.2,
                      on_step: Callable[[str], None] | None = None) -> pd.DataFrame:
    """The honest node, and (unless `control_scale` is None/0) a control whose DP-SGD used
    `control_scale` × the charged σ: a planted bug the audit must flag, showing it has the power to.
    Same seed, hence the same canaries and signs, for both. `df.attrs["results"]` keeps the
    AuditResults (scores) for the plot."""
    cfg = cfg or PrivacyAuditConfig()
    results = [audit_dp_sgd(cfg, noise_scale=1.0, label="honest", seed=seed, on_step=on_step)]
    if control_scale:
        results.append(audit_dp_sgd(cfg, noise_scale=control_scale, label=f"control: σ × {control_scale:g}",
                                    seed=seed, on_step=on_step))
    df = pd.DataFrame([r.as_row() for r in results], columns=list(RESULT_COLUMNS))
    df.attrs["results"] = results
    df.attrs["config"] = {k: v for k, v in asdict(cfg).items() if k != "run_overrides"} | {
        "run_overrides": dict(cfg.run_overrides), "guesses": cfg.guesses}
    return df


def plot_privacy_audit(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = df.attrs.get("results", [])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    for j, res in enumerate(results):
        if res.scores is None:
            continue
        sc = np.sign(res.scores) * np.log1p(np.abs(res.scores))  # signed log: control scores are large
        for sign, ls in ((1, "-"), (-1, "--")):
            ax.hist(sc[res.signs == sign], bins=40, histtype="step", color=f"C{j}", ls=ls,
                    label=f"{res.label}: canaries {'+' if sign > 0 else '−'}")
    ax.set(xlabel="score (signed log1p of the log-likelihood ratio)", ylabel="canaries",
           title="Canary scores: + and − separated = membership revealed")
    ax.legend(fontsize=7)
    ax = axes[1]
    xs = np.arange(len(df))
    ax.bar(xs, df.eps_lower_bound, color=["C0" if not f else "C3" for f in df.flagged])
    claimed = float(df.claimed_epsilon.iloc[0])
    ax.axhline(claimed, color="k", lw=1.5, label=f"claimed ε = {claimed:g}")
    ax.axhline(float(df.max_possible_bound.iloc[0]), color="grey", ls="--", lw=1,
               label=f"largest possible bound ({int(df.guesses.iloc[0])}/{int(df.guesses.iloc[0])} correct)")
    ax.set_xticks(xs, list(df.label), fontsize=8)
    ax.set(ylabel=f"ε lower bound ({float(df.confidence.iloc[0]):.0%} confidence)",
           title="Empirical ε lower bound vs claim (red: claim refuted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_section(df: pd.DataFrame, png: Path | None = None) -> str:
    """The privacy audit as an HTML <section> (templates/privacy_audit_section.html.j2)."""
    from simulations.templating import data_uri, render

    cfg = df.attrs.get("config", {})
    head = ("run", "σ used", "σ charged", "σ measured", "true ε (PLD, replace-one)", "canaries m", "guesses r",
            "correct v", "ε lower bound", "confidence", "largest possible bound", "claimed ε", "verdict", "time")
    rows = [
        [r.label, f"{r.noise_multiplier:.3f}", f"{r.charged_noise_multiplier:.3f}",
         f"{r.measured_noise_multiplier:.3f}", f"{r.true_epsilon:.2f}", r.canaries, r.guesses, r.correct,
         f"{r.eps_lower_bound:.2f}", f"{r.confidence:.0%}", f"{r.max_possible_bound:.2f}",
         f"{r.claimed_epsilon:g}", "REFUTED" if r.flagged else "not refuted", f"{r.seconds:.0f} s"]
        for r in df.itertuples(index=False)]
    first = df.iloc[0]
    note = (
        f"Node: synthetic hospital {cfg.get('hospital')} (data seed {cfg.get('data_seed')}), the run configuration's "
        f"featurisation, batch size, epochs, lr and clip; q = {first.sample_rate:.4f}, T = {int(first.steps)} steps "
        f"({cfg.get('rounds')} round(s)); δ = {first.delta:g}; {int(first.runs)} training runs of "
        f"{cfg.get('canaries_per_run')} canaries each.")
    return render("privacy_audit_section.html.j2", head=head, rows=rows, note=note,
                  png=data_uri(png) if png is not None else None)


def audit_page(sections: list[str], title: str = "fedalloc privacy audit") -> str:
    """A standalone HTML document (doctype, <html>, <title>) holding the rendered audit sections."""
    from simulations.templating import page

    return page(title, sections)


def write_privacy_audit(df: pd.DataFrame, out: Path) -> dict[str, Path]:
    """privacy_audit.csv, privacy_audit.png and privacy_audit.html (a standalone page) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "privacy_audit.csv", "png": out / "privacy_audit.png", "html": out / "privacy_audit.html"}
    df.to_csv(paths["csv"], index=False)
    plot_privacy_audit(df, paths["png"])
    paths["html"].write_text(audit_page([html_section(df, paths["png"])]), encoding="utf-8")
    return paths
