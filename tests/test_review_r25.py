"""Review R25 of the merges of G7, R24 and S11: each test failed before its fix."""

from __future__ import annotations

import pytest
import torch

import flowdiff
from flowdiff.models.analytic import Gaussian


def _gaussian_stochastic(noise: torch.Tensor) -> torch.Tensor:
    """A Stochastic solve of Gaussian data, whose exact ε is linear in x̄: its Jacobian in the noise does not
    depend on the step noise drawn. (The checks read the states on the host, which a mapped state refuses.)"""
    model = Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64), torch.tensor([0.3, 2.0], dtype=torch.float64))
    return flowdiff.generate(model.flow(), noise, steps=4, grid="trailing",
                             solver=flowdiff.Stochastic(eta=1.0), checks=flowdiff.Checks(finite=False, growth=None)).x


def test_stochastic_under_jacfwd_with_randomness_different_runs():
    """The refusal under jacfwd's default randomness='error' advises randomness='same' or 'different'; 'different'
    stopped inside torch (the step added the mapped noise in place into the unmapped state: "output with shape
    [1, 2] doesn't match the broadcast shape [2, 1, 2]"). On a linear ε both give the same Jacobian."""
    noise = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    same = torch.func.jacfwd(_gaussian_stochastic, randomness="same")(noise)
    different = torch.func.jacfwd(_gaussian_stochastic, randomness="different")(noise)
    torch.testing.assert_close(different, same, rtol=1e-12, atol=1e-12)


def test_diffusers_peer_feeds_a_ve_model_its_own_time_and_scale():
    """S11 called a timestep model predicting ε directly on the diffusers scheduler's VP sample x_t and integer
    timestep; a VE-schedule model reads x̄ itself (α = 1) at its own time ¼·ln σ, so it was fed timestep 999 and
    the DDIM row ended 21 off flowdiff's Euler on the same trailing grid. Through ε it agrees with Euler, and every
    time the model is fed lies in the schedule's time range."""
    from flowdiff.tools import peers

    times: list[float] = []

    class Tanh(torch.nn.Module):
        def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            times.append(float(t.flatten()[0]))
            return torch.tanh(0.7 * x) + 0.01 * t.reshape(-1, 1) * x

    schedule = flowdiff.VESchedule(0.002, 80.0)
    flow = flowdiff.ProbabilityFlow(Tanh(), schedule)
    noise = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ddim = next(s for s in peers.DIFFUSERS_DEFAULT if s.target == "DDIMScheduler")
    row = peers.run(ddim, flow, noise, 10)
    lo, hi = schedule.timestep(0.0), schedule.timestep(schedule.sigma_max)
    assert times and all(lo <= t <= hi for t in times), (min(times), max(times), lo, hi)
    euler = flowdiff.generate(flow, noise, steps=10, grid="trailing").x
    torch.testing.assert_close(row.x, euler, rtol=0, atol=1e-3)


def test_stochastic_refusal_under_jacfwd_randomness_different_says_why():
    """With the checks on, jacfwd(randomness='different') is refused at the first mapped output, pointing to the
    checks; the refusal said the model closes over mapped tensors, which this model does not: it names the
    per-sample step noise of randomness='different' now."""

    model = Gaussian(torch.tensor([0.5, -1.0], dtype=torch.float64), 1.0)
    noise = torch.randn(1, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def sample(n: torch.Tensor) -> torch.Tensor:
        return flowdiff.generate(model.flow(), n, steps=3, solver=flowdiff.Stochastic(eta=1.0)).x

    with pytest.raises(ValueError, match=r"randomness='different'.*Checks\(finite=False, growth=None\)"):
        torch.func.jacfwd(sample, randomness="different")(noise)


def test_a_model_that_returns_no_tensor_is_the_same_type_error_on_every_path():
    """The peers' direct calls and the step out of σ = ∞ said ValueError where the flow's field says TypeError for a
    model that returns no tensor (R25; one helper, ``flowdiff.engine.flow.checked_output``, now checks all three)."""
    from flowdiff.tools import peers

    flow = flowdiff.ProbabilityFlow(lambda x, t: (x,), flowdiff.Schedule.linear(), prediction_type="v_prediction")
    x = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="model must return a torch.Tensor, got tuple at timestep 999"):
        peers.DiffusersEps(flow)(x, 999)
    with pytest.raises(TypeError, match="model must return a torch.Tensor, got tuple at σ = ∞"):
        flow.step_from_noise(x, 1.0)
    with pytest.raises(TypeError, match=r"model must return a torch.Tensor, got tuple at σ=1"):
        flow.field()(1.0, x)
