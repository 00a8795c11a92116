"""The solver interface: a solver implements one step; the driver owns the loop."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

#: The right-hand side of ``dy/dt = f(t, y)``: ``t`` is a Python float (float64 on the host).
VectorField = Callable[[float, Tensor], Tensor]


class Derivative(NamedTuple):
    """``k = f(t, y)`` already evaluated at the start of the next step (reused, not recomputed)."""

    t: float
    k: Tensor


@dataclass(slots=True)
class StepResult:
    """What one step returns: the new state, the solver's carried state, and an error estimate.

    ``error`` is ``None`` for methods without an embedded error estimate; otherwise a
    tensor shaped like ``y`` that estimates the local error of this step.
    """

    y: Tensor
    state: Any
    error: Tensor | None = None


class Solver(abc.ABC):
    """One method for ``dy/dt = f(t, y)``.

    A solver knows nothing of the direction of integration, of grids, of counting or
    of step-size control: the driver (:func:`solvers.solve`, :func:`solvers.solve_adaptive`)
    owns all of that and calls :meth:`step` with ``t1 < t0`` as readily as ``t1 > t0``.

    Capabilities are class attributes that can be queried: ``order``, ``adaptive``
    (has an embedded error estimate), ``multistep`` (carries past derivatives),
    ``reversible`` (each step has an exact algebraic inverse, :meth:`unstep`),
    ``evaluates_end`` (a step evaluates ``f`` at ``t1``).
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False
    multistep: ClassVar[bool] = False
    reversible: ClassVar[bool] = False
    evaluates_end: ClassVar[bool] = False

    def init(self, f: VectorField, t0: float, y0: Tensor) -> Any:
        """The carried state before the first step (``None`` unless a solver needs one)."""
        return None

    @abc.abstractmethod
    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        """Advance ``y0`` at ``t0`` to ``t1``."""
        raise NotImplementedError  # abstract

    def on_interval(self, t0: float, t1: float) -> Solver:
        """The method to use for a whole solve from ``t0`` to ``t1`` (either may be ±inf): ``self``, unless the
        method's formulas depend on where the interval lies (log-time weights need it away from t = 0)."""
        return self

    def step_cost(self, t0: float, state: Any) -> int | None:
        """How many evaluations of ``f`` the next :meth:`step` from ``t0`` with ``state`` makes, when the
        solver knows (``None`` otherwise): the loop refuses a step that would pass ``max_nfe``
        before taking it."""
        return None

    def unstep(self, f: VectorField, t0: float, t1: float, y1: Tensor, state1: Any) -> tuple[Tensor, Any]:
        """The exact algebraic inverse of :meth:`step` (reversible solvers only)."""
        raise TypeError(f"solver {self.name!r} is not reversible; it has no exact inverse step")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, order={self.order})"
