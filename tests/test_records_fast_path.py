"""The fast paths of core.records (issue #13) give exactly what the general paths give.

Each fast path is checked against the general path it replaces, on the awkward inputs it must
either handle identically or hand back: the vectorised line numbering against the csv-module
pass, pandas' pyarrow engine against its C parser, conversion per distinct value against
conversion of every cell, the typed pyarrow path against text validation and typing, and whole
files loaded with every fast path switched off.
"""

from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
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
    """Every fast path off: csv-module numbering, C parser, per-cell conversion, no typed parse."""
    monkeypatch.setattr(R, "_simple_layout", lambda data, file: None)
    monkeypatch.setattr(R, "_per_distinct", lambda col, convert: convert(col))
    monkeypatch.setattr(R, "_typed_csv", lambda data: None)


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
    assert R._typed_csv(R._read_bytes(path)) is not None  # and the typed path takes it
    fast = R.load_records(path)
    _slow(monkeypatch)
    pd.testing.assert_frame_equal(fast, R.load_records(path), check_exact=True)


# ---------------------------------------------------------------------------------------------
# The typed path (R._typed_csv): pyarrow's parse typed directly when the file is clean.

NA_TOKENS = sorted(R.STR_NA_VALUES)
# Forms the typed path must accept *and* read as the general path does: NA spellings (missing),
# leading zeros, bare points, 15-character numbers, leap days and the DATE_RANGE edges, inner
# spaces and non-ASCII inside text.
CLEAN = {
    "admit_date": ["2023-01-02", "1900-01-01", "2199-12-31", "2024-02-29", "2023-12-31", "2000-02-29"],
    "drg_group": ["cardiac", "renal", "zz", "a b", "x_é_y", "007", "1e3", "NAN", "nA"],
    "patient_id": ["P1", "007", "x y", "-1", "P\u30002", *NA_TOKENS],
    "length_of_stay": ["3", "0", "007", "1.50", "5.", ".5", "00.000", "999999999999999", "0.1", *NA_TOKENS],
    "cost": ["1200.5", "0", "8893.17", "123456789.12345", "0.3000000000001", *NA_TOKENS],
    "age": ["0", "120", "64", "120.0", "119.99", "0.0", "000120", *NA_TOKENS],
}
# Forms a typed parser reads differently from the general path, or that are problems: padding
# (ASCII and Unicode), signs, exponents, hex, underscores, -0, fractional and huge numbers, NA
# spellings with spaces, dates with times, odd date shapes, impossible and out-of-range dates,
# and NA spellings (missing: a problem in a required column).
TRICKY = [" 12", "12 ", "\t5", "5\u3000", "\u00a05", " ", "  NA", "NA ", "+5", "-0", "-0.0", "-3", "1e3", "1E-2",
          "inf", "-inf", "Infinity", "nan ", "+nan", "0x10", "1_000", "1.2.3", ".", "5..", "1234567890123456",
          "99999999999999999999", "12O0", "\u0663", "120.5", "121", "2023-01-05T00:00", "2023-01-09 17:45",
          " 2023-01-02", "2023-01-02 ", "2023-1-2", "2023-02-30", "2023-13-01", "2023-00-10", "2203-01-01",
          "1899-12-31", "2200-01-01", "0147-01-01", "03/04/2023", "20230102", "2023-01-02Z", "2023/01/02",
          "é", "x", " x", "x ", "\u00a0x", "x\u2003", "E1", "", "NA", "None", "<NA>", "nan"]
# Whitespace to Python's str.strip, pyarrow's trim or both (ASCII, control, Unicode spaces).
PADDING = [" ", "\t", "\x0b", "\x0c", "\x1f", "\x85", "\u00a0", "\u2003", "\u3000", "\u200b"]
# Extra columns: anything, none of it read.
EXTRA = ["", "NA", " x ", "1e3", "é", "-1"]


def _general(path: Path):
    """load_records with every fast path off: the frame, or the error's problem list."""
    with pytest.MonkeyPatch.context() as mp:
        _slow(mp)
        return _loaded(path)


def _loaded(path: Path):
    try:
        return R.load_records(path)
    except R.RecordsError as exc:
        return exc.problems


def _assert_same(fast, slow):
    if isinstance(slow, list):
        assert fast == slow
    else:
        assert not isinstance(fast, list), fast
        pd.testing.assert_frame_equal(fast, slow, check_exact=True)


@st.composite
def typed_files(draw):
    """(file bytes, kind): a CSV around the schema. "clean" files hold only CLEAN forms and unique
    ids, so the typed path must take them; the others are clean but for one or two TRICKY cells
    ("cells"), one id repeated ("repeat") or one record-level oddity ("record")."""
    kind = draw(st.sampled_from(["clean", "cells", "repeat", "record"]))
    optional = draw(st.lists(st.sampled_from(R.OPTIONAL_COLUMNS), unique=True))
    if kind == "repeat" and "encounter_id" not in optional:
        optional.append("encounter_id")
    extras = draw(st.lists(st.sampled_from(["note", "ward", "x1"]), unique=True))
    names = draw(st.permutations(["admit_date", "drg_group", *optional, *extras]))
    n = draw(st.integers(2 if kind == "repeat" else 1, 10))
    ids = draw(st.sampled_from([lambda i: f"E{i}", lambda i: f"{i:03d}"]))
    pools = {**CLEAN, "encounter_id": ["", "NA", "id"]}
    grid = [[draw(st.sampled_from(pools.get(c, EXTRA))) for c in names] for _ in range(n)]
    for i, row in enumerate(grid):  # unique ids, some missing
        row[:] = [ids(i) if c == "encounter_id" and v == "id" else v for c, v in zip(names, row)]
    if kind == "cells":  # a TRICKY form, or the cell there padded with some kind of whitespace
        for _ in range(draw(st.integers(1, 2))):
            i, j = draw(st.integers(0, n - 1)), draw(st.integers(0, len(names) - 1))
            pad = draw(st.sampled_from(PADDING))
            padded = st.sampled_from([pad + grid[i][j], grid[i][j] + pad])
            grid[i][j] = draw(st.one_of(st.sampled_from(TRICKY), padded))
    if kind == "repeat":
        first = draw(st.integers(0, n - 2))
        j = names.index("encounter_id")
        grid[first][j] = grid[draw(st.integers(first + 1, n - 1))][j] = draw(st.sampled_from([ids(first), "007"]))
    rows = [",".join(r) for r in grid]
    if kind == "record":  # a short or wide row, a quote, a blank-looking line, an odd header
        odd = draw(st.sampled_from(["short", "wide", "quote", "spaces", "bare_cr", "name_space", "lead_blank"]))
        rows, names = _oddity(odd, rows, names)
    blank = draw(st.lists(st.integers(0, n), max_size=3))  # empty lines: both readers skip them
    for pos in sorted(blank, reverse=True):
        rows.insert(pos, "")
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join([",".join(names), *rows]) + draw(st.sampled_from(["", newline, newline * 2]))
    bom = draw(st.sampled_from(["", "\ufeff"]))
    return (bom + text).encode(), kind


def _oddity(odd: str, rows: list[str], names: list[str]) -> tuple[list[str], list[str]]:
    if odd == "short":
        rows[0] = rows[0].rsplit(",", 1)[0]
    elif odd == "wide":
        rows[-1] += ",x"
    elif odd == "quote":
        cells = rows[0].split(",")
        rows[0] = ",".join([f'"{cells[0]}"', *cells[1:]])
    elif odd == "spaces":
        rows.append("   ")
    elif odd == "bare_cr":
        rows[0] += "\r"
    elif odd == "name_space":
        names = [" " + names[0], *names[1:]]
    elif odd == "lead_blank":
        names = ["\n" + names[0], *names[1:]]
    return rows, names


@settings(max_examples=300, deadline=None)
@given(typed_files(), st.booleans())
def test_typed_path_equals_the_general_path(case, gz):
    data, kind = case
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), data, "r.csv.gz" if gz else "r.csv")
        if kind == "clean":
            assert R._typed_csv(R._read_bytes(path)) is not None  # the fast path is the one compared
        _assert_same(_loaded(path), _general(path))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet="0123456789.+-eE xn", min_size=0, max_size=18) | st.sampled_from(NA_TOKENS),
                min_size=1, max_size=6))
def test_typed_numbers_are_the_general_paths_or_refused(cells):
    """A number column the typed path accepts converts as the general path's text conversion
    does, with no problem the general path would report (the age range is checked apart)."""
    arr = pa.array([None if c in R.STR_NA_VALUES else c for c in cells], type=pa.string())
    try:
        fast = R._decimals(arr, *R._utf8(arr))
    except pa.ArrowInvalid:
        fast = None
    if fast is None:
        return
    col = pd.Series(cells, dtype="str")
    missing = col.isin(NA_TOKENS).to_numpy() | (col.str.strip() == "").to_numpy()
    general = R._text_to_float(col.where(~col.isin(NA_TOKENS))).to_numpy()
    assert not (np.isnan(general) & ~missing).any()  # no non-numeric cell accepted
    assert (general[~missing] >= 0).all() and np.isfinite(general[~missing]).all()
    np.testing.assert_array_equal(fast, np.where(missing, np.nan, general))
    assert not np.signbit(fast[~missing]).any()  # no -0.0 where pandas may read the int 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 9999), st.integers(0, 99), st.integers(0, 99)), min_size=1, max_size=5))
def test_typed_dates_are_the_general_paths_or_refused(ymd):
    cells = [f"{y:04d}-{m:02d}-{d:02d}" for y, m, d in ymd]
    fast = R._iso_dates(pa.array(cells, type=pa.string()))
    general = R.parse_dates(pd.Series(cells, dtype="str"))
    if general.isna().any():
        assert fast is None
    else:
        np.testing.assert_array_equal(fast, general.dt.normalize().to_numpy())


def test_typed_path_takes_clean_files_with_every_accepted_form(tmp_path):
    """Each CLEAN form, in one file with blank lines, CRLF, a BOM, reordered and extra columns."""
    rows = []
    for i in range(max(len(v) for v in CLEAN.values())):
        row = {c: v[i % len(v)] for c, v in CLEAN.items()}
        rows.append(",".join([f"E{i:04d}", row["age"], "extra", *(row[c] for c in CLEAN if c != "age")]))
    header = ",".join(["encounter_id", "age", "ward", *(c for c in CLEAN if c != "age")])
    path = _write(tmp_path, ("\ufeff" + "\r\n".join([header, rows[0], "", *rows[1:]]) + "\r\n\r\n").encode())
    assert R._typed_csv(R._read_bytes(path)) is not None
    _assert_same(_loaded(path), _general(path))


@pytest.mark.parametrize("cell", TRICKY)
def test_each_tricky_form_in_each_column_gives_the_general_paths_outcome(tmp_path, cell):
    base = {"admit_date": "2023-01-02", "drg_group": "cardiac", "patient_id": "P1", "length_of_stay": "3",
            "cost": "1.5", "age": "64", "encounter_id": "E9"}
    for column in base:
        rows = [{**base, "encounter_id": "E1"}, {**base, "encounter_id": "E2", column: cell}, {**base, "encounter_id": "E3"}]
        path = _write(tmp_path, "\n".join([",".join(base), *(",".join(r.values()) for r in rows)]).encode())
        _assert_same(_loaded(path), _general(path))
