"""Shared by the grid-tuning tests: a nonlinear closed-form model, seeded noise, the error against a tight reference."""

import torch

import flowdiff
from flowdiff.models.analytic import Mixture

#: A four-dimensional Gaussian's mean and variance, and the three kinds of schedule, for the tests that hold a
#: closed-form answer against every schedule (the grid's end convention, ddim_inverse off VP)
MEAN = torch.tensor([0.5, -0.3, 0.1, 0.8], dtype=torch.float64)
VAR = torch.tensor([0.4, 2.0, 0.1, 1.0], dtype=torch.float64)
SCHEDULES = {
    "vp": flowdiff.Schedule.linear,
    "ve": flowdiff.VESchedule,
    "flow_matching": lambda: flowdiff.FlowMatchingSchedule(shift=3.0),
}

#: A tuning run small enough for a test: a few candidate solves, no restarts, a loose reference.
QUICK = {"max_evals": 12, "restarts": 0, "progress": False, "reference_tol": 1e-6}


def mixture(seed=3, bandwidth=0.4, dim=8):
    """Four well-separated modes in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    return Mixture(torch.randn(4, dim, dtype=torch.float64, generator=g), bandwidth=bandwidth).flow()


def noise(seed, n=8, dim=8):
    return torch.randn(n, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def rmse(flow, noise, **kwargs):
    """RMSE of ``generate(flow, noise, **kwargs)`` against a float64 reference solve at tolerance 1e-9."""
    ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, rtol=1e-9, atol=1e-9)
    return float((flowdiff.generate(flow, noise, **kwargs).x - ref.x).pow(2).mean().sqrt())


def counting(flow):
    """``flow`` with every model evaluation's σ recorded: ``(counted_flow, calls)``, for exact-NFE checks."""
    calls = []
    field = flow.sigma_field

    def counted(xbar, sigma, **kwargs):
        calls.append(sigma)
        return field(xbar, sigma, **kwargs)

    return flowdiff.ProbabilityFlow.from_sigma_field(counted, flow.schedule), calls


class Counted:
    """A field that records every model evaluation and can be fingerprinted (it holds a tensor)."""

    def __init__(self, flow):
        self.inner, self.calls, self.tag = flow.sigma_field, [], torch.zeros(1)

    def field(self, xbar, sigma, **kwargs):
        self.calls.append(sigma)
        return self.inner(xbar, sigma, **kwargs)
