"""DEIS (log-ρ Adams): order by slope fit, exactness on log-polynomial derivatives, budget."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Gaussian
from solvers import History


def _problem():
    rates = torch.tensor([1.0, -0.7, 1.6], dtype=torch.float64)
    return (lambda t, y: rates * y * math.cos(t)), (lambda t: torch.exp(rates * math.sin(t)))


def _seeded_error(order, n, variable=False):
    """n steps on t ∈ [1, 2] with the history seeded by exact past derivatives (the formula's order)."""
    f, exact = _problem()
    ts = 1.0 * 2.0 ** (np.linspace(0, 1, n + 1) ** 1.3) if variable else np.linspace(1.0, 2.0, n + 1)
    h = ts[1] - ts[0]
    past = tuple((1.0 - j * h, f(1.0 - j * h, exact(1.0 - j * h))) for j in range(1, 5))
    state = History.of(1.0, f(1.0, exact(1.0)), past)
    sol = solvers.solve(f, exact(1.0), ts, solvers.get("deis", order=order), state=state)
    return float((sol.y - exact(2.0)).abs().max())


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("variable", [False, True])
def test_deis_order_by_slope_fit(order, variable):
    assert solvers.get("deis", order=order).order == order
    ns = [128, 256, 512]
    errs = [_seeded_error(order, n, variable) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.35, (order, slope, errs)


def test_deis_is_exact_for_derivatives_polynomial_in_log_time():
    # dy/dt = 1 + 2 log t + (log t)²: order 3 integrates it exactly once its history holds 3 values.
    def f(t, y):
        lt = math.log(t)
        return torch.full_like(y, 1 + 2 * lt + lt * lt)

    def y(t):  # ∫ (1 + 2u + u²) e^u du with u = log t
        lt = math.log(t)
        return t * (lt * lt + 1)

    ts = [1.0, 1.3, 1.9, 2.4, 3.5]
    past = tuple((t, f(t, torch.zeros(1, dtype=torch.float64))) for t in (0.8, 0.6))
    state = History.of(1.0, f(1.0, torch.zeros(1, dtype=torch.float64)), past)
    sol = solvers.solve(f, torch.full((1,), y(1.0), dtype=torch.float64), ts, solvers.get("deis", order=3),
                        state=state)
    assert float(sol.y) == pytest.approx(y(3.5), rel=1e-12)


@pytest.mark.parametrize("nfe", [1, 4, 7])
def test_deis_generates_within_the_budget_and_converges(nfe):
    g = torch.Generator().manual_seed(0)
    gauss = Gaussian(torch.randn(6, dtype=torch.float64, generator=g), 0.3)
    noise = torch.randn(3, 6, dtype=torch.float64, generator=g)
    out = flowdiff.generate(gauss.flow(), noise, solver="deis", nfe=nfe, grid="logsnr")
    assert out.stats.nfe == nfe
    exact = flowdiff.reference_solution(gauss.flow(), noise, sigma_end=0.0).x
    errs = [float((flowdiff.generate(gauss.flow(), noise, solver="deis", nfe=n, grid="logsnr").x - exact).abs().max())
            for n in (10, 40)]
    assert errs[1] < errs[0] / 4
