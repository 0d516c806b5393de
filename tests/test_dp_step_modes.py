"""The fast DP-SGD step (client/dp_training.py) accounts exactly what the slow one did.

The speed-up registers a closed-form Opacus grad sampler for `LagMix` (instead of Opacus's
functorch vmap per step) and fetches batches with one index per tensor (instead of a
TensorDataset row by row). Neither may change what is clipped, what noise is added, or which
examples a step sees:

- per-sample gradients of the node's loss equal Opacus's functorch per-sample gradients ('hooks'
  mode without the registered sampler) and an independent torch.func computation, also where the
  scale clamp binds, so the per-sample clipping (and the sensitivity C) is the same;
- the optimizer clips each sample's whole gradient to C, adds N(0, (σC)²) to the sum and divides
  by the expected batch size n·q, as the accountant assumes;
- the loader draws the same batches (plain and Poisson, empty batches included) as before.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client import dp_training
from client.dp_training import LOG_BOUND, ExampleTensors, _rows_to_batch, lagmix_grad_sample
from forecasting.features import Examples
from forecasting.model import LagMix, build_model

LAGS, HORIZON, GROUPS = 8, 4, 12


def _examples(n: int, seed: int = 0) -> Examples:
    rng = np.random.default_rng(seed)
    return Examples(rng.random((n, LAGS), dtype=np.float32) * 4, rng.integers(0, GROUPS, n),
                    rng.random((n, 2), dtype=np.float32) * 2 - 1, rng.random((n, HORIZON), dtype=np.float32) * 4)


def _trained_like_model(log_scale: float = 0.3) -> nn.Module:
    """Non-trivial weights (the data-free model has zero profile and equal lag weights)."""
    model = build_model(LAGS, HORIZON, GROUPS)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        model.mix.log_scale.fill_(log_scale)
    return model


def _batch(ex: Examples) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(a) for a in (ex.x_log, ex.group, ex.season, ex.y_log))


def _opacus_grad_samples(model: nn.Module, batch, force_functorch: bool) -> dict[str, torch.Tensor]:
    """grad_sample of every parameter after one forward/backward of train_dp's loss."""
    from opacus import GradSampleModule

    dp_training._opacus_engine()  # registers the LagMix sampler (force_functorch bypasses it)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gsm = GradSampleModule(model, force_functorch=force_functorch)
        x, g, s, y = batch
        loss = nn.MSELoss()(gsm(x, g, s).clamp(-LOG_BOUND, LOG_BOUND), y)
        loss.backward()
    out = {n: p.grad_sample.detach().clone() for n, p in gsm._module.named_parameters()}
    gsm.remove_hooks()
    return out


def _reference_grad_samples(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """Independent per-example gradients: torch.func over each example's own loss (MSE over the
    horizon, which is what Opacus's 'mean' reduction makes a per-sample gradient of)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(ps, x, g, s, y):
        out = functional_call(model, ps, (x[None], g[None], s[None])).clamp(-LOG_BOUND, LOG_BOUND)
        return ((out - y[None]) ** 2).mean()

    return vmap(grad(loss), in_dims=(None, 0, 0, 0, 0))(params, *batch)


@pytest.mark.parametrize("log_scale", [0.3, 12.0])  # 12: the scale clamp (±10) binds
def test_registered_lagmix_sampler_equals_opacus_functorch_and_torch_func(log_scale):
    batch = _batch(_examples(16))
    fast = _opacus_grad_samples(_trained_like_model(log_scale), batch, force_functorch=False)
    slow = _opacus_grad_samples(_trained_like_model(log_scale), batch, force_functorch=True)
    ref = _reference_grad_samples(_trained_like_model(log_scale), batch)
    assert set(fast) == set(slow) == set(ref) == {"profile.weight", "mix.logits", "mix.log_scale"}
    for name in fast:
        assert fast[name].shape == slow[name].shape == (16, *ref[name].shape[1:])
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast[name], ref[name], rtol=1e-5, atol=1e-6)
    assert fast["mix.logits"].abs().sum() > 0  # the comparison exercised a non-zero gradient
    if log_scale > 10:
        assert torch.all(fast["mix.log_scale"] == 0)
    else:
        assert fast["mix.log_scale"].abs().sum() > 0


def test_lagmix_sampler_is_what_hooks_mode_uses():
    from opacus import GradSampleModule

    dp_training._opacus_engine()
    assert GradSampleModule.GRAD_SAMPLERS[LagMix] is lagmix_grad_sample
    assert dp_training.GRAD_SAMPLE_MODE == "hooks"


def test_dp_step_clips_per_sample_to_C_and_adds_sigma_C_noise(monkeypatch):
    """Every step of train_dp: summed_grad = Σ_i g_i·min(1, C/‖g_i‖) over the whole flat per-sample
    gradient (what Opacus clips), p.grad = (summed_grad + noise)/(n·q), noise std σ·C."""
    from opacus.optimizers import DPOptimizer

    sigma, clip, n, batch_size = 3.0, 0.05, 64, 16
    seen: list[dict] = []
    real_pre_step = DPOptimizer.pre_step

    def spy_pre_step(self, closure=None):  # type: ignore[no-untyped-def]
        gs = [p.grad_sample.detach().clone() for p in self.params]
        done = real_pre_step(self, closure)
        seen.append({"gs": gs, "summed": [p.summed_grad.detach().clone() for p in self.params],
                     "grad": [p.grad.detach().clone() for p in self.params],
                     "ebs": self.expected_batch_size, "sigma": self.noise_multiplier, "C": self.max_grad_norm})
        return done

    monkeypatch.setattr(DPOptimizer, "pre_step", spy_pre_step)
    plan = dp_training.train_dp(_trained_like_model(), _examples(n), noise_multiplier=sigma, max_grad_norm=clip,
                                batch_size=batch_size, epochs=5, lr=0.01, seed=7)
    assert len(seen) == plan.steps == 20 and plan.sample_rate == pytest.approx(batch_size / n)
    noise = []
    for step in seen:
        assert step["ebs"] == int(n * plan.sample_rate) and step["sigma"] == sigma and step["C"] == clip
        flat = torch.cat([g.reshape(len(g), -1) for g in step["gs"]], dim=1)
        factor = (clip / (flat.norm(dim=1) + 1e-6)).clamp(max=1.0)
        assert len(flat) == 0 or bool((flat.norm(dim=1) > clip).any())  # clipping was exercised
        for g, summed, grad in zip(step["gs"], step["summed"], step["grad"]):
            torch.testing.assert_close(summed, torch.einsum("i,i...", factor, g), rtol=1e-5, atol=1e-7)
            noise.append((grad * step["ebs"] - summed).reshape(-1))
    noise = torch.cat(noise)
    assert len(noise) == 20 * sum(p.numel() for p in build_model(LAGS, HORIZON, GROUPS).parameters())
    assert float(noise.std()) == pytest.approx(sigma * clip, rel=0.08)
    assert abs(float(noise.mean())) < 4 * sigma * clip / len(noise) ** 0.5


@pytest.mark.parametrize("n_batches", [2, 16])  # 16: q = 1/16 over 32 examples draws empty Poisson batches
def test_loader_draws_the_same_batches_as_a_tensor_dataset(n_batches):
    from opacus.data_loader import DPDataLoader

    tensors = _batch(_examples(32))
    bs = 32 // n_batches

    def batches(dataset, collate, poisson: bool):
        kw = {"collate_fn": collate} if collate else {}
        loader = DataLoader(dataset, batch_size=bs, shuffle=True, generator=torch.Generator().manual_seed(5), **kw)
        if poisson:
            loader = DPDataLoader.from_data_loader(loader, generator=torch.Generator().manual_seed(6))
        return [tuple(t.clone() for t in b) for _ in range(3) for b in loader]

    for poisson in (False, True):
        old = batches(TensorDataset(*tensors), None, poisson)
        new = batches(ExampleTensors(*tensors), _rows_to_batch, poisson)
        assert len(old) == len(new) > 0
        for a, b in zip(old, new):
            assert len(a) == len(b) == 4
            for ta, tb in zip(a, b):
                assert ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb)
    if n_batches == 16:
        sizes = [len(b[1]) for b in batches(ExampleTensors(*tensors), _rows_to_batch, True)]
        assert 0 in sizes  # the empty-batch path was exercised
