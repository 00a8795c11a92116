"""Errors raised while solving."""

from __future__ import annotations


class SolveError(ValueError):
    """A failure in the middle of a solve, located by step index and time.

    A ValueError, since its causes are bad values: a vector field (model) that returned the
    wrong shape or NaN/inf, or a tolerance/budget that cannot be met. Other exceptions raised
    by the vector field propagate unchanged, with a note saying which step they came from.

    Attributes ``step``, ``t0`` and ``t1`` say which step failed; ``stats`` holds the
    statistics gathered up to the failure (a :class:`solvers.Stats`); ``value`` the offending
    value when a divergence guard (:class:`solvers.Bound`) fired, else ``None``.
    """

    def __init__(self, message: str, *, step: int | None = None, t0: float | None = None,
                 t1: float | None = None, stats: object = None) -> None:
        super().__init__(message)
        self.step = step
        self.t0 = t0
        self.t1 = t1
        self.stats = stats
        self.value: float | None = None


class StepFailure(Exception):
    """Raised by a step that cannot be taken (e.g. an implicit step whose root finder missed).

    The loop turns it into a :class:`SolveError` located at the step: ``{where}`` in the
    message becomes ``step i (t t0 -> t1)``, and ``extra`` is merged into the statistics'
    ``extra`` of the error.
    """

    def __init__(self, message: str, extra: dict | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = dict(extra or {})
