"""Deterministic, non-IID synthetic hospitals as encounter-record files.

Each hospital gets its own random streams derived from ``(seed, hospital_index)``, so a hospital's
file is the same whether 5 or 500 hospitals are generated. Hospital-level parameters (size, case
mix, beds) use a stream separate from the daily draws, so they also do not depend on ``years``.

What makes the cohort non-IID: lognormal sizes (mean weekly admissions ~20 to ~600), a Dirichlet
case mix per hospital, per-hospital trend and random surges. Shared structure: fewer weekend
admissions and a winter peak for respiratory and infection groups.
"""

from __future__ import annotations

import contextlib
import gzip
import multiprocessing as mp
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pa_csv

from core.drg import DRG_GROUPS, RELATIVE_WEIGHTS

FORMATS: dict[str, str] = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet"}
RECORD_COLUMNS: tuple[str, ...] = (
    "encounter_id",
    "patient_id",
    "admit_date",
    "drg_group",
    "length_of_stay",
    "cost",
    "age",
)

# Monday..Sunday admission multipliers (elective admissions mostly on weekdays).
DAY_OF_WEEK = np.array([1.15, 1.10, 1.05, 1.05, 1.00, 0.85, 0.80])

# group -> (amplitude, day of year of the peak) of the annual cycle.
SEASONALITY: dict[str, tuple[float, int]] = {
    "respiratory": (0.45, 20),
    "infection": (0.30, 25),
    "cardiac": (0.10, 20),
    "neonatal": (0.05, 250),
    "obstetric": (0.05, 250),
    "trauma": (0.12, 196),
    "orthopedic": (0.08, 30),  # winter falls
}
DEFAULT_SEASONALITY = (0.03, 20)

# group -> mean length of stay in days.
MEAN_LOS: dict[str, float] = {
    "respiratory": 5.0,
    "cardiac": 4.5,
    "orthopedic": 4.0,
    "obstetric": 2.5,
    "neonatal": 3.0,
    "gastro": 3.5,
    "neuro": 6.0,
    "renal": 5.0,
    "oncology": 6.5,
    "infection": 5.5,
    "trauma": 5.0,
    "mental_health": 12.0,
}
DEFAULT_MEAN_LOS = 4.5

# group -> share of encounters by distinct patients (the rest are readmissions of the same pool).
DISTINCT_PATIENT_SHARE: dict[str, float] = {
    "oncology": 0.35,
    "renal": 0.45,
    "cardiac": 0.65,
    "mental_health": 0.6,
    "respiratory": 0.75,
    "obstetric": 0.95,
    "neonatal": 0.97,
    "trauma": 0.95,
}
DEFAULT_DISTINCT_SHARE = 0.85

# group -> (mean, sd) of patient age at first encounter.
AGE: dict[str, tuple[float, float]] = {
    "neonatal": (0.0, 0.0),
    "obstetric": (30.0, 5.5),
    "oncology": (64.0, 12.0),
    "cardiac": (68.0, 12.0),
    "respiratory": (62.0, 22.0),
    "mental_health": (38.0, 15.0),
    "trauma": (40.0, 22.0),
    "orthopedic": (60.0, 18.0),
    "renal": (62.0, 15.0),
}
DEFAULT_AGE = (52.0, 20.0)


@dataclass
class SyntheticConfig:
    """Knobs of the synthetic cohort; defaults give 20 hospitals over ~3 years."""

    hospitals: int = 20
    years: float = 3
    start: str = "2023-01-02"
    seed: int = 0
    groups: tuple[str, ...] = DRG_GROUPS
    size_median: float = 110.0  # median mean-weekly admissions
    size_sigma: float = 0.9  # lognormal sigma of hospital size
    size_bounds: tuple[float, float] = (20.0, 600.0)
    case_mix_concentration: float = 4.0  # Dirichlet: alpha_g = concentration * G * base share
    trend_sd: float = 0.04  # sd of the per-hospital annual growth rate
    trend_mean: float = 0.02
    shocks_per_year: float = 1.5
    shock_days: tuple[int, int] = (3, 21)
    shock_magnitude: tuple[float, float] = (1.3, 2.0)
    los_sigma: float = 0.7
    base_cost: float = 5000.0  # cost of an average case (relative weight 1.0)
    target_occupancy: float = 0.85
    beds_noise: float = 0.15
    base_mix: dict[str, float] = field(default_factory=dict)  # optional base case-mix shares


def n_days(cfg: SyntheticConfig) -> int:
    """Whole weeks closest to ``years`` years, so a Monday start gives a Monday end."""
    return 7 * max(1, round(cfg.years * 365.25 / 7))


def end_date(cfg: SyntheticConfig) -> pd.Timestamp:
    """Exclusive end of the generated data (``start + n_days``)."""
    return pd.Timestamp(cfg.start).normalize() + pd.Timedelta(days=n_days(cfg))


def _rngs(cfg: SyntheticConfig, hospital_index: int) -> tuple[np.random.Generator, np.random.Generator]:
    # Distinct streams for hospital parameters and daily draws, keyed only by (seed, index).
    root = np.random.SeedSequence([int(cfg.seed), int(hospital_index)])
    params, draws = root.spawn(2)
    return np.random.default_rng(params), np.random.default_rng(draws)


@dataclass(frozen=True)
class HospitalParams:
    index: int
    weekly_admissions: float
    case_mix: np.ndarray
    growth: float
    beds: int


def hospital_params(cfg: SyntheticConfig, hospital_index: int) -> HospitalParams:
    """The hospital-level parameters (size, case mix, growth, beds); independent of ``years``."""
    rng, _ = _rngs(cfg, hospital_index)
    return _params(cfg, hospital_index, rng)


def _params(cfg: SyntheticConfig, hospital_index: int, rng: np.random.Generator) -> HospitalParams:
    groups = list(cfg.groups)
    lo, hi = cfg.size_bounds
    size = float(np.clip(cfg.size_median * np.exp(cfg.size_sigma * rng.standard_normal()), lo, hi))
    base = np.array([cfg.base_mix.get(g, 1.0) for g in groups], dtype=float)
    base = base / base.sum()
    mix = rng.dirichlet(cfg.case_mix_concentration * len(groups) * base)
    growth = float(cfg.trend_mean + cfg.trend_sd * rng.standard_normal())
    mean_los = float(np.dot(mix, [MEAN_LOS.get(g, DEFAULT_MEAN_LOS) for g in groups]))
    occupied = size / 7.0 * mean_los
    beds = int(np.ceil(occupied / cfg.target_occupancy * np.exp(cfg.beds_noise * rng.standard_normal())))
    return HospitalParams(hospital_index, size, mix, growth, max(beds, 1))


def _daily_rates(cfg: SyntheticConfig, p: HospitalParams, rng: np.random.Generator) -> np.ndarray:
    """Expected admissions per (day, group), shape (days, G)."""
    groups = list(cfg.groups)
    days = pd.date_range(pd.Timestamp(cfg.start).normalize(), periods=n_days(cfg), freq="D")
    dow = DAY_OF_WEEK[days.day_of_week.to_numpy()] / DAY_OF_WEEK.mean()
    doy = days.day_of_year.to_numpy()
    amp = np.array([SEASONALITY.get(g, DEFAULT_SEASONALITY)[0] for g in groups])
    peak = np.array([SEASONALITY.get(g, DEFAULT_SEASONALITY)[1] for g in groups])
    season = 1.0 + amp[None, :] * np.cos(2 * np.pi * (doy[:, None] - peak[None, :]) / 365.25)
    t_years = np.arange(len(days)) / 365.25
    trend = np.exp(p.growth * t_years)

    shock = np.ones((len(days), len(groups)))
    n_shocks = rng.poisson(cfg.shocks_per_year * len(days) / 365.25)
    for _ in range(n_shocks):
        first = rng.integers(0, len(days))
        length = rng.integers(cfg.shock_days[0], cfg.shock_days[1] + 1)
        magnitude = rng.uniform(*cfg.shock_magnitude)
        hit = rng.random(len(groups)) < 0.4
        if not hit.any():
            hit[rng.integers(len(groups))] = True
        shock[first : first + length, hit] *= magnitude

    return (p.weekly_admissions / 7.0) * p.case_mix[None, :] * dow[:, None] * season * trend[:, None] * shock


def generate_hospital_records(cfg: SyntheticConfig, hospital_index: int) -> pd.DataFrame:
    """One hospital's encounter records, sorted by admission date.

    Columns: encounter_id, patient_id, admit_date (datetime64[ns], written as YYYY-MM-DD),
    drg_group, length_of_stay (int days ≥ 0), cost (2 decimals), age (int 0–120).
    """
    params_rng, rng = _rngs(cfg, hospital_index)
    p = _params(cfg, hospital_index, params_rng)
    groups = list(cfg.groups)
    n_g = len(groups)

    counts = rng.poisson(_daily_rates(cfg, p, rng))  # (days, G)
    cell = np.repeat(np.arange(counts.size), counts.ravel())
    day, g = cell // n_g, cell % n_g
    n = len(cell)
    # Shuffle within each day so group order inside a day carries no structure.
    order = _day_shuffle(day, rng.random(n))
    day, g = day[order], g[order]

    # Length of stay and cost by group: lognormal LOS; cost scales with the DRG weight and LOS.
    mean_los = np.array([MEAN_LOS.get(x, DEFAULT_MEAN_LOS) for x in groups])[g]
    sigma = cfg.los_sigma
    los = np.floor(rng.lognormal(np.log(mean_los) - sigma**2 / 2, sigma)).astype(np.int64)
    weight = np.array([RELATIVE_WEIGHTS.get(x, 1.0) for x in groups])[g]
    cost = cfg.base_cost * weight * (0.6 + 0.4 * los / mean_los) * rng.gamma(8.0, 1 / 8.0, n)
    cost = np.round(cost, 2)

    patient, age = _patients(groups, g, day, rng)

    start_ns = pd.Timestamp(cfg.start).normalize().as_unit("ns").value
    prefix = f"H{hospital_index:03d}"
    return pd.DataFrame(
        {
            "encounter_id": _str_column(_ids(f"{prefix}-E", np.arange(1, n + 1))),
            "patient_id": _str_column(_ids(f"{prefix}-P", patient)),
            "admit_date": (start_ns + day * _NS_PER_DAY).view("datetime64[ns]"),
            "drg_group": _str_column(pa.array(groups, pa.large_string()).take(g)),
            "length_of_stay": los,
            "cost": cost,
            "age": age,
        },
        columns=list(RECORD_COLUMNS),
    )


def _day_shuffle(day: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """``np.lexsort((noise, day))``, ~5x faster: one sort of (day, noise) packed into a uint64.

    ``noise`` comes from ``Generator.random``, so ``noise * 2**53`` is an exact integer below 2**53
    and the packed keys order exactly as the pairs do; ties (equal noise on one day) keep index
    order in both, as the sort is stable. Days ≥ 2**11 (> 5.6 years) do not fit: lexsort.
    """
    if len(day) == 0 or day.max() >= 1 << 11 or day.min() < 0:
        return np.lexsort((noise, day))
    key = (day.astype(np.uint64) << np.uint64(53)) | (noise * 2.0**53).astype(np.uint64)
    return np.argsort(key, kind="stable")


def _patients(groups: list[str], g: np.ndarray, day: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(patient number, age) per encounter; draws from `rng` in a fixed order (determinism)."""
    n = len(g)
    # Repeat patients: each group draws from its own pool, smaller than its encounter count, so
    # chronic groups (oncology, renal) readmit often. Ages are per patient and grow with time.
    patient = np.empty(n, dtype=np.int64)
    base_age = np.empty(n, dtype=np.float64)
    pool_offset = 0
    for gi, name in enumerate(groups):
        members = np.flatnonzero(g == gi)
        if len(members) == 0:
            continue
        share = DISTINCT_PATIENT_SHARE.get(name, DEFAULT_DISTINCT_SHARE)
        pool = max(1, int(round(len(members) * share)))
        local = rng.integers(0, pool, len(members))
        patient[members] = pool_offset + local
        mu, sd = AGE.get(name, DEFAULT_AGE)
        ages = np.clip(rng.normal(mu, sd, pool), 0, 110) if sd > 0 else np.full(pool, mu)
        base_age[members] = ages[local]
        pool_offset += pool
    # Anonymous ids: a random relabelling so the number does not reveal the group.
    relabel = rng.permutation(max(pool_offset, 1))
    patient = relabel[patient] if n else patient
    is_neonatal = np.array([x == "neonatal" for x in groups])[g] if n else np.zeros(0, bool)
    age = np.where(is_neonatal, 0, np.floor(base_age + day / 365.25))
    age = np.clip(age, 0, 120).astype(np.int64)

    return patient, age


# Powers of ten 10..10**18: a number's digit count is 1 + how many of them it reaches.
_POW10 = 10 ** np.arange(1, 19, dtype=np.int64)
_NS_PER_DAY = 86_400 * 10**9
# The dtype a DataFrame gives Python strings (pandas 3: Arrow-backed "str"); string columns are built
# as Arrow arrays and handed over as that dtype without a round trip through Python objects.
_FRAME_STR = pd.Series(np.array(["x"], dtype=object)).dtype
_ARROW_STR = isinstance(_FRAME_STR, pd.StringDtype) and _FRAME_STR.storage == "pyarrow"


def _str_column(values: pa.Array) -> Any:
    if _ARROW_STR:
        return pd.arrays.ArrowStringArray(values, dtype=_FRAME_STR)
    return values.to_numpy(zero_copy_only=False)  # Python strings: the frame infers the dtype as before


def _ids(prefix: str, numbers: np.ndarray) -> pa.Array:
    """``prefix + str(n).zfill(7)`` for each number, as an Arrow string array.

    The digits are written by integer arithmetic into one byte buffer: ~1.3 ms CPU per 25k ids,
    where numpy's str conversion, zfill and add took ~12.6 ms, and the frame then converted the
    Python strings to Arrow. Numbers of 8+ digits keep all their digits, as zfill does.
    """
    x = np.asarray(numbers, dtype=np.int64)
    if len(x) and x.min() < 0:  # never generated (zfill would put the sign first): the slow path
        strings = np.strings.add(prefix, np.strings.zfill(x.astype(np.str_), 7))
        return pa.array(strings.astype(object), pa.large_string())
    head = np.frombuffer(prefix.encode(), dtype=np.uint8)
    digits = np.maximum(np.searchsorted(_POW10, x, side="right") + 1, 7) if x.max(initial=0) >= 10**7 else None
    width = 7 if digits is None else int(digits.max())
    buf = np.empty((len(x), len(head) + width), dtype=np.uint8)
    buf[:, : len(head)] = head
    q = x.astype(np.uint32 if width < 10 else np.uint64)  # uint32 division is ~2x faster than int64
    for col in range(len(head) + width - 1, len(head) - 1, -1):
        buf[:, col] = q % 10 + 48  # ASCII "0" + digit
        q //= 10
    if digits is None:
        offsets = np.arange(len(x) + 1, dtype=np.int64) * buf.shape[1]
    else:  # drop the padding zeros of numbers narrower than the widest one
        pos = np.arange(buf.shape[1]) - len(head)
        buf = buf[(pos < 0)[None, :] | (pos[None, :] >= (width - digits)[:, None])]
        offsets = np.concatenate([[0], np.cumsum(len(head) + digits)])
    return pa.Array.from_buffers(pa.large_string(), len(x), [None, pa.py_buffer(offsets), pa.py_buffer(buf)])


def hospital_name(hospital_index: int) -> str:
    return f"hospital_{hospital_index:03d}"


def write_records(df: pd.DataFrame, path: Path) -> None:
    """Write records as CSV, CSV.GZ or Parquet (by suffix); same frame -> same bytes."""
    name = path.name.lower()
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
        return
    # One thread: a frame this size converts in ~1 ms; a thread pool only adds overhead (2x CPU).
    table = pa.Table.from_pandas(df, preserve_index=False, nthreads=1)
    if "admit_date" in table.column_names:
        i = table.column_names.index("admit_date")
        table = table.set_column(i, "admit_date", table["admit_date"].cast(pa.date32()))
    # pyarrow's writer is ~10x faster than DataFrame.to_csv. It always quotes the header, so the
    # header is written by hand; quoting_style="none" raises (never corrupts) if a value would
    # need quotes.
    header = (",".join(table.column_names) + "\n").encode()
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    with open(path, "wb") as raw:
        # mtime=0 in the gzip header keeps repeated runs byte-identical.
        fh = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) if name.endswith(".gz") else raw
        try:
            fh.write(header)
            pa_csv.write_csv(table, fh, options)
        finally:
            if fh is not raw:
                fh.close()


def generate(
    cfg: SyntheticConfig,
    out_dir: str | Path,
    fmt: str = "csv",
    *,
    on_hospital: Callable[[int], None] | None = None,
    on_records: Callable[[int, pd.DataFrame], None] | None = None,
    workers: int = 1,
    summarise: Callable[[int, pd.DataFrame], Any] | None = None,
    on_summary: Callable[[int, Any], None] | None = None,
) -> pd.DataFrame:
    """Write ``hospital_000.<fmt>`` … and ``hospitals.csv`` into ``out_dir``; return the latter.

    ``hospitals.csv`` is the public per-hospital table: ``hospital`` (file stem), ``resources``
    (R_i for the allocation core, here equal to beds), ``size_factor`` (expected mean weekly
    admissions / 100) and ``beds`` (expected occupancy at 85 % × lognormal noise).

    ``workers=N > 1`` generates and writes the hospitals in N spawned processes; files and table
    are the same as with one (spawn re-imports the program's main module: it must be import-safe,
    the ``if __name__ == "__main__":`` idiom). Callbacks run in this process, in hospital order:
    ``on_hospital(i)`` after hospital i's file is written (progress reporting);
    ``on_summary(i, summarise(i, records))``, where ``summarise`` runs next to the records (in a
    worker when N > 1, so it must be picklable: a module-level function or a partial of one) and
    only its result crosses processes (a simulation driver takes each hospital's true demand so);
    ``on_records(i, records)`` (one process only) sees each hospital's records as written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    if cfg.hospitals < 1:
        raise ValueError("hospitals must be at least 1")
    if workers < 1:
        raise ValueError(f"workers must be at least 1 (got {workers})")
    if on_records is not None and workers > 1:
        raise ValueError("on_records needs workers=1 (the records stay in the workers); use summarise")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = partial(_write_hospital, cfg, out, FORMATS[fmt], summarise)
    if workers == 1:
        results: Iterator[tuple[dict[str, Any], Any]] = (task(i, on_records) for i in range(cfg.hospitals))
    else:
        results = _in_processes(task, cfg.hospitals, workers)
    rows = []
    with contextlib.closing(results):  # an error or Ctrl-C here stops the workers too
        for i, (row, summary) in enumerate(results):
            rows.append(row)
            if on_summary is not None and summarise is not None:
                on_summary(i, summary)
            if on_hospital is not None:
                on_hospital(i)
    table = pd.DataFrame(rows, columns=["hospital", "resources", "size_factor", "beds"])
    table.to_csv(out / "hospitals.csv", index=False, lineterminator="\n")
    return table


def _write_hospital(cfg: SyntheticConfig, out: Path, suffix: str, summarise: Callable[[int, pd.DataFrame], Any] | None,
                    i: int, on_records: Callable[[int, pd.DataFrame], None] | None = None) -> tuple[dict[str, Any], Any]:
    """(hospital i's hospitals.csv row, summarise(i, records) or None), after writing its file."""
    records = generate_hospital_records(cfg, i)
    write_records(records, out / f"{hospital_name(i)}{suffix}")
    if on_records is not None:
        on_records(i, records)
    p = hospital_params(cfg, i)
    row = {"hospital": hospital_name(i), "resources": float(p.beds), "size_factor": round(p.weekly_admissions / 100.0, 4),
           "beds": p.beds}
    return row, (summarise(i, records) if summarise is not None else None)


def _in_processes(task: Callable[[int], Any], count: int, workers: int) -> Iterator[Any]:
    """task(0) … task(count - 1) in a pool of spawned processes, yielded in order.

    spawn, not fork: the caller may hold torch's threads, and fork copies a process with threads
    in any state. Not forkserver either: Python has one forkserver per process, and the in-process
    grid preloads torch into it when it starts it; started here first, it would lack those
    modules and every node worker would import torch again. A task's exception is re-raised here
    (at its place in the order); the remaining tasks are cancelled and the workers stopped.
    """
    pool = ProcessPoolExecutor(min(workers, count), mp_context=mp.get_context("spawn"), initializer=_worker_init)
    try:
        yield from pool.map(task, range(count))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group; the parent decides (it cancels and stops the pool).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # N processes share the cores: pyarrow's own thread pool would only oversubscribe them.
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
