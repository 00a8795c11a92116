"""One convention at a grid's end above σ = 0 (sweep 16's finding; the lead's decision): the state a solve hands back
there, and the one an encode reads there, is the model's own variable x = α(σ)·x̄ (VP: x̄/√(1+σ²); VE: x̄ itself;
flow matching: x̄/(1+σ)), as diffusers' DDIMScheduler with ``set_alpha_to_one=False`` returns x at ᾱ_0 and as
encode read its input on VP. ``generate`` and ``decode`` returned x̄ there, so ``decode(encode(x))`` on such a grid was
off by x·(√(1+σ_end²) − 1) on VP (0.1 at σ_end = 0.45), and by more on the other schedules.

Closed-form Gaussian data in float64 gives the exact answer at every σ; the shipped digits model and diffusers'
own schedulers are checked beside it."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from _closed_form import MEAN, SCHEDULES, VAR

import flowdiff
from flowdiff.models.analytic import Gaussian

S_START, S_END = 5.0, 0.45
#: a fine generation grid from S_START down to S_END > 0: rk4's error on it is ~1e-9
FINE = np.geomspace(S_START, S_END, 161)


def _gaussian(kind: str, native: bool):
    schedule = SCHEDULES[kind]()
    gauss = Gaussian(MEAN, VAR, schedule)
    return gauss, (gauss.flow() if native else flowdiff.ProbabilityFlow(gauss, schedule))


def _randn(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("native", [True, False], ids=["sigma_field", "model"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_generate_ends_at_the_exact_gaussians_x_at_sigma_end(kind, native):
    gauss, flow = _gaussian(kind, native)
    noise = _randn(0)
    exact_xbar = gauss.solution(noise * math.sqrt(1.0 + S_START**2), S_START, S_END)
    alpha = flow.schedule.alpha(S_END)
    out = flowdiff.generate(flow, noise, solver="rk4", grid=FINE)
    assert _err(out.x, alpha * exact_xbar) <= 1e-8
    if kind != "ve":  # the other reading (x̄) is far off: the test tells the two apart
        assert _err(exact_xbar, alpha * exact_xbar) > 1e-2
    # a plain tensor decodes as generate does
    assert torch.equal(flowdiff.decode(flow, noise, solver="rk4", grid=FINE).x, out.x)


@pytest.mark.parametrize("kind", SCHEDULES)
def test_encode_reads_x_at_the_grids_first_sigma(kind):
    """The encode's start at σ_end > 0 is the model's x there: its latent is the exact solution from x̄ = x/α."""
    gauss, flow = _gaussian(kind, native=True)
    x = _randn(1)
    enc = flowdiff.encode(flow, x, solver="rk4", grid=FINE)
    alpha = flow.schedule.alpha(S_END)
    exact = gauss.solution(x / alpha, S_END, S_START) / math.sqrt(1.0 + S_START**2)
    assert _err(enc.x, exact) <= 1e-8


@pytest.mark.parametrize("native", [True, False], ids=["sigma_field", "model"])
@pytest.mark.parametrize("kind", SCHEDULES)
def test_decode_of_encode_on_a_grid_ending_above_zero_converges_at_the_solvers_order(kind, native):
    """Heun's round trip error falls at least as h² (a slope fit over three step counts; it measures h³, the
    encode's and decode's leading errors cancelling on this linear field): a convention mismatch is an error that
    no refinement removes, slope ≈ 0."""
    _, flow = _gaussian(kind, native)
    x = _randn(2)
    steps, errors = [8, 16, 32], []
    for n in steps:
        grid = np.geomspace(S_START, S_END, n + 1)
        back = flowdiff.decode(flow, flowdiff.encode(flow, x, solver="heun", grid=grid).latent)
        errors.append(_err(back.x, x))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert slope >= 1.8, (errors, slope)
    assert errors[-1] <= 1e-4


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("solver", ["reversible_heun", "reversible"])
def test_reversible_round_trip_on_a_grid_ending_above_zero_is_exact_to_rounding(kind, solver):
    _, flow = _gaussian(kind, native=True)
    x = _randn(3)
    grid = np.geomspace(S_START, S_END, 9)
    enc = flowdiff.encode(flow, x, solver=solver, grid=grid)
    assert enc.latent.sigmas[0] == S_END
    assert _err(flowdiff.decode(flow, enc.latent).x, x) <= 1e-13


@pytest.mark.parametrize("kind", SCHEDULES)
def test_fixed_point_encode_reads_x_and_its_latent_decodes_back(kind):
    """The fixed-point encode read its images as x̄ while the plain encode read them as x: both read x now (its
    latent on a fine grid is the exact one from x̄ = x/α, to Heun's error), and the plain decode of its latent
    returns the images to its tolerance."""
    gauss, flow = _gaussian(kind, native=True)
    x = _randn(4)
    spec = flowdiff.Inversion("fixed_point", solver="heun")
    grid = np.geomspace(S_START, S_END, 7)
    enc = flowdiff.encode(flow, x, solver=spec, grid=grid)
    assert _err(flowdiff.decode(flow, enc.latent).x, x) <= 1e-12
    fine = flowdiff.encode(flow, x, solver=spec, grid=FINE)
    exact = gauss.solution(x / flow.schedule.alpha(S_END), S_END, S_START) / math.sqrt(1.0 + S_START**2)
    assert _err(fine.x, exact) <= 5e-4  # Heun on FINE; reading x̄ instead is 0.3 (VP) and 1.5 (flow matching) off


def _digits_grid(flow, n: int, end: float) -> np.ndarray:
    return np.geomspace(flow.schedule.sigma_max, end, n + 1)


def _digits64():
    """The shipped digits model with its network in float64 (its float32 weights read the states at float32
    precision, which no inverse step can undo exactly)."""
    flow = flowdiff.pretrained("digits")
    return flow.with_model(copy.deepcopy(flow.model).double())


def test_shipped_digits_round_trip_on_a_grid_ending_above_zero():
    """On the shipped digits model in float64: the reversible encode comes back to rounding, and rk4's round trip on
    a grid ending at σ = 0.45 to its discretisation error (8e-4 at 10 steps), not x·(√(1+σ²) − 1) ≈ 0.1·|x|."""
    flow = _digits64()
    x = flowdiff.digits_data("test").images[:4].to(torch.float64)
    enc = flowdiff.encode(flow, x, solver="reversible_heun", grid=_digits_grid(flow, 12, S_END))
    assert _err(flowdiff.decode(flow, enc.latent).x, x) <= 1e-13
    back = flowdiff.decode(flow, flowdiff.encode(flow, x, solver="rk4", grid=_digits_grid(flow, 10, S_END)).latent)
    assert _err(back.x, x) <= 2e-3


def test_shipped_digits_generate_at_sigma_end_is_alpha_times_the_continued_solve():
    """The digits model's generation stopped at σ_end > 0 hands back α(σ_end)·x̄: its x̄, continued to 0 by the same
    steps, is the full solve's image (the two solves share every step down to σ_end)."""
    flow = _digits64()
    noise = torch.randn(3, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grid = np.append(_digits_grid(flow, 10, S_END), 0.0)
    part = flowdiff.generate(flow, noise, solver="euler", grid=grid[:-1])
    whole = flowdiff.generate(flow, noise, solver="euler", grid=grid, save=flowdiff.Save(sigmas=[S_END]))
    (at_end,) = whole.saved
    torch.testing.assert_close(part.x, at_end.xbar * flow.schedule.alpha(S_END), rtol=0, atol=1e-12)
    # and it continues: decoding the part's x from σ_end to 0 (as noise at σ_end, the DDIM scale there) is the image
    torch.testing.assert_close(flowdiff.generate(flow, part.x, solver="euler", grid=grid[-2:]).x, whole.x,
                               rtol=0, atol=1e-12)


def _ddim(diffusers, config, steps):
    """diffusers' DDIMScheduler on flowdiff's float64 ᾱ table (as the scheduler suite runs it), and that schedule."""
    from flowdiff.models.diffusers_io import schedule_from_config

    schedule, _ = schedule_from_config(config)
    sched = diffusers.DDIMScheduler.from_config(config)
    sched.set_timesteps(steps)
    sched.alphas_cumprod = torch.tensor(schedule.alphas_cumprod, dtype=torch.float64)
    sched.final_alpha_cumprod = sched.alphas_cumprod[0]  # set_alpha_to_one=False: ᾱ_0
    return sched, schedule


def _net(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(4, 4, generator=g, dtype=torch.float64) * 0.3).to(dtype)

    def model(x, t):
        return torch.tanh(x @ w) * (1 + t.to(dtype).view(-1, 1) / 1000)

    return model


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_generate_on_ddims_grid_with_set_alpha_to_one_false_is_diffusers_without_conversion(eta):
    """diffusers' DDIMScheduler(set_alpha_to_one=False) ends at ᾱ_0 < 1 and returns x there, not x/√ᾱ_0: generate
    on its grid and timesteps (no rescaling after) equals its loop to float64 rounding, with η = 0 and η > 0."""
    diffusers = pytest.importorskip("diffusers")
    from flowdiff.models.pipelines import scheduler_plan

    config = {"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}
    steps = 8
    sched, schedule = _ddim(diffusers, config, steps)
    model = _net()
    noise = _randn(6, 3)
    step_noise = [_randn(100 + i, 3) for i in range(steps)]
    x = noise.clone()
    for i, t in enumerate(sched.timesteps):
        x = sched.step(model(x, t.expand(3)), t, x, eta=eta, variance_noise=step_noise[i] if eta else None,
                       return_dict=False)[0]
    plan = scheduler_plan(config, steps)
    assert plan.sigmas[-1] > 0
    flow = flowdiff.ProbabilityFlow(model, schedule).with_timesteps(plan.timesteps)
    solver = flowdiff.Stochastic(eta, step_noise=step_noise) if eta else "euler"
    out = flowdiff.generate(flow, noise, solver=solver, grid=plan.sigmas)
    assert _err(out.x, x) <= 1e-12 * float(x.abs().max())
    if not eta:  # the same from sample_like, the pipeline's own route
        assert _err(flowdiff.sample_like(flow, noise, config, steps).x, x) <= 1e-12 * float(x.abs().max())
