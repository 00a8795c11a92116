"""The solver layer on its own: ODEs over tensors, no diffusion."""

import math

import numpy as np
import pytest
import torch

import solvers
from solvers import ButcherTableau, SolveError


def _linear_problem(device="cpu"):
    """dy/dt = A(t) y with y(0) = y0: y(t) = exp(-(t + t²)/2 ... ) closed form per component."""
    rates = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, device=device)

    def f(t, y):
        return -rates * (1.0 + t) * y

    def exact(t, y0):
        return y0 * torch.exp(-rates * (t + 0.5 * t * t))

    return f, exact


def _global_error(name, n, t0=0.0, t1=1.0, device="cpu"):
    f, exact = _linear_problem(device)
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, device=device)
    ts = np.linspace(t0, t1, n + 1)
    sol = solvers.solve(f, y0, ts, name)
    assert sol.y.device == y0.device
    return float((sol.y - exact(t1, y0) / exact(t0, torch.ones_like(y0))).abs().max())


@pytest.mark.parametrize("name", solvers.available())
def test_convergence_order_by_slope_fit(name, device):
    solver = solvers.get(name)
    # A self-started multistep method is limited by its lower-order first steps (fixed_grid_order).
    order = getattr(solver, "fixed_grid_order", solver.order)
    # Step counts where the error is in the asymptotic range and far above rounding.
    base = {1: 64, 2: 32, 3: 16, 4: 8, 5: 8}.get(order, 2)
    ns = [base * 2**k for k in range(4)]
    errs = [_global_error(name, n, device=device) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    # High orders start pre-asymptotic (the fitted slope overshoots); a wrong coefficient drops the order.
    assert abs(slope - order) < max(0.35, 0.12 * order), (name, slope, errs)


@pytest.mark.parametrize("name", solvers.available())
def test_nfe_counts_every_evaluation_both_directions(name):
    calls = []

    def f(t, y):
        calls.append(t)
        return torch.cos(t * y)

    y0 = torch.ones(2, dtype=torch.float64)
    for ts in (np.linspace(0, 1, 6), np.linspace(1, 0, 6)):
        for eval_end in (True, False):
            calls.clear()
            sol = solvers.solve(f, y0, ts, name, eval_end=eval_end)
            assert sol.stats.nfe == len(calls) == solvers.nfe_for_steps(name, 5, eval_end=eval_end)
            assert sol.stats.steps == sol.stats.accepted == 5
            if not eval_end:
                assert ts[-1] not in calls


@pytest.mark.parametrize("name", solvers.available())
def test_steps_for_nfe_never_exceeds_budget_and_is_maximal(name):
    for budget in (14, 20, 41):
        try:
            steps = solvers.steps_for_nfe(name, budget)
        except ValueError:
            assert solvers.nfe_for_steps(name, 1) > budget
            continue
        assert solvers.nfe_for_steps(name, steps) <= budget < solvers.nfe_for_steps(name, steps + 1)


def test_one_evaluation_solvers_hit_budget_exactly():
    assert solvers.nfe_for_steps("euler", solvers.steps_for_nfe("euler", 17)) == 17


def test_reverse_time_is_the_same_code():
    f, exact = _linear_problem()
    y0 = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    fwd = solvers.solve(f, y0, np.linspace(0, 1, 200), "rk4")
    back = solvers.solve(f, fwd.y, np.linspace(1, 0, 200), "rk4")
    assert torch.allclose(back.y, y0, rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", solvers.available(adaptive=True))
def test_adaptive_error_tracks_tolerance(name):
    f, exact = _linear_problem()
    y0 = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    errs, nfes = [], []
    for tol in (1e-4, 1e-7):
        sol = solvers.solve_adaptive(f, y0, 0.0, 1.0, name, rtol=tol, atol=tol)
        errs.append(float((sol.y - exact(1.0, y0)).abs().max()))
        nfes.append(sol.stats.nfe)
        assert sol.stats.accepted + sol.stats.rejected == sol.stats.steps
        assert sol.ts[-1] == 1.0
    assert errs[1] < errs[0] and nfes[1] > nfes[0]
    assert errs[1] < 1e-5


def test_adaptive_counts_and_reuses_derivatives():
    calls = []

    def f(t, y):
        calls.append(t)
        return -y

    sol = solvers.solve_adaptive(f, torch.ones(1, dtype=torch.float64), 0.0, 5.0, "dopri5", rtol=1e-6, atol=1e-9)
    assert sol.stats.nfe == len(calls)
    # FSAL: 6 new evaluations per attempted step, plus the two of the initial-step heuristic.
    assert sol.stats.nfe == 6 * sol.stats.steps + 2


def test_max_nfe_guard_reports_partial_stats():
    with pytest.raises(SolveError, match="max_nfe=30") as info:
        solvers.solve_adaptive(lambda t, y: math.cos(50 * t) * y, torch.ones(1, dtype=torch.float64),
                               0.0, 10.0, "bosh3", rtol=1e-10, atol=1e-12, max_nfe=30)
    # a hard bound: the step that would pass it is not taken (3 evaluations a bosh3 step, FSAL)
    assert 30 - 3 < info.value.stats.nfe <= 30 and info.value.stats.accepted > 0


def test_adaptive_needs_error_estimate():
    with pytest.raises(ValueError, match="no error estimate"):
        solvers.solve_adaptive(lambda t, y: y, torch.ones(1), 0.0, 1.0, "rk4")


def test_tableau_checks_itself():
    with pytest.raises(ValueError, match="row 1 of a sums"):
        ButcherTableau(c=(0.0, 0.5), a=((0.4,),), b=(0.0, 1.0))
    with pytest.raises(ValueError, match="b sums"):
        ButcherTableau(c=(0.0, 0.5), a=((0.5,),), b=(0.5, 0.6))
    assert ButcherTableau.from_torchdiffeq(
        __import__("torchdiffeq._impl.dopri5", fromlist=["x"])._DORMAND_PRINCE_SHAMPINE_TABLEAU).fsal


def test_registry_errors_list_the_valid_choices():
    with pytest.raises(ValueError, match="unknown solver 'eulr'.*euler"):
        solvers.get("eulr")
    with pytest.raises(TypeError, match="unknown option"):
        solvers.get("euler", lam=0.5)
    caps = {n: solvers.get(n) for n in solvers.available()}
    assert set(solvers.available(adaptive=True)) == {n for n, s in caps.items() if s.adaptive}


def test_bad_grids_are_rejected():
    y0 = torch.ones(1)
    with pytest.raises(ValueError, match="strictly monotone"):
        solvers.solve(lambda t, y: y, y0, [0.0, 0.5, 0.5, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        solvers.solve(lambda t, y: y, y0, [0.0])
    with pytest.raises(ValueError, match="finite"):
        solvers.solve(lambda t, y: y, y0, [0.0, math.inf])


def test_nonfinite_field_is_located_by_step():
    def f(t, y):
        return y * (math.nan if t >= 0.45 else 1.0)

    with pytest.raises(SolveError, match=r"step 5 \(t 0.5 -> 0.6\).*non-finite") as info:
        solvers.solve(f, torch.ones(2), np.linspace(0, 1, 11), "euler")
    assert info.value.step == 5


def test_exceptions_in_the_field_are_located():
    def f(t, y):
        if t > 0.25:
            raise ValueError("bad shape")
        return y

    with pytest.raises(SolveError, match=r"step 3 .*bad shape"):
        solvers.solve(f, torch.ones(2), np.linspace(0, 1, 11), "euler")
