"""Changes of variables of the probability-flow ODE, so that a solver sees the ODE it was built for.

The flow is ``dx̄/dσ = ε(x̄, σ)``. Some methods are designed for other variables; the solver
stays diffusion-agnostic (it integrates ``dy/dt = f(t, y)``) and the change of variables
lives here:

* ``"sigma"`` — t = σ, y = x̄, f = ε. DDIM is Euler here; k-diffusion's lms is Adams here.
* ``"data"`` — t = ρ = 1/σ, y = x̄/σ, f = D = x̄ − σ·ε (the model's denoised image):

      dy/dρ = D(x̄, σ),

  since dy/dσ = ε/σ − x̄/σ² = −D/σ² and dρ/dσ = −1/σ². Euler here is again DDIM; Adams
  methods whose derivative polynomial is in λ = log ρ are the multistep exponential
  integrators DPM-Solver++(2M/3M) (Lu et al. 2022) and UniPC (Zhao et al. 2023).
  σ = 0 is ρ = ∞, so the stretch touching σ = 0 is taken in x̄: into σ = 0 the image is
  ``lim_{σ→0} D(x̄(σ), σ)``, read off the last denoised value(s) (see :func:`finish_at_zero`);
  out of σ = 0 (encoding) the first step is Euler in σ (DDIM), which never divides by σ.
* ``"logsigma"`` — t = τ = log(σ + c), y = x̄, f = (σ + c)·ε, for adaptive Runge–Kutta:
  steps are relative in σ ≫ c (log σ), and σ = 0 is the finite τ = log c, reached exactly
  without dividing by σ. c defaults to the schedule's smallest trained σ.

A solver names the variables it wants with its ``variables`` attribute (``None``: σ).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import solvers
from solvers import Derivative, Solver, Stats

VARIABLES = ("sigma", "data", "logsigma")

#: ``eps_field(σ, x̄) -> ε`` as built by :meth:`flowdiff.ProbabilityFlow.field`.
EpsField = Callable[..., Tensor]


def variables_of(solver: Solver) -> str:
    """The variables a solver is meant to run in (``"sigma"`` unless it says otherwise)."""
    name = getattr(solver, "variables", None) or "sigma"
    if name not in VARIABLES:
        raise ValueError(f"solver {solver.name!r} asks for variables {name!r}; known: {', '.join(VARIABLES)}")
    return name


def grid_order(solver: Solver) -> int:
    """The convergence order of a fixed-grid generate into σ = 0 with ``solver``.

    A self-started multistep method is limited by its lower-order first steps
    (``fixed_grid_order``); in the data variables the step into σ = 0 is the denoised image,
    D = x̄(0) + O(σ²), a second-order step. (Methods in log time reach it on grids refined
    in log σ; on grids uniform in σ their last steps stay O(1) long in log σ.)
    """
    order = getattr(solver, "fixed_grid_order", solver.order)
    return min(order, 2) if variables_of(solver) == "data" else order


def data_field(eps: EpsField) -> Callable[[float, Tensor], Tensor]:
    """``f(ρ, y) = D(x̄, σ)`` with σ = 1/ρ, x̄ = y/ρ: the data-prediction ODE (ρ > 0)."""

    def f(rho: float, y: Tensor) -> Tensor:
        sigma = 1.0 / rho
        xbar = y * sigma
        return xbar - sigma * eps(sigma, xbar)

    return f


def logsigma_field(eps: EpsField, c: float, tau_zero: float) -> Callable[[float, Tensor], Tensor]:
    """``f(τ, x̄) = (σ + c)·ε(x̄, σ)`` with σ = e^τ − c (exactly 0 at ``tau_zero`` = log c)."""

    def f(tau: float, xbar: Tensor) -> Tensor:
        sigma = 0.0 if tau <= tau_zero else max(math.exp(tau) - c, 0.0)
        return eps(sigma, xbar) * (sigma + c)

    return f


def logsigma_time(sigma: float, c: float) -> float:
    return math.log(sigma + c)


def logsigma_sigma(tau: float, c: float, tau_zero: float) -> float:
    return 0.0 if tau <= tau_zero else max(math.exp(tau) - c, 0.0)


def finish_at_zero(state: Any, sigma_last: float, xbar_last: Tensor, eps: EpsField, *,
                   extrapolate: bool = False) -> tuple[Tensor, int]:
    """The image x̄(0) from the data-variables state at σ_last > 0, and the evaluations spent.

    Along a trajectory dD/dσ = −σ·dε/dσ vanishes at σ = 0, so D(x̄(σ), σ) = x̄(0) + O(σ²):
    the last denoised value alone is the image of DDIM's, DPM-Solver++'s and UniPC's last
    step. With the previous denoised value D₂ at σ₂ too (a multistep history), the O(σ²)
    term is removed (``extrapolate=True``; the adaptive solves use it) by extrapolating in σ² to 0:

        x̄(0) ≈ D₁ + σ₁²/(σ₂² − σ₁²)·(D₁ − D₂).

    A history holding D at ρ = 1/σ_last is reused (no evaluation); otherwise D is evaluated once.
    """
    rho = 1.0 / sigma_last
    pairs: list[tuple[float, Tensor]] = []
    if isinstance(state, Derivative):
        pairs = [(state.t, state.k), *getattr(state, "past", ())]
    spent = 0
    if not pairs or pairs[0][0] != rho:
        pairs.insert(0, (rho, xbar_last - sigma_last * eps(sigma_last, xbar_last)))
        spent = 1
    d1 = pairs[0][1]
    if not extrapolate or len(pairs) < 2 or not pairs[1][0] < rho:
        return d1, spent
    s1, s2 = sigma_last, 1.0 / pairs[1][0]
    return d1 + (d1 - pairs[1][1]) * (s1 * s1 / (s2 * s2 - s1 * s1)), spent


def solve_data(eps: EpsField, xbar0: Tensor, sigmas: list[float], solver: Solver, *,
               callback: Callable[[solvers.StepInfo], None] | None, check_finite: bool) -> solvers.Solution:
    """Run ``solver`` across the σ grid ``sigmas`` (either direction) in the data variables.

    Steps between positive σ are the solver's, in ρ = 1/σ; a step out of σ = 0 is Euler in σ
    and a step into σ = 0 is :func:`finish_at_zero`. Statistics count every evaluation.
    """
    start = time.perf_counter()
    stats = Stats()
    n = len(sigmas) - 1
    xbar = xbar0
    offset = 0
    pos = list(sigmas)
    if pos[0] == 0.0:  # encoding: leave σ = 0 by one Euler (DDIM) step
        xbar = xbar0 + pos[1] * eps(0.0, xbar0)
        stats.nfe += 1
        stats.steps += 1
        if callback is not None:
            callback(solvers.StepInfo(0, 0.0, pos[1], xbar))
        pos, offset = pos[1:], 1
    into_zero = pos[-1] == 0.0
    if into_zero:
        pos = pos[:-1]
    state: Any = None
    if len(pos) >= 2:
        def in_sigma(info: solvers.StepInfo) -> None:
            if callback is not None:
                callback(solvers.StepInfo(info.step + offset, 1.0 / info.t0, 1.0 / info.t1, info.y / info.t1))

        sol = solvers.solve(data_field(eps), xbar / pos[0], [1.0 / s for s in pos], solver,
                            callback=in_sigma if callback is not None else None, check_finite=check_finite,
                            time_name="ρ")
        xbar, state = sol.y * pos[-1], sol.state
        stats = stats + sol.stats
    if into_zero:
        xbar, spent = finish_at_zero(state, pos[-1], xbar, eps)
        stats.nfe += spent
        stats.steps += 1
        if callback is not None:
            callback(solvers.StepInfo(n - 1, pos[-1], 0.0, xbar))
        if check_finite and not bool(torch.isfinite(xbar).all()):
            raise solvers.SolveError(f"step {n - 1} (σ {pos[-1]:.6g} -> 0) produced non-finite values: the model "
                                     "returned NaN or inf", step=n - 1, t0=pos[-1], t1=0.0, stats=stats)
    stats.accepted = stats.steps
    stats.wall_time = time.perf_counter() - start
    return solvers.Solution(xbar, stats, None if into_zero else state, list(sigmas))
