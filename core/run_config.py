"""The public run configuration shared by coordinator and nodes.

These values travel from the coordinator to every node inside each message's ConfigRecord, so
nodes behave the same under `flwr run` (which reads pyproject) and under the Python simulation
driver (which does not). Nothing here is private. DEFAULTS mirrors [tool.flwr.app.config] in
pyproject.toml; a test keeps the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

DEFAULTS: dict[str, Any] = {
    "num-server-rounds": 5,
    "local-epochs": 2,
    "batch-size": 16,
    "lr": 0.2,
    "clip-norm": 1.0,
    "epsilon": 3.0,
    "release-share": 0.15,
    "release-blocks": 2,
    "lags": 8,
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
    "integer": False,
    "resources-file": "",
    "results-dir": "results",
    "run-name": "",
    "seed": 0,
    "round-timeout": 600.0,
    # Simulation only (`flwr run .` without per-node --node-config): where virtual node i finds
    # hospital_{i:03d}.csv; empty means "generate synthetic hospital i on the fly".
    "sim-data-dir": "",
}


@dataclass(frozen=True)
class RunSettings:
    num_server_rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    clip_norm: float
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
    integer: bool
    resources_file: str
    results_dir: str
    run_name: str
    seed: int
    round_timeout: float
    sim_data_dir: str

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
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @property
    def window_stride(self) -> int:
        return self.stride or (self.lags + self.horizon)

    def check(self) -> None:
        if self.period not in ("week", "day"):
            raise ValueError(f"period must be 'week' or 'day', got {self.period!r}")
        if self.measure not in ("admissions", "bed_days"):
            raise ValueError(f"measure must be 'admissions' or 'bed_days', got {self.measure!r}")
        for name in ("num_server_rounds", "local_epochs", "batch_size", "lags", "horizon"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be ≥ 1")
        if self.stride and self.stride < self.lags + self.horizon:
            # Overlapping windows put one record in several examples; the ledger charges DP-SGD
            # per example, so the per-record ε would be under-reported (DESIGN.md "Training").
            raise ValueError(
                f"stride {self.stride} < lags+horizon = {self.lags + self.horizon}: overlapping windows "
                "need group-privacy accounting, which fedalloc does not do; use disjoint windows (stride 0)")
        if self.release_blocks < 1 or self.lags % self.release_blocks:
            raise ValueError(f"release-blocks must divide lags={self.lags}, got {self.release_blocks}")
        if not 0 < self.release_share < 1:
            raise ValueError("release-share must be in (0, 1)")
        if self.epsilon <= 0:
            raise ValueError("epsilon must be positive")


def _coerce(key: str, value: Any, kind: type) -> Any:
    try:
        if kind is bool:
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes")
            return bool(value)
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"run-config {key}: cannot read {value!r} as {kind.__name__}") from exc
