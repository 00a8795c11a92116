"""Adaptive solves of the probability-flow ODE whose tolerance means accuracy of the image.

Two design decisions make ``rtol``/``atol`` mean what a user expects:

* **The time variable.** dx̄/dσ spans σ from ~157 down to 0 and the image forms in the
  last few percent; steps uniform in σ jump over it. Runge–Kutta methods therefore run in
  τ = log(σ + c) (``"logsigma"`` in :mod:`flowdiff.engine.formulations`): relative steps for
  σ ≫ c, and σ = 0 is the finite point τ = log c, reached exactly with no division by σ
  (c defaults to the schedule's smallest trained σ). Solvers built for the data-prediction
  variables (``unipc``) run in ρ = 1/σ, y = x̄/σ, where the exponential part of the flow is
  integrated exactly (steps additive in ρ when generating, relative in ρ when encoding, so
  that they can grow where the flow is smooth and shrink where it is not),
  down to ``sigma_end`` (default σ_min/10), and finish with the denoised
  image extrapolated in σ² to σ = 0 (error O(σ_end⁴); see
  :func:`~flowdiff.engine.formulations.finish_at_zero`). A generation finishes earlier, at the first
  accepted step at or below the schedule's smallest trained σ where the last three denoised values
  agree on that limit to the tolerance (:func:`limit_is_known`): along a trajectory D = x̄(0) + a·σ²
  + b·σ⁴ + …, and there the steps left to σ_end would only confirm it (on the closed-form digits
  mixture, 4 evaluations of 28 at tol 1e-2). Encoding runs the same machinery backwards
  (a data-variables encode leaves σ = 0 by one Euler step to σ_end/1000).
* **The tail of a generation (σ ≤ 1, ``SIGMA_TAIL``).** There the denoised image along a trajectory
  is D = x̄(0) + a·σ² + O(σ⁴), nearly linear in u = 1/√(1+σ²), not in log ρ: the multistep pair
  interpolates its denoised values in u (:func:`signal_scale`, :meth:`solvers.Adams.warped`), and
  its Milne estimate — the predictor's error, of which the corrector passes on a share of order
  (ρ₁ − ρ₀)/ρ₁ where ∂D/∂x̄ ≈ I — is weighted by √(1 − ρ₀/ρ₁) (:func:`corrector_share`). Above
  σ = 1 neither is done: on the trained digits model the error made there is not what a local
  estimate sees (its field has a kink at every trained σ), and a weighted estimate there cost it
  accuracy (``benchmarks/RESULTS.md``, issue 26 item 3, third session).
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
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import Chain, Derivative, ErrorControl, FixedGrid, Solver, StepController, StepResult, VectorField

from ..engine import _checks
from ..engine.flow import refusing_mapped_field
from ..engine.formulations import Data, EulerToZero, IntoZero, LogSigma, OutOfZero, formulation_for, variables_of
from ..engine.latent import Latent
from ..engine.loop import solve_flow
from ..engine.options import GENERATE_ATOL, GENERATE_RTOL, Adaptive, Request, compute_dtype
from ..engine.results import Result
from ..engine.terminal import refuse_infinite_start

__all__ = ["MULTISTEP_CONTROLLER", "MULTISTEP_ENCODE_CONTROLLER", "RK_CONTROLLER", "RK_MAX_STEP", "SIGMA_TAIL",
           "LimitFromHistory", "corrector_share", "image_norm", "limit_in_sigma_squared",
           "limit_is_known", "signal_scale", "solve_adaptive_flow", "to_zero_in_log_sigma"]

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


#: Where a generation's tail begins: σ ≤ 1 (signal-to-noise ratio ≥ 1). There the denoised image is
#: nearly polynomial in 1/√(1+σ²) (:func:`signal_scale`) and the multistep pair's estimate is measured
#: as the corrector's (:func:`corrector_share`); above it neither is done (see the module docstring).
SIGMA_TAIL = 1.0


def signal_scale(rho: np.ndarray) -> np.ndarray:
    """u = 1/√(1+σ²) = ρ/√(1+ρ²) (the VP signal scale √ᾱ) at ρ = 1/σ: the variable in which a generation's
    tail interpolates the denoised values. Along a trajectory D = x̄(0) + a·σ² + O(σ⁴) near σ = 0, and
    1/√(1+σ²) = 1 − σ²/2 + O(σ⁴): D is nearly linear in u there, which a polynomial in log ρ is not."""
    return rho / np.sqrt(1.0 + rho * rho)


def corrector_share(rho_from: float) -> Callable[[float, float], float]:
    """``step_weight(ρ₀, ρ₁)`` for :class:`solvers.ErrorControl`: √(1 − ρ₀/ρ₁) on steps that start at
    ρ₀ ≥ ``rho_from``, else 1.

    The predictor–corrector's estimate ỹ₁ − y₁ is the predictor's error. The corrector sees it only
    through its newest derivative, whose weight is a fraction of order (ρ₁ − ρ₀)/ρ₁ of the step; where
    the denoiser is close to the identity (σ small, ∂D/∂x̄ ≈ I) that is the share passed on. The square
    root keeps half of that margin for the corrector's own truncation error (the full share, 1 − ρ₀/ρ₁,
    measured worse at RMSE 1e-4 on the closed-form mixture; ``benchmarks/RESULTS.md``). Where ∂D/∂x̄ is
    far from I — ∂D/∂x̄ = Cov[x₀ | x̄]/σ², large on a trajectory between two modes — the corrector passes on
    more than this weight assumes: on closed-form mixtures the worst sample's error at tol 1e-5 is up to
    ~19·tol with the weight against at most ~9·tol without it (``benchmarks/adaptive_tail_weight.py``). On the
    benchmark's seed 3 one sample of 16 makes half (closed-form mixture) to two thirds (trained model) of its final
    error on σ ∈ [0.5, 1], on steps this weight accepted at its unweighted estimate of up to 1.8 (mixture) and 3.6
    (trained); on the mixture its ‖ΔD‖/‖Δx̄‖ between accepted steps is 1.3–2.1 there, the batch's median 0.03–0.1
    (``benchmarks/adaptive_lone_sample.py``)."""

    def weight(rho0: float, rho1: float) -> float:
        if rho0 < rho_from:
            return 1.0
        if not rho1 > rho0:
            raise ValueError(f"corrector_share weighs a generation's steps, which run to larger ρ = 1/σ; got the step "
                             f"rho0={rho0!r} -> rho1={rho1!r}")
        return math.sqrt(1.0 - rho0 / rho1)

    return weight


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


def _history(state: object) -> list[tuple[float, Tensor]]:
    """The (ρ, denoised) pairs a data-variables multistep state carries, newest first."""
    if not isinstance(state, Derivative):
        return []
    return [(state.t, state.k), *getattr(state, "past", ())]


def limit_in_sigma_squared(pairs: list[tuple[float, Tensor]]) -> Tensor:
    """x̄(0) from denoised values ``(ρ_j, D_j)`` (σ_j = 1/ρ_j, distinct): the polynomial in σ² through
    them at σ = 0. Two pairs: :func:`~flowdiff.engine.formulations.finish_at_zero`'s extrapolation
    (error O(σ⁴)); three: error O(σ⁶)."""
    s2 = [1.0 / (rho * rho) for rho, _ in pairs]
    out = None
    for j, (_, d) in enumerate(pairs):
        w = math.prod(s2[m] / (s2[m] - s2[j]) for m in range(len(pairs)) if m != j)
        out = d * w if out is None else out.add(d, alpha=w)
    return out


def limit_is_known(rtol: float, atol: float, rho_from: float) -> Callable[[float, Tensor, object], bool]:
    """``stop(ρ, y, state)`` for :class:`solvers.ErrorControl`: True at ρ ≥ ``rho_from`` when the
    limit x̄(0) through the last two denoised values differs from the one through the last three by at
    most the tolerance, as the image norm measures it at σ = 0 (worst sample's RMS of
    ``difference / (atol + rtol·|x̄(0)|)`` ≤ 1). The difference estimates the error of the two-point
    limit; the solve then finishes with the three-point one (:class:`LimitFromHistory`)."""

    def stop(rho: float, y: Tensor, state: object) -> bool:
        pairs = _history(state)[:3]
        if rho < rho_from or len(pairs) < 3 or pairs[0][0] != rho:
            return False
        three = limit_in_sigma_squared(pairs)
        two = limit_in_sigma_squared(pairs[:2])
        ratio = (two - three).abs() / (three.abs() * rtol + atol)
        return bool(ratio.pow(2).reshape(ratio.shape[0], -1).mean(1).sqrt().max() <= 1.0)

    return stop


class LimitFromHistory(Solver):
    """The step from ρ into σ = 0 that a generation takes when :func:`limit_is_known` ended its
    controlled steps: the image is the last three denoised values' limit in σ², no evaluation."""

    name = "denoised_limit_3"
    order = 3

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: object) -> StepResult:
        pairs = _history(state)[:3]
        if len(pairs) < 3 or pairs[0][0] != t0:
            raise ValueError(f"the limit at σ = 0 needs the last three denoised values, newest at ρ = {t0!r}; "
                             f"the state holds {[p[0] for p in pairs]}")
        return StepResult(limit_in_sigma_squared(pairs), None)


def _controller(spec: Adaptive, solver: solvers.Solver, generating: bool) -> StepController:
    if spec.controller is not None:
        return spec.controller
    if not solver.multistep:
        return dataclasses.replace(RK_CONTROLLER, max_step=RK_MAX_STEP.get(solver.name, 1.0))
    return MULTISTEP_CONTROLLER if generating else MULTISTEP_ENCODE_CONTROLLER


def _refuse_unused_knobs(spec: Adaptive, solver_name: str, form: object) -> None:
    """Refuse an ``Adaptive`` field the solver's variables have no use for (the user set it; defaults are None).

    ``sigma_c`` is the c of τ = log(σ + c), the time of the σ-variable solvers (dopri5, bosh3, abm, …);
    the data-variables solvers (unipc) run in ρ = 1/σ and never see it. ``sigma_end`` is where a
    data-variables solve meets σ = 0: a generation hands over to the denoised image's limit there, an encode
    leaves σ = 0 by one Euler step to σ_end/1000; a solve in log(σ + c) reaches σ = 0 exactly and has no
    such point.
    """
    if isinstance(form, Data) and spec.sigma_c is not None:
        raise ValueError(f"Adaptive(sigma_c={spec.sigma_c!r}) does not apply to solver {solver_name!r}: it runs in the "
                         "data variables ρ = 1/σ, not in log(σ + c); sigma_c shapes the σ-variable solvers "
                         f"({', '.join(_sigma_adaptive())}). For {solver_name!r} use sigma_end= (where it meets σ = 0: "
                         "a generation hands over to the denoised image there, an encode starts from σ_end/1000) or "
                         "drop sigma_c")
    if isinstance(form, LogSigma) and spec.sigma_end is not None:
        raise ValueError(f"Adaptive(sigma_end={spec.sigma_end!r}) does not apply to solver {solver_name!r}: it runs in "
                         "log(σ + c) and reaches σ = 0 exactly, with no hand-over point; sigma_end shapes the "
                         "data-variables solvers (unipc). For "
                         f"{solver_name!r} use sigma_c= (the c of log(σ + c)) or drop sigma_end")


def _sigma_adaptive() -> list[str]:
    """The registered adaptive solvers that run in the σ variables (log(σ + c) when adaptive)."""
    return [name for name in solvers.available(adaptive=True) if variables_of(solvers.get(name)) == "sigma"]


def solve_adaptive_flow(request: Request, x: Tensor, *, direction: str, model_dtype: torch.dtype | None) -> Result:
    """An adaptive generate (σ_start → 0) or encode (0 → σ_max) of DDIM-scale noise or images.

    Called by :func:`flowdiff.generate` / :func:`flowdiff.encode` when ``rtol``/``atol`` are
    given; ``request.adaptive`` (a :class:`flowdiff.Adaptive`) holds the tolerances and knobs.
    ``request.bound`` is the divergence guard on the VP-scaled end state (see :func:`flowdiff.generate`).
    """
    spec, solver, flow = request.adaptive, request.solver, request.flow
    if spec is None:
        raise ValueError("an adaptive solve needs request.adaptive (a flowdiff.Adaptive)")
    spec = spec.resolved(GENERATE_RTOL, GENERATE_ATOL)  # a tolerance left out is generate's/encode's default
    if not solver.adaptive:
        raise ValueError(f"adaptive=flowdiff.Adaptive(...) needs an adaptive solver; {solver.name!r} has no error "
                         f"estimate. Adaptive solvers: {', '.join(solvers.available(adaptive=True))}")
    schedule = flow.schedule
    s_max = schedule.sigma_max if spec.sigma_start is None else spec.sigma_start
    refuse_infinite_start(s_max, "an adaptive solve")  # zero terminal SNR (flowdiff.engine.terminal)
    c = schedule.sigma_min if spec.sigma_c is None else spec.sigma_c
    s_end = schedule.sigma_min / 10 if spec.sigma_end is None else spec.sigma_end
    form = formulation_for(solver, direction, adaptive=True, sigma_c=c)  # the one chooser (engine.formulations)
    _refuse_unused_knobs(spec, solver.name, form)
    # the knob the solve uses, range-checked when the user set it; the default c = σ_min suits any start (τ =
    # log(σ + c) is defined for every c > 0), whereas the default σ_end = σ_min/10 must still lie below the start
    name, value, given = (("sigma_end", s_end, spec.sigma_end) if isinstance(form, Data)
                          else ("sigma_c", c, spec.sigma_c))
    if (given is not None or name == "sigma_end") and not 0 < value < s_max:
        default = "" if given is not None else " (the default, σ_min/10: set sigma_end= below σ_start)"
        raise ValueError(f"{name} must lie in (0, σ_start={s_max:.6g}), got {value!r}{default}")
    generating = direction == "generate"
    ends = (s_max, 0.0) if generating else (0.0, s_max)  # the interval in the solve's own order
    eps = flow.field(request.model_kwargs, model_dtype)
    if "Vmap" in _checks.functorch_transforms():  # a vmap right around a jvp (others are refused before): the
        eps = refusing_mapped_field(eps, (  # states are mapped where the model closes over mapped tensors
            f"{direction}(adaptive=...) under torch.func.vmap around a jvp, with the model's output mapped over "
            "although its inputs are not (the model closes over mapped tensors, e.g. an ensemble's weights stacked by "
            "torch.func.stack_module_state): its step control reads each step's error on the host, which vmap "
            "cannot; call it once per member, or use a fixed grid with checks=flowdiff.Checks(finite=False, "
            "growth=None)"))
    xbar0 = x.to(compute_dtype(x)) * (math.sqrt(1.0 + s_max**2) if generating else 1.0)
    controller = _controller(spec, solver, generating)
    if isinstance(form, Data):
        if generating:  # ρ additive to σ_end (or until the limit is known), then the denoised image's limit
            t0, t1 = form.times([s_max, s_end])
            stop = limit_is_known(spec.rtol, spec.atol, form.time(min(schedule.sigma_min, s_max)))
            weight = None
            if isinstance(solver, solvers.Adams) and solver.corrector and solver.log_time:  # the tail (SIGMA_TAIL)
                if solver.warp is None:  # a caller's own warp (Adams.warped) is kept
                    solver = solver.warped(signal_scale, form.time(SIGMA_TAIL))
                weight = corrector_share(form.time(SIGMA_TAIL))

            def into_zero(t: float) -> FixedGrid:
                finish = IntoZero(extrapolate=True) if t == t1 else LimitFromHistory()
                return FixedGrid([t, math.inf], {0: finish}, infinite_ends=True)

            stepping = Chain([ErrorControl(t0, t1, spec.rtol, spec.atol, image_norm(spec.rtol, spec.atol,
                                                                                     form.x_factor),
                                           controller, spec.first_step, stop=stop, step_weight=weight), into_zero])
        else:  # leave σ = 0 by one Euler (DDIM) step to σ_end/1000 (local error O(σ_end²·1e-6)), then log ρ steps
            s_first = s_end * 1e-3
            t0, t1 = form.times([s_first, s_max])
            stepping = Chain([FixedGrid([math.inf, t0], {0: OutOfZero(s_first)}, infinite_ends=True),
                              ErrorControl(t0, t1, spec.rtol, spec.atol, image_norm(spec.rtol, spec.atol,
                                                                                     form.x_factor),
                                           controller, spec.first_step, log_steps=True)])
    elif isinstance(form, LogSigma):  # Runge–Kutta pairs (and σ-variable multistep methods): σ = 0 exactly
        t0, t1 = form.times(ends)
        stepping = ErrorControl(t0, t1, spec.rtol, spec.atol,
                                image_norm(spec.rtol, spec.atol, form.x_factor), controller, spec.first_step)
    else:
        raise ValueError(f"no adaptive solve in the {form.name!r} variables that {solver.name!r} runs in")
    sol = solve_flow(eps, form, stepping, solver, sigma0=ends[0], xbar0=xbar0, bound=request.bound,
                     max_nfe=spec.max_nfe, callback=request.callback, check_finite=request.check_finite)
    grid = sol.sigmas.copy()
    grid[0], grid[-1] = ends
    if generating:
        return Result(sol.xbar.to(x.dtype), sol.stats, grid, solver.name)
    x_T = (sol.xbar / math.sqrt(1.0 + s_max**2)).to(x.dtype)
    return Result(x_T, sol.stats, grid, solver.name, Latent(x_T, grid, request.solver_name,
                                                             dict(request.solver_options), None))


def to_zero_in_log_sigma(s0: float, s_end: float, rtol: float, atol: float, controller: StepController
                         ) -> tuple[LogSigma, Chain]:
    """The reference solve's variables and stepping: error control in τ = log σ from ``s0`` to ``s_end``,
    then the Euler step from ``s_end`` into σ = 0 that every fixed grid ends with."""
    form = LogSigma(0.0)
    t0, t1, t_zero = form.times([s0, s_end, 0.0])
    norm = image_norm(rtol, atol, form.x_factor)
    return form, Chain([ErrorControl(t0, t1, rtol, atol, norm, controller),
                        FixedGrid([t1, t_zero], {0: EulerToZero()}, infinite_ends=True)])

