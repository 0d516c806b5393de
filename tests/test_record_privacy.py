"""The privacy unit, checked on hand-built neighbouring record sets (D, D + one record).

These tests justify the accounting: one added record never adds or removes a training example
(so DP-SGD is replace-one, tests/test_accountant.py), it changes exactly one example in one cell
by at most the cell sensitivity, and it moves one block sum of the D_i release by at most the
same amount. And the noise that hides it cannot be guessed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.drg import DRG_GROUPS
from core.run_config import RunSettings
from core.series import cell_sensitivity, demand_series, make_windows

CASES = [
    ("admissions", "week", {}),
    ("bed_days", "week", {}),
    ("admissions", "day", {"start": "2025-08-01", "cutoff": "2025-12-01", "lags": 14, "horizon": 7,
                           "release-blocks": 2}),
    ("bed_days", "day", {"start": "2025-08-01", "cutoff": "2025-12-01", "lags": 14, "horizon": 7,
                         "release-blocks": 2}),
]


def base_records(run: RunSettings, n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    days = (pd.Timestamp(run.cutoff) - pd.Timestamp(run.start)).days
    return pd.DataFrame({
        "admit_date": (pd.Timestamp(run.start) + pd.to_timedelta(rng.integers(0, days, n), "D")).astype("datetime64[ns]"),
        "drg_group": rng.choice(DRG_GROUPS, n),
        "length_of_stay": rng.integers(0, 60, n).astype(float),
    })


def neighbour_records(run: RunSettings, seed: int) -> list[pd.DataFrame]:
    """Single records r anywhere in the span: any group, LOS 0, large, or missing."""
    rng = np.random.default_rng(100 + seed)
    days = (pd.Timestamp(run.cutoff) - pd.Timestamp(run.start)).days
    out = []
    for los in (0.0, 3.0, 500.0, np.nan):
        out.append(pd.DataFrame({
            "admit_date": [pd.Timestamp(run.start) + pd.Timedelta(days=int(rng.integers(0, days)))],
            "drg_group": [str(rng.choice(DRG_GROUPS))], "length_of_stay": [los]}).astype({"admit_date": "datetime64[ns]"}))
    return out


def windows(records: pd.DataFrame, run: RunSettings) -> tuple[np.ndarray, np.ndarray]:
    series = demand_series(records, start=run.start, end=run.cutoff, period=run.period, measure=run.measure,
                           los_cap=run.los_cap, groups=DRG_GROUPS)
    x, y, _ = make_windows(series.to_numpy(), run.lags, run.horizon, run.window_stride)
    return np.concatenate([x, y], axis=1), series.to_numpy()[-run.lags:]


@pytest.mark.parametrize("measure,period,extra", CASES)
def test_one_record_changes_exactly_one_example_in_one_cell(measure, period, extra):
    run = RunSettings.from_mapping({"measure": measure, "period": period, **extra})
    sens = cell_sensitivity(measure, run.los_cap)
    d = base_records(run)
    ex_d, window_d = windows(d, run)
    changed_examples = 0
    for seed in range(3):
        for r in neighbour_records(run, seed):
            ex_r, window_r = windows(pd.concat([d, r], ignore_index=True), run)
            assert ex_r.shape == ex_d.shape  # the example count is public: no example added or removed
            diff = ex_r - ex_d
            rows = np.flatnonzero(np.abs(diff).sum(axis=1))
            assert len(rows) <= 1  # one example changes (or none, if r falls outside every window)
            if len(rows):
                changed_examples += 1
                cells = np.flatnonzero(diff[rows[0]])
                assert len(cells) == 1 and 0 < diff[rows[0], cells[0]] <= sens
            # the D_i release: one block sum of the latest window moves by ≤ the sensitivity
            blocks = lambda w: w.reshape(run.release_blocks, -1, w.shape[1]).sum(axis=1)  # noqa: E731
            moved = blocks(window_r) - blocks(window_d)
            assert np.count_nonzero(moved) <= 1 and np.abs(moved).sum() <= sens
    assert changed_examples > 0  # the pairs did exercise the training examples


def test_dp_sgd_noise_and_sampling_come_from_64_bit_os_entropy(monkeypatch):
    """Fails if the noise generator is seeded with fewer than 64 bits (e.g. randbits(31))."""
    import secrets

    import torch
    from opacus import PrivacyEngine

    from client import dp_training
    from forecasting.features import Examples
    from forecasting.model import build_model

    asked: list[int] = []
    real_randbits = secrets.randbits

    def spy_randbits(k: int) -> int:
        asked.append(k)
        return real_randbits(k)

    noise_seeds: list[int] = []
    real_make_private = PrivacyEngine.make_private

    def spy_make_private(self, **kw):  # type: ignore[no-untyped-def]
        gen = kw["noise_generator"]
        assert isinstance(gen, torch.Generator)
        noise_seeds.append(gen.initial_seed())
        return real_make_private(self, **kw)

    monkeypatch.setattr(dp_training.secrets, "randbits", spy_randbits)
    monkeypatch.setattr(PrivacyEngine, "make_private", spy_make_private)
    rng = np.random.default_rng(0)
    ex = Examples(rng.random((20, 8), dtype=np.float32), rng.integers(0, 12, 20), rng.random((20, 2), dtype=np.float32),
                  rng.random((20, 4), dtype=np.float32))
    for _ in range(6):
        dp_training.train_dp(build_model(8, 4, 12), ex, noise_multiplier=1.0, max_grad_norm=1.0, batch_size=8,
                             epochs=1, lr=0.01)
    assert asked and min(asked) >= 64
    assert len(noise_seeds) == 6 and len(set(noise_seeds)) == 6
    # six uniform 64-bit seeds all below 2^40 has probability 2^-144; a 31-bit seed always is
    assert max(noise_seeds) >= 2**40
