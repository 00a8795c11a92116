"""Learned low-NFE solvers: evaluation times, grids, multistep coefficients, output scales, x_T directions and
the previous steps' directions fitted to one model's teacher.

At 4–10 evaluations a tuned grid (:mod:`flowdiff.tools.tuning`) leaves an error that a better
grid alone no longer removes. Seven things can take the model's shape, each fitted per step to a
few hundred teacher trajectories (``learn=``; the default fits shifts, grid and start together — LD3's pair and
the first σ — and then the output scales, then the x_T directions, then those two together):

* ``"shifts"`` — **evaluation times** (LD3, Tong et al., "Learning to Discretize Denoising
  Diffusion ODEs", ICLR 2025; the time-shift sampler, Li et al., ICLR 2024; AMED, Zhou et al.,
  CVPR 2024): in the step (t₀, t₁) the model is evaluated at t + δ_i·(t₁ − t₀) while its result
  is used as the derivative at t (:class:`solvers.Shifted`, t the solve's own time variable).
  One δ per step, the first included, for any solver that is not reversible (Runge–Kutta or
  multistep). At a few steps the state lags or leads the trajectory its time stands for; the
  shift lets the model see the noise level the state actually has. δ = 0 is the base method bit
  for bit; δ ≠ 0 is a first-order perturbation, meant for the grid and budget it was fitted on.
* ``"coefficients"`` — an order-keeping correction of a variable-step Adams method
  (:class:`solvers.CorrectedAdams`): at every step whose history holds more derivatives than
  the method uses, ``terms`` multiples ``c`` of the next-order Adams terms are added,
  y₁ = y₁^{base} + Σ_m c_{i,m}·T_{i,m} with T_{i,m} = O(h^{n+m+1}), so any bounded ``c`` keeps
  the base method's order (S4S, Frankel et al., ICML 2025; DC-Solver's compensation, Zhao et
  al., ECCV 2024). It acts only from the third or fourth step on.
* ``"grid"`` — the grid's σ themselves, refined from the grid the fit starts at (LD3 learns
  them jointly with the shifts): every σ but the first and the last moves in log σ by at most
  0.45 of its gap to the nearer neighbour, so the grid stays ordered and keeps its step count.
* ``"start"`` — the grid's first σ, where the solve takes the noise as its state (x̄ = noise·√(1+σ²),
  as DDIM's and diffusers' ``leading`` spacings do, which start below σ_max): its log σ lies at
  a fraction f ∈ [0.1, 1] of the way from the second σ (as fitted) to log σ_max, so σ_start ∈
  (σ_1, σ_max] and the grid stays ordered whatever σ_1 does. The teacher still
  starts at σ_max (a flow-matching model with a step out of pure noise: at t = 1, σ = ∞, :func:`reference_solution`'s
  default there): what the solve skips above σ_start is part of the error it is fitted on, so
  the start drops only where the steps it frees gain more than the skipped interval costs. Its
  error is not convex in it, so it is fitted from the best of an 8-point scan of f, twice: after
  the other kinds named (so the fitted half ends no worse than without it) and before them (so
  the grid fits itself to a low start); each route ends with a joint fit, the better is kept.
* ``"scales"`` — the **magnitude of the model's output** at each step, which no time, grid or
  coefficient changes: the step's ε is taken as (1 + s_i)·ε, in data-prediction terms
  D' = (1 + s_i)·D − s_i·x̄ (:class:`solvers.Scaled`, about the field a zero ε gives in the
  solver's variables: 0 in σ, x̄ in the data variables), |s_i| ≤ :data:`SCALE_BOUND`. This is
  epsilon scaling (Ning et al., "Elucidating the Exposure Bias in Diffusion Models", ICLR 2024)
  with one learned factor per step, the one-dimensional case of PAS's correction of the sampling
  direction (Wang et al., "Diffusion Sampling Correction via Approximately 10 Parameters", ICML
  2025). s = 0 is the method without it bit for bit; a step the entry point gives a method of its
  own (into σ = 0: Heun's final Euler step, the data variables' limit) takes none. The scales are
  fitted last, alone at first, on top of what the other kinds named reached, and stay only if the
  held-out half prefers them to that fit without them.
* ``"directions"`` — the **direction** of the model's output per step, within the plane of the
  solve's initial state x_T and the step's own direction d = f − a (a the field of a zero ε): step i
  adds w_i·|d|·û, û the unit part of x_T perpendicular to d (per sample), |w_i| ≤
  :data:`DIRECTION_BOUND` (:class:`solvers.Scaled` ``directions=``, which records x_T when the solve
  starts). This is the two-direction core of PAS (Wang et al., ICML 2025, above). w = 0 is the
  method without it bit for bit; the steps that take scales take directions. They are fitted after
  the scales, alone, and then together with them (one fit of both vectors from there: a direction
  changes the best scale); the held-out half chooses among that joint fit, the scales alone (as
  fitted alone) and neither, on a tie the simpler.
* ``"trajectory"`` — the rest of PAS's basis: per step, weights c_{i,j} (|c| ≤ :data:`TRAJECTORY_BOUND`) on the
  directions of the :data:`TRAJECTORY_DEPTH` steps before it, each taken as a unit vector less its parts along d,
  x_T and the nearer previous directions (Gram–Schmidt, per sample; :class:`solvers.Scaled` ``trajectory=``): step
  i adds Σ_j c_{i,j}·|d|·r_{i,j}. The parts r are not renormalised: a direction that turned little leaves a small
  one, so the term is O(h) and the solve stays consistent where the scales and the x_T direction change the field
  by O(1). Not in the default (``benchmarks/RESULTS.md``, "Issue 26 item 1: the trajectory basis (engineer L3)").
  Fitted last, alone on top of everything else and then jointly with the scales and directions; the held-out
  half chooses among that fit and the three variants above.

What ``learn`` names is fitted together by bounded least squares on the image error against the teacher,

    min_{δ,c,σ}  Σ_samples |generate(noise_fit; δ, c, σ) − x_ref|²,   |c_{i,m}| ≤ bound,  |δ_i| ≤ shift_bound,

with ``x_ref`` = :func:`flowdiff.reference_solution` from σ_max (from t = 1, σ = ∞, on a flow-matching model
with a step out of pure noise: its default there; the student's grid, from σ_max, is the one it
would use anyway: the shipped tuned grid of that model, solver and budget when there is one, else ``logsnr``),
the Jacobian by forward differences (one candidate solve per parameter). A shift is further
bounded so that every evaluation stays between σ = 0 and the schedule's σ_max (the model has
no time outside; the first step out of σ_max can only move its evaluation down). With ``robust=τ`` the sum is
Huber's per sample instead (each sample's RMS error e counts e² up to τ·m and 2τm·e − (τm)² above, m the base
method's median e): a few samples that land in another training image's basin carry most of the squared error, and
a fit that chases them does not carry over to other noise; measured mixed, so opt-in (``benchmarks/RESULTS.md``,
"Issue 26 item 1: a robust fitted objective, and a held-out shrinkage (engineer L4)"); the held-out decision below
stays on the RMS error. The noise is
split: the even-indexed half is fitted, the odd-indexed half decides — the learned solver is
kept only if its RMS error on the held-out half is below the base method's on the starting
grid; otherwise the result is the base method on that grid (``kept=False``). Where more than
one kind is learned, each is first fitted alone and the fit of all starts from the best of them.
A kept fit is then **cross-fitted**: the variant the held-out half chose is fitted again on all the
noise, from the half's fit (the same parameters free, the same bounds and ``iterations``; what that
variant left at zero stays zero), so that the half the decision was made on shapes the result too
(measured against the half-fit on evaluation noise in ``benchmarks/learned_crossfit.py``). Its held-out
error is the half-fit's: the refit has no noise left to be judged on, and that figure is the only
honest one. With ``folds=2`` (opt-in) the same is done with the halves swapped, on the same teacher solve, and the
kept folds' refits are averaged (the grid's σ geometrically, the rest arithmetically: every bound is an interval in
those variables, so the average is a fit of the same kind); its held-out figure pools both folds' held-out halves,
each sample judged by the half-fit that did not see it (measured in ``benchmarks/learned_crossfit.py``;
``benchmarks/RESULTS.md``, "Issue 26 item 1: the 2-fold average in ``learn_solver`` (engineer L5)").

A :class:`LearnedSolver` records the flow's fingerprint, the grid, the shifts and coefficients,
its errors and its cost in model evaluations (``fitting_nfe``: the teacher's and every
candidate solve's), saves to JSON and loads only for the flow it was fitted on, like a
:class:`~flowdiff.TunedGrid`.
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

from ..api.sampling import decode, encode, generate
from ..engine._checks import check_data_range, data_range_checked, model_kwargs_rows
from ..engine.flow import ProbabilityFlow
from ..engine.formulations import (
    encode_evaluates_end,
    encode_refusal,
    formulation_for,
)
from ..engine.grids import make_sigmas, reversed_grid
from ..engine.plugins import registered_only
from ..engine.schedules import Schedule
from .reference import reference_solution
from .tuning import (
    TunedGrid,
    _Warp,
    check_fingerprint,
    check_rows_split,
    read_record,
    record_fingerprint,
    stored_grid,
    write_record,
)

__all__ = ["LearnedSolver", "learn_solver", "tune_roundtrip"]

_FORMAT = "flowdiff.LearnedSolver/5"
#: files written before the trajectory kind existed (no ``trajectory``); still read
_FORMAT_4 = "flowdiff.LearnedSolver/4"
#: files written before directions existed (no ``directions``); still read
_FORMAT_3 = "flowdiff.LearnedSolver/3"
#: files written before scales existed (no ``scales``); still read
_FORMAT_2 = "flowdiff.LearnedSolver/2"
#: files written before shifts existed: coefficients only (``learn=("coefficients",)``); still read
_FORMAT_1 = "flowdiff.LearnedSolver/1"

#: the largest |s| of a learned output scale (``learn="scales"``): the field is scaled by 1 + s ∈ [0.5, 1.5]
SCALE_BOUND = 0.5

#: the largest |w| of a learned x_T direction weight (``learn="directions"``), in units of the step's own |d|
DIRECTION_BOUND = 0.5

#: the largest |c| of a learned trajectory weight (``learn="trajectory"``), in units of the step's own |d|
TRAJECTORY_BOUND = 1.0

#: how many previous steps' directions a step's trajectory weights reach back (``learn="trajectory"``): one, the
#: previous step's (two measured higher on the evaluation noise: RESULTS.md, engineer L3)
TRAJECTORY_DEPTH = 1

#: candidate starts tried across the start's interval (evenly in log σ) before its least-squares fit
_START_SCAN = 8

#: How :func:`learn_solver`'s warning that the held-out half rejected every fit (``kept=False``) begins.
NOT_KEPT = "learn_solver kept the base method"

#: what :func:`learn_solver` can fit (``learn=``)
LEARNABLE = ("shifts", "coefficients", "grid", "start", "scales", "directions", "trajectory")


@dataclass(frozen=True)
class LearnedSolver:
    """A ``solver`` with per-step evaluation shifts, grid and/or coefficients fitted at budget ``nfe`` on one flow.

    ``learn`` says what was fitted (``"shifts"``, ``"coefficients"``, ``"grid"``, ``"start"``, ``"scales"``,
    ``"directions"``).
    ``sigmas`` is the generation grid they belong to (fitted too with ``"grid"`` or ``"start"``: then
    ``base_sigmas`` is the grid the fit started from and the base method is judged on; a learned start
    below σ_max is where :func:`flowdiff.generate` takes the noise as its state), ``shifts[i]`` the
    evaluation shift δ of step ``i`` (empty unless shifts were learned), ``coefficients[i]`` the
    correction multiples of step ``i`` (empty where a step takes none, or unless coefficients were
    learned), ``scales[i]`` the output scale s of step ``i`` (its ε taken as (1 + s)·ε; empty unless
    scales were learned), ``directions[i]`` its x_T direction weight w (empty unless directions were
    learned), ``trajectory[i]`` its weights on the previous steps' directions (the latest first; empty unless the
    trajectory was learned). ``kept`` says whether the held-out half preferred the learned solver to the base method;
    when not, shifts, scales, directions, trajectory weights and coefficients are zero, :attr:`sigmas` is the
    starting grid and :meth:`as_solver` is the base method itself. A kept solver is the refit on all the
    calibration noise (``options["fitted_on"] == "all"``; ``"even half"`` where nothing was refitted).
    ``calibration_error`` / ``base_calibration_error`` are the RMS image errors of the learned and the base method
    on the noise it was fitted on (all of it, or the even half), ``validation_error`` / ``base_validation_error``
    those of the half-fit and the base method on the held-out half: the refit's own is not known (it saw that
    half), so the half-fit's is the figure to trust (with ``options["folds"] == 2``, the average of two folds' refits,
    they pool both folds' held-out halves over the whole batch: see :func:`learn_solver`). ``fitting_nfe`` counts
    every model evaluation the fit spent (the refit included, and the teacher with the looser solve that checks it:
    ``reference_nfe``, counted even when :func:`flowdiff.reference_solution`'s cache supplied it, so the figure is the
    fit's cost from nothing), ``solves`` the candidate solves. ``source`` is the file it was read from.

    Use: ``generate(flow, noise, solver=learned.as_solver(), grid=learned.sigmas)``.
    """

    solver: str
    solver_options: dict[str, Any]
    nfe: int
    sigmas: np.ndarray
    coefficients: tuple[tuple[float, ...], ...]
    fingerprint: str
    kept: bool
    calibration_error: float = math.nan
    base_calibration_error: float = math.nan
    validation_error: float = math.nan
    base_validation_error: float = math.nan
    grid: str = ""
    fitting_nfe: int = 0
    reference_nfe: int = 0
    solves: int = 0
    fitting_seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    shifts: tuple[float, ...] = ()
    learn: tuple[str, ...] = ("coefficients",)  # what a format-1 file holds
    base_sigmas: np.ndarray | None = None
    scales: tuple[float, ...] = ()
    directions: tuple[float, ...] = ()
    trajectory: tuple[tuple[float, ...], ...] = ()

    def base_grid(self) -> np.ndarray:
        """The grid the base method is judged on: the grid the fit started from (:attr:`sigmas` unless the grid
        itself was learned)."""
        return self.sigmas if self.base_sigmas is None else self.base_sigmas

    def base(self) -> _solvers.Solver:
        """The base method (registry name and options)."""
        return _base_solver(self.solver, self.solver_options, self.learn)

    def as_solver(self) -> _solvers.Solver:
        """The solver to generate with on :attr:`sigmas`: the learned method, or the base one if not kept."""
        return self._fitted() if self.kept else self.base()

    def _check_steps(self) -> None:
        """Shifts, scales and directions hold one value per step of :attr:`sigmas` where :attr:`learn` names them,
        none where not (a short list would be zipped with the steps and its last values dropped); every shift and
        coefficient is finite, every scale and direction weight within the bound :func:`learn_solver` fits it in
        (a hand-edited file could hold a scale of 3 or NaN, which the solve would take as it is). :attr:`sigmas` and
        :attr:`base_sigmas` are generation grids (finite σ >= 0, strictly decreasing), ``nfe`` an int that pays for
        :attr:`sigmas`' steps with :attr:`solver` (what ``compare`` labels its row with), ``kept`` a bool."""
        for name, grid in (("sigmas", self.sigmas), ("base_sigmas", self.base_sigmas)):
            if grid is not None:
                check_fitted_grid(name, grid, "learn_solver")
        if not isinstance(self.kept, bool):
            raise ValueError(f"kept must be true or false, got {self.kept!r}")
        if isinstance(self.nfe, bool) or not isinstance(self.nfe, int) or self.nfe < 1:
            raise ValueError(f"nfe must be an int >= 1 (the budget the solver was fitted at), got {self.nfe!r}")
        steps = len(self.sigmas) - 1
        cost = _solvers.nfe_for_steps(self.base(), steps, eval_end=bool(self.sigmas[-1] != 0))
        if cost > self.nfe:
            raise ValueError(f"nfe = {self.nfe} is below the {cost} evaluations solver {self.solver!r} spends on the "
                             f"{steps} steps of sigmas: learn_solver fits a grid within its budget; accepted: an nfe "
                             f"of at least {cost}")
        for kind in ("shifts", "scales", "directions"):
            values = getattr(self, kind)
            if kind not in self.learn and values:
                raise ValueError(f"{kind} must be empty unless learn names {kind!r}, got {len(values)} values "
                                 f"with learn={list(self.learn)}")
            if kind in self.learn and len(values) != len(self.sigmas) - 1:
                raise ValueError(f"{kind} must hold one value per step of sigmas ({len(self.sigmas) - 1}), "
                                 f"got {len(values)}")
        if "trajectory" not in self.learn and self.trajectory:
            raise ValueError(f"trajectory must be empty unless learn names 'trajectory', got "
                             f"{len(self.trajectory)} values with learn={list(self.learn)}")
        if "trajectory" in self.learn and len(self.trajectory) != len(self.sigmas) - 1:
            raise ValueError(f"trajectory must hold one tuple of weights per step of sigmas ({len(self.sigmas) - 1}), "
                             f"got {len(self.trajectory)}")
        entries_bounded = [(f"{kind}[{i}]", value, name, bound)
                           for kind, name, bound in (("scales", "SCALE_BOUND", SCALE_BOUND),
                                                     ("directions", "DIRECTION_BOUND", DIRECTION_BOUND))
                           for i, value in enumerate(getattr(self, kind))]
        entries_bounded += [(f"trajectory[{i}][{j}]", value, "TRAJECTORY_BOUND", TRAJECTORY_BOUND)
                            for i, cs in enumerate(self.trajectory) for j, value in enumerate(cs)]
        for where, value, name, bound in entries_bounded:
            if not (math.isfinite(value) and abs(value) <= bound):
                kind = where.split("[")[0]
                raise ValueError(f"{where} = {value!r} is outside [-{bound}, {bound}]: learn_solver fits "
                                 f"each of {kind} within ±flowdiff.tools.learned.{name} = {bound}; accepted: "
                                 "a finite value of at most that size")
        entries = [(f"shifts[{i}]", d) for i, d in enumerate(self.shifts)]
        entries += [(f"coefficients[{i}][{m}]", c) for i, cs in enumerate(self.coefficients) for m, c in enumerate(cs)]
        for where, value in entries:
            if not math.isfinite(value):
                raise ValueError(f"{where} = {value!r} is not finite; accepted: a finite number")
        if "coefficients" in self.learn:
            self._check_coefficients()

    def _check_coefficients(self) -> None:
        """One tuple of coefficients per step, each no longer than the terms the step can take (``terms`` of the
        options, else the most, 3) and each coefficient within ``options["bound"]`` where recorded: a longer tuple
        failed inside the solve, a coefficient of 1e9 (bound 4) loaded and the solve diverged."""
        steps = len(self.sigmas) - 1
        if len(self.coefficients) not in (steps, 0):
            raise ValueError(f"coefficients must hold one tuple per step of sigmas ({steps}), got "
                             f"{len(self.coefficients)}")
        options = self.options if isinstance(self.options, dict) else {}
        terms = options.get("terms", 3)
        terms = terms if isinstance(terms, int) and not isinstance(terms, bool) and 1 <= terms <= 3 else 3
        counts = _layout(self.base(), self.sigmas, terms, ("coefficients",), None, 0.0)[0]  # type: ignore[arg-type]
        bound = options.get("bound", math.inf)
        for i, (cs, n) in enumerate(zip(self.coefficients, counts)):
            if len(cs) > n:
                raise ValueError(f"coefficients[{i}] holds {len(cs)} values, but step {i} of sigmas takes at most {n} "
                                 f"correction term(s) with solver {self.solver!r}")
            for m, c in enumerate(cs):
                if isinstance(bound, (int, float)) and math.isfinite(c) and abs(c) > bound:
                    raise ValueError(f"coefficients[{i}][{m}] = {c!r} is outside [-{bound}, {bound}]: learn_solver "
                                     "fits each coefficient within ±bound (its options['bound']); accepted: a finite "
                                     "value of at most that size")

    def _fitted(self) -> _solvers.Solver:
        try:
            self._check_steps()
        except ValueError as err:  # name the file a hand-edited solver came from
            raise ValueError(f"{self.source}: {err}" if self.source else str(err)) from None
        return _composed(self.base(), self.sigmas, self.coefficients if "coefficients" in self.learn else None,
                         self.shifts if "shifts" in self.learn else None,
                         self.scales if "scales" in self.learn else None,
                         self.directions if "directions" in self.learn else None,
                         self.trajectory if "trajectory" in self.learn else None)

    def check(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` unless this solver was fitted on ``flow`` (with ``model_kwargs``). Conditioning that
        is one value repeated per sample (a class label, ``flowdiff sample --class-label``'s) has one fingerprint at
        any batch size (:func:`flowdiff.flow_fingerprint`), so it matches a fit made on another batch."""
        check_fingerprint(self.fingerprint, flow, model_kwargs, "this learned solver was fitted",
                          "fit it again with flowdiff.learn_solver")

    def _check_shifts(self, schedule: Schedule) -> None:
        """Each shift of a file within the interval :func:`learn_solver` fits it in on :attr:`sigmas` (``shift_bound``
        of its options, where recorded, and no evaluation outside [0, σ_max] of the schedule): a hand-edited shift of
        3 would evaluate the model where it has no time, or past the step it belongs to. (A solver built in Python
        with other shifts is its maker's: :meth:`validated` judges it.)"""
        bound = self.options.get("shift_bound", math.inf) if isinstance(self.options, dict) else math.inf
        check_fitted_shifts(self.shifts, shift_intervals(self.base(), self.sigmas, schedule, float(bound)),
                            "shifts", f"learn_solver (within ±shift_bound = {bound!r}", self.source)

    def validated(self, flow: ProbabilityFlow, noise: Tensor, *,
                  model_kwargs: Mapping[str, Any] | None = None) -> LearnedSolver:
        """This solver judged on ``noise`` (held out from its fit): kept only if its RMS error against the
        reference is below the base method's on its grid (:meth:`base_grid`); otherwise the base method on
        that grid (``kept=False``)."""
        self.check(flow, model_kwargs)
        _check_noise(noise)
        target = _reference(flow, noise, model_kwargs, float(self.options.get("reference_tol", 1e-7)))[0]
        learned = _rms(generate(flow, noise, solver=self._fitted(), grid=self.sigmas, model_kwargs=model_kwargs).x,
                       target)
        base = _rms(generate(flow, noise, solver=self.base(), grid=self.base_grid(), model_kwargs=model_kwargs).x,
                    target)
        return self._decided(learned, base)

    def _decided(self, learned: float, base: float) -> LearnedSolver:
        kept = learned < base
        coefficients = self.coefficients if kept else tuple(tuple(0.0 for _ in c) for c in self.coefficients)
        shifts = self.shifts if kept else tuple(0.0 for _ in self.shifts)
        scales = self.scales if kept else tuple(0.0 for _ in self.scales)
        directions = self.directions if kept else tuple(0.0 for _ in self.directions)
        trajectory = self.trajectory if kept else tuple(tuple(0.0 for _ in c) for c in self.trajectory)
        return replace(self, kept=kept, coefficients=coefficients, shifts=shifts, scales=scales, directions=directions,
                       trajectory=trajectory,
                       sigmas=self.sigmas if kept else self.base_grid().copy(),
                       validation_error=learned if kept else base, base_validation_error=base)

    def save(self, path: str | Path) -> Path:
        """Write the solver (σ, shifts, scales, directions, trajectory weights and coefficients as exact float hex
        strings) and what it was fitted for as JSON (format ``flowdiff.LearnedSolver/5``)."""
        data = asdict(self)
        data["sigmas"] = [float(s).hex() for s in self.sigmas]
        data["coefficients"] = [[float(c).hex() for c in cs] for cs in self.coefficients]
        data["shifts"] = [float(d).hex() for d in self.shifts]
        data["scales"] = [float(d).hex() for d in self.scales]
        data["directions"] = [float(d).hex() for d in self.directions]
        data["trajectory"] = [[float(c).hex() for c in cs] for cs in self.trajectory]
        data["learn"] = list(self.learn)
        data["base_sigmas"] = None if self.base_sigmas is None else [float(s).hex() for s in self.base_sigmas]
        data.pop("source")
        return write_record(path, _FORMAT, data, "learned solver")

    @classmethod
    def load(cls, path: str | Path, flow: ProbabilityFlow,
             model_kwargs: Mapping[str, Any] | None = None) -> LearnedSolver:
        """Read a file written by :meth:`save` (or by an older version: format 4, without trajectory weights;
        format 3, without directions; format 2,
        without scales; format 1, coefficients only) and check that it belongs to ``flow`` (see :meth:`check`). A file
        written before cross-fitting (no ``options["fitted_on"]``) was fitted on the even half: it reads so; one written
        before ``robust=`` (no ``options["robust"]``) was fitted by plain least squares: it reads ``None``; one written
        before ``folds=`` (no ``options["folds"]``) was one fold: it reads 1."""
        path = Path(path)
        fmt = _FORMAT
        try:
            data = read_record(path, _FORMAT, "learned solver")
        except ValueError as err:
            for fmt in (_FORMAT_4, _FORMAT_3, _FORMAT_2, _FORMAT_1):
                try:
                    data = read_record(path, fmt, "learned solver")
                    break
                except ValueError:
                    continue
            else:
                raise err from None
        lacks = {_FORMAT: (), _FORMAT_4: ("trajectory",), _FORMAT_3: ("trajectory", "directions"),
                 _FORMAT_2: ("trajectory", "directions", "scales"),
                 _FORMAT_1: ("trajectory", "directions", "scales", "shifts", "learn", "base_sigmas")}[fmt]
        extra = [k for k in lacks if k in data]
        if extra:
            raise ValueError(f"{path}: malformed learned solver (format {fmt!r} holds no {', '.join(extra)})")
        try:
            data["sigmas"] = np.array([float.fromhex(s) for s in data["sigmas"]], dtype=np.float64)
            data["coefficients"] = tuple(tuple(float.fromhex(c) for c in cs) for cs in data["coefficients"])
            data["shifts"] = tuple(float.fromhex(d) for d in data.get("shifts", ()))
            data["scales"] = tuple(float.fromhex(d) for d in data.get("scales", ()))
            data["directions"] = tuple(float.fromhex(d) for d in data.get("directions", ()))
            data["trajectory"] = tuple(tuple(float.fromhex(c) for c in cs) for cs in data.get("trajectory", ()))
            data["learn"] = _check_learn(tuple(data.get("learn", ("coefficients",))))
            base_sigmas = data.get("base_sigmas")
            data["base_sigmas"] = None if base_sigmas is None else np.array(
                [float.fromhex(s) for s in base_sigmas], dtype=np.float64)
            if isinstance(data.get("options"), dict) and "fitted_on" not in data["options"]:
                # written before cross-fitting, when every fit (and its calibration_error) was the even half's
                data["options"] = {**data["options"], "fitted_on": "even half"}
            if isinstance(data.get("options"), dict) and "robust" not in data["options"]:
                # written before robust= existed, when every fit was plain least squares (robust=None)
                data["options"] = {**data["options"], "robust": None}
            if isinstance(data.get("options"), dict) and "folds" not in data["options"]:
                # written before folds= existed, when every fit was one fold (the even half's, refitted)
                data["options"] = {**data["options"], "folds": 1}
            learned = cls(**data, source=str(path))
            learned.base()
            learned._check_steps()
            moved = "grid" in learned.learn or "start" in learned.learn
            if moved != (learned.base_sigmas is not None) or (moved and learned.base_sigmas.shape
                                                               != learned.sigmas.shape):
                raise ValueError(f"learn={list(learned.learn)} needs base_sigmas "
                                 f"{'as long as sigmas' if moved else 'null'} (the grid the base method is judged "
                                 f"on), got {base_sigmas!r}")
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: malformed learned solver ({err})") from None
        learned.check(flow, model_kwargs)
        if "shifts" in learned.learn and any(learned.shifts):
            learned._check_shifts(flow.schedule)
        return learned


def check_fitted_grid(name: str, grid: object, fit: str, why: str = "") -> None:
    """Refuse a stored grid that ``fit`` (``"learn_solver"``, …) could not have written, or a grid given to it
    (``why`` then says what it is for): a generation grid is a 1-d float array of at least 2 finite σ >= 0, strictly
    decreasing (a hand-edited file may hold anything)."""
    s = np.asarray(grid)
    if s.ndim != 1 or s.size < 2 or not np.issubdtype(s.dtype, np.floating) or not np.all(np.isfinite(s)) \
            or np.any(s < 0) or np.any(np.diff(s) >= 0):
        raise ValueError(f"{name} must be a strictly decreasing list of at least 2 finite σ >= 0 (a generation grid, "
                         f"{why or f'as {fit} fits'}), got {s.tolist()}")


def check_fitted_shifts(shifts: Sequence[float], intervals: Sequence[tuple[float, float]], name: str, fit: str,
                        source: str) -> None:
    """Refuse a stored shift outside the interval its fit keeps it in (``fit`` says whose and its bound, an open
    parenthesis closed here): :func:`shift_intervals`, which every fit clips to, with a relative slack of 1e-6 for
    files of older versions; ``source`` is the file. A step whose interval is (0, 0) takes no shift (it evaluates
    nothing, or the entry point runs a method of its own there): what a file holds for it is not used."""
    for i, (d, (lo, hi)) in enumerate(zip(shifts, intervals)):
        slack = 1e-6 * (hi - lo)
        if lo < hi and not lo - slack <= d <= hi + slack:
            where = f"{source}: " if source else ""
            raise ValueError(f"{where}{name}[{i}] = {d!r} is outside [{lo!r}, {hi!r}], the interval {fit}, every "
                             f"evaluation between σ = 0 and the schedule's σ_max) keeps step {i}'s shift in on these "
                             "sigmas; accepted: a shift in it")


def _check_learn(learn: object) -> tuple[str, ...]:
    """``learn`` as a tuple of distinct names from :data:`LEARNABLE`, in that order."""
    names = (learn,) if isinstance(learn, str) else learn
    if not isinstance(names, (tuple, list)) or not names or not all(isinstance(n, str) for n in names):
        raise TypeError(f"learn must be one of {LEARNABLE} or a non-empty tuple or list of them (at least one kind "
                        f"to fit), got {learn!r}")
    unknown = [n for n in names if n not in LEARNABLE]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"learn must name each of {', '.join(map(repr, LEARNABLE))} at most once, got {learn!r}")
    return tuple(n for n in LEARNABLE if n in names)


def _base_solver(name: str, options: Mapping[str, Any], learn: Sequence[str]) -> _solvers.Solver:
    """The registered solver ``name``: one that is not reversible for shifts, a variable-step Adams method for
    coefficients."""
    registered_only(name, "solver", "that learn_solver fits")
    obj = _solvers.get(name, **dict(options))
    if "coefficients" in learn and (not isinstance(obj, _solvers.Adams) or isinstance(obj, _solvers.CorrectedAdams)):
        multistep = [n for n in _solvers.available(multistep=True)
                     if isinstance(_solvers.get(n), _solvers.Adams)]
        raise ValueError(f"solver must be a variable-step Adams method to learn coefficients for, got {name!r}; "
                         f"accepted: {', '.join(multistep)} (any solver that is not reversible with "
                         "learn=('shifts',))")
    if obj.reversible:
        raise ValueError(f"solver {name!r} is reversible: learn_solver fits solvers that are not (shifted "
                         "evaluations and corrections would break its exact inverse, and a grid alone is tuned by "
                         "flowdiff.tune); e.g. 'heun', 'unipc', 'dpmpp_3m'")
    return obj


def _composed(base: _solvers.Solver, sigmas: np.ndarray, coefficients: Sequence[Sequence[float]] | None,
              shifts: Sequence[float] | None, scales: Sequence[float] | None = None,
              directions: Sequence[float] | None = None,
              trajectory: Sequence[Sequence[float]] | None = None) -> _solvers.Solver:
    """``base`` with ``coefficients`` (:class:`solvers.CorrectedAdams`), then ``scales``, ``directions`` and
    ``trajectory`` (:class:`solvers.Scaled`, about the field of a zero ε: :func:`_scale_anchor`; the x_T direction
    weights and the previous directions' weights, the scales zero where only those are given) and then ``shifts``
    (:class:`solvers.Shifted`), all keyed by the steps of ``sigmas`` in ``base``'s generation variables."""
    name = f"{base.name}+learned"  # runs in its base method's variables (formulations.variables_of)
    form = formulation_for(base, "generate")
    times = form.times(sigmas)
    steps = list(zip(times[:-1], times[1:]))
    solver = base
    if coefficients is not None:
        solver = _solvers.CorrectedAdams(base, {s: tuple(c) for s, c in zip(steps, coefficients)}, name=name)
    if scales is not None or directions is not None or trajectory is not None:
        weights = None if directions is None else {s: float(w) for s, w in zip(steps, directions)}
        past = None if trajectory is None else {s: tuple(map(float, c)) for s, c in zip(steps, trajectory)}
        solver = _solvers.Scaled(solver, {s: float(k) for s, k in zip(steps, scales or [0.0] * len(steps))},
                                 anchor=_scale_anchor(form), name=name, directions=weights, trajectory=past)
    if shifts is not None:
        solver = _solvers.Shifted(solver, {s: float(d) for s, d in zip(steps, shifts)}, name=name)
    return solver


def _scale_anchor(form) -> _solvers.VectorField:
    """The field a zero ε gives in ``form``'s variables (0 in σ, x̄ in the data variables, where f = D = x̄ − σε):
    scaling the field about it scales ε, f_s = a + (1 + s)(f − a), i.e. D_s = (1 + s)·D − s·x̄."""
    return form.field(lambda sigma, xbar: torch.zeros_like(xbar))


def _scaled_steps(base: _solvers.Solver, sigmas: np.ndarray, schedule: Schedule) -> list[bool]:
    """Which generation steps an output scale acts in: those that evaluate the model with ``base`` (or a
    lower-order form of it), not those the formulation gives a method of its own (into σ = 0 in the data
    variables: the limit is read off the last denoised values, already scaled)."""
    form = formulation_for(base, "generate")
    grid = list(map(float, sigmas))
    probe = _solvers.Scaled(base, {}, name=base.name)
    replaced = form.grid(grid, probe, eval_end=grid[-1] != 0.0).methods
    return [bool(seen) and not (i in replaced and not isinstance(replaced[i], _solvers.Scaled))
            for i, seen in enumerate(_evaluated(base, grid, schedule))]


def _layout(base: _solvers.Solver, sigmas: np.ndarray, terms: int, learn: Sequence[str], schedule: Schedule,
            shift_bound: float) -> tuple[list[int], list[tuple[float, float]]]:
    """What each generation step can take: its number of coefficients (none where the formulation gives the step
    its own method, e.g. into σ = 0, else as many terms as its history allows: step i holds i + 1 derivatives),
    and the interval of its shift (:func:`shift_intervals`; all (0, 0) unless shifts are learned)."""
    grid = list(map(float, sigmas))
    n = len(grid) - 1
    counts = [0] * n
    if "coefficients" in learn:
        replaced = formulation_for(base, "generate").grid(grid, base, eval_end=grid[-1] != 0.0).methods
        probe = _solvers.CorrectedAdams(base, {(1.0, 0.0): (0.0,) * terms})
        counts = [0 if i in replaced else probe.available_terms(i + 1) for i in range(n)]
    intervals = shift_intervals(base, sigmas, schedule, shift_bound) if "shifts" in learn else [(0.0, 0.0)] * n
    return counts, intervals


def plain_encoders() -> tuple[str, ...]:
    """The registered solvers whose round trip :func:`tune_roundtrip` and :func:`flowdiff.learn_encoder` fit: those
    that encode and are not reversible (whose round trip is exact on any grid)."""
    return tuple(n for n in _solvers.available() if encode_refusal(n) is None and not _solvers.get(n).reversible)


def shift_intervals(base: _solvers.Solver, sigmas: np.ndarray, schedule: Schedule, shift_bound: float,
                    direction: str = "generate") -> list[tuple[float, float]]:
    """The interval of each step's evaluation shift δ (:class:`solvers.Shifted`) when ``base`` solves in
    ``direction`` (``"generate"``; ``"encode"``: the encode that runs the generation grid ``sigmas`` backwards,
    steps counted from σ = 0 up; ``"decode"``: a latent's decode on ``sigmas``): (0, 0) where the step evaluates
    nothing or is replaced by a method that evaluates unshifted, else within ±``shift_bound`` such that each of
    the step's evaluations stays between σ = 0 and the schedule's σ_max (or the grid's own range where it
    reaches further): the model has no time outside, and may accept one without a word."""
    form = formulation_for(base, direction)
    gen = list(map(float, sigmas))
    grid = reversed_grid(gen).tolist() if direction == "encode" else gen
    # whether the last step evaluates at its end, as the entry points decide it (a generation or a non-Euler
    # decode into σ = 0 takes a final Euler step; an encode always evaluates at its end)
    eval_end = direction == "encode" or gen[-1] != 0.0 or (direction == "decode" and base.name == "euler")
    replaced = form.grid(grid, _solvers.Shifted(base, {}, name=base.name), eval_end=eval_end).methods
    times = form.times(grid)
    ends = [form.time(float(schedule.sigma_max)), form.time(0.0), *times]
    lo_end, hi_end = min(ends), max(ends)
    intervals = [(0.0, 0.0)] * (len(grid) - 1)
    for i, (t0, t1, seen) in enumerate(zip(times[:-1], times[1:], _evaluated(base, gen, schedule, direction))):
        if (i in replaced and not isinstance(replaced[i], _solvers.Shifted)) or t0 == t1 or not seen:
            continue
        lo, hi = -shift_bound, shift_bound
        h = t1 - t0
        for t in map(form.time, seen):
            if math.isfinite(t):
                a, b = sorted(((lo_end - t) / h, (hi_end - t) / h))
                lo, hi = max(lo, a), min(hi, b)
        margin = 1e-9 * (hi - lo)  # off the ends, where rounding in the time variable could cross them
        lo, hi = (lo + margin if lo else lo), (hi - margin if hi else hi)
        intervals[i] = (lo, hi) if lo < hi else (0.0, 0.0)
    return intervals


def _evaluated(base: _solvers.Solver, sigmas: list[float], schedule: Schedule,
               direction: str = "generate") -> list[list[float]]:
    """The σ at which each step of a solve with ``base`` in ``direction`` (see :func:`shift_intervals`) on the
    generation grid ``sigmas`` evaluates the model: a fixed grid's evaluation points do not depend on the field,
    so a dry run with ε = 0 through the entry point itself finds them."""
    seen: list[list[float]] = [[]]
    recording = [direction != "decode"]

    def eps(xbar: Tensor, sigma: float) -> Tensor:
        if recording[0]:
            seen[-1].append(float(sigma))
        return torch.zeros_like(xbar)

    def stepped(_) -> None:
        seen.append([])

    dry = ProbabilityFlow.from_sigma_field(eps, schedule)
    zeros, grid = torch.zeros(1, 1, dtype=torch.float64), np.asarray(sigmas)
    if direction == "generate":
        generate(dry, zeros, solver=base, grid=grid, callback=stepped)
    elif direction == "encode":
        encode(dry, zeros, solver=base, grid=grid, callback=stepped)
    elif direction == "decode":
        latent = encode(dry, zeros, solver=base, grid=grid).latent
        recording[0] = True
        decode(dry, latent, callback=stepped)
    else:
        raise ValueError(f"direction must be 'generate', 'encode' or 'decode', got {direction!r}")
    return seen[: len(sigmas) - 1]


def _grid_moves(sigmas: np.ndarray) -> list[tuple[int, float]]:
    """The grid's movable σ (all but the first and the last) and how far each may move in log σ: 0.45 of the
    log gap to its nearer neighbour (to the one above only, next to σ = 0), so that the grid stays ordered."""
    logs = [math.log(s) if s > 0 else -math.inf for s in sigmas]
    return [(j, 0.45 * min(logs[j - 1] - logs[j], logs[j] - logs[j + 1])) for j in range(1, len(sigmas) - 1)
            if math.isfinite(logs[j])]


class _Start:
    """The first σ as the fraction ``f`` of the log-σ way from the second σ (as fitted) to σ_max:
    log σ_start = log σ_1 + f·(log σ_max − log σ_1), ``f`` in [0.1, 1], so the grid stays ordered whatever
    σ_1 does and the whole of (σ_1, σ_max] is in reach. The fitted parameter is ``f − f₀``, f₀ the starting
    grid's own fraction (1 where it starts at σ_max), so zero is the starting grid."""

    LOWEST = 0.1

    def __init__(self, sigmas: np.ndarray, schedule: Schedule) -> None:
        self.sigma_0, self.sigma_1 = float(sigmas[0]), float(sigmas[1])
        self.top = float(schedule.sigma_max)  # learn_solver refuses a starting grid above it
        self.log_max = math.log(float(schedule.sigma_max))
        self.f0 = (math.log(self.sigma_0) - math.log(self.sigma_1)) / (self.log_max - math.log(self.sigma_1))
        self.bounds = (self.LOWEST - self.f0, 1.0 - self.f0)

    def sigma(self, u: float, sigma_1: float) -> float:
        if u == 0.0 and sigma_1 == self.sigma_1:
            return self.sigma_0  # the starting grid's own, bit for bit
        # never above σ_max by the rounding of exp(log σ_max), nor down to σ_1 by the rounding of a short span
        sigma = math.exp(math.log(sigma_1) + (self.f0 + u) * (self.log_max - math.log(sigma_1)))
        return min(max(sigma, math.nextafter(sigma_1, math.inf)), self.top)


def _check_noise(noise: Tensor) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")


def _reference(flow: ProbabilityFlow, noise: Tensor, model_kwargs, tol: float) -> tuple[Tensor, int]:
    ref = reference_solution(flow, noise, rtol=tol, atol=tol, model_kwargs=model_kwargs,
                             sigma_end=0.0 if flow.sigma_field is not None else None)
    return ref.x.to(device=noise.device, dtype=torch.float64), ref.nfe + ref.error_nfe  # the teacher and its check


def _rms_of(residual: np.ndarray) -> float:
    return float(np.sqrt(np.mean(residual * residual)))


def _rms(x: Tensor, target: Tensor) -> float:
    value = float((x.to(torch.float64) - target).pow(2).mean().sqrt())
    return value if math.isfinite(value) else math.inf


def _positive(name: str, value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive finite number (the largest |{what}|), got {value!r}")
    return float(value)


def learn_solver(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str = "unipc",
    nfe: int,
    learn: str | tuple[str, ...] = ("shifts", "grid", "start", "scales", "directions"),
    solver_options: Mapping[str, Any] | None = None,
    sigmas: np.ndarray | None = None,
    terms: int = 2,
    bound: float = 4.0,
    shift_bound: float = 0.5,
    iterations: int = 8,
    ridge: float = 0.0,
    robust: float | None = None,
    folds: int = 1,
    model_kwargs: Mapping[str, Any] | None = None,
    reference_tol: float = 1e-7,
) -> LearnedSolver:
    """Fit ``solver``'s per-step evaluation shifts, grid and/or correction coefficients at ``nfe`` evaluations
    on calibration ``noise``.

    ``learn`` names what is fitted: ``"shifts"`` (one evaluation-time shift per step, any solver that is
    not reversible), ``"grid"`` (the grid's σ but the first and the last, from the starting grid),
    ``"start"`` (the first σ, within (σ_1, σ_max]: the noise is taken as the state there, the teacher
    still starts at σ_max), ``"coefficients"`` (a variable-step Adams method's order-keeping correction:
    ``unipc``, ``dpmpp_3m``, ``dpmpp_2m``, ``lms``, ``abm``), ``"scales"`` (the model's ε scaled by
    1 + s per step, |s| ≤ 0.5, fitted last and kept only where the held-out half prefers it), ``"directions"``
    (w·|d|·û added per step, û the solve's initial state perpendicular to the step's direction d, |w| ≤ 0.5,
    fitted after the scales, then jointly with them; the held-out half chooses among both, the scales alone
    and neither), ``"trajectory"`` (a weight |c| ≤ 1 per step on the previous step's direction, its part
    perpendicular to d and x_T, fitted last; the held-out half chooses it only where it beats the rest), or several,
    fitted together (see the module docstring). The default, shifts, grid and start (LD3's pair with
    the first σ), then scales, then directions, then both, was chosen by the held-out and evaluation errors recorded in
    ``benchmarks/RESULTS.md``. ``noise`` (DDIM scale, at least 2 samples; a few hundred for
    a model whose samples disagree, thousands for a near-memorising density, whose error is set by the few samples
    that land on another training image: on ``benchmarks/RESULTS.md``'s digit mixture 4,096 rather than 1,024 lowered
    14 of 17 fits' error on other noise and brought the held-out half's figure from 0.43–1.08× that error to
    0.87–1.30×) is split: the even-indexed half
    is fitted, the odd-indexed half decides whether the fit is kept and which variant (the scales, the
    directions); a kept variant is then refitted on all of ``noise`` from the half's fit, with the same
    parameters free, bounds and ``iterations`` (cross-fitting; its solves count in ``fitting_nfe``), and that
    refit is returned, with the half-fit's held-out error as ``validation_error`` (the only held-out figure:
    the refit saw every sample). The starting grid is ``sigmas``
    when given (it must cost at most ``nfe``), else the stored tuned grid of this flow, solver and
    budget (:func:`flowdiff.stored_grid`), else ``logsnr``. ``terms`` (1–3) correction terms per step,
    each coefficient in ``[−bound, bound]``; each shift in ``[−shift_bound, shift_bound]`` (in units of
    its step); ``iterations`` caps the least-squares iterations of each fit (each costs one candidate
    solve per parameter plus one); ``ridge`` adds ``ridge·|r₀|²·|c|²/dim(c)`` to the fitted sum of
    squares (``r₀`` the base method's residual), pulling the coefficients towards the base method. ``robust``
    (``None``: plain least squares) is a threshold τ > 0 that makes the fitted objective Huber's per sample: a
    sample whose RMS error e exceeds τ·m (m the base method's median per-sample RMS error on the fitted samples)
    counts 2τm·e − (τm)² instead of e², so the few samples the base method sends far (into another training
    image's basin) pull the fit linearly, not quadratically; the held-out decision stays on the RMS error. It is
    refused where it could not act: with ``iterations=0``, where ``learn`` has no parameter on the grid, and where m
    is 0. ``folds=2`` (opt-in; 1 is the fit above) fits a second fold with the halves swapped (fitted on the
    odd-indexed half, judged on the even one, refitted on all) on the same teacher solve, and returns the average of
    the kept folds' refits (:func:`_averaged`: each σ of the grid geometrically, the shifts, scales, directions,
    trajectory weights and coefficients arithmetically, the shifts then clipped to the averaged grid's intervals; one
    fold kept: its refit; none: the base method), with ``calibration_error`` its own on all of ``noise`` (one more
    solve; where no fold is kept, the base method's on the even half, ``options["fitted_on"]``, as with one fold) and
    ``validation_error`` / ``base_validation_error`` the RMS over all of ``noise`` of each sample judged by
    the half-fit that did not see it (the base method where that fold was not kept) and of the base method: the
    held-out figure of the procedure, as the average itself saw every sample. ``options["folds_kept"]`` says which
    folds were kept, ``options["variants"]`` holds each fold's. An average whose error on all of ``noise`` is above
    the base method's is not returned, the better of the two refits is (averages of two fits can lie off both; where
    both folds were kept ``options["averaged"]`` says which). It costs about twice the candidate solves; refused
    with ``iterations=0`` or nothing to fit, where both folds would be the base method.
    Measure the result on other noise (:meth:`LearnedSolver.validated`). Where the held-out half keeps no fit, the
    result is the base method (``kept=False``) and a ``UserWarning`` (beginning :data:`NOT_KEPT`) says so.
    """
    learned = _half_and_refit(**locals()).result  # every argument, as given
    if not learned.kept:
        warnings.warn(f"{NOT_KEPT}: no fit beat it on the held-out half of the calibration noise (the base method's "
                      f"RMS error there: {learned.base_validation_error:.4g}), so the result is {solver!r} itself on "
                      f"the starting grid ({learned.grid}) with kept=False, and as_solver() returns it; more "
                      "calibration samples, another learn= or another solver may fit", UserWarning, stacklevel=2)
    return learned


def _learn_both(flow: ProbabilityFlow, noise: Tensor, **options: Any) -> tuple[LearnedSolver, LearnedSolver | None]:
    """:func:`learn_solver`'s fit, with its arguments and defaults, returning both fits (see :func:`_half_and_refit`):
    for the benchmarks and tests that compare them."""
    return _learn_folds(flow, noise, **options).fits[0]


def _learn_folds(flow: ProbabilityFlow, noise: Tensor, **options: Any) -> _Folds:
    """:func:`learn_solver`'s fit, with its arguments and defaults, returning every fold's half-fit and refit and the
    solver it returns (:class:`_Folds`): for the benchmarks and tests that compare them."""
    arguments = inspect.signature(learn_solver).bind(flow, noise, **options)
    arguments.apply_defaults()
    return _half_and_refit(**arguments.arguments)


def _half_and_refit(flow: ProbabilityFlow, noise: Tensor, solver: str, nfe: int, learn: str | tuple[str, ...],
                    solver_options: Mapping[str, Any] | None, sigmas: np.ndarray | None, terms: int, bound: float,
                    shift_bound: float, iterations: int, ridge: float, robust: float | None, folds: int,
                    model_kwargs: Mapping[str, Any] | None, reference_tol: float) -> _Folds:
    """:func:`learn_solver`'s fit: per fold, the half-fit (fold 1 fitted on the even half and judged on the odd half,
    fold 2 the other way round; the base method if not kept) and, where it is kept, the chosen variant refitted on all
    the noise from there (else ``None``); and the solver :func:`learn_solver` returns (with ``folds=2`` the average of
    the kept folds' refits, :func:`_averaged`). One teacher solve serves every fold."""
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if not math.isfinite(flow.schedule.sigma_max):
        raise ValueError(f"flow's schedule has σ_max = {flow.schedule.sigma_max!r} (zero terminal SNR): learn_solver "
                         "judges every fit against a teacher solved from σ_max, which cannot start at σ = ∞; "
                         "accepted: a flow whose schedule has a finite σ_max")
    _check_noise(noise)
    if noise.shape[0] < 2:
        raise ValueError(f"noise must hold at least 2 samples (one to fit, one held out), got {noise.shape[0]}")
    flow.check_input(noise, "noise")  # the whole batch, before the reference solve and the halves
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name (str), got {type(solver).__name__}")
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a mapping, got {type(solver_options).__name__}")
    learn = _check_learn(learn)
    options = dict(solver_options or {})
    base = _base_solver(solver, options, learn)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    for name, value, lo, hi in (("terms", terms, 1, 3), ("iterations", iterations, 0, 1000)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (0 <= ridge < math.inf):
        raise ValueError(f"ridge must be a finite number >= 0 (the weight of |c|² in the fit), got {ridge!r}")
    if robust is not None and (isinstance(robust, bool) or not isinstance(robust, (int, float))
                               or not 0 < robust < math.inf):
        raise ValueError(f"robust must be None (plain least squares) or a positive finite number (the Huber "
                         f"threshold, in multiples of the base method's median per-sample RMS error), got {robust!r}")
    if isinstance(folds, bool) or not isinstance(folds, int):
        raise TypeError(f"folds must be the int 1 or 2, got {folds!r} ({type(folds).__name__})")
    if folds not in (1, 2):
        raise ValueError(f"folds must be 1 (fit on the even half, judged on the odd half, refitted on all) or 2 (that "
                         f"and the same with the halves swapped, the kept folds averaged), got {folds!r}")
    if folds == 2 and iterations == 0:
        raise ValueError("folds=2 averages two fits, but iterations=0 fits nothing (each fold would be the base "
                         "method), so it would change nothing: give iterations >= 1, or leave folds at 1")
    if robust is not None and iterations == 0:
        raise ValueError(f"robust={robust!r} makes the fitted objective Huber's, but iterations=0 fits nothing (the "
                         "base method is judged as it is), so it would change nothing: give iterations >= 1, or leave "
                         "robust out")
    bound, shift_bound = _positive("bound", bound, "coefficient"), _positive("shift_bound", shift_bound, "shift")
    if isinstance(reference_tol, bool) or not isinstance(reference_tol, (int, float)) or not 0 < reference_tol <= 1e-3:
        raise ValueError(f"reference_tol must be a number in (0, 1e-3], got {reference_tol!r}")
    start = time.perf_counter()
    if sigmas is not None:
        grid_name = "given"
        try:
            given = np.asarray(sigmas, dtype=np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"sigmas must be an array of σ (a generation grid), got {type(sigmas).__name__} "
                            f"{sigmas!r}; for a named grid give flowdiff.make_sigmas(flow.schedule, name, steps)") \
                from None
        if given.ndim == 1 and given.size and given[0] == math.inf:
            raise ValueError("sigmas must start at a finite σ (a grid from σ = ∞ has its own first step)")
        check_fitted_grid("sigmas", given, "learn_solver", "the grid the fit starts from")
        sigmas = given
    else:
        stored = stored_grid(flow, solver, nfe, options, model_kwargs)
        if stored is not None:
            grid_name, sigmas = f"tuned ({Path(stored.source).name})", np.asarray(stored.sigmas, dtype=np.float64)
        else:
            grid_name = "logsnr"
            sigmas = make_sigmas(flow.schedule, "logsnr", _solvers.steps_for_nfe(base, nfe, eval_end=False))
    if not math.isfinite(sigmas[0]):
        raise ValueError("sigmas must start at a finite σ (a grid from σ = ∞ has its own first step)")
    if "start" in learn and not (len(sigmas) >= 3 and sigmas[1] > 0):
        shown = "sigmas=" if grid_name == "given" else f"the {grid_name} grid"
        raise ValueError(f"learn={learn!r} moves the first σ within (σ_1, σ_max], but {shown} "
                         f"({len(sigmas) - 1} step(s), σ_1 = {float(sigmas[1]) if len(sigmas) > 1 else None!r}) has "
                         "no σ_1 > 0 below it: give a grid of at least 2 steps"
                         + ("" if grid_name == "given" else f" (sigmas=, or an nfe above {nfe})"))
    if "start" in learn and not sigmas[0] <= flow.schedule.sigma_max:
        # (σ_1, σ_max] would be empty, or a σ_1 moved by "grid" could pass σ_max and put the start below it
        shown = "sigmas=" if grid_name == "given" else f"the {grid_name} grid"
        raise ValueError(f"learn={learn!r} moves the first σ within (σ_1, σ_max], but {shown} starts at "
                         f"σ = {float(sigmas[0])!r}, above the schedule's σ_max = {float(flow.schedule.sigma_max)!r}: "
                         "give a grid that starts at or below σ_max")
    cost = sum(map(len, _evaluated(base, list(map(float, sigmas)), flow.schedule)))  # before the teacher's cost
    if cost > nfe:
        shown = "sigmas=" if grid_name == "given" else f"the {grid_name} grid"
        raise ValueError(f"{shown} ({len(sigmas) - 1} steps) costs {cost} evaluations with solver {solver!r}, over "
                         f"nfe={nfe}: give a grid of fewer steps or a larger nfe")
    fingerprint = record_fingerprint(flow, model_kwargs, "learn_solver")  # after the arguments, before the teacher
    counts, intervals = _layout(base, sigmas, terms, learn, flow.schedule, shift_bound)
    # the fitted parameters: ("c", step, term) in [−bound, bound], then ("s", step) within the step's interval,
    # ("g", σ index) and ("t", 0) for the grid and its start, ("k", step) in [−SCALE_BOUND, SCALE_BOUND]
    slots = [("c", i, m) for i, n in enumerate(counts) for m in range(n)]
    slots += [("s", i, 0) for i, (lo, hi) in enumerate(intervals) if lo < hi]
    moves = _grid_moves(sigmas) if "grid" in learn else []
    slots += [("g", j, 0) for j, _ in moves]
    reach = {("g", j): (-r, r) for j, r in moves}
    if "start" in learn:
        slots.append(("t", 0, 0))
        start_of = _Start(sigmas, flow.schedule)
        reach["t", 0] = start_of.bounds
    acting = (_scaled_steps(base, sigmas, flow.schedule) if {"scales", "directions", "trajectory"} & set(learn)
              else [])
    if "scales" in learn:
        scaled = [("k", i, 0) for i, acts in enumerate(acting) if acts]
        slots += scaled
        reach.update({(k, i): (-SCALE_BOUND, SCALE_BOUND) for k, i, _ in scaled})
    if "directions" in learn:
        directed = [("w", i, 0) for i, acts in enumerate(acting) if acts]
        slots += directed
        reach.update({(k, i): (-DIRECTION_BOUND, DIRECTION_BOUND) for k, i, _ in directed})
    if "trajectory" in learn:  # step i's weights on the directions of the (at most TRAJECTORY_DEPTH) steps before it
        past = [("h", i, j) for i, acts in enumerate(acting) if acts
                for j in range(min(TRAJECTORY_DEPTH, sum(acting[:i])))]  # the steps before it that record one
        slots += past
        reach.update({(k, i, j): (-TRAJECTORY_BOUND, TRAJECTORY_BOUND) for k, i, j in past})
    if robust is not None and not slots:
        shown = "sigmas=" if grid_name == "given" else f"the {grid_name} grid"
        raise ValueError(f"robust={robust!r} makes the fitted objective Huber's, but learn={learn!r} has no parameter "
                         f"to fit on {shown} ({len(sigmas) - 1} step(s) with solver {solver!r}), so it would change "
                         "nothing: leave robust out, or give a grid or learn= with something to fit")
    if folds == 2 and not slots:
        shown = "sigmas=" if grid_name == "given" else f"the {grid_name} grid"
        raise ValueError(f"folds=2 averages two fits, but learn={learn!r} has no parameter to fit on {shown} "
                         f"({len(sigmas) - 1} step(s) with solver {solver!r}), so it would change nothing: leave folds "
                         "at 1, or give a grid or learn= with something to fit")
    lower = np.array([-bound if k == "c" else intervals[i][0] if k == "s" else reach[k, i, j][0] if k == "h" else
                      reach[k, i][0] for k, i, j in slots])
    upper = np.array([bound if k == "c" else intervals[i][1] if k == "s" else reach[k, i, j][1] if k == "h" else
                      reach[k, i][1] for k, i, j in slots])
    moved = bool(moves) or "start" in learn  # the grid itself is fitted
    fit, held, whole = slice(0, None, 2), slice(1, None, 2), slice(None)  # the batch's rows
    checked = check_rows_split(flow, noise, model_kwargs, (fit, held))
    target, ref_nfe = _reference(flow, noise, model_kwargs, float(reference_tol))
    spent = {"nfe": ref_nfe + checked, "solves": 0}

    def unpacked(v: np.ndarray) -> tuple[tuple[tuple[float, ...], ...] | None, tuple[float, ...] | None,
                                         tuple[float, ...] | None, tuple[float, ...] | None,
                                         tuple[tuple[float, ...], ...] | None]:
        coefficients = [[0.0] * n for n in counts]
        shifts, scales, directions = [0.0] * len(counts), [0.0] * len(counts), [0.0] * len(counts)
        trajectory = [[0.0] * TRAJECTORY_DEPTH for _ in counts]
        for (kind, i, m), value in zip(slots, v):
            if kind == "h":
                trajectory[i][m] = float(value)
            if kind == "c":
                coefficients[i][m] = float(value)
            elif kind == "s":
                shifts[i] = float(value)
            elif kind == "k":
                scales[i] = float(value)
            elif kind == "w":
                directions[i] = float(value)
        return (tuple(tuple(c) for c in coefficients) if "coefficients" in learn else None,
                tuple(shifts) if "shifts" in learn else None, tuple(scales) if "scales" in learn else None,
                tuple(directions) if "directions" in learn else None,
                tuple(tuple(c) for c in trajectory) if "trajectory" in learn else None)

    def grid_of(v: np.ndarray) -> np.ndarray:
        out = sigmas.copy()
        for (kind, j, _), value in zip(slots, v):
            if kind == "g":
                out[j] = sigmas[j] * math.exp(value)
        for (kind, _, _), value in zip(slots, v):
            if kind == "t":  # after the interior: the start is placed relative to the σ_1 it moved to
                out[0] = start_of.sigma(float(value), float(out[1]))
        return out

    def solver_of(v: np.ndarray) -> tuple[_solvers.Solver, np.ndarray]:
        grid = grid_of(v)
        coefficients, shifts, scales, directions, trajectory = unpacked(v)
        if shifts is not None and moved:  # the moved grid's own shift intervals
            _, bounds = _layout(base, grid, terms, ("shifts",), flow.schedule, shift_bound)
            shifts = tuple(min(max(d, lo), hi) for d, (lo, hi) in zip(shifts, bounds))
        return _composed(base, grid, coefficients, shifts, scales, directions, trajectory), grid

    def images(v: np.ndarray, rows: slice) -> Tensor:
        solver_v, grid = solver_of(v)
        with torch.no_grad():  # per-sample conditioning goes with its rows of the noise
            res = generate(flow, noise[rows], solver=solver_v, grid=grid,
                           model_kwargs=model_kwargs_rows(model_kwargs, noise.shape[0], rows) or None)
        if res.stats.nfe > nfe:
            raise ValueError(f"the grid spends {res.stats.nfe} evaluations with solver {solver!r}, over nfe={nfe}")
        spent["nfe"] += res.stats.nfe
        spent["solves"] += 1
        return res.x.to(torch.float64)

    def fold(fit: slice, held: slice, fitted_on: str) -> tuple[LearnedSolver, LearnedSolver | None]:
        """One fold: the half-fit on the rows ``fit`` (``fitted_on`` names them), judged on the rows ``held`` (the base
        method if not kept), and, where it is kept, the chosen variant refitted on all the noise (else ``None``)."""
        fit_target, held_target = target[fit], target[held]

        def residual(v: np.ndarray) -> np.ndarray:
            r = (images(v, fit) - fit_target).reshape(-1).cpu().numpy()
            return r if np.all(np.isfinite(r)) else np.full_like(r, 1e6)

        zero = np.zeros(len(slots))
        r0 = residual(zero)
        v = plain = scales_only = directed = zero
        objective = None
        if slots and iterations > 0:
            penalised = np.array([k == "c" for k, _, _ in slots])
            objective = _Objective(residual, r0, math.sqrt(ridge * float(np.dot(r0, r0)) / max(int(penalised.sum()), 1))
                                   * penalised, _Huber.of(r0, fit_target.shape[0], robust))
            kinds = np.array([k for k, _, _ in slots])
            last = (kinds == "k") | (kinds == "w") | (kinds == "h")  # fitted on top of the rest
            others = (kinds != "t") & ~last
            every = ~last

            def fitted_others(v: np.ndarray) -> np.ndarray:
                """Shifts, coefficients and grid from ``v``: each alone, then together from the best (a joint start
                from zero settles in the shifts' nearest minimum, which the coefficients alone often beat)."""
                groups = [kinds == k for k in ("s", "c", "g") if np.any(kinds == k)]
                if len(groups) > 1:
                    v = min((_fit(objective, v, lower, upper, g, iterations) for g in groups), key=objective.cost)
                return _fit(objective, v, lower, upper, others, iterations) if np.any(others) else v

            def fitted_start(v: np.ndarray) -> np.ndarray:
                """The start from ``v``, from the best of a coarse scan of its interval: its error is not convex in it
                (on the trained digits model a start of 15–60 beat 157 and 100 by 5 %, where a local fit from σ_max
                stayed put)."""
                t = int(np.flatnonzero(kinds == "t")[0])
                scan = [v] + [np.where(np.arange(len(v)) == t, u, v)
                              for u in np.linspace(lower[t], upper[t], _START_SCAN)]
                return _fit(objective, min(scan, key=objective.cost), lower, upper, kinds == "t", iterations)

            v = fitted_others(zero)
            if np.any(kinds == "t"):  # the start both last (after the others: the fitted half ends no worse than
                # without it) and first (the others then fit the grid to it), each then with the rest; the better of
                # the two
                routes = [fitted_start(v), fitted_others(fitted_start(zero))] if np.any(others) else [fitted_start(v)]
                v = min((_fit(objective, w, lower, upper, every, iterations) if np.any(others) else w for w in routes),
                        key=objective.cost)
            plain = scales_only = v
            if np.any(kinds == "k"):  # the output scales last, on top of what the other kinds reached
                v = scales_only = _fit(objective, v, lower, upper, kinds == "k", iterations)
            if np.any(kinds == "w"):  # then the x_T directions, alone, on top of the scales
                v = _fit(objective, v, lower, upper, kinds == "w", iterations)
                if np.any(kinds == "k"):  # then both together from there (the directions move the scales' optimum)
                    v = _fit(objective, v, lower, upper, (kinds == "k") | (kinds == "w"), iterations)
            directed = v
            if np.any(kinds == "h"):  # then the previous directions' weights, alone, on top of all that
                v = _fit(objective, v, lower, upper, kinds == "h", iterations)
                if np.any((kinds == "k") | (kinds == "w")):  # and all three together from there
                    v = _fit(objective, v, lower, upper, last, iterations)
        # the held-out half chooses among the fit without scales and directions, with the scales alone, with both and
        # with the trajectory weights too (fitted on top of the rest, in that order; on a tie, the simpler)
        judged = {plain.tobytes(): _rms(images(plain, held), held_target)}
        chosen, learned_val = plain, judged[plain.tobytes()]
        for candidate in (scales_only, directed, v):
            if candidate.tobytes() not in judged:
                judged[candidate.tobytes()] = value = _rms(images(candidate, held), held_target)
                if value < learned_val:
                    chosen, learned_val = candidate, value
        # each variant the held-out half judged, [its RMS on the fitted half, on the held-out half] (from the solves
        # above): "others" the kinds but scales, directions and trajectory; then each of those added, in that order
        named = [("others", plain), ("scales", scales_only), ("directions", directed), ("trajectory", v)]
        variants = {name: [_rms_of(objective.plain(w) if objective is not None else r0), judged[w.tobytes()]]
                    for name, w in named if name == "others" or name in learn}
        v = chosen
        # the chosen fit's residual and the base's held-out error, from the solves made above where they were (the
        # objective keeps each candidate's residual; the held-out half judged the base when nothing else was fitted)
        r = objective.plain(v) if objective is not None else r0
        calib, base_calib = float(np.sqrt(np.mean(r * r))), float(np.sqrt(np.mean(r0 * r0)))
        base_val = judged[zero.tobytes()] if zero.tobytes() in judged else _rms(images(zero, held), held_target)
        settings = {"learn": list(learn), "terms": terms, "bound": bound, "shift_bound": shift_bound,
                    "iterations": iterations, "ridge": float(ridge),
                    "robust": None if robust is None else float(robust), "reference_tol": float(reference_tol),
                    "calibration_batch": int(noise.shape[0]), "folds": folds}

        def result(w: np.ndarray, calib: float, base_calib: float, fitted_on: str) -> LearnedSolver:
            coefficients, shifts, scales, directions, trajectory = unpacked(w)
            fitted, fitted_grid = solver_of(w)
            if shifts is not None:
                shifts = tuple(fitted.shifts.values())  # clipped to the fitted grid's intervals (in step order)
            return LearnedSolver(solver, options, nfe, fitted_grid.copy(), coefficients or (),
                                 fingerprint, True, calib, base_calib, math.nan, math.nan, grid_name,
                                 shifts=shifts or (), learn=learn,
                                 base_sigmas=sigmas.copy() if moved else None, scales=scales or (),
                                 directions=directions or (), trajectory=trajectory or (),
                                 options={**settings, "fitted_on": fitted_on})

        half = replace(result(v, calib, base_calib, fitted_on)._decided(learned_val, base_val),
                       options={**settings, "fitted_on": fitted_on, "variants": variants},
                       fitting_nfe=spent["nfe"], reference_nfe=ref_nfe, solves=spent["solves"],
                       fitting_seconds=time.perf_counter() - start)
        if not half.kept:  # the base method: nothing to refit
            return half, None
        # cross-fitting: the variant the held-out half chose, refitted on all the calibration noise from the half's fit
        # (same slots, bounds and iterations; the kinds that variant left at zero stay there)
        # (the first of the four that equals the chosen one: the held-out half took the simplest on a tie)
        mask = next(m for w, m in ((plain, every), (scales_only, every | (kinds == "k")), (directed, kinds != "h"),
                                   (v, np.ones(len(v), bool))) if np.array_equal(w, v))

        def residual_all(w: np.ndarray) -> np.ndarray:
            r = (images(w, whole) - target).reshape(-1).cpu().numpy()
            return r if np.all(np.isfinite(r)) else np.full_like(r, 1e6)

        r0_all = residual_all(zero)
        weight = objective.weight / max(float(np.linalg.norm(r0)), 1e-300) * float(np.linalg.norm(r0_all))
        every_sample = _Objective(residual_all, r0_all, weight, _Huber.of(r0_all, target.shape[0], robust))
        w = _fit(every_sample, v, lower, upper, mask, iterations)
        r_all = every_sample.plain(w)
        refit = result(w, float(np.sqrt(np.mean(r_all * r_all))), float(np.sqrt(np.mean(r0_all * r0_all))), "all")
        refit = replace(refit, validation_error=learned_val, base_validation_error=base_val,
                        options={**refit.options, "variants": variants},
                        fitting_nfe=spent["nfe"], reference_nfe=ref_nfe, solves=spent["solves"],
                        fitting_seconds=time.perf_counter() - start)
        return half, refit

    first = fold(fit, held, "even half")
    if folds == 1:
        return _Folds((first,), first[0] if first[1] is None else first[1])
    second = fold(held, fit, "odd half")  # the halves swapped: fitted on the odd half, judged on the even one
    ends = [refit if refit is not None else half for half, refit in (first, second)]
    kept = [end for end in ends if end.kept]
    # each sample judged by the half-fit that did not see it (the base method where that fold was not kept): the
    # held-out figures of both folds together, over the whole batch
    rows = (len(range(*held.indices(noise.shape[0]))), len(range(*fit.indices(noise.shape[0]))))
    pooled = [math.sqrt(sum(n * getattr(f[0], name) ** 2 for n, f in zip(rows, (first, second))) / sum(rows))
              for name in ("validation_error", "base_validation_error")]
    settings = {**(kept or ends)[0].options, "fitted_on": "all" if kept else "even half",
                "variants": [first[0].options["variants"], second[0].options["variants"]],
                "folds_kept": [end.kept for end in ends]}
    if len(kept) < 2:  # one fold kept: its refit; none: the base method on the starting grid
        result = (kept or ends)[0]
    else:
        result = _averaged(kept, flow.schedule)
        with torch.no_grad():  # its own error over the whole batch (one more solve, counted)
            out = generate(flow, noise, solver=result._fitted(), grid=result.sigmas, model_kwargs=model_kwargs)
        spent["nfe"] += out.stats.nfe
        spent["solves"] += 1
        result = replace(result, calibration_error=_rms(out.x, target))
        best = min(kept, key=lambda refit: refit.calibration_error)
        if not result.calibration_error <= result.base_calibration_error:
            # the average of two optima can lie off both, even above the base method on the noise both were fitted
            # on (M1: dpmpp_3m, NFE 10, the mixture): the better refit instead
            result = best
        settings["averaged"] = result is not best
    result = replace(result, validation_error=pooled[0], base_validation_error=pooled[1], options=settings,
                     fitting_nfe=spent["nfe"], reference_nfe=ref_nfe, solves=spent["solves"],
                     fitting_seconds=time.perf_counter() - start)
    return _Folds((first, second), result)


@dataclass(frozen=True)
class _Folds:
    """:func:`learn_solver`'s fits: per fold, the half-fit and its refit on all the noise (``None`` where the half-fit
    was not kept), and the solver it returns."""

    fits: tuple[tuple[LearnedSolver, LearnedSolver | None], ...]
    result: LearnedSolver


def _averaged(fits: Sequence[LearnedSolver], schedule: Schedule) -> LearnedSolver:
    """The kept ``fits`` (of one solver, budget and starting grid) averaged: each σ of the grid geometrically (its
    start included; σ = 0 stays), the shifts, scales, directions, trajectory weights and coefficients arithmetically,
    the shifts then clipped to the averaged grid's intervals (:func:`shift_intervals`). Each kind's bounds are an
    interval in these variables (the start's fraction of its log-σ interval, each moved σ's log-σ reach), so the
    average keeps within them; the grid stays strictly decreasing, the first σ in (σ_1, σ_max]."""
    first = fits[0]
    logs = np.array([[math.log(s) if s > 0 else -math.inf for s in f.sigmas] for f in fits])
    # between the fits' own σ (the mean of equal σ is that σ, bit for bit: σ_max stays σ_max)
    sigmas = np.clip(np.where(first.sigmas > 0, np.exp(logs.mean(axis=0)), first.sigmas),
                     np.min([f.sigmas for f in fits], axis=0), np.max([f.sigmas for f in fits], axis=0))

    def mean(kind: str) -> tuple:
        values = [getattr(f, kind) for f in fits]
        if values[0] and isinstance(values[0][0], tuple):
            return tuple(tuple(float(np.mean(c)) for c in zip(*step)) for step in zip(*values))
        return tuple(float(np.mean(step)) for step in zip(*values))

    shifts = mean("shifts")
    if shifts:
        bounds = shift_intervals(first.base(), sigmas, schedule, first.options["shift_bound"])
        shifts = tuple(min(max(d, lo), hi) for d, (lo, hi) in zip(shifts, bounds))
    return replace(first, sigmas=sigmas, shifts=shifts, scales=mean("scales"), directions=mean("directions"),
                   trajectory=mean("trajectory"), coefficients=mean("coefficients"))


class _Huber:
    """Huber's loss per sample, as a residual least squares can take: sample s's residual r_s (its RMS e_s) is
    scaled by √(ρ(e_s)/e_s²), ρ(e) = e² up to the threshold τ·m and 2τm·e − (τm)² above it, so its squared norm
    counts ρ in place of e² (m the base method's median e_s, fixed when the fit starts)."""

    def __init__(self, samples: int, threshold: float) -> None:
        self.samples, self.threshold = samples, threshold

    @classmethod
    def of(cls, r0: np.ndarray, samples: int, robust: float | None) -> _Huber | None:
        """The loss for ``robust`` (``None``: none) scaled by the base residual ``r0``'s median per-sample RMS; refused
        where that median is 0 (the base method exact on half the samples or more: the threshold would be 0)."""
        if robust is None:
            return None
        median = float(np.median(np.sqrt(np.mean(r0.reshape(samples, -1) ** 2, axis=1))))
        if not median > 0:
            raise ValueError(f"robust={robust!r} sets the Huber threshold in multiples of the base method's median "
                             f"per-sample RMS error on the fitted samples, which is 0 here (the base method is exact "
                             f"on half of the {samples} samples or more), so there is no threshold to scale: leave "
                             "robust out (plain least squares)")
        return cls(samples, robust * median)

    def __call__(self, r: np.ndarray) -> np.ndarray:
        per_sample = r.reshape(self.samples, -1)
        e = np.sqrt(np.mean(per_sample ** 2, axis=1))
        tau = self.threshold
        factor = np.ones_like(e)
        far = e > tau
        factor[far] = np.sqrt((2 * tau * e[far] - tau * tau) / (e[far] * e[far]))
        return (per_sample * factor[:, None]).reshape(-1)


class _Objective:
    """The fitted residual of parameters ``v``: the image error (``residual``, through ``loss`` where one is given:
    :class:`_Huber`) and ``weight·v`` (the ridge), each candidate solved once."""

    def __init__(self, residual, r0: np.ndarray, weight: np.ndarray, loss: _Huber | None = None) -> None:
        self.residual, self.weight, self.loss = residual, weight, loss
        zero = np.zeros(len(weight)).tobytes()
        self.plains: dict[bytes, np.ndarray] = {zero: r0}
        self.cache: dict[bytes, np.ndarray] = {zero: np.concatenate([self._lossed(r0), 0.0 * weight])}

    def _lossed(self, r: np.ndarray) -> np.ndarray:
        return r if self.loss is None else self.loss(r)

    def __call__(self, v: np.ndarray) -> np.ndarray:
        key = v.tobytes()
        if key not in self.cache:
            self.plains[key] = r = self.residual(v)
            self.cache[key] = np.concatenate([self._lossed(r), self.weight * v])
        return self.cache[key]

    def plain(self, v: np.ndarray) -> np.ndarray:
        """The image error of ``v`` itself (no loss, no ridge): what the RMS figures are made of."""
        self(v)
        return self.plains[v.tobytes()]

    def cost(self, v: np.ndarray) -> float:
        r = self(v)
        return float(np.dot(r, r))


def _fit(objective: _Objective, start: np.ndarray, lower: np.ndarray, upper: np.ndarray, free: np.ndarray,
         iterations: int) -> np.ndarray:
    """The ``free`` parameters fitted from ``start`` (the others kept) by box-bounded least squares (scipy's
    dogbox method: the start may lie on a bound, as the first step's shift does, without shrinking the first
    trust region to nothing), forward-difference Jacobian: one candidate solve per free parameter and
    iteration."""
    from scipy.optimize import least_squares

    lo, hi = lower[free], upper[free]
    steps = 1e-3 * (hi - lo) / 2

    def full(u: np.ndarray) -> np.ndarray:
        v = start.copy()
        v[free] = u
        return v

    def fun(u: np.ndarray) -> np.ndarray:
        return objective(full(u))

    def jac(u: np.ndarray) -> np.ndarray:
        base = fun(u)
        cols = []
        for j in range(len(u)):
            w = u.copy()
            w[j] += steps[j] if w[j] + steps[j] <= hi[j] else -steps[j]
            cols.append((fun(w) - base) / (w[j] - u[j]))
        return np.stack(cols, axis=1)

    result = least_squares(fun, np.clip(start[free], lo, hi), jac=jac, bounds=(lo, hi), method="dogbox",
                           max_nfev=iterations, x_scale=1.0)
    best = full(np.clip(result.x, lo, hi))
    return best if objective.cost(best) <= objective.cost(start) else start


# ---------------------------------------------------------------------------------------------- round-trip grids


def tune_roundtrip(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str,
    nfe: int,
    solver_options: Mapping[str, Any] | None = None,
    max_evals: int = 40,
    model_kwargs: Mapping[str, Any] | None = None,
) -> TunedGrid:
    """A σ grid for ``encode`` + ``decode`` with ``solver`` at ``nfe`` evaluations each way, tuned on ``images``.

    The objective is the round trip itself: the RMS of ``decode(encode(x)) − x`` on the even-indexed half of the
    calibration ``images`` (model data scale, at least 2), minimised by Nelder–Mead over the two-parameter warp
    of the log-σ grid that :func:`flowdiff.tune` starts with (log σ_i = log σ_max + (i/(n−1))^p·(log σ_{n−1} −
    log σ_max): the exponent p and the last positive σ), started from the best named grid (logsnr, karras,
    trailing) on that half. The odd-indexed half decides: the tuned grid is returned only if its round trip
    there beats the starting grid's, otherwise the starting grid (``initial_grid`` says which); images whose
    order has a pattern (cut from a few sources in turn) should be shuffled or interleaved first, so that both
    halves hold every source (see :func:`flowdiff.learn_encoder`). An encode's
    error is made at its first steps out of σ = 0, where a generation grid's last, smallest steps lie; how
    small they should be depends on the model, which the named grids cannot know.

    Use it as ``encode(flow, x, solver=solver, grid=grid.sigmas)``; the latent decodes on the same grid. The
    result is a :class:`~flowdiff.TunedGrid` with ``method="roundtrip"`` and its cost (``tuning_nfe``): save it
    with :meth:`~flowdiff.TunedGrid.save`, apart from the generation grids of ``*.tuned.json`` files (which
    :func:`flowdiff.stored_grid` reads for generation).
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating-point torch.Tensor, got {type(images).__name__}")
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least 2 samples (one to fit, one held out), got {images.shape[0]}")
    flow.check_input(images, "images")  # the whole batch: the round trips see halves of it
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name (str), got {type(solver).__name__}")
    refusal = encode_refusal(solver)
    if refusal is not None:
        raise ValueError(f"solver {solver!r} cannot encode: {refusal}")
    options = dict(solver_options or {})
    registered_only(solver, "solver", "that tune_roundtrip tunes a grid for", registered=plain_encoders())
    solver_obj = _solvers.get(solver, **options)
    if solver_obj.reversible:
        raise ValueError(f"solver {solver!r} is reversible: its round trip is exact on any grid; nothing to tune")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be an int >= 1 (candidate round trips), got {max_evals!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    steps = _solvers.steps_for_nfe(solver_obj, nfe, eval_end=encode_evaluates_end(solver_obj))
    check_data_range(images, "images")  # once here, not once per candidate round trip
    fingerprint = record_fingerprint(flow, model_kwargs, "tune_roundtrip")
    start = time.perf_counter()
    fit, held = slice(0, None, 2), slice(1, None, 2)  # the batch's rows
    spent = {"nfe": check_rows_split(flow, images, model_kwargs, (fit, held)), "evals": 0}

    def error(sigmas: np.ndarray, rows: slice) -> float:
        part, kwargs = images[rows], model_kwargs_rows(model_kwargs, images.shape[0], rows) or None
        try:
            with torch.no_grad(), data_range_checked():
                enc = encode(flow, part, solver=solver_obj, grid=sigmas, model_kwargs=kwargs)
                dec = decode(flow, enc.latent, model_kwargs=kwargs)
        except _solvers.SolveError:
            return math.inf
        spent["nfe"] += enc.stats.nfe + dec.stats.nfe
        spent["evals"] += 1
        if enc.stats.nfe > nfe or dec.stats.nfe > nfe:  # never: the step count is the encode's own count
            raise RuntimeError(f"a candidate round trip spent {enc.stats.nfe} + {dec.stats.nfe}, over nfe={nfe}")
        return _rms(dec.x, part.to(torch.float64))

    schedule = flow.schedule
    starts = []
    for name in ("logsnr", "karras", "trailing"):
        sig = make_sigmas(schedule, name, steps)
        starts.append((error(sig, fit), name, sig))
    initial_err, initial_name, initial = min(starts, key=lambda s: s[0])
    best = [initial_err, initial]
    if steps >= 3:
        from scipy.optimize import minimize

        warp = _Warp(schedule.sigma_max, schedule.sigma_min, steps)

        def objective(v: np.ndarray) -> float:
            sig = warp.grid(v)
            e = error(sig, fit)
            if e < best[0]:
                best[:] = [e, sig]
            return math.log(e) if 0 < e < math.inf else 50.0

        x0 = np.array([0.0, math.log(max(initial[-2], schedule.sigma_min) / schedule.sigma_min) + 1e-3])
        minimize(objective, x0, method="Nelder-Mead",
                 options={"initial_simplex": np.vstack([x0, x0 + 0.5 * np.eye(2)]), "maxfev": max_evals,
                          "xatol": 1e-3, "fatol": 1e-4})
    tuned_err, tuned = best
    if tuned is not initial and error(tuned, held) >= error(initial, held):
        tuned, tuned_err = initial, initial_err  # the held-out half prefers the start
    return TunedGrid(np.asarray(tuned, dtype=np.float64).copy(), solver, options, nfe,
                     fingerprint,
                     {"objective": "roundtrip", "max_evals": max_evals, "calibration_batch": int(images.shape[0])},
                     tuned_err, initial_name, initial_err, spent["evals"], spent["nfe"], 0,
                     time.perf_counter() - start, "roundtrip")
