"""Public group catalogue shared by nodes, coordinator and the synthetic generator.

The group list is public configuration, not data: a node's series always has exactly these
columns, so the shape of what it trains on never reveals which groups it treated. The built-in
12 DRG groups below are the default; a run may declare its own catalogue (run-config
`groups-file`, a CSV of `group,weight`), read by :func:`load_catalogue`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

# name -> relative weight (cost weight vs. the average case), loosely after DRG/DIP tables.
RELATIVE_WEIGHTS: dict[str, float] = {
    "respiratory": 1.10,
    "cardiac": 1.60,
    "orthopedic": 1.80,
    "obstetric": 0.80,
    "neonatal": 1.30,
    "gastro": 0.95,
    "neuro": 1.70,
    "renal": 1.20,
    "oncology": 2.20,
    "infection": 1.05,
    "trauma": 1.50,
    "mental_health": 0.90,
}

DRG_GROUPS: tuple[str, ...] = tuple(RELATIVE_WEIGHTS)


# ---------------------------------------------------------------------------------------------
# The run's group catalogue: public configuration (run-config `groups-file`), the built-in 12 by
# default. docs/DESIGN.md "Group catalogue" says who reads it and what happens to other groups.

CATALOGUE_COLUMNS = ("group", "weight")
# A group code travels in the run config as one comma-separated string (`groups`), so it may not
# hold a comma; the bound keeps the series, model and reply keys of a run reasonably sized.
MAX_GROUPS = 1000
MAX_GROUP_LEN = 64


@dataclass(frozen=True)
class Catalogue:
    """Ordered public groups and their relative weights (drg_budget). The order is the order of
    the series columns, the model's group rows and the `demand-<group>` reply keys."""

    groups: tuple[str, ...]
    weights: dict[str, float]
    source: str = "built-in"

    @property
    def fingerprint(self) -> str:
        """Short hash of groups (in order) and weights: the same text means the same catalogue."""
        text = "\n".join(f"{g},{self.weights[g]!r}" for g in self.groups)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def is_default(self) -> bool:
        return self.groups == DRG_GROUPS and self.weights == RELATIVE_WEIGHTS


def default_catalogue() -> Catalogue:
    """The 12 synthetic DRG groups of this module (what runs without `groups-file` use)."""
    return Catalogue(DRG_GROUPS, dict(RELATIVE_WEIGHTS))


def reserved_codes() -> set[str]:
    """Codes whose `demand-<code>` reply key already means something else (D_i's interval)."""
    from core.protocol import DEMAND, DEMAND_INTERVAL

    return {k[len(DEMAND) + 1 :] for k in DEMAND_INTERVAL}


def check_group_codes(groups: list[str] | tuple[str, ...], where: str) -> None:
    """Codes usable as series columns, reply keys and one comma-separated run-config string."""
    if not groups:
        raise ValueError(f"{where}: no groups")
    if len(groups) > MAX_GROUPS:
        raise ValueError(f"{where}: {len(groups)} groups, more than {MAX_GROUPS}")
    seen: set[str] = set()
    for g in groups:
        if g in reserved_codes():
            raise ValueError(f"{where}: group {g!r} is reserved (its reply key demand-{g} has another meaning)")
        if not g or g != g.strip() or "," in g or len(g) > MAX_GROUP_LEN:
            raise ValueError(f"{where}: group {g!r} must be 1–{MAX_GROUP_LEN} characters, no comma, "
                             "no surrounding spaces")
        if g in seen:
            raise ValueError(f"{where}: duplicate group {g!r}")
        seen.add(g)


def load_catalogue(path: str | Path) -> Catalogue:
    """Read a catalogue CSV (`group,weight`, header required); cached by (path, mtime, size).

    Read by the one table reader (core/tables.py); the error is one line naming the file, CSV line
    (header = line 1) and column of the first problem: an empty file, a missing column, an empty,
    duplicate, reserved or malformed group, a weight that is not a positive finite number.
    """
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except OSError as exc:
        raise ValueError(f"groups-file {p}: cannot read ({exc.strerror or exc})") from None
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _load_cached(path: str, mtime_ns: int, size: int) -> Catalogue:
    from core.tables import TableError, numeric, read_text_table, short, unique_names

    name = Path(path).name
    try:
        frame, lines, problems = read_text_table(path, CATALOGUE_COLUMNS, "groups")
        groups = unique_names(frame, lines, "group", problems, "group") if "group" in frame.columns else None
        weights = numeric(frame, lines, "weight", problems, positive=True) if "weight" in frame.columns else None
        for line, g in zip(lines, groups if groups is not None else []):
            if g in reserved_codes():
                problems.add(f"{short(g)} is reserved (reply key demand-{g} has another meaning)",
                             line=int(line), column="group")
            elif g and ("," in g or len(g) > MAX_GROUP_LEN):
                problems.add(f"{short(g)} is not a group code (1–{MAX_GROUP_LEN} characters, no comma)",
                             line=int(line), column="group")
        problems.raise_if_any()
    except TableError as exc:
        # One line: this error ends up in a run-config error; the first problem names file, line, column.
        first = exc.problems[0]
        raise ValueError(str(first).replace(first.path, name, 1)) from None
    assert groups is not None and weights is not None  # a missing column is a problem raised above
    check_group_codes(list(groups), name)
    return Catalogue(tuple(groups), dict(zip(groups, weights.tolist())), source=path)


def catalogue_for(groups_file: str = "", groups: str = "") -> Catalogue:
    """The run's catalogue from its run config: `groups-file` if set, else the `groups` list (as a
    node receives it, weights 1), else the built-in 12. Both set: they must name the same groups."""
    if groups_file:
        cat = load_catalogue(groups_file)
        if groups and tuple(groups.split(",")) != cat.groups:
            raise ValueError(f"run-config groups ({groups}) differ from groups-file {Path(groups_file).name} "
                             f"({','.join(cat.groups)})")
        return cat
    if groups:
        listed = groups.split(",")
        check_group_codes(listed, "run-config groups")
        if tuple(listed) == DRG_GROUPS:
            return default_catalogue()
        return Catalogue(tuple(listed), {g: 1.0 for g in listed}, source="run-config groups")
    return default_catalogue()
