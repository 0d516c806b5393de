"""Where a node's private files are, and how it turns them into a demand series.

Paths and the lifetime budget come from the node's own config (`flower-supernode --node-config`),
never from the coordinator: a coordinator cannot point a node at another file or raise its budget.
In a simulation, the driver hands each virtual node (by partition id) its own files the same way.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from core.drg import DRG_GROUPS
from core.records import load_records
from core.run_config import RunSettings
from core.series import demand_series

log = logging.getLogger("fedalloc.node")


@dataclass(frozen=True)
class NodeSettings:
    hospital: str
    data_path: Path
    ledger_path: Path
    budget: float
    delta: float
    accountant: str
    debug_seed: int | None = None

    @classmethod
    def from_config(
        cls,
        node_config: Mapping[str, Any],
        sim_nodes: Mapping[int, Mapping[str, Any]] | None = None,
        run_config: Mapping[str, Any] | None = None,
        run_id: str = "0",
    ) -> "NodeSettings":
        cfg = dict(node_config)
        if "data-path" not in cfg and "partition-id" in cfg:
            pid = int(cfg["partition-id"])
            if sim_nodes is not None:
                cfg.update(sim_nodes[pid])
            else:
                cfg.update(_flwr_run_simulation_node(pid, dict(run_config or {}), run_id))
        missing = [k for k in ("data-path", "ledger-path") if not cfg.get(k)]
        if missing:
            raise ValueError(f"node config is missing {', '.join(missing)} (set them with --node-config)")
        data_path = Path(str(cfg["data-path"])).expanduser()
        return cls(
            hospital=str(cfg.get("hospital") or data_path.stem.split(".")[0]),
            data_path=data_path,
            ledger_path=Path(str(cfg["ledger-path"])).expanduser(),
            budget=float(cfg.get("budget", 3.0)),
            delta=float(cfg.get("delta", 1e-5)),
            accountant=str(cfg.get("accountant", "rdp")),
            debug_seed=int(cfg["debug-seed"]) if "debug-seed" in cfg else None,
        )


def series_for(node: NodeSettings, run: RunSettings) -> pd.DataFrame:
    """The node's demand series over the public span [start, cutoff)."""
    stat = os.stat(node.data_path)
    return _series_cached(str(node.data_path), stat.st_mtime_ns, stat.st_size, run.start, run.cutoff, run.period, run.measure, run.los_cap).copy()


@lru_cache(maxsize=2048)  # one entry per virtual node in a simulation process
def _series_cached(path: str, mtime: int, size: int, start: str, end: str, period: str, measure: str, los_cap: float) -> pd.DataFrame:
    records = load_records(path)
    return demand_series(records, start=start, end=end, period=period, measure=measure, los_cap=los_cap, groups=DRG_GROUPS)


def _flwr_run_simulation_node(pid: int, run_config: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Files of virtual node `pid` under `flwr run .` in simulation (no --node-config).

    Synthetic hospital `pid` depends only on (seed, pid), so each virtual node writes just its
    own file and nodes never race. Ledgers are per run: these are synthetic records.
    """
    from simulations.synthetic import SyntheticConfig, generate_hospital_records, hospital_name, write_records

    name = hospital_name(pid)
    data_dir = Path(str(run_config.get("sim-data-dir") or "")).expanduser()
    if not str(run_config.get("sim-data-dir") or ""):
        seed = int(run_config.get("seed", 0))
        data_dir = Path.home() / ".cache" / "fedalloc" / f"synthetic-seed{seed}"
        path = data_dir / f"{name}.csv"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            tmp = data_dir / f".{name}.{os.getpid()}.csv"
            write_records(generate_hospital_records(SyntheticConfig(seed=seed), pid), tmp)
            os.replace(tmp, path)
    return {
        "data-path": str(data_dir / f"{name}.csv"),
        "ledger-path": str(data_dir / "ledgers" / f"run-{run_id}" / f"{name}.json"),
        "hospital": name,
    }
