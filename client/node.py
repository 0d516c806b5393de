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

from client.ledger import Ledger
from core.drg import DRG_GROUPS, catalogue_for, load_catalogue
from core.records import load_records
from core.run_config import RunSettings
from core.series import demand_series
from forecasting.features import Examples, training_examples

log = logging.getLogger("fedalloc.node")


# Cache size: one entry per virtual node a simulation process serves (10,000 nodes in one process;
# a weekly series is ~50 KB). Smaller, and a big simulation re-reads every file every round.
NODES_PER_PROCESS = 10_000

DEFAULT_LIMITS = {"max-epsilon-per-run": 3.0, "max-epsilon-per-query": 1.0, "max-rounds-per-run": 50}


@dataclass(frozen=True)
class NodeSettings:
    """A node's private settings. Limits cap what any coordinator may ask (like NVFlare's
    site privacy.json); no run config can override them."""

    hospital: str
    data_path: Path
    ledger_path: Path
    budget: float | None
    delta: float
    debug_seed: int | None = None
    max_epsilon_per_run: float = DEFAULT_LIMITS["max-epsilon-per-run"]
    max_epsilon_per_query: float = DEFAULT_LIMITS["max-epsilon-per-query"]
    max_rounds_per_run: int = DEFAULT_LIMITS["max-rounds-per-run"]
    # Synthetic nodes (simulations) may keep per-run ledgers; a real node has one lifetime
    # ledger, remembered by a marker beside its records so a deleted ledger is noticed.
    synthetic: bool = False
    # The node's own copy of the public group catalogue (node config `groups-file`): a run whose
    # group list differs is refused, never silently realigned. None: use the run's list.
    groups_file: Path | None = None
    log_path: Path | None = None

    @property
    def ledger_marker(self) -> Path | None:
        return None if self.synthetic else self.data_path.with_name(f".{self.data_path.name}.fedalloc-ledger")

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
        budget = cfg.get("budget")
        settings = cls(
            hospital=str(cfg.get("hospital") or data_path.stem.split(".")[0]),
            data_path=data_path,
            ledger_path=Path(str(cfg["ledger-path"])).expanduser(),
            budget=None if budget in (None, "") else float(budget),
            delta=float(cfg.get("delta", 1e-5)),
            debug_seed=int(cfg["debug-seed"]) if "debug-seed" in cfg else None,
            max_epsilon_per_run=float(cfg.get("max-epsilon-per-run", DEFAULT_LIMITS["max-epsilon-per-run"])),
            max_epsilon_per_query=float(cfg.get("max-epsilon-per-query", DEFAULT_LIMITS["max-epsilon-per-query"])),
            max_rounds_per_run=int(cfg.get("max-rounds-per-run", DEFAULT_LIMITS["max-rounds-per-run"])),
            synthetic=str(cfg.get("synthetic", "false")).lower() in ("1", "true", "yes"),
            groups_file=Path(str(cfg["groups-file"])).expanduser() if cfg.get("groups-file") else None,
            log_path=Path(str(cfg.get("log-path") or f"{cfg['ledger-path']}.log")).expanduser(),
        )
        for key, value in (("max-epsilon-per-run", settings.max_epsilon_per_run),
                           ("max-epsilon-per-query", settings.max_epsilon_per_query),
                           ("max-rounds-per-run", settings.max_rounds_per_run)):
            if not value > 0:
                raise ValueError(f"node config {key} must be positive, got {value}")
        return settings


def open_ledger(node: NodeSettings) -> Ledger:
    return Ledger.open(node.ledger_path, node=node.hospital, budget=node.budget, delta=node.delta,
                       marker=node.ledger_marker)


def check_catalogue(node: NodeSettings, groups: tuple[str, ...]) -> None:
    """Refuse a run whose group list differs from the node's own catalogue copy (if it has one)."""
    if node.groups_file is None:
        return
    own = load_catalogue(node.groups_file)
    if own.groups != tuple(groups):
        raise ValueError(f"the run's group catalogue ({','.join(groups)[:200]}) differs from this node's "
                         f"groups-file {node.groups_file} ({','.join(own.groups)[:200]})")


def series_for(node: NodeSettings, run: RunSettings) -> pd.DataFrame:
    """The node's demand series over the public span [start, cutoff), one column per catalogue group."""
    return _series_cached(*_series_key(node, run)).copy()


def examples_for(node: NodeSettings, run: RunSettings) -> Examples:
    """The run's training examples from the node's series (the same every round: built once per
    process, and handed out as copies so one round cannot alter the next one's inputs)."""
    ex = _examples_cached(_series_key(node, run), run.lags, run.horizon, run.window_stride, run.release_blocks)
    return Examples(ex.x_log.copy(), ex.group.copy(), ex.season.copy(), ex.y_log.copy())


def _series_key(node: NodeSettings, run: RunSettings) -> tuple:
    """What the series depends on; the file's mtime and size make an edited file a cache miss."""
    groups = run.group_list
    check_catalogue(node, groups)
    stat = os.stat(node.data_path)
    return (str(node.data_path), stat.st_mtime_ns, stat.st_size, run.start, run.cutoff, run.period,
            run.measure, run.los_cap, groups, str(node.log_path or ""))


@lru_cache(maxsize=NODES_PER_PROCESS)
def _examples_cached(series_key: tuple, lags: int, horizon: int, stride: int | None, blocks: int) -> Examples:
    return training_examples(_series_cached(*series_key), lags, horizon, stride, blocks=blocks)


@lru_cache(maxsize=NODES_PER_PROCESS)
def _series_cached(path: str, mtime: int, size: int, start: str, end: str, period: str, measure: str, los_cap: float,
                   groups: tuple[str, ...] = DRG_GROUPS, log_path: str = "") -> pd.DataFrame:
    records = load_records(path)
    note_outside_catalogue(records, groups, Path(log_path) if log_path else None)
    return demand_series(records, start=start, end=end, period=period, measure=measure, los_cap=los_cap, groups=groups)


def note_outside_catalogue(records: pd.DataFrame, groups: tuple[str, ...], log_path: Path | None) -> int:
    """Count the records whose group is outside the run's catalogue and say so in the node's own
    log (never sent): dropping them is fine privacy-wise, dropping them silently is not."""
    outside = records["drg_group"][~records["drg_group"].isin(groups)]
    if len(outside) and log_path is not None:
        from client.app import _log_to  # the node log's file handler lives with the ClientApp

        counts = outside.value_counts()
        listed = ", ".join(f"{g!r}: {n}" for g, n in counts.head(20).items()) + (" …" if len(counts) > 20 else "")
        _log_to(log_path)
        log.warning("%d record(s) in %d group(s) outside the run's catalogue are dropped from the demand series "
                    "(no training, no D_i): %s", len(outside), len(counts), listed, extra={"log_path": str(log_path)})
    return int(len(outside))


def _flwr_run_simulation_node(pid: int, run_config: dict[str, Any], run_id: str) -> dict[str, Any]:
    """Files of virtual node `pid` under `flwr run .` in simulation (no --node-config).

    Synthetic hospital `pid` depends only on (seed, pid), so each virtual node writes just its
    own file and nodes never race. Synthetic records get per-run ledgers; files from
    `sim-data-dir` get one lifetime ledger each in `sim-data-dir/ledgers/`.
    """
    from core.synthetic import SyntheticConfig, generate_hospital_records, hospital_name, write_records

    name = hospital_name(pid)
    data_dir = Path(str(run_config.get("sim-data-dir") or "")).expanduser()
    if not str(run_config.get("sim-data-dir") or ""):
        seed = int(run_config.get("seed", 0))
        # Synthetic hospitals treat the run's catalogue groups (a custom catalogue gets its own cache).
        cat = catalogue_for(str(run_config.get("groups-file") or ""), str(run_config.get("groups") or ""))
        suffix = "" if cat.groups == DRG_GROUPS else f"-groups{cat.fingerprint}"
        data_dir = Path.home() / ".cache" / "fedalloc" / f"synthetic-seed{seed}{suffix}"
        path = data_dir / f"{name}.csv"
        if not path.exists():
            data_dir.mkdir(parents=True, exist_ok=True)
            tmp = data_dir / f".{name}.{os.getpid()}.csv"
            write_records(generate_hospital_records(SyntheticConfig(seed=seed, groups=cat.groups), pid), tmp)
            os.replace(tmp, path)
    if str(run_config.get("sim-data-dir") or ""):
        # Real files: one lifetime ledger per hospital file, whatever the run.
        return {"data-path": str(data_dir / f"{name}.csv"), "ledger-path": str(data_dir / "ledgers" / f"{name}.json"),
                "hospital": name}
    return {
        "data-path": str(data_dir / f"{name}.csv"),
        "ledger-path": str(data_dir / "ledgers" / f"run-{run_id}" / f"{name}.json"),
        "hospital": name,
        "synthetic": True,
    }
