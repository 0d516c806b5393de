"""The one line-aware table reader for the small public CSVs fedalloc reads (demand, resources,
group catalogue): every problem is reported as one line naming the file, the CSV line
(header = line 1) and the column, all of them at once, so a file can be fixed in one pass.

Cells are read as text so that a bad cell is reported here, with its line and column, rather
than silently becoming NaN inside pandas' parser. Line numbers assume no quoted field spans
several lines, which none of these formats needs. (Encounter records, which can be large and
Parquet, have their own reader in core/records.py.)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class TableProblem:
    """One problem in a table: file, CSV line (header = 1) and column, when known."""

    path: str
    line: int | None
    column: str | None
    problem: str

    def __str__(self) -> str:
        where = ", ".join(part for part in (
            f"line {self.line}" if self.line is not None else "",
            f"column {self.column!r}" if self.column is not None else "",
        ) if part)
        return f"{self.path}: {where}: {self.problem}" if where else f"{self.path}: {self.problem}"


class TableError(ValueError):
    """Problems in a table: ``problems`` lists every one found, in file order.

    The message is one line per problem; ``line``, ``column`` and ``problem`` are the first's.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str = "", *, line: int | None = None,
                 column: str | None = None, problems: Sequence[TableProblem] = ()) -> None:
        self.problems: list[TableProblem] = list(problems) or [TableProblem(str(path), line, column, problem)]
        first = self.problems[0]
        self.path, self.line, self.column, self.problem = str(path), first.line, first.column, first.problem
        super().__init__("\n".join(str(p) for p in self.problems))


class Problems:
    """The problems of one file, raised together in file order (line, then column position)."""

    def __init__(self, path: str, columns: Sequence[str], error: type[TableError] = TableError) -> None:
        self.path, self.error = path, error
        self.order: dict[str, int] = {}
        for c in columns:
            self.order.setdefault(c, len(self.order))
        self.items: list[TableProblem] = []

    def add(self, problem: str, *, line: int | None = None, column: str | None = None) -> None:
        self.items.append(TableProblem(self.path, line, column, problem))

    def raise_if_any(self) -> None:
        if self.items:
            # File-level problems first, then top-down and left to right, as a reader would fix them.
            ranked = sorted(self.items, key=lambda p: (p.line or 0, self.order.get(p.column or "", -1)))
            raise self.error(self.path, problems=ranked)


def short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


def read_text_table(path: str | os.PathLike[str], required: Sequence[str], what: str = "rows",
                    error: type[TableError] = TableError) -> tuple[pd.DataFrame, np.ndarray, Problems]:
    """(cells as stripped text, CSV line of each row, the problem list) of a CSV file.

    Unreadable files raise at once; missing `required` columns and an empty body are recorded
    (the caller adds cell problems and calls `raise_if_any`). Blank rows are skipped.
    """
    p = str(path)
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False, encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(p, "file not found") from None
    except IsADirectoryError:
        raise error(p, "is a directory, not a CSV file") from None
    except pd.errors.EmptyDataError:
        raise error(p, "file is empty", line=1) from None
    except pd.errors.ParserError as exc:
        raise error(p, f"not a valid CSV ({' '.join(str(exc).split())})") from None
    except UnicodeDecodeError:
        raise error(p, "not UTF-8 text") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    problems = Problems(p, [*frame.columns, *required], error)
    for col in required:
        if col not in frame.columns:
            problems.add(f"missing required column (have: {', '.join(frame.columns)})", line=1, column=col)
    lines = np.arange(2, len(frame) + 2)
    filled = (frame != "").any(axis=1).to_numpy()
    frame, lines = frame.loc[filled].reset_index(drop=True), lines[filled]
    frame = frame.apply(lambda col: col.str.strip())
    if len(frame) == 0:
        problems.add(f"no {what} after the header")
        problems.raise_if_any()
    return frame, lines, problems


def numeric(frame: pd.DataFrame, lines: np.ndarray, column: str, problems: Problems, *,
            blank: float | None = None, allow_inf: bool = False, positive: bool = False) -> np.ndarray:
    """The column as float64, finite and ≥ 0 (> 0 with `positive`); every bad cell is added to
    `problems` and reads as NaN. A blank cell reads as `blank`, or is a problem if that is None."""
    text = frame[column]
    values = np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64)  # writable copy
    empty = (text == "").to_numpy()
    if blank is not None:
        values[empty] = blank
    with np.errstate(invalid="ignore"):
        bad = np.isnan(values) | (values <= 0 if positive else values < 0)
    if not allow_inf:
        bad |= np.isinf(values)
    if blank is None:
        bad |= empty
    for i in np.flatnonzero(bad):
        raw = str(text.iloc[i])
        if raw == "":
            problem = "empty value"
        elif np.isnan(values[i]):
            problem = f"not a number ({short(raw)})" if raw.lower() != "nan" else "NaN is not allowed"
        elif np.isinf(values[i]):
            problem = f"must be finite ({short(raw)})"
        else:
            problem = f"must be {'> 0' if positive else '>= 0'} ({short(raw)})"
        problems.add(problem, line=int(lines[i]), column=column)
    values[bad] = np.nan
    return values


def unique_names(frame: pd.DataFrame, lines: np.ndarray, column: str, problems: Problems, what: str) -> pd.Series:
    """The column of names: every empty or repeated name is a problem (naming its first line)."""
    names = frame[column]
    for i in np.flatnonzero((names == "").to_numpy()):
        problems.add("empty value", line=int(lines[i]), column=column)
    named = (names != "").to_numpy()
    first_line = dict(zip(names[named][::-1], lines[named][::-1]))
    for i in np.flatnonzero(names.duplicated().to_numpy() & named):
        problems.add(f"duplicate {what} {short(names.iloc[i])} (first on line {first_line[names.iloc[i]]})",
                     line=int(lines[i]), column=column)
    return names
