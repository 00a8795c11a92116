"""What a solve is asked to do, as small frozen objects validated once and passed whole.

``generate``/``encode``/``decode`` take ``steps=``/``nfe=``/``grid=`` (a name or explicit σ) as the
everyday form and these objects for everything else (``grid=Grid(...)``, ``adaptive=Adaptive(...)``,
``solver=Stochastic(...)`` or ``solver=Inversion(...)``, ``checks=Checks(...)``); every layer below
takes the objects, never keywords one by one:

* :class:`Grid` — a fixed σ grid: a named grid with ``steps`` or an ``nfe`` budget, or
  explicit ``sigmas``/``timesteps``, its options, and whether the step into σ = 0 is Euler.
* :class:`Adaptive` — an error-controlled solve: tolerances in the image's scale, the
  evaluation cap, the controller and the change-of-variables knobs.
* :class:`Stochastic` — the DDIM paper's η process (generation only) and its noise source.
* :class:`Inversion` — an encode that inverts a plain decode (``"fixed_point"``) and its options.
* :class:`Save` — which states (and denoised images) the solve returns besides its end.
* :class:`Checks` — the run-time checks: non-finite states, the divergence guard, a latent's model.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import Solver, StepController

from ._checks import check_has_values, check_seed, functorch_levels
from .flow import ProbabilityFlow
from .formulations import encode_evaluates_end, formulation_for
from .grids import GRIDS, check_budget, make_sigmas, reversed_grid
from .schedules import ArrayLike

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# -- checks shared by every entry point -----------------------------------------------------------

def check_flow(flow: object) -> ProbabilityFlow:
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    return flow


def check_state(x: object, name: str) -> Tensor:
    """A floating-point batch ``(batch, ...)`` without NaN or inf."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float64, float32, float16, bfloat16), got {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a batch dimension first, shape (batch, ...), got {tuple(x.shape)}")
    values, _ = functorch_levels(x)  # under torch.func.vmap: the whole mapped batch, checked once
    check_has_values(values, name)
    if not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def compute_dtype(x: Tensor) -> torch.dtype:
    """The state's dtype: the input's, except float16/bfloat16, which are integrated in float32."""
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


def exact_dtype(x: Tensor) -> torch.dtype:
    """The state dtype of a reversible encode: float64 wherever the device has it (not on MPS).

    A reversible solver's inverse steps amplify the rounding of the state they start from by
    the model's Lipschitz constant, step after step; in float64 that stays far below float32's
    resolution, so float32 images come back to their last bit while the model runs in float32.
    """
    return torch.float32 if x.device.type == "mps" else torch.float64


def _mapping(value: object, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping (dict), got {type(value).__name__}")
    return dict(value)


def _count(value: object, name: str, low: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value!r}")
    return int(value)


def _flag(value: object, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def _tolerance(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # TypeError: not a number at all
        raise TypeError(f"{name} must be a finite number >= 0, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# -- the option objects ---------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class Grid:
    """A fixed σ grid for a solve.

    ``name`` is one of :data:`flowdiff.GRIDS` with ``steps`` (the step count) or ``nfe``
    (a budget: the largest step count whose counted NFE fits), or give ``sigmas``
    (decreasing, ending at 0) or ``timesteps`` explicitly. ``options`` go to the grid
    (``rho``, ``power``, ``sigma_min``, ``sigma_max``). ``final_euler``: a solver that would
    evaluate the model at σ = 0 takes its last step as Euler instead (as EDM does); ``None``
    (the default) means True unless said elsewhere once (a fixed-point latent, the
    :class:`Inversion`'s options): two different values are refused, naming both. ``False`` is refused
    where it would change nothing (:func:`idle_final_euler`: a solver that never evaluates a step's end, a
    grid that ends above 0, …).
    """

    name: str = "trailing"
    steps: int | None = None
    nfe: int | None = None
    sigmas: ArrayLike | None = None
    timesteps: ArrayLike | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    final_euler: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or self.name not in GRIDS:
            raise ValueError(f"unknown grid {self.name!r}; accepted: {', '.join(GRIDS)} (or Grid(sigmas=...) / "
                             "Grid(timesteps=...))")
        object.__setattr__(self, "steps", _count(self.steps, "steps"))
        object.__setattr__(self, "nfe", _count(self.nfe, "nfe"))
        object.__setattr__(self, "options", _mapping(self.options, "Grid.options"))
        if self.final_euler is not None:
            object.__setattr__(self, "final_euler", _flag(self.final_euler, "final_euler"))
        explicit = "sigmas" if self.sigmas is not None else "timesteps" if self.timesteps is not None else None
        if explicit is not None and self.name != "trailing":  # the default name: nothing else to tell it from
            raise ValueError(f"Grid({self.name!r}, {explicit}=...): explicit {explicit} are the whole grid, so the "
                             f"name {self.name!r} would go unused; give the name with steps=/nfe=, or the {explicit} "
                             "alone")
        if self.nfe is not None:
            if self.steps is not None:
                raise ValueError("give steps or nfe, not both")
            if self.sigmas is not None or self.timesteps is not None:
                raise ValueError("nfe= picks the step count of a named grid; it cannot be combined with sigmas= or "
                                 "timesteps= (their length fixes the steps)")

    @property
    def given(self) -> bool:
        """Whether anything fixes the grid (steps, nfe, sigmas or timesteps)."""
        return not (self.steps is None and self.nfe is None and self.sigmas is None and self.timesteps is None)

    def generation_sigmas(self, flow: ProbabilityFlow, solver: Solver, *,
                          final_euler: bool | None = None) -> np.ndarray:
        """The generation grid (decreasing to 0), with ``nfe=`` turned into a step count exactly."""
        return self._generation_sigmas(flow, solver, self.euler_into_zero if final_euler is None else final_euler,
                                       "generate")

    def _generation_sigmas(self, flow: ProbabilityFlow, solver: Solver, final: bool, direction: str) -> np.ndarray:
        if not self.given:
            raise ValueError("give one of steps=, nfe=, grid=<σ values> or grid=Grid(sigmas=/timesteps=) (or "
                             "adaptive=flowdiff.Adaptive(...) for an adaptive solve)")
        steps = self.steps
        if self.nfe is not None:
            self._check_one_step(solver, final, direction)
            steps = check_budget(solver.name, self.nfe, solvers.steps_for_nfe(solver, self.nfe, eval_end=not final))
        sig = self._sigmas(flow, steps)
        if self.nfe is not None and sig[0] == math.inf:  # the step out of σ = ∞ costs one evaluation
            fits = self.nfe > solvers.nfe_for_steps(solver, 1, eval_end=not final)
            steps = 1 + (solvers.steps_for_nfe(solver, self.nfe - 1, eval_end=not final) if fits else 0)
            sig = self._sigmas(flow, steps)
        return sig

    def _sigmas(self, flow: ProbabilityFlow, steps: int | None) -> np.ndarray:
        named = getattr(flow, "named_grid", None)  # a flow that carries its scheduler's config (DiffusersFlow)
        if named is not None and self.sigmas is None and self.timesteps is None and not self.options:
            grid = named(self.name, steps)
            if grid is not None:
                return grid
        return make_sigmas(flow.schedule, self.name, steps, sigmas=self.sigmas, timesteps=self.timesteps,
                           **self.options)

    def solve_sigmas(self, flow: ProbabilityFlow, solver: Solver, direction: str) -> np.ndarray:
        """The σ grid in the order the solve runs it, built once here (reversed by :func:`~flowdiff.engine.grids.
        reversed_grid`, the one place a σ grid is turned around; a latent's decode turns its stored grid with it).

        ``"generate"`` (and a plain decode): the generation grid, decreasing to 0, its last step
        Euler per ``final_euler``. ``"encode"``: the same grid reversed (0 up to σ_max), built as a
        decode sees it whose last step evaluates as the encode's first does (:func:`encode_evaluates_end`),
        so that the decode with the same arguments retraces it."""
        if direction == "generate":
            return self.generation_sigmas(flow, solver)
        if direction == "encode":
            # unipc and abm end an encode with the predictor alone (formulations.encode_evaluates_end)
            return reversed_grid(self._generation_sigmas(flow, solver, not encode_evaluates_end(solver), "encode"))
        raise ValueError(f"direction must be 'generate' or 'encode', got {direction!r}")

    def _check_one_step(self, solver: Solver, final: bool, direction: str) -> None:
        """Refuse an ``nfe`` below the cost of one step, saying which budgets this solver and direction accept: a
        generation's step into σ = 0 is Euler (one evaluation, ``final_euler``), an encode's first step out of
        σ = 0 is a whole step of the method, so ``heun`` generates at ``nfe=1`` and encodes from ``nfe=2``."""
        one = solvers.nfe_for_steps(solver, 1, eval_end=not final)
        if self.nfe >= one:
            return
        if direction == "encode":
            why = (f"an encode's first step, out of σ = 0, is a whole {solver.name} step, where a generation's last "
                   "step into σ = 0 is Euler")
            then = f"to encode with {solver.name!r} give"
        else:  # a generation, or the decode an Inversion inverts, told final_euler=False
            why = f"with final_euler=False the step into σ = 0 is a whole {solver.name} step, not Euler"
            then = f"with final_euler=False, {solver.name!r} takes"
        raise ValueError(f"nfe={self.nfe} is below the cost of one step of solver {solver.name!r} "
                         f"({one} evaluations: {why}); {then} nfe >= {one}")

    @property
    def euler_into_zero(self) -> bool:
        """Whether the step into σ = 0 is Euler (``final_euler``, True unless set to False)."""
        return self.final_euler is not False

    def replace(self, **changes: Any) -> Grid:
        values = {k: getattr(self, k) for k in ("name", "steps", "nfe", "sigmas", "timesteps", "options",
                                                 "final_euler")}
        values.update(changes)
        return Grid(**values)


def idle_final_euler(solver: Solver, sigmas: ArrayLike, direction: str = "generate") -> str | None:
    """Why ``final_euler=False`` would change nothing in a fixed-grid solve of ``solver`` over ``sigmas``
    (decreasing, as a generation or a decode runs), or None where it changes the last step.

    The flag decides one thing: whether a last step into σ = 0 that would evaluate the model there is taken
    as Euler (:data:`solvers.FINAL_EULER`) instead. Where the grid ends above 0, where the solver never
    evaluates a step's end (euler, ipndm, dpmpp_2m …), or where its variables reach σ = 0 with a step of
    their own that evaluates nothing there (the data variables' ρ = ∞), no such step exists, and the same
    images and NFE come out either way: the flag is refused there (nothing silently ignored). A plug-in that
    ends in its own way says why in ``final_euler_refused`` (:class:`flowdiff.api.pndm.PNDM`)."""
    own = getattr(solver, "final_euler_refused", None)
    if own:
        return own
    sig = np.asarray(sigmas, dtype=np.float64)
    if sig[-1] != 0.0:
        return f"the grid ends at σ = {sig[-1]:.6g}, above 0: there is no step into σ = 0 for it to change"
    if not solver.evaluates_end:
        return f"{solver.name!r} never evaluates the model at a step's end: its step into σ = 0 is already its own"
    form = formulation_for(solver, direction)
    stepping = form.grid(sig.tolist(), solver, eval_end=False)
    if not any(method is solvers.FINAL_EULER for method in stepping.methods.values()):
        if len(sig) == 2 and sig[0] == math.inf:  # its one step is the boundary step out of noise (engine.terminal)
            return ("the grid's one step runs from σ = ∞ straight to 0: the boundary step out of pure noise, never "
                    f"{solver.name!r}'s own")
        return (f"{solver.name!r} runs in the {form.name!r} variables ({form.time_name}), whose own step into "
                "σ = 0 evaluates nothing there")
    return None


#: generate's and encode's tolerances where ``Adaptive`` leaves them out (each entry point has its own).
GENERATE_RTOL = 1e-3
GENERATE_ATOL = 1e-3


@dataclass(frozen=True, eq=False)
class Adaptive:
    """An error-controlled solve whose tolerance is measured on the image's scale.

    ``rtol``/``atol`` bound each step's local error in the VP-scaled state x = x̄/√(1+σ²), per
    sample, the worst sample deciding. A tolerance left out (``None``) is the entry point's own
    default, filled in by :meth:`resolved`: 1e-3 for ``generate``/``encode``
    (:data:`GENERATE_RTOL`), 1e-5 for :func:`flowdiff.log_likelihood`; so ``Adaptive(max_nfe=N)``
    caps a solve without loosening it. ``max_nfe`` stops a solve
    that would need more evaluations with a :class:`solvers.SolveError`. ``controller`` (a
    :class:`solvers.StepController`), ``first_step`` (in the solve's time variable),
    ``sigma_c`` (the c of τ = log(σ + c), the time of the σ-variable solvers such as dopri5;
    default the schedule's smallest σ), ``sigma_end`` (where a data-variables solve, unipc, meets
    σ = 0: a generation hands over to the denoised image there, an encode starts from σ_end/1000;
    default σ_min/10) and ``sigma_start`` (default the schedule's σ_max) shape it.
    ``sigma_c`` with a data-variables solver, or ``sigma_end`` with a σ-variable
    one, is refused by the solve (neither would change it).
    """

    rtol: float | None = None
    atol: float | None = None
    max_nfe: int | None = None
    controller: StepController | None = None
    first_step: float | None = None
    sigma_c: float | None = None
    sigma_end: float | None = None
    sigma_start: float | None = None

    def __post_init__(self) -> None:
        rtol = None if self.rtol is None else _tolerance("rtol", self.rtol)
        atol = None if self.atol is None else _tolerance("atol", self.atol)
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be 0")
        object.__setattr__(self, "rtol", rtol)  # a Python float (a NumPy scalar is taken as its value)
        object.__setattr__(self, "atol", atol)
        object.__setattr__(self, "max_nfe", _count(self.max_nfe, "max_nfe"))
        if self.controller is not None and not isinstance(self.controller, StepController):
            raise TypeError(f"Adaptive.controller must be a solvers.StepController, got "
                            f"{type(self.controller).__name__}")
        if self.first_step is not None and (isinstance(self.first_step, bool) or not isinstance(
                self.first_step, (int, float)) or not self.first_step > 0):
            raise ValueError(f"Adaptive.first_step must be a number > 0, got {self.first_step!r}")
        for name in ("sigma_c", "sigma_end", "sigma_start"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not (math.isfinite(value) and value > 0)):
                raise ValueError(f"{name} must lie in (0, σ_start) (a finite number > 0), got {value!r}")

    def resolved(self, rtol: float, atol: float) -> Adaptive:
        """This request with the caller's default ``rtol``/``atol`` in place of each one not given (an entry point's
        own defaults: :data:`GENERATE_RTOL` for generate/encode, the likelihood's 1e-5); the given ones kept."""
        return dataclasses.replace(self, rtol=rtol if self.rtol is None else self.rtol,
                                   atol=atol if self.atol is None else self.atol)


#: The named member of the family besides numeric η: DDPM's larger variance σ̂² = 1 − ᾱ_t/ᾱ_s.
SIGMA_HAT = "sigma_hat"


def check_eta(eta: object) -> float | str:
    """Validate ``eta``: a real number in [0, 1], or ``"sigma_hat"``; returned as float or that string."""
    if isinstance(eta, str):
        if eta != SIGMA_HAT:
            raise ValueError(f"unknown eta {eta!r}; accepted: a number in [0, 1] or {SIGMA_HAT!r}")
        return eta
    if isinstance(eta, bool) or not isinstance(eta, (int, float, np.integer, np.floating)):
        raise TypeError(f"eta must be a number in [0, 1] or {SIGMA_HAT!r}, got {type(eta).__name__}")
    value = float(eta)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"eta must lie in [0, 1] (0: the ODE/DDIM, 1: DDPM's posterior variance) "
                         f"or be {SIGMA_HAT!r}, got {eta!r}")
    return value


@dataclass(frozen=True, eq=False)
class Stochastic:
    """The DDIM paper's generalized generative process (see :mod:`flowdiff.api.stochastic`).

    ``eta`` in [0, 1] or ``"sigma_hat"``; noise drawn from ``generator`` (a ``torch.Generator``
    or an int seed) or given per step in ``step_noise`` (shape ``(steps, *noise.shape)``).
    """

    eta: float | str = 0.0
    generator: torch.Generator | int | None = None
    step_noise: Tensor | None = None

    def __post_init__(self) -> None:  # what needs no noise is checked here; its device, in the solve
        object.__setattr__(self, "eta", check_eta(self.eta))
        g = self.generator
        if isinstance(g, bool) or not (g is None or isinstance(g, (int, np.integer, torch.Generator))):
            raise TypeError(f"Stochastic.generator must be a torch.Generator or an int seed, got {type(g).__name__}")
        if isinstance(g, (int, np.integer)):
            check_seed(g, "Stochastic.generator")
        if g is not None and self.step_noise is not None:
            raise ValueError("Stochastic: give generator= or step_noise=, not both: step_noise fixes every step's "
                             "noise itself")


@dataclass(frozen=True, eq=False)
class Inversion:
    """An encode whose plain latent the standard decode turns back into the images.

    Given as ``encode(..., solver=Inversion(...))``. ``method`` names the inversion
    (``"fixed_point"``: :mod:`flowdiff.api.fixed_point`); ``options`` are its own (``tol``,
    ``max_iter``, ``method``, ``on_failure``, …); ``solver`` is the decode solver whose decode it
    inverts (a registered name or a :class:`solvers.Solver`; default ``"euler"``, DDIM decoding).
    """

    method: str = "fixed_point"
    options: Mapping[str, Any] = field(default_factory=dict)
    solver: str | Solver = "euler"

    def __post_init__(self) -> None:
        if not isinstance(self.method, str):
            raise TypeError(f"Inversion.method must be a name (str), got {type(self.method).__name__}")
        object.__setattr__(self, "options", _mapping(self.options, "Inversion.options"))
        if not isinstance(self.solver, (str, Solver)):
            raise TypeError(f"Inversion.solver must be a registered solver name or a solvers.Solver, got "
                            f"{type(self.solver).__name__}")


@dataclass(frozen=True, eq=False)
class Save:
    """Which states a solve returns besides its end, in ``Result.saved`` (diffrax's ``SaveAt`` in spirit).

    ``sigmas``: the σ values whose states to keep, each a point the solve steps to (any point
    of its grid but the start; a fixed grid's, in either direction); ``steps=True``: the state
    after every accepted step. Each saved record is the :class:`flowdiff.StepState` a callback
    receives there (step index, σ, x, x̄). ``denoised=True`` keeps the model's denoised image x̂₀
    there wherever the solve evaluated the model at that state (the callback's record has it, or
    the next step starts by evaluating there: Euler/DDIM, Runge–Kutta, the η process); no
    evaluation is added, and ``None`` is kept where none was made (the end state). A reversible
    solver never evaluates at a state it saves, so ``denoised=True`` is refused with it. By default
    ``denoised`` is dropped.
    """

    sigmas: ArrayLike | None = None
    steps: bool = False
    denoised: bool = False

    def __post_init__(self) -> None:
        _flag(self.steps, "Save.steps")
        _flag(self.denoised, "Save.denoised")
        if self.sigmas is not None:
            if isinstance(self.sigmas, (str, bytes)):
                raise TypeError(f"Save.sigmas must be a list of σ values, got the string {self.sigmas!r}"
                                + (": to keep every step, give Save(steps=True)" if self.sigmas == "steps" else ""))
            try:
                s = np.asarray(self.sigmas, dtype=np.float64)
            except (TypeError, ValueError):
                raise TypeError(f"Save.sigmas must be a list of σ values (numbers), got {self.sigmas!r}") from None
            if s.ndim != 1 or s.size == 0 or np.isnan(s).any() or (s < 0).any():
                raise ValueError(f"Save.sigmas must be a non-empty 1-D list of σ >= 0 (points of the solve's grid), "
                                 f"got {self.sigmas!r}")
            object.__setattr__(self, "sigmas", tuple(float(v) for v in s))
        if not self.sigmas and not self.steps:
            raise ValueError("Save() keeps nothing: give sigmas=[...] (states at those σ) or steps=True (every step)")


@dataclass(frozen=True, eq=False)
class Checks:
    """The run-time checks of ``generate``/``encode``/``decode``.

    ``finite``: stop with a :class:`solvers.SolveError` naming the step when a state turns
    NaN/inf. ``growth``: the divergence guard (:func:`flowdiff.engine.loop.divergence_limit`):
    the VP-scaled end state may reach ``growth × max(1, max|start|)`` and no further; ``None``
    turns it off, ``"auto"`` (the default) is the direction's own factor (1000 for generate and
    decode, 50 for encode). (Not called ``divergence``: that word is the trace of ∂ε/∂x̄ in
    :func:`flowdiff.log_likelihood`'s estimator, :class:`flowdiff.Trace`.) ``model``: a
    :class:`flowdiff.Latent` that records its model refuses another flow or other
    ``model_kwargs`` in :func:`flowdiff.decode` (generate and encode have no such check, so
    ``model=False`` there is refused rather than ignored).
    """

    finite: bool = True
    growth: float | str | None = "auto"
    model: bool = True

    def __post_init__(self) -> None:
        _flag(self.finite, "Checks.finite")
        _flag(self.model, "Checks.model")
        d = self.growth
        if d is None or d == "auto":
            return
        if isinstance(d, bool) or not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            raise ValueError(f"Checks.growth must be a finite number > 0, None (off) or 'auto' (the direction's "
                             f"default), got {d!r}")

    def bound(self, default: float) -> float | None:
        """The divergence factor for a solve whose own default is ``default`` (None: off)."""
        return default if self.growth == "auto" else self.growth


def check_checks(checks: object) -> Checks:
    if checks is None:
        return Checks()
    if not isinstance(checks, Checks):
        raise TypeError(f"checks must be a flowdiff.Checks, got {type(checks).__name__}")
    return checks


@dataclass(frozen=True, eq=False)
class Request:
    """One solve as the layers below the entry points see it: the flow, the solver (built),
    the grid or adaptive control, the conditioning, the callback and the divergence guard's
    absolute bound on the VP-scaled end state (``bound``, None: off; see
    :func:`flowdiff.engine.loop.divergence_limit`)."""

    flow: ProbabilityFlow
    solver: Solver
    solver_name: str
    solver_options: dict[str, Any]
    grid: Grid
    adaptive: Adaptive | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    callback: Callable[..., None] | None = None
    check_finite: bool = True
    bound: float | None = None


def check_callback(callback: object) -> Callable[..., None] | None:
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable (it receives a flowdiff.StepState), got {type(callback).__name__}")
    return callback  # type: ignore[return-value]


def _shown(value: object) -> str:
    text = repr(value.tolist() if isinstance(value, (np.ndarray, Tensor)) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def as_grid(grid: object, name: str = "grid") -> str | Grid:
    """``grid=`` as a name or a :class:`Grid`; explicit σ values (a 1-D list, array or tensor) are
    ``Grid(sigmas=...)``."""
    if isinstance(grid, (str, Grid)):
        return grid
    if isinstance(grid, (list, tuple, np.ndarray, Tensor)):
        return Grid(sigmas=grid)
    raise TypeError(f"{name} must be a grid name ({', '.join(GRIDS)}), a flowdiff.Grid or explicit σ values "
                    f"(a 1-D list, array or tensor), got {type(grid).__name__}")


def build_grid(grid: object, *, steps: int | None, nfe: int | None) -> Grid:
    """The :class:`Grid` of ``grid=`` with the everyday ``steps=``/``nfe=`` keywords.

    A Grid (or explicit σ) that fixes its own steps refuses ``steps=``/``nfe=`` beside it, naming both."""
    grid = as_grid(grid)
    if isinstance(grid, Grid):
        if steps is None and nfe is None:
            return grid
        given = f"steps={_shown(steps)}" if steps is not None else f"nfe={_shown(nfe)}"
        if grid.given:
            shown = "explicit σ" if grid.sigmas is not None else "Grid(...)"
            raise ValueError(f"{given} beside grid={shown}, which fixes its own steps: give the step count once "
                             "(inside the Grid, or as steps=/nfe= with a grid name)")
        return grid.replace(steps=steps, nfe=nfe)
    return Grid(grid, steps, nfe)
