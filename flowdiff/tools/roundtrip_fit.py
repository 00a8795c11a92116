"""Learned encoders: the evaluation times of an encode and of its decode fitted for each other.

A fixed-grid encode is not the inverse of the decode on the same grid. Euler's encode step
σ_i → σ_{i+1} evaluates ε at its start, x̄_{i+1} = x̄_i + h·ε(x̄_i, σ_i), while the decode step it
must undo evaluates at the other end, x̄_i = x̄_{i+1} − h·ε(x̄_{i+1}, σ_{i+1}); at 10 steps the
difference is the whole round-trip error. Here each encode step, and with ``fit_decode`` each
decode step, evaluates at a shifted time (:class:`solvers.Shifted`: t + δ_i·(t_{i+1} − t_i) in the
solve's time variable, the state left as it is), one δ per step, and the shifts are fitted —
optionally with the σ grid itself — by least squares on the round trip of calibration images:

    min_{δ, δ', grid}  Σ |decode_δ'(encode_δ(x)) − x|² + w²·Σ |encode_δ(x) − x_T(x)|²,   |δ|, |δ'| ≤ bound,

each shift further bounded, as :func:`flowdiff.learn_solver`'s are, so that every evaluation of its
step stays between σ = 0 and the schedule's σ_max (the model has no time outside, and need not say
so: the decode's first step, out of σ_max, can only move its evaluation down),

with ``x_T(x)`` the flow's own latent of ``x`` (an adaptive float64 encode at ``reference_tol``)
and w = ``latent_weight``. The second term is what keeps the fit honest: without it a fitted
grid can make one long Euler jump through the middle σ range over which the decode is nearly
linear, so that the "latent" is a rescaled image that decodes back well but is nowhere near the
flow's x_T (measured on the mixture of ``benchmarks/bench_roundtrip.py``: round trip 0.004× the
plain encode's, latent error 8× larger). Both directions cost what the base solver's do (N + N).
A latent of a learned encode records the base solver, the grid and the decode's shifts
(:attr:`flowdiff.Latent.decode_shifts`), so ``flowdiff.decode(flow, latent)`` needs nothing else.
This is LD3's idea (Tong et al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025:
evaluation times decoupled from the grid, fitted on the solver's own output) applied to inversion,
with the round trip as the teacher.

The calibration images are split: the even-indexed half is fitted (scipy's trust-region
reflective least squares, forward-difference Jacobian: one candidate round trip per parameter and
iteration), the odd-indexed half decides — the learned encode is kept only if its round trip
there is better than the plain encode's on the starting grid *and* its latent no farther from the
flow's; otherwise the result is the plain encode on that grid (``kept=False``, shifts zero).
The same half chooses ``latent_weight`` when several are given: a small weight lets the fit trade the
latent for the round trip, a large one fixes the latent and leaves the round trip, and where between
depends on how far a plain encode's latent already is from the flow's (on the round-trip grids of
``benchmarks/bench_roundtrip.py --learned`` at 10 and 20 steps: 0.12–0.65 RMS on the digit mixture, 0.29–1.45
on photo patches), which the fitted half's objective, itself weighted, cannot compare.
A :class:`LearnedEncoder` records the flow's fingerprint, saves to JSON and loads only for that
flow, like a :class:`~flowdiff.TunedGrid` or a :class:`~flowdiff.LearnedSolver`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

from ..api.sampling import decode, encode
from ..engine._checks import check_data_range, data_range_checked, model_kwargs_rows
from ..engine.fingerprint import flow_fingerprint
from ..engine.flow import ProbabilityFlow
from ..engine.formulations import encode_evaluates_end, encode_refusal, formulation_for
from ..engine.grids import check_budget, make_sigmas, reversed_grid
from ..engine.options import Adaptive
from ..engine.plugins import registered_only
from ..engine.results import Result
from .learned import check_fitted_grid, check_fitted_shifts, plain_encoders, shift_intervals, tune_roundtrip
from .tuning import check_fingerprint, check_rows_split, read_record, record_fingerprint, write_record

__all__ = ["LearnedEncoder", "learn_encoder"]

_FORMAT = "flowdiff.LearnedEncoder/1"

#: Named grids the fit also starts from when no grid is given (besides the round-trip grid): the fit finds
#: local minima, and on the mixture of ``bench_roundtrip.py`` which one depended on the start.
START_GRIDS = ("logsnr", "karras", "trailing")

#: How :func:`learn_encoder`'s warning that the held-out half rejected every fit (``kept=False``) begins.
NOT_KEPT = "learn_encoder kept the plain encode"


@dataclass(frozen=True)
class LearnedEncoder:
    """An encode with ``solver`` at ``nfe`` evaluations whose steps evaluate at fitted shifted times.

    ``sigmas`` is the generation grid (decreasing to 0) the encode runs backwards and its latents
    decode on; ``shifts[i]`` the δ of the encode's step i (from σ = 0 up; 0 where the step has a
    method of its own, such as the data variables' step out of σ = 0), ``decode_shifts[i]`` the δ
    of the decode's step i (from σ_max down), all zero unless fitted. ``kept`` says whether the
    held-out half preferred the learned encode; when not, ``sigmas`` is the starting grid, the
    shifts are zero and :meth:`encode` is the plain encode. Errors (RMS per element), as a
    :class:`~flowdiff.LearnedSolver`'s: ``calibration_error`` / ``base_calibration_error`` the
    round trip of the fitted candidate and of the plain encode on the fitted half;
    ``validation_error`` / ``base_validation_error`` on the held-out half and ``latent_error`` /
    ``base_latent_error`` the held-out latents against the flow's own, the first of each pair
    that of what :meth:`encode` does (the plain encode's, equal to the base's, when not kept).
    ``initial_grid`` names the starting grid; ``fitting_nfe`` counts every model evaluation of the
    fit (the reference encode's, the starting grid's tuning and every candidate round trip),
    ``solves`` the candidate round trips, every candidate weight's. ``latent_weight`` is the weight of the fit
    the held-out half chose (when it kept none: of the refused fit nearest to being kept, the lowest held-out
    round trip, whose fitted-half round trip ``calibration_error`` reports) and ``weight_trials`` holds, per
    candidate weight given, ``(weight, held-out round trip, held-out latent error)`` of its fit (one entry when
    one weight was given, none in a file written before the trials; see :func:`learn_encoder`).

    Use: ``learned.encode(flow, x)``: N evaluations; its latent decodes with ``decode(flow, latent)``
    (the base solver on the same grid, with the decode's shifts, which the latent records), N evaluations.
    """

    solver: str
    solver_options: dict[str, Any]
    nfe: int
    sigmas: np.ndarray
    shifts: tuple[float, ...]
    decode_shifts: tuple[float, ...]
    fingerprint: str
    kept: bool
    calibration_error: float = math.nan
    base_calibration_error: float = math.nan
    validation_error: float = math.nan
    base_validation_error: float = math.nan
    latent_error: float = math.nan
    base_latent_error: float = math.nan
    initial_grid: str = ""
    fitting_nfe: int = 0
    reference_nfe: int = 0
    solves: int = 0
    fitting_seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    latent_weight: float = math.nan
    weight_trials: tuple[tuple[float, float, float], ...] = ()
    source: str = ""

    def base(self) -> _solvers.Solver:
        """The plain solver (registry name and options) that encodes without shifts and decodes the latents."""
        return _base_solver(self.solver, self.solver_options)

    def encode(self, flow: ProbabilityFlow, images: Tensor, *,
               model_kwargs: Mapping[str, Any] | None = None) -> Result:
        """Encode ``images`` with the learned steps on :attr:`sigmas` (the plain encode if not kept); the latent
        records the decode's shifts (when fitted), so that ``decode(flow, result.latent)`` is the decode it was
        fitted with. Refuses a flow other than the one it was fitted on (:meth:`check`)."""
        self.check(flow, model_kwargs)
        res = encode(flow, images, solver=self._encode_solver(), grid=self.sigmas, model_kwargs=model_kwargs)
        return _with_decode_shifts(res, self.decode_shifts if self.kept else ())

    def _encode_solver(self) -> _solvers.Solver:
        base = self.base()
        if not self.kept:
            return base
        return _shifted(base, _encode_times(base, self.sigmas), self.shifts)

    def check(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` unless this encoder was fitted on ``flow`` (with ``model_kwargs``)."""
        check_fingerprint(self.fingerprint, flow, model_kwargs, "this learned encoder was fitted",
                          self._refit_advice(flow, model_kwargs))

    def _refit_advice(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None) -> str:
        """What to do when :meth:`check` refuses: the fingerprint covers the conditioning's values, so an encoder
        fitted with per-sample ``model_kwargs`` (class labels, one per image) holds those rows."""
        if model_kwargs and flow_fingerprint(flow, None) == self.fingerprint:
            return ("it was fitted on this flow without model_kwargs (unconditionally): encode without them, or fit "
                    "one with them with flowdiff.learn_encoder")
        rows = [f"{key}: {tuple(value.shape)}" for key, value in (model_kwargs or {}).items()
                if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] > 1]
        given = f" (the model_kwargs given hold rows: {', '.join(rows)})" if rows else ""
        return ("fit it again with flowdiff.learn_encoder on this flow. The fingerprint covers model_kwargs' values: "
                "an encoder fitted with per-sample conditioning (class labels, one per image) holds those rows, in "
                f"that order, and takes no others{given}; to encode other images or labels, fit one on them "
                "(learn_encoder(flow, images, model_kwargs=...)), or one per class with its label given once (a 0-d "
                "tensor), which takes any number of that class's images")

    def save(self, path: str | Path) -> Path:
        """Write the encoder (σ and shifts as exact float hex strings) and what it was fitted for as JSON."""
        data = asdict(self)
        data["sigmas"] = [float(s).hex() for s in self.sigmas]
        data["shifts"] = [float(d).hex() for d in self.shifts]
        data["decode_shifts"] = [float(d).hex() for d in self.decode_shifts]
        data["weight_trials"] = [[float(v).hex() for v in trial] for trial in self.weight_trials]
        data.pop("source")
        return write_record(path, _FORMAT, data, "learned encoder")

    @classmethod
    def load(cls, path: str | Path, flow: ProbabilityFlow,
             model_kwargs: Mapping[str, Any] | None = None) -> LearnedEncoder:
        """Read a file written by :meth:`save` and check that it belongs to ``flow`` (see :meth:`check`)."""
        path = Path(path)
        data = read_record(path, _FORMAT, "learned encoder")
        try:
            data["sigmas"] = np.array([float.fromhex(s) for s in data["sigmas"]], dtype=np.float64)
            data["shifts"] = tuple(float.fromhex(d) for d in data["shifts"])
            data["decode_shifts"] = tuple(float.fromhex(d) for d in data["decode_shifts"])
            # a file from before the weight trials: its one weight is in its options, its trial unrecorded (an
            # encoder built by hand, not fitted, has neither: NaN)
            data.setdefault("latent_weight", data["options"].get("latent_weight", math.nan))
            data["weight_trials"] = tuple(_trial(t) for t in data.get("weight_trials", ()))
            learned = cls(**data, source=str(path))
            check_fitted_grid("sigmas", learned.sigmas, "learn_encoder")
            if not isinstance(learned.kept, bool):
                raise ValueError(f"kept must be true or false, got {learned.kept!r}")
            for what in ("shifts", "decode_shifts"):
                if len(getattr(learned, what)) != len(learned.sigmas) - 1:
                    raise ValueError(f"{len(getattr(learned, what))} {what} for {len(learned.sigmas) - 1} steps")
                bad = [(i, d) for i, d in enumerate(getattr(learned, what)) if not math.isfinite(d)]
                if bad:
                    raise ValueError(f"{what}[{bad[0][0]}] = {bad[0][1]!r} is not finite; accepted: a finite number")
            _check_choice(learned)
            learned._encode_solver()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: malformed learned encoder ({err})") from None
        learned.check(flow, model_kwargs)
        bound = float(learned.options.get("bound", math.inf)) if isinstance(learned.options, dict) else math.inf
        for what, direction in (("shifts", "encode"), ("decode_shifts", "decode")):
            if any(getattr(learned, what)):  # each within what learn_encoder keeps it in, as learn_solver's files
                check_fitted_shifts(getattr(learned, what), shift_intervals(learned.base(), learned.sigmas,
                                                                            flow.schedule, bound, direction),
                                    what, f"learn_encoder (within ±bound = {bound!r}", str(path))
        return learned


def _trial(values: object) -> tuple[float, float, float]:
    """One stored ``(weight, held-out round trip, held-out latent error)``: a list of 3 float hex strings, the
    weight positive and finite, the errors at least 0 (``inf`` for a solve that failed)."""
    if not isinstance(values, list) or len(values) != 3 or not all(isinstance(v, str) for v in values):
        raise ValueError(f"a weight trial holds 3 numbers as float hex strings, got {values!r}")
    weight, validation, latent = (float.fromhex(v) for v in values)
    if not 0 < weight < math.inf or not validation >= 0 or not latent >= 0:
        raise ValueError(f"a weight trial holds a positive finite weight and two errors >= 0, got "
                         f"{(weight, validation, latent)!r}")
    return weight, validation, latent


def _check_choice(learned: LearnedEncoder) -> None:
    """A loaded encoder's weight, its trials and its options agree, as :func:`learn_encoder` writes them: the
    trials' weights are the candidates of ``options["latent_weight"]`` in order, the chosen weight is one of them,
    and a kept fit's held-out figures are its trial's (an encoder built by hand has no weight, trials or options
    weight: NaN, ``()``, none)."""
    weight, given = learned.latent_weight, learned.options.get("latent_weight")
    if given is None and not learned.weight_trials and isinstance(weight, float) and math.isnan(weight):
        return  # built by hand, not fitted: no weight to check
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
        raise ValueError(f"latent_weight must be a positive finite number, got {weight!r}")
    if not learned.weight_trials:
        if isinstance(given, list) or weight != given:
            raise ValueError(f"latent_weight {weight!r} without weight trials must be options['latent_weight'] "
                             f"(one weight), got {given!r}")
        return
    weights = [w for w, _, _ in learned.weight_trials]
    if weights != (given if isinstance(given, list) else [given]):
        raise ValueError(f"the weight trials' weights {weights} are not options['latent_weight'] {given!r}")
    if weight not in weights:
        raise ValueError(f"latent_weight {weight!r} is not among the weight trials' weights {weights}")
    _, validation, latent = learned.weight_trials[weights.index(weight)]
    if learned.kept and (validation, latent) != (learned.validation_error, learned.latent_error):
        raise ValueError(f"the kept fit's held-out errors ({learned.validation_error!r}, {learned.latent_error!r}) "
                         f"are not its weight trial's ({validation!r}, {latent!r})")


def _check_latent_weight(latent_weight: object) -> tuple[float, ...]:
    """``latent_weight`` as its candidates: one positive finite number, or a tuple of at least 2 distinct ones."""
    def weight(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
            raise ValueError(f"latent_weight must be a positive finite number or a tuple of them, got "
                             f"{latent_weight!r}")
        return float(value)

    if not isinstance(latent_weight, tuple):
        if isinstance(latent_weight, (list, np.ndarray)):
            raise TypeError(f"latent_weight takes candidate weights as a tuple, got a {type(latent_weight).__name__} "
                            f"{latent_weight!r}")
        return (weight(latent_weight),)
    candidates = tuple(weight(w) for w in latent_weight)
    if len(candidates) < 2 or len(set(candidates)) != len(candidates):
        raise ValueError(f"latent_weight as a tuple holds at least 2 distinct candidate weights (one weight is a "
                         f"number), got {latent_weight!r}")
    return candidates


def _base_solver(name: str, options: Mapping[str, Any]) -> _solvers.Solver:
    registered_only(name, "solver", "that learn_encoder fits", registered=plain_encoders())
    obj = _solvers.get(name, **dict(options))
    refusal = encode_refusal(name)
    if refusal is not None:
        raise ValueError(f"solver {name!r} cannot encode: {refusal}")
    if obj.reversible:
        raise ValueError(f"solver {name!r} is reversible: its round trip is exact on any grid; nothing to learn")
    return obj


def _encode_sigmas(sigmas: np.ndarray) -> np.ndarray:
    """The encode's σ (0 up to σ_max): explicit σ values are run backwards as given (``Grid.solve_sigmas``;
    a mismatch would not pass silently: a shifted step without its shift is an error)."""
    return reversed_grid(sigmas)


def _encode_times(base: _solvers.Solver, sigmas: np.ndarray) -> list[float]:
    """The encode's grid in the time variable its (shifted) solve runs in: the keys of the shifts."""
    probe = _solvers.Shifted(base, {}, name=base.name)
    return formulation_for(probe, "encode").times(_encode_sigmas(sigmas).tolist())


def _shifted(base: _solvers.Solver, times: list[float], shifts) -> _solvers.Shifted:
    """``base`` shifted step by step, under the base's own name (so the engine picks the base's variables)."""
    table = {(t0, t1): float(d) for t0, t1, d in zip(times[:-1], times[1:], shifts)}
    return _solvers.Shifted(base, table, name=base.name)


def _with_decode_shifts(res: Result, shifts: tuple[float, ...]) -> Result:
    """The encode's result with its latent recording the decode's shifts (none when all are zero)."""
    if not any(shifts):
        return res
    return dataclasses.replace(res, latent=dataclasses.replace(res.latent, decode_shifts=tuple(shifts)))


class _GridWarp:
    """The generation grids of n steps that keep σ_max and 0: log σ_1 (the first positive σ) and the split of
    log σ_max − log σ_1 into n − 1 positive gaps (softmax weights), so every parameter vector is a valid grid."""

    def __init__(self, sigmas: np.ndarray) -> None:
        up = reversed_grid(np.asarray(sigmas, dtype=np.float64)[:-1])  # σ_1 < … < σ_n = σ_max
        self.top = float(up[-1])
        log = np.log(up)
        self.start = np.concatenate([[log[0]], np.log(np.diff(log) / (log[-1] - log[0]))])
        self.size = len(self.start) if len(up) >= 2 else 0

    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.start - 6.0, self.start + 6.0
        lo[0], hi[0] = self.start[0] - 4.0, min(self.start[0] + 4.0, math.log(self.top) - 1e-3)
        return lo, hi

    def grid(self, v: np.ndarray) -> np.ndarray:
        first, weights = float(v[0]), np.exp(v[1:] - np.max(v[1:]))
        cuts = np.concatenate([[0.0], np.cumsum(weights)]) / np.sum(weights)
        up = np.exp(first + (math.log(self.top) - first) * cuts)
        up[-1] = self.top
        return reversed_grid(np.concatenate([[0.0], up]))


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point torch.Tensor, got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 samples (one to fit, one held out), got shape "
                         f"{tuple(images.shape)}")


def _check_grid(sigmas: object) -> np.ndarray:
    s = np.asarray(sigmas, dtype=np.float64)
    if (s.ndim != 1 or s.size < 2 or not np.all(np.isfinite(s)) or s[-1] != 0.0 or np.any(np.diff(s) >= 0)):
        raise ValueError(f"sigmas must be a generation grid: 1-D, finite, strictly decreasing and ending at 0, got "
                         f"{np.array2string(s, precision=4)}")
    return s


def learn_encoder(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str = "euler",
    nfe: int,
    solver_options: Mapping[str, Any] | None = None,
    sigmas: np.ndarray | None = None,
    fit_grid: bool = True,
    fit_decode: bool = True,
    latent_weight: float | tuple[float, ...] = 1.0,
    bound: float = 1.5,
    iterations: int = 40,
    model_kwargs: Mapping[str, Any] | None = None,
    reference_tol: float = 1e-7,
) -> LearnedEncoder:
    """Fit the evaluation shifts of an encode and its decode with ``solver`` at ``nfe`` evaluations each way (and,
    with ``fit_grid``, their σ grid) so that the decode undoes the encode, on calibration ``images`` (model data
    scale, at least 2).

    The starting grid is ``sigmas`` when given (a generation grid, decreasing to 0, of at most the steps
    ``nfe`` buys each way: checked before any evaluation), else :func:`flowdiff.tune_roundtrip`'s grid for
    ``solver`` and ``nfe`` on the same images (its cost is counted) and the named grids of
    :data:`START_GRIDS` with σ_max equal to it: one fit from each, the best on the fitted half kept (the fit
    finds local minima). ``fit_grid=True`` fits the grid's σ (σ_max and 0 kept) jointly with the shifts;
    ``False`` keeps the starting grid. ``fit_decode=True`` fits a shift per decode step too, which the
    latents record (:attr:`flowdiff.Latent.decode_shifts`), so that ``decode(flow, latent)`` applies them;
    ``False`` leaves the decode plain. ``latent_weight`` (> 0) weighs the distance of the latents to the
    flow's own (see the module docstring); a tuple of candidate weights (at least 2, distinct) fits once per weight
    and lets the held-out half choose, blind to any other images: the fit with the lowest held-out round trip among
    those that beat the plain encode there with a latent no farther from the flow's, an exact tie to the earlier
    candidate (else the plain encode), the fitted-half objectives of different weights being incomparable; each
    candidate's held-out figures are kept in :attr:`LearnedEncoder.weight_trials`, their cost in ``fitting_nfe``.
    Each shift lies in ``[−bound, bound]`` and keeps its step's evaluations within [0, σ_max]; ``iterations`` caps
    the least-squares iterations. The even-indexed images are fitted, the odd-indexed ones decide (see
    :class:`LearnedEncoder`): shuffle or interleave images whose order has a pattern (sources taken in turn), or
    each half is one kind and a fit on one is judged on the other. Any non-reversible solver that encodes
    (``euler`` gains most: every one of its steps can be shifted; the multistep methods' steps out of and into
    σ = 0 are not). Use the result as ``learned.encode(flow, x)``. Images beyond the model's data range are
    warned about once per call. Where the held-out half keeps no fit, the result is the plain encode (``kept=False``)
    and a ``UserWarning`` (beginning :data:`NOT_KEPT`) says so.
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    _check_images(images)
    flow.check_input(images, "images")  # the whole batch: the fit's encodes see halves of it
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name (str), got {type(solver).__name__}")
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a mapping, got {type(solver_options).__name__}")
    options = dict(solver_options or {})
    base = _base_solver(solver, options)
    if isinstance(nfe, bool) or not isinstance(nfe, numbers.Integral) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1 (evaluations per direction), got {nfe!r}")
    nfe = int(nfe)  # a NumPy integer too, as generate's nfe takes it
    for name, flag in (("fit_grid", fit_grid), ("fit_decode", fit_decode)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral) or not 0 <= iterations <= 1000:
        raise ValueError(f"iterations must be an int in 0..1000, got {iterations!r}")
    iterations = int(iterations)
    weights = _check_latent_weight(latent_weight)
    if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not 0 < bound < math.inf:
        raise ValueError(f"bound must be a positive finite number, got {bound!r}")
    if (isinstance(reference_tol, bool) or not isinstance(reference_tol, numbers.Real)
            or not 0 < reference_tol <= 1e-3):
        raise ValueError(f"reference_tol must be a number in (0, 1e-3], got {reference_tol!r}")
    reference_tol = float(reference_tol)
    # the budget before any evaluation: the steps ``nfe`` buys each way (the encode's count; its decode costs no more)
    affordable = check_budget(solver, nfe, _solvers.steps_for_nfe(base, nfe, eval_end=encode_evaluates_end(base)))
    if sigmas is not None:
        sigmas = _check_grid(sigmas)
        if len(sigmas) - 1 > affordable:
            raise ValueError(f"sigmas= has {len(sigmas) - 1} steps, more than nfe={nfe} buys each way with solver "
                             f"{solver!r} ({affordable} steps): give a grid of at most {affordable} steps or a "
                             "larger nfe")
    check_data_range(images, "images")  # once here; the many encodes below (data_range_checked) see parts of them
    images = images.detach()  # the fit's result is numbers (σ, shifts), not a function of the images autograd could use
    bound = float(bound)
    fingerprint = record_fingerprint(flow, model_kwargs, "learn_encoder")  # after the arguments, before any evaluation
    start = time.perf_counter()
    spent = {"nfe": 0, "solves": 0}
    if sigmas is None:
        with data_range_checked():
            tuned = tune_roundtrip(flow, images, solver=solver, nfe=nfe, solver_options=options,
                                   model_kwargs=model_kwargs)
        sigmas = np.asarray(tuned.sigmas, dtype=np.float64)
        initial_name = f"round-trip grid (from {tuned.initial_grid})"
        spent["nfe"] += tuned.tuning_nfe
        starts = [(initial_name, sigmas)] + [
            (g, s) for g in START_GRIDS
            if len(s := make_sigmas(flow.schedule, g, len(sigmas) - 1)) == len(sigmas) and s[0] == sigmas[0]]
    else:
        initial_name = "given"
        starts = [(initial_name, sigmas)]
    n = len(sigmas) - 1
    fit, held = images[0::2], images[1::2]
    spent["nfe"] += check_rows_split(flow, images, model_kwargs, (slice(0, None, 2), slice(1, None, 2)))
    # each half with its rows of the per-sample model keywords (class labels); shared ones are passed whole
    fit_kw, held_kw = (model_kwargs_rows(model_kwargs, images.shape[0], slice(i, None, 2)) for i in (0, 1))
    with torch.no_grad(), data_range_checked():
        ref = encode(flow, images.to(torch.float64), solver="dopri5", model_kwargs=model_kwargs,
                     adaptive=Adaptive(rtol=reference_tol, atol=reference_tol, sigma_start=float(sigmas[0])))
    spent["nfe"] += ref.stats.nfe
    ref_fit, ref_held = ref.x[0::2], ref.x[1::2]

    def roundtrip(sig: np.ndarray, shifts: tuple[tuple[float, ...], tuple[float, ...]],
                  part: Tensor, part_kw: dict[str, Any]) -> tuple[Tensor, Tensor]:
        with torch.no_grad(), data_range_checked():
            enc = encode(flow, part, solver=_shifted(base, _encode_times(base, sig), shifts[0]), grid=sig,
                         model_kwargs=part_kw)
            dec = decode(flow, _with_decode_shifts(enc, shifts[1]).latent, model_kwargs=part_kw)
        if enc.stats.nfe > nfe or dec.stats.nfe > nfe:
            raise ValueError(f"the grid spends {enc.stats.nfe} + {dec.stats.nfe} evaluations with solver "
                             f"{solver!r}, over nfe={nfe} each way")
        spent["nfe"] += enc.stats.nfe + dec.stats.nfe
        spent["solves"] += 1
        return dec.x.to(torch.float64), enc.latent.x.to(torch.float64)

    def errors(sig, shifts, part, target, part_kw) -> tuple[float, float]:
        try:
            x, z = roundtrip(sig, shifts, part, part_kw)
        except _solvers.SolveError:
            return math.inf, math.inf
        return _rms(x - part.to(torch.float64)), _rms(z - target)

    def intervals(sig: np.ndarray, directions: tuple[str, ...]) -> list[list[tuple[float, float]]]:
        """Each step's shift interval per direction: within ±bound, every evaluation in [0, σ_max]."""
        return [shift_intervals(base, sig, flow.schedule, float(bound), d) for d in directions]

    Shifts = tuple[tuple[float, ...], tuple[float, ...]]

    def fitted(sig0: np.ndarray, weight: float) -> tuple[float, np.ndarray, Shifts]:
        """The fit from the grid ``sig0`` with latent weight ``weight``: (objective on the fitted half, grid, (encode
        shifts, decode shifts))."""
        directions = ("encode", "decode") if fit_decode else ("encode",)
        limits = intervals(sig0, directions)
        slots = [(k, i) for k in range(len(directions)) for i, (lo, hi) in enumerate(limits[k]) if lo < hi]
        warp = _GridWarp(sig0) if fit_grid else None
        grid_size = 0 if warp is None else warp.size

        def unpack(v: np.ndarray) -> tuple[np.ndarray, Shifts]:
            g = v[len(slots):]
            moved = grid_size and not np.array_equal(g, warp.start)  # type: ignore[union-attr]
            sig = warp.grid(g) if moved else sig0  # type: ignore[union-attr]
            within = intervals(sig, directions) if moved else limits  # the moved grid's own intervals
            shifts = [[0.0] * n, [0.0] * n]
            for (k, i), d in zip(slots, v[:len(slots)]):
                lo, hi = within[k][i]
                shifts[k][i] = min(max(float(d), lo), hi)
            return sig, (tuple(shifts[0]), tuple(shifts[1]))

        def residual(v: np.ndarray) -> np.ndarray:
            sig, shifts = unpack(v)
            size = fit.numel() + ref_fit.numel()
            try:
                x, z = roundtrip(sig, shifts, fit, fit_kw)
            except _solvers.SolveError:
                return np.full(size, 1e3)
            r = torch.cat([(x - fit.to(torch.float64)).reshape(-1), weight * (z - ref_fit).reshape(-1)])
            r = r.cpu().numpy()
            return r if np.all(np.isfinite(r)) else np.full(size, 1e3)

        v = np.zeros(len(slots))
        if grid_size:
            v = np.concatenate([v, warp.start])  # type: ignore[union-attr]
        if len(v) and iterations > 0:
            from scipy.optimize import least_squares

            lo, hi = np.array([limits[k][i][0] for k, i in slots]), np.array([limits[k][i][1] for k, i in slots])
            if grid_size:
                glo, ghi = warp.bounds()  # type: ignore[union-attr]
                lo, hi = np.concatenate([lo, glo]), np.concatenate([hi, ghi])
            # trust-region reflective scales each step by the distance to the bounds (Coleman–Li): a shift that starts
            # on one (a step out of σ_max or out of 0 can move its evaluation one way only) barely moves, and on the
            # shipped model the whole fit stopped at its start; so every shift starts 1e-3 of its interval inside
            k, inside = len(slots), 1e-3 * (hi[:len(slots)] - lo[:len(slots)])
            v[:k] = np.clip(v[:k], lo[:k] + inside, hi[:k] - inside)
            v = least_squares(residual, v, bounds=(lo, hi), method="trf", jac="2-point", diff_step=1e-3,
                              max_nfev=iterations, x_scale=1.0).x
        r = residual(v)
        return float(np.dot(r, r)), *unpack(v)

    plain = ((0.0,) * n, (0.0,) * n)
    base_val, base_lat = errors(sigmas, plain, held, ref_held, held_kw)
    trials = []  # per candidate weight: (held-out round trip, held-out latent error, grid, shifts)
    for weight in weights:  # each weight's best start on the fitted half, which its own weight scores
        _, sig_w, shifts_w = min((fitted(s0, weight) for _, s0 in starts), key=lambda c: c[0])
        trials.append((*errors(sig_w, shifts_w, held, ref_held, held_kw), sig_w, shifts_w))

    def beats_plain(i: int) -> bool:
        return trials[i][0] < base_val and trials[i][1] <= base_lat

    # the held-out half chooses the weight: the lowest round trip there among the fits it would keep
    chosen = min(range(len(weights)), key=lambda i: (not beats_plain(i), trials[i][0], i))
    val, lat, learned_sig, learned_shifts = trials[chosen]
    kept = beats_plain(chosen)
    calib, _ = errors(learned_sig, learned_shifts, fit, ref_fit, fit_kw)
    base_calib, _ = errors(sigmas, plain, fit, ref_fit, fit_kw)
    encode_shifts, decode_shifts = learned_shifts if kept else plain
    if not kept:  # the held-out errors are those of what the result encodes with: the plain encode
        warnings.warn(f"{NOT_KEPT}: on the held-out half of the images no fit beat it (the nearest: round trip "
                      f"{val:.4g} against the plain encode's {base_val:.4g}, latent error {lat:.4g} against "
                      f"{base_lat:.4g}; a fit is kept only if it is lower in both), so the result is the plain "
                      f"{solver!r} encode on the starting grid ({initial_name}) with kept=False; more calibration "
                      "images, another latent_weight or solver may fit", UserWarning, stacklevel=2)
        val, lat = base_val, base_lat
    return LearnedEncoder(
        solver, options, nfe, (learned_sig if kept else sigmas).copy(), encode_shifts, decode_shifts,
        fingerprint, kept, calib, base_calib, val, base_val, lat, base_lat, initial_name,
        spent["nfe"], ref.stats.nfe, spent["solves"], time.perf_counter() - start,
        {"fit_grid": fit_grid, "fit_decode": fit_decode,
         "latent_weight": weights[0] if len(weights) == 1 else list(weights), "bound": bound,
         "iterations": iterations, "reference_tol": float(reference_tol), "calibration_batch": int(images.shape[0])},
        weights[chosen], tuple((w, t[0], t[1]) for w, t in zip(weights, trials)))


def _rms(diff: Tensor) -> float:
    value = float(diff.pow(2).mean().sqrt())
    return value if math.isfinite(value) else math.inf

