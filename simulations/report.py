"""Plots (PNG, matplotlib Agg) and one self-contained HTML report of a sweep directory.

The HTML embeds every PNG as a base64 data URI, so the single file can be mailed or archived
without its directory; it links no local file.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

LABELS = {
    "seasonal_naive": "seasonal naive",
    "last_value": "last value",
    "centralised": "centralised (no DP)",
    "local": "local-only (no DP)",
    "federated": "federated (no DP)",
    "local_dp": "local-only DP",
    "federated_dp": "federated DP",
}
BASELINE_STYLE = {"seasonal_naive": ":", "last_value": ":", "centralised": "--", "local": "-.", "federated": "--"}
COLORS = {"seasonal_naive": "tab:gray", "last_value": "tab:brown", "centralised": "tab:purple", "local": "tab:orange",
          "federated": "tab:green", "local_dp": "tab:red", "federated_dp": "tab:blue"}


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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


def plot_privacy_utility(table: pd.DataFrame, path: Path, metrics: tuple[str, ...] = ("mae", "alloc_error_seed")) -> Path:
    plt = _plt()
    eps_all = np.array(sorted(table.epsilon.unique()), dtype=float)
    finite = eps_all[np.isfinite(eps_all)]
    x_inf = _inf_x(finite)
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics):
        st = _stats(table, metric)
        base = st[st.method.isin(list(BASELINE_STYLE))]["mean"].to_numpy(dtype=float)
        base = base[np.isfinite(base) & (base > 0)]
        # A diverged method (MAE 1e9 or inf) would flatten every other curve: values above the
        # cap are drawn at the cap with an upward marker and labelled.
        cap = float(base.max() * 20) if len(base) and not metric.startswith("alloc_error") else math.inf  # alloc error ≤ 2
        clipped = False
        for method in ("local_dp", "federated_dp"):
            s = st[st.method == method].sort_values("epsilon")
            if s.empty:
                continue
            x = np.where(np.isfinite(s.epsilon), s.epsilon, x_inf)
            mean = s["mean"].to_numpy(dtype=float)
            std = np.nan_to_num(s["std"].to_numpy(dtype=float), nan=0.0, posinf=0.0)
            over = ~(mean <= cap)
            shown = np.where(over, cap, mean)
            std = np.where(over, 0.0, np.minimum(std, np.maximum(cap - shown, 0) + shown * 0.999))
            ax.errorbar(x, shown, yerr=[np.minimum(std, shown * 0.999), std], marker="o", capsize=3,
                        color=COLORS[method], label=LABELS[method])
            if over.any():
                clipped = True
                ax.scatter(x[over], shown[over], marker="^", s=90, color=COLORS[method], zorder=5)
        if clipped:
            ax.annotate(f"▲ off the chart (> {cap:.3g}): diverged", xy=(0.01, 0.99), xycoords="axes fraction",
                        va="top", fontsize=8)
        for method, style in BASELINE_STYLE.items():
            s = st[(st.method == method)]
            if s.empty:
                continue
            ax.axhline(float(s["mean"].iloc[0]), linestyle=style, color=COLORS[method], label=LABELS[method])
        ax.set_xscale("log")
        vals = np.minimum(st["mean"].to_numpy(dtype=float), cap)
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if len(vals) and vals.max() / vals.min() > 50:  # a diverged method would flatten the rest
            ax.set_yscale("log")
        ticks = list(finite) + ([x_inf] if np.isinf(eps_all).any() else [])
        if ticks:
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{t:g}" for t in finite] + (["∞"] if np.isinf(eps_all).any() else []))
            ax.minorticks_off()
        ax.set_xlabel("ε per node")
        ax.set_ylabel({"mae": "MAE of D_i", "alloc_error_seed": "allocation error (seed policy)"}.get(metric, metric))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Privacy–utility (mean ± std over seeds and origins)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_rounds(rounds: pd.DataFrame, path: Path) -> Path | None:
    if rounds.empty or "round" not in rounds:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    has = False
    if "mae" in rounds:
        r = rounds.dropna(subset=["mae"])
        r = r[r.method == "federated"]
        if not r.empty:
            g = r.groupby("round")["mae"]
            axes[0].errorbar(g.mean().index, g.mean(), yerr=g.std(ddof=1).fillna(0), marker="o", capsize=3,
                             color=COLORS["federated"], label=LABELS["federated"])
            axes[0].legend(fontsize=8)
            has = True
    axes[0].set_xlabel("round")
    axes[0].set_ylabel("MAE of D_i (global model)")
    axes[0].set_title("FedAvg without DP: error per round")
    if "mean_epsilon" in rounds:
        r = rounds.dropna(subset=["mean_epsilon"])
        r = r[np.isfinite(r.epsilon)]
        for eps, grp in r.groupby("epsilon"):
            g = grp.groupby("round")["mean_epsilon"].mean()
            axes[1].plot(g.index, g.values, marker="o", label=f"target ε = {eps:g}")
            has = True
        if not r.empty:
            axes[1].legend(fontsize=8)
    axes[1].set_xlabel("round")
    axes[1].set_ylabel("mean ε charged per node")
    axes[1].set_title("Federated DP: ledger ε after each round")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    if not has:
        plt.close(fig)
        return None
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def focus_epsilon(per: pd.DataFrame) -> float:
    """The ε the per-hospital plots show: 3 if swept, else the largest finite ε, else inf."""
    eps = per.loc[per.method == "federated_dp", "epsilon"].unique() if "federated_dp" in set(per.method) else per.epsilon.unique()
    finite = sorted(e for e in eps if np.isfinite(e))
    if 3.0 in finite:
        return 3.0
    return finite[-1] if finite else math.inf


def plot_per_hospital(per: pd.DataFrame, path: Path, eps: float) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, marker in (("federated_dp", "o"), ("local_dp", "s"), ("federated", "^"), ("local", "v")):
        sel = per[per.method == method]
        if method.endswith("_dp"):
            sel = sel[sel.epsilon == eps]
        if sel.empty:
            continue
        g = sel.groupby("hospital")[["true_demand", "smape"]].mean()
        ax.scatter(g.true_demand, g.smape, marker=marker, color=COLORS[method],
                   label=LABELS[method] + (f" (ε={eps:g})" if method.endswith("_dp") else ""))
    ax.set_xscale("log")
    ax.set_xlabel("hospital size: true D_i over the horizon")
    ax.set_ylabel("sMAPE of D_i (%)")
    ax.set_title("Per-hospital error vs size: federated vs local-only")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_allocation(per: pd.DataFrame, path: Path, eps: float, policy: str = "seed") -> Path | None:
    method = "federated_dp" if "federated_dp" in set(per.method) else per.method.iloc[0]
    sel = per[(per.method == method)]
    if method.endswith("_dp"):
        sel = sel[sel.epsilon == eps]
    sel = sel[sel.seed == sel.seed.min()]
    if "origin" in sel and len(sel):
        sel = sel[sel.origin.astype(str) == sel.origin.astype(str).max()]  # the last origin (the cutoff)
    col_t, col_p = f"alloc_true_{policy}", f"alloc_pred_{policy}"
    if sel.empty or col_t not in sel:
        return None
    plt = _plt()
    x = np.arange(len(sel))
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(sel) + 2), 4.2))
    ax.bar(x - 0.2, sel[col_t], width=0.4, label="from true D_i", color="tab:gray")
    ax.bar(x + 0.2, sel[col_p], width=0.4, label=f"from {LABELS.get(method, method)} D_i", color=COLORS.get(method, "tab:blue"))
    ax.set_xticks(x)
    ax.set_xticklabels([h.replace("hospital_", "") for h in sel.hospital], rotation=0)
    ax.set_xlabel("hospital")
    ax.set_ylabel("allocation")
    eps_txt = f", ε={eps:g}" if method.endswith("_dp") else ""
    origin_txt = f", origin {sel.origin.iloc[0]}" if "origin" in sel else ""
    ax.set_title(f"Allocation ({policy} policy{eps_txt}, seed {int(sel.seed.min())}{origin_txt}): true vs predicted")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_backtest(table: pd.DataFrame, path: Path, eps: float) -> Path | None:
    """MAE per forecast origin (mean over seeds): naive baselines and the DP methods at `eps`."""
    if "origin" not in table or table.origin.nunique() < 2:
        return None
    plt = _plt()
    sub = table[table.metric == "mae"]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    for method in LABELS:
        sel = sub[sub.method == method]
        if method.endswith("_dp"):
            sel = sel[sel.epsilon == eps]
        if sel.empty:
            continue
        g = sel.groupby(sel.origin.astype(str))["value"].mean().sort_index()
        label = LABELS[method] + (f" (ε={eps:g})" if method.endswith("_dp") else "")
        ax.plot(list(g.index), g.to_numpy(dtype=float), marker="o", color=COLORS[method],
                linestyle=BASELINE_STYLE.get(method, "-"), label=label)
    ax.set_xlabel("forecast origin")
    ax.set_ylabel("MAE of D_i (mean over seeds)")
    ax.set_title("Rolling-origin backtest")
    vals = sub["value"].to_numpy(dtype=float)
    vals = vals[np.isfinite(vals) & (vals > 0)]
    if len(vals) and vals.max() / vals.min() > 50:
        ax.set_yscale("log")
    ax.tick_params(axis="x", labelrotation=30)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")


def summary_frame(table: pd.DataFrame, metrics: tuple[str, ...] = ("mae", "rmse", "smape", "alloc_error_seed",
                                                                   "alloc_error_proportional", "alloc_error_need_gap",
                                                                   "epsilon_spent_max")) -> pd.DataFrame:
    rows = []
    order = {m: i for i, m in enumerate(LABELS)}
    for (method, eps), grp in table.groupby(["method", "epsilon"]):
        row: dict[str, Any] = {"method": method, "epsilon": eps}
        for m in metrics:
            v = grp.loc[grp.metric == m, "value"].to_numpy(dtype=float)
            if len(v):
                with np.errstate(all="ignore"):
                    row[m] = (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
        rows.append(row)
    df = pd.DataFrame(rows)
    df["_o"] = df.method.map(order).fillna(99)
    return df.sort_values(["_o", "epsilon"]).drop(columns="_o").reset_index(drop=True)


def _fmt(cell: Any) -> str:
    if isinstance(cell, tuple):
        m, s = cell
        if not math.isfinite(m):
            return "∞"
        return f"{m:.4g} ± {s:.2g}"
    if isinstance(cell, float):
        return "∞" if math.isinf(cell) else f"{cell:g}"
    return html.escape(str(cell))


def _backtest_html(table: pd.DataFrame) -> str:
    from simulations.sweep import backtest_summary

    bt = backtest_summary(table)
    if bt.empty:
        return ""
    n = int(bt.cells.max())
    head = ("<tr><th>method</th><th>ε</th><th>MAE</th><th>relative MAE</th><th>alloc err (seed)</th>"
            "<th>bias %</th><th>ε spent (max)</th></tr>")

    def pm(row: Any, m: str) -> str:
        return _fmt((getattr(row, m), getattr(row, f"{m}_std")))

    rows = "".join(
        f"<tr><td>{_fmt(LABELS.get(r.method, r.method))}</td><td>{_fmt(float(r.epsilon))}</td><td>{pm(r, 'mae')}</td>"
        f"<td>{pm(r, 'rel_mae')}</td><td>{pm(r, 'alloc_error_seed')}</td>"
        f"<td>{'–' if not math.isfinite(r.bias_pct) else f'{r.bias_pct:+.2f}'}</td>"
        f"<td>{'–' if not math.isfinite(r.epsilon_spent_max) else f'{r.epsilon_spent_max:.4g}'}</td></tr>"
        for r in bt.itertuples(index=False))
    return (f"<p>Mean ± std over {n} (seed, origin) cells. Relative MAE: the method's MAE divided by the better "
            "of the seasonal naive and last-value MAE at the same seed and origin, then averaged. Bias: "
            "Σ(D̂ − D) / Σ D over hospitals, origins and seeds.</p>"
            f"<table>{head}{rows}</table>")


def make_report(sweep_dir: str | Path) -> Path:
    """Write privacy_utility.png, rounds.png, per_hospital.png, allocation.png and report.html."""
    d = Path(sweep_dir)
    table, per, rounds = _load(d)
    eps = focus_epsilon(per)
    pngs: list[tuple[str, Path]] = [("Privacy–utility", plot_privacy_utility(table, d / "privacy_utility.png"))]
    r = plot_rounds(rounds, d / "rounds.png")
    if r:
        pngs.append(("Per round", r))
    pngs.append(("Per hospital", plot_per_hospital(per, d / "per_hospital.png", eps)))
    a = plot_allocation(per, d / "allocation.png", eps)
    if a:
        pngs.append(("Allocation", a))
    b = plot_backtest(table, d / "backtest.png", eps)
    if b:
        pngs.append(("Backtest: error per forecast origin", b))
    summary = summary_frame(table)
    backtest = _backtest_html(table)
    cols = list(summary.columns)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(LABELS.get(v, v) if c == 'method' else v)}</td>" for c, v in zip(cols, row)) + "</tr>"
        for row in summary.itertuples(index=False)
    )
    cfg = {}
    if (d / "metrics.json").exists():
        cfg = json.loads((d / "metrics.json").read_text()).get("config", {})
    figures = "".join(
        f'<figure><img alt="{html.escape(title)}" src="{_data_uri(p)}"><figcaption>{html.escape(title)}</figcaption></figure>'
        for title, p in pngs
    )
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>fedalloc sweep report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #ccc; padding: 3px 8px; text-align: right; }}
th {{ background: #eee; }} td:first-child {{ text-align: left; }}
figure {{ margin: 1.5em 0; }} img {{ max-width: 100%; }}
</style></head><body>
<h1>fedalloc privacy–utility sweep</h1>
<p>Configuration: <code>{html.escape(json.dumps(cfg))}</code></p>
<p>D_i is each hospital's total demand over the forecast horizon after the cutoff. Errors are against the
true demand; allocation error is Σ|A_pred − A_true| / A_total. Values are mean ± std over seeds and forecast origins;
non-private methods have ε = ∞. Per-hospital plots use ε = {_fmt(float(eps))}.</p>
<h2>Backtest</h2>
{backtest}
<h2>Summary</h2>
<table><tr>{head}</tr>{body}</table>
<h2>Figures</h2>
{figures}
</body></html>
"""
    out = d / "report.html"
    out.write_text(doc, encoding="utf-8")
    return out
