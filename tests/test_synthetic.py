"""Synthetic hospitals: deterministic, valid, seasonal and heterogeneous."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.drg import DRG_GROUPS
from core.records import load_records
from core.series import demand_series
from core.synthetic import (
    RECORD_COLUMNS,
    SyntheticConfig,
    end_date,
    generate,
    generate_hospital_records,
    hospital_params,
)

SMALL = SyntheticConfig(hospitals=3, years=1, seed=7)


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """The in-memory frame as load_records would type it (numbers float, schema order)."""
    out = df.astype({"length_of_stay": float, "cost": float, "age": float})
    return out[["admit_date", "drg_group", "patient_id", "length_of_stay", "cost", "age", "encounter_id"]]


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_same_seed_same_bytes(tmp_path, fmt):
    generate(SMALL, tmp_path / "a", fmt)
    generate(SMALL, tmp_path / "b", fmt)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    suffix = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet"}[fmt]
    assert sorted(a) == ["hospital_000" + suffix, "hospital_001" + suffix, "hospital_002" + suffix, "hospitals.csv"]


def test_other_seed_differs(tmp_path):
    generate(SMALL, tmp_path / "a")
    generate(SyntheticConfig(hospitals=3, years=1, seed=8), tmp_path / "b")
    assert files(tmp_path / "a")["hospital_000.csv"] != files(tmp_path / "b")["hospital_000.csv"]


def test_hospital_does_not_depend_on_cohort_size(tmp_path):
    few = generate(SyntheticConfig(hospitals=2, years=1, seed=7), tmp_path / "few")
    many = generate(SyntheticConfig(hospitals=5, years=1, seed=7), tmp_path / "many")
    for name in ("hospital_000.csv", "hospital_001.csv"):
        assert (tmp_path / "few" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()
    pd.testing.assert_frame_equal(few, many.iloc[:2])
    # a hospital generated on its own equals the same hospital inside a cohort
    alone = generate_hospital_records(SyntheticConfig(hospitals=1, years=1, seed=7), 4)
    pd.testing.assert_frame_equal(load_records(tmp_path / "many" / "hospital_004.csv"), _typed(alone))
    # hospital-level parameters do not depend on the number of years either
    one, three = hospital_params(SyntheticConfig(years=1), 4), hospital_params(SyntheticConfig(years=3), 4)
    assert (one.weekly_admissions, one.beds, one.growth) == (three.weekly_admissions, three.beds, three.growth)
    np.testing.assert_array_equal(one.case_mix, three.case_mix)


def test_files_validate_and_have_the_schema(tmp_path):
    table = generate(SMALL, tmp_path, "csv")
    header = (tmp_path / "hospital_000.csv").read_text().splitlines()[0]
    assert header.split(",") == list(RECORD_COLUMNS)
    second = (tmp_path / "hospital_000.csv").read_text().splitlines()[1].split(",")
    assert len(second[2]) == 10 and second[2][4] == "-"  # YYYY-MM-DD
    for i in range(SMALL.hospitals):
        df = load_records(tmp_path / f"hospital_{i:03d}.csv")
        assert len(df) > 0
        assert df["admit_date"].min() >= pd.Timestamp(SMALL.start)
        assert df["admit_date"].max() < end_date(SMALL)
        assert set(df["drg_group"]) <= set(DRG_GROUPS)
        assert (df["length_of_stay"] >= 0).all() and (df["length_of_stay"] % 1 == 0).all()
        assert df["age"].between(0, 120).all() and (df["cost"] > 0).all()
        assert df["encounter_id"].is_unique
    assert list(table.columns) == ["hospital", "resources", "size_factor", "beds"]
    assert (table["beds"] > 0).all() and (table["resources"] > 0).all()
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "hospitals.csv"), table)


def test_parquet_files_validate(tmp_path):
    generate(SyntheticConfig(hospitals=1, years=1), tmp_path, "parquet")
    assert len(load_records(tmp_path / "hospital_000.parquet")) > 0


def test_end_date_is_whole_weeks():
    cfg = SyntheticConfig(years=3)
    end = end_date(cfg)
    assert end.weekday() == pd.Timestamp(cfg.start).weekday()
    assert 3 * 365 - 7 <= (end - pd.Timestamp(cfg.start)).days <= 3 * 365 + 7


def test_winter_respiratory_peak():
    cfg = SyntheticConfig(hospitals=3, years=2, seed=1)
    daily = []
    for i in range(cfg.hospitals):
        df = generate_hospital_records(cfg, i)
        daily.append(
            demand_series(df, start=cfg.start, end=end_date(cfg), period="day", groups=["respiratory", "infection"])
        )
    total = sum(daily)
    month = total.index.month
    winter = total[np.isin(month, [12, 1, 2])].mean()
    summer = total[np.isin(month, [6, 7, 8])].mean()
    assert winter["respiratory"] > 1.3 * summer["respiratory"]
    assert winter["infection"] > 1.1 * summer["infection"]


def test_fewer_weekend_admissions():
    df = generate_hospital_records(SyntheticConfig(years=1), 0)
    per_day = df.groupby(df["admit_date"].dt.day_of_week).size()
    assert per_day.loc[[5, 6]].mean() < per_day.loc[[0, 1, 2, 3, 4]].mean()


def test_sizes_and_case_mix_heterogeneous():
    cfg = SyntheticConfig()
    params = [hospital_params(cfg, i) for i in range(cfg.hospitals)]
    sizes = np.array([p.weekly_admissions for p in params])
    assert sizes.min() >= 20 and sizes.max() <= 600
    assert sizes.max() / sizes.min() > 5
    mixes = np.array([p.case_mix for p in params])
    assert mixes.shape == (cfg.hospitals, len(DRG_GROUPS))
    np.testing.assert_allclose(mixes.sum(axis=1), 1.0)
    assert np.abs(mixes - mixes.mean(axis=0)).sum(axis=1).mean() > 0.1  # non-IID case mix
    # realised volumes follow the declared sizes
    small, big = int(np.argmin(sizes)), int(np.argmax(sizes))
    short = SyntheticConfig(years=1)
    assert len(generate_hospital_records(short, big)) > 4 * len(generate_hospital_records(short, small))


def test_repeat_patients_exist():
    df = generate_hospital_records(SyntheticConfig(years=1), 1)
    visits = df["patient_id"].value_counts()
    assert (visits >= 2).sum() > 0.05 * len(visits)
    assert visits.max() >= 3


# --- the faster generator against the one it replaced (same records, dtypes and bytes) ------------
# Reference: core/synthetic.py before the ids were built from bytes (commit 1ff8288), copied here.

def _reference_ids(prefix: str, numbers: np.ndarray) -> np.ndarray:
    digits = np.strings.zfill(np.asarray(numbers, dtype=np.int64).astype(np.str_), 7)
    return np.strings.add(prefix, digits).astype(object)


def _reference_records(cfg: SyntheticConfig, hospital_index: int) -> pd.DataFrame:
    from core.drg import RELATIVE_WEIGHTS
    from core.synthetic import (
        DEFAULT_MEAN_LOS,
        MEAN_LOS,
        _daily_rates,
        _params,
        _patients,
        _rngs,
    )

    params_rng, rng = _rngs(cfg, hospital_index)
    p = _params(cfg, hospital_index, params_rng)
    groups = list(cfg.groups)
    n_g = len(groups)
    counts = rng.poisson(_daily_rates(cfg, p, rng))
    cell = np.repeat(np.arange(counts.size), counts.ravel())
    day, g = cell // n_g, cell % n_g
    n = len(cell)
    order = np.lexsort((rng.random(n), day))
    day, g = day[order], g[order]
    mean_los = np.array([MEAN_LOS.get(x, DEFAULT_MEAN_LOS) for x in groups])[g]
    sigma = cfg.los_sigma
    los = np.floor(rng.lognormal(np.log(mean_los) - sigma**2 / 2, sigma)).astype(np.int64)
    weight = np.array([RELATIVE_WEIGHTS.get(x, 1.0) for x in groups])[g]
    cost = cfg.base_cost * weight * (0.6 + 0.4 * los / mean_los) * rng.gamma(8.0, 1 / 8.0, n)
    cost = np.round(cost, 2)
    patient, age = _patients(groups, g, day, rng)
    start = pd.Timestamp(cfg.start).normalize()
    prefix = f"H{hospital_index:03d}"
    df = pd.DataFrame(
        {
            "encounter_id": _reference_ids(f"{prefix}-E", np.arange(1, n + 1)),
            "patient_id": _reference_ids(f"{prefix}-P", patient),
            "admit_date": (np.datetime64(start, "D") + day.astype("timedelta64[D]")).astype("datetime64[ns]"),
            "drg_group": np.array(groups, dtype=object)[g],
            "length_of_stay": los,
            "cost": cost,
            "age": age,
        },
        columns=list(RECORD_COLUMNS),
    )
    df["drg_group"] = df["drg_group"].astype("str")
    return df


def _reference_write(df: pd.DataFrame, path: Path) -> None:
    import gzip

    import pyarrow as pa
    import pyarrow.csv as pa_csv

    name = path.name.lower()
    if name.endswith(".parquet"):
        df.to_parquet(path, index=False)
        return
    table = pa.Table.from_pandas(df, preserve_index=False)
    i = table.column_names.index("admit_date")
    table = table.set_column(i, "admit_date", table["admit_date"].cast(pa.date32()))
    header = (",".join(table.column_names) + "\n").encode()
    options = pa_csv.WriteOptions(include_header=False, quoting_style="none")
    with open(path, "wb") as raw:
        fh = gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="", compresslevel=6) if name.endswith(".gz") else raw
        try:
            fh.write(header)
            pa_csv.write_csv(table, fh, options)
        finally:
            if fh is not raw:
                fh.close()


_ID_CASES = [
    np.array([0]),
    np.array([9_999_999, 10_000_000, 5, 123_456_789_012, 99]),  # wider than 7 digits among narrow ones
    np.array([10_000_000, 99_999_999]),  # all wider
    np.array([2**63 - 1, 0, 10**18]),  # 19 digits
    np.array([-5, 3, -12_345_678]),  # never generated, but zfill's sign handling is kept
    np.arange(1, 25_001),
    np.random.default_rng(0).integers(0, 10**7, 30_000),
    np.random.default_rng(1).integers(0, 10**10, 1_000),
]


@pytest.mark.parametrize("numbers", _ID_CASES, ids=lambda a: f"n{len(a)}")
@pytest.mark.parametrize("prefix", ["H000-E", "H1234-P", ""])
def test_ids_are_the_numpy_zfill_strings(prefix, numbers):
    from core.synthetic import _ids

    got = _ids(prefix, numbers)
    assert got.to_pylist() == list(_reference_ids(prefix, numbers))
    got.validate(full=True)
    assert _ids(prefix, np.zeros(0, dtype=np.int64)).to_pylist() == []  # the reference raised here


@pytest.mark.parametrize(("cfg", "hospitals"), [
    (SyntheticConfig(seed=0), range(6)),  # 3 years
    (SyntheticConfig(years=1, seed=3, groups=("respiratory", "neonatal", "unlisted")), range(3)),
    (SyntheticConfig(years=6, seed=2), [1]),  # > 2**11 days: the day shuffle's lexsort path
    (SyntheticConfig(seed=1), [1234]),  # a 4-digit hospital prefix
])
def test_records_equal_the_reference_implementation(cfg, hospitals):
    for i in hospitals:
        got, want = generate_hospital_records(cfg, i), _reference_records(cfg, i)
        pd.testing.assert_frame_equal(got, want, check_exact=True)  # values and dtypes (str vs object too)
        assert [type(got[c].array) for c in got] == [type(want[c].array) for c in want]


@pytest.mark.parametrize("fmt", ["csv", "csv.gz", "parquet"])
def test_written_files_equal_the_reference_implementation(tmp_path, fmt):
    cfg = SyntheticConfig(hospitals=3, years=2, seed=4)
    generate(cfg, tmp_path / "new", fmt)
    suffix = {"csv": ".csv", "csv.gz": ".csv.gz", "parquet": ".parquet"}[fmt]
    for i in range(cfg.hospitals):
        ref = tmp_path / f"ref{suffix}"
        _reference_write(_reference_records(cfg, i), ref)
        assert (tmp_path / "new" / f"hospital_{i:03d}{suffix}").read_bytes() == ref.read_bytes()


def test_a_hospital_without_encounters_is_an_empty_file(tmp_path):
    """The reference raised (numpy's zfill of no strings); now the header and typed columns."""
    cfg = SyntheticConfig(hospitals=1, years=0.02, size_bounds=(0.0, 0.0))
    empty = generate_hospital_records(cfg, 0)
    assert len(empty) == 0
    assert (empty.dtypes == generate_hospital_records(SyntheticConfig(years=1), 0).dtypes).all()
    generate(cfg, tmp_path)
    assert (tmp_path / "hospital_000.csv").read_text() == ",".join(RECORD_COLUMNS) + "\n"
