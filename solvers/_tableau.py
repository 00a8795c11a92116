"""Butcher tableaus for explicit Runge–Kutta methods, checked on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

_TOL = 1e-12


@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method ``c``, ``a`` (strictly lower triangular), ``b``.

    ``b_error`` (optional) holds the weights ``b - b_hat`` of an embedded pair, so
    that ``h * sum(b_error[j] * k[j])`` estimates the local error of a step.

    Construction checks the row-sum condition ``c[i] == sum(a[i])`` and the
    consistency condition ``sum(b) == 1`` (and ``sum(b_error) == 0``), so a
    mistyped coefficient fails at import, not as a silently lower order.
    """

    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    b_error: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
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
