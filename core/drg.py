"""Public DRG group catalogue shared by nodes, coordinator and the synthetic generator.

The group list is public configuration, not data: a node's series always has exactly these
columns, so the shape of what it trains on never reveals which groups it treated.
"""

from __future__ import annotations

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
