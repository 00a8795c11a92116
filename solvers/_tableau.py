"""Butcher tableaus for explicit Runge–Kutta methods, checked on construction."""

from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

_TOL = 1e-12
#: How far ``b·Φ(τ)`` may miss ``1/γ(τ)`` for an order condition to count as met (coefficients given as floats,
#: e.g. ``dopri8``'s, meet theirs to ~1e-15; a wrong coefficient misses by far more than this).
_ORDER_TOL = 1e-10
#: The highest order whose conditions a tableau is checked against (719 rooted trees of order 10).
MAX_CHECKED_ORDER = 10

#: A rooted tree as the sorted tuple of its subtrees (the single node is ``()``).
_Tree = tuple


@functools.cache
def _trees(n: int) -> tuple[_Tree, ...]:
    """Every rooted tree with ``n`` nodes, once each (canonical form: children sorted)."""
    if n == 1:
        return ((),)

    def grow(tree: _Tree) -> list[_Tree]:  # a new leaf under the root, or under any node of a subtree
        out = [tuple(sorted((*tree, ())))]
        for i, child in enumerate(tree):
            for bigger in grow(child):
                out.append(tuple(sorted((*tree[:i], bigger, *tree[i + 1:]))))
        return out

    return tuple(sorted({grown for tree in _trees(n - 1) for grown in grow(tree)}))


def _size(tree: _Tree) -> int:
    return 1 + sum(_size(child) for child in tree)


def _density(tree: _Tree) -> int:
    """γ(τ) = |τ|·Π γ(children): the order condition of ``tree`` is ``b·Φ(τ) = 1/γ(τ)``."""
    return _size(tree) * math.prod(_density(child) for child in tree)


def _bracket(tree: _Tree) -> str:
    """Butcher's notation: ``τ`` for the single node, ``[τ τ]`` for a root with two leaves, and so on."""
    return "τ" if not tree else "[" + " ".join(_bracket(child) for child in tree) + "]"


def _numbers(name: str, values: object) -> tuple[float, ...]:
    """``values`` as a tuple of floats: each a finite real number (not a bool, a string or a tensor)."""
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"tableau: {name} must be a tuple of numbers, got {type(values).__name__}")
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise TypeError(f"tableau: entry {i} of {name} must be a real number, got {v!r} ({type(v).__name__})")
        if not math.isfinite(v):
            raise ValueError(f"tableau: entry {i} of {name} must be finite, got {v!r}")
    return tuple(float(v) for v in values)


@functools.lru_cache(maxsize=256)
def _unmet_condition(a: tuple[tuple[float, ...], ...], weights: tuple[float, ...], order: int) -> str | None:
    """The first order condition up to ``order`` that ``weights`` (b, or an embedded method's b̂) on the tableau's
    ``a`` fail, described; ``None`` when all hold (Butcher's conditions: ``b·Φ(τ) = 1/γ(τ)`` for every rooted
    tree τ of at most ``order`` nodes, Φ(τ) its elementary weights). Cached: a registered method is built anew
    by every ``solvers.get``."""
    s = len(weights)
    rows = [(0.0,) * s] + [tuple(row) + (0.0,) * (s - len(row)) for row in a]

    @functools.cache
    def phi(tree: _Tree) -> tuple[float, ...]:
        out = [1.0] * s
        for child in tree:
            inner = phi(child)
            for i in range(s):
                out[i] *= sum(rows[i][j] * inner[j] for j in range(s))
        return tuple(out)

    for n in range(1, order + 1):
        for tree in _trees(n):
            value = sum(w * p for w, p in zip(weights, phi(tree)))
            gamma = _density(tree)
            if not math.isclose(value, 1.0 / gamma, rel_tol=0, abs_tol=_ORDER_TOL):
                return (f"the condition of the tree {_bracket(tree)} (order {n}): Σ b_i Φ_i = {value!r}, needs "
                        f"1/{gamma}")
    return None


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method ``c``, ``a`` (strictly lower triangular), ``b``.

    ``b_error`` (optional) holds the weights ``b - b_hat`` of an embedded pair, so
    that ``h * sum(b_error[j] * k[j])`` estimates the local error of a step.

    Construction checks that every entry is a finite real number (lists become tuples), the
    row-sum condition ``c[i] == sum(a[i])`` and the consistency condition ``sum(b) == 1`` (and
    ``sum(b_error) == 0``). Those hold for a tableau of order 1 too: the order a method claims is
    checked by :meth:`check_order` against Butcher's order conditions (one per rooted tree; J. C.
    Butcher, "Numerical Methods for Ordinary Differential Equations"), which :class:`solvers.ExplicitRK`
    calls, so a mistyped coefficient fails when the method is made, not as a silently lower order.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "c", _numbers("c", self.c))
        object.__setattr__(self, "b", _numbers("b", self.b))
        if not isinstance(self.a, (tuple, list)):
            raise TypeError(f"tableau: a must be a tuple of rows (tuples of numbers), got {type(self.a).__name__}")
        object.__setattr__(self, "a", tuple(_numbers(f"row {i} of a", row) for i, row in enumerate(self.a, start=1)))
        if self.b_error is not None:
            object.__setattr__(self, "b_error", _numbers("b_error", self.b_error))
        s = len(self.c)
        if s < 1 or self.c[0] != 0.0:
            raise ValueError(f"tableau: c must start with 0 and have at least one stage, got {self.c}")
        if len(self.a) != s - 1:
            raise ValueError(f"tableau: a must have {s - 1} rows (one per stage after the first), got {len(self.a)}")
        for i, row in enumerate(self.a, start=1):
            if len(row) != i:
                raise ValueError(f"tableau: row {i} of a must have {i} entries, got {len(row)}")
            if not math.isclose(sum(row), self.c[i], rel_tol=0, abs_tol=_TOL):
                raise ValueError(f"tableau: row {i} of a sums to {sum(row)!r}, expected c[{i}] = {self.c[i]!r}")
        if len(self.b) != s:
            raise ValueError(f"tableau: b must have {s} entries, got {len(self.b)}")
        if not math.isclose(sum(self.b), 1.0, rel_tol=0, abs_tol=_TOL):
            raise ValueError(f"tableau: b sums to {sum(self.b)!r}, expected 1")
        if self.b_error is not None:
            if len(self.b_error) != s:
                raise ValueError(f"tableau: b_error must have {s} entries, got {len(self.b_error)}")
            if not math.isclose(sum(self.b_error), 0.0, rel_tol=0, abs_tol=_TOL):
                raise ValueError(f"tableau: b_error sums to {sum(self.b_error)!r}, expected 0")

    def check_order(self, order: int, *, embedded: bool = False) -> None:
        """Refuse (``ValueError``) an ``order`` the weights ``b`` do not reach (``embedded``: the embedded method's
        weights ``b − b_error``), naming the first unmet order condition (Butcher's rooted-tree conditions, up to
        order :data:`MAX_CHECKED_ORDER`; a higher claim is refused rather than taken on trust)."""
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"tableau: order must be a positive int, got {order!r}")
        if order > MAX_CHECKED_ORDER:
            raise ValueError(f"tableau: order {order} cannot be checked (its order conditions are checked up to "
                             f"order {MAX_CHECKED_ORDER})")
        if embedded:
            if self.b_error is None:
                raise ValueError("tableau: no embedded method (b_error is None) to have an order")
            weights, what = tuple(b - e for b, e in zip(self.b, self.b_error)), "the embedded weights b - b_error"
        else:
            weights, what = self.b, "the weights b"
        unmet = _unmet_condition(self.a, weights, order)
        if unmet is not None:
            raise ValueError(f"tableau: {what} do not have order {order}: {unmet}")

    @property
    def stages(self) -> int:
        return len(self.c)

    @property
    def fsal(self) -> bool:
        """First same as last: the last stage is f(t1, y1), reusable as the next step's first."""
        return (
            self.stages > 1
            and self.c[-1] == 1.0
            and self.b[-1] == 0.0
            and all(math.isclose(x, y, rel_tol=0, abs_tol=_TOL) for x, y in zip(self.a[-1], self.b[:-1]))
        )

    @property
    def evaluates_end(self) -> bool:
        """Whether some stage evaluates f at the end of the step (c == 1)."""
        return any(ci == 1.0 for ci in self.c[1:])

    @classmethod
    def from_torchdiffeq(cls, tableau: object) -> ButcherTableau:
        """Convert one of torchdiffeq's ``_ButcherTableau`` objects (alpha, beta, c_sol, c_error)."""
        alpha = [float(x) for x in tableau.alpha]  # type: ignore[attr-defined]
        beta = [tuple(float(x) for x in row) for row in tableau.beta]  # type: ignore[attr-defined]
        b = tuple(float(x) for x in tableau.c_sol)  # type: ignore[attr-defined]
        err = getattr(tableau, "c_error", None)
        return cls(
            c=(0.0, *alpha),
            a=tuple(beta),
            b=b,
            b_error=None if err is None else tuple(float(x) for x in err),
        )
