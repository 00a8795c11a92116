"""Schedules and time grids against diffusers' own definitions."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

import flowdiff
from flowdiff import Schedule, make_sigmas


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_schedules_match_diffusers(name):
    kw = {"linear": {}, "scaled_linear": {"beta_start": 0.00085, "beta_end": 0.012}, "squaredcos_cap_v2": {}}[name]
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, **kw).betas.double().numpy()
    acp = Schedule.from_config(name, 1000, **kw).alphas_cumprod
    ours = 1 - acp / np.append(1.0, acp[:-1])
    # diffusers builds its betas in float32: agreement is to float32 rounding.
    assert np.allclose(ours, ref, rtol=1e-6, atol=0)


def test_sigma_timestep_round_trip_is_exact_on_trained_steps():
    s = Schedule.linear()
    for t in (0, 1, 17, 500, 998, 999):
        assert s.timestep(float(s.sigmas[t])) == t
    assert s.timestep(0.0) == 0.0 and s.timestep(s.sigma_min / 2) == 0.0
    assert s.timestep(1e9) == 999.0
    ts = np.array([0.25, 10.5, 998.75])
    assert np.allclose(s.timesteps(s.sigma_at(ts)), ts, rtol=0, atol=1e-9)
    # log-linear between trained steps: monotone
    grid = np.geomspace(s.sigma_min, s.sigma_max, 2000)
    assert np.all(np.diff(s.timesteps(grid)) > 0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("steps", [1, 7, 10, 50, 1000])
def test_timestep_grids_are_diffusers_grids(spacing, steps):
    sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing)
    sched.set_timesteps(steps)
    ours = flowdiff.grid_timesteps(Schedule.linear(), spacing, steps)
    assert np.array_equal(ours, sched.timesteps.numpy())
    sig = make_sigmas(Schedule.linear(), spacing, steps)
    assert len(sig) == steps + 1 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)


@pytest.mark.parametrize("grid", flowdiff.GRIDS)
def test_every_grid_decreases_to_zero(grid):
    s = Schedule.linear()
    for steps in (1, 2, 10, 25):
        sig = make_sigmas(s, grid, steps)
        assert len(sig) == steps + 1 and sig[-1] == 0.0 and np.all(np.diff(sig) < 0)
        assert sig[0] <= s.sigma_max * (1 + 1e-12)


def test_sigma_grids():
    s = Schedule.linear()
    k = make_sigmas(s, "karras", 10, rho=7.0)
    assert k[0] == s.sigma_max and k[-2] == s.sigma_min
    r = k[:-1] ** (1 / 7)
    assert np.allclose(np.diff(r), np.diff(r)[0])
    g = make_sigmas(s, "logsnr", 10)[:-1]
    assert np.allclose(np.diff(np.log(g)), np.diff(np.log(g))[0])


def test_quadratic_and_linear_follow_the_ddim_paper():
    s = Schedule.linear()
    q = flowdiff.grid_timesteps(s, "quadratic", 10)
    assert q[0] == int(0.8 * 1000) and q[-1] == 0
    assert np.array_equal(flowdiff.grid_timesteps(s, "linear", 8), np.arange(7, -1, -1) * 125)


def test_explicit_grids():
    s = Schedule.linear()
    assert np.array_equal(make_sigmas(s, sigmas=[3.0, 1.0, 0.0]), [3.0, 1.0, 0.0])
    assert np.array_equal(make_sigmas(s, sigmas=[3.0, 1.0]), [3.0, 1.0])  # stops short (set_alpha_to_one=False)
    t = make_sigmas(s, timesteps=[999, 500.5, 0])
    assert t[0] == s.sigma_max and t[-1] == 0 and t[-2] == s.sigma_min


@pytest.mark.parametrize("kwargs, match", [
    (dict(grid="uniformish", steps=3), "unknown grid 'uniformish'"),
    (dict(grid="trailing", steps=0), "steps must be >= 1"),
    (dict(grid="trailing", steps=1001), "exceeds"),
    (dict(sigmas=[1.0, 2.0, 0.0]), "strictly decreasing"),
    (dict(sigmas=[2.0, -1.0]), ">= 0"),
    (dict(timesteps=[999, 1200]), r"\[0, 999\]"),
    (dict(grid="trailing", steps=3, sigmas=[1.0, 0.0]), "exactly one"),
    (dict(grid="quadratic", steps=900), "repeats"),
])
def test_bad_grids_raise(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make_sigmas(Schedule.linear(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    (dict(alphas_cumprod=[0.9, 0.95]), "strictly decreasing"),
    (dict(alphas_cumprod=[1.2, 0.5]), r"\(0, 1\]"),
    (dict(alphas_cumprod=[1.0, 0.5]), "σ_0 > 0"),
])
def test_bad_schedules_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_unknown_beta_schedule_names_the_choices():
    with pytest.raises(ValueError, match="unsupported beta_schedule 'sigmoid'.*scaled_linear"):
        Schedule.from_config("sigmoid")
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        Schedule.linear().timestep(-1.0)
    assert torch.is_tensor(torch.as_tensor(Schedule.cosine().alphas_cumprod))
