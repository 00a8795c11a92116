"""The solver interface: a solver implements one step; the driver owns the loop."""

from __future__ import annotations

import abc
import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor

#: The right-hand side of ``dy/dt = f(t, y)``: ``t`` is a Python float (float64 on the host).
VectorField = Callable[[float, Tensor], Tensor]


class Derivative(NamedTuple):
    """``k = f(t, y)`` already evaluated at the start of the next step (reused, not recomputed).

    ``made_by`` is the :attr:`Solver.state_maker` of the solver whose step made it (``None``: made by the loop, or
    built by hand), so that a solve given it as ``state=`` refuses it unless it made it.
    """

    t: float
    k: Tensor
    made_by: str | None = None


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
    ``evaluates_end`` (a step evaluates ``f`` at ``t1``), ``uses_initial_state`` (a step reads the
    ``y0`` its solve's :meth:`init` was given, so a step cannot be recomputed apart from its solve).

    ``state_type`` is the type of the carried state the solver makes and takes back as a solve's ``state=``
    (:class:`Derivative`, :class:`~solvers.History`, :class:`~solvers.ReversibleState`); the state records the
    solver's :attr:`state_maker` (``made_by``), and :meth:`check_carried` refuses, before the first step, a state
    of another type, one made by another solver or configuration, or one whose time, shape or dtype does not fit
    the solve. ``None`` (a solver of one's own that declares nothing): its states reach its steps unchecked.
    """

    name: ClassVar[str] = ""
    order: ClassVar[int] = 1
    adaptive: ClassVar[bool] = False
    multistep: ClassVar[bool] = False
    reversible: ClassVar[bool] = False
    evaluates_end: ClassVar[bool] = False
    uses_initial_state: ClassVar[bool] = False
    state_type: ClassVar[type | None] = None

    def maker_options(self) -> str:
        """The options that change what this solver's carried state holds or means, as ``"(order=4)"`` (``""``
        for none): with the name they make :attr:`state_maker`."""
        return ""

    @property
    def state_maker(self) -> str:
        """What a carried state made by this solver records of it (``made_by``): its name and the options that
        change what the state holds or means, e.g. ``"lms(order=4)"``, ``"reversible(base='euler',
        coupling=0.999)"``. A solve refuses a ``state=`` recorded as made by another."""
        return self.name + self.maker_options()

    def check_carried(self, state: Any, t0: float, y0: Tensor, t1: float | None = None, *,
                      name: str = "state") -> None:
        """Refuse ``state`` (the argument ``name`` of a solve from ``y0`` at ``t0`` towards ``t1``, ``None`` where
        unknown) unless it is ``None`` (a fresh start) or a carried state this solver can continue: of its
        ``state_type`` exactly, not recorded as made by another solver (:attr:`state_maker`), and, as a subclass
        checks, of the solve's time, shape, dtype and direction. A ``TypeError`` for another type, a ``ValueError``
        otherwise, each naming the argument, what it got and what this solver takes. A solver without a
        ``state_type`` takes any state."""
        expected = self.state_type
        if state is None or expected is None:
            return
        if type(state) is not expected:
            made = getattr(state, "made_by", None)
            got = type(state).__name__ + (f" made by {made!r}" if isinstance(made, str) else "")
            raise TypeError(f"{name} must be None (a fresh start) or the carried state solver {self.name!r} makes, a "
                            f"solvers.{expected.__name__} recorded as made by {self.state_maker!r}; got a {got}: a "
                            "state continues only the solver that made it")
        made = getattr(state, "made_by", None)
        if made is not None and made != self.state_maker:
            raise ValueError(f"{name} was made by {made!r}, not by solver {self.name!r} ({self.state_maker!r}): a "
                             f"carried state continues only the solver and options that made it; continue with "
                             f"{made!r}, or pass {name}=None for a fresh start")

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

    def fitted_steps(self) -> frozenset[tuple[float, float]] | None:
        """The only steps ``(t0, t1)`` this method can take, where its per-step values belong to one grid and one
        direction (:class:`Shifted`, :class:`Scaled`, :class:`~solvers.CorrectedAdams`); ``None``: any step. A
        fixed-grid solve checks its steps against them before the first one (:class:`GridMismatch`)."""
        return None

    def lacks(self, t0: float, t1: float) -> tuple[str, str] | None:
        """What this method has no value for at the step ``(t0, t1)``, as (singular, plural) nouns (``("shift",
        "shifts")``), or ``None`` where it can take the step (see :meth:`fitted_steps`)."""
        return None

    def unstep(self, f: VectorField, t0: float, t1: float, y1: Tensor, state1: Any) -> tuple[Tensor, Any]:
        """The exact algebraic inverse of :meth:`step` (reversible solvers only)."""
        raise TypeError(f"solver {self.name!r} is not reversible; it has no exact inverse step")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, order={self.order})"


def check_carried_tensor(v: object, y0: Tensor, what: str) -> None:
    """A tensor of a carried state (``what``, e.g. ``"state.k"``) fits the solve's ``y0``: a tensor of its shape,
    dtype and device (another shape broadcast, another dtype promoted the solve's state, without a word)."""
    if not isinstance(v, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(v).__name__}")
    if v.shape != y0.shape:
        raise ValueError(f"{what} has shape {tuple(v.shape)}, the solve's y0 has shape {tuple(y0.shape)}: the state "
                         "belongs to another solve")
    if v.dtype != y0.dtype:
        raise TypeError(f"{what} is {v.dtype}, the solve's y0 is {y0.dtype}: the state belongs to another solve "
                        "(convert both to one dtype)")
    if v.device != y0.device:
        raise ValueError(f"{what} is on {v.device}, the solve's y0 on {y0.device}: move the state with it")


class _OnBase(Solver):
    """A method that wraps a ``base`` method and leaves its steps' bookkeeping to it: the carried state (its type is
    copied from the base; its maker, :meth:`check_carried`) and the cost of a step (:class:`Shifted`,
    :class:`Scaled`)."""

    base: Solver

    @property
    def state_maker(self) -> str:  # the base's steps make the carried states
        return self.base.state_maker

    def check_carried(self, state: Any, t0: float, y0: Tensor, t1: float | None = None, *,
                      name: str = "state") -> None:
        self.base.check_carried(state, t0, y0, t1, name=name)

    def step_cost(self, t0: float, state: Any) -> int | None:
        return self.base.step_cost(t0, state)




class Shifted(_OnBase):
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
        for attr in ("order", "adaptive", "multistep", "evaluates_end", "uses_initial_state", "state_type"):
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

    def fitted_steps(self) -> frozenset[tuple[float, float]]:
        return _within(frozenset(self.shifts), self.base)

    def lacks(self, t0: float, t1: float) -> tuple[str, str] | None:
        return ("shift", "shifts") if (t0, t1) not in self.shifts else self.base.lacks(t0, t1)

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

        shifted.__wrapped__ = f  # type: ignore[attr-defined]  # the solve's own field (Scaled keys its start by it)
        return self.base.step(shifted, t0, t1, y0, state)


class Scaled(_OnBase):
    """``base`` with the field scaled about an anchor, by a factor per step.

    In the step ``(t₀, t₁)`` every evaluation the base method makes returns

        f_s(t, y) = a(t, y) + (1 + s)·(f(t, y) − a(t, y)),   s = ``scales[(t₀, t₁)]``,

    ``a`` the ``anchor`` (``None``: zero, i.e. f scaled by 1 + s). The scaled value is what the
    base uses and, for a multistep method, stores. A value carried from an earlier step keeps that
    step's scale: a multistep history, and an FSAL pair's (``bosh3``, ``dopri5``) first stage, which is
    the previous step's last; so ``Scaled(bosh3)`` with scales that differ between steps is not
    ``bosh3`` on a field scaled per step, as it is for a method that evaluates every stage afresh
    (``heun``). Fitted and used the same way, the learned values account for it.
    It changes the magnitude of the field, which neither the step's times nor its coefficients can
    (the learned form of epsilon scaling: Ning et al., "Elucidating the Exposure Bias in Diffusion
    Models", ICLR 2024). The caller chooses the anchor: the value about which the field's magnitude is wrong. ``s = 0``
    everywhere is ``base`` bit for bit (the step is not wrapped); any s ≠ 0 is a first-order
    perturbation, meant for the grid and budget it was fitted on.

    ``scales`` maps each step taken with this method to its s; a step not in the map is an
    error, since the scales belong to one grid and one direction. A step whose method is
    replaced by a lower order one (``limited``, a ``final_method``) keeps its scale. A
    :class:`Shifted` method goes outside (``Shifted(Scaled(...))``), so that the anchor is
    taken at the time the state belongs to, not at the shifted one.

    ``directions`` (optional, keyed like ``scales``) adds a second learned term per step: a multiple of
    the solve's initial state ``y_T`` (the ``y0`` of :meth:`init`), taken perpendicular to the step's own
    direction ``d = f − a`` and at its length,

        f_s = a + (1 + s)·d + w·|d|·û,   û = unit(y_T − ⟨y_T, d⟩/|d|²·d),   w = ``directions[(t₀, t₁)]``,

    per sample (the norms over all but the first axis). The trajectory of an ODE solve stays close to the
    plane of its start and its direction; correcting the direction within that plane with weights shared
    across samples is the two-direction core of PAS (Wang et al., "Diffusion Sampling Correction via
    Approximately 10 Parameters", ICML 2025). ``w = 0`` (with ``s = 0``) is the base bit for bit; where
    ``d`` or ``û`` vanishes the term is zero (the norms are taken in at least float32, of ``y_T`` scaled by
    a power of 2 to its largest entry, so that half precision and a huge ``y_T`` do not overflow them).
    The initial state is recorded by :meth:`init` for the solve's vector field ``f`` (the one its steps
    are given, or that a :class:`Shifted` wrapper's field wraps as ``__wrapped__``), shared by this
    method's lower-order and final forms: solves in a row or in several threads each find their own
    ``y_T``, and a step whose solve did not call :meth:`init` (one continued from a carried state, or one
    step recomputed apart from its solve) is refused rather than given another solve's.
    Such a method says ``uses_initial_state``.

    ``trajectory`` (optional, keyed like ``scales``, each value a tuple of weights ``c_1, c_2, ...``) adds
    coordinates along the solve's **previous steps' directions**, the rest of PAS's trajectory basis: with
    ``d_{-j}`` the direction ``f − a`` of the first evaluation ``j`` steps back (as the field returned it, before
    any term of this method), Gram–Schmidt per sample on ``d, y_T, d_{-1}, d_{-2}, ...`` gives the part
    ``r_j`` of the unit vector ``d_{-j}/|d_{-j}|`` perpendicular to ``d``, ``y_T`` and ``d_{-1} … d_{-j+1}``,
    and the step adds

        Σ_j c_j·|d|·r_j        (r_j *not* renormalised: |r_j| = sin of the angle it makes with that span).

    A smooth field turns its direction by O(h) per step, so |r_j| = O(h) and any bounded ``c`` is an O(h)
    change of the field: the method stays consistent (it converges, at first order at least), where the
    scales and the x_T direction change it by O(1). At the few large steps it is fitted for, the directions
    turn by tens of degrees and the term can move the step within the plane of its last directions, as a
    learned multistep extrapolation does along them. ``c = 0`` everywhere is the method without it bit for
    bit; a step with fewer previous directions than weights (the first steps) uses those it has. A method
    with a nonzero trajectory weight records the first direction of every step of its solve (keyed like the
    initial state) and says ``uses_initial_state``.
    """

    def __init__(self, base: Solver, scales: dict[tuple[float, float], float], *,
                 anchor: VectorField | None = None, name: str | None = None,
                 directions: dict[tuple[float, float], float] | None = None,
                 trajectory: dict[tuple[float, float], tuple[float, ...]] | None = None) -> None:
        if not isinstance(base, Solver) or isinstance(base, (Scaled, Shifted)):
            raise TypeError(f"base must be a solvers.Solver that is neither Scaled nor Shifted (a Shifted method "
                            f"wraps the Scaled one), got {type(base).__name__}")
        if base.reversible:
            raise ValueError(f"solver {base.name!r} is reversible: a scaled field would break its exact inverse")
        if not isinstance(scales, dict):
            raise TypeError(f"scales must be a dict of step (t0, t1) -> scale, got {type(scales).__name__}")
        if anchor is not None and not callable(anchor):
            raise TypeError(f"anchor must be None or a callable (t, y) -> tensor, got {type(anchor).__name__}")
        if directions is not None and not isinstance(directions, dict):
            raise TypeError(f"directions must be None or a dict of step (t0, t1) -> weight, got "
                            f"{type(directions).__name__}")
        if trajectory is not None and not isinstance(trajectory, dict):
            raise TypeError(f"trajectory must be None or a dict of step (t0, t1) -> tuple of weights, got "
                            f"{type(trajectory).__name__}")
        table = _step_table("scales", "scale", scales)
        weights = _step_table("directions", "direction weight", directions or {})
        past = _step_tuples("trajectory", "trajectory weights", trajectory or {})
        for argument, keyed in (("directions", weights), ("trajectory", past)):
            extra = sorted(set(keyed) - set(table))
            if extra:
                raise ValueError(f"{argument} has weights for steps without a scale {extra}: give each step of "
                                 f"{argument} a scale too (0.0 for none); steps with scales: {sorted(table)}")
        self.base = base
        self.scales = table
        self.directions = weights
        self.trajectory = past
        self.anchor = anchor
        self._starts = _Starts()  # each solve's initial state (and past directions), shared with the wrapped forms
        #: how many previous directions a step may use (0: none recorded)
        self.depth = max((len(c) for c in past.values() if any(x != 0.0 for x in c)), default=0)
        self.uses_initial_state = any(w != 0.0 for w in weights.values()) or self.depth > 0  # type: ignore[misc]
        self.name = name or f"{base.name}+scaled"  # type: ignore[misc]
        for attr in ("order", "adaptive", "multistep", "evaluates_end", "state_type"):
            setattr(self, attr, getattr(base, attr))
        for attr in ("steps_order", "fixed_grid_order", "error_order"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        final = getattr(base, "final_method", None)
        self.final_method = None if final is None else self._wrap(final)
        if hasattr(base, "limited"):  # only where the base has a lower-order form (callers ask with getattr)
            self.limited = self._limited

    def _wrap(self, other: Solver) -> Solver:
        if other is self.base:
            return self
        out = Scaled(other, self.scales, anchor=self.anchor, name=self.name, directions=self.directions,
                     trajectory=self.trajectory)
        out._starts = self._starts
        return out

    def _limited(self, *args: Any, **kwargs: Any) -> Solver:
        """The base's lower-order form for one step (``limited``), with the same scales."""
        return self._wrap(self.base.limited(*args, **kwargs))  # type: ignore[attr-defined]

    def on_interval(self, t0: float, t1: float) -> Solver:
        return self._wrap(self.base.on_interval(t0, t1))

    def init(self, f: VectorField, t0: float, y0: Tensor) -> Any:
        if self.uses_initial_state:
            self._starts.record(f, y0)
        return self.base.init(f, t0, y0)

    def fitted_steps(self) -> frozenset[tuple[float, float]]:
        return _within(frozenset(self.scales), self.base)

    def lacks(self, t0: float, t1: float) -> tuple[str, str] | None:
        return ("scale", "scales") if (t0, t1) not in self.scales else self.base.lacks(t0, t1)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        s = self.scales.get((t0, t1))
        if s is None:
            raise ValueError(f"solver {self.name!r} has no scale for the step {t0!r} -> {t1!r}: its scales belong "
                             f"to the grid and direction they were fitted on (steps {sorted(self.scales)})")
        w = self.directions.get((t0, t1), 0.0)
        c = self.trajectory.get((t0, t1), ())
        c = c if any(x != 0.0 for x in c) else ()
        if s == 0.0 and w == 0.0 and self.depth == 0:
            return self.base.step(f, t0, t1, y0, state)
        solve = self._starts.of(f) if w != 0.0 or self.depth else None
        if (w != 0.0 or self.depth) and solve is None:
            what = "a direction weight" if w != 0.0 else "trajectory weights"
            raise ValueError(f"solver {self.name!r} has {what} for the step {t0!r} -> {t1!r} but no "
                             "initial state recorded for this solve: the term needs the solve's y0, which init() "
                             "records for the solve's vector field (a solve continued from a carried state, or a "
                             "step recomputed apart from its solve, skips init; another solve's y0 is not used)")
        y_T, past = (solve.y0, solve.past[:len(c)]) if solve is not None else (None, [])
        anchor = self.anchor
        first: list[Tensor] = []

        def scaled(t: float, y: Tensor) -> Tensor:
            k = f(t, y)
            a = None if anchor is None else anchor(t, y)
            d = k if a is None else k - a
            if not first and self.depth:
                first.append(d)
            if s == 0.0 and w == 0.0 and not (c and past):  # only recording this step's direction
                return k
            out = (1.0 + s) * d if a is None else a + (1.0 + s) * d
            if w != 0.0:
                out = out + w * _perpendicular(y_T, d)
            return out if not (c and past) else out + _along_trajectory(d, y_T, past, c)

        result = self.base.step(scaled, t0, t1, y0, state)
        if first:
            solve.passed(first[0], self.depth)
        return result


def _within(steps: frozenset[tuple[float, float]], base: Solver) -> frozenset[tuple[float, float]]:
    """``steps``, less those the wrapped ``base`` cannot take itself."""
    inner = base.fitted_steps()
    return steps if inner is None else steps & inner


class GridMismatch(ValueError):
    """A fixed grid with a step that its method cannot take (:meth:`Solver.fitted_steps`), refused before the
    first step. ``solver`` is the method's name, ``step`` the index of the first such step and ``t0``, ``t1`` its
    times, ``grid`` the grid's times in the order solved, ``fitted`` the method's steps as a grid where they chain
    into one (``chained``; else in sorted order, as ``[t0, t1, t0', t1', ...]``), ``what`` the values it lacks
    (:meth:`Solver.lacks`): a caller that changed variables words it in its own."""

    def __init__(self, message: str, *, solver: str, step: int, t0: float, t1: float, grid: list[float],
                 fitted: list[float], chained: bool, what: tuple[str, str]) -> None:
        super().__init__(message)
        self.what = what
        self.solver, self.step, self.t0, self.t1 = solver, step, t0, t1
        self.grid, self.fitted, self.chained = grid, fitted, chained


def fitted_grid(steps: frozenset[tuple[float, float]]) -> list[float] | None:
    """The grid ``[t0, t1, ...]`` whose steps are exactly ``steps`` (one chain), or ``None`` where they form none."""
    following = dict(steps)
    if len(following) != len(steps):
        return None
    firsts = set(following) - set(following.values())
    if len(firsts) != 1:
        return None
    grid = [firsts.pop()]
    while grid[-1] in following and len(grid) <= len(steps):
        grid.append(following[grid[-1]])
    return grid if len(grid) == len(steps) + 1 else None


def check_fitted(plan: Sequence[tuple[float, float, Solver]], time_name: str = "t",
                 display: Callable[[float], float] | None = None) -> None:
    """Refuse, before the first step, a plan ``(t0, t1, method)`` with a step its method has no values for
    (:meth:`Solver.fitted_steps`): a :class:`GridMismatch` that names the first such step and the grid the
    method's steps make, its times shown as ``display(t)`` under ``time_name``."""
    for i, (t0, t1, method) in enumerate(plan):
        what = method.lacks(t0, t1)
        if what is None:
            continue
        fitted = method.fitted_steps() or frozenset()
        grid = [plan[0][0]] + [t for _, t, _ in plan]
        own = fitted_grid(fitted)
        times = own if own is not None else [t for step in sorted(fitted) for t in step]

        def shown(ts: list[float]) -> str:
            return "[" + ", ".join(f"{display(t) if display is not None else t:.6g}" for t in ts) + "]"

        step = f"{t0!r} -> {t1!r}" if display is None else f"{display(t0):.6g} -> {display(t1):.6g}"
        fits = (f"the grid {time_name} {shown(own)} (in that order)" if own is not None else
                f"the steps {time_name} {shown(times)} (pairs from, to)")
        raise GridMismatch(f"solver {method.name!r} has no {what[0]} for the step {step}: its {what[1]} belong to "
                           f"{fits}, not to step {i} of the grid {time_name} {shown(grid)}; solve on that grid",
                           solver=method.name, step=i, t0=t0, t1=t1, grid=grid, fitted=times,
                           chained=own is not None, what=what)


def _perpendicular(z: Tensor, d: Tensor) -> Tensor:
    """Per sample (first axis), the part of ``z`` perpendicular to ``d``, rescaled to the length of ``d``: zero
    where ``d`` or that part vanishes. Computed in at least float32 with ``z`` divided by the power of 2 above its
    largest entry (only its direction counts; exact), returned in ``d``'s dtype: a float16 |d|² over a large
    state passes 65504."""
    dims = tuple(range(1, d.dim()))
    wide = torch.promote_types(torch.promote_types(z.dtype, d.dtype), torch.float32)
    z, d_w = z.to(wide), d.to(wide)
    top = z.abs().amax(dims, keepdim=True)
    z = z / torch.exp2(torch.frexp(torch.where(top > 0, top, 1.0)).exponent.to(wide))  # by a power of 2: exact
    dd = d_w.pow(2).sum(dims, keepdim=True)
    zd = (z * d_w).sum(dims, keepdim=True)
    u = z - torch.where(dd > 0, zd / torch.where(dd > 0, dd, 1.0), 0.0) * d_w
    uu = u.pow(2).sum(dims, keepdim=True)
    return (torch.where(uu > 0, dd.sqrt() / torch.where(uu > 0, uu, 1.0).sqrt(), 0.0) * u).to(d.dtype)


class _Solve:
    """What a :class:`Scaled` method keeps of one solve: its initial state ``y0`` and the first direction of each
    step taken so far, the latest first (at most the method's depth)."""

    def __init__(self, y0: Tensor) -> None:
        self.y0 = y0
        self.past: list[Tensor] = []

    def passed(self, d: Tensor, depth: int) -> None:
        self.past = [d, *self.past][:depth]


def _along_trajectory(d: Tensor, y_T: Tensor, past: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_j weights[j]·|d|·r_j per sample (first axis): r_j the part of the unit vector along ``past[j]``
    perpendicular to ``d``, ``y_T`` and ``past[:j]`` (Gram–Schmidt in that order, not renormalised); zero where a
    vector vanishes or lies in the span before it. In at least float32 (each vector divided by the power of 2 above
    its largest entry first: exact, and no overflow of a half-precision norm), returned in ``d``'s dtype."""
    dims = tuple(range(1, d.dim()))
    wide = torch.promote_types(torch.promote_types(y_T.dtype, d.dtype), torch.float32)

    def unit(v: Tensor) -> Tensor:
        v = v.to(wide)
        top = v.abs().amax(dims, keepdim=True)
        v = v / torch.exp2(torch.frexp(torch.where(top > 0, top, 1.0)).exponent.to(wide))
        n = v.pow(2).sum(dims, keepdim=True).sqrt()
        return torch.where(n > 0, v / torch.where(n > 0, n, 1.0), 0.0)

    def rest(v: Tensor, basis: list[Tensor]) -> Tensor:
        for q in basis:
            v = v - (v * q).sum(dims, keepdim=True) * q
        return v

    d_hat = unit(d)
    basis = [d_hat]
    basis.append(unit(rest(unit(y_T), basis)))
    total = torch.zeros_like(d_hat)
    for c, v in zip(weights, past):
        r = rest(unit(v), basis)
        if c != 0.0:
            total = total + c * r
        basis.append(unit(r))
    length = d.to(wide).pow(2).sum(dims, keepdim=True).sqrt()
    return (length * total).to(d.dtype)


class _Starts:
    """The initial state of each solve of a :class:`Scaled` method (a :class:`_Solve`, with the directions its steps
    have taken), keyed by the solve's vector field (weakly: an entry goes with its solve), safe to share between
    threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._weak: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._strong: dict[int, tuple[Any, _Solve]] = {}  # a field that cannot be weakly referenced: the last one

    @staticmethod
    def _field(f: Any) -> Any:
        while hasattr(f, "__wrapped__"):
            f = f.__wrapped__
        return f

    def record(self, f: Any, y0: Tensor) -> None:
        f = self._field(f)
        with self._lock:
            try:
                self._weak[f] = _Solve(y0)
            except TypeError:
                self._strong = {id(f): (f, _Solve(y0))}

    def of(self, f: Any) -> _Solve | None:
        f = self._field(f)
        with self._lock:
            try:
                return self._weak.get(f)
            except TypeError:
                held = self._strong.get(id(f))
                return held[1] if held is not None and held[0] is f else None


def _step_tuples(argument: str, what: str, values: dict) -> dict[tuple[float, float], tuple[float, ...]]:
    """``values`` keyed by steps (t0, t1) as floats, each a tuple (or list) of finite numbers."""
    table: dict[tuple[float, float], tuple[float, ...]] = {}
    for key, value in values.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"{argument} must be keyed by steps (t0, t1), got the key {key!r}")
        if not isinstance(value, (tuple, list)) or not all(
                not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) for x in value):
            raise ValueError(f"the {what} of the step {key!r} must be a tuple of finite numbers (the weights of the "
                             f"previous steps' directions, the latest first), got {value!r}")
        table[(float(key[0]), float(key[1]))] = tuple(float(x) for x in value)
    return table


def _step_table(argument: str, what: str, values: dict) -> dict[tuple[float, float], float]:
    """``values`` keyed by steps (t0, t1) as floats, each a finite number."""
    table: dict[tuple[float, float], float] = {}
    for key, value in values.items():
        if not (isinstance(key, tuple) and len(key) == 2):
            raise TypeError(f"{argument} must be keyed by steps (t0, t1), got the key {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"the {what} of the step {key!r} must be a finite number, got {value!r}")
        table[(float(key[0]), float(key[1]))] = float(value)
    return table
