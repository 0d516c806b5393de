"""Membership-inference *sanity plot* of DP-SGD (issue 6, part 2) — not the privacy audit.

This attack cannot refute a privacy claim, so it is reported as a sanity plot only: it attacks
examples of a centrally trained MLP (not the node's pipeline, not records), and with ~100 evaluation
points its ε lower bound cannot exceed ≈ 3 whatever the training did (measured: σ cut so that the
true ε was 39, and 1193, at a claimed ε of 1 still gave AUC 0.70 < bound 0.73). The audit that can
fail is `simulations/privacy_audit.py` (one-run canary audit of the node's own train_dp). What this
plot does show: the attack is far above chance without DP and near chance with it.

What is audited is exactly what DP-SGD bounds: one training *example* (one (window, group) pair;
with the default disjoint windows one encounter record touches one example, docs/DESIGN.md "Privacy unit").

The game, repeated per (ε, seed):

1. A pool of examples is cut from a few synthetic hospitals (disjoint windows).
2. The pool is split uniformly at random into members (the training set) and non-members.
3. A forecaster is trained on the members: without DP for ε = ∞ (a wider network and many epochs,
   so it overfits), with DP-SGD calibrated to (ε, δ) otherwise — identical architecture,
   optimiser, batch size, epochs and learning rate; only clipping + noise differ.
4. Attack: score = −MSE of the model on the example (loss-threshold attack, Yeom et al. 2018).
   Optional "calibrated" attack (offline LiRA / difficulty calibration, Watson et al. 2022):
   score = −(loss − mean loss of the example under `shadows` reference models trained with the same
   recipe on random halves of the pool *excluding* the example).
5. Report the attack's AUC and best advantage max(TPR − FPR) next to what (ε, δ)-DP allows, and an
   empirical lower bound on ε (threshold chosen on one half of the pool, Clopper–Pearson bounds on
   the other half), which must not exceed ε.

Why the bound applies to an average over examples: for each example, "trained with it" vs
"trained without it" (the rest of the training set being whatever it is) are neighbouring datasets
under add/remove adjacency, which is what Opacus's accountant uses, so any threshold test has
TPR_i ≤ e^ε·FPR_i + δ and 1 − FPR_i ≤ e^ε·(1 − TPR_i) + δ. Both constraints are linear, so the
pooled (FPR, TPR) = averages over examples satisfy them as well, and so does the pooled ROC curve.

Theoretical bounds for (ε, δ)-DP (Kairouz, Oh & Viswanath 2015 tradeoff region):

    TPR(FPR) ≤ f(FPR) = min(1, e^ε·FPR + δ, 1 − e^{−ε}·(1 − δ − FPR))
    AUC ≤ ∫₀¹ f(FPR) dFPR          (ε = 0: 0.5 + δ − δ²/2; ε = ∞: 1)
    TPR − FPR ≤ (e^ε − 1 + 2δ) / (e^ε + 1)

Runs on CPU in a few seconds per model with the default sizes.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

INF = math.inf
DEFAULT_EPSILONS: tuple[float, ...] = (1.0, 3.0, 8.0, INF)


# ---------------------------------------------------------------------------------------------
# Statistics: AUC, ROC, bounds (pure numpy)
# ---------------------------------------------------------------------------------------------


def auc_score(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted ½.

    Mann–Whitney U statistic / (n₁ n₀) via midranks: identical to the area under the empirical ROC.
    """
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if len(m) == 0 or len(n) == 0:
        raise ValueError("need at least one member and one non-member score")
    if not (np.all(np.isfinite(m)) and np.all(np.isfinite(n))):
        raise ValueError("scores must be finite")
    allv = np.concatenate([m, n])
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(len(allv), dtype=np.float64)
    # midranks for ties
    _, first, counts = np.unique(sorted_v, return_index=True, return_counts=True)
    mid = first + (counts + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(mid, counts)
    r_members = ranks[: len(m)].sum()
    u = r_members - len(m) * (len(m) + 1) / 2.0
    return float(u / (len(m) * len(n)))


def roc_curve(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) for the rule "member iff score ≥ threshold", from (0,0) to (1,1)."""
    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    thr = np.unique(np.concatenate([m, n]))[::-1]
    ms, ns = np.sort(m), np.sort(n)
    tpr = (len(ms) - np.searchsorted(ms, thr, side="left")) / len(ms)
    fpr = (len(ns) - np.searchsorted(ns, thr, side="left")) / len(ns)
    return (np.concatenate([[0.0], fpr]), np.concatenate([[0.0], tpr]), np.concatenate([[np.inf], thr]))


def tpr_bound(fpr: np.ndarray, eps: float, delta: float) -> np.ndarray:
    """Largest TPR any (ε, δ)-DP membership test can have at false-positive rate `fpr`."""
    fpr = np.asarray(fpr, dtype=np.float64)
    if math.isinf(eps):
        return np.where(fpr >= 0, 1.0, 0.0) * np.ones_like(fpr)
    a = np.exp(eps) * fpr + delta
    b = 1.0 - np.exp(-eps) * (1.0 - delta - fpr)
    return np.clip(np.minimum(np.minimum(a, b), 1.0), 0.0, 1.0)


def auc_bound(eps: float, delta: float) -> float:
    """Max AUC of any membership test against an (ε, δ)-DP mechanism: ∫₀¹ tpr_bound(x) dx.

    The envelope is piecewise linear, so the trapezoid rule on its breakpoints is exact.
    """
    if eps < 0 or not (0 <= delta <= 1):
        raise ValueError("need ε ≥ 0 and 0 ≤ δ ≤ 1")
    if math.isinf(eps):
        return 1.0
    e = math.exp(eps)
    # breakpoints: where the two lines cross, and where each reaches 1
    cands = [0.0, 1.0, (1 - delta) / (e + 1), (1 - delta) / e, 1 - delta]
    xs = np.array(sorted({min(max(c, 0.0), 1.0) for c in cands}))
    ys = tpr_bound(xs, eps, delta)
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def advantage_bound(eps: float, delta: float) -> float:
    """Max of TPR − FPR over the (ε, δ) region: reached where the two lines cross."""
    if math.isinf(eps):
        return 1.0
    e = math.exp(eps)
    return float(min(1.0, (e - 1 + 2 * delta) / (e + 1)))


def _cp_lower(k: int, n: int, alpha: float) -> float:
    from scipy.stats import beta

    return 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))


def _cp_upper(k: int, n: int, alpha: float) -> float:
    from scipy.stats import beta

    return 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))


def _eps_of_rates(tpr: float, fpr: float, delta: float) -> float:
    """Smallest ε consistent with a test achieving (fpr, tpr) under (ε, δ)-DP (0 if none needed)."""
    best = 0.0
    if tpr - delta > 0:
        best = max(best, math.inf if fpr <= 0 else math.log((tpr - delta) / fpr))
    if 1 - fpr - delta > 0:
        best = max(best, math.inf if tpr >= 1 else math.log((1 - fpr - delta) / (1 - tpr)))
    return best


def empirical_eps_lower_bound(
    member_scores: np.ndarray,
    nonmember_scores: np.ndarray,
    delta: float,
    *,
    confidence: float = 0.95,
    seed: int = 0,
) -> float:
    """High-confidence lower bound on ε from the threshold attack.

    (A plug-in estimate ln((TPR − δ)/FPR) at the best threshold is useless with finite samples: a
    threshold above every non-member gives FPR = 0 and ε = ∞ even for a perfectly private model.)
    The bound chooses the threshold on a random half
    of members and non-members and evaluates it on the other half with one-sided Clopper–Pearson
    bounds at level (1 − confidence)/2 each (TPR lower, FPR upper), so the statement
    "ε ≥ bound" holds with probability ≥ `confidence` for that threshold.
    """
    m = np.asarray(member_scores, dtype=np.float64)
    n = np.asarray(nonmember_scores, dtype=np.float64)

    rng = np.random.default_rng(seed)
    pm, pn = rng.permutation(len(m)), rng.permutation(len(n))
    m_sel, m_ev = m[pm[: len(m) // 2]], m[pm[len(m) // 2 :]]
    n_sel, n_ev = n[pn[: len(n) // 2]], n[pn[len(n) // 2 :]]
    if len(m_sel) == 0 or len(n_sel) == 0:
        return 0.0
    alpha = (1 - confidence) / 2
    # choose the threshold and direction maximising the *conservative* ε on the selection half
    f_s, t_s, th_s = roc_curve(m_sel, n_sel)
    best = (0.0, None)
    for f, t, th in zip(f_s[1:], t_s[1:], th_s[1:]):
        kt, kf = round(t * len(m_sel)), round(f * len(n_sel))
        lo = _eps_of_rates(_cp_lower(kt, len(m_sel), alpha), _cp_upper(kf, len(n_sel), alpha), delta)
        if lo > best[0]:
            best = (lo, th)
    if best[1] is None:
        return 0.0
    th = best[1]
    kt, kf = int(np.sum(m_ev >= th)), int(np.sum(n_ev >= th))
    lower = _eps_of_rates(_cp_lower(kt, len(m_ev), alpha), _cp_upper(kf, len(n_ev), alpha), delta)
    return float(lower)


def best_advantage(member_scores: np.ndarray, nonmember_scores: np.ndarray) -> float:
    fpr, tpr, _ = roc_curve(member_scores, nonmember_scores)
    return float(np.max(np.abs(tpr - fpr)))


# ---------------------------------------------------------------------------------------------
# Data and models
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditConfig:
    hospitals: int = 3  # synthetic hospitals feeding the pool
    years: float = 2.0
    size_median: float = 40.0  # small hospitals: noisy counts, easy to memorise
    lags: int = 8
    horizon: int = 4
    member_fraction: float = 0.5
    hidden: int = 256  # wider than the production forecaster (64) so ε = ∞ overfits
    epochs: int = 80
    batch_size: int = 32  # Opacus steps cost ~15–50 ms here: fewer, larger batches keep runs short
    lr: float = 0.3
    clip_norm: float = 1.0
    delta: float = 1e-5
    blocks: int | None = 2  # lag-window block averaging of the audit's own 8-lag windows (None: run-config default)
    shadows: int = 0  # reference models for the calibrated attack (0 = loss attack only)


def feature_blocks(cfg: AuditConfig) -> int | None:
    """Block averaging of the lag window, as the nodes train (None: featurisation has no blocks)."""
    import inspect

    from forecasting.features import training_examples

    if "blocks" not in inspect.signature(training_examples).parameters:
        return None
    if cfg.blocks is not None:
        return cfg.blocks
    from core.run_config import DEFAULTS

    return int(DEFAULTS.get("release-blocks", cfg.lags))


def build_pool(cfg: AuditConfig, seed: int):
    """Examples from `cfg.hospitals` synthetic hospitals (data seed = `seed`), disjoint windows."""
    from forecasting.features import Examples, training_examples
    from core.series import demand_series
    from core.synthetic import SyntheticConfig, end_date, generate_hospital_records

    scfg = SyntheticConfig(hospitals=cfg.hospitals, years=cfg.years, seed=seed, size_median=cfg.size_median)
    blocks = feature_blocks(cfg)
    kwargs = {} if blocks is None else {"blocks": blocks}
    parts = []
    for h in range(cfg.hospitals):
        records = generate_hospital_records(scfg, h)
        series = demand_series(records, start=scfg.start, end=end_date(scfg))
        parts.append(training_examples(series, cfg.lags, cfg.horizon, **kwargs))
    return Examples(
        x_log=np.concatenate([p.x_log for p in parts]),
        group=np.concatenate([p.group for p in parts]),
        season=np.concatenate([p.season for p in parts]),
        y_log=np.concatenate([p.y_log for p in parts]),
    )


def _subset(ex, idx: np.ndarray):
    from forecasting.features import Examples

    return Examples(x_log=ex.x_log[idx], group=ex.group[idx], season=ex.season[idx], y_log=ex.y_log[idx])


def sigma_for(eps: float, n_train: int, cfg: AuditConfig) -> float | None:
    """DP-SGD σ so the whole training costs (ε, δ) with the project's accountant; None for ε = ∞."""
    if math.isinf(eps):
        return None
    from client.calibration import training_sigma
    from client.dp_training import plan_steps

    plan = plan_steps(n_train, cfg.batch_size, cfg.epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RDP "optimal order is the smallest alpha" while bisecting
        return training_sigma([], plan.sample_rate, plan.steps, [], eps, cfg.delta)


def train_and_losses(ex, train_idx: np.ndarray, sigma: float | None, cfg: AuditConfig, seed: int) -> tuple[np.ndarray, float]:
    """Train a fresh forecaster on `train_idx`; return the per-example MSE on the whole pool and ε spent."""
    import torch

    from client.dp_training import predict_log, train_dp
    from client.ledger import compute_epsilon
    from forecasting.model import Forecaster

    torch.manual_seed(seed)
    model = Forecaster(cfg.lags, cfg.horizon, int(ex.group.max()) + 1, hidden=cfg.hidden)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = train_dp(model, _subset(ex, train_idx), noise_multiplier=sigma, max_grad_norm=cfg.clip_norm,
                        batch_size=cfg.batch_size, epochs=cfg.epochs, lr=cfg.lr, seed=seed)
    pred = predict_log(model, ex.x_log, ex.group, ex.season)
    losses = np.mean((pred - ex.y_log.astype(np.float64)) ** 2, axis=1)
    # a DP run whose noise made the model diverge is still a valid (useless) release
    losses = np.nan_to_num(losses, nan=1e12, posinf=1e12)
    spent = INF if sigma is None else compute_epsilon([(sigma, plan.sample_rate, plan.steps)], cfg.delta)
    return losses, float(spent)


# ---------------------------------------------------------------------------------------------
# The audit
# ---------------------------------------------------------------------------------------------


RESULT_COLUMNS = ("eps", "seed", "attack", "auc", "auc_bound", "advantage", "advantage_bound", "eps_lower_bound",
                  "eps_spent", "sigma", "n_members", "n_nonmembers", "within_bound", "seconds")


def _shadow_reference(ex: Any, shadow_in: list[np.ndarray], eps: float, seed: int, cfg: AuditConfig,
                      on_step: Callable[[str], None] | None) -> np.ndarray:
    """Per example, the mean log loss of the reference models that did NOT train on it."""
    n = len(ex)
    ref = np.full((cfg.shadows, n), np.nan)
    for k, inside in enumerate(shadow_in):
        if on_step:
            on_step(f"seed {seed} ε={eps:g}: shadow {k + 1}/{cfg.shadows}")
        s_idx = np.flatnonzero(inside)
        l_k, _ = train_and_losses(ex, s_idx, sigma_for(eps, len(s_idx), cfg), cfg, seed=1000 * seed + 100 + k)
        ref[k, ~inside] = np.log(l_k[~inside] + 1e-12)
    seen = ~np.isnan(ref)
    counts = seen.sum(axis=0)
    fallback = float(np.mean(ref[seen])) if seen.any() else 0.0
    return np.where(counts > 0, np.where(seen, ref, 0.0).sum(axis=0) / np.maximum(counts, 1), fallback)


def run_audit(
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    seeds: int | Sequence[int] = 2,
    config: AuditConfig | None = None,
    on_step: Callable[[str], None] | None = None,
    keep_scores: bool = False,
) -> pd.DataFrame:
    """One row per (ε, seed, attack). With `keep_scores`, `df.attrs["scores"]` holds
    {(eps, seed, attack): (member_scores, nonmember_scores)} for ROC plots."""
    cfg = config or AuditConfig()
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    rows: list[dict] = []
    scores: dict = {}
    for seed in seed_list:
        ex = build_pool(cfg, seed)
        n = len(ex)
        rng = np.random.default_rng([seed, 1])
        is_member = np.zeros(n, dtype=bool)
        is_member[rng.permutation(n)[: int(round(cfg.member_fraction * n))]] = True
        members = np.flatnonzero(is_member)
        # shadow splits: random halves of the pool, shared by every ε of this seed
        shadow_in = [rng.random(n) < 0.5 for _ in range(cfg.shadows)]
        for eps in epsilons:
            t0 = time.perf_counter()
            if on_step:
                on_step(f"seed {seed} ε={eps:g}: target model")
            sigma = sigma_for(eps, len(members), cfg)
            losses, spent = train_and_losses(ex, members, sigma, cfg, seed=1000 * seed + 7)
            attacks = {"loss": -losses}
            if cfg.shadows:
                ref_mean = _shadow_reference(ex, shadow_in, eps, seed, cfg, on_step)
                attacks["calibrated"] = -(np.log(losses + 1e-12) - ref_mean)
            for name, sc in attacks.items():
                sm, sn = sc[is_member], sc[~is_member]
                auc = auc_score(sm, sn)
                lb = empirical_eps_lower_bound(sm, sn, cfg.delta, seed=seed)
                ab = auc_bound(eps, cfg.delta)
                rows.append(dict(
                    eps=eps, seed=seed, attack=name, auc=auc, auc_bound=ab,
                    advantage=best_advantage(sm, sn), advantage_bound=advantage_bound(eps, cfg.delta),
                    eps_lower_bound=lb, eps_spent=spent, sigma=np.nan if sigma is None else sigma,
                    n_members=int(is_member.sum()), n_nonmembers=int((~is_member).sum()),
                    within_bound=bool(auc <= ab and lb <= eps), seconds=time.perf_counter() - t0,
                ))
                if keep_scores:
                    scores[(eps, seed, name)] = (sm, sn)
    df = pd.DataFrame(rows, columns=list(RESULT_COLUMNS))
    if keep_scores:
        df.attrs["scores"] = scores
    df.attrs["config"] = asdict(cfg)
    return df


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean (and max for AUC / ε lower bound) over seeds per (attack, ε)."""
    g = df.groupby(["attack", "eps"], sort=True)
    out = g.agg(auc_mean=("auc", "mean"), auc_max=("auc", "max"), auc_bound=("auc_bound", "first"),
                advantage_mean=("advantage", "mean"), advantage_bound=("advantage_bound", "first"),
                eps_lower_bound_max=("eps_lower_bound", "max"), sigma=("sigma", "first"),
                seeds=("seed", "nunique"), all_within_bound=("within_bound", "all"))
    return out.reset_index()


# ---------------------------------------------------------------------------------------------
# Report: CSV + PNG + HTML section
# ---------------------------------------------------------------------------------------------


def _eps_label(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def plot_audit(df: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = df.attrs.get("scores", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    ax = axes[0]
    eps_values = sorted(df["eps"].unique(), key=lambda e: (math.isinf(e), e))
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(eps_values)))
    delta = df.attrs.get("config", {}).get("delta", 1e-5)
    grid = np.linspace(0, 1, 501)
    for eps, c in zip(eps_values, colors):
        seed0 = sorted(df.loc[df.eps == eps, "seed"].unique())[0]
        if (eps, seed0, "loss") in scores:
            fpr, tpr, _ = roc_curve(*scores[(eps, seed0, "loss")])
            ax.plot(fpr, tpr, color=c, lw=1.6, label=f"ε={_eps_label(eps)} attack (seed {seed0})")
        if not math.isinf(eps):
            ax.plot(grid, tpr_bound(grid, eps, delta), color=c, lw=1, ls="--")
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    ax.set(xlabel="FPR", ylabel="TPR", title="Sanity plot: loss-threshold attack ROC (dashed: (ε, δ) bound)")
    ax.legend(fontsize=8, loc="lower right")

    ax = axes[1]
    xs = np.arange(len(eps_values))
    for j, (attack, marker) in enumerate(zip(sorted(df["attack"].unique()), "os^")):
        for i, eps in enumerate(eps_values):
            v = df.loc[(df.eps == eps) & (df.attack == attack), "auc"].to_numpy()
            ax.scatter(np.full(len(v), i + 0.12 * j), v, marker=marker, color="C0" if j == 0 else "C1",
                       label=f"{attack} attack AUC" if i == 0 else None, zorder=3)
    ax.plot(xs, [auc_bound(e, delta) for e in eps_values], "k_", ms=30, mew=2, label="AUC bound from (ε, δ)")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xticks(xs, [_eps_label(e) for e in eps_values])
    ax.set(xlabel="ε (training)", ylabel="AUC", ylim=(0.3, 1.02), title="Sanity plot: attack AUC vs (ε, δ) bound")
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def html_section(df: pd.DataFrame, png: Path) -> str:
    """The sanity plot as an HTML <section> (templates/mia_section.html.j2)."""
    from simulations.templating import data_uri, render

    s = summary(df)
    head = ("attack", "ε", "AUC (mean / max)", "AUC bound", "advantage", "advantage bound",
            "ε lower bound (max, 95%)", "σ", "within bound")
    rows = [
        [r.attack, _eps_label(r.eps), f"{r.auc_mean:.3f} / {r.auc_max:.3f}", f"{r.auc_bound:.3f}",
         f"{r.advantage_mean:.3f}", f"{r.advantage_bound:.3f}", f"{r.eps_lower_bound_max:.2f}",
         "—" if pd.isna(r.sigma) else f"{r.sigma:.2f}", "yes" if r.all_within_bound else "NO"]
        for r in s.itertuples(index=False)]
    cfg = df.attrs.get("config", {})
    note = (
        f"{int(df.n_members.iloc[0])} members / {int(df.n_nonmembers.iloc[0])} non-members per seed; "
        f"hidden={cfg.get('hidden')}, epochs={cfg.get('epochs')}, batch={cfg.get('batch_size')}, "
        f"lr={cfg.get('lr')}, clip={cfg.get('clip_norm')}, δ={cfg.get('delta')}; ε = ∞ trains without DP.")
    return render("mia_section.html.j2", head=head, rows=rows, note=note, png=data_uri(png))


def write_audit(df: pd.DataFrame, out: Path) -> dict[str, Path]:
    """audit.csv, audit_summary.csv, audit.png and mia.html (a standalone page) in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "audit.csv", "summary": out / "audit_summary.csv", "png": out / "audit.png",
             "html": out / "mia.html"}
    df.to_csv(paths["csv"], index=False)
    summary(df).to_csv(paths["summary"], index=False)
    plot_audit(df, paths["png"])
    from simulations.templating import page

    paths["html"].write_text(page("fedalloc membership-inference sanity plot", [html_section(df, paths["png"])]),
                             encoding="utf-8")
    return paths
