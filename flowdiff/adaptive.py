"""Adaptive solves of the probability-flow ODE with the error measured in the image's scale."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import Solver

from .flow import ProbabilityFlow
from .schedules import ArrayLike


def image_scale_norm(rtol: float, atol: float) -> solvers.ErrorNorm:
    """Mixed RMS norm on the VP-scaled state x = x̄/√(1+σ²), the scale of the image."""

    def norm(error: Tensor, y0: Tensor, y1: Tensor, t1: float) -> Tensor:
        a = 1.0 / math.sqrt(1.0 + t1 * t1)
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol * a).add_(atol)
        return (error * a / scale).pow(2).mean().sqrt()

    return norm


def solve_adaptive_flow(flow: ProbabilityFlow, x: Tensor, solver: Solver, *, direction: str, rtol: float | None,
                        atol: float | None, max_nfe: int | None, sigmas: ArrayLike | None,
                        model_kwargs: Mapping[str, Any] | None, model_dtype: torch.dtype | None,
                        callback: Callable[..., None] | None, check_finite: bool) -> Any:
    """An adaptive generate (σ_max → 0) or encode (0 → σ_max) from DDIM-scale noise or images."""
    from .sampling import Latent, Result, StepState

    if not solver.adaptive:
        raise ValueError(f"rtol=/atol= need an adaptive solver; {solver.name!r} has no error estimate. "
                         f"Adaptive solvers: {', '.join(solvers.available(adaptive=True))}")
    rtol = 1e-3 if rtol is None else rtol
    atol = 1e-3 if atol is None else atol
    s_max = flow.schedule.sigma_max
    if sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size != 2:
            raise ValueError("with rtol=/atol=, sigmas= gives the interval [σ_start, 0] as 2 values")
        s_max = float(s[0])
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    f = flow.field(model_kwargs, model_dtype)
    t0, t1 = (s_max, 0.0) if direction == "generate" else (0.0, s_max)
    y0 = x.to(dtype) * (math.sqrt(1.0 + s_max**2) if direction == "generate" else 1.0)
    wrapped = None
    if callback is not None:
        def wrapped(info: solvers.StepInfo) -> None:
            callback(StepState(info.step, info.t1, info.y / math.sqrt(1.0 + info.t1**2), info.y))
    sol = solvers.solve_adaptive(f, y0, t0, t1, solver, rtol=rtol, atol=atol, norm=image_scale_norm(rtol, atol),
                                 max_nfe=max_nfe, callback=wrapped, check_finite=check_finite, time_name="σ")
    grid = np.asarray(sol.ts, dtype=np.float64)
    if direction == "generate":
        return Result(sol.y.to(x.dtype), sol.stats, grid, solver.name)
    x_T = (sol.y / math.sqrt(1.0 + s_max**2)).to(x.dtype)
    return Result(x_T, sol.stats, grid, solver.name, Latent(x_T, grid, solver.name, {}, None))
