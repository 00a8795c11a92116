"""DDIM is Euler on the probability-flow ODE: checked against diffusers itself, not copied numbers."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

import flowdiff

T = 1000


def _model(dtype, device="cpu"):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(12, 12, generator=g, dtype=torch.float64) * 0.3).to(device, dtype)

    def model(x, t):
        scale = 1 + t.to(dtype).view(-1, *([1] * (x.ndim - 1))) / T
        return torch.tanh(x.flatten(1) @ w).view_as(x) * scale

    return model


def _scheduler(cls, spacing, steps, dtype):
    sched = cls(num_train_timesteps=T, beta_schedule="linear", clip_sample=False, set_alpha_to_one=True,
                timestep_spacing=spacing)
    sched.set_timesteps(steps)
    if dtype == torch.float64:
        sched.alphas_cumprod = sched.alphas_cumprod.double()
    return sched


def _tolerance(dtype, ref):
    return (1e-12 if dtype == torch.float64 else 2e-6) * float(ref.abs().max())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [10, 50])
def test_euler_generate_is_diffusers_ddim(dtype, spacing, steps, device):
    model = _model(dtype, device)
    sched = _scheduler(DDIMScheduler, spacing, steps, dtype)
    noise = torch.randn(2, 3, 2, 2, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    x = noise.clone()
    calls = 0
    for t in sched.timesteps:
        calls += 1
        x = sched.step(model(x, torch.full((2,), float(t), dtype=dtype, device=device)), t, x).prev_sample
    flow = flowdiff.ProbabilityFlow(model, sched.alphas_cumprod)
    res = flowdiff.generate(flow, noise, solver="euler", steps=steps, grid=spacing)
    assert res.x.dtype == dtype and res.x.device == noise.device
    assert res.stats.nfe == calls == steps
    assert (res.x - x).abs().max() <= _tolerance(dtype, x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_inverse_encode_is_diffusers_ddim_inverse(dtype, spacing, device):
    model = _model(dtype, device)
    sched = _scheduler(DDIMInverseScheduler, spacing, 10, dtype)
    images = torch.randn(2, 3, 2, 2, dtype=dtype, generator=torch.Generator().manual_seed(2)).to(device)
    z = images.clone()
    for t in sched.timesteps:
        z = sched.step(model(z, torch.full((2,), float(t), dtype=dtype, device=device)), t, z).prev_sample
    flow = flowdiff.ProbabilityFlow(model, sched.alphas_cumprod)
    enc = flowdiff.encode(flow, images, solver="ddim_inverse", steps=10, grid=spacing)
    assert enc.stats.nfe == 10
    assert (enc.x - z).abs().max() <= _tolerance(dtype, z)
    # The proper Euler encode samples ε at the current timestep instead: a different, first-order map.
    euler = flowdiff.encode(flow, images, solver="euler", steps=10, grid=spacing)
    assert (euler.x - z).abs().max() > 1e3 * _tolerance(dtype, z)
    # A ddim_inverse latent decodes with DDIM (Euler) on the same grid.
    dec = flowdiff.decode(flow, enc.latent)
    assert dec.solver == "euler" and dec.x.shape == images.shape
