"""diffusers' DDIMInverseScheduler (and prompt-to-prompt's null-text inversion) as an encode method.

The proper Euler encode evaluates ε at the current state and the current noise level:
x̄_{n+1} = x̄_n + (σ_{n+1} − σ_n)·ε(x̄_n/√(1+σ_n²), t(σ_n)). DDIMInverse evaluates the model at
the current sample but with the *target* timestep: ε(x̄_n/√(1+σ_n²), t(σ_{n+1})). Both are
first order in the step; they differ by O(h) per step in where ε is sampled, and neither
decodes back exactly with DDIM. ``encode(..., solver="ddim_inverse")`` reproduces diffusers
to float rounding so that results obtained with it can be compared like for like.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from solvers import Derivative, Solver, StepResult


class DDIMInverse(Solver):
    """One DDIMInverse step: Euler with the model's timestep taken at the step's end."""

    name = "ddim_inverse"
    order = 1

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        eps = f(t0, y0, sigma_t=t1)
        return StepResult(y0.add(eps, alpha=t1 - t0), Derivative(t0, eps))
