"""The ε sweep, its rolling-origin backtest, its report and the baselines (fast: 3 hospitals,
1 round, short series, 2 origins)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from simulations import baselines as B
from simulations.sweep import aggregate, parse_epsilons, run_sweep

# 60 weeks of history at the cutoff, 56 at the first of 2 origins (≥ 52 for the seasonal naive);
# ≥ 4 disjoint windows per group.
FAST = {"start": "2024-10-07", "local-epochs": 1}
ORIGINS = ["2025-11-03", "2025-12-01"]
METHODS = ("seasonal_naive", "last_value", "centralised", "local", "federated", "local_dp")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    # federated_dp at finite ε runs the whole Flower federation (~1 min on a loaded 2-core box;
    # the federation itself is covered by test_federation), so the fast grid leaves it out.
    return run_sweep(out, hospitals=3, epsilons=[1.0, math.inf], seeds=[0], rounds=1, overrides=FAST,
                     methods=METHODS, origins=2)


def test_sweep_writes_every_artefact(sweep):
    d = sweep.path
    for name in ("sweep.csv", "per_hospital.csv", "rounds.csv", "metrics.json", "report.html",
                 "privacy_utility.png", "per_hospital.png", "allocation.png", "rounds.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    for png in d.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    tidy = pd.read_csv(d / "sweep.csv")
    assert list(tidy.columns) == ["seed", "origin", "epsilon", "method", "metric", "value"]
    assert set(tidy.method) == set(METHODS)
    assert sorted(tidy.origin.unique()) == ORIGINS
    # every (origin, method, ε) has exactly one value per metric
    assert not tidy.duplicated(["seed", "origin", "epsilon", "method", "metric"]).any()
    # local_dp ran at both grid points; the naive baselines only at ε = inf
    assert set(tidy.loc[tidy.method == "local_dp", "epsilon"]) == {1.0, math.inf}
    assert set(tidy.loc[tidy.method == "seasonal_naive", "epsilon"]) == {math.inf}
    metrics = json.loads((d / "metrics.json").read_text())
    mae = metrics["results"]["local_dp@1"]["mae"]
    assert set(mae) == {"mean", "std", "n"} and mae["n"] == 2 and math.isfinite(mae["mean"])  # 1 seed × 2 origins
    assert metrics["config"]["origins"] == ORIGINS
    assert {r["method"] for r in metrics["backtest"]} == set(METHODS)
    per = pd.read_csv(d / "per_hospital.csv")
    assert len(per) == 2 * 3 * (len(METHODS) + 1)  # 2 origins; local_dp at ε = 1 and ε = inf
    assert "backtest.png" in {p.name for p in d.glob("*.png")}


def test_private_and_baseline_metrics_are_finite(sweep):
    t = sweep.table
    core = t[t.metric.isin(["mae", "rmse", "smape", "alloc_error_seed", "alloc_error_proportional",
                            "alloc_error_need_gap", "gini_pred_seed", "jain_pred_seed"])]
    assert len(core) > 0 and np.isfinite(core.value).all(), core[~np.isfinite(core.value)]
    spent = t[(t.method == "local_dp") & (t.epsilon == 1.0) & (t.metric == "epsilon_spent_max")].value
    assert len(spent) == 2 and ((0.5 < spent) & (spent <= 1.0 + 1e-9)).all()  # one fresh plan per origin
    # ε = inf local_dp is the non-private local baseline, reused not retrained
    plain = t[(t.method == "local") & (t.metric == "mae")].set_index("origin").value
    dp_inf = t[(t.method == "local_dp") & (t.epsilon == math.inf) & (t.metric == "mae")].set_index("origin").value
    assert plain.to_dict() == dp_inf.to_dict()


def test_each_origin_sees_only_its_past_and_is_scored_on_its_own_horizon(sweep):
    """At every origin the naive forecasts come from the series before it and the truth is the
    horizon after it (recomputed here from the records files)."""
    from core.records import load_records
    from core.series import demand_series

    per = sweep.per_hospital
    data = sweep.path / "data" / "seed0"
    for origin in ORIGINS:
        at = per[(per.origin == origin)]
        for hospital in ("hospital_000", "hospital_002"):
            s = demand_series(load_records(data / f"{hospital}.csv"), start=FAST["start"], end="2026-01-05")
            past = s.loc[s.index < origin]
            future = s.loc[s.index >= origin].iloc[:4].to_numpy().sum()
            row = at[(at.hospital == hospital) & (at.method == "seasonal_naive")].iloc[0]
            assert row.pred_demand == B.seasonal_naive(past, 4)
            assert row.true_demand == future
            lv = at[(at.hospital == hospital) & (at.method == "last_value")].iloc[0]
            assert lv.pred_demand == B.last_value(past, 4)
    # the two origins are different problems
    t = per[per.method == "seasonal_naive"].groupby("origin").true_demand.sum()
    assert t[ORIGINS[0]] != t[ORIGINS[1]]


def test_relative_mae_is_against_the_better_naive_per_origin(sweep):
    t = sweep.table
    mae = t[t.metric == "mae"].set_index(["origin", "method", "epsilon"]).value
    rel = t[t.metric == "rel_mae"].set_index(["origin", "method", "epsilon"]).value
    for origin in ORIGINS:
        best = min(mae[(origin, "seasonal_naive", math.inf)], mae[(origin, "last_value", math.inf)])
        for (o, m, e), v in rel.items():
            if o == origin:
                assert v == pytest.approx(mae[(o, m, e)] / best)
        assert min(rel[(origin, "seasonal_naive", math.inf)], rel[(origin, "last_value", math.inf)]) == 1.0


def test_forecast_origins_and_backtest_summary():
    from simulations.sweep import backtest_summary, forecast_origins

    assert forecast_origins("2025-12-01", 3, 4) == ["2025-10-06", "2025-11-03", "2025-12-01"]
    assert forecast_origins("2025-12-01", 2, 7, "day") == ["2025-11-24", "2025-12-01"]
    assert forecast_origins("2025-12-01", 1, 4) == ["2025-12-01"]
    with pytest.raises(ValueError):
        forecast_origins("2025-12-01", 0, 4)
    rows = []
    for origin, (mae, rel, signed, true) in {"a": (10.0, 0.5, -4.0, 100.0), "b": (30.0, 1.5, 2.0, 300.0)}.items():
        for metric, value in (("mae", mae), ("rel_mae", rel), ("signed_error", signed), ("true_mean", true),
                              ("alloc_error_seed", 0.1), ("epsilon_spent_max", 2.5 if origin == "a" else 3.0)):
            rows.append({"seed": 0, "origin": origin, "epsilon": 3.0, "method": "federated_dp", "metric": metric,
                         "value": value})
    s = backtest_summary(pd.DataFrame(rows)).iloc[0]
    assert s.mae == 20.0 and s.rel_mae == 1.0 and s.cells == 2 and s.epsilon_spent_max == 3.0
    assert s.bias_pct == pytest.approx(100 * (-4.0 + 2.0) / 400.0)  # pooled, not a mean of ratios


class _Imgs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str | None] = []
        self.other_refs: list[tuple[str, str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.srcs.append(a.get("src"))
        for key in ("src", "href"):
            if key in a and tag != "img":
                self.other_refs.append((tag, key, a[key] or ""))


def _check_html_self_contained(html_text: str) -> None:
    p = _Imgs()
    p.feed(html_text)
    assert len(p.srcs) >= 3, p.srcs
    for src in p.srcs:
        assert src is not None and src.startswith("data:image/png;base64,"), (src or "")[:80]
    assert p.other_refs == []


def test_report_html_embeds_pngs_as_data_uris(sweep):
    text = (sweep.path / "report.html").read_text()
    assert "data:image/png;base64," in text
    import re

    assert not [s for s in re.findall(r'src="([^"]*)"', text) if not s.startswith("data:")]
    _check_html_self_contained(text)
    # the summary table lists every method
    for label in ("seasonal naive", "local-only DP", "federated (no DP)", "centralised (no DP)"):
        assert label in text


def test_report_renders(sweep, tmp_path):
    """Headless Chromium screenshot when Debian chromium is installed; otherwise (not skipped) the
    same self-containment check with html.parser on a copy moved away from its PNG files."""
    moved = tmp_path / "alone.html"
    shutil.copy(sweep.path / "report.html", moved)  # no PNG next to it: only embedded images can show
    _check_html_self_contained(moved.read_text())
    if Path(CHROMIUM).exists():
        shot = tmp_path / "shot.png"
        subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                        "--disable-background-networking", f"--screenshot={shot}", "--window-size=1200,2000",
                        moved.as_uri()], check=True, timeout=120, capture_output=True)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """The report's tables (rows of cell texts), headline text and figure captions."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.headline = ""
        self.captions: list[str] = []
        self.title = ""
        self._cell: list[str] | None = None
        self._where: str | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif a.get("id") == "headline" or tag in ("figcaption", "title"):
            self._where = "headline" if a.get("id") == "headline" else tag
            if tag == "figcaption":
                self.captions.append("")

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag in ("p", "figcaption", "title"):
            self._where = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)
        if self._where == "headline":
            self.headline += data
        elif self._where == "figcaption":
            self.captions[-1] += data
        elif self._where == "title":
            self.title += data


def _page(sweep) -> _Page:
    p = _Page()
    p.feed((sweep.path / "report.html").read_text())
    return p


def test_report_headline_states_the_measured_numbers(sweep):
    """Recomputed here from sweep.csv and per_hospital.csv, not through the report's own helpers:
    without federated_dp the headline is about local_dp at its largest finite ε (1 here)."""
    t, per = sweep.table, sweep.per_hospital
    rel = t[(t.method == "local_dp") & (t.epsilon == 1.0) & (t.metric == "rel_mae")].value.mean()
    pct = 100 * (1 - rel)

    def moved(method: str, eps: float) -> float:
        sel = per[(per.method == method) & (per.epsilon == eps)]
        return np.mean([0.5 * np.abs(g.alloc_pred_seed - g.alloc_true_seed).sum()
                        for _, g in sel.groupby(["seed", "origin"])])

    naive = min(moved("seasonal_naive", math.inf), moved("last_value", math.inf))
    text = " ".join(_page(sweep).headline.split())
    assert text.startswith("At ε = 1 per hospital, local-only DP forecasts"), text
    assert f"{abs(pct):.0f} % {'lower' if pct >= 0 else 'higher'} error than the better naive forecast" in text
    assert f"relative MAE {rel:.2f}" in text and "mean of 2 backtest forecasts" in text
    assert f"Allocating 1,000 units by the seed policy, {moved('local_dp', 1.0):.1f} units go to a different" in text
    assert f"(better naive forecast: {naive:.1f})" in text
    assert "the smallest hospital's allocation changes by" in text  # 3 hospitals: one is "the smallest"


def test_report_shows_each_method_once_with_captions(sweep):
    page = _page(sweep)
    assert page.title.strip() == "fedalloc privacy–utility sweep"
    methods = page.tables[0]
    assert methods[0][:3] == ["method", "ε", "relative MAE"]
    keys = [(row[0], row[1]) for row in methods[1:]]
    assert len(keys) == len(set(keys))
    # 7 (method, ε) results, local_dp at ε = ∞ is the local baseline: 6 rows, local-only at ∞ once
    assert len(keys) == 6
    assert [k for k in keys if k[0].startswith("local-only") and k[1] == "∞"] == [("local-only (no DP)", "∞")]
    # every figure has a real caption: what it shows and how to read it
    assert len(page.captions) >= 4
    for caption in page.captions:
        assert len(caption.split()) >= 20, caption


def test_report_one_cell_shows_no_plus_minus(sweep):
    from simulations.report import detail_rows, main_rows

    one = sweep.table[sweep.table.origin == ORIGINS[-1]]  # 1 seed × 1 origin
    for head, rows in (main_rows(one, 1000.0), detail_rows(one)):
        cells = [c for row in rows for c in row]
        assert cells and not [c for c in cells if "±" in c], rows
    _, rows = main_rows(sweep.table, 1000.0)  # 2 cells: the spread is shown
    assert any("±" in c for row in rows for c in row)


def test_robust_axis_marks_diverged_points_instead_of_scaling(tmp_path):
    from simulations.report import plot_privacy_utility, robust_top

    assert robust_top([0.8, 0.9, 1.0, 1.1, 1e9]) < 3  # a diverged value does not set the axis
    assert robust_top([0.8, 0.9, 1.0, 1.1, math.inf, math.nan]) == pytest.approx(1.1)
    assert robust_top([0.2, 0.3], keep=[1.0]) == 1.0  # the naive reference stays in view
    assert robust_top([1.056, 1.469, 0.814, 0.764, 0.786, 1.192, 0.819, 0.937, 0.797]) == 1.469  # no cut
    assert robust_top([]) is None
    rows = [{"seed": 0, "origin": "o", "epsilon": e, "method": m, "metric": metric, "value": v}
            for metric in ("rel_mae", "alloc_error_seed")
            for m, e, v in (("seasonal_naive", math.inf, 1.0), ("last_value", math.inf, 1.3),
                            ("federated_dp", 1.0, 1e9), ("federated_dp", 3.0, 0.8), ("federated_dp", math.inf, 0.7))]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seen = []
    real_savefig = plt.Figure.savefig

    def spy(fig, *args, **kwargs):
        seen.extend(ax.get_ylim()[1] for ax in fig.axes)
        seen.extend(t.get_text() for ax in fig.axes for t in ax.texts)
        return real_savefig(fig, *args, **kwargs)

    plt.Figure.savefig = spy
    try:
        plot_privacy_utility(pd.DataFrame(rows), tmp_path / "pu.png")
    finally:
        plt.Figure.savefig = real_savefig
    tops = [v for v in seen if isinstance(v, float)]
    assert tops and max(tops) < 3  # the axis shows 0.7–1.3, not 1e9
    assert "1e+09" in seen  # the diverged point is labelled with its value


def test_seasonal_naive_uses_exactly_last_years_weeks():
    # 110 weeks × 2 groups; each cell encodes its week index so the chosen rows are identifiable
    idx = pd.date_range("2023-01-02", periods=110, freq="W-MON")
    values = np.stack([np.arange(110.0), 1000 + np.arange(110.0)], axis=1)
    series = pd.DataFrame(values, index=idx, columns=["a", "b"])
    # the horizon starts at week 110; last year's same weeks are 58, 59, 60, 61
    expected = sum(w + 1000 + w for w in (58, 59, 60, 61))
    assert B.seasonal_naive(series, horizon=4) == expected
    assert idx[58] + pd.Timedelta(weeks=52) == idx[-1] + pd.Timedelta(weeks=1)
    assert B.last_value(series, horizon=4) == 4 * (109 + 1109)
    with pytest.raises(ValueError, match="52 periods"):
        B.seasonal_naive(series.iloc[:51], horizon=4)


def test_score_allocation_error_is_zero_for_perfect_forecast():
    h = B.Hospitals(["a", "b", "c"], [], np.array([100.0, 50.0, 10.0]), np.array([20.0, 20.0, 5.0]))
    overall, per = B.score(h.truth.copy(), h, total=100.0)
    assert overall["mae"] == 0 and overall["smape"] == 0
    for policy in B.POLICIES:
        assert overall[f"alloc_error_{policy}"] == pytest.approx(0.0, abs=1e-12)
    overall, _ = B.score(np.array([50.0, 100.0, 10.0]), h, total=100.0)
    assert overall["mae"] == pytest.approx(100 / 3)
    assert overall["alloc_error_proportional"] == pytest.approx(2 * abs(50 / 160 - 100 / 160) * 100 / 100)


def test_parse_epsilons_and_aggregate():
    assert parse_epsilons("8, 0.5,inf,1") == [0.5, 1.0, 8.0, math.inf]
    with pytest.raises(ValueError):
        parse_epsilons("0,1")
    t = pd.DataFrame({"seed": [0, 1], "epsilon": [1.0, 1.0], "method": ["x", "x"], "metric": ["mae", "mae"],
                      "value": [1.0, 3.0]})
    agg = aggregate(t)["x@1"]["mae"]
    assert agg == {"mean": 2.0, "std": pytest.approx(math.sqrt(2)), "n": 2}


def test_sweep_command_runs_and_rejects_bad_grid(tmp_path):
    import typer
    from typer.testing import CliRunner

    from fedalloc.commands_sweep import sweep_command

    app = typer.Typer()
    app.command("sweep")(sweep_command)
    app.command("other")(lambda: None)  # keep `sweep` a sub-command, as in the real CLI
    runner = CliRunner()
    bad = runner.invoke(app, ["sweep", "--epsilons", "0,1", "--out", str(tmp_path / "bad")])
    assert bad.exit_code == 2 and "positive" in bad.output
    ok = runner.invoke(app, ["sweep", "--hospitals", "2", "--seeds", "1", "--epsilons", "inf", "--methods",
                             "seasonal_naive,last_value", "--start", "2024-10-07", "--no-report", "--origins", "3",
                             "--run-config", "horizon=2", "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    assert "rel. MAE" in ok.output
    tidy = pd.read_csv(tmp_path / "ok" / "sweep.csv")
    assert set(tidy.method) == {"seasonal_naive", "last_value"}
    assert sorted(tidy.origin.unique()) == ["2025-11-03", "2025-11-17", "2025-12-01"]  # one horizon (2 weeks) apart
    assert not (tmp_path / "ok" / "report.html").exists()
    bad = runner.invoke(app, ["sweep", "--origins", "0", "--out", str(tmp_path / "bad0")])
    assert bad.exit_code == 2
    bad = runner.invoke(app, ["sweep", "--run-config", "lags=7 release-blocks=2", "--out", str(tmp_path / "bad1")])
    assert bad.exit_code == 2 and "release-blocks" in bad.output


def test_score_reports_diverged_forecasts_instead_of_crashing():
    h = B.Hospitals(["a", "b", "c"], [], np.array([100.0, 50.0, 10.0]), np.array([20.0, 20.0, 5.0]))
    overall, per = B.score(np.array([np.inf, 50.0, 10.0]), h, total=100.0)
    assert overall["nonfinite"] == 1 and math.isinf(overall["mae"])
    assert overall["smape"] == pytest.approx(200 / 3)
    # the diverged hospital takes (almost) the whole total under proportional allocation
    assert per.loc[0, "alloc_pred_proportional"] == pytest.approx(100.0)
    assert overall["alloc_error_proportional"] == pytest.approx(2 * (1 - 100 / 160))
