"""The run configuration: one source of defaults, split by who owns each key.

DEFAULTS is the only place a default is written; pyproject's [tool.flwr.app.config] must equal it
(`flwr run` reads that table; tests/test_config.py keeps the two equal) and the CLI's options
default to "not given". The keys fall in two groups:

- the **public training plan** (`PLAN_KEYS`): what a node's noise pays for; sent to every node in
  each message's ConfigRecord (`RunSettings.node_config()`), recorded in its ledger's run plan;
- the **coordinator's settings** (`COORDINATOR_KEYS`): strategy, allocation policy and total,
  resources file, output folder, timeouts, pretraining; never sent to nodes.

A node's own settings (records and ledger paths, lifetime budget, limits) are not run config at
all: they are its node config (`client/node.py` NodeSettings). Nothing here is private.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping

from core.drg import Catalogue, catalogue_for

PERIODS = ("week", "day")
MEASURES = ("admissions", "bed_days")
STRATEGIES = ("fedavg", "fedtrimmedavg", "krum")
MAX_ROUNDS = 1000
MAX_WEIGHT_BOUND = 1e4
# allocate-on: the mean D_i or a released bound (q10 = demand-lo, q90 = demand-hi).
ALLOCATE_ON = ("mean", "q10", "q90")
# The forecaster family (forecasting/model.py): "seasonal" is linear in the window (unbiased under
# release noise; the default), "loglinear" shrinks in log space (epidemic counts; benchmarks/FORECASTER.md).
MODELS = ("seasonal", "loglinear")

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 5,
    "local-epochs": 2,
    "batch-size": 16,
    # Fine-tuning step of the pretrained forecaster; 0.2 (the old MLP's) undoes the pretraining
    # under DP noise (benchmarks/FORECASTER.md).
    "lr": 0.01,
    "clip-norm": 1.0,
    # Largest |parameter| a node accepts in a global model (public, part of the run plan).
    "weight-bound": 100.0,
    "epsilon": 3.0,
    "release-share": 0.15,
    # A year of 4-week block sums: the same weeks last year are in the input, and one Gaussian
    # release on 13 disjoint blocks costs what 2 did (forecasting/features.py).
    "release-blocks": 13,
    "lags": 52,
    "horizon": 4,
    "stride": 0,
    "period": "week",
    "measure": "admissions",
    "los-cap": 30.0,
    "start": "2023-01-02",
    "cutoff": "2025-12-01",
    "strategy": "fedavg",
    "trim-beta": 0.2,
    "krum-byzantine": 1,
    "min-nodes": 2,
    "fraction-train": 1.0,
    "total": 1000.0,
    "policy": "seed",
    # What `policy` allocates on: the mean D_i, or a bound of its released 80 % interval
    # (q10 = lo, q90 = hi; forecasting/intervals.py). Fairness is still measured against the mean.
    "allocate-on": "mean",
    "integer": False,
    "resources-file": "",
    "results-dir": "results",
    "run-name": "",
    "seed": 0,
    # Public synthetic hospitals the first global model is pretrained on (forecasting/pretrain.py);
    # 0 starts from the data-free initialisation.
    "pretrain-hospitals": 20,
    "round-timeout": 600.0,
    # Simulation only (`flwr run .` without per-node --node-config): where virtual node i finds
    # hospital_{i:03d}.csv; empty means "generate synthetic hospital i on the fly".
    "sim-data-dir": "",
    # The public group catalogue, a CSV of `group,weight` (core/drg.py); empty = the built-in 12.
    "groups-file": "",
    # The catalogue's group codes in order, comma-separated: filled in from groups-file by the
    # coordinator and sent to nodes (series columns, model rows, reply keys); set by hand it must
    # match groups-file. Empty = the built-in 12.
    "groups": "",
    "model": "seasonal",
}


# What a node's noise pays for; a run's later requests must match the plan recorded at its first.
PLAN_KEYS: tuple[str, ...] = (
    "num-server-rounds", "local-epochs", "batch-size", "lr", "clip-norm", "weight-bound", "epsilon", "release-share",
    "release-blocks", "lags", "horizon", "stride", "period", "measure", "los-cap", "start", "cutoff", "groups",
    "model")
# Coordinator-only: never sent to a node (a node needs none of them, and paths stay local).
COORDINATOR_KEYS: tuple[str, ...] = (
    "strategy", "trim-beta", "krum-byzantine", "min-nodes", "fraction-train", "total", "policy", "allocate-on",
    "integer", "resources-file", "results-dir", "seed", "pretrain-hospitals", "round-timeout", "sim-data-dir", "groups-file")


@dataclass(frozen=True)
class RunSettings:
    num_server_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    clip_norm: float
    weight_bound: float
    epsilon: float
    release_share: float
    release_blocks: int
    lags: int
    horizon: int
    stride: int
    period: str
    measure: str
    los_cap: float
    start: str
    cutoff: str
    strategy: str
    trim_beta: float
    krum_byzantine: int
    min_nodes: int
    fraction_train: float
    total: float
    policy: str
    allocate_on: str
    integer: bool
    resources_file: str
    results_dir: str
    run_name: str
    seed: int
    pretrain_hospitals: int
    round_timeout: float
    sim_data_dir: str
    groups_file: str
    groups: str
    model: str

    @classmethod
    def from_mapping(cls, *layers: Mapping[str, Any]) -> "RunSettings":
        """Merge DEFAULTS with `layers` (later wins); unknown keys are an error, not ignored."""
        merged = dict(DEFAULTS)
        for layer in layers:
            for key, value in layer.items():
                if key not in DEFAULTS:
                    if key == "server-round" or key.startswith("round-offset"):
                        continue
                    raise ValueError(f"unknown run-config key {key!r}; known: {', '.join(DEFAULTS)}")
                merged[key] = value
        if merged["groups-file"] and not merged["groups"]:
            # Nodes never see the coordinator's path, only the list (docs/DESIGN.md "Group catalogue").
            try:
                merged["groups"] = ",".join(catalogue_for(str(merged["groups-file"])).groups)
            except ValueError as exc:
                raise ValueError(f"run-config groups-file/groups: {exc}") from None
        kwargs = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            default = DEFAULTS[key]
            value = merged[key]
            kwargs[f.name] = _coerce(key, value, type(default))
        settings = cls(**kwargs)
        settings.check()
        return settings

    def as_config(self) -> dict[str, Any]:
        """Every key (the coordinator's own record of the run, metrics.json)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    def node_config(self) -> dict[str, Any]:
        """What crosses the wire to nodes: everything but the coordinator's own settings."""
        return {k: v for k, v in self.as_config().items() if k not in COORDINATOR_KEYS}

    def plan(self) -> dict[str, Any]:
        """The public training plan a node records and holds later requests to."""
        cfg = self.as_config()
        return {k: cfg[k] for k in PLAN_KEYS}

    @property
    def window_stride(self) -> int:
        return self.stride or (self.lags + self.horizon)

    @property
    def catalogue(self) -> Catalogue:
        """The run's public group catalogue (groups-file, else the groups list, else the built-in 12)."""
        return catalogue_for(self.groups_file, self.groups)

    @property
    def group_list(self) -> tuple[str, ...]:
        """The catalogue's groups in order: series columns, model rows, `demand-<group>` keys."""
        return self.catalogue.groups

    def check(self) -> None:
        """Every value checked before anything is sent or spent: one line naming key and allowed values."""
        from core.allocation import POLICIES
        from core.series import n_windows, period_grid

        try:
            self.catalogue  # noqa: B018  (loads and checks groups-file / groups)
        except ValueError as exc:
            raise ValueError(f"run-config groups-file/groups: {exc}") from None
        _one_of("period", self.period, PERIODS)
        _one_of("measure", self.measure, MEASURES)
        _one_of("strategy", self.strategy, STRATEGIES)
        _one_of("policy", self.policy, POLICIES)
        _one_of("allocate-on", self.allocate_on, ALLOCATE_ON)
        _one_of("model", self.model, MODELS)
        if self.allocate_on != "mean" and self.policy == "drg_budget":
            raise ValueError("run-config allocate-on must be 'mean' for policy drg_budget (it pays group demand)")
        if self.pretrain_hospitals < 0:
            raise ValueError(f"run-config pretrain-hospitals must be ≥ 0, got {self.pretrain_hospitals}")
        for name in ("num_server_rounds", "local_epochs", "batch_size", "lags", "horizon", "min_nodes"):
            if getattr(self, name) < 1:
                raise ValueError(f"run-config {name.replace('_', '-')} must be ≥ 1, got {getattr(self, name)}")
        if self.num_server_rounds > MAX_ROUNDS:
            raise ValueError(f"run-config num-server-rounds must be ≤ {MAX_ROUNDS}, got {self.num_server_rounds}")
        for name in ("lr", "clip_norm", "los_cap", "round_timeout", "total"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"run-config {name.replace('_', '-')} must be a positive finite number, got {value}")
        if not 0 < self.weight_bound <= MAX_WEIGHT_BOUND:
            raise ValueError(f"run-config weight-bound must be in (0, {MAX_WEIGHT_BOUND:g}], got {self.weight_bound}")
        if not (math.isfinite(self.epsilon) and self.epsilon > 0):
            raise ValueError(f"run-config epsilon must be a positive finite number, got {self.epsilon}")
        if not 0 < self.fraction_train <= 1:
            raise ValueError(f"run-config fraction-train must be in (0, 1], got {self.fraction_train}")
        if not 0 <= self.trim_beta < 0.5:
            raise ValueError(f"run-config trim-beta must be in [0, 0.5), got {self.trim_beta}")
        if self.krum_byzantine < 0:
            raise ValueError(f"run-config krum-byzantine must be ≥ 0, got {self.krum_byzantine}")
        if self.stride and self.stride < self.lags + self.horizon:
            # Overlapping windows put one record in several examples; the ledger charges DP-SGD
            # per example, so the per-record ε would be under-reported (docs/DESIGN.md "Privacy unit").
            raise ValueError(
                f"run-config stride {self.stride} < lags+horizon = {self.lags + self.horizon}: overlapping windows "
                "need group-privacy accounting, which fedalloc does not do; use disjoint windows (stride 0)")
        if self.release_blocks < 1 or self.lags % self.release_blocks:
            raise ValueError(f"run-config release-blocks must divide lags={self.lags}, got {self.release_blocks}")
        if not 0 < self.release_share < 1:
            raise ValueError(f"run-config release-share must be in (0, 1), got {self.release_share}")
        try:
            grid = period_grid(self.start, self.cutoff, self.period)
        except ValueError as exc:
            raise ValueError(f"run-config start/cutoff: {exc}") from None
        if n_windows(len(grid), self.lags, self.horizon, self.stride or None) < 1:
            raise ValueError(f"run-config start..cutoff holds {len(grid)} {self.period}s, fewer than "
                             f"lags+horizon = {self.lags + self.horizon}: no training window fits")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"run-config {key} {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run-config {key}: cannot read {value!r} as {kind.__name__}") from exc


@dataclass(frozen=True)
class StepPlan:
    """What Opacus does for N examples: Poisson rate q = 1/#batches, #batches steps per epoch."""

    sample_rate: float
    steps: int


def plan_steps(n_examples: int, batch_size: int, epochs: int) -> StepPlan:
    batches = max(math.ceil(n_examples / batch_size), 1)
    return StepPlan(sample_rate=1.0 / batches, steps=batches * epochs)


def public_examples(run: RunSettings, n_groups: int) -> int:
    """Training examples of every node: windows of the public date grid × groups (no data)."""
    from core.series import n_windows, period_grid

    return n_windows(len(period_grid(run.start, run.cutoff, run.period)), run.lags, run.horizon, run.stride or None) * n_groups
