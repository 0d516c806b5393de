"""The `fedalloc allocate` CSV formats: read the demand file, write the allocation table.

Input columns: ``hospital,demand,resources`` (required), optional ``cap``, ``floor``,
``demand_std``, and per-DRG-group demand ``demand_<group>`` (e.g. ``demand_respiratory``) for the
drg_budget policy. A blank ``cap`` means uncapped and a blank ``floor`` means 0; every other value
must be a finite number >= 0. Unknown extra columns are ignored.

Every problem is reported as one line naming the file, the CSV line (header = line 1) and the
column, so a coordinator can fix the file without reading a traceback. Line numbers assume no
quoted field spans several lines, which the format never needs.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

REQUIRED_COLUMNS: tuple[str, ...] = ("hospital", "demand", "resources")
OPTIONAL_COLUMNS: tuple[str, ...] = ("cap", "floor", "demand_std")
GROUP_PREFIX = "demand_"
_BLANK_DEFAULT = {"cap": np.inf, "floor": 0.0}


class DemandFileError(ValueError):
    """A problem in a demand CSV; the message is one line naming file, line and column."""

    def __init__(self, path: str | os.PathLike[str], problem: str, *, line: int | None = None,
                 column: str | None = None) -> None:
        where = ", ".join(
            part for part in (
                f"line {line}" if line is not None else "",
                f"column {column!r}" if column is not None else "",
            ) if part
        )
        super().__init__(f"{path}: {where}: {problem}" if where else f"{path}: {problem}")
        self.path, self.line, self.column, self.problem = str(path), line, column, problem


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


def _numeric(path: str, frame: pd.DataFrame, lines: np.ndarray, column: str) -> np.ndarray:
    text = frame[column].str.strip()
    values = np.array(pd.to_numeric(text, errors="coerce"), dtype=np.float64)  # writable copy
    blank = (text == "").to_numpy()
    default = _BLANK_DEFAULT.get(column)
    if default is not None:
        values[blank] = default
    allow_inf = column == "cap"
    bad = np.isnan(values) | (values < 0) | (~allow_inf & np.isinf(values))
    if default is None:
        bad |= blank
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raw = str(text.iloc[i])
        if raw == "":
            problem = "empty value"
        elif np.isnan(values[i]):
            problem = f"not a number ({_short(raw)})" if raw.lower() != "nan" else "NaN is not allowed"
        elif np.isinf(values[i]):
            problem = f"must be finite ({_short(raw)})"
        else:
            problem = f"must be >= 0 ({_short(raw)})"
        raise DemandFileError(path, problem, line=int(lines[i]), column=column)
    return values


def read_demand_csv(
    path: str | os.PathLike[str], *, known_groups: Collection[str] | None = None
) -> DemandTable:
    """Read and validate a demand CSV; raise DemandFileError on the first problem.

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
    for col in REQUIRED_COLUMNS:
        if col not in frame.columns:
            raise DemandFileError(p, f"missing required column (have: {', '.join(frame.columns)})",
                                  line=1, column=col)
    lines = np.arange(2, len(frame) + 2)
    filled = (frame != "").any(axis=1).to_numpy()
    frame, lines = frame.loc[filled].reset_index(drop=True), lines[filled]
    if len(frame) == 0:
        raise DemandFileError(p, "no hospital rows after the header")

    hospital = frame["hospital"].str.strip()
    empty = (hospital == "").to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise DemandFileError(p, "empty value", line=int(lines[i]), column="hospital")
    dup = hospital.duplicated().to_numpy()
    if dup.any():
        i = int(np.flatnonzero(dup)[0])
        first = int(lines[int(np.flatnonzero((hospital == hospital.iloc[i]).to_numpy())[0])])
        raise DemandFileError(p, f"duplicate hospital {_short(hospital.iloc[i])} (first on line {first})",
                              line=int(lines[i]), column="hospital")

    demand = _numeric(p, frame, lines, "demand")
    resources = _numeric(p, frame, lines, "resources")
    optional = {c: _numeric(p, frame, lines, c) for c in OPTIONAL_COLUMNS if c in frame.columns}
    if "cap" in optional and "floor" in optional:
        crossed = optional["floor"] > optional["cap"]
        if crossed.any():
            i = int(np.flatnonzero(crossed)[0])
            raise DemandFileError(p, f"floor {optional['floor'][i]} is above cap {optional['cap'][i]}",
                                  line=int(lines[i]), column="floor")

    group_cols = [c for c in frame.columns if c.startswith(GROUP_PREFIX) and c not in OPTIONAL_COLUMNS]
    if known_groups is not None:
        for c in group_cols:
            if c[len(GROUP_PREFIX):] not in known_groups:
                raise DemandFileError(
                    p, f"unknown DRG group {c[len(GROUP_PREFIX):]!r} (known: {', '.join(known_groups)})",
                    line=1, column=c)
        if not group_cols:
            raise DemandFileError(
                p, f"drg_budget needs per-group demand columns named {GROUP_PREFIX}<group>, "
                f"e.g. {GROUP_PREFIX}{next(iter(known_groups), 'respiratory')}", line=1)
    groups = None
    if group_cols:
        groups = pd.DataFrame({c[len(GROUP_PREFIX):]: _numeric(p, frame, lines, c) for c in group_cols})

    return DemandTable(
        path=p, hospital=hospital.to_numpy(dtype=object), demand=demand, resources=resources,
        lines=lines, cap=optional.get("cap"), floor=optional.get("floor"),
        demand_std=optional.get("demand_std"), group_demand=groups,
    )


def write_allocation_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the allocation table atomically: a reader never sees a half-written file."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    try:
        with os.fdopen(fd, "w", newline="") as fh:
            table.to_csv(fh, index=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
