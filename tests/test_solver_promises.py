"""The solver layer's own promises, on the kinds of test problem torchdiffeq and diffrax use (closed-form
scalar and linear ODEs): ``max_nfe`` is a hard bound, pure relative or pure absolute tolerances work, half
precision is judged in float32, a rejected first step does not evaluate ``f(t0, y0)`` again, and a vector
field's wrong value is refused on whichever call returns it."""

import math

import numpy as np
import pytest
import torch

import solvers
from solvers import SolveError

ADAPTIVE = solvers.available(adaptive=True)


def _sine_problem():
    """dy/dt = 2y/t + t⁴·sin 2t − t² + 4t³ on [1, 8] (torchdiffeq's "sine" problem), with its solution."""

    def f(t, y):
        return 2 * y / t + (t**4 * math.sin(2 * t) - t**2 + 4 * t**3)

    def exact(t):
        return (-0.5 * t**4 * math.cos(2 * t) + 0.5 * t**3 * math.sin(2 * t) + 0.25 * t**2 * math.cos(2 * t)
                - t**3 + 2 * t**4 + (math.pi - 0.25) * t**2)

    return f, exact


def _decay(rate=1.0):
    return lambda t, y: -rate * y


class _Recorder:
    """A vector field that records the (t, y) of every call."""

    def __init__(self, f):
        self.f, self.calls = f, []

    def __call__(self, t, y):
        self.calls.append((t, y.clone()))
        return self.f(t, y)


# -- max_nfe is a hard bound ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ADAPTIVE)
def test_max_nfe_is_a_hard_bound(name):
    f, exact = _sine_problem()
    y0 = torch.tensor([exact(1.0)], dtype=torch.float64)
    need = solvers.solve_adaptive(f, y0, 1.0, 8.0, name, rtol=1e-6, atol=1e-6).stats.nfe
    # exactly enough: the solve finishes, and has used every evaluation
    assert solvers.solve_adaptive(f, y0, 1.0, 8.0, name, rtol=1e-6, atol=1e-6, max_nfe=need).stats.nfe == need
    cost = max(getattr(solvers.get(name), "_stages", 2), 2)  # the most one step can cost
    for bound in (need - 1, need // 2, 3):
        rec = _Recorder(f)
        with pytest.raises(SolveError, match=f"max_nfe={bound} reached: .* was not taken") as info:
            solvers.solve_adaptive(rec, y0, 1.0, 8.0, name, rtol=1e-6, atol=1e-6, max_nfe=bound)
        stats = info.value.stats
        assert stats.nfe == len(rec.calls) <= bound  # never one evaluation past the bound
        assert stats.nfe > bound - cost  # the step refused was the one that would have passed it
        assert stats.steps == stats.accepted + stats.rejected
        assert info.value.t0 is not None


@pytest.mark.parametrize("name", ["rk4", "heun", "euler", "lms", "unipc"])
def test_max_nfe_bounds_a_fixed_grid_and_names_the_step(name):
    f = _decay()
    y0 = torch.ones(2, dtype=torch.float64)
    ts = np.linspace(0.0, 1.0, 11)
    need = solvers.solve(f, y0, ts, name).stats.nfe
    assert solvers.integrate(f, y0, name, solvers.FixedGrid(ts), max_nfe=need).stats.nfe == need
    where = r"max_nfe=.* reached: step \d+ \(t [0-9.]+ -> [0-9.]+\) was not taken"
    with pytest.raises(SolveError, match=where) as info:
        solvers.integrate(f, y0, name, solvers.FixedGrid(ts), max_nfe=need - 1)
    assert info.value.stats.nfe <= need - 1
    assert info.value.step == info.value.stats.steps  # the step not taken is the next one


def test_max_nfe_also_bounds_the_first_step_estimate_and_steps_of_unknown_cost():
    y0 = torch.ones(2, dtype=torch.float64)
    with pytest.raises(SolveError, match="max_nfe=1 reached: the first step's size estimate at t") as info:
        solvers.solve_adaptive(_decay(), y0, 0.0, 1.0, "dopri5", max_nfe=1)
    assert info.value.stats.nfe == 1

    class TwoStage(solvers.Solver):  # explicit midpoint, with no step_cost: the loop cannot know its cost
        name = "two_stage"
        order = 2

        def step(self, f, t0, t1, y0, state):
            h = t1 - t0
            return solvers.StepResult(y0 + h * f(t0 + h / 2, y0 + h / 2 * f(t0, y0)), None)

    rec = _Recorder(_decay())
    with pytest.raises(SolveError, match=r"max_nfe=5 reached: step 2 \(t 0.4 -> 0.6\) \(stopped at t 0.5\)") as info:
        solvers.integrate(rec, y0, TwoStage(), solvers.FixedGrid(np.linspace(0, 1, 6)), max_nfe=5)
    assert info.value.stats.nfe == len(rec.calls) == 5 and info.value.stats.accepted == 2


# -- tolerances --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["dopri5", "bosh3", "dopri8"])
@pytest.mark.parametrize("tols", [dict(rtol=1e-7, atol=0.0), dict(rtol=0.0, atol=1e-6)])
def test_pure_relative_or_pure_absolute_tolerance(name, tols):
    f, exact = _sine_problem()
    y0 = torch.tensor([exact(1.0)], dtype=torch.float64)
    sol = solvers.solve_adaptive(f, y0, 1.0, 8.0, name, **tols)
    ref = exact(8.0)
    # the global error follows the tolerance asked for (local errors add up over the ~10⁴-fold growth of y)
    bound = 1000 * (tols["rtol"] * abs(ref) + tols["atol"])
    assert abs(float(sol.y[0]) - ref) < bound
    # and tightening it tightens the result
    tighter = solvers.solve_adaptive(f, y0, 1.0, 8.0, name, **{k: v / 100 for k, v in tols.items()})
    assert abs(float(tighter.y[0]) - ref) < abs(float(sol.y[0]) - ref) or abs(float(tighter.y[0]) - ref) < 1e-9 * ref


def test_pure_relative_tolerance_with_a_zero_component():
    # y = (e^{-t}, 0): the second component is 0 with a zero derivative, 0/0 in a pure relative norm
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    sol = solvers.solve_adaptive(_decay(), y0, 0.0, 2.0, "dopri5", rtol=1e-8, atol=0.0)
    assert float(sol.y[1]) == 0.0
    assert abs(float(sol.y[0]) - math.exp(-2.0)) < 1e-6


def test_both_tolerances_zero_is_refused_by_name():
    with pytest.raises(ValueError, match="rtol=0 and atol=0"):
        solvers.solve_adaptive(_decay(), torch.ones(1), 0.0, 1.0, rtol=0.0, atol=0.0)


def test_rms_norm_of_half_precision_does_not_overflow():
    err = torch.full((4,), 10.0, dtype=torch.float16)
    y = torch.ones(4, dtype=torch.float16)
    value = float(solvers.rms_norm(1e-3, 1e-3)(err, y, y, 0.0))
    assert math.isfinite(value)
    assert value == pytest.approx(10.0 / (1e-3 + 1e-3), rel=1e-3)


def test_half_precision_solve_rejects_a_too_long_step_instead_of_failing():
    # A first step of the whole interval on dy/dt = -3y: its error is 0.35 and its scale 1e-3, so that
    # (error/scale)² ~ 1.2e5 is past float16's largest value (65504): the step must be rejected, not reported.
    y0 = torch.ones(3, dtype=torch.float16)
    sol = solvers.solve_adaptive(_decay(3.0), y0, 0.0, 1.0, "dopri5", rtol=1e-3, atol=1e-5, first_step=1.0)
    assert sol.stats.rejected >= 1 and sol.y.dtype == torch.float16
    assert float((sol.y.double() - math.exp(-3.0)).abs().max()) < 2e-3


# -- a rejected first step -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ADAPTIVE)
@pytest.mark.parametrize("first_step", [None, 1.0])
def test_rejected_first_step_reuses_the_first_evaluation(name, first_step):
    rec = _Recorder(_decay(20.0))
    y0 = torch.ones(2, dtype=torch.float64)
    sol = solvers.solve_adaptive(rec, y0, 0.0, 1.0, name, rtol=1e-6, atol=1e-6, first_step=first_step)
    assert sol.stats.nfe == len(rec.calls)
    at_start = [y for t, y in rec.calls if t == 0.0]
    assert len(at_start) == 1, f"{name}: f evaluated {len(at_start)} times at (t0, y0)"
    if first_step is not None:  # the whole interval on a stiff-ish decay: surely rejected
        assert sol.stats.rejected >= 1


# -- wrong values from the vector field -----------------------------------------------------------------

@pytest.mark.parametrize("bad, match", [
    (lambda y: (y,), "returned tuple"),
    (lambda y: y.float(), "torch.float32 tensor"),
    (lambda y: y[:1], "returned shape"),
])
@pytest.mark.parametrize("name", ["euler", "dopri5"])
def test_a_wrong_value_is_refused_on_any_call(bad, match, name):
    calls = []

    def f(t, y):
        calls.append(t)
        return bad(y) if len(calls) == 4 else -y

    with pytest.raises(SolveError, match=match):
        solvers.solve(f, torch.ones(2, dtype=torch.float64), np.linspace(0, 1, 6), name)
    assert len(calls) == 4


# -- log-time multistep weights away from t = 0 only -----------------------------------------------------

def _order_on(name, t0, t1, ns):
    # dy/dt = cos(t)·y + sin(3t): smooth in t through 0, not in log|t|; reference by a fine rk4 solve
    def f(t, y):
        return math.cos(t) * y + math.sin(3 * t)

    y0 = torch.tensor([0.7], dtype=torch.float64)
    ref = float(solvers.solve(f, y0, np.linspace(t0, t1, 4097), "rk4").y[0])
    errs = [abs(float(solvers.solve(f, y0, np.linspace(t0, t1, n + 1), name).y[0]) - ref) for n in ns]
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


@pytest.mark.parametrize("name", ["unipc", "dpmpp_3m"])
@pytest.mark.parametrize("interval", [(-1.0, 1.0), (1.0, -1.0), (-1.0, 0.0), (0.0, 1.0), (0.5, -0.25)])
def test_log_time_multistep_keeps_its_order_on_intervals_that_cross_or_touch_zero(name, interval):
    solver = solvers.get(name)
    slope, errs = _order_on(name, *interval, [32, 64, 128, 256])
    # (log-time weights next to 0 made unipc 1.6-2.4 here)
    assert abs(slope - solver.fixed_grid_order) < 0.35, (slope, errs)


@pytest.mark.parametrize("interval", [(-1.0, 1.3), (1.0, -1.0), (-1.0, 0.0), (0.0, 1.0), (0.5, -0.25)])
def test_dpmpp_2m_steps_in_t_where_on_interval_drops_log_time(interval):
    """DPM-Solver++(2M)'s own midpoint formula kept its log-time weights after ``on_interval`` had turned them off
    for a solve that crosses 0 (a generic ODE on [-1, 1.3]: order 1.7 instead of 2). There it is AB2 in t."""
    def f(t, y):
        return math.cos(3 * t) * y + t

    y0 = torch.tensor([0.7, -0.2], dtype=torch.float64)
    ts = np.linspace(*interval, 41)
    got = solvers.solve(f, y0, ts, "dpmpp_2m").y
    ab2 = solvers.solve(f, y0, ts, solvers.Adams("ab2", 2, log_time=False)).y
    torch.testing.assert_close(got, ab2, rtol=1e-13, atol=1e-15)
    # away from 0 its own formula is kept (and differs from AB2 in t)
    away = np.linspace(0.5, 2.0, 41)
    assert (solvers.solve(f, y0, away, "dpmpp_2m").y - solvers.solve(
        f, y0, away, solvers.Adams("ab2", 2, log_time=False)).y).abs().max() > 1e-6


def test_log_time_weights_are_kept_away_from_zero_and_dropped_across_it():
    solver = solvers.get("unipc")
    assert solver.on_interval(1.0, 2.0) is solver and solver.on_interval(-2.0, -0.5) is solver
    assert solver.on_interval(0.01, math.inf) is solver  # flowdiff's ρ = 1/σ runs out to ∞
    for a, b in [(-1.0, 1.0), (0.0, 1.0), (1.0, 0.0)]:
        in_t = solver.on_interval(a, b)
        assert not in_t.log_time and in_t.order == solver.order and in_t.name == solver.name
    # and the solve uses it: on [-1, 1] unipc is the classic Adams PEC of its order (abm's formula)
    f = lambda t, y: math.cos(t) * y  # noqa: E731
    ts = np.linspace(-1.0, 1.0, 21)
    y0 = torch.ones(1, dtype=torch.float64)
    unipc = solvers.solve(f, y0, ts, "unipc").y
    abm2 = solvers.solve(f, y0, ts, solvers.get("abm", order=2)).y
    assert torch.equal(unipc, abm2)
