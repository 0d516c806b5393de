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

pandas/numpy (and pyarrow, which pandas' str dtype uses, for the fast path when installed):
imported by nodes, coordinators and researchers alike.
"""

from __future__ import annotations

import codecs
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

# The typed fast path needs pyarrow, and read_csv's default NA spellings (STR_NA_VALUES): it
# must read exactly those cells as missing to give the general path's frame.
try:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pa_csv
    from pandas._libs.parsers import STR_NA_VALUES
except ImportError:  # only the typed fast path needs these; load_records then takes the general path
    pa = None

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
    return _read_records(Path(path), None)


def _read_records(path: Path, data: bytes | None) -> pd.DataFrame:
    """:func:`read_records`, for a CSV from ``data`` (its :func:`_read_bytes`) when already read."""
    file = path.name
    kind = _kind(path)
    if kind is None:
        raise RecordsError(
            [Problem(file, None, None, "unknown file type (expected .csv, .csv.gz, .parquet or .pq)")]
        )
    if not path.is_file():
        raise RecordsError([Problem(file, None, None, "file not found")])
    try:
        df = _read_csv(path, file, data) if kind == "csv" else _read_parquet(path, file)
    except RecordsError:
        raise
    except (OSError, ValueError, EOFError, csv.Error) as exc:
        # The exception text may quote file content; keep only its type.
        raise RecordsError([Problem(file, None, None, f"unreadable file ({type(exc).__name__})")]) from exc
    names = [str(c).strip() for c in df.columns]
    seen = {n for n in names if names.count(n) > 1}
    if seen:
        # Two columns of one name would make every later check ambiguous (which one is the date?).
        raise RecordsError([Problem(file, 1, None, f"duplicate column name(s) {', '.join(sorted(map(repr, seen)))} "
                                                   "in the header")])
    df.columns = names
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


def _read_bytes(path: Path) -> bytes:
    """The file's bytes (decompressed), checked to be UTF-8 as the csv pass would check them."""
    with (gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")) as fh:
        data = fh.read()
    data.decode("utf-8-sig")  # the UnicodeDecodeError the text-mode csv pass would raise
    return data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data


def _simple_layout(data: bytes, file: str) -> tuple[list[int], bool] | None:
    """What :func:`_csv_layout` returns for ``data`` without a Python loop over its records, or
    None when the file needs the csv module: quotes (records spanning lines), NUL or bare CR
    bytes, or a record wider than the header (its problem message comes from the csv pass).

    Without quotes a record is one physical line and its fields are its commas + 1, so line
    numbers and widths follow from the positions of newlines and commas. Only lines without a
    comma can be blank (csv: no fields, or one whitespace-only field); those few are decoded.
    The flag says the file is a plain grid (see :func:`_parse_csv`).
    """
    if b'"' in data or b"\0" in data or (b"\r" in data and data.count(b"\r") != data.count(b"\r\n")):
        return None
    buf = np.frombuffer(data, dtype=np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if len(data) and data[-1:] != b"\n":
        ends = np.append(ends, len(data))  # a last line without a newline
    starts = np.concatenate(([0], ends + 1))[: len(ends)].astype(np.int64)
    commas = np.flatnonzero(buf == ord(","))
    n_commas = np.searchsorted(commas, ends) - np.searchsorted(commas, starts)
    blank = np.zeros(len(ends), dtype=bool)
    for i in np.flatnonzero(n_commas == 0):
        blank[i] = data[starts[i]:ends[i]].decode("utf-8").strip() == ""
    records = np.flatnonzero(~blank)
    if len(records) == 0:
        raise RecordsError([Problem(file, None, None, "empty file (no header)")])
    header, rows = records[0], records[1:]
    if (n_commas[rows] > n_commas[header]).any():
        return None
    grid = (len(rows) > 0 and len(records) == len(ends) and bool((n_commas[rows] == n_commas[header]).all())
            and _plain_header(data[starts[header]:ends[header]]))
    return (rows + 1).tolist(), grid  # 1-based physical line numbers


def _plain_header(line: bytes) -> bool:
    names = line.decode("utf-8").rstrip("\r").split(",")
    return all(names) and len(set(names)) == len(names)


def _parse_csv(data: bytes, grid: bool) -> pd.DataFrame:
    """pandas' C parser, or for a plain grid its pyarrow engine (several times faster).

    A plain grid (no quotes, no blank line, every row as wide as the header, header names
    unique and non-empty) is where the two engines give the same frame: the same strings, the
    same cells missing (pandas hands its NA spellings to pyarrow); tests/test_records_fast_path.py
    compares them. Anything else, or pyarrow missing or failing, takes the C parser.
    """
    kwargs = {"dtype": str, "encoding": "utf-8-sig"}
    if grid:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return pd.read_csv(io.BytesIO(data), engine="pyarrow", **kwargs)
        except Exception:  # noqa: BLE001  (ImportError, or any pyarrow parse error: the C parser decides)
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pd.errors.ParserWarning)
        return pd.read_csv(io.BytesIO(data), index_col=False, **kwargs)


def _read_csv(path: Path, file: str, data: bytes | None = None) -> pd.DataFrame:
    data = _read_bytes(path) if data is None else data
    layout = _simple_layout(data, file)
    lines, grid = (_csv_layout(path, file)[1], False) if layout is None else layout
    try:
        # dtype=str: validation decides what is numeric, and ids keep leading zeros. The bytes
        # read above (BOM removed, already decompressed) are parsed, not the file again.
        df = _parse_csv(data, grid)
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
    return _bounded(_parse_dates_unbounded(col))


def _bounded(parsed: pd.Series) -> pd.Series:
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
    return _per_distinct(col, _parse_date_text)


def _parse_date_text(col: pd.Series) -> pd.Series:
    text = col.astype("str").str.strip()
    try:
        parsed = pd.to_datetime(text, format="ISO8601", errors="coerce")
        if isinstance(parsed.dtype, pd.DatetimeTZDtype):
            parsed = parsed.dt.tz_localize(None)
    except (ValueError, TypeError, OverflowError):
        # Mixed time-zone offsets: parse each value on its own.
        parsed = pd.to_datetime(text.map(_parse_one_date))
    return parsed


_SAMPLE = 1000


def _per_distinct(col: pd.Series, convert: Callable[[pd.Series], pd.Series]) -> pd.Series:
    """``convert(col)`` for an elementwise ``convert``, computed once per distinct value.

    A records file repeats few values in its date, stay and age columns (a thousand dates in
    70,000 rows), and parsing text is most of the cost of validating it. Only for text columns
    (every value a str or missing): in an object column 1, 1.0 and True are one hash key but
    not one text. The distinct values are the same set whatever their count, so the result's
    dtype (int or float, the date unit) is the one ``convert(col)`` would infer.
    """
    if not isinstance(col.dtype, pd.StringDtype) or len(col) < 2:
        return convert(col)
    if len(col) > 2 * _SAMPLE and col.iloc[:_SAMPLE].nunique() > _SAMPLE // 2:
        return convert(col)  # mostly distinct (costs, ids): hashing them first would only add time
    codes, uniques = pd.factorize(col)
    if len(uniques) == 0 or len(uniques) > len(col) // 2:
        return convert(col)
    values = convert(pd.Series(uniques, dtype=col.dtype)).to_numpy()
    missing = codes < 0
    taken = values[np.where(missing, 0, codes)]
    if missing.any():
        taken[missing] = np.datetime64("NaT") if taken.dtype.kind == "M" else np.nan
    return pd.Series(taken, index=col.index, name=col.name)


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
    return _per_distinct(col, _text_to_float)


def _text_to_float(col: pd.Series) -> pd.Series:
    return pd.to_numeric(col.astype("str").str.strip(), errors="coerce").astype("float64")


class _Columns:
    """Each column's missing mask, numbers, dates and stripped text, computed once: validation
    and typing of the same raw frame need the same conversions."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.df = df
        self.memo: dict[tuple[str, str], object] = {}

    def _get(self, kind: str, column: str, convert: Callable[[pd.Series], object]) -> object:
        key = (kind, column)
        if key not in self.memo:
            self.memo[key] = convert(self.df[column])
        return self.memo[key]

    def missing(self, column: str) -> np.ndarray:
        return self._get("missing", column, _missing)

    def numeric(self, column: str) -> pd.Series:
        return self._get("numeric", column, _numeric)

    def dates(self, column: str) -> pd.Series:
        return self._get("dates", column, _parse_dates_unbounded)

    def stripped(self, column: str) -> pd.Series:
        return self._get("stripped", column, lambda col: col.astype("str").str.strip())


def validate_records(df: pd.DataFrame, file: str) -> list[Problem]:
    """Every problem in ``df`` (as returned by :func:`read_records`), sorted by row.

    Checks: required columns present; at least one row; ``admit_date`` an ISO date between
    1900 and 2200; no empty ``admit_date``/``drg_group``; ``length_of_stay``, ``cost``, ``age``
    numeric and finite when present (empty is allowed), LOS and cost ≥ 0, age in 0–120;
    ``encounter_id`` unique (the later row is reported, with the row it repeats).
    Extra columns are ignored.
    """
    return _validate(df, file, _Columns(df))


def _validate(df: pd.DataFrame, file: str, columns: _Columns) -> list[Problem]:
    problems: list[Problem] = []
    for column in REQUIRED_COLUMNS:
        if column not in df.columns:
            problems.append(Problem(file, None, column, "missing required column"))
    if len(df) == 0:
        problems.append(Problem(file, None, None, "empty file (no data rows)"))
        return problems

    cells = _Cells(_row_numbers(df))
    _check_required(df, cells, columns)
    _check_numeric(df, cells, columns)
    _check_encounter_ids(df, cells, columns)
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


class _Quoted:
    """``col.to_numpy()[pos]``, converted on first use: only a problem's message quotes a cell,
    and converting a text column to Python objects costs as much as checking it."""

    def __init__(self, col: pd.Series) -> None:
        self.col = col
        self.values: np.ndarray | None = None

    def __getitem__(self, pos: int) -> object:
        if self.values is None:
            self.values = self.col.to_numpy()
        return self.values[pos]


def _check_required(df: pd.DataFrame, cells: _Cells, columns: _Columns) -> None:
    for column in REQUIRED_COLUMNS:
        if column not in df.columns:
            continue
        missing = columns.missing(column)
        cells.add(missing, column, lambda pos: "missing value")
        if column == "admit_date":
            parsed = columns.dates(column)
            values = _Quoted(df[column])
            unparsable = parsed.isna().to_numpy() & ~missing
            cells.add(unparsable, column, lambda pos: f"unparsable date {_cell(values[pos])} (expected YYYY-MM-DD)")
            out_of_range = parsed.notna().to_numpy() & ~_in_date_range(parsed).to_numpy()
            lo, hi = (d.year for d in DATE_RANGE)
            cells.add(out_of_range, column, lambda pos: f"date outside {lo}-{hi} ({_cell(values[pos])})")


def _check_numeric(df: pd.DataFrame, cells: _Cells, columns: _Columns) -> None:
    for column in NUMERIC_COLUMNS:
        if column not in df.columns:
            continue
        values = _Quoted(df[column])
        missing = columns.missing(column)
        num = columns.numeric(column).to_numpy()
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


def _check_encounter_ids(df: pd.DataFrame, cells: _Cells, columns: _Columns) -> None:
    if "encounter_id" not in df.columns:
        return
    present = ~columns.missing("encounter_id")
    ids = columns.stripped("encounter_id")
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

    A clean CSV (see :func:`_typed_csv`) is typed straight from pyarrow's parse; the frame is the
    one the general path below would return.
    """
    path = Path(path)
    data = _csv_bytes(path)
    typed = None if data is None else _typed_csv(data)
    if typed is not None:
        return typed
    raw = _read_records(path, data)  # the bytes are not read twice
    columns = _Columns(raw)  # validation's conversions are reused for typing
    problems = _validate(raw, path.name, columns)
    if problems:
        raise RecordsError(problems)
    return _typed(raw, columns)


def to_typed(raw: pd.DataFrame) -> pd.DataFrame:
    """The typed frame for an already validated raw frame (see :func:`load_records`)."""
    return _typed(raw, _Columns(raw))


def _typed(raw: pd.DataFrame, columns: _Columns) -> pd.DataFrame:
    out: dict[str, pd.Series] = {
        "admit_date": _bounded(columns.dates("admit_date")).dt.normalize().astype("datetime64[ns]"),
        "drg_group": columns.stripped("drg_group"),
    }
    for column in OPTIONAL_COLUMNS:
        if column not in raw.columns:
            continue
        if column in NUMERIC_COLUMNS:
            out[column] = columns.numeric(column)
        else:
            out[column] = columns.stripped(column).where(~columns.missing(column))
    typed = pd.DataFrame(out)
    typed.index = pd.RangeIndex(len(typed))
    return typed


# ---------------------------------------------------------------------------------------------
# Typed fast path
#
# Validating a clean file cell by cell as text (so that a bad cell can be named) is most of the
# cost of load_records. For a CSV whose every known cell is in a form where pyarrow's typed
# conversion and the general path provably agree, the typed frame is built from pyarrow's parse
# directly. Every other file (anything unusual, and every file with a problem) returns None here
# and takes the general path, which words the errors; tests/test_records_fast_path.py compares
# the two on fuzzed files.

# Numbers: digits and at most a point (pyarrow rejects two), at most 15 characters. Such a value
# is an exact integer below 2**53 over a power of ten up to 1e14, so every correctly rounded
# parser (pyarrow's, pandas' fast_float, pandas' older precise_xstrtod) gives the same float;
# and none is negative, non-finite, -0.0 (pandas reads '-0' as the int 0) or an NA spelling.
_DECIMAL_BYTES = b"0123456789."
_MAX_DECIMAL = 15
_DATE_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9]  # YYYY-MM-DD


def _csv_bytes(path: Path) -> bytes | None:
    """A CSV's bytes as the general path would read them, or None (not a CSV, or unreadable:
    the general path then words the error)."""
    if _kind(path) != "csv" or not path.is_file():
        return None
    try:
        return _read_bytes(path)
    except (OSError, ValueError, EOFError):
        return None


def _plain_names(data: bytes) -> list[str] | None:
    """The header's names when the first line is a plain header the general path would read as
    is: names non-empty, unique and without surrounding whitespace (it strips them)."""
    end = data.find(b"\n")
    line = (data if end < 0 else data[:end]).decode("utf-8")
    names = line[:-1].split(",") if line.endswith("\r") else line.split(",")
    if not all(n and n == n.strip() for n in names) or len(set(names)) != len(names):
        return None
    return names


def _typed_csv(data: bytes) -> pd.DataFrame | None:
    """:func:`load_records`' frame for a clean CSV, from pyarrow's parse, or None.

    None whenever the general path might read the file differently, or might find a problem:
    quotes, NUL or bare CR bytes (record boundaries), an unusual header, a row of another
    width (pyarrow raises), no data rows, or any known cell outside the forms checked below.
    Blank lines are skipped by both readers; the frame's index is fresh, so line numbers
    (which only errors carry) do not matter here.
    """
    if pa is None or b'"' in data or b"\0" in data:
        return None
    if b"\r" in data and data.count(b"\r") != data.count(b"\r\n"):
        return None
    names = _plain_names(data)
    if names is None or not set(REQUIRED_COLUMNS) <= set(names):
        return None
    known = [c for c in (*REQUIRED_COLUMNS, *OPTIONAL_COLUMNS) if c in names]
    try:
        table = pa_csv.read_csv(
            io.BytesIO(data),
            # One thread: a node's file is small and nodes already run in parallel processes.
            read_options=pa_csv.ReadOptions(use_threads=False),
            # Text, with read_csv's default NA spellings as the only nulls: each column is then
            # checked and converted below, where the conditions for agreement can be stated.
            convert_options=pa_csv.ConvertOptions(
                column_types={c: pa.string() for c in known}, include_columns=known,
                null_values=sorted(STR_NA_VALUES), strings_can_be_null=True,
                quoted_strings_can_be_null=True),
        )
        if table.num_rows == 0:
            return None
        out = {c: _typed_column(c, table.column(c).combine_chunks()) for c in known}
    except (pa.ArrowException, ValueError):  # a parse or cast error: the general path decides
        return None
    if any(v is None for v in out.values()):
        return None
    typed = pd.DataFrame(out)
    typed.index = pd.RangeIndex(len(typed))
    return typed


def _typed_column(column: str, arr: pa.Array) -> pd.Series | None:
    """The general path's typed column for a clean pyarrow text column, or None."""
    data, offsets, valid = _utf8(arr)
    if column == "admit_date":
        days = _iso_dates(arr) if valid.all() else None
        return None if days is None else pd.Series(days)
    if column in NUMERIC_COLUMNS:
        values = _decimals(arr, data, offsets, valid)
        if values is None or (column == "age" and ((values < AGE_RANGE[0]) | (values > AGE_RANGE[1])).any()):
            return None
        return pd.Series(values)
    if column in REQUIRED_COLUMNS and not valid.all():
        return None
    starts, ends = offsets[:-1][valid], offsets[1:][valid]
    if (ends <= starts).any() or not (_printable(data[starts]) and _printable(data[ends - 1])):
        return None
    if column == "encounter_id" and not _unique(arr):
        return None
    # The general path's dtype: its text columns are .astype("str"), and missing ids are NaN.
    return pd.Series(pd.array(arr, dtype="str"))


def _utf8(arr: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A pyarrow string array's bytes, cell offsets into them and validity, as numpy views: the
    checks look at a few bytes per cell without making a Python string of each."""
    if arr.type != pa.string():
        raise ValueError(f"unexpected arrow type {arr.type}")
    _, offsets, values = arr.buffers()
    off = np.frombuffer(offsets, dtype=np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(0, dtype=np.uint8)
    valid = np.ones(len(arr), dtype=bool) if arr.null_count == 0 else arr.is_valid().to_numpy(zero_copy_only=False)
    return data, off, valid


def _printable(edge: np.ndarray) -> bool:
    """Whether these first or last bytes of text cells are all printable non-space ASCII: such a
    cell is what the general path's whitespace stripping leaves (Python's and pyarrow's notions
    of whitespace differ beyond ASCII; cells edged with it are rare and take the general path)."""
    return bool(((edge - np.uint8(0x21)) < 0x7F - 0x21).all())  # uint8: below 0x21 wraps high


def _iso_dates(arr: pa.Array) -> np.ndarray | None:
    """datetime64[ns] of cells that are all exactly YYYY-MM-DD, real dates within DATE_RANGE, or
    None. Such a date is what ISO 8601 parsing and normalising to midnight give. Checked once
    per distinct text: a file repeats each admission date many times."""
    encoded = pc.dictionary_encode(arr)
    distinct = _distinct_dates(*_utf8(encoded.dictionary)[:2])
    return None if distinct is None else distinct[encoded.indices.to_numpy()]


def _distinct_dates(data: np.ndarray, offsets: np.ndarray) -> np.ndarray | None:
    if not (np.diff(offsets) == 10).all():
        return None
    cells = data[offsets[0]:offsets[-1]].reshape(-1, 10)
    digits = (cells[:, _DATE_DIGITS] - ord("0")).astype(np.int64)  # bytes below '0' wrap past 9
    if (digits > 9).any() or (cells[:, [4, 7]] != ord("-")).any():
        return None
    year = digits[:, :4] @ np.array([1000, 100, 10, 1])
    month, day = digits[:, 4] * 10 + digits[:, 5], digits[:, 6] * 10 + digits[:, 7]
    if ((month < 1) | (month > 12) | (day < 1)).any():
        return None
    months = ((year - 1970) * 12 + month - 1).astype("datetime64[M]")
    days = months.astype("datetime64[D]") + (day - 1)
    if (days.astype("datetime64[M]") != months).any():  # past the month's end (2023-02-30)
        return None
    # Compared in days: a year like 0147 overflows datetime64[ns] without an error. A midnight
    # is at or after a bound exactly when it is at or after the bound's next midnight.
    lo, hi = (np.datetime64(bound.ceil("D").to_datetime64(), "D") for bound in DATE_RANGE)
    return days.astype("datetime64[ns]") if ((days >= lo) & (days < hi)).all() else None


def _decimals(arr: pa.Array, data: np.ndarray, offsets: np.ndarray, valid: np.ndarray) -> np.ndarray | None:
    """float64 (NaN where missing) of cells that are all plain decimals (see _DECIMAL_BYTES), or None."""
    lengths = np.diff(offsets)
    # pyarrow stores no bytes for a null cell; were it to, they would only make this stricter.
    if (lengths[valid] == 0).any() or (lengths > _MAX_DECIMAL).any():
        return None
    if data[offsets[0]:offsets[-1]].tobytes().translate(None, _DECIMAL_BYTES):  # bytes left: not a decimal
        return None
    return pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)  # '.' or '1.2.3' raise


def _unique(arr: pa.Array) -> bool:
    """No encounter id repeated. Exports are often in id order: strictly increasing is unique and
    a cheap comparison; otherwise the values are hashed."""
    ids = arr.drop_null()  # nulls compare as null, which pc.all would skip
    if len(ids) < 2 or pc.all(pc.greater(ids[1:], ids[:-1])).as_py():
        return True
    return len(pc.unique(ids)) == len(ids)
