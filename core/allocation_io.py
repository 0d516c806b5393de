"""The `fedalloc allocate` CSV formats: read the demand file, write the allocation table.

Input columns: ``hospital,demand,resources`` (required), optional ``cap``, ``floor``,
``demand_std``, and per-DRG-group demand ``demand_<group>`` (e.g. ``demand_respiratory``) for the
drg_budget policy. A blank ``cap`` means uncapped and a blank ``floor`` means 0; every other value
must be a finite number >= 0. Unknown extra columns are ignored.

Every problem in the file is reported, each as one line naming the file, the CSV line
(header = line 1) and the column, so a coordinator can fix the whole file in one pass without
reading a traceback. Line numbers assume no quoted field spans several lines, which the format
never needs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = ("hospital", "demand", "resources")
OPTIONAL_COLUMNS: tuple[str, ...] = ("cap", "floor", "demand_std")
GROUP_PREFIX = "demand_"
_BLANK_DEFAULT = {"cap": np.inf, "floor": 0.0}


@dataclass(frozen=True)
class DemandProblem:
    """One problem in a demand CSV: file, CSV line (header = 1) and column, when known."""

    path: str
    line: int | None
    column: str | None
    problem: str

    def __str__(self) -> str:
        where = ", ".join(
            part for part in (
                f"line {self.line}" if self.line is not None else "",
                f"column {self.column!r}" if self.column is not None else "",
            ) if part
        )
        return f"{self.path}: {where}: {self.problem}" if where else f"{self.path}: {self.problem}"


class DemandFileError(ValueError):
    """Problems in a demand CSV: ``problems`` lists every one found, in file order.

    The message is one line per problem naming file, line and column; ``line``, ``column`` and
    ``problem`` are those of the first.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str = "", *, line: int | None = None,
                 column: str | None = None, problems: Sequence[DemandProblem] = ()) -> None:
        self.problems: list[DemandProblem] = list(problems) or [
            DemandProblem(str(path), line, column, problem)]
        first = self.problems[0]
        self.path, self.line, self.column, self.problem = str(path), first.line, first.column, first.problem
        super().__init__("\n".join(str(p) for p in self.problems))


@dataclass(frozen=True)
class DemandTable:
    """Validated columns of a demand CSV; `lines[i]` is the CSV line of hospital i."""

    path: str
    hospital: np.ndarray
    demand: np.ndarray
    resources: np.ndarray
    lines: np.ndarray
    cap: np.ndarray | None = None
    floor: np.ndarray | None = None
    demand_std: np.ndarray | None = None
    group_demand: pd.DataFrame | None = None  # columns are group names, prefix stripped

    def __len__(self) -> int:
        return int(self.demand.size)


def _short(value: str, limit: int = 40) -> str:
    return repr(value if len(value) <= limit else value[: limit - 1] + "…")


class _Problems:
    """The problems of one file, reported in file order (line, then column position)."""

    def __init__(self, path: str, columns: Sequence[str]) -> None:
        self.path = path
        self.order: dict[str, int] = {}
        for c in columns:
            self.order.setdefault(c, len(self.order))
        self.items: list[DemandProblem] = []

    def add(self, problem: str, *, line: int | None = None, column: str | None = None) -> None:
        self.items.append(DemandProblem(self.path, line, column, problem))

    def raise_if_any(self) -> None:
        if self.items:
            # File-level problems first, then top-down and left to right, as a reader would fix them.
            ranked = sorted(self.items, key=lambda p: (p.line or 0, self.order.get(p.column or "", -1)))
            raise DemandFileError(self.path, problems=ranked)


def _numeric(frame: pd.DataFrame, lines: np.ndarray, column: str, problems: _Problems) -> np.ndarray:
    """The column as float64; every bad cell is added to `problems` (and reads as NaN)."""
    text = frame[column].str.strip()
    values = np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64)  # writable copy
    blank = (text == "").to_numpy()
    default = _BLANK_DEFAULT.get(column)
    if default is not None:
        values[blank] = default
    allow_inf = column == "cap"
    bad = np.isnan(values) | (values < 0)
    if not allow_inf:
        bad |= np.isinf(values)
    if default is None:
        bad |= blank
    for i in np.flatnonzero(bad):
        raw = str(text.iloc[i])
        if raw == "":
            problem = "empty value"
        elif np.isnan(values[i]):
            problem = f"not a number ({_short(raw)})" if raw.lower() != "nan" else "NaN is not allowed"
        elif np.isinf(values[i]):
            problem = f"must be finite ({_short(raw)})"
        else:
            problem = f"must be >= 0 ({_short(raw)})"
        problems.add(problem, line=int(lines[i]), column=column)
    values[bad] = np.nan
    return values


def read_demand_csv(
    path: str | os.PathLike[str], *, known_groups: Collection[str] | None = None
) -> DemandTable:
    """Read and validate a demand CSV; raise DemandFileError listing every problem found.

    A file that cannot be read as CSV at all is one problem; otherwise every missing column and
    every bad cell is reported, each with its line and column.

    With `known_groups` (drg_budget), every ``demand_<group>`` column must name a known group and
    at least one must be present; otherwise group columns are read only if present.
    """
    p = str(path)
    try:
        # Everything as text so that bad cells are reported by us, with line and column, rather
        # than silently becoming NaN or failing inside pandas' parser.
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skip_blank_lines=False)
    except FileNotFoundError:
        raise DemandFileError(p, "file not found") from None
    except IsADirectoryError:
        raise DemandFileError(p, "is a directory, not a CSV file") from None
    except pd.errors.EmptyDataError:
        raise DemandFileError(p, "file is empty", line=1) from None
    except pd.errors.ParserError as exc:
        raise DemandFileError(p, f"not a valid CSV ({' '.join(str(exc).split())})") from None
    except UnicodeDecodeError:
        raise DemandFileError(p, "not UTF-8 text") from None

    frame.columns = [str(c).strip() for c in frame.columns]
    problems = _Problems(p, [*frame.columns, *REQUIRED_COLUMNS])
    for col in REQUIRED_COLUMNS:
        if col not in frame.columns:
            problems.add(f"missing required column (have: {', '.join(frame.columns)})", line=1, column=col)
    lines = np.arange(2, len(frame) + 2)
    filled = (frame != "").any(axis=1).to_numpy()
    frame, lines = frame.loc[filled].reset_index(drop=True), lines[filled]
    if len(frame) == 0:
        problems.add("no hospital rows after the header")
        problems.raise_if_any()

    hospital = frame["hospital"].str.strip() if "hospital" in frame.columns else None
    if hospital is not None:
        for i in np.flatnonzero((hospital == "").to_numpy()):
            problems.add("empty value", line=int(lines[i]), column="hospital")
        named = (hospital != "").to_numpy()
        dup = hospital.duplicated().to_numpy() & named
        first_line = dict(zip(hospital[named][::-1], lines[named][::-1]))  # name -> first line
        for i in np.flatnonzero(dup):
            problems.add(f"duplicate hospital {_short(hospital.iloc[i])} (first on line {first_line[hospital.iloc[i]]})",
                         line=int(lines[i]), column="hospital")

    numeric = {c: _numeric(frame, lines, c, problems)
               for c in (*REQUIRED_COLUMNS[1:], *OPTIONAL_COLUMNS) if c in frame.columns}
    if "cap" in numeric and "floor" in numeric:
        with np.errstate(invalid="ignore"):
            crossed = numeric["floor"] > numeric["cap"]  # False where either cell is bad (NaN)
        for i in np.flatnonzero(crossed):
            problems.add(f"floor {numeric['floor'][i]} is above cap {numeric['cap'][i]}",
                         line=int(lines[i]), column="floor")

    group_cols = [c for c in frame.columns if c.startswith(GROUP_PREFIX) and c not in OPTIONAL_COLUMNS]
    if known_groups is not None:
        unknown = [c for c in group_cols if c[len(GROUP_PREFIX):] not in known_groups]
        for c in unknown:
            problems.add(f"unknown DRG group {c[len(GROUP_PREFIX):]!r} (known: {', '.join(known_groups)})",
                         line=1, column=c)
        group_cols = [c for c in group_cols if c not in unknown]
        if not group_cols and not unknown:
            problems.add(
                f"drg_budget needs per-group demand columns named {GROUP_PREFIX}<group>, "
                f"e.g. {GROUP_PREFIX}{next(iter(known_groups), 'respiratory')}", line=1)
    groups = {c[len(GROUP_PREFIX):]: _numeric(frame, lines, c, problems) for c in group_cols}

    problems.raise_if_any()
    assert hospital is not None  # a missing column is a problem raised above
    return DemandTable(
        path=p, hospital=hospital.to_numpy(dtype=object), demand=numeric["demand"],
        resources=numeric["resources"], lines=lines, cap=numeric.get("cap"),
        floor=numeric.get("floor"), demand_std=numeric.get("demand_std"),
        group_demand=pd.DataFrame(groups) if groups else None,
    )


def write_allocation_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the allocation table atomically: a reader never sees a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            # One "\n" after every row, the last included, on every platform.
            table.to_csv(fh, index=False, lineterminator="\n")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
