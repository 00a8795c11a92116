"""The one integration loop: a solver, a stepping controller, and ``integrate``.

In the spirit of diffrax (a solver, a step-size controller, one ``diffeqsolve``): the
*solver* takes one step (:class:`solvers.Solver`), the *stepping* decides where the steps go
and whether a step is accepted, and :func:`integrate` is the only loop. It alone counts
evaluations of ``f``, builds the :class:`Stats` (wall time included), enforces ``max_nfe``,
calls the callback, and locates failures and non-finite values by step and time.

Steppings:

* :class:`FixedGrid` — steps to given times, in either direction; a step may be given its
  own method (``methods={i: solver}``, e.g. an Euler step into an end point where the model
  must not be evaluated). With ``inverse=True`` the loop walks a solved grid backwards by
  the solver's exact inverse steps (:meth:`Solver.unstep`): a reversible decode.
* :class:`ErrorControl` — a PI controller on an embedded error estimate, from ``t0`` to ``t1``,
  with steps measured in ``t`` or in ``log|t|``.
* :class:`Chain` — one stepping after another in the same loop (e.g. error control down to
  a small time, then a fixed last step), so that one solve has one set of statistics.

The vector field is strictly ``f(t, y)``.
"""

from __future__ import annotations

import abc
import math
import numbers
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._base import Derivative, Solver, StepResult, VectorField, check_fitted
from ._checks import check_derivative, check_flags, check_state
from ._errors import SolveError, StepFailure
from ._registry import available, get
from ._stats import Stats

#: ``norm(error, y0, y1, t1) -> scaled error`` (a 0-dim tensor or float); a step is accepted when <= 1.
ErrorNorm = Callable[[Tensor, Tensor, Tensor, float], Any]


class StepInfo(NamedTuple):
    """What a callback receives after each accepted step: its index, the times, the new state
    and the solver's carried state after the step (e.g. ``f(t1, y)`` of an FSAL pair)."""

    step: int
    t0: float
    t1: float
    y: Tensor
    state: Any = None


@dataclass(frozen=True)
class Bound:
    """A divergence guard: the solve fails when ``max|y|·scale(t)`` at the end exceeds ``limit``.

    The end state is checked once (the same host sync as the non-finite check); only when it
    is out of range is the solve run again to locate the first step that left the range.
    ``scale(t)`` maps the state to the quantity bounded (default 1); ``name`` is how the
    error message calls that quantity. Nothing here knows what a plausible range is: the
    caller chooses ``limit`` (flowdiff bounds the VP-scaled image, see ``flowdiff.encode``).
    """

    limit: float
    scale: Callable[[float], float] | None = None
    name: str = "max|y|"

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, (int, float)) or not self.limit > 0:
            raise ValueError(f"Bound.limit must be a positive number, got {self.limit!r}")

    def value(self, t: float, y: Tensor) -> Tensor:
        """The bounded quantity at ``(t, y)`` as a 0-dim tensor (NaN if ``y`` holds NaN)."""
        m = y.detach().abs().amax()
        return m if self.scale is None else m * self.scale(t)


@dataclass
class Solution:
    """The end state ``y``, the statistics, the solver's carried state and the times reached."""

    y: Tensor
    stats: Stats
    state: Any
    ts: list[float]


class _Counted:
    """``f`` with its evaluations counted (the NFE of the statistics) and bounded by ``limit``.

    Every value is checked to be a tensor of the state's shape and dtype (a tuple, a complex or
    an other-precision result is refused on whichever call returns it, not only on the first):
    three comparisons, no host sync. An evaluation past ``limit`` is not made: :class:`_OverBudget`
    is raised instead, so that ``max_nfe`` is a hard bound even for steps whose cost the loop
    cannot know beforehand.

    The loop hands the solvers the bound method :meth:`evaluate`, not the object: calling an instance
    through ``__call__`` costs about three times a bound method's call, once per evaluation."""

    __slots__ = ("f", "limit", "nfe", "time_name")

    def __init__(self, f: VectorField, time_name: str = "t", limit: int | None = None) -> None:
        self.f = f
        self.nfe = 0
        self.time_name = time_name
        self.limit = sys.maxsize if limit is None else limit

    def evaluate(self, t: float, y: Tensor) -> Tensor:
        if self.nfe >= self.limit:
            raise _OverBudget(t)
        self.nfe += 1
        k = self.f(t, y)
        if not isinstance(k, Tensor) or k.dtype is not y.dtype or k.shape != y.shape:
            check_derivative(k, y, t, self.time_name)
        return k


class _OverBudget(Exception):
    """Raised instead of an evaluation of ``f`` that would exceed ``max_nfe``; ``what`` names work done
    outside a step (the first step's size estimate), else the step about to be taken is meant."""

    def __init__(self, t: float, what: str | None = None) -> None:
        super().__init__(t)
        self.t = t
        self.what = what


class _Stop(Exception):
    """Raised by a stepping to end the solve with a located :class:`SolveError`."""


def _real(value: object) -> bool:
    """A real number: an int, float or NumPy real scalar, or a 0-dim real tensor that does not require grad (not a
    bool, a string or a complex number)."""
    if isinstance(value, Tensor):
        return (value.dim() == 0 and not value.requires_grad and not value.is_complex()
                and value.dtype is not torch.bool)
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def check_grid(ts: Sequence[float], *, name: str = "ts", infinite_ends: bool = False) -> list[float]:
    """Validate a time grid: at least two strictly monotone times, finite (or ±inf at the ends
    with ``infinite_ends``); returned as Python floats.

    ``ts`` is a list or tuple of real numbers, or a 1-D real tensor or array (integers are times too). The times are
    taken as Python floats: a tensor that requires grad is refused (no gradient with respect to the times is
    computed), as are unordered or text values (a set, a string) and booleans."""
    if isinstance(ts, (Tensor, np.ndarray)):
        shape = tuple(ts.shape)
        if len(shape) != 1:
            raise ValueError(f"{name} must be a 1-D sequence of times, got a {type(ts).__name__} of shape {shape}")
        complex_or_bool = ts.is_complex() or ts.dtype is torch.bool if isinstance(ts, Tensor) else \
            ts.dtype.kind not in "iuf"
        if complex_or_bool:
            raise TypeError(f"{name} must hold real times, got dtype {ts.dtype}")
        if isinstance(ts, Tensor) and ts.requires_grad:
            raise ValueError(f"{name} requires grad, but the times are taken as Python floats and no gradient with "
                             f"respect to them is computed; pass {name}.detach()")
        values = ts.tolist()
    elif isinstance(ts, (list, tuple, range)):
        i = next((i for i, t in enumerate(ts) if not _real(t)), None)
        if i is not None:
            bad = ts[i]
            hint = (" (a tensor that requires grad: no gradient with respect to the times is computed)"
                    if isinstance(bad, Tensor) and bad.requires_grad else "")
            raise TypeError(f"{name} must hold real numbers, got {bad!r} ({type(bad).__name__}) at index {i}{hint}")
        values = list(ts)
    else:
        raise TypeError(f"{name} must be a list or tuple of times, or a 1-D tensor or array, got "
                        f"{type(ts).__name__}")
    grid = [float(t) for t in values]
    if len(grid) < 2:
        raise ValueError(f"{name} must hold at least 2 times (one step), got {len(grid)}")
    inner = grid[1:-1] if infinite_ends else grid
    if not all(math.isfinite(t) for t in inner) or any(math.isnan(t) for t in grid):
        raise ValueError(f"{name} must be finite, got {grid}")
    diffs = [b - a for a, b in zip(grid, grid[1:])]
    if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        bad = next(i for i, d in enumerate(diffs) if (d <= 0) != (diffs[0] <= 0) or d == 0)
        raise ValueError(f"{name} must be strictly monotone; it breaks between index {bad} and {bad + 1} "
                         f"({grid[bad]!r} -> {grid[bad + 1]!r})")
    return grid


# -- steppings -------------------------------------------------------------------------------

class Stepping(abc.ABC):
    """Where the steps go: a frozen description; :meth:`begin` makes the mutable run of one solve."""

    @abc.abstractmethod
    def begin(self, solver: Solver, f: VectorField, y: Tensor, state: Any) -> _Run:
        raise NotImplementedError  # abstract

    def interval(self) -> tuple[float, float] | None:
        """The first and last time of the solve (for :meth:`Solver.on_interval`), or None if unknown beforehand."""
        return None


class _Run(abc.ABC):
    """The controller of one solve: proposes the next step and judges its result.

    ``always_accepts``: every proposed step is taken (a fixed grid), so :meth:`propose` moves
    ``t`` itself and :meth:`judge` is not asked. ``plan``: every step ``(t0, t1, method)`` in the order taken,
    where known before the first (a fixed grid), else None; the loop checks it against the methods' fitted steps.
    """

    t: float
    inverse: bool = False
    always_accepts: bool = False
    plan: list[tuple[float, float, Solver]] | None = None

    @abc.abstractmethod
    def done(self) -> bool:
        raise NotImplementedError  # abstract

    @abc.abstractmethod
    def propose(self, y: Tensor, state: Any) -> tuple[float, float, Solver | None, Any] | None:
        """``(t0, t1, method, state)`` of the next step (the state may gain a derivative), or None when done."""
        raise NotImplementedError  # abstract

    def judge(self, result: StepResult, y0: Tensor, t1: float) -> bool:
        """Accept the step (and move ``self.t`` to ``t1``) or reject it; fixed steps are always accepted."""
        self.t = t1
        return True


@dataclass(frozen=True)
class FixedGrid(Stepping):
    """Step across ``ts`` one interval at a time (increasing or decreasing).

    ``methods`` gives some steps (by index) their own method instead of the solver's.
    ``inverse=True`` undoes a solve of ``ts``: the loop starts at ``ts[-1]`` and runs the
    solver's exact inverse steps back to ``ts[0]`` (``Solution.ts`` is then ``ts`` reversed).
    ``infinite_ends`` allows ``±inf`` as the first or last time (a change of variables in
    which an end point of the interval lies at infinity; its step must have its own method).
    """

    ts: Sequence[float]
    methods: Mapping[int, Solver] = field(default_factory=dict)
    inverse: bool = False
    infinite_ends: bool = False

    def times(self) -> list[float]:
        return check_grid(self.ts, infinite_ends=self.infinite_ends)

    def interval(self) -> tuple[float, float] | None:
        """The span the solver itself steps across: steps given their own method (``methods``, e.g. a boundary
        step out of an infinite end) at either end of the grid are not the solver's."""
        try:  # the ends only: begin() validates the whole grid (and says what is wrong with it)
            own = [i for i in range(len(self.ts) - 1) if i not in self.methods]
            if not own:
                return None
            return float(self.ts[own[0]]), float(self.ts[own[-1] + 1])
        except (TypeError, ValueError, IndexError):
            return None

    def begin(self, solver: Solver, f: VectorField, y: Tensor, state: Any) -> _Run:
        grid = self.times()
        return _GridRun(grid, _check_methods(self.methods, len(grid) - 1), solver, self.inverse)


def _check_methods(methods: object, steps: int) -> dict[int, Solver]:
    """``FixedGrid.methods``: a mapping of step indices in ``0 .. steps - 1`` to solvers (a step outside the grid
    would be silently ignored)."""
    if not isinstance(methods, Mapping):
        raise TypeError(f"FixedGrid.methods must be a dict of step index -> solvers.Solver, got "
                        f"{type(methods).__name__}")
    for i, method in methods.items():
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < steps:
            raise ValueError(f"FixedGrid.methods: {i!r} is not a step of this grid (its {steps} steps are "
                             f"0..{steps - 1})")
        if not isinstance(method, Solver):
            raise TypeError(f"FixedGrid.methods[{i}] must be a solvers.Solver (solvers.get(name) builds one), got "
                            f"{type(method).__name__}")
    return dict(methods)


class _GridRun(_Run):
    def __init__(self, grid: list[float], methods: dict[int, Solver], solver: Solver, inverse: bool) -> None:
        n = len(grid) - 1
        visit = grid[::-1] if inverse else grid
        # (t0, t1, method) of each step, in the order taken; a step's own method is keyed by its index in ``grid``
        self.plan = [(visit[i], visit[i + 1], methods.get(n - 1 - i if inverse else i, solver)) for i in range(n)]
        self.inverse = inverse
        self.always_accepts = True
        self.next = 0
        self.t = visit[0]

    def done(self) -> bool:
        return self.next == len(self.plan)

    def propose(self, y: Tensor, state: Any) -> tuple[float, float, Solver, Any] | None:
        i = self.next
        if i == len(self.plan):
            return None
        self.next = i + 1
        t0, t1, method = self.plan[i]
        self.t = t1
        return t0, t1, method, state


@dataclass(frozen=True)
class StepController:
    """A PI step-size controller (an I-controller when ``pcoeff == 0``).

    The new step is ``h * safety * r**(-icoeff/k) * r_prev**(pcoeff/k)`` with ``k`` the
    error estimate's order + 1 and ``r`` the scaled error, clipped to ``[factor_min, factor_max]``
    and to ``[min_step, max_step]`` in magnitude.

    ``startup_order`` takes ``k`` from the order of the estimate each step actually had, where the
    solver says it (``error_order_at``: a multistep method's first steps have fewer derivatives behind
    them — Milne's estimate of a predictor through n of them is O(hⁿ⁺¹), n = 1, 2, … up to its order),
    instead of the method's full order. A rejected first step is then retried at the step its estimate's
    own growth calls for (the ratio r shrinks like h², not h⁴, for ``unipc(order=3)``), instead of being
    shrunk too little and rejected again. Off by default (see ``benchmarks/RESULTS.md``, issue 26 item 3,
    engineer K3: fewer rejections and evaluations on the closed-form models, while the trained digits
    model's met cells are redrawn).
    """

    safety: float = 0.9
    icoeff: float = 1.0
    pcoeff: float = 0.0
    factor_min: float = 0.2
    factor_max: float = 10.0
    min_step: float = 0.0
    max_step: float = math.inf
    startup_order: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.startup_order, bool):
            raise TypeError(f"startup_order must be True or False, got {self.startup_order!r}")
        for name in ("safety", "icoeff", "pcoeff", "factor_min", "factor_max", "min_step", "max_step"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise TypeError(f"StepController.{name} must be a real number, got {type(value).__name__} {value!r}")
        if not (math.isfinite(self.icoeff) and self.icoeff > 0 and math.isfinite(self.pcoeff)):
            raise ValueError(f"need a finite icoeff > 0 and a finite pcoeff, got icoeff={self.icoeff!r}, "
                             f"pcoeff={self.pcoeff!r}")
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


#: Dtypes whose squares overflow or lose the tolerance's resolution: error norms are taken in float32 for them.
_NARROW = (torch.float16, torch.bfloat16)


def rms_norm(rtol: float, atol: float) -> ErrorNorm:
    """Hairer's mixed norm: RMS of ``error / (atol + rtol * max(|y0|, |y1|))``, in float32 or wider.

    A half-precision state is measured in float32: ``(error/scale)²`` of a step that should just be
    rejected overflows float16 (above 65504) and would read as a non-finite model output. With
    ``atol == 0`` (a pure relative tolerance) an entry where the state and the error are both 0
    counts as no error (0/0 is taken as 0); a non-zero error where the state is 0 is infinitely
    too large, and the step is rejected.
    """

    def norm(error: Tensor, y0: Tensor, y1: Tensor, t1: float) -> Tensor:
        if error.dtype in _NARROW:
            error, y0, y1 = error.float(), y0.float(), y1.float()
        scale = torch.maximum(y0.abs(), y1.abs()).mul_(rtol)
        if atol == 0:
            ratio = torch.where(error == 0, 0.0, error / scale)
        else:
            ratio = error / scale.add_(atol)
        return ratio.pow(2).mean().sqrt()

    return norm


def _check_tol(name: str, value: object) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{name} must be a Python number, got a tensor {value!r}: the tolerance is a float on the host "
                        f"(float({name}) for a 0-dim one); per-component tolerances are a norm of your own "
                        "(norm=, see solvers.rms_norm)")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number >= 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_time(name: str, value: object) -> float:
    """A time given as one number (an int, float, NumPy scalar or 0-dim tensor that does not require grad)."""
    if isinstance(value, Tensor) and value.requires_grad:
        raise ValueError(f"{name} requires grad, but the times are taken as Python floats and no gradient with "
                         f"respect to them is computed; pass {name}.detach()")
    if not _real(value):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


@dataclass(frozen=True)
class ErrorControl(Stepping):
    """Error-controlled steps from ``t0`` to ``t1`` (either direction), for a solver with an
    embedded error estimate (``solver.adaptive``).

    A step is accepted when ``norm(error, y0, y1, t1) <= 1`` (default :func:`rms_norm`).
    ``log_steps`` measures step sizes in ``log|t|`` (t₀ and t₁ non-zero, of one sign): a step
    is ``t → t·e^{±h}`` and ``min_step``/``max_step``/``first_step`` are in that unit. Without
    ``first_step`` the first step is Hairer, Nørsett & Wanner's estimate (one extra evaluation).

    ``stop(t, y, state)``, when given, is asked after each accepted step short of ``t1``; when it
    returns True the controlled steps end there, at ``t`` (in a :class:`Chain` the next part then
    starts at ``t``: give it as a function of that time). A caller that can finish the rest of the
    interval more cheaply than by stepping (a limit known to its tolerance) says so here.

    ``step_weight(t0, t1)``, when given, multiplies the norm of the step from ``t0`` to ``t1``: the
    share of the estimated error that reaches the accepted solution, where the caller knows it is
    below 1 (a predictor–corrector's estimate measures the predictor; the corrector passes on only part
    of it). It must return a finite number > 0.
    """

    t0: float
    t1: float
    rtol: float = 1e-3
    atol: float = 1e-6
    norm: ErrorNorm | None = None
    controller: StepController | None = None
    first_step: float | None = None
    log_steps: bool = False
    stop: Callable[[float, Tensor, Any], bool] | None = None
    step_weight: Callable[[float, float], float] | None = None

    def __post_init__(self) -> None:
        rtol, atol = _check_tol("rtol", self.rtol), _check_tol("atol", self.atol)
        if rtol == 0 and atol == 0:
            raise ValueError("rtol=0 and atol=0: at least one tolerance must be > 0 (atol=0 is a pure relative "
                             "tolerance, rtol=0 a pure absolute one)")
        t0, t1 = _check_time("t0", self.t0), _check_time("t1", self.t1)
        if not (math.isfinite(t0) and math.isfinite(t1)) or t0 == t1:
            raise ValueError(f"need finite t0 != t1, got t0={t0!r}, t1={t1!r}")
        if self.log_steps and (t0 == 0 or t1 == 0 or (t0 > 0) != (t1 > 0)):
            raise ValueError(f"log_steps=True needs non-zero t0 and t1 of one sign, got t0={t0!r}, t1={t1!r}")
        if self.first_step is not None and not (
                isinstance(self.first_step, (int, float)) and not isinstance(self.first_step, bool)
                and 0 < self.first_step < math.inf):
            raise ValueError(f"first_step must be a finite number > 0, got {self.first_step!r}")
        if self.norm is not None and not callable(self.norm):
            raise TypeError(f"norm must be callable as norm(error, y0, y1, t1) -> scaled error, or None (the default "
                            f"solvers.rms_norm(rtol, atol)); got {type(self.norm).__name__}")
        if self.controller is not None and not isinstance(self.controller, StepController):
            raise TypeError(f"controller must be a solvers.StepController, got {type(self.controller).__name__}")
        if self.stop is not None and not callable(self.stop):
            raise TypeError(f"stop must be callable as stop(t, y, state) -> bool, or None; got "
                            f"{type(self.stop).__name__}")
        if self.step_weight is not None and not callable(self.step_weight):
            raise TypeError(f"step_weight must be callable as step_weight(t0, t1) -> float, or None; got "
                            f"{type(self.step_weight).__name__}")

    def interval(self) -> tuple[float, float]:
        return float(self.t0), float(self.t1)

    def begin(self, solver: Solver, f: VectorField, y: Tensor, state: Any) -> _Run:
        if not solver.adaptive:
            raise ValueError(f"solver {solver.name!r} has no error estimate; adaptive solvers: "
                             "see solvers.available(adaptive=True)")
        return _ErrorRun(self, solver, f)


class _ErrorRun(_Run):
    def __init__(self, spec: ErrorControl, solver: Solver, f: VectorField) -> None:
        self.spec = spec
        self.f = f
        self.norm = spec.norm if spec.norm is not None else rms_norm(spec.rtol, spec.atol)
        self.controller = spec.controller if spec.controller is not None else StepController()
        self.k = min(solver.order, getattr(solver, "error_order", solver.order - 1)) + 1
        # the order of each step's own estimate, where the controller asks for it and the solver knows it
        self.order_at = getattr(solver, "error_order_at", None) if self.controller.startup_order else None
        self.k_step = self.k
        t0, t1 = float(spec.t0), float(spec.t1)
        self.t, self.t_end = t0, t1
        self.direction = 1.0 if t1 > t0 else -1.0
        self.span = abs(t1 - t0)
        self.log = spec.log_steps
        self.log_dir = (1.0 if abs(t1) > abs(t0) else -1.0) if self.log else self.direction
        self.h: float | None = None
        self.prev_ratio = 1.0
        self.h_used = 0.0
        self.ratio = 0.0

    def done(self) -> bool:
        return self.direction * (self.t_end - self.t) <= 0

    def _first(self, y: Tensor, state: Any) -> Any:
        """The first step size; ``f(t0, y0)`` is evaluated here, once, and handed on as the state (a
        first step that is rejected is retried from it, never evaluated again at the same point)."""
        spec, c = self.spec, self.controller
        known = isinstance(state, Derivative) and state.t == self.t
        if not known and (spec.first_step is None or state is None or type(state) is Derivative):
            state = Derivative(self.t, self.f(self.t, y))  # (with first_step, a history is left to its solver)
        if spec.first_step is None:
            k0 = state.k
            h = _initial_step(self.f, self.t, y, k0, self.direction, self.k - 1, self.norm, self.span)
            if self.log:
                h = min(h / abs(self.t), abs(math.log(abs(self.t_end / self.t))))
        else:
            h = float(spec.first_step)
        self.h = min(max(h, c.min_step), c.max_step)
        return state

    def propose(self, y: Tensor, state: Any) -> tuple[float, float, Solver | None, Any] | None:
        if self.done():
            return None
        if self.h is None:
            try:
                state = self._first(y, state)
            except _OverBudget as err:
                err.what = "the first step's size estimate"
                raise
        t, h = self.t, self.h
        if self.order_at is not None:
            self.k_step = min(self.order_at(t, state), self.k - 1) + 1
        t_next = t * math.exp(self.log_dir * h) if self.log else t + self.direction * h
        if self.direction * (t_next - self.t_end) >= 0 or abs(self.t_end - t_next) < 1e-12 * self.span:
            t_next = self.t_end
        return t, t_next, None, state  # None: the solver itself

    def judge(self, result: StepResult, y0: Tensor, t1: float) -> bool:
        ratio = _host(self.norm(result.error, y0, result.y, t1))
        if not math.isfinite(ratio) and (math.isnan(ratio) or not bool(torch.isfinite(result.error).all())):
            raise _Stop("the error estimate is not finite; the vector field (the model) returned NaN or inf")
        # (an infinite ratio of a finite error: a zero scale, atol=0 where the state is 0; the step is rejected)
        t = self.t
        if self.spec.step_weight is not None:
            weight = self.spec.step_weight(t, t1)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not (
                    math.isfinite(weight) and weight > 0):
                raise ValueError(f"step_weight({t!r}, {t1!r}) must be a finite number > 0, got {weight!r}")
            ratio *= weight
        self.h_used = abs(math.log(t1 / t)) if self.log else abs(t1 - t)
        factor = self.controller.factor(ratio, self.prev_ratio, self.k_step)
        accepted = ratio <= 1.0 or self.h_used <= self.controller.min_step
        if accepted:
            self.t = t1
            self.prev_ratio = max(ratio, 1e-10)
            if self.spec.stop is not None and t1 != self.t_end and self.spec.stop(t1, result.y, result.state):
                self.t_end = t1  # the caller finishes from here (done() is now true)
        else:
            factor = min(factor, 1.0)
        self.h = min(max(self.h_used * factor, self.controller.min_step), self.controller.max_step)
        return accepted


def _host(value: Any) -> float:
    """A norm's value as a Python float, off the autograd graph: step sizes are not differentiated, and ``float`` of
    a tensor that requires grad warns (a solve from a ``y0`` that requires grad warned once per process)."""
    if not isinstance(value, Tensor):
        return float(value)
    try:
        return float(value.detach())
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        raise ValueError("an error-controlled solve reads each step's error on the host, which torch.func.vmap "
                         "cannot: solve the batch along its first dimension instead (one step size for all), or "
                         "vmap a fixed-grid solve (solvers.solve) with check_finite=False") from None


def _on_host(flag: Tensor, what: str) -> bool:
    """``bool(flag)``, the end-of-solve check; under ``torch.func.vmap`` (which cannot read a mapped value on the
    host) a ValueError that says which option to turn off, instead of torch's "data-dependent control flow"."""
    try:
        return bool(flag)
    except RuntimeError as err:
        if "vmap" not in str(err):
            raise
        also = " and no bound" if what == "bound" else ""
        raise ValueError(f"under torch.func.vmap the end state cannot be checked on the host ({what}): pass "
                         f"check_finite=False{also} to solve under vmap") from None


def _initial_step(f: VectorField, t0: float, y0: Tensor, k0: Tensor, direction: float, order: int,
                  norm: ErrorNorm, span: float) -> float:
    """Hairer, Nørsett & Wanner's starting step (one extra evaluation).

    The norms are scaled by ``y0`` (``atol + rtol·|y0|``), as in HNW: with ``atol = 0`` a scale of
    zeros would make every ratio 0/0. Where a ratio is still not finite (a derivative where the
    state is 0, with ``atol = 0``) the estimate falls back to HNW's small default step, 1e-6.
    """
    d0 = _host(norm(y0, y0, y0, t0))
    d1 = _host(norm(k0, y0, y0, t0))
    small = not (math.isfinite(d0) and math.isfinite(d1)) or d0 < 1e-5 or d1 < 1e-5
    h0 = min(1e-6 if small else 0.01 * d0 / d1, span)
    k1 = f(t0 + direction * h0, y0 + direction * h0 * k0)
    d2 = _host(norm(k1 - k0, y0, y0, t0)) / h0
    if not math.isfinite(d2) or not math.isfinite(d1):
        h1 = max(1e-6, h0 * 1e-3)
    elif max(d1, d2) <= 1e-15:
        h1 = max(1e-6, h0 * 1e-3)
    else:
        h1 = (0.01 / max(d1, d2)) ** (1.0 / (order + 1))
    return min(100 * h0, h1, span)


#: A :class:`Chain` part: a stepping, or a function of the time the previous part ended at that builds one.
ChainPart = Stepping | Callable[[float], Stepping]


@dataclass(frozen=True)
class Chain(Stepping):
    """Several steppings in one solve, each starting where the previous one ended.

    A part after the first may be a function ``part(t) -> Stepping`` of the time ``t`` where the
    previous part ended, built when it is reached: the next part after one that can end early
    (:class:`ErrorControl` with ``stop``)."""

    parts: Sequence[ChainPart]

    def interval(self) -> tuple[float, float] | None:
        if any(not isinstance(part, Stepping) for part in self.parts):
            return None  # a part's span is known only when it is reached
        ends = [part.interval() for part in self.parts]
        return None if not ends or None in ends else (ends[0][0], ends[-1][1])

    def begin(self, solver: Solver, f: VectorField, y: Tensor, state: Any) -> _Run:
        if not self.parts:
            raise ValueError("Chain needs at least one stepping")
        for i, part in enumerate(self.parts):
            if not isinstance(part, Stepping) and (i == 0 or not callable(part)):
                alt = "" if i == 0 else " or a function of the time the previous part ended at"
                raise TypeError(f"Chain part {i} must be a solvers.Stepping{alt}, got {type(part).__name__}")
        return _ChainRun(list(self.parts), solver, f, y, state)


class _ChainRun(_Run):
    def __init__(self, parts: list[ChainPart], solver: Solver, f: VectorField, y: Tensor, state: Any) -> None:
        self.parts, self.solver, self.f = parts, solver, f
        self.index = 0
        self.run = parts[0].begin(solver, f, y, state)  # type: ignore[union-attr]  (checked by Chain.begin)
        self.t = self.run.t

    def _advance(self, y: Tensor, state: Any) -> None:
        while self.run.done() and self.index + 1 < len(self.parts):
            self.index += 1
            part = self.parts[self.index]
            if not isinstance(part, Stepping):
                part = part(self.t)
                if not isinstance(part, Stepping):
                    raise TypeError(f"Chain part {self.index} (a function) must return a solvers.Stepping, got "
                                    f"{type(part).__name__}")
            self.run = part.begin(self.solver, self.f, y, state)
            if self.run.t != self.t:
                raise ValueError(f"Chain: part {self.index} starts at t={self.run.t!r}, the previous one ended "
                                 f"at t={self.t!r}")

    def done(self) -> bool:
        return self.run.done() and self.index + 1 >= len(self.parts)

    def propose(self, y: Tensor, state: Any) -> tuple[float, float, Solver | None, Any] | None:
        self._advance(y, state)
        step = self.run.propose(y, state)
        self.t = self.run.t
        return step

    def judge(self, result: StepResult, y0: Tensor, t1: float) -> bool:
        accepted = True if self.run.always_accepts else self.run.judge(result, y0, t1)
        self.t = self.run.t
        return accepted


# -- the loop --------------------------------------------------------------------------------

def check_hooks(*, callback: object = None, display: object = None, time_name: object = "t") -> None:
    """The loop's hooks, checked before the first step: ``callback`` and ``display`` callables (or None),
    ``time_name`` a string (a callback that cannot be called would fail after the first step has been taken)."""
    for name, value, form in (("callback", callback, "callback(info: solvers.StepInfo)"),
                              ("display", display, "display(t) -> float")):
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be callable as {form}, or None; got {type(value).__name__}")
    if not isinstance(time_name, str):
        raise TypeError(f"time_name must be a str (how errors name the time), got {type(time_name).__name__}")


def _where(i: int, t0: float, t1: float, time_name: str, display: Callable[[float], float] | None,
           inverse: bool) -> str:
    a, b = (display(t0), display(t1)) if display is not None else (t0, t1)
    return f"{'inverse step' if inverse else 'step'} {i} ({time_name} {a:.6g} -> {b:.6g})"


def integrate(
    f: VectorField,
    y0: Tensor,
    solver: str | Solver,
    stepping: Stepping,
    *,
    state: Any = None,
    max_nfe: int | None = None,
    callback: Callable[[StepInfo], None] | None = None,
    check_finite: bool = True,
    time_name: str = "t",
    display: Callable[[float], float] | None = None,
    bound: Bound | None = None,
) -> Solution:
    """Integrate ``dy/dt = f(t, y)`` from ``y0`` with ``solver``, the steps placed by ``stepping``.

    ``state`` seeds the solver's carried state (e.g. a reversible solver's second variable;
    for an inverse run, its state at the grid's end): ``None`` is a fresh start; otherwise the solver must have
    made it (:meth:`Solver.check_carried`: its ``state_type``, recorded maker, time, shape, dtype and direction), or
    it is refused before any evaluation (unless the first step has a method of its own that declares no
    ``state_type``, such as a step out of an infinite end: the state is that method's). ``max_nfe`` is a hard
    bound on the evaluations: a step whose cost (:meth:`Solver.step_cost`) would pass it is not taken, and an
    evaluation past it is never made; a :class:`SolveError` names that step and its time, with the
    partial statistics (a solve that needs exactly ``max_nfe`` evaluations finishes). Errors
    name the step and the time, shown as ``display(t)`` under ``time_name`` when given (a
    caller that changed variables reports its own time, e.g. σ).

    Non-finite values cost nothing inside the loop: NaN and inf propagate to the end state,
    which is checked once (one host sync). Only when it is not finite is the solve run again,
    without the callback, keeping one sum per step, to locate the first step that produced
    them; the error carries the statistics of the first run. (A vector field that is not
    deterministic may then not reproduce the failure: the error says so.)

    ``bound`` (a :class:`Bound`) is a divergence guard checked the same way: the end state
    out of the bound is located by a second run at the first step whose state left it.
    """
    solver = get(solver)
    check_state(y0, "y0")
    check_flags(check_finite=check_finite)
    if not isinstance(stepping, Stepping):
        raise TypeError(f"stepping must be a solvers.Stepping (FixedGrid(ts), ErrorControl(t0, t1, ...) or "
                        f"Chain([...])), got {type(stepping).__name__}")
    check_hooks(callback=callback, display=display, time_name=time_name)
    if max_nfe is not None and (isinstance(max_nfe, bool) or not isinstance(max_nfe, int) or max_nfe < 1):
        raise ValueError(f"max_nfe must be a positive int or None, got {max_nfe!r}")
    names = (time_name, display)
    start = time.perf_counter()
    y, end_state, times, stats = _loop(f, y0, solver, stepping, state, max_nfe, callback, None, names, None)
    if bound is not None and not isinstance(bound, Bound):
        raise TypeError(f"bound must be a solvers.Bound or None, got {type(bound).__name__}")
    if bound is None:
        ok = not check_finite or _on_host(torch.isfinite(y).all(), "check_finite")
    else:  # one sync for both checks: a NaN fails the comparison too
        ok = _on_host(bound.value(times[-1], y) <= bound.limit, "bound")
        if not ok and not check_finite and not bool(torch.isfinite(y).all()):
            ok = True  # non-finite values were asked not to be checked
    # On an asynchronous device the loop only queued the work; the check above waited for it, so the
    # wall time is taken again here (with neither check, nothing waits and it measures the dispatch).
    stats.wall_time = time.perf_counter() - start
    if not ok:
        _locate(f, y0, solver, stepping, state, names, times, stats, check_finite, bound)
    return Solution(y, stats, end_state, times)


def _locate(f: VectorField, y0: Tensor, solver: Solver, stepping: Stepping, state: Any,
            names: tuple[str, Callable[[float], float] | None], times: list[float], stats: Stats,
            check_finite: bool, bound: Bound | None) -> None:
    """Run the solve again keeping one value per step and raise at the first bad step."""
    time_name, display = names
    flags: list[Tensor] = []
    try:
        _loop(f, y0, solver, stepping, state, None, None, flags, names, bound)
    except Exception:  # noqa: BLE001  (the locating pass only looks for the first bad step)
        pass
    values = torch.stack(flags) if flags else torch.zeros(0)
    finite = torch.isfinite(values)
    bad = ~finite if check_finite else torch.zeros_like(finite)
    if bound is not None:
        bad = bad | (finite & (values > bound.limit))
    inverse = isinstance(stepping, FixedGrid) and stepping.inverse
    if not bool(bad.any()):
        raise SolveError(f"the solve ended with {'values out of the bound' if check_finite else 'bad values'} at "
                         f"{time_name} {_shown(times[-1], display):.6g}, and a second run did not reproduce them "
                         "(is the vector field deterministic?)", step=len(times) - 2, t0=times[-2], t1=times[-1],
                         stats=stats)
    i = int(bad.nonzero()[0, 0])
    where = _where(i, times[i], times[i + 1], time_name, display, inverse)
    value = float(values[i])
    if not math.isfinite(value):
        raise SolveError(f"{where} produced non-finite values: the vector field (the model) returned NaN or "
                         "inf, or the state overflowed", step=i, t0=times[i], t1=times[i + 1], stats=stats)
    err = SolveError(f"{where} diverged: {bound.name} = {value:.6g} exceeds the bound {bound.limit:.6g} (the "
                     "solver is unstable on this grid: use another solver or grid, or raise the bound)",
                     step=i, t0=times[i], t1=times[i + 1], stats=stats)
    err.value = value
    raise err


def _loop(f: VectorField, y0: Tensor, solver: Solver, stepping: Stepping, state: Any, max_nfe: int | None,
          callback: Callable[[StepInfo], None] | None, flags: list[Tensor] | None,
          names: tuple[str, Callable[[float], float] | None], bound: Bound | None
          ) -> tuple[Tensor, Any, list[float], Stats]:
    """The loop itself: ``flags`` (when a list) collects one value per accepted step: the
    bounded quantity of ``bound`` (:meth:`Bound.value`), else max|y| (NaN or inf if non-finite)."""
    time_name, display = names
    counted = _Counted(f, time_name, max_nfe)
    field = counted.evaluate
    stats = Stats()
    start = time.perf_counter()
    interval = stepping.interval()
    if interval is not None:
        solver = solver.on_interval(*interval)
    run = stepping.begin(solver, field, y0, state)
    inverse = run.inverse
    if inverse and not solver.reversible:
        raise TypeError(f"an inverse run needs a reversible solver (solvers.available(reversible=True): "
                        f"{', '.join(available(reversible=True))}); got {solver.name!r}")
    if inverse and state is None:
        raise ValueError("an inverse run needs the solver's carried state at the grid's end (Solution.state of "
                         "the forward solve); without it the inverse is not defined")
    if state is not None:  # refused before any evaluation unless the solver made it
        first = run.plan[0] if run.plan else None
        toward = first[1] if first is not None else None if interval is None else interval[1]
        if first is None or first[2].state_type is not None:  # (else a first step of its own, e.g. out of t = ±inf)
            solver.check_carried(state, run.t, y0, toward)
    if run.plan is not None and not inverse:  # a method fitted to other steps is refused before the first
        check_fitted(run.plan, time_name, display)
    y = y0
    times = [run.t]
    t0 = t1 = run.t
    propose, judge, always = run.propose, run.judge, run.always_accepts

    def finish() -> None:
        stats.nfe = counted.nfe
        stats.wall_time = time.perf_counter() - start

    steps = accepted = rejected = 0
    phase = "init"  # where a failure happened: the solver's init, choosing a step, the step, or the callback
    try:
        if state is None and not inverse:
            state = solver.init(field, run.t, y0)
        while True:
            phase = "propose"
            step = propose(y, state)
            if step is None:
                break
            phase = "step"
            t0, t1, method, state = step
            if method is None:
                method = solver
            if max_nfe is not None:  # a step that would pass the bound is not taken
                cost = None if inverse else method.step_cost(t0, state)
                if cost is not None and counted.nfe + cost > max_nfe:
                    raise _OverBudget(t0)
            if inverse:  # undo the forward step t1 -> t0 (t1 is the earlier time of the solved grid)
                y_new, state_new = method.unstep(field, t1, t0, y, state)
                result = StepResult(y_new, state_new)
            else:
                result = method.step(field, t0, t1, y, state)
            if type(result) is not StepResult or result.y.shape != y.shape:
                _check_result(result, y, method)
            steps += 1
            if always or judge(result, y, t1):
                accepted += 1
                y, state = result.y, result.state
                times.append(t1)
                if flags is not None:
                    flags.append(y.detach().abs().amax() if bound is None else bound.value(t1, y))
                if callback is not None:
                    phase = "callback"
                    callback(StepInfo(accepted - 1, t0, t1, y, state))
            else:
                rejected += 1
                if getattr(result.state, "t", None) == t0:  # f(t0, y0) from the rejected try: reuse it
                    state = result.state
    except BaseException as err:  # the counts so far belong to the error's statistics
        stats.steps, stats.accepted, stats.rejected = steps, accepted, rejected
        if isinstance(err, _OverBudget):
            finish()
            raise _budget_error(max_nfe, err, t0, t1, stats, names, inverse, always) from None
        _reraise(err, stats, t0, t1, names, inverse, finish, phase, run.t)
    stats.steps, stats.accepted, stats.rejected = steps, accepted, rejected
    finish()
    return y, state, times, stats


def _check_result(result: object, y: Tensor, method: Solver) -> None:
    """A step's result is a :class:`StepResult` whose state has the shape of the step's start (a solver of one's own
    that returned the new state alone, or another shape, failed later or not at all)."""
    if not isinstance(result, StepResult):
        raise TypeError(f"solver {method.name!r}: step() returned {type(result).__name__}; it must return a "
                        "solvers.StepResult(y, state, error)")
    if not isinstance(result.y, Tensor) or result.y.shape != y.shape:
        got = tuple(result.y.shape) if isinstance(result.y, Tensor) else type(result.y).__name__
        raise ValueError(f"solver {method.name!r}: step() returned a state of shape {got} from one of shape "
                         f"{tuple(y.shape)}")


def _budget_error(max_nfe: int | None, err: _OverBudget, t0: float, t1: float, stats: Stats,
                  names: tuple[str, Callable[[float], float] | None], inverse: bool,
                  fixed: bool = False) -> SolveError:
    """The error of a step (or of the first step's size estimate, ``err.what``) not taken because its
    evaluations would pass ``max_nfe``; ``err.t`` is where the evaluation that would have passed it was asked."""
    time_name, display = names
    i = stats.steps
    at = f"{time_name} {_shown(err.t, display):.6g}"
    if err.what is not None:
        where, t0 = f"{err.what} at {at}", err.t
        t1 = t0
    else:
        where = _where(i, t0, t1, time_name, display, inverse) + (f" (stopped at {at})" if err.t != t0 else "")
    return SolveError(
        f"max_nfe={max_nfe} reached: {where} was not taken, its evaluations would pass the bound after the "
        f"{stats.nfe} already made ({stats.accepted} accepted and {stats.rejected} rejected steps); raise max_nfe "
        + ("or take fewer steps" if fixed else "or loosen rtol/atol"), step=i, t0=t0, t1=t1, stats=stats)


def _reraise(err: BaseException, stats: Stats, t0: float, t1: float,
             names: tuple[str, Callable[[float], float] | None], inverse: bool, finish: Callable[[], None],
             phase: str = "step", t_now: float | None = None) -> None:
    """Raise ``err`` located at the step that failed (a :class:`SolveError` for bad values).

    ``phase`` says what was running: ``"step"`` (step ``stats.steps``, from ``t0`` to ``t1``), ``"callback"`` (the
    callback after the step just taken, ``t0`` to ``t1``), ``"propose"`` (choosing the next step at ``t_now``, e.g.
    the first step's size estimate) or ``"init"`` (the solver's first evaluations at ``t_now``, before step 0)."""
    time_name, display = names
    if isinstance(err, SolveError):
        raise err
    finish()
    if phase == "callback":
        index = stats.steps - 1
        where = "the callback after " + _where(index, t0, t1, time_name, display, inverse)
    elif phase in ("init", "propose") and t_now is not None and not isinstance(err, _Stop):
        index = stats.steps
        at = f"{time_name} {_shown(t_now, display):.6g}"
        where = (f"the solver's start at {at} (before step 0)" if phase == "init" else
                 f"{'inverse step' if inverse else 'step'} {index} (choosing it at {at})")
        t0 = t1 = t_now
    else:
        index = stats.steps - 1 if isinstance(err, _Stop) else stats.steps
        where = _where(index, t0, t1, time_name, display, inverse)
    if isinstance(err, StepFailure):
        stats.extra.update(err.extra)
        message = err.message.format(where=where) if "{where}" in err.message else f"{where}: {err}"
        raise SolveError(message, step=index, t0=t0, t1=t1, stats=stats) from None
    if isinstance(err, _Stop):
        raise SolveError(f"{where}: {err}", step=index, t0=t0, t1=t1, stats=stats) from None
    if isinstance(err, (ValueError, TypeError)):
        raise SolveError(f"{where}: {err}", step=index, t0=t0, t1=t1, stats=stats) from err
    if isinstance(err, Exception):
        err.add_note(f"while solving {where}")
    raise err


def _shown(t: float, display: Callable[[float], float] | None) -> float:
    return display(t) if display is not None else t
