"""A node builds its training examples once per process; the cache must never change what it trains on."""

from __future__ import annotations

import shutil

import numpy as np

from client.node import NodeSettings, examples_for, series_for
from core.run_config import RunSettings
from forecasting.features import training_examples
from forecasting.model import build_model


def _node(path, tmp_path) -> NodeSettings:
    return NodeSettings.from_config({"data-path": str(path), "ledger-path": str(tmp_path / "l.json"), "hospital": "h"})


def _same(a, b) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("x_log", "group", "season", "y_log"))


def test_cached_examples_equal_fresh_ones_and_a_caller_cannot_alter_the_next_round(sim_data, tmp_path):
    run = RunSettings.from_mapping({})
    node = _node(sim_data / "hospital_000.csv", tmp_path)
    fresh = training_examples(series_for(node, run), run.lags, run.horizon, run.window_stride, blocks=run.release_blocks)
    first = examples_for(node, run)
    assert _same(first, fresh) and len(first) > 0
    first.x_log[:] = 99.0  # a round that scribbled on its inputs
    first.y_log[:] = -1.0
    assert _same(examples_for(node, run), fresh)


def test_an_edited_records_file_or_another_window_shape_is_a_cache_miss(sim_data, tmp_path):
    path = tmp_path / "h.csv"
    shutil.copy(sim_data / "hospital_000.csv", path)
    node = _node(path, tmp_path)
    run = RunSettings.from_mapping({})
    before = examples_for(node, run)
    other = RunSettings.from_mapping({"lags": 26})
    assert examples_for(node, other).x_log.shape[1] != before.x_log.shape[1]
    # Drop the newest tenth of the records: the series, and so the examples, change.
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: len(lines) * 9 // 10]))
    after = examples_for(node, run)
    fresh = training_examples(series_for(node, run), run.lags, run.horizon, run.window_stride, blocks=run.release_blocks)
    assert _same(after, fresh) and not _same(after, before)


def test_the_data_free_model_is_built_without_touching_torchs_random_state():
    import torch

    state = torch.random.get_rng_state()
    a, b = build_model(4, 4, 12, kind="loglinear"), build_model(4, 4, 12, kind="loglinear")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a.lag is not b.lag and a.lag.weight.data_ptr() != b.lag.weight.data_ptr()
    a.lag.weight.data.fill_(5.0)  # one node's copy must not leak into the next
    assert torch.equal(build_model(4, 4, 12, kind="loglinear").lag.weight, torch.full((1, 4), 0.25))
    assert type(a.lag) is torch.nn.Linear  # Opacus finds its per-sample gradient by the exact type
