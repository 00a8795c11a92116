"""Fixed-grid solves: :func:`solve` across a grid, :func:`unsolve` back along it, and exact NFE of a step count.

Both are :func:`solvers.integrate` with a :class:`~solvers.FixedGrid` stepping; the loop,
the counting and the error reports live there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import Solver, VectorField
from ._checks import check_flags, check_state
from ._integrate import FixedGrid, Solution, StepInfo, check_grid, integrate
from ._methods import EULER
from ._registry import get
from ._rk import ExplicitRK

#: The Euler step a solver that would evaluate ``f`` at the grid's end takes instead (``eval_end=False``).
FINAL_EULER = ExplicitRK("euler", EULER, 1)

__all__ = ["FINAL_EULER", "check_grid", "nfe_for_steps", "solve", "steps_for_nfe", "unsolve"]


def final_step_methods(solver: Solver, steps: int, eval_end: bool) -> dict[int, Solver]:
    """The per-step methods of a fixed grid: the last step is Euler when ``f`` must not be evaluated at the end,
    else the solver's own ``final_method`` where it has one (a multistep method's lower-order last step)."""
    if not eval_end and solver.evaluates_end:
        return {steps - 1: FINAL_EULER}
    final = getattr(solver, "final_method", None)
    return {steps - 1: final} if final is not None else {}


def solve(
    f: VectorField,
    y0: Tensor,
    ts: Sequence[float],
    solver: str | Solver = "euler",
    *,
    state: Any = None,
    eval_end: bool = True,
    callback: Callable[[StepInfo], None] | None = None,
    check_finite: bool = True,
    time_name: str = "t",
) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` across the grid ``ts`` (increasing or decreasing), one step per interval.

    ``eval_end=False`` says ``f`` must not be evaluated at ``ts[-1]``: a solver that would
    (``solver.evaluates_end``) takes its last step as explicit Euler instead, as EDM does for
    the step into σ = 0. ``state`` seeds the solver's carried state (e.g. a reversible
    solver's second variable). Non-finite values are located to the step with one host sync
    at the end, never inside the loop.
    """
    solver = get(solver)
    check_flags(eval_end=eval_end)
    grid = check_grid(ts)
    stepping = FixedGrid(grid, final_step_methods(solver, len(grid) - 1, eval_end))
    return integrate(f, y0, solver, stepping, state=state, callback=callback, check_finite=check_finite,
                     time_name=time_name)


def unsolve(
    f: VectorField,
    y_end: Tensor,
    ts: Sequence[float],
    solver: str | Solver,
    *,
    state: Any,
    callback: Callable[[StepInfo], None] | None = None,
    check_finite: bool = True,
    time_name: str = "t",
) -> Solution:
    """Undo ``solve(f, y0, ts, solver)``: from its end ``(y_end, state)`` at ``ts[-1]`` back to ``ts[0]``.

    Each step is the solver's exact algebraic inverse (:meth:`Solver.unstep`), so that
    ``unsolve(f, sol.y, ts, solver, state=sol.state).y`` equals ``y0`` up to floating-point
    rounding for any grid and any ``f`` — no error of the method itself enters. ``ts`` is the
    grid as it was *solved* (forward order); the callback's ``StepInfo.step`` counts the inverse
    steps 0, 1, … and ``t0 → t1`` reads ``ts[i+1] → ts[i]``. The returned ``Solution.ts`` is
    the grid in the order visited (``ts`` reversed) and ``state`` the solver's state at ``ts[0]``.
    """
    solver = get(solver)
    check_state(y_end, "y_end")
    grid = check_grid(ts)
    return integrate(f, y_end, solver, FixedGrid(grid, inverse=True), state=state, callback=callback,
                     check_finite=check_finite, time_name=time_name)


#: Step counts up to this are counted by a dry run of the whole grid; beyond it, by extrapolation (see below).
DRY_RUN_STEPS = 64
#: How many consecutive step counts past :data:`DRY_RUN_STEPS` must cost the same to extrapolate.
_WINDOW = 4


def _check_count(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")
    return value


def _dry_run(solver: Solver, steps: int, eval_end: bool) -> int:
    grid = [2.0 - i / steps for i in range(steps + 1)]  # positive times: log-time methods count too
    y0 = torch.zeros((), dtype=torch.float64)
    return solve(lambda t, y: torch.zeros_like(y), y0, grid, solver, eval_end=eval_end, check_finite=False).stats.nfe


def _settled(solver: Solver, eval_end: bool, steps: int) -> tuple[int, int]:
    """``(NFE of DRY_RUN_STEPS + _WINDOW steps, evaluations per further step)``, from dry runs."""
    counts = [_dry_run(solver, DRY_RUN_STEPS + i, eval_end) for i in range(_WINDOW + 1)]
    per_step = {b - a for a, b in zip(counts, counts[1:])}
    if len(per_step) != 1 or counts[-1] <= counts[-2]:
        raise ValueError(f"solver {solver.name!r}: the cost of a step does not settle ({counts} evaluations for "
                         f"{DRY_RUN_STEPS}..{DRY_RUN_STEPS + _WINDOW} steps), so the NFE of {steps} steps cannot be "
                         f"counted without running them; give at most {DRY_RUN_STEPS + _WINDOW} steps")
    return counts[-1], per_step.pop()


def nfe_for_steps(solver: str | Solver, steps: int, *, eval_end: bool = True) -> int:
    """The exact NFE of ``steps`` fixed steps, counted by a dry run of the loop on a scalar.

    Up to ``DRY_RUN_STEPS + 4`` steps the whole grid is run. Beyond, a step costs whatever a long
    grid's middle steps cost (only the first steps, while a multistep history fills or an FSAL
    pair starts, and the last, into the grid's end, differ): the dry runs of ``DRY_RUN_STEPS`` …
    ``DRY_RUN_STEPS + 4`` steps must add the same number of evaluations per step, and the count
    is extended from there, in constant time for any ``steps`` (a solver whose cost does not
    settle is a ``ValueError``, not a guess).
    """
    solver = get(solver)
    steps = _check_count(steps, "steps")
    check_flags(eval_end=eval_end)
    if steps <= DRY_RUN_STEPS + _WINDOW:
        return _dry_run(solver, steps, eval_end)
    base, per_step = _settled(solver, eval_end, steps)
    return base + (steps - DRY_RUN_STEPS - _WINDOW) * per_step


def steps_for_nfe(solver: str | Solver, nfe: int, *, eval_end: bool = True) -> int:
    """The largest step count whose exact NFE is at most ``nfe`` (a ValueError if one step costs more).

    Past the dry-run range of :func:`nfe_for_steps` the count is solved for directly; within it,
    by bisection (the NFE grows with the step count): a handful of short dry runs for any budget.
    """
    solver = get(solver)
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__} {nfe!r}")
    check_flags(eval_end=eval_end)
    one = nfe_for_steps(solver, 1, eval_end=eval_end)
    if nfe < one:
        raise ValueError(f"nfe={nfe} is below the cost of one step of solver {solver.name!r} ({one} evaluations)")
    top = DRY_RUN_STEPS + _WINDOW
    if nfe >= _dry_run(solver, top, eval_end):
        base, per_step = _settled(solver, eval_end, top + 1)
        return top + (nfe - base) // per_step
    lo, hi = 1, top  # nfe_for_steps(lo) <= nfe < nfe_for_steps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _dry_run(solver, mid, eval_end) <= nfe:
            lo = mid
        else:
            hi = mid
    return lo
