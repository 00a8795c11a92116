"""New-user sweep 18: likelihoods and property-test helpers on an EDM-style (variance-exploding) model and a
flow-matching (shift 3) one, closed-form, where the exact log-density is known."""

from __future__ import annotations

import pytest
import torch

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture
from flowdiff.tools import testing as ft

VE = flowdiff.VESchedule()
FM = flowdiff.FlowMatchingSchedule(shift=3.0)


def _ve_mixture():
    """A kernel density of 6 seeded points in [−1, 1]⁸ on the VE schedule, its prior stated as its moments, and 120
    points drawn from it (benchmarks/sweep18_likelihood_bars.py's first model)."""
    g = torch.Generator().manual_seed(0)
    centers = 2 * torch.rand(6, 8, dtype=torch.float64, generator=g) - 1
    mix = Mixture(centers, 0.15, schedule=VE)
    prior = {"data_mean": centers.mean(0), "data_var": centers.var(0, unbiased=False) + 0.15 ** 2}
    return mix, prior, mix.sample(120, g)


@pytest.mark.parametrize("point", [15, 67, 90])
def test_the_exact_traces_bar_covers_the_solve_for_one_image_on_a_ve_mixture(point):
    """One image at a time (as a user scores one), the exact trace's bar is the solve's alone: |ℓ − ℓ_check| of a
    check solve at 10× the tolerances. Where the two solves' errors happened to agree it was a fraction of the error:
    at these points of a VE mixture 35×, 4× and 4× too small (9 of 120 points beyond one bar). A third, coarse check
    solve (100×) floors it. The bar is the solve's: it covers the ODE term's error, measured against the exact
    log p_0(x) − log p_σmax(x̄(σ_max)) at the solve's own end (the moment-matched prior's own mismatch, ~1e-4 nats at
    VE's σ_max = 80, is the prior's, not the solve's)."""
    mix, prior, x = _ve_mixture()
    image = x[point:point + 1]
    r = flowdiff.log_likelihood(mix.flow(), image, **prior)
    sigma_max = float(VE.sigma_max)
    xbar_max = r.latent * (1 + sigma_max ** 2) ** 0.5
    ode_error = (r.delta - (mix.log_prob(image, 0.0) - mix.log_prob(xbar_max, sigma_max))).abs()
    assert float(ode_error) <= float(r.error), (float(ode_error), float(r.error))
    coarse = r.stats.extra["check_coarse"]
    assert 0 < coarse.nfe < r.stats.extra["check"].nfe < r.stats.nfe  # the coarse check is the cheapest solve


def test_a_fixed_grid_runs_no_coarse_check():
    """The coarse check is the adaptive solve's; a fixed grid's bar has its own third solve (N/4 steps)."""
    mix, prior, x = _ve_mixture()
    r = flowdiff.log_likelihood(mix.flow(), x[:1], solver="rk4", steps=16, **prior)
    assert "check_coarse" not in r.stats.extra and "check_quarter" in r.stats.extra


@pytest.mark.parametrize("schedule", [VE, FM], ids=["ve", "fm"])
def test_a_gaussians_log_density_is_exact_within_its_bar_on_ve_and_flow_matching(schedule):
    """What held up: an isotropic Gaussian's prior N(μ, (v + σ_max²)I) is exact, so log p is the solve's alone, within
    its bar on both schedules, with the model read through the schedule as a user's ``model(x_t, t)`` too."""
    mean = torch.linspace(-0.6, 0.6, 8, dtype=torch.float64)
    model = Gaussian(mean, torch.full((8,), 0.2, dtype=torch.float64), schedule)
    x = model.sample(3, torch.Generator().manual_seed(0))
    for flow in (model.flow(), flowdiff.ProbabilityFlow(model, schedule)):
        r = flowdiff.log_likelihood(flow, x, data_mean=mean, data_var=0.2)
        error = (r.log_prob - model.log_prob(x, 0.0)).abs()
        assert bool((error <= r.error).all()) and float(error.max()) < 2e-3, (error, r.error)


def test_round_trip_order_refuses_errors_that_rise_with_the_steps():
    """rk4's round trip on a flow-matching Gaussian (shift 3, σ_max = 2997) at 8, 16 and 32 steps of the default grid
    family: errors 1.3e-5, 3.7e-3, 1.5e-4, not yet asymptotic. round_trip_order fitted a "slope" of −1.8 through them
    and returned it as the order, so that a correct rk4 failed an order test with a number, not a reason. It now
    refuses them, naming the step counts where the error rose; from 16 steps on it fits rk4's 5 (even p: p + 1)."""
    model = Gaussian(torch.full((4,), 0.1, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64), FM)
    x = model.sample(3, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"do not fall as the steps grow \(from 8 to 16 steps\)"):
        ft.round_trip_order(model.flow(), x, [8, 16, 32], solver="rk4")
    slope, errors = ft.round_trip_order(model.flow(), x, [16, 32, 64], solver="rk4")
    assert abs(slope - 5) < 0.3, (slope, errors)


@pytest.mark.parametrize("schedule", [VE, FM], ids=["ve", "fm"])
def test_round_trip_cases_on_ve_and_flow_matching_schedules(schedule):
    """What held up: round_trip_cases with a VE or flow-matching schedule draws cases whose reversible_heun round
    trip is exact (1e-10), and assert_round_trip fails a broken encoder (euler at 2 steps) with its report."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=4, deadline=None, derandomize=True)
    @given(ft.round_trip_cases(solvers=["reversible_heun"], dtype=st.just(torch.float64), schedule=st.just(schedule)))
    def check(case):
        ft.assert_round_trip(case.flow, case.images, solver=case.solver, steps=case.steps, grid=case.grid, atol=1e-10)

    check()
    model = Gaussian(torch.full((4,), 0.1, dtype=torch.float64), torch.full((4,), 0.3, dtype=torch.float64), schedule)
    x = model.sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError, match="round trip error .* > atol"):
        ft.assert_round_trip(model.flow(), x, atol=1e-6, solver="euler", steps=2)
