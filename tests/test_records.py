"""Encounter-record validation: every problem names file, row (the real line) and column."""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.records import (
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    Problem,
    RecordsError,
    load_records,
    read_records,
    validate_records,
)

HEADER = "admit_date,drg_group,patient_id,length_of_stay,cost,age,encounter_id"
GOOD = "2023-01-02,cardiac,P1,3,1200.5,64,E1"


def write(tmp_path: Path, lines: list[str], name: str = "records.csv") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def problems_of(path: Path) -> list[Problem]:
    with pytest.raises(RecordsError) as info:
        load_records(path)
    return info.value.problems


def only(problems: list[Problem]) -> Problem:
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def assert_one_line(problem: Problem) -> None:
    text = str(problem)
    assert "\n" not in text and len(text) <= 200


# --------------------------------------------------------------------------- good files


def test_valid_csv_gives_typed_frame(tmp_path):
    path = write(
        tmp_path,
        [HEADER, GOOD, "2023-01-03 17:45,  respiratory ,007,,,,E2", "2023-01-04,renal,P1,0,0,0,E3"],
    )
    df = load_records(path)
    assert list(df.columns) == ["admit_date", "drg_group", *OPTIONAL_COLUMNS]
    assert df["admit_date"].dtype == "datetime64[ns]"
    assert list(df["admit_date"]) == list(pd.to_datetime(["2023-01-02", "2023-01-03", "2023-01-04"]))
    assert list(df["drg_group"]) == ["cardiac", "respiratory", "renal"]
    for column in ("length_of_stay", "cost", "age"):
        assert df[column].dtype == np.float64
    assert np.isnan(df.loc[1, "length_of_stay"])
    assert df.loc[1, "patient_id"] == "007"  # ids are text: leading zeros survive
    assert list(df.index) == [0, 1, 2]


def test_only_required_columns_and_extras_dropped(tmp_path):
    path = write(tmp_path, ["drg_group,admit_date,ward", "cardiac,2023-01-02,W1"])
    df = load_records(path)
    assert list(df.columns) == ["admit_date", "drg_group"]


def test_bom_and_gzip(tmp_path):
    path = tmp_path / "records.csv.gz"
    with gzip.open(path, "wt", encoding="utf-8-sig") as fh:
        fh.write(HEADER + "\n" + GOOD + "\n")
    assert len(load_records(path)) == 1


# --------------------------------------------------------------------------- broken CSV files


def test_missing_required_column(tmp_path):
    path = write(tmp_path, ["admit_date,length_of_stay", "2023-01-02,3"])
    p = only(problems_of(path))
    assert (p.file, p.row, p.column) == ("records.csv", None, "drg_group")
    assert str(p) == "records.csv: column drg_group: missing required column"


def test_bad_date_points_at_the_line(tmp_path):
    # Blank lines shift rows away from "index + 2": line 5 holds the bad date.
    lines = [HEADER, GOOD, "", "2023-01-03,cardiac,P2,1,1,1,E2", "2023-02-30,cardiac,P3,1,1,1,E3"]
    p = only(problems_of(write(tmp_path, lines)))
    assert (p.row, p.column) == (5, "admit_date")
    assert str(p).startswith("records.csv: row 5, column admit_date: unparsable date '2023-02-30'")
    assert_one_line(p)


def test_ambiguous_date_format_rejected(tmp_path):
    p = only(problems_of(write(tmp_path, [HEADER, "03/04/2023,cardiac,P1,1,1,1,E1"])))
    assert (p.row, p.column) == (2, "admit_date")


def test_negative_los(tmp_path):
    lines = [HEADER, GOOD, "2023-01-03,cardiac,P2,-3,1,1,E2"]
    p = only(problems_of(write(tmp_path, lines)))
    assert str(p) == "records.csv: row 3, column length_of_stay: negative value (-3)"


@pytest.mark.parametrize("missing", ["", "   ", "NA"])
def test_missing_value_in_required_column(tmp_path, missing):
    lines = [HEADER, GOOD, GOOD.replace("E1", "E2"), f"2023-01-03,{missing},P2,1,1,1,E3"]
    p = only(problems_of(write(tmp_path, lines)))
    assert (p.row, p.column, p.message) == (4, "drg_group", "missing value")


def test_empty_file(tmp_path):
    path = tmp_path / "records.csv"
    path.write_bytes(b"")
    p = only(problems_of(path))
    assert (p.file, p.row) == ("records.csv", None)
    assert "empty file" in str(p)


def test_column_names_equal_once_stripped_are_one_line_error(tmp_path):
    """`drg_group` and ` drg_group` are one column after stripping: refused, not a crash."""
    p = only(problems_of(write(tmp_path, ["admit_date,drg_group, drg_group", "2024-01-01,cardiac,cardiac"])))
    assert (p.file, p.row) == ("records.csv", 1) and "duplicate column name(s) 'drg_group'" in p.message
    assert_one_line(p)


def test_header_only_file(tmp_path):
    p = only(problems_of(write(tmp_path, [HEADER])))
    assert p.row is None and "empty file" in p.message


def test_non_numeric_cost(tmp_path):
    lines = [HEADER, GOOD, "2023-01-03,cardiac,P2,1,12O0,1,E2"]
    p = only(problems_of(write(tmp_path, lines)))
    assert str(p) == "records.csv: row 3, column cost: non-numeric value '12O0'"


def test_age_out_of_range(tmp_path):
    lines = [HEADER, "2023-01-03,cardiac,P2,1,1,121,E2", "2023-01-03,cardiac,P2,1,1,120,E3"]
    p = only(problems_of(write(tmp_path, lines)))
    assert (p.row, p.column) == (2, "age")


def test_duplicate_encounter_id_names_second_row(tmp_path):
    lines = [HEADER, GOOD, "2023-01-03,cardiac,P2,1,1,1,E2", "2023-01-04,renal,P3,1,1,1,E1"]
    p = only(problems_of(write(tmp_path, lines)))
    assert (p.row, p.column) == (4, "encounter_id")
    assert "first at row 2" in p.message


def test_every_problem_reported_in_row_order(tmp_path):
    lines = [
        HEADER,
        "2023-01-02,cardiac,P1,-1,abc,1,E1",
        "bad,,P1,1,1,1,E2",
    ]
    found = [(p.row, p.column) for p in problems_of(write(tmp_path, lines))]
    assert found == [(2, "length_of_stay"), (2, "cost"), (3, "admit_date"), (3, "drg_group")]


def test_too_many_fields(tmp_path):
    lines = [HEADER, GOOD, "2023-01-03,cardiac,P2,1,1,1,E2,extra"]
    p = only(problems_of(write(tmp_path, lines)))
    assert p.row == 3 and "fields" in p.message


def test_multiline_quoted_field_keeps_line_numbers(tmp_path):
    # Record 2 spans lines 2-3, so the negative LOS sits on line 4.
    lines = [HEADER, '2023-01-02,cardiac,"P\n1",1,1,1,E1', "2023-01-03,cardiac,P2,-2,1,1,E2"]
    p = only(problems_of(write(tmp_path, lines)))
    assert (p.row, p.column) == (4, "length_of_stay")


def test_huge_cell_and_long_name_stay_one_short_line(tmp_path):
    name = "x" * 150 + ".csv"
    lines = [HEADER, "2023-01-03,cardiac,P2,1," + "y" * 5000 + ",1,E2"]
    p = only(problems_of(write(tmp_path, lines, name=name)))
    assert_one_line(p)
    assert "y" * 50 not in str(p)


def test_error_listing_is_capped(tmp_path):
    lines = [HEADER] + [f"2023-01-02,cardiac,P{i},-1,1,1,E{i}" for i in range(30)]
    with pytest.raises(RecordsError) as info:
        load_records(write(tmp_path, lines))
    assert len(info.value.problems) == 30
    text = str(info.value).splitlines()
    assert len(text) == 21 and text[-1] == "... and 10 more"
    assert isinstance(info.value, ValueError)


def test_unknown_extension_and_missing_file(tmp_path):
    path = tmp_path / "records.xlsx"
    path.write_text("x")
    assert "unknown file type" in str(only(problems_of(path)))
    assert "not found" in str(only(problems_of(tmp_path / "nope.csv")))


def test_unreadable_gzip(tmp_path):
    path = tmp_path / "records.csv.gz"
    path.write_bytes(b"not gzip at all")
    p = only(problems_of(path))
    assert p.row is None and "unreadable" in p.message


# --------------------------------------------------------------------------- parquet


def parquet(tmp_path: Path, df: pd.DataFrame, name: str = "records.parquet") -> Path:
    path = tmp_path / name
    df.to_parquet(path, index=False)
    return path


def frame(n: int = 5) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "admit_date": pd.date_range("2023-01-02", periods=n, freq="D"),
            "drg_group": ["cardiac"] * n,
            "length_of_stay": np.arange(n, dtype=float),
            "encounter_id": [f"E{i}" for i in range(n)],
        }
    )


def test_parquet_rows_are_one_based(tmp_path):
    df = frame()
    df.loc[2, "length_of_stay"] = -4.0  # third row
    df.loc[4, "drg_group"] = None
    found = [str(p) for p in problems_of(parquet(tmp_path, df))]
    assert found == [
        "records.parquet: row 3, column length_of_stay: negative value (-4)",
        "records.parquet: row 5, column drg_group: missing value",
    ]


def test_parquet_valid_and_string_dates(tmp_path):
    df = frame()
    df["admit_date"] = df["admit_date"].dt.strftime("%Y-%m-%d")
    typed = load_records(parquet(tmp_path, df, "records.pq"))
    assert typed["admit_date"].dtype == "datetime64[ns]"
    assert len(typed) == 5


def test_parquet_missing_column_and_empty(tmp_path):
    p = only(problems_of(parquet(tmp_path, frame().drop(columns="admit_date"))))
    assert (p.row, p.column) == (None, "admit_date")
    p = only(problems_of(parquet(tmp_path, frame().iloc[:0], "empty.parquet")))
    assert p.file == "empty.parquet" and "empty" in p.message


def test_validate_plain_frame_uses_positions():
    df = frame(3)
    df.index = [10, 20, 30]
    df.loc[30, "length_of_stay"] = -1.0
    p = only(validate_records(df, "mem"))
    assert p.row == 3


def test_read_records_index_is_row_number(tmp_path):
    df = read_records(write(tmp_path, [HEADER, "", GOOD]))
    assert list(df.index) == [3]
    assert set(REQUIRED_COLUMNS) <= set(df.columns)


# --------------------------------------------------------------------------- property


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=30),
    data=st.data(),
)
def test_reported_line_is_the_bad_line(n, data):
    bad = data.draw(st.integers(min_value=0, max_value=n - 1))
    blanks = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
    lines = [HEADER]
    expected = None
    for i in range(n):
        if blanks[i]:
            lines.append("")
        los = "-5" if i == bad else "2"
        lines.append(f"2023-01-02,cardiac,P{i},{los},1,1,E{i}")
        if i == bad:
            expected = len(lines)  # 1-based line number of the line just appended
    with tempfile.TemporaryDirectory() as tmp:
        p = only(problems_of(write(Path(tmp), lines)))
    assert (p.row, p.column) == (expected, "length_of_stay")
    assert lines[p.row - 1].split(",")[3] == "-5"


# --------------------------------------------------------------------------- catalogue


def test_catalogue_warnings_one_per_group_at_its_first_row(tmp_path):
    from core.records import catalogue_warnings

    path = write(tmp_path, ["admit_date,drg_group", "2023-01-02, cardiac ", "2023-01-03,Renal",
                            "2023-01-04,", "2023-01-05,zz", "2023-01-06,Renal"])
    warnings = catalogue_warnings(read_records(path), path.name)
    assert [(w.row, w.column, w.level) for w in warnings] == [(3, "drg_group", "warning"), (5, "drg_group", "warning")]
    assert str(warnings[0]) == (
        "warning: records.csv: row 3, column drg_group: 'Renal' is not in the DRG catalogue: the node drops its "
        "2 records from its demand series (no training, no D_i); did you mean 'renal'?")
    assert str(warnings[1]) == (
        "warning: records.csv: row 5, column drg_group: 'zz' is not in the DRG catalogue: the node drops its "
        "1 record from its demand series (no training, no D_i)")
    for w in warnings:
        assert_one_line(w)
    # errors stay unprefixed; an all-catalogue or group-less file has no warnings
    assert not str(Problem("f.csv", 2, "age", "x")).startswith("warning")
    assert catalogue_warnings(read_records(write(tmp_path, ["admit_date,drg_group", "2023-01-02,renal"])), "f") == []
    assert catalogue_warnings(pd.DataFrame({"admit_date": ["2023-01-02"]}), "f") == []


def test_catalogue_warning_states_what_the_series_does(tmp_path):
    """The warning's claim is the node's behaviour: such records add nothing to the series."""
    from core.drg import DRG_GROUPS
    from core.records import catalogue_warnings
    from core.series import demand_series

    path = write(tmp_path, ["admit_date,drg_group", "2023-01-02,cardiac", "2023-01-03,Cardiac", "2023-01-04,plastic"])
    assert len(catalogue_warnings(read_records(path), path.name)) == 2
    series = demand_series(load_records(path), start="2023-01-02", end="2023-01-09", groups=DRG_GROUPS)
    assert series.to_numpy().sum() == 1 and series["cardiac"].iloc[0] == 1
