"""Adaptive solves of the probability-flow ODE whose tolerance means accuracy of the image.

Two design decisions make ``rtol``/``atol`` mean what a user expects:

* **The time variable.** dx̄/dσ spans σ from ~157 down to 0 and the image forms in the
  last few percent; steps uniform in σ jump over it. Runge–Kutta methods therefore run in
  τ = log(σ + c) (``"logsigma"`` in :mod:`flowdiff.formulations`): relative steps for
  σ ≫ c, and σ = 0 is the finite point τ = log c, reached exactly with no division by σ
  (c defaults to the schedule's smallest trained σ). Solvers built for the data-prediction
  variables (``unipc``) run in ρ = 1/σ, y = x̄/σ, where the exponential part of the flow is
  integrated exactly (steps additive in ρ when generating, relative in ρ when encoding, so
  that they can grow where the flow is smooth and shrink where it is not),
  down to ``sigma_end`` (default σ_min/10), and finish with the denoised
  image extrapolated in σ² to σ = 0 (error O(σ_end⁴); see
  :func:`~flowdiff.formulations.finish_at_zero`). Encoding runs the same machinery backwards
  (a data-variables encode leaves σ = 0 by one Euler step to σ_end/1000).
* **The error norm.** The local error of a step is measured on the VP-scaled state
  x = x̄/√(1+σ²) — the scale of the image at σ = 0 and of unit noise at σ_max — as the RMS
  over each sample of ``error / (atol + rtol·|x|)``, the worst sample deciding. Measured on
  x̄ (|x̄| ≈ 157 at σ_max) a tolerance of 1e-4 allows errors that leave the image wrong by 0.3.

A tolerance buys roughly itself: with ``rtol = atol = tol`` the image's RMS error against
the exact flow is within a small factor of ``tol`` (see ``tests/test_adaptive.py`` and
``benchmarks/results/adaptive.md`` for the measured factors). For an encode the same holds
for the image its latent decodes to; the latent itself is more sensitive (an error made near
σ = 0 grows in the latent by about 1/std of the data's narrowest direction, and shrinks back
on decoding).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import Derivative, SolveError, Solver, Stats, StepController

from .flow import ProbabilityFlow
from .formulations import data_field, finish_at_zero, logsigma_field, variables_of
from .schedules import ArrayLike

#: Controller defaults. Runge–Kutta pairs: an I-controller with steps of at most 1 in log(σ + c)
#: (σ + c changes by at most e per step; 2 for dopri8, ``RK_MAX_STEP``). Near σ_min a trained
#: model's field has ∂f/∂x̄ of order −(σ + c)/σ_min ≈ −2 in this variable, and an explicit step
#: beyond the method's stability region is accepted by an embedded estimate that cannot see it:
#: with a cap of 2, dopri5 at tol 0.03 accepted a last step 0.17 → 0 that left the trained digits
#: model's images off by 15. Dopri8's stability region is about twice as long.
RK_CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=10.0, max_step=2.0)
RK_MAX_STEP = {"dopri8": 2.0}
MULTISTEP_CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=2.5)
MULTISTEP_ENCODE_CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=2.5, max_step=1.0)


class AdaptiveStep(NamedTuple):
    """What an adaptive callback receives after each accepted step: the step index, the σ
    reached, the VP-scaled state ``x`` = x̄/√(1+σ²), the model's ``denoised`` image at that
    point when the step already evaluated it (else ``None``: no evaluation is spent on it;
    for predictor–corrector methods it is taken at the predicted point), and ``xbar``."""

    step: int
    sigma: float
    x: Tensor
    denoised: Tensor | None
    xbar: Tensor


def image_norm(rtol: float, atol: float, to_x: Callable[[float], float]) -> solvers.ErrorNorm:
    """The error norm in the image's scale.

    ``to_x(t)`` is the factor from the solver's variable to x = x̄/√(1+σ²) at time t. The
    value is ``max over samples of RMS(e_x / (atol + rtol·|x₁|))``, with e_x the step's error
    estimate in x; a step is accepted when it is ≤ 1.
    """

    def norm(error: Tensor, y0: Tensor, y1: Tensor, t1: float) -> Tensor:
        a = to_x(t1)
        ratio = (error * a).abs() / (y1.abs() * (rtol * a) + atol)
        if ratio.ndim == 0:
            return ratio
        return ratio.pow(2).reshape(ratio.shape[0], -1).mean(1).sqrt().max()

    return norm


def _check_tolerance(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def solve_adaptive_flow(flow: ProbabilityFlow, x: Tensor, solver: Solver, *, direction: str, rtol: float | None,
                        atol: float | None, max_nfe: int | None, sigmas: ArrayLike | None,
                        model_kwargs: Mapping[str, Any] | None, model_dtype: torch.dtype | None,
                        callback: Callable[..., None] | None, check_finite: bool,
                        controller: StepController | None = None, first_step: float | None = None,
                        sigma_c: float | None = None, sigma_end: float | None = None, **unknown: Any) -> Any:
    """An adaptive generate (σ_start → 0) or encode (0 → σ_max) of DDIM-scale noise or images.

    Called by :func:`flowdiff.generate` / :func:`flowdiff.encode` when ``rtol``/``atol`` are
    given. Knobs: ``controller`` (a :class:`solvers.StepController`: safety, I/PI gains,
    factor and step bounds), ``first_step`` (in the solve's time variable; default:
    Hairer's estimate), ``sigma_c`` (the c of τ = log(σ + c)), ``sigma_end`` (where the
    data-variables solve hands over to the denoised image), ``max_nfe`` (a
    :class:`solvers.SolveError` with the partial statistics when exceeded).
    """
    from .sampling import Latent, Result

    if unknown:
        raise TypeError(f"unknown adaptive option(s) {sorted(unknown)}; accepted: controller, first_step, "
                        "sigma_c, sigma_end")
    if controller is not None and not isinstance(controller, StepController):
        raise TypeError(f"adaptive_options['controller'] must be a solvers.StepController, got "
                        f"{type(controller).__name__}")
    if first_step is not None and not (isinstance(first_step, (int, float)) and first_step > 0):
        raise ValueError(f"adaptive_options['first_step'] must be a number > 0, got {first_step!r}")
    if not solver.adaptive:
        raise ValueError(f"rtol=/atol= need an adaptive solver; {solver.name!r} has no error estimate. "
                         f"Adaptive solvers: {', '.join(solvers.available(adaptive=True))}")
    rtol = _check_tolerance("rtol", 1e-3 if rtol is None else rtol)
    atol = _check_tolerance("atol", 1e-3 if atol is None else atol)
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    schedule = flow.schedule
    s_max = schedule.sigma_max
    if sigmas is not None:
        s = np.asarray(sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size != 2 or not (s[0] > 0 and s[1] == 0):
            raise ValueError(f"with rtol=/atol=, sigmas= gives the interval [σ_start, 0] as 2 values, got {sigmas!r}")
        s_max = float(s[0])
    c = schedule.sigma_min if sigma_c is None else float(sigma_c)
    s_end = schedule.sigma_min / 10 if sigma_end is None else float(sigma_end)
    for name, value in (("sigma_c", c), ("sigma_end", s_end)):
        if not (math.isfinite(value) and 0 < value < s_max):
            raise ValueError(f"{name} must lie in (0, σ_start={s_max:.6g}), got {value!r}")
    dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    eps = flow.field(model_kwargs, model_dtype)
    generating = direction == "generate"
    xbar0 = x.to(dtype) * (math.sqrt(1.0 + s_max**2) if generating else 1.0)
    data = variables_of(solver) == "data"
    if controller is None and not solver.multistep:
        controller = dataclasses.replace(RK_CONTROLLER, max_step=RK_MAX_STEP.get(solver.name, 1.0))
    if controller is None:
        controller = RK_CONTROLLER if not solver.multistep else (
            MULTISTEP_CONTROLLER if generating else MULTISTEP_ENCODE_CONTROLLER)
    run = _run_data if data else _run_logsigma
    xbar, stats, grid = run(eps, xbar0, solver, s_max=s_max, c=c, s_end=s_end, generating=generating, rtol=rtol,
                            atol=atol, controller=controller, first_step=first_step, max_nfe=max_nfe,
                            callback=callback, check_finite=check_finite)
    if generating:
        return Result(xbar.to(x.dtype), stats, grid, solver.name)
    x_T = (xbar / math.sqrt(1.0 + s_max**2)).to(x.dtype)
    return Result(x_T, stats, grid, solver.name, Latent(x_T, grid, solver.name, {}, None))


def _notify(callback: Callable[..., None] | None, step: int, sigma: float, xbar: Tensor,
            denoised: Tensor | None) -> None:
    if callback is not None:
        callback(AdaptiveStep(step, sigma, xbar / math.sqrt(1.0 + sigma * sigma), denoised, xbar))


def _run_logsigma(eps, xbar0, solver, *, s_max, c, s_end, generating, rtol, atol, controller, first_step,
                  max_nfe, callback, check_finite):
    """Runge–Kutta pairs (and σ-variable multistep methods) in τ = log(σ + c), σ = 0 exactly."""
    tau_zero = math.log(c)
    tau_max = math.log(s_max + c)

    def sigma_of(tau: float) -> float:
        return 0.0 if tau <= tau_zero else max(math.exp(tau) - c, 0.0)

    def to_x(tau: float) -> float:
        s = sigma_of(tau)
        return 1.0 / math.sqrt(1.0 + s * s)

    wrapped = None
    if callback is not None:
        def wrapped(info: solvers.StepInfo) -> None:
            s = sigma_of(info.t1)
            state = info.state
            denoised = None
            if isinstance(state, Derivative) and state.t == info.t1:  # FSAL: f(t₁, y₁) = (σ + c)·ε
                denoised = info.y - state.k * (s / (s + c))
            _notify(callback, info.step, s, info.y, denoised)

    t0, t1 = (tau_max, tau_zero) if generating else (tau_zero, tau_max)
    sol = solvers.solve_adaptive(logsigma_field(eps, c, tau_zero), xbar0, t0, t1, solver, rtol=rtol, atol=atol,
                                 norm=image_norm(rtol, atol, to_x), controller=controller, first_step=first_step,
                                 max_nfe=max_nfe, callback=wrapped, check_finite=check_finite, time_name="log(σ+c)")
    grid = np.array([sigma_of(t) for t in sol.ts], dtype=np.float64)
    grid[0], grid[-1] = (s_max, 0.0) if generating else (0.0, s_max)
    return sol.y, sol.stats, grid


def _run_data(eps, xbar0, solver, *, s_max, c, s_end, generating, rtol, atol, controller, first_step, max_nfe,
              callback, check_finite):
    """Data-variables methods in ρ = 1/σ between σ_start and ``s_end``; σ = 0 by the denoised image."""
    start = time.perf_counter()
    stats = Stats()
    xbar = xbar0
    if not generating:  # leave σ = 0 by one Euler (DDIM) step to s_end/1000: local error O(s_end²·1e-6)
        s_end = s_end * 1e-3
        xbar = xbar0 + s_end * eps(0.0, xbar0)
        stats.nfe += 1
        stats.steps += 1
        stats.accepted += 1
        _notify(callback, 0, s_end, xbar, None)
    sigmas = [s_max, s_end] if generating else [s_end, s_max]
    offset = stats.steps

    def to_x(rho: float) -> float:
        return 1.0 / math.sqrt(1.0 + rho * rho)

    wrapped = None
    if callback is not None:
        def wrapped(info: solvers.StepInfo) -> None:
            s = 1.0 / info.t1
            state = info.state
            denoised = state.k if isinstance(state, Derivative) and state.t == info.t1 else None
            _notify(callback, info.step + offset, s, info.y * s, denoised)

    budget = None if max_nfe is None else max_nfe - stats.nfe
    try:
        sol = solvers.solve_adaptive(data_field(eps), xbar / sigmas[0], 1.0 / sigmas[0], 1.0 / sigmas[1], solver,
                                     rtol=rtol, atol=atol, norm=image_norm(rtol, atol, to_x), controller=controller,
                                     first_step=first_step, max_nfe=budget, callback=wrapped,
                                     check_finite=check_finite, time_name="ρ=1/σ", log_steps=not generating)
    except SolveError as err:
        if isinstance(err.stats, Stats):
            err.stats = stats + err.stats
        raise
    stats = stats + sol.stats
    xbar = sol.y * sigmas[1]
    grid = [1.0 / t for t in sol.ts]
    if generating:
        xbar, spent = finish_at_zero(sol.state, s_end, xbar, eps, extrapolate=True)
        stats.nfe += spent
        stats.steps += 1
        stats.accepted += 1
        grid.append(0.0)
        _notify(callback, stats.accepted - 1, 0.0, xbar, xbar)
        if check_finite and not bool(torch.isfinite(xbar).all()):
            raise SolveError(f"the last step (σ {s_end:.6g} -> 0) produced non-finite values", step=stats.steps - 1,
                             t0=s_end, t1=0.0, stats=stats)
    else:
        grid.insert(0, 0.0)
    stats.wall_time = time.perf_counter() - start
    out = np.asarray(grid, dtype=np.float64)
    out[0 if generating else -1] = s_max
    return xbar, stats, out
