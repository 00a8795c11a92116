"""Explicit Runge–Kutta steps from a Butcher tableau."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor

from ._base import Derivative, Solver, StepResult, VectorField, check_carried_tensor
from ._tableau import ButcherTableau


def lincomb(y0: Tensor, h: float, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``y0 + h * sum(w_j * k_j)``, skipping zero weights; scalars stay Python floats."""
    out = y0
    for w, k in zip(weights, ks):
        if w != 0.0:
            out = out.add(k, alpha=h * w)
    return out


def weighted_sum(h: float, weights: Sequence[float], ks: Sequence[Tensor]) -> Tensor:
    """``h * sum(w_j * k_j)`` (used for error estimates)."""
    terms = [(w, k) for w, k in zip(weights, ks) if w != 0.0]
    out = terms[0][1] * (h * terms[0][0])
    for w, k in terms[1:]:
        out = out.add(k, alpha=h * w)
    return out


class ExplicitRK(Solver):
    """An explicit Runge–Kutta method given by its tableau.

    ``order`` (and ``error_order``, the embedded method's, for a tableau with ``b_error``) is checked against the
    tableau's order conditions on construction (:meth:`ButcherTableau.check_order`): a claim the coefficients do
    not meet is a ``ValueError`` naming the first unmet condition.

    The carried state is a :class:`Derivative` ``f(t0, y0)`` when one is already known:
    the last stage of a first-same-as-last tableau, or the first stage of a step the
    adaptive driver rejected and retries from the same point. It is never recomputed.
    A solve given a state (``state=``) takes a :class:`Derivative` this method made (:meth:`check_carried`);
    a first-same-as-last method's must lie at the solve's start, where its end left it.
    """

    state_type: ClassVar[type | None] = Derivative

    def __init__(self, name: str, tableau: ButcherTableau, order: int, *, error_order: int | None = None) -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"ExplicitRK: name must be a non-empty str, got {name!r}")
        if not isinstance(tableau, ButcherTableau):
            raise TypeError(f"ExplicitRK {name!r}: tableau must be a solvers.ButcherTableau, got "
                            f"{type(tableau).__name__}")
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"ExplicitRK {name!r}: order must be a positive int, got {order!r}")
        if error_order is not None:
            if tableau.b_error is None:
                raise ValueError(f"ExplicitRK {name!r}: error_order={error_order!r} given for a tableau without an "
                                 "error estimate (b_error)")
            if isinstance(error_order, bool) or not isinstance(error_order, int) or error_order < 1:
                raise ValueError(f"ExplicitRK {name!r}: error_order must be a positive int (the order of the "
                                 f"embedded method), got {error_order!r}")
        elif tableau.b_error is not None and order < 2:
            raise ValueError(f"ExplicitRK {name!r}: an embedded pair of order {order} needs error_order >= 1 "
                             "(its default, order - 1, is not positive)")
        try:  # the order claimed must be the tableau's (a mistyped coefficient would silently lower it)
            tableau.check_order(order)
            if tableau.b_error is not None:
                tableau.check_order(error_order if error_order is not None else order - 1, embedded=True)
        except ValueError as err:
            raise ValueError(f"ExplicitRK {name!r}: {err}") from None
        self.name = name  # type: ignore[misc]
        self.tableau = tableau
        self.order = order  # type: ignore[misc]
        self.adaptive = tableau.b_error is not None  # type: ignore[misc]
        self.error_order = error_order if error_order is not None else order - 1
        self.evaluates_end = tableau.evaluates_end  # type: ignore[misc]
        # the tableau's derived properties, read once (the step runs inside the loop)
        self._stages, self._fsal = tableau.stages, tableau.fsal
        self._a, self._b, self._c, self._b_error = tableau.a, tableau.b, tableau.c, tableau.b_error

    def check_carried(self, state: Any, t0: float, y0: Tensor, t1: float | None = None, *,
                      name: str = "state") -> None:
        """:meth:`Solver.check_carried`, and its derivative of ``y0``'s shape and dtype; a first-same-as-last
        method's at ``t0`` (it holds ``f`` where the solve that made it ended). The state of a method that is not
        first-same-as-last holds the first stage of its last step, which only a retried step reuses: at another time
        it is taken and not used, as within a solve."""
        super().check_carried(state, t0, y0, t1, name=name)
        if state is None:
            return
        check_carried_tensor(state.k, y0, f"{name}.k")
        if self._fsal and state.t != t0:
            raise ValueError(f"{name} is at t={state.t!r}, but the solve starts at t={t0!r}: solver {self.name!r} "
                             f"carries f where its solve ended; continue from there (t={state.t!r}), or pass "
                             f"{name}=None")

    def step_cost(self, t0: float, state: Any) -> int:
        """Every stage is an evaluation, but the first when ``state`` already holds ``f(t0, y0)``."""
        return self._stages - (1 if isinstance(state, Derivative) and state.t == t0 else 0)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        h = t1 - t0
        if self._stages == 1 and state is None:  # Euler: one evaluation, one update, nothing to carry
            return StepResult(y0.add(f(t0, y0), alpha=h * self._b[0]), None)
        k1 = state.k if isinstance(state, Derivative) and state.t == t0 else f(t0, y0)
        if self._stages == 1:
            return StepResult(y0.add(k1, alpha=h * self._b[0]), None)
        ks = [k1]
        y1 = None
        stages, fsal, b = self._stages, self._fsal, self._b
        last = stages - 1
        for i in range(1, stages):
            if i == last and fsal:
                y1 = lincomb(y0, h, b, ks)
                yi = y1
            else:
                yi = lincomb(y0, h, self._a[i - 1], ks)
            ks.append(f(t0 + self._c[i] * h, yi))
        if y1 is None:
            y1 = lincomb(y0, h, b, ks)
        error = weighted_sum(h, self._b_error, ks) if self._b_error is not None else None
        # FSAL: the last stage is f(t1, y1). Otherwise keep f(t0, y0) for a retried step.
        maker = self.state_maker
        new_state = Derivative(t1, ks[-1], maker) if fsal else Derivative(t0, k1, maker)
        return StepResult(y1, new_state, error)
