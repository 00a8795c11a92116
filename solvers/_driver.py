"""The fixed-grid driver: owns the loop, the direction, the counting and the error reports."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Solver, VectorField
from ._checks import check_flags, check_state
from ._errors import SolveError
from ._methods import EULER
from ._registry import get
from ._rk import ExplicitRK
from ._stats import Stats

_FINAL_EULER = ExplicitRK("euler", EULER, 1)


class StepInfo(NamedTuple):
    """What a callback receives after each accepted step."""

    step: int
    t0: float
    t1: float
    y: Tensor
    state: Any = None  # the solver's carried state after the step (e.g. f(t1, y) of an FSAL pair)


@dataclass
class Solution:
    """The end state ``y``, the statistics, the solver's carried state and the times reached."""

    y: Tensor
    stats: Stats
    state: Any
    ts: list[float]


class CountingField:
    """Wraps ``f`` and counts its evaluations (the NFE in the statistics)."""

    __slots__ = ("f", "nfe")

    def __init__(self, f: VectorField) -> None:
        self.f = f
        self.nfe = 0

    def __call__(self, t: float, y: Tensor, **kwargs: object) -> Tensor:
        self.nfe += 1
        return self.f(t, y, **kwargs)


def check_grid(ts: Sequence[float], *, name: str = "ts") -> list[float]:
    """Validate a time grid: at least two finite, strictly monotone times; returned as Python floats."""
    try:
        grid = [float(t) for t in (ts.tolist() if hasattr(ts, "tolist") else ts)]
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of real numbers, got {type(ts).__name__}") from None
    if len(grid) < 2:
        raise ValueError(f"{name} must hold at least 2 times (one step), got {len(grid)}")
    if not all(math.isfinite(t) for t in grid):
        raise ValueError(f"{name} must be finite, got {grid}")
    diffs = [b - a for a, b in zip(grid, grid[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        bad = next(i for i, d in enumerate(diffs) if (d <= 0) != (diffs[0] <= 0) or d == 0)
        raise ValueError(f"{name} must be strictly monotone; it breaks between index {bad} and {bad + 1} "
                         f"({grid[bad]!r} -> {grid[bad + 1]!r})")
    return grid


def _located(err: Exception, i: int, t0: float, t1: float, time_name: str, stats: Stats) -> Exception:
    where = f"step {i} ({time_name} {t0:.6g} -> {t1:.6g})"
    if isinstance(err, (ValueError, TypeError)) and not isinstance(err, SolveError):
        return SolveError(f"{where}: {err}", step=i, t0=t0, t1=t1, stats=stats)
    err.add_note(f"while solving {where}")
    return err


def raise_if_nonfinite(flags: list[Tensor], ts: Sequence[float], time_name: str, stats: Stats) -> None:
    """One host sync at the end of a solve: locate the first step whose result is not finite.

    ``flags`` holds one sum of the state per step (a reduction is several times cheaper than
    ``isfinite().all()`` inside the loop, and a NaN or inf anywhere makes it non-finite).
    """
    if not flags:
        return
    ok = torch.isfinite(torch.stack(flags))
    if bool(ok.all()):
        return
    i = int((~ok).nonzero()[0, 0])
    raise SolveError(f"step {i} ({time_name} {ts[i]:.6g} -> {ts[i + 1]:.6g}) produced non-finite values: "
                     "the vector field (the model) returned NaN or inf, or the state overflowed",
                     step=i, t0=ts[i], t1=ts[i + 1], stats=stats)


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
    grid = check_grid(ts)
    check_state(y0, "y0")  # issue 13: a real floating-point start, bool flags
    check_flags(eval_end=eval_end, check_finite=check_finite)
    field = CountingField(f)
    stats = Stats()
    start = time.perf_counter()
    n = len(grid) - 1
    y = y0
    flags: list[Tensor] = []
    if state is None:
        state = solver.init(field, grid[0], y0)
    last_euler = (not eval_end) and solver.evaluates_end
    for i in range(n):
        t0, t1 = grid[i], grid[i + 1]
        method = _FINAL_EULER if (last_euler and i == n - 1) else solver
        try:
            result = method.step(field, t0, t1, y, state)
        except Exception as err:
            stats.nfe, stats.steps, stats.accepted = field.nfe, i, i
            raise _located(err, i, t0, t1, time_name, stats) from err
        y, state = result.y, result.state
        if check_finite:
            flags.append(y.sum())  # NaN/inf anywhere makes the sum non-finite; checked once, at the end
        if callback is not None:
            callback(StepInfo(i, t0, t1, y))
    stats.nfe, stats.steps, stats.accepted = field.nfe, n, n
    stats.wall_time = time.perf_counter() - start
    raise_if_nonfinite(flags, grid, time_name, stats)
    return Solution(y, stats, state, grid)


def nfe_for_steps(solver: str | Solver, steps: int, *, eval_end: bool = True) -> int:
    """The exact NFE of ``steps`` fixed steps, found by a dry run of the driver on a scalar."""
    solver = get(solver)
    grid = [2.0 - i / steps for i in range(steps + 1)]  # positive times: log-time methods count too
    y0 = torch.zeros((), dtype=torch.float64)
    return solve(lambda t, y: torch.zeros_like(y), y0, grid, solver, eval_end=eval_end,
                 check_finite=False).stats.nfe


def steps_for_nfe(solver: str | Solver, nfe: int, *, eval_end: bool = True) -> int:
    """The largest step count whose exact NFE is at most ``nfe`` (a ValueError if one step costs more)."""
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    solver = get(solver)
    one = nfe_for_steps(solver, 1, eval_end=eval_end)
    if nfe < one:
        raise ValueError(f"nfe={nfe} is below the cost of one step of solver {solver.name!r} ({one} evaluations)")
    per_step = max(nfe_for_steps(solver, 2, eval_end=eval_end) - one, 1)
    steps = max(1, (nfe - one) // per_step + 1)
    while steps > 1 and nfe_for_steps(solver, steps, eval_end=eval_end) > nfe:
        steps -= 1
    while nfe_for_steps(solver, steps + 1, eval_end=eval_end) <= nfe:
        steps += 1
    return steps
