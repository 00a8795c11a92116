"""``encode(..., solver="ddim_inverse")`` on VP, variance-exploding and flow-matching schedules (G1's finding).

DDIM inversion, as diffusers' DDIMInverseScheduler runs it, is the Euler step of the probability-flow ODE in
x̄ = x/α(σ), x̄_{n+1} = x̄_n + (σ_{n+1} − σ_n)·ε̂_n, with ε̂_n the model's prediction on the current sample
x_n = α(σ_n)·x̄_n at the *next* time t(σ_{n+1}); nothing in it is VP's. The model spelling (``model(x_t, t)``)
did exactly that on every schedule, while the σ-native spelling (``ProbabilityFlow.from_sigma_field``) converted the
state between the two levels with VP's factor √(1+σ_{n+1}²)/√(1+σ_n²) whatever the schedule: one closed-form Gaussian
gave two latents, 2.96 apart on VE and 0.28 on flow matching (shift 3) on their default 10-step encode grids.

The reference here is that definition written out in float64 with the Gaussian's own ε; on VP the σ-native path is
also checked against diffusers' own scheduler (the model path is, in tests/test_ddim_equivalence.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _closed_form import MEAN, SCHEDULES, VAR

import flowdiff
from flowdiff.models.analytic import Gaussian

PATHS = ("sigma_field", "model")
S_TOP = 20.0


def _flows(kind: str):
    schedule = SCHEDULES[kind]()
    gauss = Gaussian(MEAN, VAR, schedule)
    return gauss, {"sigma_field": gauss.flow(), "model": flowdiff.ProbabilityFlow(gauss, schedule)}


def _grid(n: int, start: float = 0.0) -> np.ndarray:
    """n steps between ``start`` (0, or a σ above it) and S_TOP, as a (decreasing) generation grid: encode runs it
    upward."""
    if start == 0.0:
        return np.concatenate([np.geomspace(S_TOP, 0.05, n), [0.0]])
    return np.geomspace(S_TOP, start, n + 1)


def _images(seed: int = 1) -> torch.Tensor:
    """Images in the models' data range [-1, 1]."""
    return torch.rand(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def _by_definition(gauss: Gaussian, x: torch.Tensor, grid: np.ndarray) -> torch.Tensor:
    """DDIM inversion written out: from the model's x at grid[0], each step feeds the model the sample
    x_n = α(σ_n)·x̄_n at the time of σ_{n+1} (so it reads x̄ = x_n/α(σ_{n+1})), and takes the Euler step in x̄ with
    its ε, up the (generation) ``grid`` read from its low end; the latent is x̄ at the top at DDIM's scale, x̄/√(1+σ²)."""
    alpha = gauss.schedule.alpha
    sig = [float(s) for s in grid[::-1]]
    xbar = x / alpha(sig[0])
    for s0, s1 in zip(sig[:-1], sig[1:]):
        sample = alpha(s0) * xbar
        xbar = xbar + (s1 - s0) * gauss.eps(sample / alpha(s1), s1)
    return xbar / math.sqrt(1.0 + sig[-1] ** 2)


@pytest.mark.parametrize("start", [0.0, 0.45], ids=["from_zero", "from_0.45"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_both_spellings_of_one_model_give_the_definitions_latent(kind, start):
    gauss, flows = _flows(kind)
    x = _images()
    grid = _grid(12, start)
    want = _by_definition(gauss, x, grid)
    got = {}
    for path, flow in flows.items():
        enc = flowdiff.encode(flow, x, solver="ddim_inverse", grid=grid)
        assert enc.stats.nfe == 12 and enc.latent.solver == "ddim_inverse"
        got[path] = enc.x
        assert _err(enc.x, want) <= 1e-13 * float(want.abs().max()), path
    assert _err(got["sigma_field"], got["model"]) <= 1e-13 * float(want.abs().max())


@pytest.mark.parametrize("kind", ["ve", "flow_matching"])
def test_vps_conversion_is_not_the_definition_off_vp(kind):
    """The test above tells the two apart: the old σ-native step (VP's factor on every schedule) is far off the
    definition on these schedules."""
    gauss, _ = _flows(kind)
    x = _images()
    grid = _grid(12)
    sig = [float(s) for s in grid[::-1]]
    xbar = x.clone()
    for s0, s1 in zip(sig[:-1], sig[1:]):
        xbar = xbar + (s1 - s0) * gauss.eps(xbar * math.sqrt((1 + s1 * s1) / (1 + s0 * s0)), s1)
    old = xbar / math.sqrt(1.0 + sig[-1] ** 2)
    assert _err(old, _by_definition(gauss, x, grid)) > 1e-2


@pytest.mark.parametrize("kind", SCHEDULES)
def test_the_latent_converges_to_the_exact_gaussian_latent_at_least_at_first_order(kind):
    """Both spellings approach the ODE's exact latent (the Gaussian's closed form) at least as h, slope fitted (VP and
    flow matching faster on these grids; VE, where the sample is read at the next level unscaled, at 0.9-1.0)."""
    gauss, flows = _flows(kind)
    x = _images(2)
    exact = gauss.solution(x, 0.0, S_TOP) / math.sqrt(1.0 + S_TOP**2)
    steps = [64, 128, 256]
    for path, flow in flows.items():
        errors = [_err(flowdiff.encode(flow, x, solver="ddim_inverse", grid=_grid(n)).x, exact) for n in steps]
        slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
        assert slope >= 0.85, (path, errors, slope)


@pytest.mark.parametrize("start", [0.0, 0.45], ids=["from_zero", "from_0.45"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_its_latent_decodes_with_euler_and_the_round_trip_converges(kind, start):
    """A ddim_inverse latent decodes with Euler (DDIM) on its grid, to the model's x at the grid's low end, the same
    for both spellings; the round trip's error falls as h (first order: DDIM's ε at x_{n+1} against the encode's at
    x_n, both at t(σ_{n+1}))."""
    _, flows = _flows(kind)
    x = _images(3)
    steps = [64, 128, 256]
    errors: dict[str, list[float]] = {p: [] for p in PATHS}
    for n in steps:
        back = {}
        for path, flow in flows.items():
            dec = flowdiff.decode(flow, flowdiff.encode(flow, x, solver="ddim_inverse", grid=_grid(n, start)).latent)
            assert dec.solver == "euler" and dec.stats.nfe == n
            back[path] = dec.x
            errors[path].append(_err(dec.x, x))
        assert _err(back["sigma_field"], back["model"]) <= 1e-12
    for path in PATHS:
        slope = -np.polyfit(np.log(steps), np.log(errors[path]), 1)[0]
        assert slope >= 0.85, (path, errors[path], slope)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_sigma_field_on_vp_is_diffusers_ddim_inverse(spacing):
    """On VP the σ-native spelling still equals diffusers' DDIMInverseScheduler fed the same Gaussian as a model."""
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMInverseScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                                           set_alpha_to_one=True, timestep_spacing=spacing)
    sched.set_timesteps(10)
    sched.alphas_cumprod = sched.alphas_cumprod.double()
    schedule = flowdiff.Schedule(sched.alphas_cumprod)
    gauss = Gaussian(MEAN, VAR, schedule)
    x = _images(4)
    z = x.clone()
    for t in sched.timesteps:
        z = sched.step(gauss(z, torch.full((z.shape[0],), float(t), dtype=torch.float64)), t, z).prev_sample
    enc = flowdiff.encode(gauss.flow(), x, solver="ddim_inverse", steps=10, grid=spacing)
    assert enc.stats.nfe == 10
    assert _err(enc.x, z) <= 1e-12 * float(z.abs().max())
