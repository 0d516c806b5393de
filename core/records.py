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


def _read_csv(path: Path, file: str) -> pd.DataFrame:
    data = _read_bytes(path)
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
    """
    path = Path(path)
    raw = read_records(path)
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
