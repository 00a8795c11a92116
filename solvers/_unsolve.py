"""The inverse driver: run a reversible solver's exact inverse steps back along a solved grid."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ._base import Solver, VectorField
from ._checks import check_flags, check_state
from ._driver import CountingField, Solution, StepInfo, _located, check_grid
from ._errors import SolveError
from ._registry import get
from ._stats import Stats


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
    if not solver.reversible:
        raise TypeError(f"unsolve needs a reversible solver (solvers.available(reversible=True): "
                        f"{', '.join(_reversible_names())}); got {solver.name!r}")
    grid = check_grid(ts)
    check_state(y_end, "y_end")  # issue 13
    check_flags(check_finite=check_finite)
    if state is None:
        raise ValueError("unsolve needs the solver's carried state at the grid's end (Solution.state of the "
                         "forward solve); without it the inverse is not defined")
    field = CountingField(f)
    stats = Stats()
    start = time.perf_counter()
    n = len(grid) - 1
    back = grid[::-1]
    y = y_end
    flags: list[Tensor] = []
    for j, i in enumerate(range(n - 1, -1, -1)):
        t0, t1 = grid[i], grid[i + 1]
        try:
            y, state = solver.unstep(field, t0, t1, y, state)
        except Exception as err:
            stats.nfe, stats.steps, stats.accepted = field.nfe, j, j
            raise _located(err, j, t1, t0, time_name, stats) from err
        if check_finite:
            flags.append(y.sum())  # one sum per step, checked once at the end (as solve does)
        if callback is not None:
            callback(StepInfo(j, t1, t0, y))
    stats.nfe, stats.steps, stats.accepted = field.nfe, n, n
    stats.wall_time = time.perf_counter() - start
    if flags:
        ok = torch.isfinite(torch.stack(flags))
        if not bool(ok.all()):
            j = int((~ok).nonzero()[0, 0])
            raise SolveError(f"inverse step {j} ({time_name} {back[j]:.6g} -> {back[j + 1]:.6g}) produced "
                             "non-finite values: the vector field returned NaN or inf, or the state overflowed",
                             step=j, t0=back[j], t1=back[j + 1], stats=stats)
    return Solution(y, stats, state, back)


def _reversible_names() -> list[str]:
    from ._registry import available

    return available(reversible=True)
