"""Local federations for researchers: synthetic or user-supplied node files, Ray or in-process.

Each virtual node gets its own records file and its own ledger under `<run>/nodes/`, exactly as a
hospital would configure a SuperNode. After the run the driver, which as the researcher owns every
node's records, writes forecasts.csv: each hospital's released D_i beside the true demand of the
forecast horizon.
"""

from __future__ import annotations

import logging
import os
import shutil
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
from simulations.synthetic import SyntheticConfig, generate

RECORD_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
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


def prepare_nodes(
    run_path: Path,
    *,
    hospitals: int,
    seed: int,
    budget: float,
    data_dir: Path | None = None,
    resources: Path | None = None,
    debug_seed: int | None = None,
) -> SimNodes:
    """Node configs with one records file and one fresh ledger per hospital."""
    nodes_dir = run_path / "nodes"
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
        cfg: dict[str, Any] = {
            "data-path": str(f.resolve()),
            "ledger-path": str((nodes_dir / "ledgers" / f"{_stem(f)}.json").resolve()),
            "hospital": _stem(f),
            "budget": float(budget),
        }
        if debug_seed is not None:
            cfg["debug-seed"] = debug_seed
        configs.append(cfg)
    return SimNodes(configs, str(Path(resources).resolve()) if resources else "")


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
) -> Any:
    """Run one federation end to end and return the coordinator's RunOutcome.

    `secagg=True` trains under Flower's SecAgg+ workflow (server/secagg.py): the coordinator only
    sees masked updates and their sum; the nodes' DP-SGD and ledgers are unchanged.

    `resume=True` continues the named run from its coordinator checkpoint: the nodes keep their
    files and ledgers under `<run>/nodes/` (and, in process, the same run id), so their σ plan and
    ε accounting carry on where the crashed coordinator left them.
    """
    from client.app import make_app as make_client_app
    from server.app import make_app as make_server_app, run_federation

    _quiet_logs()
    if resume and not run_name:
        raise ValueError("resume needs the name of the run to continue")
    name = run_name or datetime.now().strftime("sim-%Y%m%d-%H%M%S")
    run_path = Path(results_dir).expanduser().resolve() / name
    if (run_path / "nodes").exists() and not resume:
        shutil.rmtree(run_path / "nodes")  # a re-used run name starts from fresh synthetic nodes
    nodes = prepare_nodes(run_path, hospitals=hospitals, seed=seed, budget=budget or epsilon,
                          data_dir=data_dir, resources=resources)
    settings = {
        "num-server-rounds": rounds,
        "epsilon": epsilon,
        "results-dir": str(run_path.parent),
        "run-name": name,
        "seed": seed,
        "resources-file": nodes.resources_file,
        **(overrides or {}),
    }
    run = RunSettings.from_mapping(settings)
    if secagg:
        if resume:
            raise ValueError("resume is not supported with secure aggregation")
        from client.secagg import make_secagg_app
        from server.secagg import make_secagg_server_app, run_secagg_federation

        make_client_app = make_secagg_app
        make_server_app = lambda settings, on_round, outcome, resume: make_secagg_server_app(  # noqa: E731
            settings, outcome, on_round)
        run_federation = lambda grid, run, on_round, resume: run_secagg_federation(  # noqa: E731
            grid, run, on_round=on_round)

    if engine == "inprocess":
        from simulations.inprocess import InProcessGrid

        grid = InProcessGrid(client_app or make_client_app(), nodes.node_configs, drop=drop)
        outcome = run_federation(grid, run, on_round=on_round, resume=resume)
    elif engine == "ray":
        from flwr.simulation import run_simulation

        results: list[Any] = []
        sim_nodes = dict(enumerate(nodes.node_configs))
        run_simulation(
            server_app=make_server_app(settings, on_round=on_round, outcome=results, resume=resume),
            client_app=client_app or make_client_app(sim_nodes),
            num_supernodes=len(nodes.node_configs),
            backend_config={"client_resources": {"num_cpus": 1}, "init_args": {"num_cpus": os.cpu_count() or 2, "logging_level": "ERROR", "log_to_driver": False}},
        )
        if not results:
            raise RuntimeError("the simulation ended without a result; see the log above")
        outcome = results[0]
    else:
        raise ValueError(f"engine must be 'ray' or 'inprocess', got {engine!r}")
    if outcome.allocations is not None:
        truth = true_demand(nodes.node_configs, run)
        fc = outcome.allocations[["hospital", "demand"]].rename(columns={"demand": "released_demand"})
        fc = fc.merge(truth, on="hospital", how="left")
        fc["abs_error"] = np.abs(fc.released_demand - fc.true_demand)
        fc.to_csv(outcome.path / "forecasts.csv", index=False)
    return outcome
