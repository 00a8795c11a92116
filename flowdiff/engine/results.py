"""What generate, encode and decode return, and what their callbacks receive."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from torch import Tensor

from solvers import Derivative, Solver, Stats

from .latent import Latent


class StepState(NamedTuple):
    """What a flowdiff callback receives after each accepted step, in every kind of solve:
    the step index, the σ reached, the VP-scaled state ``x`` = x̄/√(1+σ²), ``xbar`` itself,
    and the model's ``denoised`` image there when the step already evaluated it (else
    ``None``: no evaluation is spent on it; for predictor–corrector methods it is taken at
    the predicted point)."""

    step: int
    sigma: float
    x: Tensor
    xbar: Tensor
    denoised: Tensor | None = None


@dataclass
class Result:
    """The outcome of generate/encode/decode: ``x`` (image, or latent x_T for encode; at a grid's end above
    σ = 0 the model's x = α(σ)·x̄ there, :func:`flowdiff.engine.flow.to_model_scale`), the
    statistics (``stats.nfe`` is the exact number of model evaluations), the σ grid used,
    for encode the :class:`Latent` that :func:`decode` takes back, and the states kept by
    ``save=flowdiff.Save(...)`` (``saved``: the callback's records there, in step order)."""

    x: Tensor
    stats: Stats
    sigmas: np.ndarray
    solver: str
    latent: Latent | None = None
    saved: tuple[StepState, ...] | None = None


class Saver:
    """The callback that keeps what a :class:`flowdiff.Save` asks for, calling the user's ``callback`` first.

    It sees exactly the records a callback sees (so saved states are the callback's), keeps
    those at the requested σ (or all with ``steps``), and :meth:`attach` puts them on the result,
    refusing a requested σ the solve never stepped to."""

    def __init__(self, save: Any, callback: Callable[[StepState], None] | None) -> None:
        self.save, self.callback = save, callback
        self.wanted = frozenset(save.sigmas or ())
        self.records: list[StepState] = []
        self._pending: tuple[Tensor, float] | None = None
        self._saved: tuple[Tensor, float] | None = None  # the loop's state behind the last saved record

    def keeps(self, sigma: float) -> bool:
        """Whether the state the solve reaches at ``sigma`` is saved."""
        return self.save.steps or sigma in self.wanted

    def __call__(self, state: StepState) -> None:
        if self.callback is not None:
            self.callback(state)
        if self.keeps(state.sigma):
            self.records.append(state if self.save.denoised else state._replace(denoised=None))
            self._saved = self._pending

    def at_state(self, y: Tensor, t: float) -> None:
        """The loop's own state (in the formulation's variables) behind the record about to be passed."""
        self._pending = (y, t)

    def tap(self, field: Callable[[float, Tensor], Tensor], denoised: Callable[[float, Tensor, Any], Any],
            solver: Solver) -> Callable[[float, Tensor], Tensor]:
        """The formulation's ``field(t, y)`` that also fills the last saved record's ``denoised``
        (with ``Save(denoised=True)``): the step after a saved state usually starts by evaluating the
        model at that very state (the same tensor, at the same time); x̂₀ is read off that value by
        ``denoised(t, y, Derivative(t, k))`` (the formulation's own map). No evaluation is added; a
        record that no evaluation reaches (the solve's end) keeps ``None``. A reversible ``solver``
        is refused before the solve: it evaluates the model at its second variable, never at a state
        it saves, so every record would keep ``None``."""
        if not self.save.denoised:
            return field
        if solver.reversible:
            raise ValueError(f"save=Save(denoised=True) with the reversible solver {solver.name!r}: it evaluates the "
                             "model at its second variable, never at the states it saves, so it has no x̂₀ there "
                             "without an extra evaluation; accepted: Save(denoised=False) and flow.denoised(record."
                             "xbar, record.sigma) for the records you need (one evaluation each), or a solver that is "
                             "not reversible")
        # weakly: a differentiated solve's node keeps this field for its backward pass, and the records hold that
        # node's outputs (adjoint="checkpoint"); a strong reference would make a loop autograd's graph never frees
        saver = weakref.ref(self)

        def f(t: float, y: Tensor) -> Tensor:
            k = field(t, y)
            self = saver()
            if self is None:
                return k
            records = self.records
            if records and self._saved is not None and y is self._saved[0] and t == self._saved[1] \
                    and records[-1].denoised is None:
                records[-1] = records[-1]._replace(denoised=denoised(t, y, Derivative(t, k)))
            return k

        return f

    def differentiable(self, step: int, x: Tensor, xbar: Tensor, denoised: Tensor | None) -> None:
        """Put ``x``, ``xbar`` and ``denoised`` (the values the record of ``step`` holds, now with a graph) in that
        record: the saved states of a solve differentiated as one autograd node (``adjoint="checkpoint"``) are
        its outputs. ``denoised`` replaces only a kept one (the record says where the solve evaluated the model)."""
        for j, record in enumerate(self.records):
            if record.step == step:
                if record.denoised is not None and denoised is None:
                    raise RuntimeError(f"Saver: the denoised image of step {step} was not found again among the "
                                       "differentiated solve's outputs")
                kept = denoised if record.denoised is not None else None
                self.records[j] = record._replace(x=x, xbar=xbar, denoised=kept)
                return
        raise RuntimeError(f"Saver: no saved record of step {step} to differentiate")

    def check(self, sigmas: np.ndarray, reached: set[float] | None = None) -> None:
        """Refuse requested σ that the grid ``sigmas`` (in the solve's order) does not step to (before a
        fixed-grid solve; after any solve with the σ ``reached``)."""
        missing = sorted(self.wanted - (set(np.asarray(sigmas[1:]).tolist()) if reached is None else reached))
        if missing:
            steps_to = np.array2string(np.asarray(sigmas[1:]), precision=6)
            raise ValueError(f"Save(sigmas=...) asks for σ = {missing}, which this solve does not step to; "
                             f"the σ it steps to are {steps_to} (use one of them, or Save(steps=True))")

    def attach(self, result: Result) -> Result:
        self.check(result.sigmas, {r.sigma for r in self.records})
        result.saved = tuple(self.records)
        return result
