"""solvers: ODE methods over tensors, and the drivers that run them.

This package knows ``dy/dt = f(t, y)`` and nothing of diffusion. A solver implements one
step (:class:`Solver`); a stepping places the steps (:class:`FixedGrid`, :class:`ErrorControl`,
:class:`Chain`); :func:`integrate` is the one loop, which owns the direction, NFE counting,
the statistics, callbacks and failure reports. :func:`solve`, :func:`solve_adaptive` and
:func:`unsolve` are its common forms. Solvers are looked up by name in one registry:
:func:`available`, :func:`get`.
"""

from . import _deis, _methods  # noqa: F401  (register DEIS and the Runge–Kutta methods)
from ._adaptive import solve_adaptive
from ._base import Derivative, GridMismatch, Scaled, Shifted, Solver, StepResult, VectorField
from ._checks import check_state
from ._driver import FINAL_EULER, final_step_methods, nfe_for_steps, solve, steps_for_nfe, unsolve
from ._errors import SolveError, StepFailure
from ._integrate import (
    Bound,
    Chain,
    ErrorControl,
    ErrorNorm,
    FixedGrid,
    Solution,
    StepController,
    StepInfo,
    Stepping,
    check_grid,
    integrate,
    rms_norm,
)
from ._multistep import IPNDM, Adams, CorrectedAdams, DPMSolverPP2M, History, adams_weights
from ._registry import available, describe, get, options_of, register
from ._reversible import Reversible, ReversibleHeun, ReversibleState
from ._rk import ExplicitRK, lincomb
from ._roots.anderson import AndersonResult, anderson
from ._roots.newton import RootResult, newton_krylov
from ._stats import Stats
from ._tableau import ButcherTableau

__all__ = [
    "Adams",
    "AndersonResult",
    "anderson",
    "Bound",
    "Chain",
    "CorrectedAdams",
    "ErrorControl",
    "FINAL_EULER",
    "FixedGrid",
    "GridMismatch",
    "Stepping",
    "check_state",
    "final_step_methods",
    "integrate",
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
    "Scaled",
    "Shifted",
    "Solution",
    "SolveError",
    "Solver",
    "Stats",
    "StepFailure",
    "StepController",
    "StepInfo",
    "StepResult",
    "VectorField",
    "available",
    "check_grid",
    "describe",
    "get",
    "options_of",
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
