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
