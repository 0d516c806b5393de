"""Federated analytics queries under differential privacy: spec, local answer, sensitivity, combine.

A query is a public spec (:class:`QuerySpec`) sent by the coordinator. Each node computes the
exact answer vector on its own records (:func:`local_answer`), adds Gaussian noise calibrated to
:func:`sensitivity` and the query's ε (client/query_task.py, charged to the node's ledger), and
releases the noisy vector. The coordinator sums the noisy vectors across nodes and turns them into
estimates with confidence intervals (:func:`combine`), which is post-processing.

Privacy unit (docs/DESIGN.md): neighbouring datasets differ by one encounter record. Every record
falls in at most one bin (categories are unique), so the L2 sensitivity of the released vector is

==========  =======================================  ==========================================
statistic   released vector (K bins)                 L2 sensitivity (one record)
==========  =======================================  ==========================================
count       [n_1 .. n_K]                             1
sum         [Σ clip(v) per bin]                      max(|lower|, |upper|)
mean        [Σ (clip(v) - c)/h per bin, n_1 .. n_K]  √2   (c, h: midpoint, half-width of bounds)
==========  =======================================  ==========================================

Mean is released as one Gaussian release of a (centred, scaled) noisy sum together with a noisy
count; the coordinator divides the aggregated sum by the aggregated count. Why this layout rather
than two releases at ε/2 each or the raw vector [sum, count] with Δ = √(max|b|² + 1):

* Two separately calibrated ε/2 releases compose (under the ledger's RDP accountant) to well
  below ε (0.36 for ε = 0.5, δ = 1e-5): a quarter of the budget is paid for nothing.
* The raw [sum, count] vector gets the same noise std σ·√(M² + 1) on both parts, so the count is
  swamped when M is large (bounds [0, 50 000] on cost: count noise ≈ 50 000·σ).
* Scaling the sum by 1/h puts both parts on the same footing (the composed Gaussian is the same
  as two releases with equal noise multipliers σ√2) and is charged as one exact release. For a
  mean m its variance σ²·2(h² + (m - c)²)/n² is within √2 (in std) of the best split of the
  budget, which would need m itself. Centring on c never does worse than the uncentred sum
  (h² + (m - c)² ≤ max(|lower|, |upper|)² + m² for every m in the bounds) and halves the sum's
  sensitivity for bounds [0, u]: for cost in [0, 30 000] on 20 555 records at ε = 0.5 the std of
  the mean is 9.1 here, 16.2 uncentred, 21.8 with two ε/2 releases, 71 926 with the raw vector.

Clipping: values of ``column`` are clipped to [lower, upper] before they are summed. This is what
bounds the sensitivity, so it is always enforced; if the true values fall outside the declared
bounds, the answer is the sum/mean of the *clipped* values and is biased towards the bounds.
Records with a missing value in ``column`` are dropped (also for count, when a column is given).

Pure numpy/pandas.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

from core.drg import DRG_GROUPS, check_group_codes

STATISTICS: tuple[str, ...] = ("count", "sum", "mean")
# Only public, low-cardinality categorical columns can be grouped by. Identifiers are excluded: a
# per-patient histogram is DP but answers nobody's question and invites misuse.
GROUPABLE: tuple[str, ...] = ("drg_group",)
VALUE_COLUMNS: tuple[str, ...] = ("length_of_stay", "cost", "age")
# The audit allows query-answer-0 … query-answer-9999; a mean uses two answers per bin.
MAX_BINS = 1000
MAX_CATEGORY_LEN = 64
_ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_CONFIG_KEYS = {"statistic", "column", "lower", "upper", "group-by", "categories", "start", "end", "epsilon", "catalogue"}


@dataclass(frozen=True, kw_only=True)
class QuerySpec:
    """A public analytics query. Validated on construction, on both coordinator and node.

    ``start``/``end`` are ISO dates (YYYY-MM-DD), both inclusive, on ``admit_date``.
    ``categories`` are declared by the querier, never taken from the data: the answer always has
    one bin per declared category, so its shape does not reveal which categories a node treats.
    ``catalogue`` is the run's public group catalogue the categories must come from (None: the
    built-in 12 of core/drg.py); it travels with the query so the node checks the same list.
    """

    statistic: str
    column: str | None = None
    lower: float | None = None
    upper: float | None = None
    group_by: str | None = None
    categories: list[str] | None = field(default=None, hash=False)
    start: str | None = None
    end: str | None = None
    epsilon: float
    catalogue: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        # Normalise (strip strings, float bounds) before validating; frozen needs object.__setattr__.
        if self.catalogue is not None:
            groups = tuple(str(g) for g in self.catalogue)
            check_group_codes(groups, "query catalogue")
            object.__setattr__(self, "catalogue", None if groups == DRG_GROUPS else groups)
        if self.categories is not None:
            object.__setattr__(self, "categories", [str(c).strip() for c in self.categories])
        for name in ("lower", "upper", "epsilon"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                    raise ValueError(f"{name} must be a number, got {value!r}")
                object.__setattr__(self, name, float(value))
        for name in ("column", "group_by", "start", "end"):
            value = getattr(self, name)
            if value is not None:
                value = str(value).strip()
                object.__setattr__(self, name, value or None)
        self._validate()

    def _validate(self) -> None:
        if self.statistic not in STATISTICS:
            raise ValueError(f"statistic must be one of {', '.join(STATISTICS)}, got {self.statistic!r}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"epsilon must be a positive finite number, got {self.epsilon!r}")
        bounded = self.statistic in ("sum", "mean")
        if bounded:
            if self.column is None:
                raise ValueError(f"a {self.statistic} query needs a column (one of {', '.join(VALUE_COLUMNS)})")
            if self.lower is None or self.upper is None:
                raise ValueError(f"a {self.statistic} query needs public bounds lower and upper")
            if not (math.isfinite(self.lower) and math.isfinite(self.upper)):
                raise ValueError("bounds must be finite")
            if not self.lower < self.upper:
                raise ValueError(f"lower must be < upper, got [{self.lower}, {self.upper}]")
        elif self.lower is not None or self.upper is not None:
            # Silently ignoring them would let a user believe a count was clipped or bounded.
            raise ValueError("bounds apply only to sum and mean queries")
        if self.column is not None and self.column not in VALUE_COLUMNS:
            raise ValueError(f"column must be one of {', '.join(VALUE_COLUMNS)}, got {self.column!r}")
        if self.group_by is not None:
            if self.group_by not in GROUPABLE:
                raise ValueError(f"group_by must be one of {', '.join(GROUPABLE)}, got {self.group_by!r}")
            if not self.categories:
                raise ValueError(
                    "group_by needs the list of categories declared up front (public); "
                    "nodes never report which categories they have"
                )
            if len(self.categories) > MAX_BINS:
                raise ValueError(f"at most {MAX_BINS} categories, got {len(self.categories)}")
            bad = [c for c in self.categories if not c or len(c) > MAX_CATEGORY_LEN]
            if bad:
                raise ValueError(f"categories must be non-empty and at most {MAX_CATEGORY_LEN} characters")
            if len(set(self.categories)) != len(self.categories):
                # A repeated category would count each of its records twice: sensitivity √2, not 1.
                raise ValueError("categories must be unique")
            known = self.catalogue or DRG_GROUPS
            undeclared = [c for c in self.categories if c not in known]
            if undeclared:
                # Only the public catalogue: a made-up bin is an empty answer the node pays for.
                raise ValueError(f"categories {', '.join(undeclared)} are not in the public catalogue "
                                 f"({', '.join(known)})")
        elif self.categories is not None:
            raise ValueError("categories are only meaningful with group_by")
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                if not _ISO_DATE.match(value):
                    raise ValueError(f"{name} must be a date YYYY-MM-DD, got {value!r}")
                try:
                    date.fromisoformat(value)
                except ValueError:
                    raise ValueError(f"{name} is not a valid date: {value!r}") from None
        if self.start is not None and self.end is not None and self.start > self.end:
            raise ValueError(f"start {self.start} is after end {self.end}")

    # -- shape ------------------------------------------------------------------------------
    @property
    def labels(self) -> list[str]:
        """One label per bin: the declared categories, or ["all"]."""
        return list(self.categories) if self.group_by is not None and self.categories else ["all"]

    @property
    def n_bins(self) -> int:
        return len(self.labels)

    @property
    def answer_length(self) -> int:
        """Length of the released vector (a mean releases a sum and a count per bin)."""
        return 2 * self.n_bins if self.statistic == "mean" else self.n_bins

    @property
    def centre(self) -> float:
        """Midpoint c of the bounds (mean only)."""
        assert self.lower is not None and self.upper is not None
        return (self.lower + self.upper) / 2.0

    @property
    def half_width(self) -> float:
        """Half-width h of the bounds (mean only)."""
        assert self.lower is not None and self.upper is not None
        return (self.upper - self.lower) / 2.0

    def describe(self) -> str:
        what = self.statistic if self.column is None else f"{self.statistic}({self.column})"
        if self.lower is not None:
            what += f" clipped to [{self.lower:g}, {self.upper:g}]"
        if self.group_by:
            what += f" by {self.group_by}"
        if self.start or self.end:
            what += f", admit_date {self.start or '…'} to {self.end or '…'}"
        return what + f", ε={self.epsilon:g}"

    # -- serialisation ----------------------------------------------------------------------
    def to_config(self) -> dict[str, str | float | int]:
        """Flat dict for a Flower ConfigRecord; absent fields are omitted (ConfigRecord has no None).

        Categories are JSON-encoded so a category containing a comma survives the trip.
        """
        out: dict[str, str | float | int] = {"statistic": self.statistic, "epsilon": float(self.epsilon)}
        for key, value in (("column", self.column), ("group-by", self.group_by), ("start", self.start), ("end", self.end)):
            if value is not None:
                out[key] = value
        if self.lower is not None and self.upper is not None:
            out["lower"] = float(self.lower)
            out["upper"] = float(self.upper)
        if self.categories is not None:
            out["categories"] = json.dumps(list(self.categories))
        if self.catalogue is not None:
            out["catalogue"] = json.dumps(list(self.catalogue))
        return out

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "QuerySpec":
        """Inverse of :meth:`to_config`. Unknown keys are refused: a node must not silently skip
        a query feature it does not implement."""
        cfg = dict(config)
        unknown = set(cfg) - _CONFIG_KEYS
        if unknown:
            raise ValueError(f"unknown query key(s): {', '.join(sorted(unknown))}")
        if "statistic" not in cfg or "epsilon" not in cfg:
            raise ValueError("query needs statistic and epsilon")
        categories = None
        if "categories" in cfg:
            raw = cfg["categories"]
            try:
                categories = json.loads(raw) if isinstance(raw, str) else list(raw)
            except json.JSONDecodeError:
                raise ValueError("categories must be a JSON list of strings") from None
            if not isinstance(categories, list) or not all(isinstance(c, str) for c in categories):
                raise ValueError("categories must be a JSON list of strings")
        catalogue = _json_list(cfg["catalogue"], "catalogue") if "catalogue" in cfg else None
        return cls(
            catalogue=None if catalogue is None else tuple(catalogue),
            statistic=str(cfg["statistic"]),
            column=cfg.get("column"),
            lower=cfg.get("lower"),
            upper=cfg.get("upper"),
            group_by=cfg.get("group-by"),
            categories=categories,
            start=cfg.get("start"),
            end=cfg.get("end"),
            epsilon=cfg["epsilon"],
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QuerySpec":
        allowed = {"statistic", "column", "lower", "upper", "group_by", "categories", "start", "end", "epsilon",
                   "catalogue"}
        data = {k.replace("-", "_"): v for k, v in dict(data).items()}
        unknown = set(data) - allowed
        if unknown:
            raise ValueError(f"unknown query field(s): {', '.join(sorted(unknown))}")
        if "statistic" not in data or "epsilon" not in data:
            raise ValueError("a query spec needs statistic and epsilon")
        cats = data.get("categories")
        if isinstance(cats, str):
            data["categories"] = [c for c in cats.split(",")]
        return cls(**data)

    @classmethod
    def from_json(cls, text: str, catalogue: Sequence[str] | None = None) -> "QuerySpec":
        """A spec from JSON text: an object with the dataclass field names (group_by or group-by).
        ``catalogue`` (the run's groups) applies unless the text declares its own."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"query spec is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, dict):
            raise ValueError("query spec must be a JSON object")
        if catalogue is not None and "catalogue" not in data:
            data["catalogue"] = list(catalogue)
        return cls.from_dict(data)


def _json_list(raw: Any, name: str) -> list[str]:
    try:
        value = json.loads(raw) if isinstance(raw, str) else list(raw)
    except (json.JSONDecodeError, TypeError):
        raise ValueError(f"{name} must be a JSON list of strings") from None
    if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
        raise ValueError(f"{name} must be a JSON list of strings")
    return value


def sensitivity(spec: QuerySpec) -> float:
    """L2 sensitivity of :func:`local_answer` under add/remove of one encounter record.

    A record lands in at most one bin. count: that bin moves by 1. sum: by |clip(v)| ≤
    max(|lower|, |upper|). mean: the scaled centred sum moves by |clip(v) - c|/h ≤ 1 and the
    count by 1, so the pair moves by at most √2.
    """
    if spec.statistic == "count":
        return 1.0
    assert spec.lower is not None and spec.upper is not None
    if spec.statistic == "sum":
        return max(abs(spec.lower), abs(spec.upper))
    return math.sqrt(2.0)


def local_answer(records: pd.DataFrame, spec: QuerySpec) -> np.ndarray:
    """The exact (un-noised) vector a node releases, of length ``spec.answer_length``.

    Records outside [start, end] are dropped, as are records whose ``group_by`` value is not a
    declared category and records with a missing value in ``column``. Values are clipped to
    [lower, upper] (always: the sensitivity depends on it; wrong bounds bias the answer).
    For a mean the vector is [Σ (clip(v) - c)/h per bin, count per bin].
    """
    n = len(records)
    keep = np.ones(n, dtype=bool)
    if spec.start is not None or spec.end is not None:
        dates = pd.to_datetime(records["admit_date"]).to_numpy(dtype="datetime64[ns]")
        if spec.start is not None:
            keep &= dates >= np.datetime64(spec.start, "ns")
        if spec.end is not None:
            # End is inclusive by day; compare against the next midnight so times on that day count.
            keep &= dates < np.datetime64(spec.end, "D") + np.timedelta64(1, "D")
    if spec.group_by is not None:
        if spec.group_by not in records.columns:
            raise ValueError(f"records have no column {spec.group_by!r}")
        values = records[spec.group_by].astype("str").str.strip()
        codes = pd.Index(spec.categories).get_indexer(values).astype(np.int64)  # -1: undeclared
        keep &= codes >= 0
    else:
        codes = np.zeros(n, dtype=np.int64)
    v = None
    if spec.column is not None:
        if spec.column not in records.columns:
            raise ValueError(f"records have no column {spec.column!r}")
        v = pd.to_numeric(records[spec.column], errors="coerce").to_numpy(dtype=np.float64)
        keep &= np.isfinite(v)
    k = spec.n_bins
    bins = codes[keep]
    counts = np.bincount(bins, minlength=k).astype(np.float64)
    if spec.statistic == "count":
        return counts
    assert v is not None and spec.lower is not None and spec.upper is not None
    clipped = np.clip(v[keep], spec.lower, spec.upper)
    if spec.statistic == "sum":
        return np.bincount(bins, weights=clipped, minlength=k).astype(np.float64)
    scaled = (clipped - spec.centre) / spec.half_width
    return np.concatenate([np.bincount(bins, weights=scaled, minlength=k), counts]).astype(np.float64)


def exact_statistic(records: pd.DataFrame, spec: QuerySpec) -> np.ndarray:
    """The non-private value per bin (count, sum or mean of clipped values), for tests and
    simulations only: this never leaves a node."""
    answer = local_answer(records, spec)
    return _natural(spec, answer)[0]


def _natural(spec: QuerySpec, total: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-bin statistic (and count, for mean) from a summed answer vector, without clipping."""
    if spec.statistic != "mean":
        return total.astype(np.float64), None
    k = spec.n_bins
    a, c = total[:k], total[k:]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(c > 0, spec.centre + spec.half_width * a / c, np.nan)
    return mean, c


@dataclass(frozen=True)
class Estimate:
    """Per-bin estimates from the noisy answers of several nodes, with a confidence interval."""

    labels: list[str]
    estimate: np.ndarray
    std: np.ndarray
    low: np.ndarray
    high: np.ndarray
    level: float
    interval: str
    noisy_count: np.ndarray | None = None


def combine(
    spec: QuerySpec,
    answers: Sequence[np.ndarray],
    noise_stds: Sequence[float],
    level: float = 0.95,
    mean_interval: str = "conservative",
) -> Estimate:
    """Sum the nodes' noisy vectors and turn them into estimates (post-processing only).

    ``noise_stds`` are the per-node noise std of every component (σ_i·Δ), as each node reported.

    count / sum: unbiased sum, std √(Σ σ_i²Δ²), interval estimate ± z·std (exact for Gaussian
    noise). Not clipped at 0 (that would bias it).

    mean: estimate c + h·Â/Ĉ, clipped to [lower, upper] (the clipped mean lies there, so this only
    removes error). ``std`` is the delta-method std h·s·√(1 + r²)/Ĉ with r = Â/Ĉ. The default
    interval is *conservative*, not delta-method: a union bound over two Gaussian intervals at
    level 1 - α/2 each for Â and Ĉ, mapped through the ratio and intersected with the bounds. It
    holds with probability ≥ level without any approximation, and widens to [lower, upper] when
    the noisy count is too small to be sure it is positive (where the delta method breaks down).
    It is about 1.6× wider than the delta-method one at typical counts (measured coverage ≈ 99.8 %
    at level 95 %). ``mean_interval="delta"`` gives estimate ± z·std instead (≈ level coverage
    when the noisy count is large against its noise, no guarantee otherwise; still falls back to
    [lower, upper] when the count is not surely positive), intersected with the bounds.
    """
    if mean_interval not in ("conservative", "delta"):
        raise ValueError(f"mean_interval must be 'conservative' or 'delta', got {mean_interval!r}")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    labels = spec.labels
    k = spec.n_bins
    if len(answers) != len(noise_stds):
        raise ValueError("one noise std per answer vector is needed")
    if not answers:
        nan = np.full(k, np.nan)
        return Estimate(labels, nan, nan, nan, nan, level, "no answers",
                        np.full(k, np.nan) if spec.statistic == "mean" else None)
    stacked = np.vstack([np.asarray(a, dtype=np.float64) for a in answers])
    if stacked.shape[1] != spec.answer_length:
        raise ValueError(f"answers have length {stacked.shape[1]}, expected {spec.answer_length}")
    total = stacked.sum(axis=0)
    s = math.sqrt(float(np.sum(np.square(np.asarray(noise_stds, dtype=np.float64)))))
    alpha = 1.0 - level
    if spec.statistic != "mean":
        z = NormalDist().inv_cdf(1 - alpha / 2)
        std = np.full(k, s)
        return Estimate(labels, total, std, total - z * std, total + z * std, level,
                        f"{level:.0%} Gaussian interval (exact)")
    return _combine_mean(spec, total, s, level, mean_interval)


def _combine_mean(spec: QuerySpec, total: np.ndarray, s: float, level: float, mean_interval: str) -> Estimate:
    """The mean's estimate and interval from the summed noisy (Â, Ĉ) (see `combine`)."""
    assert spec.lower is not None and spec.upper is not None
    labels, k, alpha = spec.labels, spec.n_bins, 1.0 - level
    c, h = spec.centre, spec.half_width
    a_hat, n_hat = total[:k], total[k:]
    z = NormalDist().inv_cdf(1 - alpha / 4)  # two intervals at 1 - α/2 each
    a_lo, a_hi = a_hat - z * s, a_hat + z * s
    n_lo, n_hi = n_hat - z * s, n_hat + z * s
    est = np.full(k, np.nan)
    std = np.full(k, np.nan)
    low = np.full(k, spec.lower)
    high = np.full(k, spec.upper)
    pos = n_hat > 0
    r = np.clip(a_hat[pos] / n_hat[pos], -1.0, 1.0)
    est[pos] = c + h * r
    std[pos] = h * s * np.sqrt(1.0 + r**2) / n_hat[pos]
    sure = n_lo > 0  # elsewhere the interval stays [lower, upper]: the count may be ≤ 0
    if mean_interval == "delta":
        z2 = NormalDist().inv_cdf(1 - alpha / 2)
        low[sure] = np.clip(est[sure] - z2 * std[sure], spec.lower, spec.upper)
        high[sure] = np.clip(est[sure] + z2 * std[sure], spec.lower, spec.upper)
        return Estimate(labels, est, std, low, high, level, f"{level:.0%} delta-method interval (approximate)", n_hat)
    lo_r = np.minimum(a_lo[sure] / n_lo[sure], a_lo[sure] / n_hi[sure])
    hi_r = np.maximum(a_hi[sure] / n_lo[sure], a_hi[sure] / n_hi[sure])
    low[sure] = c + h * np.clip(lo_r, -1.0, 1.0)
    high[sure] = c + h * np.clip(hi_r, -1.0, 1.0)
    return Estimate(labels, est, std, low, high, level,
                    f"≥{level:.0%} conservative interval (union bound over noisy sum and count)", n_hat)
