"""The fast paths of core.records (issue #13) give exactly what the general paths give.

Each fast path is checked against the general path it replaces, on the awkward inputs it must
either handle identically or hand back: the vectorised line numbering against the csv-module
pass, pandas' pyarrow engine against its C parser, conversion per distinct value against
conversion of every cell, and whole files loaded with every fast path switched off.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import core.records as R

HEADER = "admit_date,drg_group,patient_id,length_of_stay,cost,age,encounter_id"
# Cells both engines must agree on: NA spellings, whitespace, leading zeros, text that looks like
# a number or a date (must stay text), numbers pandas reads specially.
CELLS = ["", " ", "NA", "N/A", "nan", "NaN", "-nan", "NULL", "null", "None", "<NA>", "#N/A", "1.#IND", "007",
         "1.50", "1e2", "inf", "-inf", "+5", "0x10", "1_000", "true", "2023-01-02", "2023-01-02 00:00",
         "2023-01-02T10:00:00+02:00", "x y", " padded ", "é", "12O0"]


def _write(tmp: Path, data: bytes, name: str = "r.csv") -> Path:
    path = tmp / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return path


@pytest.mark.parametrize("text", [
    f"{HEADER}\n2023-01-02,cardiac,P1,3,1,1,E1\n",
    f"\n  \n{HEADER}\n\n2023-01-02,cardiac,P1,3,1,1,E1\n   \n2023-01-03,renal,P2,1,1,1,E2",
    f"{HEADER}\r\n2023-01-02,cardiac,P1,3,1,1,E1\r\n\r\n2023-01-03,renal,P2,1,1,1,E2\r\n",
    f"\ufeff{HEADER}\n2023-01-02,cardiac,P1,3,1,1,E1\n",
    f"{HEADER}\n2023-01-02,cardiac\n\u3000\n2023-01-03,renal,P2,1,1,1,E2\n",  # short row, unicode blank line
    "admit_date\n2023-01-02\n\n \n2023-01-03\n",  # one column: every line is a blank candidate
    f"{HEADER}\n",
])
def test_line_numbers_match_the_csv_module(tmp_path, text):
    path = _write(tmp_path, text.encode())
    data = R._read_bytes(path)
    lines, _ = R._simple_layout(data, path.name)
    assert lines == R._csv_layout(path, path.name)[1]


@pytest.mark.parametrize("text", [
    f'{HEADER}\n2023-01-02,cardiac,"P\n1",3,1,1,E1\n',  # a quoted record spans lines
    f"{HEADER}\r2023-01-02,cardiac,P1,3,1,1,E1\r",  # bare CR line ends
    f"{HEADER}\n2023-01-02,cardiac,P1,3,1,1,E1,extra\n",  # wider than the header: the csv pass words it
    f"{HEADER}\n2023-01-02,cardiac,P1,3,1,1,E1,,\n",  # empty extra cells: the csv pass accepts them
])
def test_files_the_fast_numbering_cannot_read_go_to_the_csv_module(tmp_path, text):
    path = _write(tmp_path, text.encode())
    assert R._simple_layout(R._read_bytes(path), path.name) is None


def test_plain_grid_needs_unique_names_and_full_rows(tmp_path):
    def grid(text: str) -> bool:
        return R._simple_layout(text.encode(), "f.csv")[1]

    assert grid("a,b\n1,2\n")
    assert not grid("a,b\n1,2\n\n3,4\n")  # blank line
    assert not grid("a,b\n1\n")  # short row
    assert not grid("a,a\n1,2\n")  # duplicate name (the C parser renames it)
    assert not grid("a,\n1,2\n")  # empty name
    assert not grid("a,b\n")  # no rows


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.sampled_from(CELLS), min_size=3, max_size=3), min_size=1, max_size=12),
       st.sampled_from(["\n", "\r\n"]))
def test_pyarrow_engine_reads_a_plain_grid_as_the_c_parser_does(rows, newline):
    data = newline.join(["a, b,c", *(",".join(r) for r in rows)]).encode() + newline.encode()
    assert R._simple_layout(data, "f.csv")[1]
    pd.testing.assert_frame_equal(R._parse_csv(data, grid=True), R._parse_csv(data, grid=False), check_exact=True)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(CELLS + ["3", "0", "-1", "64", "2023-01-03", " 2023-01-04 ", "2023-02-30"]),
                min_size=0, max_size=40))
def test_conversion_per_distinct_value_equals_conversion_per_cell(cells):
    col = pd.Series(cells, dtype="str", name="c")
    col[col.isin(["NA", "nan", "NULL"])] = np.nan  # missing cells as read_csv leaves them
    for convert in (R._text_to_float, R._parse_date_text):
        try:
            expected = convert(col)
        except (ValueError, TypeError) as exc:
            with pytest.raises(type(exc)):
                R._per_distinct(col, convert)
            continue
        pd.testing.assert_series_equal(R._per_distinct(col, convert), expected, check_exact=True)


def _slow(monkeypatch):
    """Every fast path off: csv-module numbering, C parser, per-cell conversion."""
    monkeypatch.setattr(R, "_simple_layout", lambda data, file: None)
    monkeypatch.setattr(R, "_per_distinct", lambda col, convert: convert(col))


def _outcome(path: Path):
    try:
        return R.load_records(path)
    except R.RecordsError as exc:
        return str(exc)


ROW = st.tuples(st.sampled_from(["2023-01-02", "2023-01-09 17:45", "2023-02-30", "", "2203-01-01", "03/04/2023"]),
                st.sampled_from(["cardiac", " renal ", "", "NA", "zz"]), st.sampled_from(["P1", "007", ""]),
                st.sampled_from(["3", "0", "-3", "", "abc", "inf"]), st.sampled_from(["1200.5", "", "-1", "1e2"]),
                st.sampled_from(["64", "121", "", "x"]), st.sampled_from(["E1", "E2", "E3", "E4", ""]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(ROW, st.just(None)), min_size=0, max_size=30), st.booleans())
def test_load_records_equals_the_general_path(rows, gz):
    lines = [HEADER] + ["" if r is None else ",".join(r) for r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), ("\n".join(lines) + "\n").encode(), "r.csv.gz" if gz else "r.csv")
        fast = _outcome(path)
        with pytest.MonkeyPatch.context() as mp:
            _slow(mp)
            slow = _outcome(path)
    if isinstance(slow, str):
        assert fast == slow
    else:
        pd.testing.assert_frame_equal(fast, slow, check_exact=True)


def test_a_generated_hospital_loads_as_on_the_general_path(tmp_path, monkeypatch):
    from core.synthetic import SyntheticConfig, generate_hospital_records, write_records

    path = tmp_path / "h.csv"
    write_records(generate_hospital_records(SyntheticConfig(hospitals=1, seed=3), 0), path)
    assert R._simple_layout(R._read_bytes(path), path.name)[1]  # the pyarrow engine reads it
    fast = R.load_records(path)
    _slow(monkeypatch)
    pd.testing.assert_frame_equal(fast, R.load_records(path), check_exact=True)
