"""New-user sweep 13: ``solvers/`` used as a standalone ODE library, by someone who uses torchdiffeq's ``odeint`` today.

Each test names what such a user saw before the fix. The problems are ODEs with closed-form solutions (a harmonic
oscillator, linear systems), not diffusion; torchdiffeq is the reference where it has the same method.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import solvers
from solvers import ButcherTableau, SolveError

ROOT = Path(__file__).resolve().parents[1]
OSCILLATOR = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)


def oscillator(t: float, y: torch.Tensor) -> torch.Tensor:
    return y @ OSCILLATOR.T


def exact_oscillator(y0: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    return y0 @ torch.linalg.matrix_exp(OSCILLATOR * (t1 - t0)).T


def _fresh_name(stem: str) -> str:
    n = 0
    while f"{stem}{n}" in solvers.describe():
        n += 1
    return f"{stem}{n}"


# -- a custom tableau, and the registry ------------------------------------------------------------------------

# SSPRK3 (Shu & Osher): third order, three stages
SSPRK3 = ButcherTableau(c=(0.0, 1.0, 0.5), a=((1.0,), (0.25, 0.25)), b=(1 / 6, 1 / 6, 2 / 3))


def _slope(method: solvers.Solver, ns=(16, 32)) -> float:
    y0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    errs = [float((solvers.solve(oscillator, y0, torch.linspace(0, 1, n + 1, dtype=torch.float64), method).y
                   - exact_oscillator(y0, 0.0, 1.0)).abs().max()) for n in ns]
    return math.log(errs[0] / errs[1]) / math.log(ns[1] / ns[0])


def test_a_tableau_that_lacks_the_order_it_claims_is_refused():
    """Was: ``ExplicitRK("mine", tableau, 3)`` with a mistyped weight (row sums and Σb = 1 still right) was accepted
    and converged at order 1, silently; the tableau's own check looked only at row sums and Σb."""
    assert _slope(solvers.ExplicitRK("ssprk3", SSPRK3, 3)) == pytest.approx(3, abs=0.15)
    wrong = ButcherTableau(c=(0.0, 1.0, 0.5), a=((1.0,), (0.25, 0.25)), b=(0.5, 0.25, 0.25))
    with pytest.raises(ValueError, match=r"ExplicitRK 'mine'.*do not have order 3.*tree \[τ\] \(order 2\).*1/2"):
        solvers.ExplicitRK("mine", wrong, 3)
    assert _slope(solvers.ExplicitRK("mine", wrong, 1)) == pytest.approx(1, abs=0.15)  # what it really is
    # an embedded pair whose error weights do not give the embedded method its order
    pair = solvers.get("bosh3").tableau
    bad = ButcherTableau(c=pair.c, a=pair.a, b=pair.b, b_error=(0.1, -0.1, 0.0, 0.0))
    with pytest.raises(ValueError, match="embedded weights b - b_error do not have order 2"):
        solvers.ExplicitRK("mine", bad, 3, error_order=2)


@pytest.mark.parametrize("name", [n for n in solvers.available() if isinstance(solvers.get(n), solvers.ExplicitRK)])
def test_every_registered_tableau_has_exactly_its_order(name):
    """The check passes every registered method, and each claims the most it has (not one order less)."""
    method = solvers.get(name)
    method.tableau.check_order(method.order)
    with pytest.raises(ValueError, match=f"do not have order {method.order + 1}"):
        method.tableau.check_order(method.order + 1)
    if method.adaptive:
        method.tableau.check_order(method.error_order, embedded=True)
        with pytest.raises(ValueError):
            method.tableau.check_order(method.error_order + 1, embedded=True)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(c=(0.0, "1"), a=((1.0,),), b=(0.5, 0.5)), TypeError, "entry 1 of c must be a real number, got '1'"),
    (dict(c=(0.0, 1.0), a=((torch.tensor(1.0),),), b=(0.5, 0.5)), TypeError, "entry 0 of row 1 of a"),
    (dict(c=(0.0, 1.0), a=((1.0,),), b=(math.nan, 0.5)), ValueError, "entry 0 of b must be finite"),
    (dict(c=(0.0, 1.0), a=((1.0,),), b="ab"), TypeError, "b must be a tuple of numbers, got str"),
])
def test_tableau_entries_are_numbers(kwargs, error, match):
    """Was: a string entry failed with Python's bare "must be real number, not str"; a tensor entry was stored."""
    with pytest.raises(error, match=match):
        ButcherTableau(**kwargs)


def test_a_tableau_given_as_lists_is_stored_as_tuples_and_hashable():
    tableau = ButcherTableau(c=[0.0, 1.0], a=[[1.0]], b=[0.5, 0.5])
    assert tableau == solvers.get("heun").tableau and hash(tableau) == hash(solvers.get("heun").tableau)


def test_register_refuses_what_cannot_build_a_solver():
    """Was: ``register("x", 3)`` was accepted and ``get("x")`` failed with "'int' object is not callable"; a factory
    returning something else broke ``get`` ("cannot create weak reference") and ``available(adaptive=True)`` for
    every user ("'int' object has no attribute 'adaptive'")."""
    with pytest.raises(TypeError, match="factory must be a callable"):
        solvers.register(_fresh_name("sweep13_"), 3)
    with pytest.raises(TypeError, match="factory must be a callable"):
        solvers.register(_fresh_name("sweep13_"), solvers.get("rk4"))  # an instance, not a factory
    name = _fresh_name("sweep13_")
    solvers.register(name, lambda: solvers.ExplicitRK("not_" + name, SSPRK3, 3))
    with pytest.raises(TypeError, match=f"registered as '{name}' built a solver named 'not_{name}'"):
        solvers.get(name)
    name = _fresh_name("sweep13_")
    solvers.register(name, lambda: solvers.ExplicitRK(name, SSPRK3, 3), "SSPRK3")
    assert solvers.get(name).order == 3 and solvers.describe()[name] == "SSPRK3"


def test_a_fixed_runge_kutta_method_has_no_options():
    """Was: ``get("euler", order=2)`` said "it accepts: error_order", an option no fixed method can take
    (``get("heun", error_order=1)`` then failed: no embedded method)."""
    with pytest.raises(TypeError, match="it accepts: no options"):
        solvers.get("euler", order=2)
    with pytest.raises(TypeError, match="unknown option"):
        solvers.get("heun", error_order=1)


def test_available_flags_are_bools():
    """Was: ``available(adaptive="yes")`` returned [] (no solver's flag equals a string)."""
    with pytest.raises(TypeError, match="adaptive must be True, False or None, got 'yes'"):
        solvers.available(adaptive="yes")
