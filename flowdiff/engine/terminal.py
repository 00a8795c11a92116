"""Solves that start at σ = ∞: zero-terminal-SNR schedules and flow matching's t = 1.

A schedule rescaled to zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and
Sample Steps are Flawed", WACV 2024) has ᾱ = 0 at its last timestep, and rectified flow has
t = 1: both are σ = ∞, where the ODE's state x̄ = x/α is infinite. The model's input there is
finite, x = ε (α = 0, s = 1), and so is the first step out of it: from pure noise, Euler (=
DDIM) lands on x̄' = x̂₀ + σ'·ε̂ with ε̂ = the noise and x̂₀ read off the prediction
(``v_prediction``: x̂₀ = −v, as v = α·ε − s·x₀; ``sample``: x̂₀ itself; flow matching's
velocity: x̂₀ = x − v). That step is :meth:`flowdiff.ProbabilityFlow.step_from_noise`, the
boundary step of such grids (as the data variables' steps out of and into σ = 0 are the
boundary steps of :mod:`flowdiff.engine.formulations`); every solver then runs the finite rest.

Encoding *to* σ = ∞ is refused: whatever the solver, its last step spans an infinite
interval (in σ, in ρ = 1/σ's log, and in the reversible solvers' log(1 + σ)), so it can only
be Euler's limit x_T = ε̂(x̄_n, σ_n), a first-order step that the decode's x̂₀ = −v(x_T) does
not retrace; no reversible solver can take it. An encode stops at the last finite level
instead (its latent is x_T there, which decodes exactly with a reversible solver).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from solvers import SolveError, Stats

from .flow import ProbabilityFlow
from .results import Result


def starts_at_infinity(sigmas: np.ndarray) -> bool:
    """True for a generation grid whose first σ is ∞ (pure noise)."""
    return bool(len(sigmas) and sigmas[0] == math.inf)


def generate_from_infinity(flow: ProbabilityFlow, noise: Tensor, sigmas: np.ndarray,
                           solve: Callable[[Tensor, np.ndarray], Result],
                           model_kwargs: Mapping[str, Any] | None, model_dtype: torch.dtype | None,
                           check_finite: bool = True) -> Result:
    """Generate on a grid starting at σ = ∞: the boundary step to ``sigmas[1]``, then ``solve`` on the rest.

    ``noise`` is x_T = ε (DDIM's scale at σ = ∞ is the noise itself); ``solve(x, grid)`` is the
    generate of the finite grid ``sigmas[1:]`` from its DDIM-scale start ``x``. The boundary step
    is one model evaluation, counted in the result's ``stats`` (``steps``, ``accepted``, ``nfe``);
    the result's ``sigmas`` is the whole grid, ∞ included. A callback sees the finite steps only.
    With ``check_finite`` a non-finite boundary step fails here, named as step 0 (one host sync).
    """
    if len(sigmas) < 2 or not np.isfinite(sigmas[1:]).all():
        raise ValueError(f"a grid from σ = ∞ needs finite σ after its first, got {sigmas!r}")
    state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    start = time.perf_counter()
    x = flow.step_from_noise(noise.to(state_dtype), float(sigmas[1]), model_kwargs, model_dtype)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise SolveError(f"step 0 (σ inf -> {float(sigmas[1]):.6g}), the step out of pure noise, produced non-finite "
                         "values: the model returned NaN or inf", step=0, t0=math.inf, t1=float(sigmas[1]),
                         stats=Stats(nfe=1, steps=1, wall_time=time.perf_counter() - start))
    if len(sigmas) == 2:  # one step, from pure noise straight to the grid's end
        xbar = x * math.sqrt(1.0 + float(sigmas[1]) ** 2)
        stats = Stats(nfe=1, steps=1, accepted=1, wall_time=time.perf_counter() - start)
        return Result(xbar.to(noise.dtype), stats, sigmas.copy(), "euler")
    res = solve(x, sigmas[1:].copy())  # x stays in the state's precision (float32 for float16 noise)
    stats = dataclasses.replace(res.stats, nfe=res.stats.nfe + 1, steps=res.stats.steps + 1,
                                accepted=res.stats.accepted + 1, wall_time=time.perf_counter() - start)
    return Result(res.x.to(noise.dtype), stats, sigmas.copy(), res.solver)


def refuse_encode_to_infinity(sigmas: np.ndarray) -> None:
    """Refuse an encode grid ending at σ = ∞ (see the module docstring), saying what to do instead."""
    if len(sigmas) and sigmas[-1] == math.inf:
        raise ValueError("encode: this grid ends at σ = ∞ (a zero-terminal-SNR schedule's last timestep, or flow "
                         "matching's t = 1), where the state x̄ is infinite; the last step there could only be Euler's "
                         "limit x_T = ε̂, which no decode retraces. Encode to the last finite level: pass the "
                         "generation grid without its first point, e.g. sigmas=grid[1:] (decoding that latent with "
                         "a reversible solver is exact)")


def refuse_infinite_start(sigma: float, what: str) -> None:
    """Refuse a solve of ``what`` (adaptive, stochastic) from or to σ = ∞, where only the fixed-grid ODE step is
    defined (:func:`generate_from_infinity`)."""
    if sigma == math.inf:
        raise ValueError(f"{what} cannot start or end at σ = ∞ (this schedule's σ_max: zero terminal SNR), where "
                         "the state x̄ is infinite; only a fixed-grid ODE solve takes the boundary step out of it. "
                         "Start at a finite σ (sigmas=[σ_start, 0] or sigma_start=, e.g. the scheduler grid's "
                         "second value), or use a fixed grid without eta")
