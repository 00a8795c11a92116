"""The solver interface: a solver implements one step; the driver owns the loop."""

from __future__ import annotations

import abc
import math
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


class Shifted(Solver):
    """``base`` with the field evaluated at times shifted off the step's own, by a multiple of the step.

    In the step ``(t₀, t₁)`` every evaluation ``f(t, y)`` the base method makes is taken at

        t + δ·(t₁ − t₀),   δ = ``shifts[(t₀, t₁)]``,

    while the result is used as the derivative *at t* (a multistep method stores it under t).
    Decoupling the time the field is evaluated at from the time its state belongs to is what
    LD3 (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025) learns
    beside the grid, and what the time-shift and AMED samplers correct: at a few steps the
    state lags or leads the trajectory its time stands for. ``δ = 0`` everywhere is ``base``
    bit for bit; any δ ≠ 0 is a consistent first-order perturbation (the evaluation point
    moves by O(h)), so the method is meant for the fixed grid and budget its shifts were
    fitted on, not for convergence.

    ``shifts`` maps each step taken with this method to its δ; a step not in the map (another
    grid, or the same grid the other way) is an error, since shifts belong to one grid and one
    direction. A step whose method is replaced by a lower order one (``limited``, a
    ``final_method``) keeps its shift.
    """

    def __init__(self, base: Solver, shifts: dict[tuple[float, float], float], *, name: str | None = None) -> None:
        if not isinstance(base, Solver) or isinstance(base, Shifted):
            raise TypeError(f"base must be a solvers.Solver that is not itself Shifted, got {type(base).__name__}")
        if base.reversible:
            raise ValueError(f"solver {base.name!r} is reversible: shifted evaluations would break its exact inverse")
        if not isinstance(shifts, dict):
            raise TypeError(f"shifts must be a dict of step (t0, t1) -> shift, got {type(shifts).__name__}")
        table: dict[tuple[float, float], float] = {}
        for key, delta in shifts.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"shifts must be keyed by steps (t0, t1), got the key {key!r}")
            if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not math.isfinite(delta):
                raise ValueError(f"the shift of the step {key!r} must be a finite number, got {delta!r}")
            table[(float(key[0]), float(key[1]))] = float(delta)
        self.base = base
        self.shifts = table
        self.name = name or f"{base.name}+shifted"  # type: ignore[misc]
        for attr in ("order", "adaptive", "multistep", "evaluates_end"):
            setattr(self, attr, getattr(base, attr))
        for attr in ("steps_order", "fixed_grid_order", "error_order"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        final = getattr(base, "final_method", None)
        self.final_method = None if final is None else Shifted(final, table, name=self.name)
        if hasattr(base, "limited"):  # only where the base has a lower-order form (callers ask with getattr)
            self.limited = self._limited

    def _wrap(self, other: Solver) -> Solver:
        return self if other is self.base else Shifted(other, self.shifts, name=self.name)

    def _limited(self, *args: Any, **kwargs: Any) -> Solver:
        """The base's lower-order form for one step (``limited``), with the same shifts."""
        return self._wrap(self.base.limited(*args, **kwargs))  # type: ignore[attr-defined]

    def on_interval(self, t0: float, t1: float) -> Solver:
        return self._wrap(self.base.on_interval(t0, t1))

    def init(self, f: VectorField, t0: float, y0: Tensor) -> Any:
        return self.base.init(f, t0, y0)

    def step_cost(self, t0: float, state: Any) -> int | None:
        return self.base.step_cost(t0, state)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        delta = self.shifts.get((t0, t1))
        if delta is None:
            raise ValueError(f"solver {self.name!r} has no shift for the step {t0!r} -> {t1!r}: its shifts belong "
                             f"to the grid and direction they were fitted on (steps {sorted(self.shifts)})")
        if delta == 0.0:
            return self.base.step(f, t0, t1, y0, state)
        offset = delta * (t1 - t0)

        def shifted(t: float, y: Tensor) -> Tensor:
            return f(t + offset, y)

        return self.base.step(shifted, t0, t1, y0, state)


class Scaled(Solver):
    """``base`` with the field scaled about an anchor, by a factor per step.

    In the step ``(t₀, t₁)`` every evaluation the base method makes returns

        f_s(t, y) = a(t, y) + (1 + s)·(f(t, y) − a(t, y)),   s = ``scales[(t₀, t₁)]``,

    ``a`` the ``anchor`` (``None``: zero, i.e. f scaled by 1 + s). The scaled value is what the
    base uses and, for a multistep method, stores. It changes the magnitude of the field, which
    neither the step's times nor its coefficients can: the learned form of epsilon scaling
    (Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024), where a
    network's output is systematically too large or small at a few steps. The caller chooses
    the anchor, e.g. the field a zero network output would give in its variables. ``s = 0``
    everywhere is ``base`` bit for bit (the step is not wrapped); any s ≠ 0 is a first-order
    perturbation, meant for the grid and budget it was fitted on.

    ``scales`` maps each step taken with this method to its s; a step not in the map is an
    error, since the scales belong to one grid and one direction. A step whose method is
    replaced by a lower order one (``limited``, a ``final_method``) keeps its scale. A
    :class:`Shifted` method goes outside (``Shifted(Scaled(...))``), so that the anchor is
    taken at the time the state belongs to, not at the shifted one.
    """

    def __init__(self, base: Solver, scales: dict[tuple[float, float], float], *,
                 anchor: VectorField | None = None, name: str | None = None) -> None:
        if not isinstance(base, Solver) or isinstance(base, (Scaled, Shifted)):
            raise TypeError(f"base must be a solvers.Solver that is neither Scaled nor Shifted (a Shifted method "
                            f"wraps the Scaled one), got {type(base).__name__}")
        if base.reversible:
            raise ValueError(f"solver {base.name!r} is reversible: a scaled field would break its exact inverse")
        if not isinstance(scales, dict):
            raise TypeError(f"scales must be a dict of step (t0, t1) -> scale, got {type(scales).__name__}")
        if anchor is not None and not callable(anchor):
            raise TypeError(f"anchor must be None or a callable (t, y) -> tensor, got {type(anchor).__name__}")
        table: dict[tuple[float, float], float] = {}
        for key, s in scales.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"scales must be keyed by steps (t0, t1), got the key {key!r}")
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s):
                raise ValueError(f"the scale of the step {key!r} must be a finite number, got {s!r}")
            table[(float(key[0]), float(key[1]))] = float(s)
        self.base = base
        self.scales = table
        self.anchor = anchor
        self.name = name or f"{base.name}+scaled"  # type: ignore[misc]
        for attr in ("order", "adaptive", "multistep", "evaluates_end"):
            setattr(self, attr, getattr(base, attr))
        for attr in ("steps_order", "fixed_grid_order", "error_order"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        final = getattr(base, "final_method", None)
        self.final_method = None if final is None else Scaled(final, table, anchor=anchor, name=self.name)
        if hasattr(base, "limited"):  # only where the base has a lower-order form (callers ask with getattr)
            self.limited = self._limited

    def _wrap(self, other: Solver) -> Solver:
        return self if other is self.base else Scaled(other, self.scales, anchor=self.anchor, name=self.name)

    def _limited(self, *args: Any, **kwargs: Any) -> Solver:
        """The base's lower-order form for one step (``limited``), with the same scales."""
        return self._wrap(self.base.limited(*args, **kwargs))  # type: ignore[attr-defined]

    def on_interval(self, t0: float, t1: float) -> Solver:
        return self._wrap(self.base.on_interval(t0, t1))

    def init(self, f: VectorField, t0: float, y0: Tensor) -> Any:
        return self.base.init(f, t0, y0)

    def step_cost(self, t0: float, state: Any) -> int | None:
        return self.base.step_cost(t0, state)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        s = self.scales.get((t0, t1))
        if s is None:
            raise ValueError(f"solver {self.name!r} has no scale for the step {t0!r} -> {t1!r}: its scales belong "
                             f"to the grid and direction they were fitted on (steps {sorted(self.scales)})")
        if s == 0.0:
            return self.base.step(f, t0, t1, y0, state)
        anchor = self.anchor

        def scaled(t: float, y: Tensor) -> Tensor:
            k = f(t, y)
            if anchor is None:
                return (1.0 + s) * k
            a = anchor(t, y)
            return a + (1.0 + s) * (k - a)

        return self.base.step(scaled, t0, t1, y0, state)
