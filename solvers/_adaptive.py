"""Error-controlled solves: :func:`solve_adaptive` is :func:`solvers.integrate` with :class:`~solvers.ErrorControl`.

The error norm is pluggable so that a caller can measure error in the scale that matters
to it (flowdiff measures it in the image's scale, not in the ODE variable's).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ._base import Solver, VectorField
from ._checks import check_flags
from ._integrate import ErrorControl, ErrorNorm, Solution, StepController, StepInfo, integrate, rms_norm
from ._registry import get

__all__ = ["ErrorNorm", "StepController", "rms_norm", "solve_adaptive"]


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
    ``rtol`` or ``atol`` may be 0 (a pure absolute or relative tolerance), not both. ``max_nfe``
    is a hard bound on the evaluations: the step that would pass it is not taken, and a
    :class:`SolveError` names it, with the partial statistics attached.

    ``log_steps`` measures step sizes in ``log|t|`` (t₀ and t₁ non-zero, of one sign): a step
    is ``t → t·e^{±h}`` and ``min_step``/``max_step``/``first_step`` are in that unit. For
    problems whose time scale is proportional to ``|t|`` this keeps the controller's steps
    natural in both directions (growing or shrinking ``t`` alike).
    """
    solver = get(solver)
    check_flags(check_finite=check_finite, log_steps=log_steps)
    if not solver.adaptive:
        raise ValueError(f"solver {solver.name!r} has no error estimate; adaptive solvers: "
                         "see solvers.available(adaptive=True)")
    stepping = ErrorControl(t0, t1, rtol=rtol, atol=atol, norm=norm, controller=controller, first_step=first_step,
                            log_steps=log_steps)
    return integrate(f, y0, solver, stepping, max_nfe=max_nfe, callback=callback, check_finite=check_finite,
                     time_name=time_name)
