"""VP, VE and rectified flow are one σ-ODE: every (schedule, prediction type) pair gives the same ε field.

A closed-form Gaussian defines the exact ε(x̄, σ). Each model below is that Gaussian written in a
schedule's own variables — input x = α·x̄, its time t, its prediction — so the flow's field must
return the Gaussian's ε to float64 rounding; a wrong input scale, time map or conversion breaks it.
"""

import math

import numpy as np
import pytest
import torch

import flowdiff
from flowdiff import FlowMatchingSchedule, ProbabilityFlow, Schedule, VESchedule
from flowdiff.models.analytic import Gaussian

SCHEDULES = {
    "vp": lambda: Schedule.scaled_linear(),
    "ve": lambda: VESchedule(0.002, 80.0, time="log_sigma"),
    "ve_sigma": lambda: VESchedule(0.01, 50.0, time="sigma"),
    "flow": lambda: FlowMatchingSchedule(1000, shift=1.0),
    "flow_shift3": lambda: FlowMatchingSchedule(1000, shift=3.0),
}


def _alpha_s(schedule, sigma):
    """(α, s) of the schedule at σ from first principles, not from the code under test."""
    if isinstance(schedule, FlowMatchingSchedule):
        t = sigma / (1 + sigma)
        return 1 - t, t
    if isinstance(schedule, VESchedule):
        return 1.0, sigma
    a = 1 / math.sqrt(1 + sigma**2)
    return a, sigma * a


class GaussianInModelVariables:
    """The Gaussian's prediction as a model of the given schedule and prediction type would make it."""

    def __init__(self, gaussian, schedule, prediction_type):
        self.gaussian, self.schedule, self.prediction_type = gaussian, schedule, prediction_type

    def sigma_of(self, t):
        if isinstance(self.schedule, FlowMatchingSchedule):
            u = t / 1000.0
            return u / (1 - u)
        if isinstance(self.schedule, VESchedule):
            return t if self.schedule.time == "sigma" else math.exp(4 * t)
        return float(self.schedule.sigma_at(t))

    def __call__(self, x, t):
        sigma = self.sigma_of(float(t[0]))
        if math.isinf(sigma):  # pure noise: x = ε, and the posterior mean of x₀ is the data mean
            a, s, eps, x0 = 0.0, 1.0, x, self.gaussian.mean.expand_as(x)
        else:
            a, s = _alpha_s(self.schedule, sigma)
            xbar = x / a
            eps = self.gaussian.eps(xbar, sigma)
            x0 = xbar - sigma * eps
        if self.prediction_type == "epsilon":
            return eps
        if self.prediction_type == "sample":
            return x0
        if self.prediction_type == "v_prediction":
            return a * eps - s * x0
        # velocity dx/dt of the schedule's time: rectified flow ε − x₀; VE's time is σ, v = ε
        return eps - x0 if isinstance(self.schedule, FlowMatchingSchedule) else eps


CASES = [(k, p) for k in SCHEDULES for p in ("epsilon", "v_prediction", "sample", "velocity")
         if not (p == "velocity" and k == "vp")]


@pytest.mark.parametrize("kind, prediction_type", CASES)
def test_every_schedule_and_prediction_gives_the_same_eps(kind, prediction_type):
    schedule = SCHEDULES[kind]()
    gaussian = Gaussian(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64))
    flow = ProbabilityFlow(GaussianInModelVariables(gaussian, schedule, prediction_type), schedule,
                           prediction_type=prediction_type)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3
    f = flow.field(model_dtype=torch.float64)
    for sigma in (0.05, 0.3, 1.0, 7.0, 40.0 if kind != "vp" else 14.0):  # within VP's trained σ range
        torch.testing.assert_close(f(sigma, x), gaussian.eps(x, sigma), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["vp", "ve", "flow_shift3"])
def test_euler_on_any_schedule_converges_to_the_exact_solution(kind):
    """The ODE does not depend on the schedule: Euler's error on the Gaussian shrinks like h for each."""
    schedule = SCHEDULES[kind]()
    gaussian = Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64))
    pred = "velocity" if kind != "vp" else "v_prediction"
    flow = ProbabilityFlow(GaussianInModelVariables(gaussian, schedule, pred), schedule, prediction_type=pred)
    x_T = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    s_max = 20.0
    exact = gaussian.solution(x_T * math.sqrt(1 + s_max**2), s_max, 0.0)
    errors = []
    for n in (16, 32, 64):
        grid = np.append(np.geomspace(s_max, 0.01, n), 0.0)
        errors.append(float((flowdiff.generate(flow, x_T, grid=grid).x - exact).abs().max()))
    slopes = np.diff(np.log(errors)) / np.log(2)
    assert np.all(slopes < -0.8), (errors, slopes)


def test_flow_matching_schedule_is_rectified_flow():
    s = FlowMatchingSchedule(1000, shift=3.0)
    for sigma in (0.0, 0.2, 1.0, 5.0):
        t = sigma / (1 + sigma)
        assert s.timestep(sigma) == pytest.approx(1000 * t, rel=1e-14)
        assert s.alpha(sigma) == pytest.approx(1 - t, rel=1e-14)
        assert s.sigma_at(s.timestep(sigma)) == pytest.approx(sigma, rel=1e-12, abs=1e-15)
    assert s.timestep(math.inf) == 1000.0
    # the trained levels are diffusers' shifted t_i = 3u/(1 + 2u), u = i/T, as σ = 3·u/(1−u)
    u = np.arange(1, 1000) / 1000
    assert np.allclose(s.sigmas, 3 * u / (1 - u), rtol=1e-12)
    assert s.kind == "flow_matching" and Schedule.flow_matching(shift=3.0).sigma_max == s.sigma_max


def test_velocity_needs_a_continuous_schedule():
    with pytest.raises(ValueError, match="velocity.*continuous-time"):
        ProbabilityFlow(lambda x, t: x, Schedule.linear(), prediction_type="velocity")
    with pytest.raises(ValueError, match="shift"):
        FlowMatchingSchedule(1000, shift=0.0)
    with pytest.raises(ValueError, match="time"):
        VESchedule(time="t")
    with pytest.raises(ValueError, match="outside"):
        FlowMatchingSchedule().sigma_at(1000.0)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample", "velocity"])
def test_step_from_noise_is_the_limit_of_the_euler_step(prediction_type):
    """From σ = ∞ (pure noise) the Euler step is x̂₀ + σ'·noise: the limit of steps from ever larger σ."""
    schedule = FlowMatchingSchedule(1000)
    gaussian = Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64))
    model = GaussianInModelVariables(gaussian, schedule, prediction_type)
    model.sigma_of = lambda t: math.inf if t >= 1000 else (t / 1000) / (1 - t / 1000)
    flow = ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    noise = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ours = flow.step_from_noise(noise, 2.0)
    # at σ = ∞ the Gaussian's x̂₀ is its mean (the input carries no information about x₀)
    expected = (gaussian.mean + 2.0 * noise) / math.sqrt(5.0)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="epsilon"):
        ProbabilityFlow(model, schedule, prediction_type="epsilon").step_from_noise(noise, 2.0)
