"""pyproject's [tool.flwr.app.config] and core.run_config.DEFAULTS must agree."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from core.run_config import DEFAULTS, RunSettings


def test_pyproject_run_config_matches_defaults():
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["flwr"]["app"]["config"] == DEFAULTS


def test_unknown_or_bad_keys_are_errors():
    with pytest.raises(ValueError, match="unknown run-config key"):
        RunSettings.from_mapping({"epsilonn": 3})
    with pytest.raises(ValueError, match="cannot read"):
        RunSettings.from_mapping({"lags": "many"})
    with pytest.raises(ValueError, match="period"):
        RunSettings.from_mapping({"period": "month"})
    assert RunSettings.from_mapping({"integer": "true"}).integer is True


def test_overlapping_windows_are_refused_because_epsilon_would_be_per_example():
    from core.series import window_multiplicity

    assert window_multiplicity(8, 4, 6) == 2  # one record would sit in two examples
    short = {"lags": 8, "release-blocks": 2}
    with pytest.raises(ValueError, match="group-privacy"):
        RunSettings.from_mapping({**short, "stride": 6})
    assert RunSettings.from_mapping({**short, "stride": 12}).window_stride == 12
