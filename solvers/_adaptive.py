"""The adaptive driver: embedded error estimates and step-size control.

The error norm is pluggable so that a caller can measure error in the scale that
matters to it (flowdiff measures it in the image's scale, not in the ODE variable's).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ._base import Derivative, Solver, VectorField
from ._checks import check_flags, check_state
from ._driver import CountingField, Solution, StepInfo, _located, raise_if_nonfinite
from ._errors import SolveError
from ._registry import get
from ._stats import Stats

#: ``norm(error, y0, y1, t1) -> scaled error`` (a 0-dim tensor or float); a step is accepted when <= 1.
ErrorNorm = Callable[[Tensor, Tensor, Tensor, float], Any]


def rms_norm(rtol: float, atol: float) -> ErrorNorm:
    """Hairer's mixed norm: RMS of ``error / (atol + rtol * max(|y0|, |y1|))``."""

    def norm(error: Tensor, y0: Tensor, y1: Tensor, t1: float) -> Tensor:
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol).add_(atol)
        return (error / scale).pow(2).mean().sqrt()

    return norm


@dataclass(frozen=True)
class StepController:
    """A PI step-size controller (an I-controller when ``pcoeff == 0``).

    The new step is ``h * safety * r**(-icoeff/k) * r_prev**(pcoeff/k)`` with ``k`` the
    error estimate's order + 1 and ``r`` the scaled error, clipped to ``[factor_min, factor_max]``
    and to ``[min_step, max_step]`` in magnitude.
    """

    safety: float = 0.9
    icoeff: float = 1.0
    pcoeff: float = 0.0
    factor_min: float = 0.2
    factor_max: float = 10.0
    min_step: float = 0.0
    max_step: float = math.inf

    def __post_init__(self) -> None:
        if not 0 < self.safety <= 1:
            raise ValueError(f"safety must be in (0, 1], got {self.safety}")
        if not 0 < self.factor_min < 1 < self.factor_max:
            raise ValueError(f"need 0 < factor_min < 1 < factor_max, got {self.factor_min}, {self.factor_max}")
        if not 0 <= self.min_step < self.max_step:
            raise ValueError(f"need 0 <= min_step < max_step, got {self.min_step}, {self.max_step}")

    def factor(self, ratio: float, prev_ratio: float, k: int) -> float:
        if ratio == 0.0:
            return self.factor_max
        f = self.safety * ratio ** (-self.icoeff / k) * prev_ratio ** (self.pcoeff / k)
        return min(self.factor_max, max(self.factor_min, f))


def _initial_step(f: VectorField, t0: float, y0: Tensor, k0: Tensor, direction: float, order: int,
                  norm: ErrorNorm, span: float) -> float:
    """Hairer, Nørsett & Wanner's starting step (one extra evaluation)."""
    zero = torch.zeros_like(y0)
    d0 = float(norm(y0, zero, zero, t0))
    d1 = float(norm(k0, zero, zero, t0))
    h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h0 = min(h0, span)
    k1 = f(t0 + direction * h0, y0 + direction * h0 * k0)
    d2 = float(norm(k1 - k0, zero, zero, t0)) / h0
    h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, span)


def solve_adaptive(
    f: VectorField,
    y0: Tensor,
    t0: float,
    t1: float,
    solver: str | Solver = "dopri5",
    *,
    rtol: float = 1e-3,
    atol: float = 1e-6,
    norm: ErrorNorm | None = None,
    controller: StepController | None = None,
    first_step: float | None = None,
    max_nfe: int | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    check_finite: bool = True,
    time_name: str = "t",
    log_steps: bool = False,
) -> Solution:
    """Integrate from ``t0`` to ``t1`` (either direction) with error control.

    Needs a solver with an embedded error estimate (``solver.adaptive``). A step is
    accepted when ``norm(error, y0, y1, t1) <= 1``; the default norm is :func:`rms_norm`.
    ``max_nfe`` bounds the evaluations: past it a :class:`SolveError` says where the solve
    stood, with the partial statistics attached.

    ``log_steps`` measures step sizes in ``log|t|`` (t₀ and t₁ non-zero, of one sign): a step
    is ``t → t·e^{±h}`` and ``min_step``/``max_step``/``first_step`` are in that unit. For
    problems whose time scale is proportional to ``|t|`` this keeps the controller's steps
    natural in both directions (growing or shrinking ``t`` alike).
    """
    solver = get(solver)
    check_state(y0, "y0")  # issue 13: a real floating-point start, bool flags
    check_flags(check_finite=check_finite, log_steps=log_steps)
    if not solver.adaptive:
        raise ValueError(f"solver {solver.name!r} has no error estimate; adaptive solvers: "
                         "see solvers.available(adaptive=True)")
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("rtol and atol cannot both be 0")
    t0, t1 = float(t0), float(t1)
    if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
        raise ValueError(f"need finite t0 != t1, got t0={t0!r}, t1={t1!r}")
    if max_nfe is not None and (isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1):
        raise ValueError(f"max_nfe must be a positive int or None, got {max_nfe!r}")
    norm = norm if norm is not None else rms_norm(rtol, atol)
    controller = controller if controller is not None else StepController()
    k = min(solver.order, getattr(solver, "error_order", solver.order - 1)) + 1

    field = CountingField(f)
    stats = Stats()
    start = time.perf_counter()
    if log_steps and (t0 == 0 or t1 == 0 or (t0 > 0) != (t1 > 0)):
        raise ValueError(f"log_steps=True needs non-zero t0 and t1 of one sign, got t0={t0!r}, t1={t1!r}")
    direction = 1.0 if t1 > t0 else -1.0
    span = abs(t1 - t0)
    log_span = abs(math.log(abs(t1 / t0))) if log_steps else span
    log_dir = (1.0 if abs(t1) > abs(t0) else -1.0) if log_steps else direction

    def advance(t: float, h: float) -> float:
        return t * math.exp(log_dir * h) if log_steps else t + direction * h
    t, y = t0, y0
    state = solver.init(field, t0, y0)
    flags: list[Tensor] = []
    times = [t0]

    def fail(message: str) -> SolveError:
        stats.nfe, stats.wall_time = field.nfe, time.perf_counter() - start
        return SolveError(message, step=stats.steps, t0=t, stats=stats)

    if first_step is None:
        k0 = field(t0, y0)
        state = Derivative(t0, k0)
        h = _initial_step(field, t0, y0, k0, direction, k - 1, norm, span)
        if log_steps:
            h = min(h / abs(t0), log_span)
    else:
        if not (isinstance(first_step, (int, float)) and 0 < first_step):
            raise ValueError(f"first_step must be a positive number, got {first_step!r}")
        h = float(first_step)
    h = min(max(h, controller.min_step), controller.max_step)
    prev_ratio = 1.0
    while direction * (t1 - t) > 0:
        if max_nfe is not None and field.nfe >= max_nfe:
            raise fail(f"max_nfe={max_nfe} reached at {time_name}={t:.6g} after {stats.accepted} accepted and "
                       f"{stats.rejected} rejected steps, short of {time_name}={t1:.6g}; raise max_nfe or "
                       "loosen rtol/atol")
        t_next = advance(t, h)
        if direction * (t_next - t1) >= 0 or abs(t1 - t_next) < 1e-12 * span:
            t_next = t1
        try:
            result = solver.step(field, t, t_next, y, state)
        except Exception as err:
            stats.nfe = field.nfe
            raise _located(err, stats.steps, t, t_next, time_name, stats) from err
        stats.steps += 1
        ratio = float(norm(result.error, y, result.y, t_next))
        if not math.isfinite(ratio):
            raise fail(f"step {stats.steps - 1} ({time_name} {t:.6g} -> {t_next:.6g}): the error estimate is "
                       "not finite; the vector field (the model) returned NaN or inf")
        h_used = abs(math.log(t_next / t)) if log_steps else abs(t_next - t)
        factor = controller.factor(ratio, prev_ratio, k)
        if ratio <= 1.0 or h_used <= controller.min_step:
            stats.accepted += 1
            t, y, state = t_next, result.y, result.state
            times.append(t)
            prev_ratio = max(ratio, 1e-10)
            if check_finite:
                flags.append(y.sum())
            if callback is not None:
                callback(StepInfo(stats.accepted - 1, times[-2], t, y, state))
        else:
            stats.rejected += 1
            factor = min(factor, 1.0)
            if getattr(result.state, "t", None) == t:  # f(t, y) from the rejected try: reuse it
                state = result.state
        h = min(max(h_used * factor, controller.min_step), controller.max_step)
    stats.nfe = field.nfe
    stats.wall_time = time.perf_counter() - start
    raise_if_nonfinite(flags, times, time_name, stats)
    return Solution(y, stats, state, times)
