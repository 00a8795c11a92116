"""diffusers' DDIMInverseScheduler (and prompt-to-prompt's null-text inversion) as an encode method.

The proper Euler encode evaluates ε at the current state and the current noise level:
x̄_{n+1} = x̄_n + (σ_{n+1} − σ_n)·ε(x̄_n/√(1+σ_n²), t(σ_n)). DDIMInverse evaluates the model at
the current sample but with the *target* timestep t(σ_{n+1}), and turns its prediction into ε
at the *source* level σ_n, where the sample is. Both are first order in the step; they differ
by O(h) per step in where ε is sampled, and neither decodes back exactly with DDIM.
``encode(..., solver="ddim_inverse")`` reproduces diffusers to float rounding, for every
prediction type, so that results obtained with it can be compared like for like.

In the field ``f(σ, x̄) = ε(x̄/√(1+σ²), t(σ))`` that model input is ``f(σ_{n+1}, x̄'_n)`` with
x̄'_n = x̄_n·√(1+σ_{n+1}²)/√(1+σ_n²): the sample read at the target level. Its ε, converted at
σ_{n+1}, is converted back to the prediction and on to ε at σ_n (VP: α = 1/√(1+σ²), s = σα;
x = α_n·x̄_n the sample, r = α_n/α_{n+1}):

    epsilon:       ε_n = ε'
    v_prediction:  ε_n = α_n·v + s_n·x = r·ε' + α_n²(σ_n − σ_{n+1})·x̄_n
    sample:        ε_n = (x̄_n − x̂₀)/σ_n with x̂₀ = x̄'_n − σ_{n+1}·ε'   (σ_n > 0: diffusers divides by 0 there)
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from solvers import Solver, StepResult

from ..engine.plugins import Plugin, register_plugin


class DDIMInverse(Solver):
    """One DDIMInverse step: Euler with the model's timestep taken at the step's end, its ε at the start."""

    name = "ddim_inverse"
    order = 1

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        r = math.sqrt((1.0 + t1 * t1) / (1.0 + t0 * t0))
        target = y0 * r
        eps = f(t1, target)
        prediction = getattr(f, "prediction_type", "epsilon")
        if prediction == "v_prediction":
            eps = eps.mul(r).add_(y0, alpha=(t0 - t1) / (1.0 + t0 * t0))
        elif prediction == "sample":
            if t0 == 0:
                raise ValueError("solver 'ddim_inverse' with prediction_type='sample' cannot step from σ = 0: "
                                 "its ε = (x − α·x̂₀)/s divides by s = 0 there (diffusers' too); start the grid "
                                 "at σ_min (set_alpha_to_one=False) or encode with solver='euler'")
            eps = (y0 - (target - t1 * eps)) / t0
        elif prediction != "epsilon":
            raise ValueError(f"solver 'ddim_inverse' is DDIMInverseScheduler's VP step; prediction_type "
                             f"{prediction!r} is not accepted (accepted: epsilon, v_prediction, sample)")
        return StepResult(y0.add(eps, alpha=t1 - t0), None)


def _make(options: dict[str, Any]) -> DDIMInverse:
    if options:
        raise TypeError(f"solver 'ddim_inverse' takes no options, got {sorted(options)}")
    return DDIMInverse()


register_plugin(Plugin("ddim_inverse", "encode", "solver", "diffusers' DDIMInverseScheduler: Euler with the model's "
                       "timestep at the step's end and its ε at the start; its latents decode with Euler (DDIM)",
                       make=_make, decodes_with="euler"))
