"""The flow solved in a formulation's variables: the one bridge from flowdiff to :func:`solvers.integrate`.

Every solve of the probability-flow ODE — fixed grid or adaptive, generate, encode or a
reversible decode — is :func:`solve_flow`: the formulation gives the field, the state and
the time, the stepping places the steps, and :func:`solvers.integrate` runs the one loop.
This module converts the start into the formulation's state, the callback's records and the
result back into σ and x̄, and reports failures in σ.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor

import solvers
from solvers import Solver, Stats, Stepping

from .adjoint import differentiated, integrate_adjoint, warn_unrecorded
from .formulations import EpsField, Formulation
from .results import Saver, StepState

_BOUND_NAME = "max|x| (the VP-scaled state x̄/√(1+σ²))"


@dataclass
class FlowSolution:
    """The end of a solve: ``xbar``, the state ``y`` in the formulation's variables, the
    statistics, the solver's carried state (timed in σ) and the times visited (``sigmas``: as σ)."""

    xbar: Tensor
    y: Tensor
    stats: Stats
    state: Any
    times: list[float]
    form: Formulation

    @property
    def sigmas(self) -> np.ndarray:
        """The σ values visited (mapped back from the formulation's times when asked)."""
        return np.array([self.form.sigma(t) for t in self.times], dtype=np.float64)


def _scaled(form: Formulation, y: Tensor, t: float) -> tuple[Tensor, Tensor]:
    """The VP-scaled state x and x̄ of the formulation's state ``y`` at time ``t`` (what a record holds)."""
    return y * form.x_factor(t), form.to_xbar(y, t)


def _records(form: Formulation, callback: Callable[[StepState], None]) -> Callable[[solvers.StepInfo], None]:
    saver = callback if isinstance(callback, Saver) else None

    def record(info: solvers.StepInfo) -> None:
        t = info.t1
        if saver is not None:
            saver.at_state(info.y, t)
        callback(StepState(info.step, form.sigma(t), *_scaled(form, info.y, t), form.denoised(t, info.y, info.state)))

    return record


def _solve_adjoint(field: Callable[[float, Tensor], Tensor], form: Formulation, start: Tensor, solver: Solver,
                   stepping: Stepping, state: Any, callback: Callable[[StepState], None] | None, adjoint: str,
                   params: tuple[Tensor, ...], options: dict[str, Any]) -> solvers.Solution:
    """The solve differentiated by ``adjoint``: the states a :class:`Saver` keeps are outputs of the solve's node
    (their x and x̄ differentiated from them here); a user's callback's states carry no gradient, and it warns."""
    saver = callback if isinstance(callback, Saver) else None
    user = saver.callback if saver is not None else callback
    grads = differentiated(start, state, params)
    if grads and user is not None:
        warn_unrecorded(adjoint)
    save_at = None if saver is None else (lambda info: saver.keeps(form.sigma(info.t1)))
    sol = integrate_adjoint(field, start, solver, stepping, adjoint=adjoint, params=params, state=state,
                            save_at=save_at, save_state=saver is not None and saver.save.denoised, **options)
    for step, saved in sol.saved.items():  # the records again, from the node's outputs: the same values, with a graph
        denoised = form.denoised(saved.t, saved.y, saved.state)
        if denoised is None and saved.f is not None:  # as Saver.tap reads it off the next step's evaluation
            denoised = form.denoised(saved.t, saved.y, solvers.Derivative(saved.t, saved.f))
        saver.differentiable(step, *_scaled(form, saved.y, saved.t), denoised)
    return sol


#: The divergence guard's defaults: a solve fails when the VP-scaled state at its end,
#: max|x̄|/√(1+σ²), exceeds this multiple of max(1, max|input|) (the images' or the noise's
#: scale). An encode's end is a latent x_T meant to be distributed like N(0, I): 50× the
#: images' scale is far outside it (the unstable encodes this guard was made for reached
#: |x_T| ~ 1e3). A generation's end is an image, whose range depends on the model (a toy ε
#: that does not scale like x̄/σ legitimately reaches σ_max·max|ε|): the bound is looser.
DIVERGENCE_ENCODE = 50.0
DIVERGENCE_GENERATE = 1000.0


def divergence_limit(divergence: float | None, start: Tensor) -> float | None:
    """The absolute bound on the VP-scaled end state: ``divergence × max(1, max|start|)`` (None: off).

    ``start`` is what the solve starts from in the VP scale (noise, images, a latent's x_T);
    its maximum is read once, before the loop."""
    if divergence is None:
        return None
    if isinstance(divergence, bool) or not isinstance(divergence, (int, float)) or not (
            math.isfinite(divergence) and divergence > 0):
        raise ValueError(f"divergence must be a positive number (a multiple of max(1, max|input|)) or None "
                         f"to turn the guard off, got {divergence!r}")
    scale = float(start.detach().abs().amax()) if start.numel() else 0.0
    return float(divergence) * max(1.0, scale if math.isfinite(scale) else 1.0)


def solve_flow(
    eps: EpsField,
    form: Formulation,
    stepping: Stepping,
    solver: Solver,
    *,
    sigma0: float,
    xbar0: Tensor | None = None,
    y0: Tensor | None = None,
    state: Any = None,
    max_nfe: int | None = None,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    bound: float | None = None,
    adjoint: str = "autograd",
    params: tuple[Tensor, ...] = (),
) -> FlowSolution:
    """Solve ``dx̄/dσ = eps(σ, x̄)`` in ``form``'s variables from σ = ``sigma0``.

    The start is ``xbar0`` (converted) or ``y0`` already in the formulation's state (a
    reversible decode starts from the latent's own state, bit for bit). ``state`` is the
    solver's carried state timed in σ (a :class:`solvers.ReversibleState` from a Latent).
    ``bound`` (see :func:`divergence_limit`) fails the solve with a located
    :class:`solvers.SolveError` when the VP-scaled end state's max|x| exceeds it. ``adjoint``
    (``"checkpoint"``, ``"reversible"``) differentiates a fixed-grid solve with respect to the start,
    ``state`` and ``params`` by :func:`flowdiff.engine.adjoint.integrate_adjoint`.
    """
    if (xbar0 is None) == (y0 is None):
        raise ValueError("give xbar0 or y0")
    start = form.to_state(xbar0, sigma0) if y0 is None else y0
    field = form.field(eps)
    if isinstance(callback, Saver):  # x̂₀ of the saved states, read off the steps' own evaluations
        field = callback.tap(field, form.denoised, solver)
    options = dict(callback=None if callback is None else _records(form, callback), check_finite=check_finite,
                   time_name="σ", display=form.sigma,
                   bound=None if bound is None else solvers.Bound(bound, form.x_factor, _BOUND_NAME))
    if adjoint == "autograd":
        sol = solvers.integrate(field, start, solver, stepping, state=form.state_in(state), max_nfe=max_nfe,
                                **options)
    else:
        sol = _solve_adjoint(field, form, start, solver, stepping, form.state_in(state), callback, adjoint, params,
                             options)
    t_end = sol.ts[-1]
    return FlowSolution(form.to_xbar(sol.y, t_end), sol.y, sol.stats, form.state_out(sol.state), sol.ts, form)


def solve_grid(eps: EpsField, form: Formulation, sigmas: list[float], solver: Solver, *, xbar0: Tensor | None = None,
               y0: Tensor | None = None, eval_end: bool = True, state: Any = None,
               callback: Callable[[StepState], None] | None = None, check_finite: bool = True,
               bound: float | None = None, adjoint: str = "autograd", params: tuple[Tensor, ...] = ()) -> FlowSolution:
    """:func:`solve_flow` across the σ grid ``sigmas`` (either direction) with ``form``'s fixed stepping.

    A grid from σ = ∞ starts from ``y0`` = the noise (the state there in every formulation) and
    ``eps`` extended to σ = ∞ (:func:`flowdiff.engine.terminal.field_from_infinity`); its first step
    is the grid's boundary step, counted, timed, called back and located by the loop like the others."""
    if sigmas[0] == math.inf and y0 is None:
        raise ValueError("a grid from σ = ∞ starts from the noise itself: give y0, not xbar0")
    stepping = form.grid(sigmas, solver, eval_end=eval_end)
    if sigmas[0] == math.inf:
        boundary = stepping.methods.get(0)
        if state is None and boundary is not None and boundary.state_type is None:
            # the boundary step has its own method: no solver state (and no evaluation) at σ = ∞. Where the solver
            # itself steps from there (flow matching's t = 1), it starts afresh: a solver refuses a state not its own
            state = _NO_STATE
    return solve_flow(eps, form, stepping, solver, sigma0=sigmas[0], xbar0=xbar0, y0=y0, state=state,
                      callback=callback, check_finite=check_finite, bound=bound, adjoint=adjoint, params=params)


class _NoState:
    """The carried state before a boundary step that needs none: given so that the loop does not ask the
    solver's ``init`` (a reversible solver would evaluate the field there); the boundary step drops it."""

    def __repr__(self) -> str:
        return "NO_STATE"


_NO_STATE = _NoState()
