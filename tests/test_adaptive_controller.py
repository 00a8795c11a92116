"""The adaptive loop's bookkeeping: every evaluation counted (accepted, rejected, the first step's
estimate), ``max_nfe`` a hard bound, and the controller's knobs changing the steps it takes."""

import pytest
import torch
from _closed_form import counting

import flowdiff
from flowdiff.models.analytic import Gaussian
from solvers import SolveError, StepController


def _setup():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(16, dtype=torch.float64, generator=g) * 0.5
    var = torch.rand(16, dtype=torch.float64, generator=g) * 0.3 + 0.02
    gauss = Gaussian(mean, var)
    return gauss, torch.randn(3, 16, dtype=torch.float64, generator=g)


@pytest.mark.parametrize("name", ["unipc", "dopri5", "bosh3"])
def test_rejected_steps_are_counted_and_paid_for(name):
    """A controller that grows steps tenfold with no safety margin gets steps rejected; the NFE is still
    every call of the model, and the steps are the accepted plus the rejected ones."""
    gauss, noise = _setup()
    flow, calls = counting(gauss.flow())
    greedy = StepController(safety=1.0, factor_min=0.2, factor_max=10.0)
    r = flowdiff.generate(flow, noise, solver=name, adaptive=flowdiff.Adaptive(rtol=1e-5, atol=1e-5,
                                                                                controller=greedy))
    assert r.stats.rejected > 0
    assert r.stats.nfe == len(calls)
    assert r.stats.steps == r.stats.accepted + r.stats.rejected
    assert r.stats.accepted == len(r.sigmas) - 1


@pytest.mark.parametrize("name", ["unipc", "dopri5"])
def test_max_nfe_is_a_hard_bound_at_every_budget(name):
    """The solve that needs N evaluations finishes with max_nfe=N; below N it stops with at most the
    budget spent, never one evaluation more."""
    gauss, noise = _setup()
    adaptive = flowdiff.Adaptive(rtol=1e-4, atol=1e-4)
    need = flowdiff.generate(gauss.flow(), noise, solver=name, adaptive=adaptive).stats.nfe
    done = flowdiff.generate(gauss.flow(), noise, solver=name, adaptive=flowdiff.Adaptive(
        rtol=1e-4, atol=1e-4, max_nfe=need))
    assert done.stats.nfe == need
    for budget in sorted({1, 2, 5, need // 2, need - 1}):
        flow, calls = counting(gauss.flow())
        with pytest.raises(SolveError, match=f"max_nfe={budget} reached") as info:
            flowdiff.generate(flow, noise, solver=name, adaptive=flowdiff.Adaptive(rtol=1e-4, atol=1e-4,
                                                                                   max_nfe=budget))
        assert len(calls) == info.value.stats.nfe <= budget


def test_first_step_saves_the_estimate_evaluation():
    """Without ``first_step`` the loop spends one evaluation on Hairer's starting-step estimate; given
    one, a solve that takes the same accepted and rejected steps costs that evaluation less."""
    gauss, noise = _setup()
    flow, calls = counting(gauss.flow())
    tol = 1e-3
    auto = flowdiff.generate(flow, noise, solver="dopri5", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
    n_auto = len(calls)
    first = auto.sigmas[0], auto.sigmas[1]
    c = gauss.schedule.sigma_min
    h = float(torch.log(torch.tensor((first[0] + c) / (first[1] + c))))
    calls.clear()
    given = flowdiff.generate(flow, noise, solver="dopri5",
                              adaptive=flowdiff.Adaptive(rtol=tol, atol=tol, first_step=h))
    assert (given.stats.accepted, given.stats.rejected) == (auto.stats.accepted, auto.stats.rejected)
    assert len(calls) == given.stats.nfe == n_auto - 1


def _decay(t, y):
    return -y


def test_stop_ends_the_controlled_steps_and_the_next_part_starts_there():
    """ErrorControl(stop=...) is asked after each accepted step; when it says so, the controlled part ends
    at that time and a Chain part given as a function of time starts there, in the same solve."""
    from solvers import Chain, ErrorControl, FixedGrid, integrate

    asked, built = [], []

    def stop(t, y, state):
        asked.append(t)
        return t >= 0.5

    def rest(t):
        built.append(t)
        return FixedGrid([t, 1.0])

    y0 = torch.ones(3, dtype=torch.float64)
    sol = integrate(_decay, y0, "bosh3", Chain([ErrorControl(0.0, 1.0, rtol=1e-6, atol=1e-6, stop=stop), rest]))
    assert built == [asked[-1]] and 0.5 <= built[0] < 1.0
    assert sol.ts[-2:] == [built[0], 1.0]
    assert asked == sol.ts[1:-1]  # once per accepted step of the controlled part, never for a rejected one
    assert sol.stats.accepted == len(sol.ts) - 1
    plain = integrate(_decay, y0, "bosh3", ErrorControl(0.0, 1.0, rtol=1e-6, atol=1e-6))
    assert plain.ts[: len(asked) + 1] == sol.ts[:-1]  # the same steps up to the stop


def test_stop_and_chain_parts_of_the_wrong_kind_are_refused():
    from solvers import Chain, ErrorControl, FixedGrid, integrate

    with pytest.raises(TypeError, match="stop must be callable"):
        ErrorControl(0.0, 1.0, stop=0.5)
    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="Chain part 0 must be a solvers.Stepping, got function"):
        integrate(_decay, y0, "euler", Chain([lambda t: FixedGrid([t, 1.0])]))
    with pytest.raises(TypeError, match="Chain part 1 must be a solvers.Stepping or a function"):
        integrate(_decay, y0, "euler", Chain([FixedGrid([0.0, 0.5]), 3]))
    with pytest.raises(Exception, match="Chain part 1 \\(a function\\) must return a solvers.Stepping, got list"):
        integrate(_decay, y0, "euler", Chain([FixedGrid([0.0, 0.5]), lambda t: [t, 1.0]]))


def test_step_weight_multiplies_each_steps_norm():
    """ErrorControl(step_weight=w) takes the steps the norm times w(t0, t1) would take, and w is asked with
    the ends of every step tried (accepted or rejected)."""
    from solvers import ErrorControl, integrate, rms_norm

    y0 = torch.ones(3, dtype=torch.float64)
    norm = rms_norm(1e-6, 1e-6)
    asked = []

    def weight(t0, t1):
        asked.append((t0, t1))
        return 0.1 + t0  # a share that depends on the step

    weighted = integrate(_decay, y0, "bosh3", ErrorControl(0.0, 2.0, rtol=1e-6, atol=1e-6, norm=norm,
                                                           step_weight=weight))
    plain = integrate(_decay, y0, "bosh3", ErrorControl(0.0, 2.0, rtol=1e-6, atol=1e-6, norm=norm))
    assert weighted.stats.nfe < plain.stats.nfe  # a share below 1 early on: longer steps there
    assert len(asked) == weighted.stats.steps
    accepted = list(zip(weighted.ts, weighted.ts[1:]))
    assert [a for a in asked if a in accepted] == accepted


def test_step_weight_of_the_wrong_kind_is_refused():
    from solvers import ErrorControl, integrate

    with pytest.raises(TypeError, match="step_weight must be callable"):
        ErrorControl(0.0, 1.0, step_weight=0.5)
    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(SolveError, match=r"step_weight\(0.0, .*\) must be a finite number > 0, got -1.0"):
        integrate(_decay, y0, "bosh3", ErrorControl(0.0, 1.0, step_weight=lambda t0, t1: -1.0))


def _ramp(t, y):
    return torch.full_like(y, t)


@pytest.mark.parametrize("startup_order", [False, True])
def test_startup_order_retries_a_rejected_first_step_where_its_estimate_says(startup_order):
    """y' = t from y(0) = 0 with ``abm``: the first step's predictor is Euler, its corrector the trapezoid (exact
    here), so Milne's estimate is h²/2 exactly and, with a pure absolute tolerance, the ratio is r = h²/(2·atol).
    A first step at r = 16 is retried at h·0.9·16^(-1/k): with ``startup_order`` k = 2 (the first step's estimate
    is of order 1), which lands at r = 0.81 and is accepted after one rejection; with the method's k = 4 it is
    shrunk too little and rejected again. Every evaluation is counted either way."""
    from solvers import ErrorControl, integrate

    h0, calls = 0.5, []
    atol = h0**2 / 32  # r(h0) = 16

    def f(t, y):
        calls.append(t)
        return _ramp(t, y)

    controller = StepController(startup_order=startup_order)
    sol = integrate(f, torch.zeros(3, dtype=torch.float64), "abm",
                    ErrorControl(0.0, 4.0, rtol=0.0, atol=atol, first_step=h0, controller=controller))
    assert sol.stats.nfe == len(calls)
    assert sol.stats.steps == sol.stats.accepted + sol.stats.rejected
    first = sol.ts[1]
    if startup_order:
        assert first == pytest.approx(h0 * 0.9 / 4, rel=1e-12)  # safety · 16^(-1/2)
        assert (first**2 / (2 * atol)) == pytest.approx(0.81, rel=1e-12)
    rejected_first = sol.stats.rejected  # later steps: AB2 is exact for y' = t, no rejection
    assert rejected_first == (1 if startup_order else 3)
    assert torch.allclose(sol.y, torch.full((3,), 8.0, dtype=torch.float64), rtol=0, atol=1e-12)


def test_startup_order_is_the_history_a_step_is_built_on():
    """``Adams.error_order_at(t0, state)``: the derivatives the step from t0 will use (f(t0, y0) counted once,
    whether the state holds it or the step evaluates it), capped at the method's order."""
    import solvers
    from solvers import Derivative
    from solvers._multistep import History

    unipc = solvers.get("unipc", order=3)
    k = torch.zeros(2)
    assert unipc.error_order_at(0.0, None) == 1
    assert unipc.error_order_at(0.0, Derivative(0.0, k)) == 1
    assert unipc.error_order_at(1.0, Derivative(0.0, k)) == 2
    assert unipc.error_order_at(1.0, History.of(1.0, k, ((0.0, k),))) == 2
    assert unipc.error_order_at(2.0, History.of(1.0, k, ((0.0, k),))) == 3
    assert unipc.error_order_at(3.0, History.of(2.0, k, ((1.0, k), (0.0, k)))) == 3
    assert solvers.get("unipc", order=2).error_order_at(3.0, History.of(2.0, k, ((1.0, k), (0.0, k)))) == 2


@pytest.mark.parametrize("name", ["unipc", "abm"])
def test_startup_order_keeps_the_tolerance_and_counts_every_evaluation(name):
    """With ``startup_order`` the image still tracks the tolerance (within the factor ``tests/test_adaptive.py``
    states for these methods, slope > 0.5 over three decades) and every evaluation, rejected steps' included, is
    counted."""
    import dataclasses

    import numpy as np

    from flowdiff.api.adaptive import MULTISTEP_CONTROLLER

    gauss, noise = _setup()
    ramped = dataclasses.replace(MULTISTEP_CONTROLLER, startup_order=True)
    assert ramped == StepController(factor_max=2.5, startup_order=True)  # as README spells it
    s_max = gauss.schedule.sigma_max
    exact = gauss.solution(noise * (1 + s_max**2) ** 0.5, s_max, 0.0)
    tols, errs = [1e-3, 1e-4, 1e-5, 1e-6], []
    for tol in tols:
        flow, calls = counting(gauss.flow())
        r = flowdiff.generate(flow, noise, solver=name, adaptive=flowdiff.Adaptive(rtol=tol, atol=tol,
                                                                                 controller=ramped))
        assert r.stats.nfe == len(calls)
        assert r.stats.steps == r.stats.accepted + r.stats.rejected
        errs.append(float((r.x - exact).pow(2).mean().sqrt()))
        assert tol / 100 < errs[-1] < 5 * tol, (name, tol, errs[-1])
    assert np.polyfit(np.log(tols), np.log(errs), 1)[0] > 0.5, errs


def test_startup_order_must_be_a_bool():
    with pytest.raises(TypeError, match="startup_order must be True or False, got 1"):
        StepController(startup_order=1)
