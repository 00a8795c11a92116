"""Solves that start at σ = ∞: zero-terminal-SNR schedules and flow matching's t = 1.

A schedule rescaled to zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and
Sample Steps are Flawed", WACV 2024) has ᾱ = 0 at its last timestep, and rectified flow has
t = 1: both are σ = ∞, where the ODE's state x̄ = x/α is infinite. The model's input there is
finite, x = ε (α = 0, s = 1), and so is the first step out of it: from pure noise, Euler (=
DDIM) lands on x̄' = x̂₀ + σ'·ε̂ with ε̂ = the noise and x̂₀ read off the prediction
(``v_prediction``: x̂₀ = −v, as v = α·ε − s·x₀; ``sample``: x̂₀ itself; flow matching's
velocity: x̂₀ = x − v). That step is the first step of the grid, taken by the one loop with
its own method (:class:`flowdiff.engine.formulations.OutOfInfinity`, as the data variables'
steps out of and into σ = 0 are theirs): the state there is the noise, and the field
:func:`field_from_infinity` builds returns x̂₀ at σ = ∞ (:meth:`flowdiff.ProbabilityFlow.step_from_noise`
to σ = 0). The loop counts its evaluation, times it, calls the callback with step 0 and
names it as step 0 when it fails; every solver then runs the finite rest.

Encoding *to* σ = ∞ is refused: whatever the solver, its last step spans an infinite
interval (in σ, in ρ = 1/σ's log, and in the reversible solvers' log(1 + σ)), so it can only
be Euler's limit x_T = ε̂(x̄_n, σ_n), a first-order step that the decode's x̂₀ = −v(x_T) does
not retrace; no reversible solver can take it. An encode stops at the last finite level
instead (its latent is x_T there, which decodes exactly with a reversible solver).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .flow import ProbabilityFlow, own_denoised, with_denoised


def starts_at_infinity(sigmas: np.ndarray) -> bool:
    """True for a generation grid whose first σ is ∞ (pure noise)."""
    return bool(len(sigmas) and sigmas[0] == math.inf)


def field_from_infinity(flow: ProbabilityFlow, eps: Callable[[float, Tensor], Tensor], sigmas: np.ndarray,
                        model_kwargs: Mapping[str, Any] | None, model_dtype: torch.dtype | None
                        ) -> Callable[[float, Tensor], Tensor]:
    """``eps(σ, x̄)`` extended to σ = ∞ for a grid that starts there: ``f(∞, noise)`` is x̂₀ (one evaluation).

    ``sigmas`` is the generation grid (first σ = ∞, the rest finite). The boundary step
    (:class:`flowdiff.engine.formulations.OutOfInfinity`) is the only caller at σ = ∞.
    """
    if len(sigmas) < 2 or not np.isfinite(sigmas[1:]).all():
        raise ValueError(f"a grid from σ = ∞ needs finite σ after its first, got {sigmas!r}")
    kwargs = dict(model_kwargs or {})

    def f(sigma: float, y: Tensor) -> Tensor:
        if sigma == math.inf:  # the Euler step from pure noise to σ = 0 is x̂₀ itself
            return flow.step_from_noise(y, 0.0, kwargs, model_dtype)
        return eps(sigma, y)

    inner = own_denoised(eps)
    if inner is not None:  # eps's own D at finite σ, kept (formulations.data_field reads it)
        def denoised(sigma: float, xbar: Tensor) -> Tensor:
            return inner(sigma, xbar)

        return with_denoised(f, denoised)
    return f


def refuse_encode_to_infinity(sigmas: np.ndarray) -> None:
    """Refuse an encode grid ending at σ = ∞ (see the module docstring), saying what to do instead."""
    if len(sigmas) and sigmas[-1] == math.inf:
        raise ValueError("encode: this grid ends at σ = ∞ (a zero-terminal-SNR schedule's last timestep, or flow "
                         "matching's t = 1), where the state x̄ is infinite; the last step there could only be Euler's "
                         "limit x_T = ε̂, which no decode retraces. Encode to the last finite level: pass the "
                         "generation grid without its first point, grid=grid[1:] (e.g. flow.scheduler_sigmas(n)[1:]; "
                         "decoding that latent with a reversible solver is exact)")


def refuse_infinite_start(sigma: float, what: str) -> None:
    """Refuse a solve of ``what`` (adaptive, stochastic) from or to σ = ∞, where only the fixed-grid ODE step is
    defined (:func:`field_from_infinity`)."""
    if sigma == math.inf:
        raise ValueError(f"{what} cannot start or end at σ = ∞ (this schedule's σ_max: zero terminal SNR), where "
                         "the state x̄ is infinite; only a fixed-grid ODE solve takes the boundary step out of it. "
                         "Start at a finite σ, e.g. the scheduler grid's second value: "
                         "adaptive=flowdiff.Adaptive(sigma_start=σ) for an adaptive solve (reference_solution(..., "
                         "sigma_start=σ) for the reference), grid=grid[1:] for flowdiff.Stochastic; or solve the ODE "
                         "on the fixed grid (an ODE solver, no adaptive=)")
