"""Changes of variables of the probability-flow ODE, as objects, and the one place that picks them.

The flow is ``dx̄/dσ = ε(x̄, σ)``. Some methods are built for other variables; the solver
stays diffusion-agnostic (it integrates ``dy/dt = f(t, y)``) and each change of variables is
a :class:`Formulation` here: its time t ↔ σ, its state y ↔ x̄, its field ``f(t, y)`` from ε,
the factor from y to the VP-scaled image x = x̄/√(1+σ²) (for error norms), the denoised image
from a carried derivative, and the fixed grid in its own time (with the steps its end points
need). :func:`formulation_for` picks one for a solver, a direction and a kind of solve (fixed grid,
adaptive, the η process, a reversible decode, the fixed-point inversion and the likelihood's
augmented solve all ask it).

An *augmented* solve carries extra columns q beside the state, each with its own σ-derivative
dq/dσ (the likelihood's log-density, dℓ/dσ = div ε). In variables whose state is x̄ itself
(:class:`Sigma`, :class:`LogSigma`) the whole augmented state changes time alone,
d[x̄, q]/dt = dσ/dt · [ε, dq/dσ] (:meth:`Formulation.augmented_field`); that is what
``formulation_for(..., augmented=True)`` picks. The extra columns are the caller's: an
augmented state is not a change of variables of the diffusion.

* :class:`Sigma` — t = σ, y = x̄, f = ε. DDIM is Euler here; k-diffusion's lms is Adams here.
* :class:`Data` — t = ρ = 1/σ, y = x̄/σ, f = D = x̄ − σ·ε (the model's denoised image):

      dy/dρ = D(x̄, σ),

  since dy/dσ = ε/σ − x̄/σ² = −D/σ² and dρ/dσ = −1/σ². Euler here is again DDIM; Adams
  methods whose derivative polynomial is in λ = log ρ are the multistep exponential
  integrators DPM-Solver++(2M/3M) (Lu et al. 2022) and UniPC (Zhao et al. 2023).
  σ = 0 is ρ = ∞, where the state is x̄ itself. The step touching σ = 0 is taken in x̄ by a
  method of its own: into σ = 0 the image is ``lim_{σ→0} D(x̄(σ), σ)``, read off the last
  denoised value(s) (:func:`finish_at_zero`); out of σ = 0 (encoding) the first step is
  Euler in σ (DDIM), which never divides by σ.
* :class:`LogSigma` — t = τ = log(σ + c), y = x̄, f = (σ + c)·ε, for adaptive Runge–Kutta:
  steps are relative in σ ≫ c (log σ), and σ = 0 is the finite τ = log c, reached exactly
  without dividing by σ. With c = 0 (t = log σ) σ = 0 is τ = −∞, reached by an Euler step.
* :class:`VP` — t = τ = log(1 + σ), y = x = x̄/√(1+σ²), for reversible solvers: |x| = O(1)
  at every σ and the field is nearly zero at large σ, so the rounding an exact inverse
  amplifies stays at the state's own precision (see :mod:`flowdiff.api.inversion`).
* :class:`FlowMatching` — t = σ/(1+σ), y = x̄/(1+σ), f = the velocity v = (1+σ)·(ε − y):
  rectified flow's own time and sample (x = (1−t)·x̂₀ + t·ε̂), for the flow-matching schedulers'
  Runge–Kutta loops (diffusers' FlowMatchHeunDiscreteScheduler is Heun here, not in σ). σ = ∞ is
  the finite t = 1, where y is the noise and v = y − x̂₀.

Time values at the grid's points map back to the grid's own σ exactly (looked up, not
recomputed through exp/log), so that an encode and its decode evaluate the model at
identical σ.

A generation grid may start at σ = ∞ (zero terminal SNR, flow matching's t = 1), where x̄ is
infinite. There every formulation's state is the noise itself, the VP-scaled x (x̄/σ → x in
:class:`Data`, x in :class:`VP`), and the field's value is the denoised image x̂₀ read off the
model at pure noise (:mod:`flowdiff.engine.terminal` extends ε that way). The step out of it is
a step of the grid like any other, with its own method (:class:`OutOfInfinity`: Euler's limit
x̄₁ = x̂₀ + σ₁·ε̂, ε̂ = the noise), so that the one loop counts it, times it, calls the callback
with index 0 and locates its failures.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from solvers import Derivative, FixedGrid, ReversibleState, Solver, StepResult, VectorField, final_step_methods

from .flow import own_denoised

#: ``eps_field(σ, x̄) -> ε`` as built by :meth:`flowdiff.ProbabilityFlow.field`.
EpsField = Callable[[float, Tensor], Tensor]

#: Solvers built for the data-prediction variables (registry name → variables). Diffusion
#: knowledge, so it lives here and not in :mod:`solvers`; :func:`prefer_variables` adds to it.
_PREFERRED: dict[str, str] = {"dpmpp_2m": "data", "dpmpp_3m": "data", "unipc": "data"}


def prefer_variables(solver_name: str, variables: str) -> None:
    """Declare that the solver registered as ``solver_name`` runs in ``variables`` (``"sigma"``, ``"data"`` or
    ``"flow_matching"``)."""
    if variables not in ("sigma", "data", "flow_matching"):
        raise ValueError(f"variables must be 'sigma', 'data' or 'flow_matching', got {variables!r}")
    _PREFERRED[solver_name] = variables


def method_of(solver: Solver) -> Solver:
    """The method a wrapper modifies (``solvers.Shifted``, ``solvers.CorrectedAdams``: their ``base``), down to
    the registered method itself: what the engine asks about variables and encoding."""
    while isinstance(getattr(solver, "base", None), Solver):
        solver = solver.base  # type: ignore[attr-defined]
    return solver


def variables_of(solver: Solver) -> str:
    """The variables a solver is meant to run in: ``"data"`` for the exponential integrators, ``"flow_matching"`` for
    the methods declared so (``flowmatch_heun``), else ``"sigma"``.

    A name declared with :func:`prefer_variables` decides; otherwise a wrapper (shifted evaluations, corrected
    coefficients) runs in its base method's variables, so that zero shifts are the base method bit for bit."""
    if solver.name in _PREFERRED:
        return _PREFERRED[solver.name]
    base = method_of(solver)
    return _PREFERRED.get(base.name, "sigma")


def grid_order(solver: Solver) -> int:
    """The convergence order of a fixed-grid generate into σ = 0 with ``solver``.

    A self-started multistep method is limited by its lower-order first steps
    (``fixed_grid_order``); in the data variables the step into σ = 0 is the denoised image,
    D = x̄(0) + O(σ²), a second-order step. (Methods in log time reach it on grids refined
    in log σ; on grids uniform in σ their last steps stay O(1) long in log σ.)
    """
    order = getattr(solver, "fixed_grid_order", solver.order)
    return min(order, 2) if variables_of(solver) == "data" else order


class Formulation(abc.ABC):
    """One change of variables (t, y) of the flow ``dx̄/dσ = ε``."""

    name: str = ""
    #: How a solve's messages name this time (e.g. ``"log(σ+c)"``).
    time_name: str = ""
    #: Whether the state is x̄ itself (y = x̄): then an augmented state changes time alone (:meth:`augmented_field`).
    state_is_xbar: bool = False

    def __init__(self) -> None:
        self._exact: dict[float, float] = {}

    # time <-> σ
    @abc.abstractmethod
    def _time(self, sigma: float) -> float: ...

    @abc.abstractmethod
    def _sigma(self, t: float) -> float: ...

    def time(self, sigma: float) -> float:
        return self._time(float(sigma))

    def sigma(self, t: float) -> float:
        """σ at time ``t``: a grid point's own σ when ``t`` is one (see :meth:`times`)."""
        s = self._exact.get(t)
        return self._sigma(t) if s is None else s

    def times(self, sigmas: Sequence[float]) -> list[float]:
        """The grid's times; each maps back to its own σ exactly."""
        ts = [self._time(float(s)) for s in sigmas]
        self._exact.update(zip(ts, (float(s) for s in sigmas)))
        return ts

    @abc.abstractmethod
    def dsigma_dt(self, t: float) -> float:
        """dσ/dt at time ``t`` (at :meth:`sigma`'s σ): the factor by which a σ-derivative becomes a t-derivative."""

    # state <-> x̄
    @abc.abstractmethod
    def to_state(self, xbar: Tensor, sigma: float) -> Tensor: ...

    @abc.abstractmethod
    def to_xbar(self, y: Tensor, t: float) -> Tensor: ...

    @abc.abstractmethod
    def field(self, eps: EpsField) -> VectorField: ...

    def x_factor(self, t: float) -> float:
        """x = y·x_factor(t): the VP-scaled image x = x̄/√(1+σ²) from the state (error norms use it)."""
        s = self.sigma(t)
        return 1.0 / math.sqrt(1.0 + s * s)

    def denoised(self, t: float, y: Tensor, state: Any) -> Tensor | None:
        """The model's denoised image at (t, y) if the carried state already holds the field there."""
        return None

    def grid(self, sigmas: Sequence[float], solver: Solver, *, eval_end: bool = True) -> FixedGrid:
        """The fixed stepping across the σ grid ``sigmas`` in this formulation's time (from σ = ∞ included)."""
        ts = self.times(sigmas)
        return self._fixed(sigmas, ts, final_step_methods(solver, len(ts) - 1, eval_end))

    def uniform_grid(self, sigma_from: float, sigma_to: float, steps: int, solver: Solver) -> FixedGrid:
        """``steps`` steps of equal length in this formulation's time from σ = ``sigma_from`` to ``sigma_to``
        (either direction); the ends map back to their own σ exactly. Both ends must lie at finite times."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        t0, t1 = self.times([sigma_from, sigma_to])
        if not (math.isfinite(t0) and math.isfinite(t1)):
            raise ValueError(f"a grid uniform in {self.name!r} time needs both ends at finite times; σ = "
                             f"{sigma_from!r} -> {sigma_to!r} is {self.time_name} = {t0!r} -> {t1!r}")
        ts = np.linspace(t0, t1, steps + 1).tolist()
        return FixedGrid(ts, final_step_methods(solver, steps, True))

    def augmented_field(self, sigma_field: Callable[[float, Tensor], Tensor]) -> VectorField:
        """The field in this time of an augmented state whose σ-field is ``sigma_field(σ, [x̄, q]) -> [ε, dq/dσ]``.

        The state's columns hold x̄ and extra quantities q integrated beside it (the likelihood's
        log-density); in variables whose state is x̄ itself (:attr:`state_is_xbar`) the augmented
        ODE changes time alone: ``f(t, [x̄, q]) = sigma_field(σ(t), [x̄, q]) · dσ/dt``. Variables that
        rescale the state (:class:`Data`, :class:`VP`) would have to rescale x̄'s columns and not
        q's, and are refused (:func:`formulation_for` with ``augmented=True`` never picks them).
        """
        if not self.state_is_xbar:
            raise ValueError(f"an augmented solve needs variables whose state is x̄ itself ('sigma', 'logsigma'); "
                             f"the {self.name!r} variables rescale it")
        sigma_of, rate = self.sigma, self.dsigma_dt

        def f(t: float, y: Tensor) -> Tensor:
            return sigma_field(sigma_of(t), y) * rate(t)

        return f

    def _fixed(self, sigmas: Sequence[float], ts: list[float], methods: dict[int, Solver]) -> FixedGrid:
        """The fixed grid ``ts`` with ``methods``; a first σ = ∞ gets the boundary step out of pure noise."""
        if sigmas[0] == math.inf:
            methods[0] = OutOfInfinity(self)
        return FixedGrid(ts, methods, infinite_ends=True)

    # a reversible solver's carried state is stored timed in σ (what a Latent keeps)
    def state_in(self, state: Any) -> Any:
        return state._replace(t=self.time(state.t)) if isinstance(state, ReversibleState) else state

    def state_out(self, state: Any) -> Any:
        return state._replace(t=self.sigma(state.t)) if isinstance(state, ReversibleState) else state


class Sigma(Formulation):
    """t = σ, y = x̄, f = ε."""

    name = "sigma"
    time_name = "σ"
    state_is_xbar = True

    def times(self, sigmas: Sequence[float]) -> list[float]:
        return [float(v) for v in sigmas]  # the time is σ itself: nothing to look up

    def dsigma_dt(self, t: float) -> float:
        return 1.0

    def _time(self, sigma: float) -> float:
        return sigma

    def _sigma(self, t: float) -> float:
        return t

    def to_state(self, xbar: Tensor, sigma: float) -> Tensor:
        return xbar

    def to_xbar(self, y: Tensor, t: float) -> Tensor:
        return y

    def field(self, eps: EpsField) -> VectorField:
        return eps

    def denoised(self, t: float, y: Tensor, state: Any) -> Tensor | None:
        if isinstance(state, Derivative) and state.t == t:
            return y - state.k * t
        return None


class OutOfInfinity(Solver):
    """The step from σ = ∞ (pure noise, the state is the noise x) to σ₁: Euler's limit there,
    x̄₁ = x̂₀ + σ₁·ε̂ with ε̂ = the noise and x̂₀ = ``f(∞, x)`` (one evaluation), in ``form``'s state.

    For DDIM this is its first step on a zero-terminal-SNR grid: x_{t₁} = √ᾱ₁·x̂₀ + √(1−ᾱ₁)·ε̂.
    The carried state is dropped: the grid's own solver starts afresh at σ₁."""

    name = "euler_from_noise"
    order = 1

    def __init__(self, form: Formulation) -> None:
        self.form = form

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        sigma1 = self.form.sigma(t1)
        xbar1 = f(t0, y0).add(y0, alpha=sigma1) if sigma1 > 0.0 else f(t0, y0)
        return StepResult(self.form.to_state(xbar1, sigma1), None)


def data_field(eps: EpsField, sigma_of: Callable[[float], float] | None = None) -> VectorField:
    """``f(ρ, y) = D(x̄, σ)`` with σ = 1/ρ, x̄ = y/ρ: the data-prediction ODE (ρ > 0).

    At ρ = ∞ (σ = 0) the state is x̄ itself and ``f`` returns ε(x̄, 0): what the Euler step
    out of σ = 0 needs (:class:`Data`). At ρ = 0 (σ = ∞) the state is the noise and ``f``
    returns ``eps(∞, noise)``, the denoised image there (:class:`OutOfInfinity`). ``sigma_of(ρ)``
    maps times back to σ (a grid's own σ exactly, :meth:`Formulation.sigma`); default 1/ρ.

    Where ``eps`` carries its own ``eps.denoised(σ, x̄)`` (:func:`flowdiff.engine.flow.with_denoised`: a
    :meth:`flowdiff.ProbabilityFlow.field`, not a wrapper of one that copied the attribute), D is read off the
    model's own prediction: x̄ − σ·ε cancels at large σ and loses ε's rounding times σ (v-prediction in float32)."""
    denoised = own_denoised(eps)  # not a wrapper's copied (functools.wraps) or forwarded one: that is not its D

    def f(rho: float, y: Tensor) -> Tensor:
        if rho == math.inf:
            return eps(0.0, y)
        if rho == 0.0:
            return eps(math.inf, y)
        sigma = 1.0 / rho if sigma_of is None else sigma_of(rho)
        xbar = y * sigma
        if denoised is not None:
            return denoised(sigma, xbar)
        return xbar - sigma * eps(sigma, xbar)

    return f


def _limit(state: Any, rho: float, denoised_here: Callable[[], Tensor], extrapolate: bool) -> tuple[Tensor, int]:
    """x̄(0) from the denoised value at ρ (carried in ``state`` or evaluated by ``denoised_here``)."""
    pairs: list[tuple[float, Tensor]] = []
    if isinstance(state, Derivative):
        pairs = [(state.t, state.k), *getattr(state, "past", ())]
    spent = 0
    if not pairs or pairs[0][0] != rho:
        pairs.insert(0, (rho, denoised_here()))
        spent = 1
    d1 = pairs[0][1]
    if not extrapolate or len(pairs) < 2 or not pairs[1][0] < rho:
        return d1, spent
    s1, s2 = 1.0 / rho, 1.0 / pairs[1][0]
    return d1 + (d1 - pairs[1][1]) * (s1 * s1 / (s2 * s2 - s1 * s1)), spent


def finish_at_zero(state: Any, sigma_last: float, xbar_last: Tensor, eps: EpsField, *,
                   extrapolate: bool = False) -> tuple[Tensor, int]:
    """The image x̄(0) from the data-variables state at σ_last > 0, and the evaluations spent.

    Along a trajectory dD/dσ = −σ·dε/dσ vanishes at σ = 0, so D(x̄(σ), σ) = x̄(0) + O(σ²):
    the last denoised value alone is the image of DDIM's, DPM-Solver++'s and UniPC's last
    step. With the previous denoised value D₂ at σ₂ too (a multistep history), the O(σ²)
    term is removed (``extrapolate=True``; the adaptive solves use it) by extrapolating in σ² to 0:

        x̄(0) ≈ D₁ + σ₁²/(σ₂² − σ₁²)·(D₁ − D₂).

    A history holding D at ρ = 1/σ_last is reused (no evaluation); otherwise D is evaluated once.
    """
    return _limit(state, 1.0 / sigma_last, lambda: xbar_last - sigma_last * eps(sigma_last, xbar_last), extrapolate)


class IntoZero(Solver):
    """The data variables' step from ρ to ρ = ∞ (σ = 0): the image is the last denoised value,
    extrapolated in σ² with ``extrapolate`` (:func:`finish_at_zero`); the state becomes x̄."""

    name = "denoised_limit"
    order = 2

    def __init__(self, extrapolate: bool = False) -> None:
        self.extrapolate = extrapolate

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        image, _ = _limit(state, t0, lambda: f(t0, y0), self.extrapolate)
        return StepResult(image, None)


class OutOfZero(Solver):
    """The data variables' step from ρ = ∞ (σ = 0) to σ₁: Euler in σ (DDIM), x̄₁ = x̄₀ + σ₁·ε(x̄₀, 0)."""

    name = "euler_from_zero"
    order = 1

    def __init__(self, sigma1: float) -> None:
        self.sigma1 = sigma1

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        xbar = y0 + self.sigma1 * f(t0, y0)
        return StepResult(xbar / self.sigma1, None)


class Data(Formulation):
    """t = ρ = 1/σ, y = x̄/σ, f = D (see the module docstring); σ = 0 is ρ = ∞ with y = x̄.

    ``reach`` (encoding and a latent's decode): a multistep step of length h in λ = log ρ uses
    the j-th past derivative only while its distance from the step's start in λ is at most
    ``reach·j·|h|`` and, for j ≥ 2, at least ``j·|h|/reach`` (and the nearer ones' are);
    otherwise the step is taken at the lower order its history allows
    (:meth:`solvers.Adams.limited`). A step longer than :data:`LONG_STEP` in λ is the
    first-order step (DDIM's), without a corrector. An encode's last step (into σ_max) is the
    predictor alone: its corrector would cost an evaluation at σ_max that nothing else uses
    (:func:`encode_evaluates_end`), so that ``steps=N`` costs N evaluations both ways.
    An encode's first steps out of σ = 0 span
    many units of λ on some grids (the leading grid's σ_min → σ₂): a polynomial through them
    extrapolated over the next, much shorter step overshoots; a decode's last step on that
    grid is the same long step, over which a quadratic through the short steps before it
    overshoots. This is where third-order and corrector methods lost their order in
    round trips (dpmpp_3m's leading-grid round trip on the shipped model: MSE 1.6).
    """

    name = "data"
    time_name = "1/σ"

    def __init__(self, reach: float | None = None) -> None:
        super().__init__()
        if reach is not None and not (math.isfinite(reach) and reach >= 1):
            raise ValueError(f"reach must be a finite number >= 1 or None, got {reach!r}")
        self.reach = reach

    def _time(self, sigma: float) -> float:
        return math.inf if sigma == 0.0 else 1.0 / sigma

    def _sigma(self, t: float) -> float:
        return 0.0 if t == math.inf else math.inf if t == 0.0 else 1.0 / t

    def dsigma_dt(self, t: float) -> float:
        s = self.sigma(t)
        return -s * s  # σ = 1/ρ

    def to_state(self, xbar: Tensor, sigma: float) -> Tensor:
        return xbar if sigma == 0.0 else xbar / sigma

    def to_xbar(self, y: Tensor, t: float) -> Tensor:
        return y if t == math.inf else y / t

    def field(self, eps: EpsField) -> VectorField:
        return data_field(eps, self.sigma)

    def x_factor(self, t: float) -> float:
        return 1.0 if t == math.inf else 1.0 / math.sqrt(1.0 + t * t)

    def denoised(self, t: float, y: Tensor, state: Any) -> Tensor | None:
        if t == math.inf:
            return y
        if isinstance(state, Derivative) and state.t == t:
            return state.k
        return None

    def grid(self, sigmas: Sequence[float], solver: Solver, *, eval_end: bool = True,
             extrapolate: bool = False) -> FixedGrid:
        ts = self.times(sigmas)
        methods: dict[int, Solver] = {}
        if sigmas[0] == 0.0:
            methods[0] = OutOfZero(float(sigmas[1]))
        if sigmas[-1] == 0.0:
            methods[len(ts) - 2] = IntoZero(extrapolate)
        elif getattr(solver, "final_method", None) is not None:  # e.g. dpmpp_2m's lower_order_final
            methods[len(ts) - 2] = solver.final_method
        limited = getattr(solver, "limited", None)
        if self.reach is not None and limited is not None:
            encode_end = len(ts) - 2 if sigmas[-1] > sigmas[0] else None
            for i, n in enumerate(near_history(ts, self.reach)):
                long_step = (0 < ts[i] < math.inf and 0 < ts[i + 1] < math.inf
                             and abs(math.log(ts[i] / ts[i + 1])) > LONG_STEP)
                corrector = not long_step and i != encode_end  # see encode_evaluates_end
                if i not in methods and (n < solver.steps_order or not corrector):
                    methods[i] = limited(1 if long_step else n, corrector=corrector)
        return self._fixed(sigmas, ts, methods)


#: A step longer than this in λ = log ρ (encode, or a latent's decode) is taken at first order
#: without a corrector (DDIM's step): over such a step (the leading grid's σ_min ↔ σ₂ spans
#: 3.5) the denoised image changes little and then fast, and a polynomial through the
#: neighbouring derivatives is worse than the constant. Measured on the shipped model, 10
#: steps on the leading grid: the decode's MSE fell from 9.5e-2 to 1.6e-2 for dpmpp_3m.
LONG_STEP = 2.5


def near_history(ts: Sequence[float], reach: float) -> list[int]:
    """For each step ``i`` of the ρ grid ``ts``: how many derivatives (the one at ``ts[i]`` and
    the past ones, newest first) lie within ``reach·j·|h|`` of ``ts[i]`` in log ρ and, from the
    second past one on, beyond ``j·|h|/reach`` (see :class:`Data`): neither so far back nor so
    close that a curved polynomial through them is extrapolated far beyond their spread."""
    lam = [math.log(t) if 0 < t < math.inf else None for t in ts]
    counts = []
    for i in range(len(ts) - 1):
        n = 1
        if lam[i] is not None and lam[i + 1] is not None:
            h = abs(lam[i + 1] - lam[i])
            j = 1
            while (i - j >= 0 and lam[i - j] is not None
                   and abs(lam[i] - lam[i - j]) <= reach * j * h
                   and (j == 1 or j * h / reach <= abs(lam[i] - lam[i - j]))):
                n += 1
                j += 1
        counts.append(n)
    return counts


class LogSigma(Formulation):
    """t = τ = log(σ + c), y = x̄, f = (σ + c)·ε; σ = 0 is τ = log c (τ = −∞ when c = 0)."""

    name = "logsigma"
    time_name = "log(σ+c)"
    state_is_xbar = True

    def __init__(self, c: float) -> None:
        super().__init__()
        if not (math.isfinite(c) and c >= 0):
            raise ValueError(f"the c of log(σ + c) must be a finite number >= 0, got {c!r}")
        self.c = float(c)
        self.tau_zero = math.log(c) if c > 0 else -math.inf

    def _time(self, sigma: float) -> float:
        return math.log(sigma + self.c) if sigma + self.c > 0 else -math.inf

    def _sigma(self, t: float) -> float:
        return 0.0 if t <= self.tau_zero else max(math.exp(t) - self.c, 0.0)

    def dsigma_dt(self, t: float) -> float:
        return self.sigma(t) + self.c  # σ + c = e^τ

    def to_state(self, xbar: Tensor, sigma: float) -> Tensor:
        return xbar

    def to_xbar(self, y: Tensor, t: float) -> Tensor:
        return y

    def field(self, eps: EpsField) -> VectorField:
        sigma_of, c = self.sigma, self.c

        def f(tau: float, xbar: Tensor) -> Tensor:
            sigma = sigma_of(tau)
            return eps(sigma, xbar) * (sigma + c)

        return f

    def denoised(self, t: float, y: Tensor, state: Any) -> Tensor | None:
        if isinstance(state, Derivative) and state.t == t:  # FSAL: f(t₁, y₁) = (σ + c)·ε
            s = self.sigma(t)
            return y - state.k * (s / (s + self.c))
        return None


class EulerToZero(Solver):
    """In t = log σ (c = 0): the Euler step in σ from σ₀ into σ = 0 (τ = −∞), x̄ − σ₀·ε = x̄ − f(τ₀, x̄)."""

    name = "euler_to_zero"
    order = 1

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        return StepResult(y0 - f(t0, y0), None)


class VP(Formulation):
    """t = τ = log(1 + σ), y = x = x̄/√(1+σ²): dx/dτ = (1 + σ)·(ε(x·c, σ) − σx/c)/c, c = √(1+σ²).

    No division by σ (exact at σ = 0, where x = x̄); |x| stays O(1) at every σ and at large σ,
    where ε ≈ x̄/σ, the field is nearly zero. Steps are additive in σ below 1 and relative above.
    """

    name = "vp"
    time_name = "log(1+σ)"

    def _time(self, sigma: float) -> float:
        return math.log1p(sigma)

    def _sigma(self, t: float) -> float:
        return max(math.expm1(t), 0.0)

    def dsigma_dt(self, t: float) -> float:
        return 1.0 + self.sigma(t)  # 1 + σ = e^τ

    def to_state(self, xbar: Tensor, sigma: float) -> Tensor:
        return xbar / math.sqrt(1.0 + sigma * sigma)

    def to_xbar(self, y: Tensor, t: float) -> Tensor:
        s = self.sigma(t)
        return y * math.sqrt(1.0 + s * s)

    def x_factor(self, t: float) -> float:
        return 1.0

    def field(self, eps: EpsField) -> VectorField:
        sigma_of = self.sigma

        def f(tau: float, x: Tensor) -> Tensor:
            s = sigma_of(tau)
            if s == math.inf:  # pure noise: the denoised image there (OutOfInfinity)
                return eps(s, x)
            c = math.sqrt(1.0 + s * s)
            return (eps(s, x * c) - x * (s / c)) / c * (1.0 + s)

        return f


class FlowMatching(Formulation):
    """t = σ/(1+σ), y = x̄/(1+σ) = x, f = dy/dt = (1+σ)·(ε(x̄, σ) − y): rectified flow's time, sample and
    velocity v = ε − x̂₀ (x = (1−t)·x̂₀ + t·ε̂). Since dy/dσ = (ε − y)/(1+σ) and dt/dσ = 1/(1+σ)².

    σ = ∞ is t = 1, a finite time: there y is the noise and v = y − x̂₀ with x̂₀ read off the model
    (the field extended to σ = ∞, :mod:`flowdiff.engine.terminal`), so a Runge–Kutta step leaves
    pure noise with its own stages (diffusers' flow-matching Heun does), not by a boundary step.
    """

    name = "flow_matching"
    time_name = "t"

    def _time(self, sigma: float) -> float:
        return 1.0 if sigma == math.inf else sigma / (1.0 + sigma)

    def _sigma(self, t: float) -> float:
        return math.inf if t >= 1.0 else t / (1.0 - t)

    def dsigma_dt(self, t: float) -> float:
        return (1.0 + self.sigma(t)) ** 2

    def to_state(self, xbar: Tensor, sigma: float) -> Tensor:
        if sigma == math.inf:
            raise ValueError("at σ = ∞ (t = 1) the flow-matching state is the noise itself, not x̄/(1+σ)")
        return xbar / (1.0 + sigma)

    def to_xbar(self, y: Tensor, t: float) -> Tensor:
        return y * (1.0 + self.sigma(t))

    def x_factor(self, t: float) -> float:
        s = self.sigma(t)
        return 1.0 if s == math.inf else (1.0 + s) / math.sqrt(1.0 + s * s)

    def field(self, eps: EpsField) -> VectorField:
        sigma_of = self.sigma

        def f(t: float, y: Tensor) -> Tensor:
            s = sigma_of(t)
            if s == math.inf:  # pure noise: eps(∞, noise) is x̂₀ there
                return y - eps(s, y)
            c = 1.0 + s
            return (eps(s, y * c) - y) * c

        return f

    def denoised(self, t: float, y: Tensor, state: Any) -> Tensor | None:
        if isinstance(state, Derivative) and state.t == t:
            return y - state.k * t  # x̂₀ = x − t·v
        return None

    def grid(self, sigmas: Sequence[float], solver: Solver, *, eval_end: bool = True) -> FixedGrid:
        """The grid's times are finite (σ = ∞ is t = 1): every step, the first included, is the solver's."""
        ts = self.times(sigmas)
        return FixedGrid(ts, final_step_methods(solver, len(ts) - 1, eval_end))


#: Solvers refused for encoding (registry name → why, and what to use instead).
_NO_ENCODE: dict[str, str] = {
    "ipndm": "its equal-step Adams coefficients ignore the step ratios, and an encode's steps grow "
             "geometrically in σ (shrink in 1/σ), so it loses its order and can diverge; use 'lms' "
             "(variable-step Adams of the same order) or 'dpmpp_3m' to encode",
}

def encode_refusal(solver_name: str) -> str | None:
    """Why the solver registered as ``solver_name`` is refused for encoding, or None if it encodes."""
    return _NO_ENCODE.get(solver_name)


def encode_evaluates_end(solver: Solver) -> bool:
    """Whether a fixed-grid encode with ``solver`` evaluates the field at its last σ (σ_max).

    Runge–Kutta methods whose last stage lies at a step's end do (``solver.evaluates_end``). A
    multistep predictor–corrector method (``unipc``, ``abm``) does not: in an encode (:class:`Data`)
    its last step is the predictor alone, since that evaluation would serve only the last
    corrector, one more than ``steps=N`` says (one step of one order lower keeps the solve's
    order). An encode's ``nfe=`` budget is counted with ``eval_end`` set to this.
    """
    return solver.evaluates_end and getattr(solver, "limited", None) is None


#: The :class:`Data` ``reach`` of multistep encodes (see there); measured on the shipped model
#: and closed-form Gaussians (benchmarks/bench_roundtrip.py).
ENCODE_REACH = 3.0


def formulation_for(solver: Solver, direction: str, *, adaptive: bool = False,
                    sigma_c: float | None = None, augmented: bool = False) -> Formulation:
    """The variables ``solver`` runs in for a ``direction`` (``"generate"``/``"encode"``/``"decode"``).

    An augmented solve (``augmented=True``: extra columns beside x̄, such as the likelihood's
    log-density, :meth:`Formulation.augmented_field`), adaptive or on a fixed grid:
    :class:`LogSigma` with ``sigma_c``, whose state is x̄ itself and whose time makes steps relative
    where σ ≫ c and reaches σ = 0 at the finite τ = log c (a fixed grid there is uniform in τ,
    :meth:`Formulation.uniform_grid`, so the encode's σ-step-ratio concerns below do not arise). A
    method built for the data variables is refused: their state x̄/σ carries no extra column.
    Reversible solvers: :class:`VP` (their exact inverse keeps rounding at the state's scale).
    Encoding on a fixed grid, every multistep method: :class:`Data` with ``reach``
    (:data:`ENCODE_REACH`); a latent's decode with a data-variables method too (``generate``
    is unchanged: it keeps its steps bit for bit). An encode runs away from σ = 0 with steps that grow geometrically
    in σ; Adams methods in σ (lms, abm) extrapolate over ever longer steps and diverge there
    (|x_T| ~ 1e3 on the shipped model), whereas in ρ = 1/σ the same steps shrink, as a
    generation's do in σ, and the field (the denoised image) stays bounded. A solver that
    cannot encode at its order (iPNDM, whose equal-step coefficients ignore step ratios) is
    refused with a ValueError saying what to use instead.
    Methods declared for rectified flow's variables (:func:`prefer_variables` with
    ``"flow_matching"``): :class:`FlowMatching`, on fixed grids only.
    Methods built for the data-prediction ODE (:func:`variables_of`): :class:`Data`. Other
    adaptive solves: :class:`LogSigma` with ``sigma_c`` (relative steps, σ = 0 at a finite
    time). Everything else: :class:`Sigma`.
    """
    if direction not in ("generate", "encode", "decode"):
        raise ValueError(f"direction must be 'generate', 'encode' or 'decode', got {direction!r}")
    if augmented:
        if variables_of(solver) != "sigma":
            raise ValueError(f"solver {solver.name!r} runs in the flow's {variables_of(solver)!r} variables, which "
                             "carry no column beside x̄ (such as the likelihood's log-density); use a σ-variable "
                             "solver, e.g. dopri5, bosh3, rk4, heun, ipndm")
        if sigma_c is None:
            raise ValueError("an augmented solve in log(σ + c) needs sigma_c")
        return LogSigma(sigma_c)
    if solver.reversible:
        return VP()
    if variables_of(solver) == "flow_matching":
        if adaptive:
            raise ValueError(f"solver {solver.name!r} runs in flow-matching variables on a fixed grid (a "
                             "scheduler's loop); an adaptive solve runs in log(σ + c): use e.g. 'heun' or 'dopri5'")
        return FlowMatching()
    if direction in ("encode", "decode") and not adaptive:
        refusal = _NO_ENCODE.get(method_of(solver).name) if direction == "encode" else None
        if refusal is not None:
            raise ValueError(f"solver {solver.name!r} cannot encode: {refusal}")
        if solver.multistep and (direction == "encode" or variables_of(solver) == "data"):
            return Data(reach=ENCODE_REACH)
    if variables_of(solver) == "data":
        return Data()
    if adaptive:
        if sigma_c is None:
            raise ValueError("an adaptive solve in log(σ + c) needs sigma_c")
        return LogSigma(sigma_c)
    return Sigma()
