"""solvers: ODE methods over tensors, and the drivers that run them.

This package knows ``dy/dt = f(t, y)`` and nothing of diffusion. A solver implements one
step (:class:`Solver`); the drivers :func:`solve` (a fixed grid, either direction) and
:func:`solve_adaptive` (error control) own the loop, the direction, NFE counting and the
statistics. Solvers are looked up by name in one registry: :func:`available`, :func:`get`.
"""

from . import _deis, _methods  # noqa: F401  (register DEIS and the Runge–Kutta methods)
from ._adaptive import ErrorNorm, StepController, rms_norm, solve_adaptive
from ._base import Derivative, Solver, StepResult, VectorField
from ._driver import Solution, StepInfo, check_grid, nfe_for_steps, solve, steps_for_nfe
from ._errors import SolveError
from ._multistep import IPNDM, Adams, DPMSolverPP2M, History, adams_weights
from ._newton import RootResult, newton_krylov
from ._registry import available, describe, get, register
from ._reversible import Reversible, ReversibleHeun, ReversibleState
from ._rk import ExplicitRK, lincomb
from ._stats import Stats
from ._tableau import ButcherTableau
from ._unsolve import unsolve

__all__ = [
    "Adams",
    "DPMSolverPP2M",
    "History",
    "IPNDM",
    "adams_weights",
    "ButcherTableau",
    "Derivative",
    "ErrorNorm",
    "ExplicitRK",
    "Reversible",
    "ReversibleHeun",
    "ReversibleState",
    "RootResult",
    "Solution",
    "SolveError",
    "Solver",
    "Stats",
    "StepController",
    "StepInfo",
    "StepResult",
    "VectorField",
    "available",
    "check_grid",
    "describe",
    "get",
    "lincomb",
    "newton_krylov",
    "nfe_for_steps",
    "register",
    "rms_norm",
    "solve",
    "solve_adaptive",
    "steps_for_nfe",
    "unsolve",
]
