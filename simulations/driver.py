"""Local federations for researchers: synthetic or user-supplied node files, Ray or in-process.

Each virtual node gets its own records file and its own ledger under `<run>/nodes/`, exactly as a
hospital would configure a SuperNode. After the run the driver, which as the researcher owns every
node's records, writes forecasts.csv: each hospital's released D_i beside the true demand of the
forecast horizon.
"""

from __future__ import annotations

import functools
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
from core.synthetic import SyntheticConfig, generate, hospital_name

RECORD_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
ENGINES = ("ray", "inprocess")
SECAGG_MIN_NODES = 3
NOT_RECORDS = {"hospitals", "resources"}


@dataclass
class SimNodes:
    node_configs: list[dict[str, Any]]
    resources_file: str
    # hospital -> true demand over the horizon, when prepare_nodes already had the records in hand
    truth: dict[str, float] | None = None


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


def check_records(files: list[Path], on_loaded: Callable[[Path, pd.DataFrame], None] | None = None) -> None:
    """The researcher owns every file here, so report all problems before any node starts.

    `on_loaded(file, records)` sees each valid file's typed records: whatever the driver needs from
    them later (the true demand) is taken now instead of parsing every file again after the run.
    """
    from core.records import RecordsError

    problems: list[str] = []
    for f in files:
        try:
            records = load_records(f)
        except RecordsError as exc:
            problems.append(str(exc))
            continue
        if on_loaded is not None:
            on_loaded(f, records)
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


# Below this many synthetic hospitals, starting generator processes (~1 s CPU each: pandas and
# pyarrow imports) costs more than generating in this process saves.
PARALLEL_GENERATION_MIN = 50


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
    groups: tuple[str, ...] = DRG_GROUPS,
    truth_run: RunSettings | None = None,
    workers: int = 1,
) -> SimNodes:
    """Node configs: synthetic hospitals get per-run ledgers, real files their lifetime ledger.

    Generated hospitals treat the run's catalogue `groups` (the generator's public rule for a
    group it has no profile for: a flat season, average stay).

    With `truth_run`, the true demand of each hospital is taken from the records in hand when the
    generator writes them or the check pass loads them (`SimNodes.truth`), so no file is parsed
    again after the run. `workers=N > 1` generates the hospitals (and their truth) in N processes."""
    nodes_dir = run_path / "nodes"
    synthetic = data_dir is None or synthetic_data
    truth: dict[str, float] | None = None
    if data_dir is None:
        data_dir = nodes_dir
        found: dict[int, float] = {}
        table = generate(SyntheticConfig(hospitals=hospitals, seed=seed, groups=tuple(groups)), data_dir,
                         workers=workers, on_summary=found.__setitem__,
                         summarise=None if truth_run is None else functools.partial(_generated_truth, truth_run))
        if truth_run is not None:
            truth = {hospital_name(i): value for i, value in found.items()}
        resources = data_dir / "hospitals.csv"
        files = [data_dir / f"{h}.csv" for h in table.hospital]
    else:
        files = record_files(Path(data_dir))
        if truth_run is not None:
            truth = {}
            check_records(files, lambda f, records: truth.__setitem__(_stem(f), horizon_demand(records, truth_run)))
        else:
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
    return SimNodes(configs, str(Path(resources).resolve()) if resources else "", truth)


def _generated_truth(run: RunSettings, _index: int, records: pd.DataFrame) -> float:
    # Module level, so a generator worker process can run it next to the records it just wrote.
    return horizon_demand(_typed_truth_columns(records, run), run)


def check_federation_size(n_nodes: int, run: RunSettings, secagg: bool = False) -> None:
    """A federation that can never assemble fails now, not after the round timeout."""
    if n_nodes < run.min_nodes:
        raise ValueError(f"{n_nodes} hospital(s) but run-config min-nodes is {run.min_nodes}; "
                         f"use at least {run.min_nodes} hospitals or lower min-nodes")
    if secagg and n_nodes < SECAGG_MIN_NODES:
        raise ValueError(f"secure aggregation needs at least {SECAGG_MIN_NODES} hospitals, got {n_nodes}")


def horizon_demand(records: pd.DataFrame, run: RunSettings) -> float:
    """Total demand of typed `records` over the run's horizon after the cutoff."""
    series = demand_series(records, start=run.cutoff, end=_horizon_end(run.cutoff, run.period, run.horizon),
                           period=run.period, measure=run.measure, los_cap=run.los_cap, groups=run.group_list)
    return float(series.to_numpy().sum())


@functools.lru_cache(maxsize=64)
def _horizon_end(cutoff: str, period: str, horizon: int) -> pd.Timestamp:
    # The open-ended public grid is built once per run (≈ 0.2 s each), not once per hospital.
    return period_grid(cutoff, "2200-01-01", period)[horizon]


def true_demand(node_configs: list[Mapping[str, Any]], run: RunSettings,
                known: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Researcher-side truth: each hospital's demand over the horizon after the cutoff.

    Hospitals in `known` (taken when the driver last had their records in hand) are not read
    again; the others are read with `_truth_records`.
    """
    rows = []
    for cfg in node_configs:
        value = (known or {}).get(cfg["hospital"])
        if value is None:
            value = horizon_demand(_truth_records(Path(cfg["data-path"])), run)
        rows.append({"hospital": cfg["hospital"], "true_demand": float(value)})
    return pd.DataFrame(rows)


_TRUTH_COLUMNS = frozenset({"admit_date", "drg_group", "length_of_stay"})


def _typed_truth_columns(records: pd.DataFrame, run: RunSettings) -> pd.DataFrame:
    """Generated records of the horizon, typed as `load_records` types the file they were written to.

    The generator's dates are datetime64 days, so rows outside [cutoff, end of horizon) can be
    dropped before typing (they would fall outside the truth's grid anyway)."""
    from core.records import to_typed

    day = pd.to_datetime(records["admit_date"]).dt.normalize()
    # A superset of the horizon's rows (the grid starts at the cutoff rounded up to a period start).
    rows = ((day >= pd.Timestamp(run.cutoff)) & (day < _horizon_end(run.cutoff, run.period, run.horizon))).to_numpy()
    return to_typed(records.loc[rows, [c for c in records.columns if c in _TRUTH_COLUMNS]])


def _truth_records(path: Path) -> pd.DataFrame:
    """The typed columns the truth needs, from a file that was validated (or generated) before.

    Validation (`load_records`) is most of the cost of reading a file and was done before the
    run, so a CSV is read here with the same pandas options as `core.records` but only the three
    columns the series uses, and typed by the same `to_typed`. Anything unusual (Parquet, a read
    error) takes the full `load_records` path.
    """
    import warnings

    from core.records import to_typed

    if not path.name.lower().endswith((".csv", ".csv.gz")):
        return load_records(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", pd.errors.ParserWarning)
            raw = pd.read_csv(path, dtype=str, index_col=False, encoding="utf-8-sig",
                              usecols=lambda c: str(c).strip() in _TRUTH_COLUMNS)
        raw.columns = [str(c).strip() for c in raw.columns]
        if raw.columns.duplicated().any() or not {"admit_date", "drg_group"} <= set(raw.columns):
            return load_records(path)
        return to_typed(raw)
    except (OSError, ValueError, pd.errors.ParserError):
        return load_records(path)


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
    workers: int = 1,
) -> tuple[str, Path, dict[str, Any]]:
    """Refuse, with one line naming the setting, a request that cannot succeed — before any node
    file is written or any ε spent. Returns the run name, its folder and its run config.

    `workers=N > 1` (engine inprocess only) runs the nodes in N worker processes (simulations/inprocess.py)."""
    if engine not in ENGINES:
        raise ValueError(f"engine {engine!r} is not allowed; choose one of {', '.join(ENGINES)}")
    if workers != 1 and engine != "inprocess":
        raise ValueError(f"--workers needs --engine inprocess (got --engine {engine})")
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
    workers: int = 1,
) -> Any:
    """Run one federation end to end and return the coordinator's RunOutcome.

    `synthetic_data=True` marks a `data_dir` of generated hospitals (sweeps): its nodes get
    per-run ledgers under `<run>/nodes/ledgers/` instead of lifetime ones in `data_dir/ledgers/`.

    `secagg=True` trains under Flower's SecAgg+ workflow (server/secagg.py): the coordinator only
    sees masked updates and their sum; the nodes' DP-SGD and ledgers are unchanged.

    `resume=True` continues the named run from its coordinator checkpoint: the nodes keep their
    files and ledgers under `<run>/nodes/` (and, in process, the same run id), so their σ plan and
    ε accounting carry on where the crashed coordinator left them.

    `ray_address="HOST:PORT"` (engine ray only) runs on an existing Ray cluster (README, "Ray cluster").
    """
    name, run_path, settings = check_request(
        hospitals=hospitals, rounds=rounds, epsilon=epsilon, data_dir=data_dir, engine=engine,
        results_dir=results_dir, run_name=run_name, seed=seed, overrides=overrides, resume=resume, secagg=secagg,
        ray_address=ray_address, workers=workers)

    from client.app import make_app as make_client_app

    _quiet_logs()
    synthetic, first = data_dir is None or synthetic_data, RunSettings.from_mapping(settings)
    # The researcher operates every node here, so the nodes' own limits are this request.
    nodes = prepare_nodes(run_path, hospitals=hospitals, seed=seed, budget=(budget or epsilon) if synthetic else budget,
                          data_dir=data_dir, resources=resources, synthetic_data=synthetic_data,
                          limits={"max-epsilon-per-run": epsilon, "max-rounds-per-run": rounds},
                          groups=first.group_list, truth_run=first, workers=workers if hospitals >= PARALLEL_GENERATION_MIN else 1)
    settings["resources-file"] = nodes.resources_file
    workflow = None
    if secagg:
        settings, workflow, make_client_app = _secagg(settings)
    run = RunSettings.from_mapping(settings)
    outcome = _run_engine(engine, nodes.node_configs, settings, run, workflow, client_app, make_client_app,
                          on_round=on_round, drop=drop, resume=resume, secure=secagg, ray_address=ray_address, workers=workers)
    if outcome.allocations is not None:
        write_forecasts(outcome, true_demand(nodes.node_configs, run, known=nodes.truth), run)
    return outcome


def write_forecasts(outcome: Any, truth: pd.DataFrame, run: RunSettings) -> None:
    """forecasts.csv: released D_i (and its interval) beside the true demand of the horizon, and
    the allocation change the released D_i caused (simulation only: the truth is known here)."""
    bounds = [c for c in ("demand_lo", "demand_hi") if c in outcome.allocations.columns]
    fc = outcome.allocations[["hospital", "demand", *bounds]].rename(columns={"demand": "released_demand"})
    fc = fc.merge(truth, on="hospital", how="left")
    fc["abs_error"] = np.abs(fc.released_demand - fc.true_demand)
    fc = pd.concat([fc, noise_change(outcome.allocations, fc, run)], axis=1)
    fc.to_csv(outcome.path / "forecasts.csv", index=False)


def _secagg(settings: dict[str, Any]) -> tuple[dict[str, Any], Any, Callable[..., Any]]:
    """(run config without the SecAgg+ keys, the SecAgg+ workflow, the SecAgg+ ClientApp factory)."""
    from client.secagg import make_secagg_app
    from server.secagg import SecAggSettings, SecAggWorkflow

    sa, rest = SecAggSettings.split(settings)
    return rest, SecAggWorkflow(sa), make_secagg_app


def _run_engine(engine: str, node_configs: list[dict[str, Any]], settings: dict[str, Any], run: RunSettings,
                workflow: Any, client_app: Any, make_client_app: Callable[..., Any], *, on_round: Any, drop: Any,
                resume: bool, secure: bool, ray_address: str | None, workers: int = 1) -> Any:
    """The coordinator's RunOutcome of one federation on `engine` (in-process Grid or Flower's Ray
    simulation engine); `client_app` if given, else `make_client_app(sim node configs)`."""
    from server.app import make_app as make_server_app
    from server.runner import run_federation

    if engine == "inprocess":
        from simulations.inprocess import InProcessGrid

        # Worker processes build their own ClientApp from the (importable) factory; the pool stops
        # with the run, on errors and on Ctrl-C/SIGTERM.
        with InProcessGrid(client_app or make_client_app(), node_configs, drop=drop, workers=workers,
                           app_factory=None if client_app else make_client_app) as grid:
            return run_federation(grid, run, workflow, on_round=on_round, resume=resume)
    from simulations.ray_local import run_ray_simulation  # loopback-only Ray, Ctrl-C stops it

    results: list[Any] = []
    run_ray_simulation(
        server_app=make_server_app(settings, on_round=on_round, on_finish=results.append, resume=resume, secure=secure),
        client_app=client_app or make_client_app(dict(enumerate(node_configs))),
        num_supernodes=len(node_configs),
        address=ray_address,
    )
    if not results:
        raise RuntimeError("the simulation ended without a result; see the log above")
    return results[0]


def noise_change(alloc: pd.DataFrame, fc: pd.DataFrame, run: RunSettings) -> pd.DataFrame:
    """alloc_true (the run's policy on the true D_i) and alloc_change = allocation − alloc_true: the
    units DP noise and forecast error move per hospital (issue #12; core.fairness.allocation_change
    sorts and flags the smallest). Empty for policies that need per-group or quantile input."""
    from core.allocation import allocate_array

    if (run.policy not in ("seed", "proportional", "need_gap") or run.allocate_on != "mean"
            or fc.true_demand.isna().any()):
        return pd.DataFrame(index=fc.index)
    a_true = allocate_array(fc.true_demand.to_numpy(), alloc.resources.to_numpy(), run.total, run.policy,
                            integer=run.integer)
    a = alloc.allocation.to_numpy()
    return pd.DataFrame({"alloc_true": a_true, "alloc_change": a - a_true}, index=fc.index)
