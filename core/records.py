"""Encounter-record schema: reading, validation and the typed frame every node builds on.

A node's records never leave it, but its error messages end up in logs that people read, so every
problem names file, row and column and quotes at most the single offending cell (shortened).

Row numbers
-----------
* CSV (``.csv``, ``.csv.gz``): the physical line number in the file, header = line 1, so the
  first data row is line 2. Blank lines and quoted fields spanning lines are accounted for, so
  the number is the line an editor shows for the start of that record.
* Parquet (``.parquet``, ``.pq``): the 1-based row number.

:func:`read_records` returns the raw frame with these numbers as its index (named ``"row"``);
:func:`validate_records` reports that index. Frames built elsewhere (index not named ``"row"``)
are reported by 1-based position.

Pure pandas/numpy: imported by nodes, coordinators and researchers alike.
"""

from __future__ import annotations

import csv
import gzip
import io
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.drg import DRG_GROUPS

REQUIRED_COLUMNS: tuple[str, ...] = ("admit_date", "drg_group")
OPTIONAL_COLUMNS: tuple[str, ...] = ("patient_id", "length_of_stay", "cost", "age", "encounter_id")
NUMERIC_COLUMNS: tuple[str, ...] = ("length_of_stay", "cost", "age")
ID_COLUMNS: tuple[str, ...] = ("patient_id", "encounter_id")
AGE_RANGE: tuple[float, float] = (0.0, 120.0)
# Plausible admission dates. Anything outside is a typo (e.g. 2203 for 2023) and would also
# overflow datetime64[ns] near the edges.
DATE_RANGE: tuple[pd.Timestamp, pd.Timestamp] = (pd.Timestamp("1900-01-01"), pd.Timestamp("2200-01-01"))

ROW_INDEX_NAME = "row"
MAX_LINE = 200
MAX_CELL = 40
MAX_LISTED = 20

_CSV_SUFFIXES = (".csv", ".csv.gz")
_PARQUET_SUFFIXES = (".parquet", ".pq")


@dataclass(frozen=True)
class Problem:
    """One problem in one place of a records file. ``row``/``column`` are None for file-level ones.

    ``level`` is ``"error"`` (the node refuses the file) or ``"warning"`` (the node runs, but
    something in the file is not used as its author probably meant; printed with a
    ``warning:`` prefix).
    """

    file: str
    row: int | None
    column: str | None
    message: str
    level: str = "error"

    def __str__(self) -> str:
        where = [f"warning: {self.file}" if self.level == "warning" else self.file]
        loc = ", ".join(
            part
            for part in (
                f"row {self.row}" if self.row is not None else "",
                f"column {self.column}" if self.column is not None else "",
            )
            if part
        )
        if loc:
            where.append(loc)
        text = ": ".join([*where, self.message])
        # One line, bounded: newlines in a file name or message must not break log parsing.
        text = " ".join(text.split())
        return text if len(text) <= MAX_LINE else text[: MAX_LINE - 3] + "..."


class RecordsError(ValueError):
    """Raised when a records file cannot be used; ``problems`` lists every problem found."""

    def __init__(self, problems: Iterable[Problem]):
        self.problems: list[Problem] = list(problems)
        super().__init__(format_problems(self.problems))


def format_problems(problems: list[Problem], limit: int = MAX_LISTED) -> str:
    """The problems one per line, capped at ``limit`` lines plus an '... and N more' line."""
    lines = [str(p) for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"... and {len(problems) - limit} more")
    return "\n".join(lines)


def _cell(value: object) -> str:
    """The offending cell, quoted and shortened: messages never carry more than this one cell."""
    text = repr(str(value)) if isinstance(value, str) else str(value)
    text = " ".join(text.split())
    return text if len(text) <= MAX_CELL else text[: MAX_CELL - 3] + "..."


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(_CSV_SUFFIXES):
        return "csv"
    if name.endswith(_PARQUET_SUFFIXES):
        return "parquet"
    return None


# ---------------------------------------------------------------------------------------------
# Reading


def read_records(path: str | Path) -> pd.DataFrame:
    """Read a CSV (``.csv``, ``.csv.gz``) or Parquet (``.parquet``, ``.pq``) records file.

    Returns the raw frame (CSV cells as strings, Parquet columns as stored), indexed by source
    row number (see the module docstring: CSV line number with header = 1, Parquet 1-based row).
    Column names are stripped of surrounding whitespace.

    Raises :class:`RecordsError` for a missing or unreadable file, an unknown extension, an
    empty file (no header) or malformed CSV (e.g. a row with more fields than the header).
    A file with a header but no rows is returned empty; :func:`validate_records` reports it.
    """
    path = Path(path)
    file = path.name
    kind = _kind(path)
    if kind is None:
        raise RecordsError(
            [Problem(file, None, None, "unknown file type (expected .csv, .csv.gz, .parquet or .pq)")]
        )
    if not path.is_file():
        raise RecordsError([Problem(file, None, None, "file not found")])
    try:
        df = _read_csv(path, file) if kind == "csv" else _read_parquet(path, file)
    except RecordsError:
        raise
    except (OSError, ValueError, EOFError, csv.Error) as exc:
        # The exception text may quote file content; keep only its type.
        raise RecordsError([Problem(file, None, None, f"unreadable file ({type(exc).__name__})")]) from exc
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _read_parquet(path: Path, file: str) -> pd.DataFrame:
    try:
        df = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises its own exception types
        raise RecordsError([Problem(file, None, None, f"unreadable Parquet file ({type(exc).__name__})")]) from exc
    if len(df.columns) == 0:
        raise RecordsError([Problem(file, None, None, "empty file (no columns)")])
    # A meaningful stored index (e.g. admit_date saved as the index) is data, not row numbers.
    df = df.reset_index(drop=isinstance(df.index, pd.RangeIndex))
    df.index = pd.RangeIndex(1, len(df) + 1, name=ROW_INDEX_NAME)
    return df


def _open_text(path: Path) -> io.TextIOBase:
    # utf-8-sig: spreadsheet exports often start with a BOM that would corrupt the first column name.
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _is_blank(fields: list[str]) -> bool:
    # Mirrors pandas' skip_blank_lines: empty or whitespace-only lines produce no row.
    return len(fields) == 0 or (len(fields) == 1 and fields[0].strip() == "")


def _csv_layout(path: Path, file: str) -> tuple[int, list[int]]:
    """Header width and the starting line number of every non-blank data record.

    pandas does not expose line numbers, so one cheap pass with the csv module recovers them.
    Malformed rows (too many fields) are collected here because pandas would either fail on
    the first one or silently drop the extra cells.
    """
    lines: list[int] = []
    problems: list[Problem] = []
    width = 0
    with _open_text(path) as fh:
        reader = csv.reader(fh)
        prev_end = 0
        header_seen = False
        for fields in reader:
            start = prev_end + 1
            prev_end = reader.line_num
            if _is_blank(fields):
                continue
            if not header_seen:
                header_seen = True
                width = len(fields)
                continue
            if len(fields) > width and any(f.strip() for f in fields[width:]):
                # Extra *empty* cells (a trailing comma from some exporters) are harmless.
                problems.append(
                    Problem(file, start, None, f"{len(fields)} fields but the header has {width}")
                )
            lines.append(start)
    if not header_seen:
        raise RecordsError([Problem(file, None, None, "empty file (no header)")])
    if problems:
        raise RecordsError(problems)
    return width, lines


def _read_csv(path: Path, file: str) -> pd.DataFrame:
    _, lines = _csv_layout(path, file)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            # dtype=str: validation decides what is numeric, and ids keep leading zeros.
            df = pd.read_csv(path, dtype=str, index_col=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError as exc:
        raise RecordsError([Problem(file, None, None, "empty file (no header)")]) from exc
    except pd.errors.ParserError as exc:
        raise RecordsError([Problem(file, None, None, "malformed CSV")]) from exc
    if len(lines) == len(df):
        df.index = pd.Index(lines, name=ROW_INDEX_NAME)
    else:
        # The csv module and pandas disagreed on some exotic quoting; fall back to the
        # simple "header is line 1" numbering rather than report wrong-but-confident lines.
        df.index = pd.RangeIndex(2, len(df) + 2, name=ROW_INDEX_NAME)
    return df


# ---------------------------------------------------------------------------------------------
# Validation


def _row_numbers(df: pd.DataFrame) -> np.ndarray:
    if df.index.name == ROW_INDEX_NAME:
        return np.asarray(df.index, dtype=np.int64)
    return np.arange(1, len(df) + 1, dtype=np.int64)


def _missing(col: pd.Series) -> np.ndarray:
    mask = col.isna().to_numpy(dtype=bool)
    if col.dtype == object or pd.api.types.is_string_dtype(col.dtype):
        stripped = col.astype("str").str.strip()
        mask = mask | (stripped == "").to_numpy(dtype=bool, na_value=True)
    return mask


def parse_dates(col: pd.Series) -> pd.Series:
    """Parse ISO 8601 dates (YYYY-MM-DD, optionally with a time) to naive datetime64[ns].

    Non-ISO formats are rejected on purpose: 03/04/2023 is ambiguous and a silent day/month
    swap would corrupt the series. Time zones are dropped (the local wall-clock date counts).
    Unparsable values and dates outside :data:`DATE_RANGE` become NaT.
    """
    parsed = _parse_dates_unbounded(col)
    return parsed.where(_in_date_range(parsed)).astype("datetime64[ns]")


def _in_date_range(parsed: pd.Series) -> pd.Series:
    return (parsed >= DATE_RANGE[0]) & (parsed < DATE_RANGE[1])


def _parse_dates_unbounded(col: pd.Series) -> pd.Series:
    if isinstance(col.dtype, pd.DatetimeTZDtype):
        return col.dt.tz_localize(None)
    if pd.api.types.is_datetime64_any_dtype(col.dtype):
        return col
    if not (col.dtype == object or pd.api.types.is_string_dtype(col.dtype)):
        # Numbers are not dates (an Excel serial or epoch would be a guess).
        return pd.Series(pd.NaT, index=col.index, dtype="datetime64[ns]")
    text = col.astype("str").str.strip()
    try:
        parsed = pd.to_datetime(text, format="ISO8601", errors="coerce")
        if isinstance(parsed.dtype, pd.DatetimeTZDtype):
            parsed = parsed.dt.tz_localize(None)
    except (ValueError, TypeError, OverflowError):
        # Mixed time-zone offsets: parse each value on its own.
        parsed = pd.to_datetime(text.map(_parse_one_date))
    return parsed


def _parse_one_date(value: object) -> pd.Timestamp:
    try:
        ts = pd.Timestamp(pd.to_datetime(value, format="ISO8601"))
    except (ValueError, TypeError, OverflowError):
        return pd.NaT
    return ts.tz_localize(None) if ts.tzinfo is not None else ts


def _numeric(col: pd.Series) -> pd.Series:
    if pd.api.types.is_bool_dtype(col.dtype):
        return pd.Series(np.nan, index=col.index)  # True/False is not a count of days
    if pd.api.types.is_numeric_dtype(col.dtype):
        return col.astype("float64")
    return pd.to_numeric(col.astype("str").str.strip(), errors="coerce").astype("float64")


def validate_records(df: pd.DataFrame, file: str) -> list[Problem]:
    """Every problem in ``df`` (as returned by :func:`read_records`), sorted by row.

    Checks: required columns present; at least one row; ``admit_date`` an ISO date between
    1900 and 2200; no empty ``admit_date``/``drg_group``; ``length_of_stay``, ``cost``, ``age``
    numeric and finite when present (empty is allowed), LOS and cost ≥ 0, age in 0–120;
    ``encounter_id`` unique (the later row is reported, with the row it repeats).
    Extra columns are ignored.
    """
    problems: list[Problem] = []
    for column in REQUIRED_COLUMNS:
        if column not in df.columns:
            problems.append(Problem(file, None, column, "missing required column"))
    if len(df) == 0:
        problems.append(Problem(file, None, None, "empty file (no data rows)"))
        return problems

    cells = _Cells(_row_numbers(df))
    _check_required(df, cells)
    _check_numeric(df, cells)
    _check_encounter_ids(df, cells)
    problems.extend(Problem(file, row, column, message) for row, column, message in cells.sorted())
    return problems


class _Cells:
    """Cell problems as (row, column, message), listed top-down and left to right at the end."""

    order = {c: i for i, c in enumerate((*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS))}

    def __init__(self, rows: np.ndarray) -> None:
        self.rows = rows
        self.items: list[tuple[int, int, str, str]] = []

    def add(self, mask: np.ndarray, column: str, message_for: Callable[[int], str]) -> None:
        for pos in np.flatnonzero(mask):
            self.items.append((int(self.rows[pos]), self.order[column], column, message_for(pos)))

    def sorted(self) -> list[tuple[int, str, str]]:
        return [(row, column, message) for row, _, column, message in sorted(self.items, key=lambda c: (c[0], c[1]))]


def _check_required(df: pd.DataFrame, cells: _Cells) -> None:
    for column in REQUIRED_COLUMNS:
        if column not in df.columns:
            continue
        col = df[column]
        missing = _missing(col)
        cells.add(missing, column, lambda pos: "missing value")
        if column == "admit_date":
            parsed = _parse_dates_unbounded(col)
            values = col.to_numpy()
            unparsable = parsed.isna().to_numpy() & ~missing
            cells.add(unparsable, column, lambda pos: f"unparsable date {_cell(values[pos])} (expected YYYY-MM-DD)")
            out_of_range = parsed.notna().to_numpy() & ~_in_date_range(parsed).to_numpy()
            lo, hi = (d.year for d in DATE_RANGE)
            cells.add(out_of_range, column, lambda pos: f"date outside {lo}-{hi} ({_cell(values[pos])})")


def _check_numeric(df: pd.DataFrame, cells: _Cells) -> None:
    for column in NUMERIC_COLUMNS:
        if column not in df.columns:
            continue
        col = df[column]
        values = col.to_numpy()
        missing = _missing(col)
        num = _numeric(col).to_numpy()
        non_numeric = np.isnan(num) & ~missing
        cells.add(non_numeric, column, lambda pos: f"non-numeric value {_cell(values[pos])}")
        finite = np.isfinite(num)
        cells.add(~finite & ~np.isnan(num), column, lambda pos: f"non-finite value {_cell(values[pos])}")
        with np.errstate(invalid="ignore"):
            if column == "age":
                lo, hi = AGE_RANGE
                out = finite & ((num < lo) | (num > hi))
                cells.add(out, column, lambda pos: f"age outside {lo:g}-{hi:g} ({num[pos]:g})")
            else:
                cells.add(finite & (num < 0), column, lambda pos: f"negative value ({num[pos]:g})")


def _check_encounter_ids(df: pd.DataFrame, cells: _Cells) -> None:
    if "encounter_id" not in df.columns:
        return
    col = df["encounter_id"]
    present = ~_missing(col)
    ids = col.astype("str").str.strip()
    dup = ids.duplicated(keep="first").to_numpy() & present
    if dup.any():
        first_pos = pd.Series(np.arange(len(ids)))[present].groupby(ids.to_numpy()[present]).first()
        id_values = ids.to_numpy()
        rows = cells.rows
        cells.add(dup, "encounter_id",
                  lambda pos: f"duplicate value {_cell(id_values[pos])} (first at row {rows[first_pos[id_values[pos]]]})")


# What a node does with a record whose group is outside the catalogue: core.series.demand_series
# (called with the run's catalogue groups by client.node) keeps only catalogue groups, and the
# node counts the dropped records in its own log (client/node.py note_outside_catalogue).
OUT_OF_CATALOGUE_FATE = "the node drops its {n} from its demand series (no training, no D_i)"


def _group_key(name: str) -> str:
    return "_".join(name.lower().replace("-", " ").split())


def catalogue_warnings(df: pd.DataFrame, file: str, groups: Iterable[str] = DRG_GROUPS,
                       name: str = "DRG catalogue") -> list[Problem]:
    """One warning per ``drg_group`` value outside ``groups``, at the row of its first record and
    with the number of records that carry it.

    Not errors: the node accepts the file, but these records never reach its demand series
    (see :data:`OUT_OF_CATALOGUE_FATE`), which is usually a typo worth fixing. Missing values
    are left to :func:`validate_records`.
    """
    if "drg_group" not in df.columns or len(df) == 0:
        return []
    col = df["drg_group"]
    present = ~_missing(col)
    values = col.astype("str").str.strip().to_numpy()
    known = list(groups)
    outside = present & ~np.isin(values, known)
    if not outside.any():
        return []
    rows = _row_numbers(df)
    by_key = {_group_key(g): g for g in known}
    names, first, counts = np.unique(values[outside], return_index=True, return_counts=True)
    out = []
    for value, pos, n in sorted(zip(names, first, counts), key=lambda t: t[1]):
        guess = by_key.get(_group_key(str(value)))
        hint = f"; did you mean {guess!r}?" if guess else ""  # last: a long line loses the hint first
        out.append(Problem(
            file, int(rows[np.flatnonzero(outside)[pos]]), "drg_group",
            f"{_cell(value)} is not in the {name}: "
            + OUT_OF_CATALOGUE_FATE.format(n=f"{n} record{'s' if n != 1 else ''}") + hint,
            level="warning",
        ))
    return out


# ---------------------------------------------------------------------------------------------
# Loading


def load_records(path: str | Path) -> pd.DataFrame:
    """Read, validate and type a records file; raise :class:`RecordsError` listing every problem.

    The result has a fresh RangeIndex and only the known columns, in schema order:
    ``admit_date`` datetime64[ns] normalised to midnight, ``drg_group`` str (whitespace
    stripped), ``length_of_stay``/``cost``/``age`` float64 (NaN where empty), and
    ``patient_id``/``encounter_id`` str (NaN where empty) when present. Extra columns are dropped
    so nothing beyond the schema travels further into the pipeline.
    """
    path = Path(path)
    raw = read_records(path)
    problems = validate_records(raw, path.name)
    if problems:
        raise RecordsError(problems)
    return to_typed(raw)


def to_typed(raw: pd.DataFrame) -> pd.DataFrame:
    """The typed frame for an already validated raw frame (see :func:`load_records`)."""
    out: dict[str, pd.Series] = {
        "admit_date": parse_dates(raw["admit_date"]).dt.normalize().astype("datetime64[ns]"),
        "drg_group": raw["drg_group"].astype("str").str.strip(),
    }
    for column in OPTIONAL_COLUMNS:
        if column not in raw.columns:
            continue
        col = raw[column]
        if column in NUMERIC_COLUMNS:
            out[column] = _numeric(col)
        else:
            text = col.astype("str").str.strip()
            out[column] = text.where(~_missing(col))
    typed = pd.DataFrame(out)
    typed.index = pd.RangeIndex(len(typed))
    return typed
