"""New-user sweep 16: a researcher with an EDM-style (variance-exploding) model and one with a
flow-matching model, each built from Gaussian data whose answer is known in closed form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _tiny_unet import tiny_unet

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture

MEAN = torch.tensor([0.5, -0.3, 0.1])
VAR = torch.tensor([0.4, 2.0, 0.1])

SCHEDULES = {
    "ve_log_sigma": lambda: flowdiff.VESchedule(),
    "ve_sigma": lambda: flowdiff.VESchedule(0.01, 50.0, time="sigma"),
    "flow_matching": lambda: flowdiff.FlowMatchingSchedule(shift=3.0),
    "vp": lambda: flowdiff.Schedule.linear(),
}


@pytest.mark.parametrize("kind", SCHEDULES)
@pytest.mark.parametrize("closed_form", ["gaussian", "mixture"])
def test_closed_form_model_in_the_user_convention_is_its_exact_flow_on_every_schedule(kind, closed_form):
    """The user saw ``ProbabilityFlow(Gaussian(mean, cov, VESchedule()), VESchedule())`` give an ε 0.6 off the
    Gaussian's own (at σ = 1; 2.0 at σ = 10): the closed-form models' ``model(x_t, t)`` undid the VP input scale
    √(1+σ²) whatever the schedule, while a VE model is fed x̄ itself and a flow-matching one x̄/(1+σ)."""
    schedule = SCHEDULES[kind]()
    if closed_form == "gaussian":
        model = Gaussian(MEAN, VAR, schedule)
    else:
        model = Mixture(torch.tensor([[0.5, -0.3, 0.1], [-0.4, 0.2, 0.9]]), 0.3, schedule=schedule)
    user = flowdiff.ProbabilityFlow(model, schedule)
    exact = model.flow()
    xbar = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for sigma in (0.05, 1.0, 10.0):
        torch.testing.assert_close(user.eps(xbar, sigma), exact.eps(xbar, sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("schedule",
                         [flowdiff.VESchedule(0.2, 80.0), flowdiff.VESchedule(), flowdiff.Schedule.linear()],
                         ids=["ve_floor_0.2", "ve_log_sigma", "vp"])
def test_denoiser_round_trip_returns_the_flows_eps_below_the_floor(schedule):
    """The user saw ``from_denoiser(to_denoiser(flow), VESchedule(0.2, 80))`` return an ε 0.029 off the flow's own
    at σ = 0, though the docstring promises the same ε at every σ for a model whose time stops at σ_min (VE's
    log σ does): below the floor the state was rescaled by the VP ratio √((1+σ_f²)/(1+σ²)) whatever the
    schedule; a VE model is fed x̄ itself (α = 1), so the state must not be rescaled."""
    flow = flowdiff.ProbabilityFlow(Gaussian(MEAN, VAR, schedule), schedule)  # fed σ_min's time below σ_min
    back = flowdiff.from_denoiser(flowdiff.to_denoiser(flow), schedule)
    xbar = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for sigma in (0.0, schedule.sigma_min / 2, 0.5):
        torch.testing.assert_close(back.eps(xbar, sigma), flow.eps(xbar, sigma), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "ScoreSdeVeScheduler"])
def test_a_ve_folder_is_refused_with_a_recipe_that_builds_its_flow_not_with_another_scheduler(tmp_path, scheduler):
    """The user with an EDM or score-SDE VE folder was told "pass scheduler= one of those" (DDIM, DDPM, ...):
    doing so reads a VE network as a VP ε model, another ODE without a word. The refusal now says how to build the
    flow on a VESchedule with the config's σ range, and the EDM recipe it gives is diffusers' EDMEulerScheduler loop."""
    diffusers = pytest.importorskip("diffusers")
    unet = tiny_unet(diffusers)
    unet.save_pretrained(tmp_path / "unet")
    sch = getattr(diffusers, scheduler)()
    sch.save_pretrained(tmp_path / "scheduler")
    with pytest.raises(ValueError, match="defines no betas") as err:
        flowdiff.from_diffusers(str(tmp_path / "unet"))
    message = str(err.value)
    assert "pass scheduler= one of those" not in message
    lo, hi = sch.config.sigma_min, sch.config.sigma_max
    assert f"flowdiff.VESchedule({lo!r}, {hi!r}" in message
    if scheduler != "EDMEulerScheduler":
        assert "time='sigma'" in message
        return
    # the recipe, as the message gives it, against diffusers' own EDM Euler loop
    D = lambda x, s: sch.precondition_outputs(  # noqa: E731
        x, unet(sch.precondition_inputs(x, s[0]), sch.precondition_noise(s[0])).sample, s[0])
    flow = flowdiff.from_denoiser(D, flowdiff.VESchedule(lo, hi))
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    sch.set_timesteps(6)
    with torch.no_grad():
        x = noise * sch.init_noise_sigma
        for t in sch.timesteps:
            x = sch.step(unet(sch.scale_model_input(x, t), t).sample, t, x).prev_sample
        ours = flowdiff.generate(flow, noise, solver="euler", grid=sch.sigmas.double().numpy())
    assert ours.stats.nfe == 6
    torch.testing.assert_close(ours.x, x, rtol=1e-4, atol=1e-4)


def test_a_ve_log_sigma_model_round_trips_float32_images():
    """The user's float32 images on ``ProbabilityFlow(Gaussian(m, v, VESchedule()), VESchedule())`` stopped at σ = 0:
    "time t=-1.553652048 is outside this schedule's [-1.5536520246, inf)": the floor ¼·ln σ_min, fed to the model in
    float32, rounds below itself, and ``VESchedule.sigma_at`` refused it."""
    schedule = flowdiff.VESchedule()
    model = Gaussian(MEAN, VAR, schedule)
    flow = flowdiff.ProbabilityFlow(model, schedule)
    x = model.sample(4, torch.Generator().manual_seed(2)).float()
    enc = flowdiff.encode(flow, x, solver="reversible_heun", steps=8)
    assert torch.equal(flowdiff.decode(flow, enc.latent).x, x)
    t = torch.tensor([0.25 * math.log(schedule.sigma_min)], dtype=torch.float32)
    assert schedule.sigma_at(float(t)) == pytest.approx(schedule.sigma_min, rel=1e-6)
    assert schedule.sigma_at(schedule.timestep(0.0)) == pytest.approx(schedule.sigma_min, rel=1e-12)


def test_ve_and_flow_matching_schedules_check_their_arguments_by_name():
    """``VESchedule(sigma_min=True)`` built a schedule from σ_min = 1 without a word, ``VESchedule(sigma_min="0.1")``
    said "'<' not supported between instances of 'int' and 'str'", ``VESchedule(num_levels=1000.0)`` blamed
    ``num_train_timesteps``, an argument it does not have, and ``FlowMatchingSchedule(shift=np.float32(3.0))`` (a
    config read with NumPy) was refused as not "a finite number > 0"."""
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match=rf"sigma_min must be a real number .*got {bad!r}"):
            flowdiff.VESchedule(sigma_min=bad)
    with pytest.raises(TypeError, match="sigma_max must be a real number"):
        flowdiff.VESchedule(sigma_max="80")
    with pytest.raises(ValueError, match="num_levels must be an int >= 2, got 1000.0"):
        flowdiff.VESchedule(num_levels=1000.0)
    assert flowdiff.VESchedule(np.float32(0.5), np.float64(80.0)).sigma_min == pytest.approx(0.5)
    assert flowdiff.VESchedule(torch.tensor(0.5), 80).sigma_min == pytest.approx(0.5)
    shifted = flowdiff.FlowMatchingSchedule(shift=np.float32(3.0))
    assert shifted.sigma_max == flowdiff.FlowMatchingSchedule(shift=3.0).sigma_max
    with pytest.raises(ValueError, match="shift must be a finite number > 0, got np.True_"):
        flowdiff.FlowMatchingSchedule(shift=np.bool_(True))
