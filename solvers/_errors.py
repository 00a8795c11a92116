"""Errors raised while solving."""

from __future__ import annotations


class SolveError(ValueError):
    """A failure in the middle of a solve, located by step index and time.

    A ValueError, since its causes are bad values: a vector field (model) that returned the
    wrong shape or NaN/inf, or a tolerance/budget that cannot be met. Other exceptions raised
    by the vector field propagate unchanged, with a note saying which step they came from.

    Attributes ``step``, ``t0`` and ``t1`` say which step failed; ``stats`` holds the
    statistics gathered up to the failure (a :class:`solvers.Stats`).
    """

    def __init__(self, message: str, *, step: int | None = None, t0: float | None = None,
                 t1: float | None = None, stats: object = None) -> None:
        super().__init__(message)
        self.step = step
        self.t0 = t0
        self.t1 = t1
        self.stats = stats
