"""Linear multistep methods on variable grids: Adams–Bashforth, Adams–Moulton correctors, iPNDM.

An Adams method advances ``y`` by the integral of a polynomial through the last few
derivatives ``k_j = f(t_j, y_j)``:

    y₁ = y₀ + ∫_{t₀}^{t₁} P(u(t)) dt,   P(u_j) = k_j,

with the polynomial in ``u = t`` (classic Adams; on a variable grid its weights change
every step) or in ``u = log|t|`` ("log time"). The second is the exponential-integrator
family in disguise: for ``dy/dρ = D`` with ``ρ = e^λ``, a polynomial in λ integrated exactly
against ``dρ = e^λ dλ`` gives the φ-function weights of DPM-Solver++ (Lu et al.,
"DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models", 2022)
and of UniPC (Zhao et al., "UniPC: A Unified Predictor-Corrector Framework", 2023). Nothing
here knows that; the caller chooses the variables (flowdiff does, see
``flowdiff.formulations``).

A step costs one evaluation: ``f(t₀, y₀)`` (or, in predict–evaluate–correct mode, ``f(t₁, ỹ₁)``
at the predicted point, which the next step reuses as its ``k₀`` — the corrector is free).
The first steps use the history they have (order 1, 2, … up to ``order``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
from torch import Tensor

from ._base import Derivative, Solver, StepResult, VectorField, check_carried_tensor
from ._registry import register

# Gauss–Legendre nodes on [0, 1]: exact for the polynomial weights in linear time, and
# accurate to ~1e-16 for polynomial × exponential over a log-time step of length up to ~10.
_GL_X, _GL_W = np.polynomial.legendre.leggauss(20)
_GL_X = 0.5 * (_GL_X + 1.0)
_GL_W = 0.5 * _GL_W


def adams_weights(nodes: Sequence[float], t0: float, t1: float, *, log_time: bool = False,
                  warp: Callable[[np.ndarray], np.ndarray] | None = None) -> list[float]:
    """``w_j = ∫_{t₀}^{t₁} ℓ_j(u(t)) dt`` for the Lagrange basis ``ℓ_j`` on ``nodes`` in ``u``.

    ``u = t``, or ``u = log|t|`` with ``log_time`` (all times then share one sign and are
    non-zero), or ``u = warp(t)`` with ``warp`` (a strictly monotone function applied to float64
    arrays; all times positive). ``y₀ + Σ w_j k_j`` is the Adams step through the derivatives
    ``k_j`` at ``nodes``. Computed in float64 by 20-point Gauss–Legendre quadrature (in log t
    for a warp). Where ``log|t|`` is undefined (a time is 0, or the times change sign) the
    polynomial is taken in ``t``.
    """
    if warp is not None:
        if not all(t > 0 for t in (*nodes, t0, t1)):
            raise ValueError(f"adams_weights: a warp needs positive times, got nodes {list(nodes)}, "
                             f"t0={t0!r}, t1={t1!r}")
        la, lb = math.log(t0), math.log(t1)
        tq = np.exp(la + _GL_X * (lb - la))
        uq = np.asarray(warp(tq), dtype=np.float64)
        u_nodes = np.asarray(warp(np.asarray(nodes, dtype=np.float64)), dtype=np.float64)
        dq = _GL_W * (lb - la) * tq  # dt = t d(log t)
        return _lagrange_integrals(u_nodes, uq, dq)
    if log_time and not _log_defined((*nodes, t0, t1)):
        log_time = False
    if log_time:
        sign = math.copysign(1.0, t0)
        ua, ub = math.log(abs(t0)), math.log(abs(t1))
        u_nodes = np.log(np.abs(np.asarray(nodes, dtype=np.float64)))
        uq = ua + _GL_X * (ub - ua)
        dq = _GL_W * (ub - ua) * sign * np.exp(uq)  # dt = t du
    else:
        u_nodes = np.asarray(nodes, dtype=np.float64)
        uq = t0 + _GL_X * (t1 - t0)
        dq = _GL_W * (t1 - t0)
    return _lagrange_integrals(u_nodes, uq, dq)


def _lagrange_integrals(u_nodes: np.ndarray, uq: np.ndarray, dq: np.ndarray) -> list[float]:
    """Σ_q ℓ_j(u_q)·dq_q for each Lagrange basis polynomial ℓ_j on ``u_nodes``: the quadrature of the weights."""
    weights = []
    for j in range(len(u_nodes)):
        basis = np.ones_like(uq)
        for m in range(len(u_nodes)):
            if m != j:
                basis *= (uq - u_nodes[m]) / (u_nodes[j] - u_nodes[m])
        weights.append(float(np.dot(basis, dq)))
    return weights


def _log_defined(times: Sequence[float]) -> bool:
    return all(t > 0 for t in times) or all(t < 0 for t in times)


#: Adams–Bashforth coefficients for equal steps, newest derivative first (iPNDM's multipliers).
_AB_EQUAL = (
    (1.0,),
    (3 / 2, -1 / 2),
    (23 / 12, -16 / 12, 5 / 12),
    (55 / 24, -59 / 24, 37 / 24, -9 / 24),
)


class History(Derivative):
    """The carried state of a multistep method: the newest derivative ``(t, k)`` as a
    :class:`Derivative` (so a following Runge–Kutta step reuses it), plus the older ones in
    ``past`` (newest first, ``(t, k)`` pairs). Build one with :meth:`of`; ``made_by`` records the method that
    made it (:attr:`Solver.state_maker`)."""

    # A NamedTuple subclass without __slots__ has an instance dict: ``past`` lives there.
    past: tuple[tuple[float, Tensor], ...]

    @classmethod
    def of(cls, t: float, k: Tensor, past: tuple[tuple[float, Tensor], ...], made_by: str | None = None) -> History:
        h = cls(t, k, made_by)
        h.past = past
        return h

    def newest(self, n: int) -> tuple[list[float], list[Tensor]]:
        """The newest ``n`` times and derivatives (fewer if the history is shorter), newest first."""
        pairs = [(self.t, self.k), *self.past][:n]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def _history_at(f: VectorField, t0: float, y0: Tensor, state: Any, keep: int, maker: str) -> History:
    """The history with ``k₀ = f(t₀, y₀)`` newest: reused when the state already holds it
    (a corrector's evaluation, or a driver's first evaluation), evaluated otherwise. A new one records ``maker``."""
    if isinstance(state, Derivative) and state.t == t0:
        return state if isinstance(state, History) else History.of(state.t, state.k, (), maker)
    past: tuple[tuple[float, Tensor], ...] = ()
    if isinstance(state, History):
        past = ((state.t, state.k), *state.past)[: keep - 1]
    return History.of(t0, f(t0, y0), past, maker)


def _check_history(solver: Solver, state: History, t0: float, y0: Tensor, t1: float | None, name: str) -> None:
    """A multistep method's ``state=`` (of its type and maker, checked before): its derivatives of ``y0``'s shape and
    dtype, and, where the solve's direction is known (towards ``t1``), none ahead of its start ``t0`` (the newest may
    lie at ``t0``: a corrector's): a history of a solve the other way would be extrapolated from."""
    past = getattr(state, "past", None)
    if not isinstance(past, tuple) or not all(isinstance(p, tuple) and len(p) == 2 for p in past):
        raise TypeError(f"{name} is a solvers.History without its older derivatives (past, a tuple of (t, k) pairs); "
                        f"build one with History.of(t, k, past), got past={type(past).__name__}")
    check_carried_tensor(state.k, y0, f"{name}.k")
    for i, (_, k) in enumerate(past):
        check_carried_tensor(k, y0, f"{name}.past[{i}]")
    if t1 is None or t1 == t0:
        return
    times = [state.t, *(t for t, _ in past)]
    ahead = [t for i, t in enumerate(times) if (t1 - t0) * (t0 - t) < 0 or (i > 0 and t == t0)]
    if ahead:
        raise ValueError(f"{name} holds derivatives at t={ahead}, ahead of the solve's start t={t0!r} in its "
                         f"direction (towards t={t1!r}): solver {solver.name!r} extrapolates from the past of the "
                         f"solve, so this state comes from a solve the other way (or another); pass {name}=None")


def _combine(y0: Tensor, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    out = y0
    for w, k in zip(weights, ks):
        out = out.add(k, alpha=w)
    return out


class _CarriesHistory(Solver):
    """A multistep method: it carries a :class:`History` of its derivatives from step to step, and takes one back as a
    solve's ``state=`` (:class:`Adams`, :class:`IPNDM`, :class:`CorrectedAdams`)."""

    state_type: ClassVar[type | None] = History

    def check_carried(self, state: Any, t0: float, y0: Tensor, t1: float | None = None, *,
                      name: str = "state") -> None:
        """:meth:`Solver.check_carried`, and the history's derivatives: of ``y0``'s shape and dtype, none ahead of
        the solve's start in its direction (towards ``t1``)."""
        super().check_carried(state, t0, y0, t1, name=name)
        if state is not None:
            _check_history(self, state, t0, y0, t1, name)




class Adams(_CarriesHistory):
    """Variable-step Adams–Bashforth of ``order`` (``order`` derivatives, newest first).

    ``log_time`` interpolates the derivatives in ``log|t|`` instead of ``t`` (see the module
    docstring). ``corrector`` turns the step into predict–evaluate–correct (PEC): the
    Adams–Bashforth prediction ``ỹ₁`` is evaluated, ``k₁ = f(t₁, ỹ₁)``, and the Adams–Moulton
    formula through ``k₁`` and the last ``order`` derivatives gives ``y₁`` (order + 1); the
    difference ``y₁ − ỹ₁`` is Milne's estimate of the local error, so the method is adaptive
    at one evaluation per step. ``k₁`` is kept and reused as the next step's ``k₀``.

    ``order`` is the order of the formula (reached by adaptive solves, whose first steps are
    small); a self-started fixed-grid solve is limited by its lower-order first steps to
    ``fixed_grid_order`` (2 for Adams–Bashforth, 3 in PEC mode), as k-diffusion's lms is.

    Log-time weights next to t = 0 interpolate across O(1) spans of log|t|, so by default a solve
    whose interval touches or crosses 0 takes the polynomial in t throughout (:meth:`on_interval`).
    ``log_time_by_step`` decides step by step instead: every step whose nodes and ends lie on one
    side of 0 takes the log-time weights, a step touching 0 the polynomial in t. That is DEIS's
    method (a field smooth in log t); on a field smooth in t only it costs the PEC mode an order
    next to 0, while Adams–Bashforth of order ≥ 3 keeps its fixed-grid order 2 (see ``solvers._deis``).
    """

    multistep: ClassVar[bool] = True

    def __init__(self, name: str, order: int, *, log_time: bool = False, corrector: bool = False,
                 log_time_by_step: bool = False) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
            raise ValueError(f"solver {name!r}: order must be an int in 1..4, got {order!r}")
        if not isinstance(log_time_by_step, bool):
            raise TypeError(f"solver {name!r}: log_time_by_step must be True or False, got {log_time_by_step!r}")
        if log_time_by_step and not log_time:
            raise ValueError(f"solver {name!r}: log_time_by_step=True decides where the log-time weights apply, "
                             "and log_time is False; pass log_time=True with it, or neither")
        self.name = name  # type: ignore[misc]
        self.steps_order = order
        self.order = order + 1 if corrector else order  # type: ignore[misc]
        self.log_time = log_time
        self.log_time_by_step = log_time_by_step
        self.corrector = corrector
        self.adaptive = corrector  # type: ignore[misc]
        self.evaluates_end = corrector  # type: ignore[misc]
        self.error_order = order
        self.fixed_grid_order = min(self.order, 3 if corrector else 2)
        #: ``(warp, t_from)`` of :meth:`warped`, or None
        self.warp: tuple[Callable[[np.ndarray], np.ndarray], float] | None = None
        flags = "".join(f", {flag}=True" for flag, on in (("log_time", log_time), ("corrector", corrector),
                                                             ("log_time_by_step", log_time_by_step)) if on)
        #: what its carried states record of it (kept by its lower-order forms, :meth:`limited`, :meth:`on_interval`)
        self._maker_options = f"(order={order}{flags})"

    def maker_options(self) -> str:
        return self._maker_options

    def warped(self, warp: Callable[[np.ndarray], np.ndarray], t_from: float) -> Adams:
        """The same method with its derivatives interpolated in ``u = warp(t)`` (see :func:`adams_weights`)
        on the steps whose nodes and ends all lie at ``t ≥ t_from > 0``; elsewhere as before. A caller that
        knows along which variable its derivative is nearly polynomial there says so here (flowdiff: the
        denoised image near σ = 0, see ``flowdiff.api.adaptive``). Same order and cost."""
        if not callable(warp):
            raise TypeError(f"solver {self.name!r}: warp must be a function of t, got {type(warp).__name__}")
        if isinstance(t_from, bool) or not isinstance(t_from, (int, float)) or not (
                math.isfinite(t_from) and t_from > 0):
            raise ValueError(f"solver {self.name!r}: t_from must be a finite number > 0, got {t_from!r}")
        out = copy.copy(self)
        out.warp = (warp, float(t_from))
        return out

    def _warp_for(self, times: Sequence[float]) -> Callable[[np.ndarray], np.ndarray] | None:
        if self.warp is None or min(times) < self.warp[1]:
            return None
        return self.warp[0]

    def _predict_weights(self, ts: list[float], t0: float, t1: float) -> list[float]:
        return adams_weights(ts, t0, t1, log_time=self.log_time, warp=self._warp_for((*ts, t0, t1)))

    def limited(self, derivatives: int, *, corrector: bool | None = None) -> Adams:
        """The same method through at most ``derivatives`` past derivatives (a lower order for
        one step: where the history lies too far back for its polynomial to extrapolate), and
        without its corrector with ``corrector=False`` (a step too long for the interpolant)."""
        corrector = self.corrector if corrector is None else corrector and self.corrector
        if derivatives >= self.steps_order and corrector == self.corrector:
            return self
        out = Adams(self.name, min(derivatives, self.steps_order), log_time=self.log_time, corrector=corrector,
                    log_time_by_step=self.log_time_by_step)
        out.warp = self.warp
        out._maker_options = self._maker_options  # its states continue this method
        return out

    def on_interval(self, t0: float, t1: float) -> Adams:
        """Log-time weights only on an interval away from t = 0. On one that crosses or touches 0, steps next to
        it would interpolate across O(1) spans of log|t| and lose an order (UniPC's 3 fell to 2 on [−1, 1]):
        there the whole solve uses the polynomial in t, classic Adams of the same order and the same cost.
        With ``log_time_by_step`` the method is kept: its steps choose their own weights (:func:`adams_weights`)."""
        if not self.log_time or self.log_time_by_step or min(t0, t1) > 0 or max(t0, t1) < 0:
            return self
        in_t = copy.copy(self)
        in_t.log_time = False
        return in_t

    def step_cost(self, t0: float, state: Any) -> int:
        """``f(t₀, y₀)`` unless the state holds it, plus the corrector's evaluation at the predicted point."""
        return (0 if isinstance(state, Derivative) and state.t == t0 else 1) + (1 if self.corrector else 0)

    def error_order_at(self, t0: float, state: Any) -> int:
        """The order of the predictor of the step from ``t0`` with carried ``state``: the number of derivatives
        it is built on (1 for the first step, 2 for the second, …), up to ``steps_order`` (the order the method
        was made with; in PEC mode ``order`` is one more).
        Milne's estimate of that step is the predictor's local error, O(hⁿ⁺¹). No evaluation; a
        :class:`solvers.StepController` with ``startup_order=True`` asks it before each step."""
        if isinstance(state, History):
            held = 1 + len(state.past) + (0 if state.t == t0 else 1)  # f(t₀, y₀) is added when not held
        elif isinstance(state, Derivative):
            held = 1 if state.t == t0 else 2
        else:
            held = 1
        return min(held, self.steps_order)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        hist = _history_at(f, t0, y0, state, self.steps_order, self.state_maker)
        ts, ks = hist.newest(self.steps_order)
        y_pred = _combine(y0, self._predict_weights(ts, t0, t1), ks)
        if not self.corrector:
            return StepResult(y_pred, hist, None)
        k1 = f(t1, y_pred)
        nodes = [t1, *ts]
        y1 = _combine(y0, adams_weights(nodes, t0, t1, log_time=self.log_time, warp=self._warp_for((*nodes, t0))),
                      [k1, *ks])
        return StepResult(y1, History.of(t1, k1, tuple(zip(ts, ks)), self.state_maker), y1 - y_pred)


class DPMSolverPP2M(Adams):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) for ``dy/dρ = D``: the step

        y₁ = y₀ + (ρ₁ − ρ₀)·[(1 + 1/(2r))·D₀ − 1/(2r)·D₋₁],   r = (λ₀ − λ₋₁)/(λ₁ − λ₀),  λ = log ρ.

    A second-order two-step method whose extrapolation is linear in λ but, unlike the exact
    log-time Adams weights, integrated with the midpoint rule. This is k-diffusion's
    ``sample_dpmpp_2m`` in the variables y = x̄/σ, ρ = 1/σ.

    ``lower_order_final`` (default False): the last step of a fixed grid is first order
    (``final_method``, the one-derivative step: DPM-Solver++(1), i.e. DDIM), as diffusers'
    ``DPMSolverMultistepScheduler`` takes it with ``lower_order_final`` below 15 steps or
    ``euler_at_final``. ``order=1`` takes every step so: DPM-Solver++(1),
    ``y₁ = y₀ + (ρ₁ − ρ₀)·D₀``, i.e. ``x̄₁ = (σ₁/σ₀)·x̄₀ + (1 − σ₁/σ₀)·D₀``, diffusers'
    ``solver_order=1``; in these variables its step never forms x̄ − σ·ε, which cancels where x̄ ≈ σ·ε
    (large σ) when ε is rounded.
    """

    def __init__(self, lower_order_final: bool = False, order: int = 2) -> None:
        if not isinstance(lower_order_final, bool):
            raise TypeError(f"solver 'dpmpp_2m': lower_order_final must be True or False, got {lower_order_final!r}")
        if isinstance(order, bool) or not isinstance(order, int) or order not in (1, 2):
            raise ValueError(f"solver 'dpmpp_2m': order must be 2 (DPM-Solver++(2M)) or 1 (DPM-Solver++(1), DDIM in "
                             f"the data variables), got {order!r}")
        super().__init__("dpmpp_2m", order, log_time=True)
        self.lower_order_final = lower_order_final
        #: the method of a fixed grid's last step, or None for this method's own
        final = Adams("dpmpp_2m", 1, log_time=True) if lower_order_final else None
        if final is not None:
            final._maker_options = self._maker_options  # the state it leaves continues this method
        self.final_method: Solver | None = final

    def warped(self, warp: Callable[[np.ndarray], np.ndarray], t_from: float) -> Adams:
        """Refused: this method's step is its own midpoint formula, not Adams weights through its nodes, so a
        warp would change nothing."""
        raise TypeError("solver 'dpmpp_2m' takes DPM-Solver++(2M)'s midpoint step, not Adams weights: a warp would "
                        "be ignored; warp an Adams method (solvers.Adams('dpmpp_2m', 2, log_time=True), "
                        "'dpmpp_3m', 'deis', 'unipc', 'lms', 'abm')")

    def _predict_weights(self, ts: list[float], t0: float, t1: float) -> list[float]:
        # log_time is off on a solve whose interval touches or crosses 0 (on_interval): AB2 in t there, as Adams
        if not self.log_time or len(ts) < 2 or not _log_defined((*ts, t1)):
            return adams_weights(ts, t0, t1, log_time=False)
        h = math.log(abs(t1)) - math.log(abs(t0))
        r = (math.log(abs(t0)) - math.log(abs(ts[1]))) / h
        return [(t1 - t0) * (1 + 0.5 / r), -(t1 - t0) * 0.5 / r]


class IPNDM(_CarriesHistory):
    """iPNDM (Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator",
    2023): Adams–Bashforth with the equal-step coefficients used on any grid, with lower
    orders while the history fills. Order ``order`` on uniform grids in ``t``; on a
    non-uniform grid its coefficients ignore the step ratios (that is the method). Self-started
    on a fixed grid its first Euler step limits it to ``fixed_grid_order`` = 2."""

    multistep: ClassVar[bool] = True

    def __init__(self, order: int = 4) -> None:
        if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 4:
            raise ValueError(f"solver 'ipndm': order must be an int in 1..4, got {order!r}")
        self.name = "ipndm"  # type: ignore[misc]
        self.order = order  # type: ignore[misc]
        self.fixed_grid_order = min(order, 2)

    def maker_options(self) -> str:
        return f"(order={self.order})"

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        hist = _history_at(f, t0, y0, state, self.order, self.state_maker)
        _, ks = hist.newest(self.order)
        h = t1 - t0
        return StepResult(_combine(y0, [h * c for c in _AB_EQUAL[len(ks) - 1]], ks), hist, None)


class CorrectedAdams(_CarriesHistory):
    """An Adams method plus given multiples of its next-order terms, with coefficients per step.

    Where the history holds more derivatives than the base method's formula uses at a step
    (``n`` nodes: its predictor's, or its corrector's with ``k₁`` in PEC mode), the m-th term is
    the difference of the Adams steps through ``n + m`` and ``n + m − 1`` of those nodes:

        T_m = Σ_j (w_j^{(n+m)} − w_j^{(n+m−1)})·k_j = O(h^{n+m+1}),
        y₁ = y₁^{base} + Σ_m c_m·T_m.

    ``c₁ = 1`` is the Adams step of the next order; any bounded ``c`` keeps the base method's
    order, since each term is of higher order than the base's local error. Fitted ``c`` make
    a few-step method's coefficients its own (the learned-coefficient idea of S4S, Frankel et
    al., "S4S: Solving for a Diffusion Model Solver", ICML 2025, restricted to an order-keeping
    correction as in DC-Solver's compensation, Zhao et al., ECCV 2024).

    ``coefficients`` maps each step ``(t₀, t₁)`` taken with this method to its ``c`` (at most
    as many as that step's history has terms: a step whose history is shorter needs fewer);
    a step not in the map (another grid, or the same grid the other way) is an error, since
    the coefficients belong to one grid and one direction.
    """

    multistep: ClassVar[bool] = True

    def __init__(self, base: Adams, coefficients: dict[tuple[float, float], Sequence[float]], *,
                 name: str | None = None) -> None:
        if not isinstance(base, Adams) or isinstance(base, CorrectedAdams):
            raise TypeError(f"base must be a solvers.Adams multistep method, got {type(base).__name__}")
        if base.warp is not None:
            raise ValueError(f"base {base.name!r} is warped (Adams.warped): its correction terms would be taken "
                             "in another variable than its steps; pass the method without the warp")
        if not isinstance(coefficients, dict):
            raise TypeError(f"coefficients must be a dict of step (t0, t1) -> coefficients, "
                            f"got {type(coefficients).__name__}")
        table: dict[tuple[float, float], tuple[float, ...]] = {}
        for key, cs in coefficients.items():
            if not (isinstance(key, tuple) and len(key) == 2):
                raise TypeError(f"coefficients must be keyed by steps (t0, t1), got the key {key!r}")
            cs = tuple(float(c) for c in cs)
            if not all(math.isfinite(c) for c in cs):
                raise ValueError(f"coefficients of the step {key!r} must be finite numbers, got {cs}")
            table[(float(key[0]), float(key[1]))] = cs
        self.base = base
        self.coefficients = table
        self.terms = max((len(c) for c in table.values()), default=0)
        self.name = name or f"{base.name}+corrected"  # type: ignore[misc]
        self.order = base.order  # type: ignore[misc]
        self.fixed_grid_order = getattr(base, "fixed_grid_order", base.order)
        self.evaluates_end = base.evaluates_end  # type: ignore[misc]
        self.steps_order = base.steps_order

    def on_interval(self, t0: float, t1: float) -> CorrectedAdams:
        """The base method's choice for the interval (:meth:`Adams.on_interval`: polynomial weights in t where the
        interval touches t = 0), with these coefficients on top: zero coefficients are the base method itself."""
        inner = self.base.on_interval(t0, t1)
        if inner is self.base:
            return self
        out = copy.copy(self)
        out.base = inner
        return out

    def maker_options(self) -> str:
        return f"(base={self.base.state_maker!r}, terms={self.terms})"

    def fitted_steps(self) -> frozenset[tuple[float, float]]:
        return frozenset(self.coefficients)

    def lacks(self, t0: float, t1: float) -> tuple[str, str] | None:
        return ("coefficients", "coefficients") if (t0, t1) not in self.coefficients else None

    def available_terms(self, history: int) -> int:
        """How many correction terms a step whose history holds ``history`` derivatives can take."""
        kept = min(history, self.base.steps_order + self.terms)
        return kept - min(kept, self.base.steps_order)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        cs = self.coefficients.get((t0, t1))
        if cs is None:
            raise ValueError(f"solver {self.name!r} has no coefficients for the step {t0!r} -> {t1!r}: its "
                             f"coefficients belong to the grid and direction they were fitted on (steps "
                             f"{sorted(self.coefficients)})")
        keep = self.base.steps_order + self.terms
        hist = _history_at(f, t0, y0, state, keep, self.state_maker)
        ts, ks = hist.newest(keep)
        available = self.available_terms(len(ts))
        if len(cs) > available:
            raise ValueError(f"solver {self.name!r}: the step from t={t0!r} has {available} correction term(s) "
                             f"(its history holds {len(ts)} derivatives), got {len(cs)} coefficients")
        res = self.base.step(f, t0, t1, y0, hist)
        used = min(len(ts), self.base.steps_order)
        if self.base.corrector:
            ts, ks = [t1, *ts], [res.state.k, *ks]
            used += 1
        y1 = res.y
        for m, c in enumerate(cs, start=1):
            if c == 0.0:
                continue
            hi = adams_weights(ts[: used + m], t0, t1, log_time=self.base.log_time)
            lo = adams_weights(ts[: used + m - 1], t0, t1, log_time=self.base.log_time) + [0.0]
            y1 = _combine(y1, [c * (a - b) for a, b in zip(hi, lo)], ks[: used + m])
        if self.base.corrector:  # the base kept only its own history: keep the longer one
            new = History.of(t1, ks[0], tuple(zip(ts[1:], ks[1:]))[: keep - 1], self.state_maker)
        else:
            new = hist
        return StepResult(y1, new, None)


def _lms(order: int = 4) -> Adams:
    return Adams("lms", order)


def _dpmpp_3m() -> Adams:
    return Adams("dpmpp_3m", 3, log_time=True)


def _unipc(order: int = 2) -> Adams:
    return Adams("unipc", order, log_time=True, corrector=True)


def _abm(order: int = 3) -> Adams:
    return Adams("abm", order, corrector=True)


register("lms", _lms, "linear multistep: variable-step Adams–Bashforth in t, order 4 (option order=1..4); "
         "k-diffusion's 'lms' on the σ ODE; 1 evaluation a step")
register("ipndm", IPNDM, "iPNDM: Adams–Bashforth with equal-step coefficients, order 4 (option order=1..4); "
         "1 evaluation a step")
register("abm", _abm, "Adams–Bashforth–Moulton PEC in t: AB predictor of order (default 3), AM corrector, "
         "order + 1; Milne error estimate, adaptive; 1 evaluation a step")
register("dpmpp_2m", DPMSolverPP2M, "DPM-Solver++(2M): second-order multistep in log time, for the "
         "data-prediction variables (flowdiff changes variables); option order=1: DPM-Solver++(1); 1 evaluation a step")
register("dpmpp_3m", _dpmpp_3m, "DPM-Solver++(3M): third-order Adams in log time (exact φ weights), for the "
         "data-prediction variables; 1 evaluation a step")
register("unipc", _unipc, "UniPC-style predictor–corrector: log-time Adams–Bashforth of order (default 2) with "
         "a free Adams–Moulton corrector, order + 1; adaptive; 1 evaluation a step; data-prediction variables")
