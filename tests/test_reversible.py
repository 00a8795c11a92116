"""Reversible solvers: exact algebraic inverse, declared order by slope fit, exact NFE, clear errors.

Only :mod:`solvers` is used here (no diffusion): the problems are ODEs with closed-form
solutions or smooth nonlinear fields.
"""

import math

import numpy as np
import pytest
import torch

import solvers
from solvers import ReversibleState, SolveError, solve, unsolve

REVERSIBLE = [("reversible_heun", {}), ("reversible_heun", {"quantum": 2.0**-40}), ("reversible", {}),
              ("reversible", {"base": "heun"}),
              ("reversible", {"base": "rk4", "coupling": 0.99}), ("reversible", {"base": "midpoint", "coupling": 1.0})]
IDS = [f"{n}{o}" for n, o in REVERSIBLE]


def nonlinear(t: float, y: torch.Tensor) -> torch.Tensor:
    return math.cos(t) * torch.tanh(y) - 0.5 * y + math.sin(3 * t)


def linear(t: float, y: torch.Tensor) -> torch.Tensor:  # y' = -y t, y = y0 exp(-t²/2)
    return -t * y


def test_registered_and_queryable():
    assert set(solvers.available(reversible=True)) == {"reversible", "reversible_heun"}
    for name in solvers.available(reversible=True):
        s = solvers.get(name)
        assert s.reversible and s.name == name
    assert solvers.get("reversible", base="rk4").order == 4
    assert solvers.get("reversible_heun").order == 2


@pytest.mark.parametrize(("name", "opts"), REVERSIBLE, ids=IDS)
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_unsolve_inverts_solve_float64(name, opts, direction, device):
    gen = torch.Generator().manual_seed(1)
    y0 = torch.randn(3, 5, dtype=torch.float64, generator=gen).to(device)
    rng = np.random.default_rng(0)
    ts = (np.cumsum(rng.uniform(0.01, 0.2, 40)) * direction).tolist()  # an irregular grid
    s = solvers.get(name, **opts)
    sol = solve(nonlinear, y0, ts, s)
    back = unsolve(nonlinear, sol.y, ts, s, state=sol.state)
    assert back.y.device == y0.device and sol.state.z.device == y0.device
    assert torch.equal(back.y, back.y)  # finite
    assert (back.y - y0).abs().max().item() <= 1e-12
    assert back.ts == ts[::-1]
    assert back.state.t == ts[0]


@pytest.mark.parametrize(("name", "opts"), REVERSIBLE, ids=IDS)
def test_unsolve_inverts_solve_float32_to_rounding(name, opts, device):
    y0 = torch.randn(64, generator=torch.Generator().manual_seed(2)).to(device)
    ts = np.linspace(0.0, 2.0, 51).tolist()
    s = solvers.get(name, **opts)
    sol = solve(nonlinear, y0, ts, s)
    back = unsolve(nonlinear, sol.y, ts, s, state=sol.state)
    assert (back.y - y0).abs().max().item() <= 64 * torch.finfo(torch.float32).eps


@pytest.mark.parametrize(("name", "opts"), REVERSIBLE, ids=IDS)
def test_order_by_slope_fit(name, opts):
    s = solvers.get(name, **opts)
    y0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    exact = y0 * math.exp(-0.5 * 1.5**2)
    ns = [16, 32, 64, 128] if s.order < 4 else [8, 16, 32, 64]
    errs = [(solve(linear, y0, np.linspace(0, 1.5, n + 1).tolist(), s).y - exact).abs().max().item() for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - s.order) < 0.25, (name, opts, errs, slope)


@pytest.mark.parametrize(("name", "opts"), REVERSIBLE, ids=IDS)
def test_exact_nfe(name, opts):
    s = solvers.get(name, **opts)
    calls = {"n": 0}

    def f(t, y):
        calls["n"] += 1
        return -y

    n = 7
    ts = np.linspace(0, 1, n + 1).tolist()
    sol = solve(f, torch.ones(2, dtype=torch.float64), ts, s)
    assert sol.stats.nfe == calls["n"]
    back = unsolve(f, sol.y, ts, s, state=sol.state)
    assert back.stats.nfe == calls["n"] - sol.stats.nfe
    if name == "reversible_heun":
        assert (sol.stats.nfe, back.stats.nfe) == (n + 1, n)  # one evaluation a step, one to start
    else:
        per = 2 * solvers.nfe_for_steps(s.base, 1)
        assert (sol.stats.nfe, back.stats.nfe) == (per * n, per * n)
    assert solvers.nfe_for_steps(s, n) == sol.stats.nfe


def test_reversible_heun_is_its_own_inverse_with_negated_step():
    """Kidger et al.: the reverse step is the forward step with −h; unstep and step(t1 → t0) agree."""
    s = solvers.get("reversible_heun")
    y0 = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    fwd = s.step(nonlinear, 0.2, 0.5, y0, s.init(nonlinear, 0.2, y0))
    y_a, st_a = s.unstep(nonlinear, 0.2, 0.5, fwd.y, fwd.state)
    back = s.step(nonlinear, 0.5, 0.2, fwd.y, fwd.state)
    assert torch.allclose(y_a, back.y, rtol=0, atol=1e-15)
    assert torch.allclose(st_a.z, back.state.z, rtol=0, atol=1e-15)


def test_coupling_one_wrapper_is_not_damped_but_still_exact():
    s = solvers.get("reversible", coupling=1.0)
    y0 = torch.randn(6, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    ts = np.linspace(0, 1, 30).tolist()
    sol = solve(nonlinear, y0, ts, s)
    assert (unsolve(nonlinear, sol.y, ts, s, state=sol.state).y - y0).abs().max().item() < 1e-13


def test_generation_without_state_initialises_it():
    y0 = torch.ones(2, dtype=torch.float64)
    for name in solvers.available(reversible=True):
        sol = solve(linear, y0, np.linspace(0, 1, 11).tolist(), name)
        assert isinstance(sol.state, ReversibleState) and sol.state.t == 1.0


def test_bad_input():
    with pytest.raises(ValueError, match="coupling"):
        solvers.get("reversible", coupling=0.0)
    with pytest.raises(TypeError, match="coupling"):
        solvers.get("reversible", coupling="0.9")
    with pytest.raises(ValueError, match="base must be an explicit one-step"):
        solvers.get("reversible", base="reversible_heun")
    with pytest.raises(ValueError, match="unknown solver"):
        solvers.get("reversible", base="nope")
    y = torch.ones(2, dtype=torch.float64)
    with pytest.raises(TypeError, match="needs a reversible solver"):
        unsolve(linear, y, [0.0, 1.0], "euler", state=None)
    with pytest.raises(ValueError, match="carried state"):
        unsolve(linear, y, [0.0, 1.0], "reversible_heun", state=None)
    sol = solve(linear, y, [0.0, 0.5, 1.0], "reversible_heun")
    with pytest.raises(ValueError, match="another grid"):  # a state from a different grid (refused before the run)
        unsolve(linear, sol.y, [0.0, 0.5, 2.0], "reversible_heun", state=sol.state)
    with pytest.raises(ValueError, match="shape"):
        unsolve(linear, torch.ones(3, dtype=torch.float64), [0.0, 0.5, 1.0], "reversible_heun", state=sol.state)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_quantised_reversible_heun_inverts_to_the_last_bit(dtype, device):
    """With quantum=q the states stay on qℤ and every update is an exact addition: unsolve returns the (quantised)
    start bit for bit, on an irregular grid in either direction, where the plain method is only close."""
    q = 2.0**-40 if dtype == torch.float64 else 2.0**-18  # exact while |y| < 2^13 (float64), 2^6 (float32)
    y0 = torch.randn(3, 5, dtype=dtype, generator=torch.Generator().manual_seed(1)).to(device)
    ts = np.cumsum(np.random.default_rng(0).uniform(0.01, 0.2, 60)).tolist()
    exact = solvers.get("reversible_heun", quantum=q)
    for grid in (ts, ts[::-1]):
        sol = solve(nonlinear, y0, grid, exact)
        back = unsolve(nonlinear, sol.y, grid, exact, state=sol.state)
        assert torch.equal(back.y, torch.round(y0 / q) * q)
        assert (back.y - y0).abs().max().item() <= q / 2
    plain = solvers.get("reversible_heun")
    sol = solve(nonlinear, y0, ts, plain)
    assert not torch.equal(unsolve(nonlinear, sol.y, ts, plain, state=sol.state).y, y0)


def test_quantum_must_be_a_power_of_two():
    for bad in (0.0, -2.0**-10, 3e-10, float("inf"), True):
        with pytest.raises(ValueError, match="quantum must be a power of two"):
            solvers.get("reversible_heun", quantum=bad)


def test_nonfinite_located():
    def f(t, y):
        return y * (math.inf if t < 0.3 else 1.0)

    sol = solve(lambda t, y: y, torch.ones(2, dtype=torch.float64), [0.0, 0.5, 1.0], "reversible_heun")
    with pytest.raises(SolveError, match="inverse step 1"):
        unsolve(f, sol.y, [0.0, 0.5, 1.0], "reversible_heun", state=sol.state)
