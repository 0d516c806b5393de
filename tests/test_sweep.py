"""The ε sweep, its report and the baselines (fast: 3 hospitals, 1 round, short series)."""

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

# 60 weeks of history (≥ 52 for the seasonal naive), 5 disjoint windows per group.
FAST = {"start": "2024-10-07", "local-epochs": 1}
METHODS = ("seasonal_naive", "last_value", "centralised", "local", "federated", "local_dp")
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    # federated_dp at finite ε runs the whole Flower federation (~1 min on a loaded 2-core box;
    # the federation itself is covered by test_federation), so the fast grid leaves it out.
    return run_sweep(out, hospitals=3, epsilons=[1.0, math.inf], seeds=[0], rounds=1, overrides=FAST,
                     methods=METHODS)


def test_sweep_writes_every_artefact(sweep):
    d = sweep.path
    for name in ("sweep.csv", "per_hospital.csv", "rounds.csv", "metrics.json", "report.html",
                 "privacy_utility.png", "per_hospital.png", "allocation.png", "rounds.png"):
        assert (d / name).is_file() and (d / name).stat().st_size > 0, name
    for png in d.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    tidy = pd.read_csv(d / "sweep.csv")
    assert list(tidy.columns) == ["seed", "epsilon", "method", "metric", "value"]
    assert set(tidy.method) == set(METHODS)
    # local_dp ran at both grid points; the naive baselines only at ε = inf
    assert set(tidy.loc[tidy.method == "local_dp", "epsilon"]) == {1.0, math.inf}
    assert set(tidy.loc[tidy.method == "seasonal_naive", "epsilon"]) == {math.inf}
    metrics = json.loads((d / "metrics.json").read_text())
    mae = metrics["results"]["local_dp@1"]["mae"]
    assert set(mae) == {"mean", "std", "n"} and mae["n"] == 1 and math.isfinite(mae["mean"])
    per = pd.read_csv(d / "per_hospital.csv")
    assert len(per) == 3 * (len(METHODS) + 1)  # local_dp at ε = 1 and ε = inf


def test_private_and_baseline_metrics_are_finite(sweep):
    t = sweep.table
    core = t[t.metric.isin(["mae", "rmse", "smape", "alloc_error_seed", "alloc_error_proportional",
                            "alloc_error_need_gap", "gini_pred_seed", "jain_pred_seed"])]
    assert len(core) > 0 and np.isfinite(core.value).all(), core[~np.isfinite(core.value)]
    spent = t[(t.method == "local_dp") & (t.epsilon == 1.0) & (t.metric == "epsilon_spent_max")].value
    assert len(spent) == 1 and 0.5 < float(spent.iloc[0]) <= 1.0 + 1e-9
    # ε = inf local_dp is the non-private local baseline, reused not retrained
    plain = t[(t.method == "local") & (t.metric == "mae")].value.iloc[0]
    dp_inf = t[(t.method == "local_dp") & (t.epsilon == math.inf) & (t.metric == "mae")].value.iloc[0]
    assert plain == dp_inf


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
                             "seasonal_naive,last_value", "--start", "2024-10-07", "--no-report",
                             "--out", str(tmp_path / "ok")])
    assert ok.exit_code == 0, ok.output
    tidy = pd.read_csv(tmp_path / "ok" / "sweep.csv")
    assert set(tidy.method) == {"seasonal_naive", "last_value"}
    assert not (tmp_path / "ok" / "report.html").exists()


def test_score_reports_diverged_forecasts_instead_of_crashing():
    h = B.Hospitals(["a", "b", "c"], [], np.array([100.0, 50.0, 10.0]), np.array([20.0, 20.0, 5.0]))
    overall, per = B.score(np.array([np.inf, 50.0, 10.0]), h, total=100.0)
    assert overall["nonfinite"] == 1 and math.isinf(overall["mae"])
    assert overall["smape"] == pytest.approx(200 / 3)
    # the diverged hospital takes (almost) the whole total under proportional allocation
    assert per.loc[0, "alloc_pred_proportional"] == pytest.approx(100.0)
    assert overall["alloc_error_proportional"] == pytest.approx(2 * (1 - 100 / 160))
