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
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.atomic import atomic_write_text
from core.tables import Problems, TableError, TableProblem, numeric, read_text_table, unique_names

REQUIRED_COLUMNS: tuple[str, ...] = ("hospital", "demand", "resources")
OPTIONAL_COLUMNS: tuple[str, ...] = ("cap", "floor", "demand_std")
GROUP_PREFIX = "demand_"
_BLANK_DEFAULT = {"cap": np.inf, "floor": 0.0}


DemandProblem = TableProblem


class DemandFileError(TableError):
    """Problems in a demand CSV (core/tables.py): one line per problem naming file, line, column."""


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


def _number(frame: pd.DataFrame, lines: np.ndarray, column: str, problems: Problems) -> np.ndarray:
    # A blank cap means uncapped and a blank floor means 0; every other cell must be filled.
    return numeric(frame, lines, column, problems, blank=_BLANK_DEFAULT.get(column), allow_inf=column == "cap")


def read_demand_csv(
    path: str | os.PathLike[str], *, known_groups: Collection[str] | None = None
) -> DemandTable:
    """Read and validate a demand CSV; raise DemandFileError listing every problem found.

    A file that cannot be read as CSV at all is one problem; otherwise every missing column and
    every bad cell is reported, each with its line and column.

    With `known_groups` (drg_budget), every ``demand_<group>`` column must name a known group and
    at least one must be present; otherwise group columns are read only if present.
    """
    frame, lines, problems = read_text_table(path, REQUIRED_COLUMNS, "hospital rows", DemandFileError)
    hospital = unique_names(frame, lines, "hospital", problems, "hospital") if "hospital" in frame.columns else None
    values = {c: _number(frame, lines, c, problems) for c in (*REQUIRED_COLUMNS[1:], *OPTIONAL_COLUMNS)
               if c in frame.columns}
    if "cap" in values and "floor" in values:
        with np.errstate(invalid="ignore"):
            crossed = values["floor"] > values["cap"]  # False where either cell is bad (NaN)
        for i in np.flatnonzero(crossed):
            problems.add(f"floor {values['floor'][i]} is above cap {values['cap'][i]}",
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
    groups = {c[len(GROUP_PREFIX):]: _number(frame, lines, c, problems) for c in group_cols}

    problems.raise_if_any()
    assert hospital is not None  # a missing column is a problem raised above
    return DemandTable(
        path=str(path), hospital=hospital.to_numpy(dtype=object), demand=values["demand"],
        resources=values["resources"], lines=lines, cap=values.get("cap"),
        floor=values.get("floor"), demand_std=values.get("demand_std"),
        group_demand=pd.DataFrame(groups) if groups else None,
    )


def write_allocation_csv(table: pd.DataFrame, path: str | os.PathLike[str]) -> None:
    """Write the allocation table atomically: a reader never sees a half-written file."""
    # One "\n" after every row, the last included, on every platform.
    atomic_write_text(path, table.to_csv(index=False, lineterminator="\n"))
