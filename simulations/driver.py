"""Local federations for researchers: synthetic or user-supplied node files, Ray or in-process.

Each virtual node gets its own records file and its own ledger under `<run>/nodes/`, exactly as a
hospital would configure a SuperNode. After the run the driver, which as the researcher owns every
node's records, writes forecasts.csv: each hospital's released D_i beside the true demand of the
forecast horizon.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from core.drg import DRG_GROUPS
from core.records import load_records
from core.run_config import RunSettings
from core.series import demand_series, period_grid
from core.synthetic import SyntheticConfig, generate

RECORD_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
ENGINES = ("ray", "inprocess")
SECAGG_MIN_NODES = 3
NOT_RECORDS = {"hospitals", "resources"}


@dataclass
class SimNodes:
    node_configs: list[dict[str, Any]]
    resources_file: str


def _quiet_logs() -> None:
    for name in ("flwr", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    from simulations.ray_local import quiet_known_noise

    quiet_known_noise()  # Flower lines known not to apply to us (deprecation notice, skipped evaluation)


def record_files(data_dir: Path) -> list[Path]:
    files = sorted(
        p for p in data_dir.iterdir()
        if p.is_file() and p.name.lower().endswith(RECORD_SUFFIXES) and _stem(p) not in NOT_RECORDS
    )
    if not files:
        raise ValueError(f"{data_dir}: no encounter-record files (*.csv, *.csv.gz, *.parquet)")
    return files


def check_records(files: list[Path]) -> None:
    """The researcher owns every file here, so report all problems before any node starts."""
    from core.records import RecordsError

    problems: list[str] = []
    for f in files:
        try:
            load_records(f)
        except RecordsError as exc:
            problems.append(str(exc))
    if problems:
        raise InvalidNodeFiles("\n".join(problems))


class InvalidNodeFiles(ValueError):
    pass


def _stem(p: Path) -> str:
    return p.name.split(".")[0]


def lifetime_ledger(data_file: Path) -> Path:
    """Where the node of a researcher's own records file keeps its one lifetime ledger.

    `simulate --data`, `sweep --data` and `query --data` all use this path, so every command
    spends the same budget for the same hospital file.
    """
    return data_file.resolve().parent / "ledgers" / f"{_stem(data_file)}.json"


def prepare_nodes(
    run_path: Path,
    *,
    hospitals: int,
    seed: int,
    budget: float | None,
    data_dir: Path | None = None,
    resources: Path | None = None,
    debug_seed: int | None = None,
    limits: Mapping[str, Any] | None = None,
    synthetic_data: bool = False,
) -> SimNodes:
    """Node configs: synthetic hospitals get per-run ledgers, real files their lifetime ledger."""
    nodes_dir = run_path / "nodes"
    synthetic = data_dir is None or synthetic_data
    if data_dir is None:
        data_dir = nodes_dir
        table = generate(SyntheticConfig(hospitals=hospitals, seed=seed), data_dir)
        resources = data_dir / "hospitals.csv"
        files = [data_dir / f"{h}.csv" for h in table.hospital]
    else:
        files = record_files(Path(data_dir))
        check_records(files)
    configs = []
    for f in files:
        ledger = (nodes_dir / "ledgers" / f"{_stem(f)}.json").resolve() if synthetic else lifetime_ledger(f)
        cfg: dict[str, Any] = {"data-path": str(f.resolve()), "ledger-path": str(ledger), "hospital": _stem(f),
                               **dict(limits or {})}
        if budget is not None:
            cfg["budget"] = float(budget)
        if synthetic:
            cfg["synthetic"] = True
        if debug_seed is not None:
            cfg["debug-seed"] = debug_seed
        configs.append(cfg)
    return SimNodes(configs, str(Path(resources).resolve()) if resources else "")


def check_federation_size(n_nodes: int, run: RunSettings, secagg: bool = False) -> None:
    """A federation that can never assemble fails now, not after the round timeout."""
    if n_nodes < run.min_nodes:
        raise ValueError(f"{n_nodes} hospital(s) but run-config min-nodes is {run.min_nodes}; "
                         f"use at least {run.min_nodes} hospitals or lower min-nodes")
    if secagg and n_nodes < SECAGG_MIN_NODES:
        raise ValueError(f"secure aggregation needs at least {SECAGG_MIN_NODES} hospitals, got {n_nodes}")


def true_demand(node_configs: list[Mapping[str, Any]], run: RunSettings) -> pd.DataFrame:
    """Researcher-side truth: each hospital's demand over the horizon after the cutoff."""
    grid = period_grid(run.cutoff, "2200-01-01", run.period)[: run.horizon + 1]
    end = grid[run.horizon]
    rows = []
    for cfg in node_configs:
        series = demand_series(load_records(cfg["data-path"]), start=run.cutoff, end=end, period=run.period,
                               measure=run.measure, los_cap=run.los_cap, groups=DRG_GROUPS)
        rows.append({"hospital": cfg["hospital"], "true_demand": float(series.to_numpy().sum())})
    return pd.DataFrame(rows)


def check_request(
    *,
    hospitals: int,
    rounds: int,
    epsilon: float,
    data_dir: Path | None,
    engine: str,
    results_dir: str,
    run_name: str | None,
    seed: int,
    overrides: Mapping[str, Any] | None,
    resume: bool,
    secagg: bool,
    ray_address: str | None = None,
) -> tuple[str, Path, dict[str, Any]]:
    """Refuse, with one line naming the setting, a request that cannot succeed — before any node
    file is written or any ε spent. Returns the run name, its folder and its run config."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not allowed; choose one of {', '.join(ENGINES)}")
    if ray_address is not None:
        if engine != "ray":
            raise ValueError(f"--ray-address needs --engine ray (got --engine {engine})")
        from simulations.ray_local import check_ray_address, probe_ray_address

        probe_ray_address(check_ray_address(ray_address))
    if resume and not run_name:
        raise ValueError("--resume needs --name of the run to continue")
    if resume and secagg:
        raise ValueError("resume is not supported with secure aggregation")
    name = run_name or datetime.now().strftime("sim-%Y%m%d-%H%M%S")
    run_path = Path(results_dir).expanduser().resolve() / name
    settings = {"num-server-rounds": rounds, "epsilon": epsilon, "results-dir": str(run_path.parent),
                "run-name": name, "seed": seed, **(overrides or {})}
    run = RunSettings.from_mapping(settings)
    n_nodes = hospitals if data_dir is None else len(record_files(Path(data_dir)))
    check_federation_size(n_nodes, run, secagg)
    if run_path.exists() and not resume:
        raise ValueError(f"run {name!r} already exists in {run_path.parent}; choose another --name or --resume it")
    if resume and not run_path.exists():
        raise ValueError(f"no run {name!r} in {run_path.parent} to resume")
    return name, run_path, settings


def simulate(
    *,
    hospitals: int = 10,
    rounds: int = 5,
    epsilon: float = 3.0,
    budget: float | None = None,
    data_dir: Path | None = None,
    resources: Path | None = None,
    engine: str = "ray",
    results_dir: str = "results",
    run_name: str | None = None,
    seed: int = 0,
    overrides: Mapping[str, Any] | None = None,
    on_round: Callable[[int, int, dict[str, Any]], None] | None = None,
    client_app: Any = None,
    drop: Callable[[int, str], bool] | None = None,
    resume: bool = False,
    secagg: bool = False,
    synthetic_data: bool = False,
    ray_address: str | None = None,
) -> Any:
    """Run one federation end to end and return the coordinator's RunOutcome.

    `synthetic_data=True` marks a `data_dir` of generated hospitals (sweeps): its nodes get
    per-run ledgers under `<run>/nodes/ledgers/` instead of lifetime ones in `data_dir/ledgers/`.

    `secagg=True` trains under Flower's SecAgg+ workflow (server/secagg.py): the coordinator only
    sees masked updates and their sum; the nodes' DP-SGD and ledgers are unchanged.

    `resume=True` continues the named run from its coordinator checkpoint: the nodes keep their
    files and ledgers under `<run>/nodes/` (and, in process, the same run id), so their σ plan and
    ε accounting carry on where the crashed coordinator left them.

    `ray_address="HOST:PORT"` (engine ray only) runs on an existing Ray cluster instead of a
    local loopback-only instance; the cluster's processes are left running (README, "Ray cluster").
    """
    name, run_path, settings = check_request(
        hospitals=hospitals, rounds=rounds, epsilon=epsilon, data_dir=data_dir, engine=engine,
        results_dir=results_dir, run_name=run_name, seed=seed, overrides=overrides, resume=resume, secagg=secagg,
        ray_address=ray_address)

    from client.app import make_app as make_client_app
    from server.app import make_app as make_server_app
    from server.runner import run_federation

    _quiet_logs()
    # The researcher operates every node here, so the nodes' own limits are this request.
    limits = {"max-epsilon-per-run": epsilon, "max-rounds-per-run": rounds}
    synthetic = data_dir is None or synthetic_data
    nodes = prepare_nodes(run_path, hospitals=hospitals, seed=seed, budget=(budget or epsilon) if synthetic else budget,
                          data_dir=data_dir, resources=resources, limits=limits, synthetic_data=synthetic_data)
    settings["resources-file"] = nodes.resources_file
    workflow = None
    if secagg:
        from client.secagg import make_secagg_app as make_client_app  # noqa: F811
        from server.secagg import SecAggSettings, SecAggWorkflow

        sa, settings = SecAggSettings.split(settings)
        workflow = SecAggWorkflow(sa)
    run = RunSettings.from_mapping(settings)

    if engine == "inprocess":
        from simulations.inprocess import InProcessGrid

        grid = InProcessGrid(client_app or make_client_app(), nodes.node_configs, drop=drop)
        outcome = run_federation(grid, run, workflow, on_round=on_round, resume=resume)
    else:
        from simulations.ray_local import run_ray_simulation  # loopback-only Ray, Ctrl-C stops it

        results: list[Any] = []
        run_ray_simulation(
            server_app=make_server_app(settings, on_round=on_round, on_finish=results.append, resume=resume,
                                       secure=secagg),
            client_app=client_app or make_client_app(dict(enumerate(nodes.node_configs))),
            num_supernodes=len(nodes.node_configs),
            address=ray_address,
        )
        if not results:
            raise RuntimeError("the simulation ended without a result; see the log above")
        outcome = results[0]
    if outcome.allocations is not None:
        truth = true_demand(nodes.node_configs, run)
        fc = outcome.allocations[["hospital", "demand"]].rename(columns={"demand": "released_demand"})
        fc = fc.merge(truth, on="hospital", how="left")
        fc["abs_error"] = np.abs(fc.released_demand - fc.true_demand)
        fc.to_csv(outcome.path / "forecasts.csv", index=False)
    return outcome
