"""`deis` keeps its log-time weights on every step away from t = 0, also in a solve that ends or starts at 0
(every generation in σ does): only the step into 0 is taken in t. Generic log-time Adams methods keep b74a095's
rule (the polynomial in t on a whole solve that touches 0), and their order tests stay in
``tests/test_solver_promises.py``."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Gaussian
from solvers import Adams, adams_weights

RATES = torch.tensor([1.0, -0.7, 1.6], dtype=torch.float64)


def _f(t, y):  # smooth in t through 0, not in log t
    return RATES * y * math.cos(t)


def _exact(t):
    return torch.exp(RATES * math.sin(t))


def _slope(solver, t0, t1, ns):
    errs = [float((solvers.solve(_f, _exact(t0), np.linspace(t0, t1, n + 1), solver).y - _exact(t1)).abs().max())
            for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


def _gaussian():
    g = torch.Generator().manual_seed(0)
    gauss = Gaussian(torch.randn(6, dtype=torch.float64, generator=g), 0.3)
    return gauss.flow(), torch.randn(8, 6, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("grid", ["logsnr", "karras", "trailing"])
def test_deis_is_not_lms_on_a_generation_down_to_sigma_zero(grid):
    flow, noise = _gaussian()
    deis = flowdiff.generate(flow, noise, solver="deis", nfe=10, grid=grid).x
    lms = flowdiff.generate(flow, noise, solver=solvers.get("lms", order=3), nfe=10, grid=grid).x
    assert not torch.equal(deis, lms)


@pytest.mark.parametrize(("grid", "nfe"), [("logsnr", 10), ("logsnr", 20), ("karras", 10), ("karras", 20)])
def test_deis_log_weights_beat_lms_on_a_gaussian_generation(grid, nfe):
    # ε of Gaussian data is smooth in log σ: the method DEIS is made for (as lms(order=3) it was 2-30x worse here)
    flow, noise = _gaussian()
    exact = flowdiff.reference_solution(flow, noise, sigma_end=0.0).x
    deis = flowdiff.generate(flow, noise, solver="deis", nfe=nfe, grid=grid).x
    lms = flowdiff.generate(flow, noise, solver=solvers.get("lms", order=3), nfe=nfe, grid=grid).x
    assert float((deis - exact).abs().max()) < float((lms - exact).abs().max())


@pytest.mark.parametrize("order", [2, 3, 4])
def test_only_the_step_into_zero_is_taken_in_t(order):
    # the solve down to t = 0 is the solve down to its last positive time (log weights on every step, no 0 in
    # sight), then one step whose weights are the polynomial's in t through the same history
    f = _f
    ts = list(np.geomspace(2.0, 0.05, 9)) + [0.0]
    deis = solvers.get("deis", order=order)
    to_zero = solvers.solve(f, _exact(2.0), ts, deis)
    above = solvers.solve(f, _exact(2.0), ts[:-1], deis)
    t0 = ts[-2]
    held, held_ks = above.state.newest(order - 1)  # the derivatives at the starts of the steps taken
    times, ks = [t0, *held], [f(t0, above.y), *held_ks]
    weights = adams_weights(times, t0, 0.0, log_time=False)
    last = above.y
    for w, k in zip(weights, ks):
        last = last + w * k
    torch.testing.assert_close(to_zero.y, last, rtol=1e-14, atol=1e-15)
    # and the steps above 0 did use the log weights: lms of the same order differs already there
    lms_above = solvers.solve(f, _exact(2.0), ts[:-1], solvers.get("lms", order=order))
    assert not torch.equal(above.y, lms_above.y)


@pytest.mark.parametrize("interval", [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -1.0)])
@pytest.mark.parametrize("order", [3, 4])
def test_deis_keeps_its_fixed_grid_order_on_intervals_that_touch_zero(order, interval):
    solver = solvers.get("deis", order=order)
    slope, errs = _slope(solver, *interval, [64, 128, 256, 512])
    assert abs(slope - solver.fixed_grid_order) < 0.2, (slope, errs)


@pytest.mark.parametrize("interval", [(0.0, 1.0), (1.0, 0.0)])
def test_deis_order_2_loses_a_log_factor_next_to_zero(interval):
    # order 2's linear interpolant in log t spans O(1) next to 0: O(h² log(1/h)) there, a measured slope ≈ 1.8
    # (lms(order=2), in t throughout, is a clean 2). The error times n² grows as log n does, not faster.
    ns = [64, 128, 256, 512, 1024]
    slope, errs = _slope(solvers.get("deis", order=2), *interval, ns)
    assert 1.6 < slope < 1.95, (slope, errs)
    scaled = [e * n * n / math.log(n) for e, n in zip(errs, ns)]
    assert max(scaled) < 1.5 * min(scaled), scaled
    lms_slope, _ = _slope(solvers.get("lms", order=2), *interval, ns)
    assert abs(lms_slope - 2) < 0.1


def test_deis_alone_keeps_log_weights_on_an_interval_touching_zero():
    log_time = [name for name in solvers.available() if getattr(solvers.get(name), "log_time", False)]
    assert "deis" in log_time and "unipc" in log_time  # the rule below is checked on both kinds
    for name in log_time:
        solver = solvers.get(name)
        for a, b in [(-1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]:
            chosen = solver.on_interval(a, b)
            if name == "deis":
                assert chosen is solver and chosen.log_time
            else:  # b74a095's rule, unchanged
                assert not chosen.log_time and chosen.order == solver.order
        assert solver.on_interval(0.01, math.inf) is solver
    deis = solvers.get("deis")
    assert deis.limited(1).log_time_by_step and deis.limited(1).on_interval(0.0, 1.0).log_time


def test_log_time_by_step_is_refused_where_it_cannot_act():
    with pytest.raises(ValueError, match="log_time_by_step=True .* log_time is False"):
        Adams("mine", 3, log_time_by_step=True)
    with pytest.raises(TypeError, match="log_time_by_step must be True or False, got 1"):
        Adams("mine", 3, log_time=True, log_time_by_step=1)
