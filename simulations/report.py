"""Plots (PNG, matplotlib Agg) and one self-contained HTML report of a sweep directory.

The report is written for a planner who reads it for ten seconds: a headline sentence with the
measured numbers (how much better than the best naive forecast, how many allocation units DP and
forecast error move, how much the smallest hospitals move), then one table with one row per
method (``federated_dp`` at ε = ∞ *is* ``federated``, so it is shown once), then figures whose
captions say what they show and how to read them.

Axes: a diverged method (MAE 1e9 or inf) must not flatten every other curve, so each y axis ends
at a robust limit (Tukey's fence of the plotted values, never below the naive reference) and the
points above it are drawn on the top edge with ▲ and their value.

The HTML comes from simulations/templates/report.html.j2 (see simulations.templating) and embeds
every PNG as a base64 data URI, so the single file can be mailed or archived without its
directory; it links no local file.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from core.fairness import allocation_change, fairness_summary, units_moved

LABELS = {
    "seasonal_naive": "seasonal naive",
    "last_value": "last value",
    "centralised": "centralised (no DP)",
    "local": "local-only (no DP)",
    "federated": "federated (no DP)",
    "local_dp": "local-only DP",
    "federated_dp": "federated DP",
    "dp_series_release": "DP series release",
}
BASELINE_STYLE = {"seasonal_naive": ":", "last_value": ":", "centralised": "--", "local": "-.", "federated": "--"}
COLORS = {"seasonal_naive": "tab:gray", "last_value": "tab:brown", "centralised": "tab:purple", "local": "tab:orange",
          "federated": "tab:green", "local_dp": "tab:red", "federated_dp": "tab:blue",
          "dp_series_release": "tab:olive"}
NAIVE = ("seasonal_naive", "last_value")
# the DP method at ε = inf is, by definition, its non-private twin (simulations/sweep.py)
PLAIN_TWIN = {"local_dp": "local", "federated_dp": "federated"}
FOCUS_ORDER = ("federated_dp", "local_dp", "federated", "local", "centralised")
SMALLEST = 3  # hospitals highlighted as the smallest: they have the least signal per unit of DP noise
METRIC_LABELS = {"rel_mae": "relative MAE (1 = better naive)", "mae": "MAE of D_i",
                 "alloc_error_seed": "allocation error (seed policy)"}


def n_smallest(n: int) -> int:
    """How many of n hospitals count as the smallest: SMALLEST, but at most a third (at least one)."""
    return max(1, min(SMALLEST, n // 3))


def _smallest_text(k: int) -> str:
    return "the smallest hospital's allocation changes" if k == 1 else f"the {k} smallest hospitals' allocations change"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, *axes: Any) -> Path:
    """Grid and legend on `axes`, then write the PNG and free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _load(sweep_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    table = pd.read_csv(sweep_dir / "sweep.csv")
    per = pd.read_csv(sweep_dir / "per_hospital.csv")
    rounds_file = sweep_dir / "rounds.csv"
    try:
        rounds = pd.read_csv(rounds_file)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        rounds = pd.DataFrame()
    return table, per, rounds


def _inf_x(finite: np.ndarray) -> float:
    return float(finite.max() * 3) if len(finite) else 1.0


def _stats(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    sub = table[table.metric == metric]
    g = sub.groupby(["method", "epsilon"])["value"]
    with np.errstate(all="ignore"):  # std of diverged (huge or inf) values
        return pd.DataFrame({"mean": g.mean(), "std": g.std(ddof=1).fillna(0.0)}).reset_index()


def robust_top(values: Sequence[float] | np.ndarray, keep: Sequence[float] = ()) -> float | None:
    """Upper end of a y axis: Tukey's fence Q3 + 1.5·IQR of the finite values (at least 1.5·Q3, so a
    tight cluster is not cut; the largest value itself if it is within 1.25× the fence) and at least
    every value of `keep`.

    Values above it are outliers (a diverged run), drawn on the edge rather than scaling the axis.
    None when there is nothing finite to show.
    """
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    k = np.asarray(keep, dtype=float)
    k = k[np.isfinite(k)]
    if not len(v) and not len(k):
        return None
    top = 0.0
    if len(v):
        q1, q3 = np.quantile(v, [0.25, 0.75])
        fence = max(float(q3 + 1.5 * (q3 - q1)), 1.5 * float(q3))
        # a value just past the fence is shown, not clipped: only far-off ones would squash the rest
        top = float(v.max()) if v.max() <= 1.25 * fence else fence
    if len(k):
        top = max(top, float(k.max()))
    return top if top > 0 else 1.0


def _mark_clipped(ax: Any, x: np.ndarray, y: np.ndarray, top: float, color: str) -> np.ndarray:
    """Draw values above `top` as ▲ on the top edge with their value; return the clipped mask."""
    over = ~(y <= top)  # NaN and inf count as over: a diverged run
    for xi, yi in zip(x[over], y[over]):
        ax.scatter([xi], [top], marker="^", s=90, color=color, zorder=5, clip_on=False)
        ax.annotate("diverged" if not np.isfinite(yi) else f"{yi:.3g}", (xi, top), xytext=(4, -12),
                    textcoords="offset points", fontsize=8, color=color)
    return over


DODGE = {"local_dp": 0.94, "federated_dp": 1.06, "dp_series_release": 1.0}  # x factors (log axis): the error bars side by side


def _dp_curve(ax: Any, st: pd.DataFrame, method: str, x_inf: float, top: float) -> None:
    s = st[st.method == method].sort_values("epsilon")
    if s.empty:
        return
    x = np.where(np.isfinite(s.epsilon), s.epsilon, x_inf) * DODGE.get(method, 1.0)
    mean = s["mean"].to_numpy(dtype=float)
    std = np.nan_to_num(s["std"].to_numpy(dtype=float), nan=0.0, posinf=0.0)
    over = ~(mean <= top)
    shown = np.where(over, top, mean)
    up = np.where(over, 0.0, np.minimum(std, top - shown))  # error bars end at the axis too
    down = np.where(over, 0.0, np.minimum(std, shown))
    ax.errorbar(x, shown, yerr=[down, up], marker="o", capsize=3, color=COLORS[method], label=LABELS[method])
    _mark_clipped(ax, x, mean, top, COLORS[method])


def _baselines(ax: Any, base: pd.DataFrame, top: float) -> None:
    """Non-private baselines as horizontal lines; one above the axis is named on the top edge."""
    for method, style in BASELINE_STYLE.items():
        s = base[base.method == method]
        if s.empty:
            continue
        v = float(s["mean"].iloc[0])
        if v <= top:
            ax.axhline(v, linestyle=style, color=COLORS[method], label=LABELS[method])
        else:
            ax.annotate(f"▲ {LABELS[method]}: {v:.3g}" if math.isfinite(v) else f"▲ {LABELS[method]}: diverged",
                        (0.99, 0.99), xycoords="axes fraction", ha="right", va="top", fontsize=8,
                        color=COLORS[method], xytext=(0, -11 * list(BASELINE_STYLE).index(method)),
                        textcoords="offset points")


def _epsilon_axis(ax: Any, eps_all: np.ndarray) -> float:
    finite = eps_all[np.isfinite(eps_all)]
    x_inf = _inf_x(finite)
    ax.set_xscale("log")
    has_inf = bool(np.isinf(eps_all).any())
    ticks = list(finite) + ([x_inf] if has_inf else [])
    if ticks:
        ax.set_xticks(ticks)
        ax.set_xticklabels([f"{t:g}" for t in finite] + (["∞ (no DP)"] if has_inf else []))
        ax.minorticks_off()
    ax.set_xlabel("ε per node (privacy budget; smaller = more private)")
    return x_inf


def plot_privacy_utility(table: pd.DataFrame, path: Path, metrics: tuple[str, ...] | None = None) -> Path:
    """Per metric: the DP methods against ε, the non-private baselines as horizontal lines."""
    plt = _plt()
    if metrics is None:
        metrics = ("rel_mae" if "rel_mae" in set(table.metric) else "mae", "alloc_error_seed")
    eps_all = np.array(sorted(table.epsilon.unique()), dtype=float)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2))
    for ax, metric in zip(np.atleast_1d(axes), metrics):
        st = _stats(table, metric)
        base = st[st.method.isin(list(BASELINE_STYLE))]
        top = robust_top(st["mean"], keep=[1.0] if metric == "rel_mae" else [])
        if top is None:
            continue
        top *= 1.08
        x_inf = _epsilon_axis(ax, eps_all)
        for method in ("local_dp", "federated_dp", "dp_series_release"):
            _dp_curve(ax, st, method, x_inf, top)
        _baselines(ax, base, top)
        ax.set_ylim(0, top)
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
    fig.suptitle("Privacy–utility: lower is better (mean ± std over seeds and forecast origins)")
    return _save(fig, path, *[ax for ax in np.atleast_1d(axes) if ax.lines or ax.collections])


def _round_panels(rounds: pd.DataFrame) -> list[tuple[str, dict[str, pd.Series]]]:
    """(kind, {label: per-round mean}) for the panels that have data: FedAvg MAE, ledger ε."""
    panels: list[tuple[str, dict[str, pd.Series]]] = []
    if "mae" in rounds:
        r = rounds.dropna(subset=["mae"])
        r = r[r.method == "federated"]
        if not r.empty:
            panels.append(("mae", {LABELS["federated"]: r.groupby("round")["mae"].mean()}))
    if "mean_epsilon" in rounds:
        r = rounds.dropna(subset=["mean_epsilon"])
        r = r[np.isfinite(r.epsilon)]
        lines = {f"target ε = {eps:g}": grp.groupby("round")["mean_epsilon"].mean() for eps, grp in r.groupby("epsilon")}
        if lines:
            panels.append(("epsilon", lines))
    return panels


def plot_rounds(rounds: pd.DataFrame, path: Path) -> Path | None:
    """Per round: the non-private FedAvg model's MAE, and the ε the DP runs' ledgers have charged."""
    if rounds.empty or "round" not in rounds:
        return None
    panels = _round_panels(rounds)
    if not panels:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    titles = {"mae": ("MAE of D_i (global model)", "FedAvg without DP: error per round"),
              "epsilon": ("mean ε charged per node", "Federated DP: ledger ε after each round")}
    for ax, (kind, lines) in zip(axes[0], panels):
        for label, g in lines.items():
            ax.plot(g.index, g.to_numpy(dtype=float), marker="o", label=label,
                    color=COLORS["federated"] if kind == "mae" else None)
        ax.set_xticks(sorted({int(r) for g in lines.values() for r in g.index}))
        top = max(float(np.nanmax(g.to_numpy(dtype=float))) for g in lines.values())
        ax.set_ylim(0, top * 1.15 if np.isfinite(top) and top > 0 else None)  # the line off the frame
        ax.set_xlabel("round")
        ax.set_ylabel(titles[kind][0])
        ax.set_title(titles[kind][1])
    return _save(fig, path, *axes[0])


def focus_epsilon(per: pd.DataFrame) -> float:
    """The ε the headline and per-hospital views show: 3 if swept, else the largest finite ε, else inf."""
    eps = per.loc[per.method == "federated_dp", "epsilon"].unique() if "federated_dp" in set(per.method) else per.epsilon.unique()
    finite = sorted(e for e in eps if np.isfinite(e))
    if 3.0 in finite:
        return 3.0
    return finite[-1] if finite else math.inf


def focus_method(per: pd.DataFrame) -> str:
    """The method the headline is about: federated DP if it ran, else the next in FOCUS_ORDER."""
    present = set(per.method)
    fallback = next((m for m in NAIVE if m in present), str(per.method.iloc[0]))
    return next((m for m in FOCUS_ORDER if m in present), fallback)


def _select(per: pd.DataFrame, method: str, eps: float) -> pd.DataFrame:
    """Rows of `method` at `eps` (a DP method at ε = ∞ falls back to its non-private twin)."""
    sel = per[per.method == method]
    if method in PLAIN_TWIN:
        sel = sel[sel.epsilon == eps]
        if sel.empty and math.isinf(eps):
            sel = per[per.method == PLAIN_TWIN[method]]
    return sel


def plot_per_hospital(per: pd.DataFrame, path: Path, eps: float) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("federated_dp", "o"), ("local_dp", "s"), ("federated", "^"), ("local", "v")):
        sel = per[per.method == method]
        if method.endswith("_dp"):
            sel = sel[sel.epsilon == eps]
        if sel.empty:
            continue
        g = sel.groupby(["seed", "hospital"])[["true_demand", "smape"]].mean()
        ax.scatter(g.true_demand, g.smape, marker=marker, color=COLORS[method], alpha=0.8,
                   label=LABELS[method] + (f" (ε={eps:g})" if method.endswith("_dp") else ""))
    ax.set_xscale("log")
    ax.set_ylim(0, None)
    ax.set_xlabel("hospital size: true D_i over the horizon (log scale)")
    ax.set_ylabel("sMAPE of D_i (%), mean over origins")
    ax.set_title("Per-hospital forecast error vs size")
    return _save(fig, path, ax)


def _focus_cell(per: pd.DataFrame) -> tuple[int, str | None]:
    """(seed, origin) of the per-hospital views: the first seed, the last origin (the cutoff)."""
    seed = int(per.seed.min())
    origin = str(per.origin.astype(str).max()) if "origin" in per else None
    return seed, origin


def _cell(sel: pd.DataFrame, seed: int, origin: str | None) -> pd.DataFrame:
    sel = sel[sel.seed == seed]
    if origin is not None:
        sel = sel[sel.origin.astype(str) == origin]
    return sel.set_index("hospital")


def change_table(per: pd.DataFrame, method: str, eps: float, policy: str = "seed") -> pd.DataFrame:
    """Per hospital of the focus cell: D_i true and released, A_i from each, the change (units, %),
    and, when the non-private twin ran, the change without DP; smallest hospitals first."""
    seed, origin = _focus_cell(per)
    cell = _cell(_select(per, method, eps), seed, origin)
    if cell.empty or f"alloc_true_{policy}" not in cell:
        return pd.DataFrame()
    a_true, a_pred = cell[f"alloc_true_{policy}"], cell[f"alloc_pred_{policy}"]
    ch = allocation_change(a_pred.to_numpy(), a_true.to_numpy(), cell.true_demand.to_numpy(),
                           n_smallest(len(cell)))
    out = pd.DataFrame({"hospital": cell.index[ch.index], "true_demand": ch["size"].to_numpy(),
                        "released_demand": cell.pred_demand.to_numpy()[ch.index],
                        "alloc_true": ch.reference.to_numpy(), "alloc_released": ch.allocation.to_numpy(),
                        "change": ch.change.to_numpy(), "change_pct": ch.change_pct.to_numpy(),
                        "smallest": ch.smallest.to_numpy()})
    twin = PLAIN_TWIN.get(method)
    if twin and not math.isinf(eps) and twin in set(per.method):
        plain = _cell(per[per.method == twin], seed, origin)[f"alloc_pred_{policy}"]
        out["change_no_dp"] = plain.reindex(out.hospital).to_numpy() - out.alloc_true.to_numpy()
    return out


def plot_allocation(per: pd.DataFrame, path: Path, eps: float, policy: str = "seed") -> Path | None:
    """Per hospital (smallest first): allocation with released D_i minus allocation with true D_i."""
    method = focus_method(per)
    tab = change_table(per, method, eps, policy)
    if tab.empty:
        return None
    plt = _plt()
    x = np.arange(len(tab))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(tab) + 2), 4.2))
    width = 0.4 if "change_no_dp" in tab else 0.7
    colors = ["tab:red" if s else "tab:blue" for s in tab.smallest]
    eps_txt = f" (ε = {eps:g})" if method in PLAIN_TWIN and math.isfinite(eps) else ""
    ax.bar(x - (width / 2 if width < 0.7 else 0), tab.change, width=width, color=colors,
           label=f"{LABELS.get(method, method)}{eps_txt}; red: the smallest hospitals")
    if "change_no_dp" in tab:
        ax.bar(x + width / 2, tab.change_no_dp, width=width, color="tab:gray", alpha=0.6,
               label=f"{LABELS[PLAIN_TWIN[method]]}: forecast error alone")
    for xi, (c, pct) in enumerate(zip(tab.change, tab.change_pct)):
        if np.isfinite(pct):
            ax.annotate(f"{pct:+.0f} %", (xi, c), ha="center", va="bottom" if c >= 0 else "top", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x)
    ax.set_xticklabels([str(h).replace("hospital_", "") for h in tab.hospital])
    ax.set_xlabel("hospital, smallest true demand first")
    ax.set_ylabel(f"allocation units: released − true D_i ({policy})")
    seed, origin = _focus_cell(per)
    ax.set_title(f"What the released forecasts move (seed {seed}" + (f", origin {origin})" if origin else ")"))
    return _save(fig, path, ax)


def plot_backtest(table: pd.DataFrame, path: Path, eps: float) -> Path | None:
    """Relative MAE (or MAE) per forecast origin, mean over seeds: naive baselines and the DP methods at `eps`."""
    if "origin" not in table or table.origin.nunique() < 2:
        return None
    plt = _plt()
    metric = "rel_mae" if "rel_mae" in set(table.metric) else "mae"
    sub = table[table.metric == metric]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    lines: list[tuple[str, list[str], np.ndarray]] = []
    for method in LABELS:
        sel = _select(sub, method, eps) if method in PLAIN_TWIN else sub[sub.method == method]
        if sel.empty or (method in PLAIN_TWIN and math.isinf(eps)):
            continue  # at ε = ∞ the DP method is its non-private twin, already drawn
        g = sel.groupby(sel.origin.astype(str))["value"].mean().sort_index()
        lines.append((method, list(g.index), g.to_numpy(dtype=float)))
    top = robust_top(np.concatenate([v for _, _, v in lines]) if lines else [],
                     keep=[1.0] if metric == "rel_mae" else [])
    top = (top or 1.0) * 1.08
    origins = sorted({o for _, idx, _ in lines for o in idx})
    for method, idx, v in lines:
        x = np.array([origins.index(o) for o in idx], dtype=float)
        label = LABELS[method] + (f" (ε={eps:g})" if method.endswith("_dp") else "")
        ax.plot(x, np.minimum(v, top), marker="o", color=COLORS[method],
                linestyle=BASELINE_STYLE.get(method, "-"), label=label)
        _mark_clipped(ax, x, v, top, COLORS[method])
    ax.set_xticks(range(len(origins)), origins)
    ax.set_ylim(0, top)
    ax.set_xlabel("forecast origin (each method sees only the data before it)")
    ax.set_ylabel(METRIC_LABELS[metric])
    ax.set_title("Rolling-origin backtest")
    ax.tick_params(axis="x", labelrotation=30)
    return _save(fig, path, ax)


# ---------------------------------------------------------------------------------------- numbers


@dataclass(frozen=True)
class Headline:
    """The report's first sentence and the numbers in it (tests check the text against these)."""

    text: str
    method: str
    epsilon: float
    rel_mae: float  # mean over (seed, origin) cells
    error_change_pct: float  # 100·(1 − rel_mae): > 0 = lower error than the better naive forecast
    units_moved: float  # mean over cells of ½Σ|A(released D) − A(true D)|, seed policy
    naive_units_moved: float  # the same for the better (fewer units moved) naive forecast
    total: float  # units allocated per cell
    smallest_change_pct: float  # mean |change| in % of the SMALLEST hospitals' true allocation
    cells: int


def _cells(sel: pd.DataFrame) -> list[pd.DataFrame]:
    keys = [k for k in ("seed", "origin") if k in sel]
    return [g for _, g in sel.groupby(keys)] if keys and not sel.empty else []


def _moved(sel: pd.DataFrame, policy: str = "seed") -> tuple[float, float, float]:
    """Mean over cells of (units moved, total, mean |change %| of the smallest hospitals)."""
    moved, totals, small = [], [], []
    for g in _cells(sel):
        a_true, a_pred = g[f"alloc_true_{policy}"].to_numpy(), g[f"alloc_pred_{policy}"].to_numpy()
        moved.append(units_moved(a_pred, a_true))
        totals.append(float(a_true.sum()))
        ch = allocation_change(a_pred, a_true, g.true_demand.to_numpy(), n_smallest(len(g)))
        small.append(float(np.nanmean(np.abs(ch.change_pct[ch.smallest]))) if ch.smallest.any() else math.nan)
    if not moved:
        return math.nan, math.nan, math.nan
    with np.errstate(all="ignore"):
        return float(np.mean(moved)), float(np.median(totals)), float(np.nanmean(small)) if small else math.nan


def _bt_row(bt: pd.DataFrame, method: str, eps: float) -> pd.Series | None:
    rows = bt[(bt.method == method) & (bt.epsilon == eps)]
    if rows.empty and math.isinf(eps) and method in PLAIN_TWIN:
        rows = bt[(bt.method == PLAIN_TWIN[method]) & (bt.epsilon == eps)]
    return None if rows.empty else rows.iloc[0]


def headline(table: pd.DataFrame, per: pd.DataFrame) -> Headline:
    """One sentence with the numbers a planner needs, computed from the sweep's data."""
    from simulations.sweep import backtest_summary

    eps, method = float(focus_epsilon(per)), focus_method(per)
    row = _bt_row(backtest_summary(table), method, eps)
    rel = float(row.rel_mae) if row is not None else math.nan
    cells = int(row.cells) if row is not None else 0
    units, total, small = _moved(_select(per, method, eps))
    naive = [_moved(per[per.method == m])[0] for m in NAIVE if m in set(per.method)]
    naive_units = min(naive) if naive else math.nan
    pct = 100.0 * (1.0 - rel)
    who = LABELS.get(method, method)
    if method in NAIVE:  # a sweep of naive forecasts only: nothing to compare them with
        text = f"Only naive forecasts ran ({cells} backtest forecast{'s' if cells != 1 else ''}). "
    else:
        when = f"At ε = {eps:g} per hospital, {who}" if math.isfinite(eps) else f"Without DP, {who}"
        text = (f"{when} forecasts of demand have a {abs(pct):.0f} % {'lower' if pct >= 0 else 'higher'} error "
                f"than the better naive forecast (relative MAE {rel:.2f}, mean of {cells} backtest forecast"
                f"{'s' if cells != 1 else ''}). ")
    text += (f"Allocating {total:,.0f} units by the seed policy, {units:.1f} units go to a different hospital "
             f"than with the true demand")
    if method not in NAIVE and math.isfinite(naive_units):
        text += f" (better naive forecast: {naive_units:.1f})"
    if math.isfinite(small):
        k = n_smallest(int(per.groupby(["seed", "origin"] if "origin" in per else ["seed"]).hospital.nunique().min()))
        text += f"; {_smallest_text(k)} by {small:.0f} % on average"
    return Headline(text + ".", method, eps, rel, pct, units, naive_units, total, small, cells)


def _num(x: float, digits: int = 4) -> str:
    """x with `digits` significant digits, without exponent between 1e-4 and 1e7."""
    if x == 0 or not 1e-4 <= abs(x) < 1e7:
        return f"{x:.{digits}g}"
    decimals = max(digits - 1 - int(math.floor(math.log10(abs(x)))), 0)
    return f"{x:,.{decimals}f}"


def _pm(mean: float, std: float, n: int, digits: int = 4) -> str:
    """mean ± std; just the mean for one cell (a single seed and origin has no spread to show)."""
    if not math.isfinite(mean):
        return "∞" if mean > 0 else "–"
    return _num(mean, digits) + (f" ± {_num(std, 2)}" if n > 1 and math.isfinite(std) else "")


def _eps_text(eps: float) -> str:
    return "∞" if math.isinf(eps) else f"{eps:g}"


def dedup_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Drop the DP rows at ε = ∞ whose non-private twin is there (they are the same run; the
    twin's "(no DP)" row at ε = ∞ stands for both) and add display labels; frame has `method`
    and `epsilon` columns."""
    present = set(frame.method)
    same = frame.method.isin([dp for dp, plain in PLAIN_TWIN.items() if plain in present]) & np.isinf(frame.epsilon)
    out = frame[~same].copy()
    out["label"] = [LABELS.get(m, m) for m in out.method]
    return out.reset_index(drop=True)


def main_rows(table: pd.DataFrame, total: float) -> tuple[list[str], list[list[str]]]:
    """The methods table: one row per method and ε, planner metrics first; interval columns only
    when some method released intervals."""
    from simulations.sweep import backtest_summary

    bt = dedup_rows(backtest_summary(table))
    intervals = [c for c in ("coverage_80", "wis") if c in bt and bool(np.isfinite(bt[c]).any())]
    head = ["method", "ε", "relative MAE", "MAE of D_i", "allocation error (seed)", "units moved (seed)",
            "bias %", *[{"coverage_80": "80 % interval coverage", "wis": "interval score (WIS)"}[c] for c in intervals],
            "ε spent (max)"]
    rows = []
    for r in bt.itertuples(index=False):
        n = int(r.cells)
        moved = r.alloc_error_seed * total / 2 if math.isfinite(total) else math.nan
        row = [r.label, _eps_text(r.epsilon), _pm(r.rel_mae, r.rel_mae_std, n, 3),
               _pm(r.mae, r.mae_std, n), _pm(r.alloc_error_seed, r.alloc_error_seed_std, n),
               _pm(moved, r.alloc_error_seed_std * total / 2, n, 3),
               "–" if not math.isfinite(r.bias_pct) else f"{r.bias_pct:+.2f}"]
        row += [_pm(getattr(r, c), getattr(r, f"{c}_std", math.nan), n, 3) if math.isfinite(getattr(r, c)) else "–"
                for c in intervals]
        rows.append(row + ["–" if not math.isfinite(r.epsilon_spent_max) else f"{r.epsilon_spent_max:.4g}"])
    return head, rows


def summary_frame(table: pd.DataFrame, metrics: tuple[str, ...] = (
        "mae", "rmse", "smape", "alloc_error_seed", "alloc_error_proportional", "alloc_error_need_gap",
        "epsilon_spent_max")) -> pd.DataFrame:
    """One row per (method, ε), each metric a (mean, std, n) tuple over seeds and origins."""
    rows = []
    order = {m: i for i, m in enumerate(LABELS)}
    for (method, eps), grp in table.groupby(["method", "epsilon"]):
        row: dict[str, Any] = {"method": method, "epsilon": float(eps)}
        for m in metrics:
            v = grp.loc[grp.metric == m, "value"].to_numpy(dtype=float)
            if len(v):
                with np.errstate(all="ignore"):
                    row[m] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v))
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_o"] = df.method.map(order).fillna(99)
    return df.sort_values(["_o", "epsilon"]).drop(columns="_o").reset_index(drop=True)


def detail_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    frame = dedup_rows(summary_frame(table))
    metrics = [c for c in frame.columns if c not in ("method", "epsilon", "label")]
    rows = [[r["label"], _eps_text(r["epsilon"])]
            + [_pm(*r[m]) if isinstance(r[m], tuple) else "–" for m in metrics]
            for _, r in frame.iterrows()]
    return ["method", "ε", *metrics], rows


def fairness_rows(per: pd.DataFrame, method: str, eps: float) -> tuple[list[str], list[list[str]]]:
    """Per policy, mean over cells: how far the allocation is from a demand-proportional split,
    with the true D_i and with the released D_i of `method` (both rated against the true D_i)."""
    sel = _select(per, method, eps)
    head = ["policy", "off a demand-proportional split (true D_i)", f"same, {LABELS.get(method, method)} D_i",
            "worst-served hospital's share of its demand share (true → released)"]
    rows = []
    for policy in ("seed", "proportional", "need_gap"):
        if f"alloc_true_{policy}" not in sel:
            continue
        t, p = [], []
        for g in _cells(sel):
            t.append(fairness_summary(g[f"alloc_true_{policy}"], g.true_demand))
            p.append(fairness_summary(g[f"alloc_pred_{policy}"], g.true_demand))
        if not t:
            continue
        mean = {k: (float(np.mean([s[k] for s in t])), float(np.mean([s[k] for s in p])))
                for k in ("misallocated_share", "min_coverage")}
        rows.append([policy, f"{100 * mean['misallocated_share'][0]:.1f} % of the total",
                     f"{100 * mean['misallocated_share'][1]:.1f} %",
                     f"{100 * mean['min_coverage'][0]:.0f} % → {100 * mean['min_coverage'][1]:.0f} %"])
    return head, rows


def change_rows(tab: pd.DataFrame) -> tuple[list[str], list[list[str]], list[int]]:
    """The allocation-change table as text rows, and the indices of the smallest hospitals."""
    head = ["hospital", "true D_i", "released D_i", "A_i from true D_i", "A_i from released D_i",
            "change (units)", "change %"]
    if "change_no_dp" in tab:
        head.append("change without DP (units)")
    rows = []
    for r in tab.itertuples(index=False):
        row = [str(r.hospital), f"{r.true_demand:,.0f}", f"{r.released_demand:,.1f}", f"{r.alloc_true:.1f}",
               f"{r.alloc_released:.1f}", f"{r.change:+.1f}",
               "–" if not math.isfinite(r.change_pct) else f"{r.change_pct:+.1f}"]
        if "change_no_dp" in tab:
            row.append(f"{r.change_no_dp:+.1f}")
        rows.append(row)
    return head, rows, [i for i, s in enumerate(tab.smallest) if s]


# ---------------------------------------------------------------------------------------- page


@dataclass(frozen=True)
class _Figure:
    id: str
    title: str
    caption: str
    path: Path

    def context(self) -> dict[str, str]:
        from simulations.templating import data_uri

        return {"id": self.id, "title": self.title, "caption": self.caption, "src": data_uri(self.path)}


def _figures(d: Path, table: pd.DataFrame, per: pd.DataFrame, rounds: pd.DataFrame, h: Headline) -> list[_Figure]:
    """Every plot with a caption that says what it shows and how to read it."""
    eps_txt = f"ε = {h.epsilon:g}" if math.isfinite(h.epsilon) else "ε = ∞ (no DP)"
    who = LABELS.get(h.method, h.method)
    figs = [_Figure("privacy-utility", "Privacy against accuracy",
                    "Left: forecast error of D_i relative to the better naive forecast (1 = no better than "
                    "naive); right: allocation error Σ|A_released − A_true| / A_total of the seed policy. Dots "
                    "are the DP methods at each ε per node (mean ± std over seeds and origins), horizontal "
                    "lines the non-private baselines. Lower is better; a DP curve below the naive lines is "
                    "worth its privacy cost. A ▲ on the top edge is a value above the axis (a diverged run or a "
                    "far worse baseline), labelled with its value, so it does not squash the rest.",
                    plot_privacy_utility(table, d / "privacy_utility.png"))]
    a = plot_allocation(per, d / "allocation.png", h.epsilon)
    if a:
        figs.append(_Figure("allocation", "What the released forecasts move",
                            f"For one seed and the last origin, each bar is a hospital's allocation from the "
                            f"{who} forecasts ({eps_txt}) minus its allocation from the true demand, in units "
                            f"(seed policy), smallest hospitals first and in red, with the change in % of its "
                            f"true allocation. Grey bars, when shown, are the same without DP: the gap between "
                            f"the two is what DP noise moves.", a))
    b = plot_backtest(table, d / "backtest.png", h.epsilon)
    if b:
        figs.append(_Figure("backtest", "Error at each forecast origin",
                            f"Relative MAE at each rolling forecast origin (mean over seeds); each method sees "
                            f"only the data before the origin. A method consistently below 1 beats the naive "
                            f"forecasts at every origin, not just on average. DP methods at {eps_txt}.", b))
    figs.append(_Figure("per-hospital", "Forecast error by hospital size",
                        f"One point per hospital and seed: sMAPE of its D_i (mean over origins) against its true "
                        f"demand. DP noise is the same size for every hospital, so small hospitals (left) lose "
                        f"most; compare DP ({eps_txt}) with the non-private points of the same colour family.",
                        plot_per_hospital(per, d / "per_hospital.png", h.epsilon)))
    r = plot_rounds(rounds, d / "rounds.png")
    if r:
        figs.append(_Figure("rounds", "Training rounds",
                            "The error panel is the MAE of the non-private FedAvg model after each round "
                            "(mean over seeds and origins; falling = it learns). The ε panel, when federated DP "
                            "ran, is the mean ε a node's ledger has charged after each round; it must end at or "
                            "below the target ε.", r))
    return figs


def _context(d: Path, table: pd.DataFrame, per: pd.DataFrame, rounds: pd.DataFrame) -> dict[str, Any]:
    h = headline(table, per)
    cfg: dict[str, Any] = {}
    if (d / "metrics.json").exists():
        cfg = json.loads((d / "metrics.json").read_text()).get("config", {})
    main_head, main = main_rows(table, h.total)
    # at ε = ∞ the headline's DP method is shown as its non-private twin's row
    shown = PLAIN_TWIN.get(h.method, h.method) if math.isinf(h.epsilon) else h.method
    highlight = [i for i, r in enumerate(main) if r[0] == LABELS.get(shown, shown) and r[1] == _eps_text(h.epsilon)]
    ch = change_table(per, h.method, h.epsilon)
    ch_head, ch_rows, ch_small = change_rows(ch) if not ch.empty else ([], [], [])
    n_seeds = per.seed.nunique()
    n_origins = per.origin.nunique() if "origin" in per else 1
    return {
        "title": "fedalloc privacy–utility sweep",
        "headline": h.text,
        "setup": (f"{per.groupby('seed').hospital.nunique().max()} hospitals × {n_seeds} seed(s) × {n_origins} "
                  f"forecast origin(s); D_i is a hospital's total demand over the forecast horizon; "
                  f"{h.total:,.0f} units are allocated in each cell."),
        "main": {"head": main_head, "rows": main, "highlight": highlight},
        "cells": h.cells,
        "change": {"head": ch_head, "rows": ch_rows, "highlight": ch_small},
        "fairness": dict(zip(("head", "rows"), fairness_rows(per, h.method, h.epsilon))),
        "details": dict(zip(("head", "rows"), detail_rows(table))),
        "figures": [f.context() for f in _figures(d, table, per, rounds, h)],
        "config": json.dumps(cfg),
        "smallest": len(ch_small),
    }


def make_report(sweep_dir: str | Path) -> Path:
    """Write privacy_utility.png, allocation.png, per_hospital.png (rounds.png, backtest.png when
    there is data for them) and report.html into `sweep_dir`."""
    from simulations.templating import render

    d = Path(sweep_dir)
    table, per, rounds = _load(d)
    out = d / "report.html"
    out.write_text(render("report.html.j2", **_context(d, table, per, rounds)), encoding="utf-8")
    return out
