"""diffusers' DDIMInverseScheduler (and prompt-to-prompt's null-text inversion) as an encode method.

The proper Euler encode evaluates ε at the current state and the current noise level:
x̄_{n+1} = x̄_n + (σ_{n+1} − σ_n)·ε(x̄_n/√(1+σ_n²), t(σ_n)). DDIMInverse evaluates the model at
the current sample but with the *target* timestep: ε(x̄_n/√(1+σ_n²), t(σ_{n+1})). Both are
first order in the step; they differ by O(h) per step in where ε is sampled, and neither
decodes back exactly with DDIM. ``encode(..., solver="ddim_inverse")`` reproduces diffusers
to float rounding so that results obtained with it can be compared like for like.

In the field ``f(σ, x̄) = ε(x̄/√(1+σ²), t(σ))`` that model input is ``f(σ_{n+1}, x̄'_n)`` with
x̄'_n = x̄_n·√(1+σ_{n+1}²)/√(1+σ_n²): the sample read at the target level, so the step stays
a plain ``f(t, y)`` method.

diffusers turns the prediction into ε at the *source* level σ_n, where the sample is. For
``epsilon`` models that is the prediction itself and this solver is DDIMInverse to float
rounding; a ``v_prediction`` or ``sample`` prediction converted at σ_{n+1} is not (0.3 relative
on SD 2.1-like configs). :func:`flowdiff.models.pipelines.encode_like` is the exact route for every
prediction type: Euler on the same grid with the model fed, at each σ_n, the timestep of σ_{n+1}.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from solvers import Solver, StepResult

from ..engine.plugins import Plugin, register_plugin


class DDIMInverse(Solver):
    """One DDIMInverse step: Euler with the model's timestep taken at the step's end."""

    name = "ddim_inverse"
    order = 1

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        eps = f(t1, y0 * math.sqrt((1.0 + t1 * t1) / (1.0 + t0 * t0)))
        return StepResult(y0.add(eps, alpha=t1 - t0), None)


def _make(options: dict[str, Any]) -> DDIMInverse:
    if options:
        raise TypeError(f"solver 'ddim_inverse' takes no options, got {sorted(options)}")
    return DDIMInverse()


register_plugin(Plugin("ddim_inverse", "encode", "solver", "diffusers' DDIMInverseScheduler: Euler with the model's "
                       "timestep at the step's end; its latents decode with Euler (DDIM)", make=_make,
                       decodes_with="euler"))
