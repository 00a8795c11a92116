"""New-user sweep 16: a researcher with an EDM-style (variance-exploding) model and one with a
flow-matching model, each built from Gaussian data whose answer is known in closed form."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.parametrize("schedule", [flowdiff.VESchedule(0.2, 80.0), flowdiff.VESchedule(), flowdiff.Schedule.linear()],
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
