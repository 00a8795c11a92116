"""Solvers compared at a fixed budget of model evaluations: error against a reference, NFE, wall time.

The question users ask first is "which solver, on which grid, gives the best image for N
model evaluations?". :func:`compare` answers it on one flow and one batch of noise: every
(solver, grid, NFE budget) generates from the same noise with ``generate(..., nfe=N)``, and
its image is measured against a high-accuracy solution of the same ODE from the same noise,

    error = RMS over the batch and pixels of  x_solver(σ=0) − x_ref(σ=0)

in the image's scale (the model's data range, e.g. [−1, 1]). The reference ``x_ref`` is a
tight adaptive solve in float64 (Dormand–Prince 8(7) by default, error measured in the
image's scale) down to the schedule's smallest trained σ, followed by the same Euler step
into σ = 0 that every fixed grid ends with: the limit the fixed grids converge to
(:func:`reference_solution` says why). It is cached per flow and noise, so it is computed
once however many rows share it. Its own accuracy is estimated from a second solve at a
100× looser tolerance (see :class:`Reference`) and reported with the table, so that a row
near that floor is visibly not resolved.

NFE is the currency: the table shows the budget asked for and the NFE actually spent
(counted by the driver: a one-evaluation-per-step solver spends the budget exactly; Heun
with its Euler step into σ = 0 spends an odd count ≤ N). Wall time is recorded, never
asserted. :class:`Comparison` renders the table as markdown or CSV and draws the log-log
error-vs-NFE plot; :mod:`flowdiff.tools.report` makes the report of it (frontier, samples, facts).

A :class:`~flowdiff.LearnedSolver` in ``solvers=`` joins the table as ``learned(<base>)`` on the grid
``fitted`` (its own, ``learned.sigmas``) at the one budget it was fitted for (``learned.nfe``).

``peers=`` adds the samplers of diffusers and k-diffusion (:mod:`flowdiff.tools.peers`) as rows of
the same table: same flow, noise, budgets and reference, their model calls counted the same way. On a
flow-matching flow the reference starts at t = 1 (σ = ∞), where the noise is pure noise and diffusers'
FlowMatch samplers start, and every run, flowdiff's from σ_max included, is measured against that solution.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

from ..api import roundtrip as _roundtrip
from ..api.sampling import generate
from ..engine._checks import check_data_range, check_has_values, data_range_checked
from ..engine.flow import ProbabilityFlow, check_from_noise
from ..engine.grids import GRIDS, make_sigmas
from ..engine.options import Grid
from ..engine.plugins import registered_only, solver_plugin
from . import peers as _peers
from . import tuning as _tuning
from .learned import LearnedSolver
from .reference import (
    Reference,
    check_reference,
    check_reference_from_infinity,
    check_tolerance,
    clear_reference_cache,
    default_sigma_start,
    reference_solution,
)

__all__ = ["CALIBRATION_SEED", "CSV_COLUMNS", "DEFAULT_GRIDS", "DEFAULT_NFE", "TUNED_GRIDS", "Comparison", "Reference",
           "LEARNED_GRID", "Run", "Skipped", "clear_reference_cache", "compare", "default_grids", "default_solvers",
           "reference_solution", "run_peers"]

#: Grids of the default comparison: diffusers' trailing timesteps, EDM's, uniform in log σ.
DEFAULT_GRIDS = ("trailing", "karras", "logsnr")
#: NFE budgets of the default comparison.
DEFAULT_NFE = (10, 20, 50)
#: Solvers always in the default comparison (DDIM and its second-order correction); the
#: registered multistep solvers join them (see :func:`default_solvers`).
BASE_SOLVERS = ("euler", "heun")

#: Grids made per (solver, budget) from calibration noise instead of by :func:`make_sigmas`: ``"tuned"``,
#: by :func:`flowdiff.tools.tuning.compare_grid` (the stored grid for this model, solver and budget, or
#: one tuned now). It sees only the calibration noise, never the noise the runs are measured on.
TUNED_GRIDS = ("tuned",)
#: The grid column of a learned solver's row: it runs on the grid it was fitted on (``LearnedSolver.sigmas``).
LEARNED_GRID = "fitted"
#: Seed of the calibration noise drawn when ``compare(calibration_noise=None)`` needs one.
CALIBRATION_SEED = 20241


def default_grids(flow: ProbabilityFlow, solvers: Iterable[str], nfe: Iterable[int],
                  model_kwargs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """:data:`DEFAULT_GRIDS`, plus ``"tuned"`` where a stored tuned grid (:func:`flowdiff.stored_grid`) covers
    every solver × budget of the comparison (flowdiff ships tuned grids for ``pretrained("digits")``)."""
    solvers, nfe = list(solvers), list(nfe)
    covered = all(_tuning.stored_grid(flow, s, b, model_kwargs=model_kwargs) is not None for s in solvers for b in nfe)
    return _spanning(flow, DEFAULT_GRIDS) + (TUNED_GRIDS if covered else ())


def _spanning(flow: ProbabilityFlow, grids: tuple[str, ...]) -> tuple[str, ...]:
    """The ``grids`` that start at the schedule's σ_max: all of them, but on a zero-terminal-SNR schedule
    (σ_max = ∞) the σ-range grids (karras, logsnr) have no first σ and only the timestep grids remain."""
    if flow.schedule.sigma_max < math.inf:
        return grids
    kept = []
    for grid in grids:
        try:
            make_sigmas(flow.schedule, grid, 2)
        except ValueError:
            continue
        kept.append(grid)
    return tuple(kept)


def default_solvers() -> list[str]:
    """Euler (DDIM) and Heun, then every registered multistep solver (the low-NFE methods)."""
    multistep = [name for name in _solvers.available(multistep=True) if name not in BASE_SOLVERS]
    return [name for name in BASE_SOLVERS if name in _solvers.available()] + multistep


@dataclass(frozen=True)
class Run:
    """One row: ``solver`` on ``grid`` at NFE budget ``budget``, spending ``nfe`` in ``steps`` steps.

    ``rms_error`` and ``max_error`` are against the reference in the image's scale;
    ``wall_time`` is the seconds ``generate`` (or the peer's own loop) took. ``source`` says whose
    sampler it is: ``"flowdiff"``, or a peer of :data:`flowdiff.tools.peers.PEERS`.
    """

    solver: str
    grid: str
    budget: int
    nfe: int
    steps: int
    rms_error: float
    max_error: float
    wall_time: float
    sigma_start: float
    encode_nfe: int | None = None  # round trips (task="roundtrip"): nfe = encode_nfe + decode_nfe
    decode_nfe: int | None = None
    source: str = "flowdiff"

    @property
    def method(self) -> str:
        """``solver / grid``, prefixed by the peer's name for a peer's row."""
        return (f"{self.source}: " if self.source != "flowdiff" else "") + f"{self.solver} / {self.grid}"


@dataclass(frozen=True)
class Skipped:
    """A (solver, grid, budget) that could not run, and why (e.g. one step costs more than the budget)."""

    solver: str
    grid: str
    budget: int
    reason: str
    source: str = "flowdiff"


CSV_COLUMNS = ("source", "solver", "grid", "budget", "nfe", "steps", "rms_error", "max_error", "wall_time",
               "sigma_start")


@dataclass
class Comparison:
    """The result of :func:`compare`: the runs, the reference they are measured against, what was skipped."""

    runs: list[Run]
    reference: Reference
    skipped: list[Skipped] = field(default_factory=list)
    #: (solver, grid, budget) → what a plug-in grid provider made (e.g. a ``TunedGrid`` with its cost)
    provided: dict[tuple[str, str, int], Any] = field(default_factory=dict)
    task: str = "generate"
    #: peer → why it could not run (not installed): said in the report, not raised
    unavailable: dict[str, str] = field(default_factory=dict)
    #: (source, solver, grid, budget) → the first images of that run (``compare(keep_images=k)``)
    images: dict[tuple[str, str, str, int], Tensor] = field(default_factory=dict)

    @property
    def budgets(self) -> list[int]:
        return sorted({r.budget for r in self.runs} | {s.budget for s in self.skipped})

    def best(self, budget: int) -> Run:
        """The run with the lowest RMS error at ``budget``."""
        if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
            raise TypeError(f"budget must be an int (an NFE budget), got {type(budget).__name__} {budget!r}; "
                            f"budgets run: {self.budgets}")
        rows = [r for r in self.runs if r.budget == budget]
        if not rows:
            raise ValueError(f"no run at budget {budget}; budgets run: {self.budgets}")
        return min(rows, key=lambda r: r.rms_error)

    def to_markdown(self, layout: str = "wide") -> str:
        """A markdown table.

        ``layout="best"``: a row per solver (a peer's sampler named with its peer), a column per NFE
        budget holding its lowest RMS error over the grids run, with that grid. ``layout="wide"``: a row
        per (solver, grid), a column per NFE budget holding the RMS error. In both, the NFE actually
        spent is in brackets where it differs from the budget, the best per budget is in bold and ``—``
        marks a budget the solver cannot fit. ``layout="long"``: one row per run with every column of
        the CSV.
        """
        if layout == "long":
            lines = ["| source | solver | grid | NFE budget | NFE used | steps | RMS error | max error | wall s |",
                     "|---|---|---|---:|---:|---:|---:|---:|---:|"]
            for r in self.runs:
                lines.append(f"| {r.source} | {r.solver} | {r.grid} | {r.budget} | {r.nfe} | {r.steps} | "
                             f"{r.rms_error:.3e} | {r.max_error:.3e} | {r.wall_time:.3f} |")
            return "\n".join(lines) + "\n"
        if layout not in ("wide", "best"):
            raise ValueError(f"layout must be 'best', 'wide' or 'long', got {layout!r}")
        budgets = self.budgets
        best = {b: self.best(b) for b in budgets if any(r.budget == b for r in self.runs)}
        by_grid = layout == "wide"

        def key(item: Run | Skipped) -> tuple[str, ...]:
            name = (f"{item.source}: " if item.source != "flowdiff" else "") + item.solver
            return (name, item.grid) if by_grid else (name,)

        keys = list(dict.fromkeys(key(item) for item in [*self.runs, *self.skipped]))
        cells: dict[tuple, Run] = {}
        for r in self.runs:
            k = (*key(r), r.budget)
            if k not in cells or r.rms_error < cells[k].rms_error:
                cells[k] = r
        head = "| solver | grid | " if by_grid else "| solver | "
        lines = [head + " | ".join(f"NFE {b}" for b in budgets) + " |",
                 ("|---|---|" if by_grid else "|---|") + "---:|" * len(budgets)]
        for k in keys:
            row = []
            for b in budgets:
                r = cells.get((*k, b))
                if r is None:
                    row.append("—")
                    continue
                text = f"{r.rms_error:.2e}" + (f" ({r.nfe})" if r.nfe != b else "") + ("" if by_grid else
                                                                                        f" {r.grid}")
                row.append(f"**{text}**" if best.get(b) is r else text)
            lines.append("| " + " | ".join(k) + " | " + " | ".join(row) + " |")
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        """One line per run, columns :data:`CSV_COLUMNS` (errors and times in full precision)."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        columns = CSV_COLUMNS + (("encode_nfe", "decode_nfe") if self.task == "roundtrip" else ())
        writer.writerow(columns)
        for r in self.runs:
            writer.writerow([getattr(r, c) if not isinstance(getattr(r, c), float) else repr(getattr(r, c))
                             for c in columns])
        return out.getvalue()

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the log-log plot of RMS error against NFE used (a line per solver and grid) as a PNG.

        This is the detail; :func:`flowdiff.tools.report.frontier_plot` draws the best per source.

        Colour marks the solver, line style the grid; a dotted grey line marks the
        reference's estimated error when it is within two decades of the best run.
        """
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        path = Path(path)
        names = list(dict.fromkeys((r.source, r.solver) for r in self.runs))
        grids = list(dict.fromkeys(r.grid for r in self.runs))
        colours = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
        styles = ["-", "--", ":", "-.", (0, (5, 1)), (0, (3, 1, 1, 1))]
        fig, ax = plt.subplots(figsize=(9.0, 5.5), dpi=120)
        tiny = 1e-16
        for i, name in enumerate(names):
            for j, grid in enumerate(grids):
                rows = sorted((r for r in self.runs if (r.source, r.solver) == name and r.grid == grid),
                              key=lambda r: r.nfe)
                if not rows:
                    continue
                ax.plot([r.nfe for r in rows], [max(r.rms_error, tiny) for r in rows], marker="o", markersize=3,
                        color=colours(i % colours.N), linestyle=styles[j % len(styles)], label=rows[0].method)
        floor = self.reference.error
        lowest = min((r.rms_error for r in self.runs), default=math.nan)
        if math.isfinite(floor) and floor > 0 and floor >= 1e-2 * lowest:  # draw it only where it is in view
            ax.axhline(floor, color="grey", linestyle=":", linewidth=1, label="reference error (est.)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        budgets = self.budgets
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel("RMS error vs reference (image scale)")
        ax.set_title(title or "error vs NFE", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # an empty legend (every run skipped) is matplotlib's warning
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      ncol=2 if len(names) * len(grids) > 24 else 1)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        return path


def _cannot_run(flow: ProbabilityFlow, solver: str, grid: str, budget: int) -> str | None:
    """Why ``solver`` on ``grid`` cannot spend ``budget`` (one step costs more, or the grid has no such
    step count, e.g. ``quadratic`` repeating timesteps), or None."""
    one_step = _solvers.nfe_for_steps(solver, 1, eval_end=False)
    if budget < one_step:
        return f"one step costs {one_step} evaluations"
    try:
        sigmas = make_sigmas(flow.schedule, "logsnr" if grid in TUNED_GRIDS else grid,
                             _solvers.steps_for_nfe(solver, budget, eval_end=False))
        if sigmas[0] == math.inf:  # zero terminal SNR: an epsilon model has no step out of σ = ∞ (reachable where
            check_from_noise(flow)  # reference= was given from a finite σ)
    except ValueError as err:
        return str(err)
    return None


def _check_names(values: Iterable[str] | str, name: str, accepted: Sequence[str]) -> list[str]:
    if isinstance(values, (str, LearnedSolver)):
        values = [values]
    if name == "grids" and _is_explicit_grid(values):
        raise TypeError(f"grids must be grid names ({', '.join(accepted)}), got an explicit σ grid "
                        f"({_shown_grid(values)}): an explicit grid fixes its own step count, so it has no run per "
                        "NFE budget of the table. Measure it on its own: flowdiff.generate(flow, noise, solver=..., "
                        "grid=sigmas) against the comparison's reference (Comparison.reference.x); a "
                        "flowdiff.LearnedSolver in solvers= brings its own grid (learned.sigmas) into the table")
    out = list(values)
    if not out:
        raise ValueError(f"{name} must name at least one; accepted: {', '.join(accepted)}")
    for v in out:
        if isinstance(v, LearnedSolver) and name == "solvers":
            raise TypeError(f"{name} of a round-trip comparison (task='roundtrip') must be encoder names (str), got "
                            f"a LearnedSolver ({v.solver}): a learned solver is fitted for generation on its own "
                            "grid; compare it with task='generate'")
        if not isinstance(v, str):
            raise TypeError(f"{name} must be names (str), got {type(v).__name__}")
        if name == "solvers" and v not in accepted:
            _refuse_plugin(v, accepted)
        if v not in accepted:
            raise ValueError(f"unknown {name[:-1] if name.endswith('s') else name} {v!r} in {name}; "
                             f"accepted: {', '.join(accepted)}")
    return list(dict.fromkeys(out))


def _refuse_plugin(name: str, accepted: Sequence[str]) -> None:
    """Refuse a generate-only or encode-only method named in ``solvers=`` (``flowmatch_heun``, ``pndm``,
    ``ddim_inverse`` where the task does not run it) as what it is, with where it can be measured."""
    plugin = solver_plugin(name)
    if plugin is None:
        return
    if plugin.direction == "encode":
        advice = "; compare encoders by their round trip with task='roundtrip'"
    elif "ddim_inverse" in accepted:  # the round trip's table
        advice = (f"; it has no encode, so no round trip: generate with it, flowdiff.generate(flow, noise, "
                  f"solver={name!r}, ...)")
    else:
        advice = (f"; measure it on its own: flowdiff.generate(flow, noise, solver={name!r}, nfe=...) against the "
                  "comparison's reference (Comparison.reference.x)")
    registered_only(name, "solvers entry", "that compare runs", accepted=tuple(a for a in accepted
                                                                     if a not in _solvers.available()), advice=advice)


def _is_explicit_grid(values: object) -> bool:
    """Whether ``grids=`` holds σ values (an array, a tensor, or a sequence of numbers) rather than names."""
    if isinstance(values, (Tensor, np.ndarray)):
        return True
    if not isinstance(values, (list, tuple)) or not values:
        return False
    return (any(isinstance(v, (Tensor, np.ndarray)) for v in values)
            or all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values))


def _shown_grid(values: Any) -> str:
    """An explicit ``grids=`` value as the refusal names it: its type and length (or its arrays')."""
    if isinstance(values, (list, tuple)) and any(isinstance(v, (Tensor, np.ndarray)) for v in values):
        inner = next(v for v in values if isinstance(v, (Tensor, np.ndarray)))
        return f"a {type(values).__name__} holding a {type(inner).__name__} of {len(inner)} values"
    return f"a {type(values).__name__} of {len(values)} values"


def _learned_label(learned: LearnedSolver) -> str:
    """A learned solver's row: ``learned(<base>)``, or ``learned(<base>, not kept)`` where the held-out half rejected
    the fit (it is then the base method on the grid it started from, and its row says so)."""
    return f"learned({learned.solver})" if learned.kept else f"learned({learned.solver}, not kept)"


def _split_solvers(values: object, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None,
                   budgets: list[int]) -> tuple[list[str], list[LearnedSolver]]:
    """``solvers=`` as registered names and learned solvers; a learned solver must belong to ``flow`` and be
    fitted at one of ``budgets``, and no two may share a row and budget."""
    entries = [values] if isinstance(values, (str, LearnedSolver)) else list(values)  # type: ignore[arg-type]
    learned = [(i, v) for i, v in enumerate(entries) if isinstance(v, LearnedSolver)]
    names = [v for v in entries if not isinstance(v, LearnedSolver)]
    seen: dict[tuple[str, int], int] = {}
    for i, v in learned:
        label = _learned_label(v)
        try:
            v.check(flow, model_kwargs)
        except ValueError as err:
            raise ValueError(f"solvers[{i}] ({label}, fitted at nfe={v.nfe}): {err}") from None
        if v.nfe not in budgets:
            raise ValueError(f"solvers[{i}] ({label}) was fitted at nfe={v.nfe} and runs only there, on its own "
                             f"grid (learned.sigmas); the budgets compared are nfe={budgets}: add {v.nfe} to nfe=, "
                             "or fit a learned solver at one of them (flowdiff.learn_solver(..., nfe=...))")
        if (label, v.nfe) in seen:
            raise ValueError(f"solvers[{seen[label, v.nfe]}] and solvers[{i}] are both {label} at nfe={v.nfe}: they "
                             "would share one cell of the table; compare them in two calls")
        seen[label, v.nfe] = i
    if names or not learned:
        names = _check_names(names, "solvers", _solvers.available())
    return names, [v for _, v in learned]


def _check_budgets(nfe: Iterable[int] | int, name: str = "nfe") -> list[int]:
    """The budgets as the table's columns: sorted, each once; NumPy integers (``np.arange(5, 30, 5)``) are ints."""
    if isinstance(nfe, (np.ndarray, Tensor)) and nfe.ndim == 0:  # a 0-d array or tensor: one budget
        nfe = nfe.item()
    if isinstance(nfe, numbers.Integral) and not isinstance(nfe, bool):
        values = [nfe]
    elif isinstance(nfe, (str, bytes)) or not isinstance(nfe, Iterable):
        raise TypeError(f"{name} must be an int or a list of ints (NFE budgets), got {type(nfe).__name__} {nfe!r}")
    else:
        values = list(nfe)
    if not values:
        raise ValueError(f"{name} must hold at least one budget")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name}: NFE budgets must be positive ints, got {v!r}")
    return sorted({int(v) for v in values})


def _check_noise(noise: Tensor) -> None:
    """A batch (N, ...) with N ≥ 1 and at least one value per sample, all finite."""
    if noise.ndim < 1 or noise.shape[0] < 1 or noise[0].numel() < 1:
        raise ValueError(f"noise must be a non-empty batch (batch, ...) with batch >= 1, got shape "
                         f"{tuple(noise.shape)}")
    check_has_values(noise, "noise")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or inf; compare needs finite noise, e.g. torch.randn(batch, *shape)")


def _calibration(noise: Tensor, calibration_noise: Tensor | None) -> Tensor:
    """The noise a tuned grid is made on: given, or drawn with :data:`CALIBRATION_SEED`; never ``noise`` itself."""
    if calibration_noise is None:
        gen = torch.Generator().manual_seed(CALIBRATION_SEED)
        calibration_noise = torch.randn(noise.shape, generator=gen, dtype=noise.dtype).to(noise.device)
    elif not isinstance(calibration_noise, Tensor) or not calibration_noise.is_floating_point():
        raise TypeError(f"calibration_noise must be a floating-point torch.Tensor or None, "
                        f"got {type(calibration_noise).__name__}")
    if calibration_noise.shape == noise.shape and torch.equal(calibration_noise.to(noise), noise):
        raise ValueError("calibration_noise is the noise the runs are measured on: a tuned grid must be measured on "
                         "other noise (pass another calibration_noise batch, or other noise)")
    return calibration_noise


def compare(
    flow: ProbabilityFlow,
    noise: Tensor | None = None,
    *,
    solvers: Iterable[str | LearnedSolver] | str | LearnedSolver | None = None,
    grids: Iterable[str] | str | None = None,
    nfe: Iterable[int] | int = DEFAULT_NFE,
    model_kwargs: Mapping[str, Any] | None = None,
    reference_solver: str = "dopri8",
    rtol: float = 1e-9,
    atol: float = 1e-9,
    reference: Reference | None = None,
    progress: bool | Callable[[str], None] = False,
    calibration_noise: Tensor | None = None,
    tune_options: Mapping[str, Any] | None = None,
    task: str = "generate",
    images: Tensor | None = None,
    peers: Iterable[str] | str | None = None,
    keep_images: int = 0,
) -> Comparison:
    """Run every solver × grid × NFE budget from ``noise`` and measure it against the reference.

    ``solvers`` are registered names (default :func:`default_solvers`) and learned solvers
    (:class:`~flowdiff.LearnedSolver`, each run once: ``learned.as_solver()`` on its own grid
    ``learned.sigmas``, labelled ``learned(<base>)`` on the grid ``fitted``, at the budget it was fitted
    for, which must be among ``nfe``; one fitted on another flow is refused, as is one at a budget not
    compared; the other budgets are listed in ``skipped``), ``grids`` named
    grids of :func:`flowdiff.make_sigmas` (default :func:`default_grids`: trailing, karras,
    logsnr, and ``"tuned"`` where stored tuned grids cover every run), ``nfe`` the budgets (each run spends the largest
    NFE ≤ the budget that its solver's steps allow). Runs use ``noise``'s dtype (float64
    noise isolates the solvers' truncation error from rounding); a combination whose one
    step costs more than the budget is listed in ``skipped``. Every run is measured against
    one :func:`reference_solution` from the schedule's σ_max, the exact sample of this noise:
    grids that start lower (``leading``, ``linear``, ``quadratic`` read the noise as x_T at
    a smaller σ) carry the error of that late start, as their users get it. On a flow-matching
    schedule the noise is the pure-noise sample at t = 1 (σ = ∞), where diffusers' FlowMatch samplers
    start, and the reference is the exact solution from there (the boundary step out of pure noise, then the
    adaptive solve; :func:`reference_solution`), so that a peer's row is its distance to the solution it
    solves; flowdiff's runs still start where ``generate(grid=...)`` starts, at σ_max, and carry the error of
    that start as their users get it (a flow without the step out of pure noise, such as a σ-native field,
    keeps the reference from σ_max, and its FlowMatch peers are left out).
    ``progress=True`` shows a tqdm bar on stderr; a callable receives a short description
    before each run instead. ``reference`` supplies the reference instead of solving it
    (e.g. one kept on disk from an earlier run of the same model and noise); one solved for another
    flow, other ``model_kwargs`` or other noise is refused (:func:`flowdiff.tools.reference.check_reference`).
    On a zero-terminal-SNR schedule (σ_max = ∞) the reference and every run start as ``generate`` does, with
    the boundary step out of pure noise (:mod:`flowdiff.engine.terminal`; its evaluation is in each row's NFE),
    the default grids are the timestep grids among :data:`DEFAULT_GRIDS` (karras and logsnr span a σ range
    that has no first σ there; named, they are skipped with why), and an ``epsilon`` model, which has no step
    out of σ = ∞, is refused before any evaluation; given ``reference=`` (e.g. one solved from a finite
    ``sigma_start``) it is compared on the grids that start at a finite σ (``leading``), a grid from σ = ∞ skipped.

    ``grids`` may also name ``"tuned"`` (:data:`TUNED_GRIDS`), which tunes a grid
    per (solver, budget) with :func:`flowdiff.tune` (options ``tune_options``) on
    ``calibration_noise`` (default: a batch like ``noise`` drawn with seed
    :data:`CALIBRATION_SEED`) and measures it on ``noise``; the same batch for both is an error.
    Without ``calibration_noise``, a grid flowdiff ships for this very model, solver and budget
    (:func:`flowdiff.stored_grid`, tuned on its own calibration noise) stands in for the tuning;
    give ``calibration_noise`` (or ``tune_options={"stored": False}``) to tune afresh.
    What was tuned, and its cost, is in the result's ``provided``.

    ``peers`` (names of :data:`flowdiff.tools.peers.PEERS`: ``"diffusers"``, ``"k-diffusion"``) adds
    their default samplers (:mod:`flowdiff.tools.peers`) as rows, run through their own loops on the
    same flow, noise and budgets and measured against the same reference; their rows carry the peer's
    name in ``source``. A peer that is not installed is listed in the result's ``unavailable`` with why,
    not raised. ``keep_images=k`` keeps the first ``k`` images of every run in the result's ``images``
    (for :mod:`flowdiff.tools.report`'s sample grid).

    ``task="roundtrip"`` compares encoders instead (:mod:`flowdiff.api.roundtrip`): each
    solver × grid × budget encodes ``images`` at that NFE and decodes its latent; the error is
    against the images themselves, ``nfe`` is encode + decode (``encode_nfe``/``decode_nfe``
    apart), the reference is the images (error 0), and ``solvers`` default to every encoder.
    """
    if task == "roundtrip":
        given = {"noise": noise is not None, "reference_solver": reference_solver != "dopri8",
                 "rtol": rtol != 1e-9, "atol": atol != 1e-9, "reference": reference is not None,
                 "calibration_noise": calibration_noise is not None, "tune_options": tune_options is not None,
                 "peers": peers is not None, "keep_images": keep_images != 0}
        for name, is_given in given.items():
            if is_given:
                raise ValueError(f"{name}= does not apply to task='roundtrip': a round trip starts from images= and "
                                 "is measured against them (no noise, no reference solve, no tuned grid, no "
                                 f"peer encoders); drop {name}=")
        if isinstance(images, Tensor) and images.is_floating_point():
            check_data_range(images, "images")  # one warning, at the caller's line, for images on another scale
        return _compare_roundtrip(flow, images, solvers, grids, nfe, model_kwargs, progress)
    if task != "generate":
        raise ValueError(f"task must be 'generate' or 'roundtrip', got {task!r}")
    if images is not None:
        raise ValueError("images= is for task='roundtrip'; a generation comparison starts from noise=")
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got "
                        f"{noise.dtype if isinstance(noise, Tensor) else type(noise).__name__}")
    _check_noise(noise)  # issue 13
    flow.check_input(noise, "noise")
    if flow.schedule.sigma_max == math.inf and reference is None:  # the reference solved here starts at σ = ∞:
        check_reference_from_infinity(flow)  # refused before evaluating (a given one may start at a finite σ)
    budgets = _check_budgets(nfe)
    names, learned = _split_solvers(default_solvers() if solvers is None else solvers, flow, model_kwargs, budgets)
    if grids is None:
        grids = default_grids(flow, names, budgets, model_kwargs)
    grid_names = _check_names(grids, "grids", (*GRIDS, *TUNED_GRIDS))
    peer_names = [] if peers is None else _peers.check_peers(peers)
    _refuse_peers_from_infinity(flow, peer_names)
    keep_images = _check_keep(keep_images)
    calibration = _calibration(noise, calibration_noise) if set(grid_names) & set(TUNED_GRIDS) else None
    check_tolerance("rtol", rtol)
    check_tolerance("atol", atol)
    if not (isinstance(progress, bool) or callable(progress)):
        raise TypeError(f"progress must be a bool or a callable, got {type(progress).__name__}")
    if reference is not None:
        check_reference(reference, flow, noise, model_kwargs)

    jobs = [(s, g, b) for s in names for g in grid_names for b in budgets]
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        runnable = [p for p in peer_names if _peers.unavailable(p) is None]
        runs = len(jobs) + len(learned) + len(_peers.default_samplers(runnable, flow)) * len(budgets)
        bar = tqdm(total=runs + (reference is None), desc="compare", unit="run", leave=False)
    try:
        ref = reference
        if ref is None:
            if bar is not None:
                bar.set_postfix_str("reference", refresh=True)
            elif callable(progress):
                progress("reference")
            ref = reference_solution(flow, noise, solver=reference_solver, rtol=rtol, atol=atol,
                                     model_kwargs=model_kwargs, progress=bar is not None)
            if bar is not None:
                bar.update(1)
        result = Comparison([], reference=ref)
        for solver, grid, budget in jobs:
            label = f"{solver}/{grid}/NFE {budget}"
            if bar is not None:
                bar.set_postfix_str(label, refresh=False)
            elif callable(progress):
                progress(label)
            reason = _cannot_run(flow, solver, grid, budget)
            if reason is not None:
                result.skipped.append(Skipped(solver, grid, budget, reason))
            else:
                spec = Grid(grid, nfe=budget) if grid in GRIDS else None
                if grid in TUNED_GRIDS:  # made on the calibration noise only
                    made = _tuning.compare_grid(flow, calibration, solver=solver, nfe=budget,
                                                model_kwargs=model_kwargs,
                                                **{"stored": calibration_noise is None, **dict(tune_options or {})})
                    result.provided[(solver, grid, budget)] = made
                    spec = Grid(sigmas=made.sigmas)
                start = time.perf_counter()
                with torch.no_grad():
                    out = generate(flow, noise, solver=solver, grid=spec, model_kwargs=model_kwargs)
                wall = time.perf_counter() - start
                diff = out.x.detach().to(torch.float64) - ref.x.to(out.x.device)
                result.runs.append(Run(solver, grid, budget, out.stats.nfe, out.stats.steps,
                                       float(diff.pow(2).mean().sqrt()), float(diff.abs().max()), wall,
                                       float(out.sigmas[0])))
                if keep_images:
                    result.images[("flowdiff", solver, grid, budget)] = out.x[:keep_images].detach().cpu()
            if bar is not None:
                bar.update(1)
        for fitted in learned:
            label = _learned_label(fitted)
            if bar is not None:
                bar.set_postfix_str(f"{label}/NFE {fitted.nfe}", refresh=False)
            elif callable(progress):
                progress(f"{label}/NFE {fitted.nfe}")
            _run_learned(result, flow, noise, fitted, model_kwargs, keep_images)
            result.skipped.extend(Skipped(label, LEARNED_GRID, b, f"fitted at nfe={fitted.nfe} only")
                                  for b in budgets if b != fitted.nfe)
            if bar is not None:
                bar.update(1)

        def announce(label: str) -> None:
            if bar is not None:
                bar.set_postfix_str(label, refresh=False)
                bar.update(1)
            elif callable(progress):
                progress(label)

        if peer_names:
            run_peers(result, flow, noise, peer_names, budgets, model_kwargs=model_kwargs, keep_images=keep_images,
                      on_run=announce)
    finally:
        if bar is not None:
            bar.close()
    return result


def _run_learned(result: Comparison, flow: ProbabilityFlow, noise: Tensor, learned: LearnedSolver,
                 model_kwargs: Mapping[str, Any] | None, keep_images: int) -> None:
    """Add the row of ``learned``: its solver on its own grid, measured against ``result.reference``."""
    label = _learned_label(learned)
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(flow, noise, solver=learned.as_solver(), grid=learned.sigmas, model_kwargs=model_kwargs)
    wall = time.perf_counter() - start
    diff = out.x.detach().to(torch.float64) - result.reference.x.to(out.x.device)
    result.runs.append(Run(label, LEARNED_GRID, learned.nfe, out.stats.nfe, out.stats.steps,
                           float(diff.pow(2).mean().sqrt()), float(diff.abs().max()), wall, float(out.sigmas[0])))
    if keep_images:
        result.images[("flowdiff", label, LEARNED_GRID, learned.nfe)] = out.x[:keep_images].detach().cpu()


def run_peers(result: Comparison, flow: ProbabilityFlow, noise: Tensor, peers: Iterable[str] | str,
              budgets: Iterable[int] | int, *, model_kwargs: Mapping[str, Any] | None = None, keep_images: int = 0,
              on_run: Callable[[str], None] | None = None) -> Comparison:
    """Add to ``result`` a row per default sampler of each of ``peers`` × budget, measured against
    ``result.reference``, and each peer that cannot run to ``result.unavailable`` with why (the peers'
    part of :func:`compare`, which the command line runs once after the ranks' runs). ``budgets`` are checked as
    ``compare(nfe=)`` checks them; an error raised inside a peer's run carries a note naming that row."""
    names = _peers.check_peers(peers)
    _refuse_peers_from_infinity(flow, names)
    budgets = _check_budgets(budgets, "budgets")  # an int is one budget, as in compare(nfe=); each once, sorted
    result.unavailable.update({peer: why for peer in names if (why := _peers.unavailable(peer)) is not None})
    ref = result.reference
    samplers = _peers.default_samplers([p for p in names if p not in result.unavailable], flow)
    _warn_another_start(ref, flow, samplers)
    for sampler in samplers:
        for budget in budgets:
            if on_run is not None:
                on_run(f"{sampler.source}: {sampler.name}/{sampler.grid}/NFE {budget}")
            reason = _peers.fits(sampler, budget)
            if reason is not None:
                result.skipped.append(Skipped(sampler.name, sampler.grid, budget, reason, sampler.source))
                continue
            try:
                out = _peers.run(sampler, flow, noise, budget, model_kwargs)
            except Exception as err:  # the model's or the peer's own error, its type kept, said for which row
                err.add_note(f"while running the peer {sampler.source}: {sampler.name} / {sampler.grid} at NFE "
                             f"{budget} (flowdiff.tools.peers.run)")
                raise
            diff = out.x.detach().to(torch.float64) - ref.x.to(out.x.device)
            result.runs.append(Run(sampler.name, sampler.grid, budget, out.nfe, out.steps,
                                   float(diff.pow(2).mean().sqrt()), float(diff.abs().max()), out.wall_time,
                                   out.sigma_start, source=sampler.source))
            if keep_images:
                result.images[(sampler.source, sampler.name, sampler.grid, budget)] = \
                    out.x[:keep_images].detach().cpu()
    return result


def _warn_another_start(reference: Reference, flow: ProbabilityFlow, samplers: list[_peers.PeerSampler]) -> None:
    """Warn where diffusers' FlowMatch samplers, which start from the noise at t = 1 (σ = ∞), are measured against a
    reference from a finite σ (given as ``reference=``, e.g. one read from a file a ``flowdiff compare`` kept before
    the reference started at t = 1, which the command itself solves again): their rows then hold the difference of
    the two starts besides their own error."""
    at_one = sorted({s.name for s in samplers if s.left_out is None and s.target.startswith("FlowMatch")})
    if at_one and math.isfinite(reference.sigma_start) and default_sigma_start(flow) == math.inf:
        warnings.warn(f"reference starts at σ={reference.sigma_start:.6g}, and diffusers' {' and '.join(at_one)} start "
                      "from the noise at t = 1 (σ = ∞): their rows hold the difference of the two starts besides their "
                      "own error. The exact solution from t = 1 is reference_solution(flow, noise), its default on "
                      "this flow-matching flow (flowdiff compare --fresh-reference solves it again)", UserWarning,
                      stacklevel=4)  # compare's caller (run_peers called directly: its caller's caller)


def _refuse_peers_from_infinity(flow: ProbabilityFlow, peers: list[str]) -> None:
    """Refuse peers on a zero-terminal-SNR schedule (σ_max = ∞) before the reference or any row
    (:func:`flowdiff.tools.peers.refuse_infinite_sigma_max`, which :func:`flowdiff.tools.peers.run` checks too)."""
    if peers:
        _peers.refuse_infinite_sigma_max(flow, f"peers={peers}")


def _check_keep(keep_images: object) -> int:
    if isinstance(keep_images, bool) or not isinstance(keep_images, numbers.Integral) or keep_images < 0:
        raise ValueError(f"keep_images must be an int >= 0 (images of each run to keep), got {keep_images!r}")
    return int(keep_images)


def _compare_roundtrip(flow: ProbabilityFlow, images: Tensor | None, solvers: Iterable[str] | str | None,
                       grids: Iterable[str] | str | None, nfe: Iterable[int] | int,
                       model_kwargs: Mapping[str, Any] | None, progress: bool | Callable[[str], None]) -> Comparison:
    """:func:`compare` with ``task="roundtrip"`` (see there and :mod:`flowdiff.api.roundtrip`)."""
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError("task='roundtrip' needs images= as a floating-point torch.Tensor (the images to encode), "
                        f"got {images.dtype if isinstance(images, Tensor) else type(images).__name__}")
    names = _check_names(_roundtrip.encoders() if solvers is None else solvers, "solvers",
                         [*_solvers.available(), "ddim_inverse"])
    grids = DEFAULT_GRIDS if grids is None else grids
    jobs = [(s, g, b) for s in names for g in _check_names(grids, "grids", GRIDS) for b in _check_budgets(nfe)]
    on_job = (lambda s, g, b: progress(f"{s}/{g}/NFE {b}")) if callable(progress) else None
    with data_range_checked():  # checked once by compare(), not once per encode
        runs, skipped = _roundtrip.roundtrip_runs(flow, images, jobs, model_kwargs=model_kwargs, on_job=on_job)
    ref = Reference(images.detach().to(torch.float64), 0.0, 0.0, "images", 0.0, 0.0, 0, 0.0, 0.0)
    return Comparison([Run(r.solver, r.grid, r.budget, r.encode_nfe + r.decode_nfe, r.steps, r.rms_error,
                           r.max_error, r.wall_time, r.sigma_end, r.encode_nfe, r.decode_nfe) for r in runs],
                      reference=ref, skipped=[Skipped(*s) for s in skipped], task="roundtrip")
