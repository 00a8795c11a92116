"""Time grids tuned to one model and one solver: the σ steps that make N evaluations count most.

At 4–10 model evaluations the grid matters as much as the solver, and the best grid depends on
the model (where its field bends) and on the solver (where its error constant is large). GITS
("On the Trajectory Regularity of ODE-based Diffusion Sampling", Chen et al., ICML 2024) finds
it by dynamic programming over a fine candidate grid against teacher trajectories; Align Your
Steps (Sabour et al. 2024) optimises a per-model schedule. Here the grid is found by a direct
search on the quantity that matters, the error of the image itself against a tight reference:

    min over σ_1 > … > σ_{n−1}  of  RMS( generate(noise_cal, solver, [σ_max, σ_1, …, σ_{n−1}, 0]) − x_ref )

with ``x_ref`` = :func:`flowdiff.reference_solution` of the calibration noise (from σ_max; on a flow-matching
model with a step out of pure noise, from t = 1, σ = ∞, its default there), σ_0 = σ_max (where ``generate``'s
grids start; ``free_start=True`` lets it move down too) and n the step count
that spends the NFE budget. The knots are parametrised by positive gaps in log σ between σ_max
and a floor (default the schedule's σ_min), normalised to sum to the whole range, so that every
point of the search is a valid, strictly decreasing grid. The search is Nelder–Mead ("A simplex
method for function minimization", Nelder & Mead 1965), first over a two-parameter warp of the
log-σ grid (log σ_i = log σ_max + (i/(n−1))^p·(log σ_{n−1} − log σ_max): the exponent p
and the last positive σ), then over the logarithms of all the gaps, started from the best of
the named grids and restarted from seeded random simplices. Half the calibration batch is
held out: of the grids that improved the fitted half, the one best on the held-out half is
kept (early stopping, against fitting which samples of one batch happen to land well), unless
the grid the search started from is better on the whole batch (then it is kept: on a batch of a
few samples the held-out half alone can prefer a worse grid).

Where it starts matters at few knots and many local minima, so the default (``method=
"dp+search"``) adds to the named starting grids the grids of GITS's dynamic programming
(:mod:`flowdiff.tools.grid_dp`: the least total local error over a fine candidate grid against teacher
trajectories of the fitted half, for Euler's and the trapezoidal rule's local errors); the best of
all on the fitted half starts the search. ``method="dp"`` returns the better DP grid as it is (no
search: only the teacher's cost; the search's ``max_evals``, ``restarts``, ``init``, ``seed`` and
``free_start`` are refused unless left at their defaults), ``method="search"`` starts from the named grids alone.

The search sees only the calibration noise: measure a tuned grid on other noise (``compare``'s
``grids=["tuned"]`` does). Its cost, in model evaluations and seconds, is recorded with the
grid in a :class:`TunedGrid`, which saves to JSON with the model's fingerprint.
"""

from __future__ import annotations

import json
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

from ..api.sampling import generate
from ..engine._checks import check_seed, model_kwargs_rows
from ..engine._files import atomic_write
from ..engine.fingerprint import accepted_fingerprints, fitted_precision, flow_fingerprint, plain_function_before
from ..engine.flow import ProbabilityFlow
from ..engine.grids import GRIDS, make_sigmas
from ..engine.plugins import registered_only
from . import grid_dp as _dp
from .reference import reference_solution

_FORMAT = "flowdiff.TunedGrid/1"
#: Named grids a search may start from (each tried on the calibration noise; the best one starts).
DEFAULT_INIT = ("logsnr", ("logsnr", {"power": 0.7}), "karras", "trailing")
_OPTIONS = ("model_kwargs", "seed", "max_evals", "restarts", "init", "sigma_floor", "reference_tol", "objective",
            "validate", "select", "free_start", "progress", "method", "candidates", "dp_orders")
#: How :func:`tune`'s warning that a batch of one sample is fitted without held-out validation begins.
NO_VALIDATION = "tune: no held-out validation"
#: What :func:`tune` does: the direct search from named grids, the GITS-style DP grid alone, or the search
#: started from the best of the named and the DP grids.
METHODS = ("search", "dp", "dp+search")


@dataclass(frozen=True)
class TunedGrid:
    """A σ grid tuned for ``solver`` (with ``solver_options``) at budget ``nfe`` on the flow of ``fingerprint``.

    ``sigmas`` is the generation grid (decreasing, ending at 0). ``calibration_error`` is its
    RMS image error on the calibration noise, ``initial_error`` that of the named grid the
    search started from (``initial_grid``); ``tuning_nfe`` and ``tuning_seconds`` are the
    search's cost (model evaluations of the candidate solves, plus the reference's
    ``reference_nfe`` — its solve and the looser solve that checks it, counted even when the reference cache
    supplied it — and the DP's teacher, ``teacher_nfe``).
    ``options`` are the tuning options
    used (seed, evaluations, ...), ``method`` the :data:`METHODS` entry. ``source`` is the file a
    stored grid was read from by :func:`stored_grid` (empty for a grid tuned in this process).
    """

    sigmas: np.ndarray
    solver: str
    solver_options: dict[str, Any]
    nfe: int
    fingerprint: str
    options: dict[str, Any] = field(default_factory=dict)
    calibration_error: float = math.nan
    initial_grid: str = ""
    initial_error: float = math.nan
    evaluations: int = 0
    tuning_nfe: int = 0
    reference_nfe: int = 0
    tuning_seconds: float = 0.0
    method: str = "search"  # what files written before the DP existed were made with
    teacher_nfe: int = 0
    source: str = ""

    def check(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` unless this grid was tuned on ``flow`` (with ``model_kwargs``)."""
        check_fingerprint(self.fingerprint, flow, model_kwargs, "this grid was tuned", "tune it again")

    def save(self, path: str | Path) -> Path:
        """Write the grid (σ as exact float hex strings) and everything it was tuned for as JSON."""
        data = asdict(self)
        data["sigmas"] = [float(s).hex() for s in self.sigmas]
        return write_record(path, _FORMAT, data, "tuned grid")

    @classmethod
    def load(cls, path: str | Path, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None
             ) -> TunedGrid:
        """Read a grid written by :meth:`save` and check that it belongs to ``flow`` (see :meth:`check`)."""
        path = Path(path)
        data = read_record(path, _FORMAT, "tuned grid")
        try:
            data["sigmas"] = np.array([float.fromhex(s) for s in data["sigmas"]], dtype=np.float64)
            grid = _consistent(cls(**data))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: malformed tuned grid ({err})") from None
        grid.check(flow, model_kwargs)
        return grid


def _consistent(grid: TunedGrid) -> TunedGrid:
    """``grid`` as read from a file, if it can be what :func:`tune` writes: a generation grid (finite σ ≥ 0, strictly
    decreasing) of at most ``nfe`` steps (every solver spends at least one evaluation a step), for a registered
    solver with options it takes (a file naming another was loaded, and failed only where the grid was used)."""
    s = grid.sigmas
    if s.ndim != 1 or s.size < 2 or not np.all(np.isfinite(s)) or np.any(s < 0) or np.any(np.diff(s) >= 0):
        raise ValueError(f"sigmas must be a strictly decreasing list of at least 2 finite σ >= 0 (a generation grid), "
                         f"got {s.tolist()}")
    if isinstance(grid.nfe, bool) or not isinstance(grid.nfe, int) or grid.nfe < s.size - 1:
        raise ValueError(f"nfe must be an int no smaller than the grid's {s.size - 1} steps, got {grid.nfe!r}")
    if not isinstance(grid.solver, str) or not isinstance(grid.solver_options, dict):
        raise ValueError(f"solver must be a registered solver's name and solver_options its options, got "
                         f"{grid.solver!r} and {grid.solver_options!r}")
    _solvers.get(grid.solver, **grid.solver_options)  # an unknown name or option: a ValueError naming it
    return grid


def read_record(path: Path, format: str, what: str) -> dict[str, Any]:
    """The fields of a JSON file whose ``"format"`` is ``format`` (a tuned grid, a learned solver), without
    it; an unreadable file or another format is a ValueError naming the file and ``what`` was expected."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:  # a binary file is not UTF-8
        raise ValueError(f"{path}: not a readable {what} JSON file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != format:
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a flowdiff {what} (format {found!r}, expected {format!r})")
    data.pop("format")
    return data


def write_record(path: str | Path, format: str, data: dict[str, Any], what: str) -> Path:
    """Write ``data`` as the JSON file of a ``format`` record (a tuned grid, a learned solver or encoder); numpy
    numbers and tuples in its options are stored as JSON numbers and lists, anything else is a TypeError. Written
    atomically, as :meth:`flowdiff.Latent.save` writes: a file already at ``path`` is replaced whole, and a write
    that fails (a full disk) leaves it as it was, where writing in place had left it cut short."""

    def plain(value: object) -> object:
        if isinstance(value, (np.integer, np.floating)):
            return value.item()
        if isinstance(value, (list, tuple)):
            return list(value)
        raise TypeError(f"cannot store {type(value).__name__} in a {what}'s options")

    path = Path(path)
    text = json.dumps({"format": format, **data}, indent=1, default=plain) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text.encode(), f"flowdiff {what} file")
    return path


def check_fingerprint(fingerprint: str, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None, what: str,
                      again: str) -> None:
    """Raise ``ValueError`` unless ``flow`` (with ``model_kwargs``) has ``fingerprint``: the flow a record
    (``what``: "this grid was tuned", …) belongs to; ``again`` says how to make one for the flow given."""
    accepted = accepted_fingerprints(flow, model_kwargs)
    if fingerprint not in accepted and fingerprint in plain_function_before(flow, model_kwargs):
        raise ValueError(f"{what} on a plain function's flow with fingerprint {fingerprint}, recorded before flowdiff "
                         "read a plain function's code and closure (every plain function of one schedule had that "
                         f"fingerprint), so it cannot tell whether the function given is that one: {again}")
    if fingerprint not in accepted:
        precision = fitted_precision(fingerprint, flow, model_kwargs)
        if precision is not None:  # the same network in another dtype: say that, not "another model"
            made, given = precision
            raise ValueError(f"{what} on the flow with fingerprint {fingerprint}; the flow given has fingerprint "
                             f"{accepted[0]}: the same model and conditioning, its network in {given} where the file "
                             f"was made with it in {made} (another precision is another field); run it in {made} "
                             f"(--dtype {str(made).removeprefix('torch.')} on the command line), or {again}")
        older = ("; a file saved before flowdiff fingerprinted conditioning repeated per sample independently of the "
                 "batch size matches only at the batch it was made with") if len(accepted) > 1 else ""
        raise ValueError(f"{what} on the flow with fingerprint {fingerprint}; the flow given has fingerprint "
                         f"{accepted[0]} (another model, schedule or conditioning{older}): {again}")


def record_fingerprint(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None, what: str) -> str:
    """The fingerprint a fitted record (``what``: "tune", "learn_solver", …) saves, taken before any evaluation:
    a flow that cannot be fingerprinted (a plain function's field) is refused before the fit, not after it."""
    try:
        return flow_fingerprint(flow, model_kwargs)
    except TypeError as err:
        raise TypeError(f"{what} records the fingerprint of the flow and its model_kwargs (flowdiff.flow_fingerprint) "
                        f"so that its result loads only for this model and conditioning, and it cannot be taken here, "
                        f"before any evaluation: {err}") from None


class _Knots:
    """The map from search parameters ``v`` to a grid of n steps from σ_max (or below) to 0.

    Positive gaps g split log σ_max − log σ_floor into parts, and the knots are the partial sums:
    log σ_i = log σ_max − L·(g_s + g_0 + … + g_{i−1})/Σg (the last gap is the room left between
    σ_{n−1} and the floor), then σ_n = 0. g_0 = 1 fixes the scale; the others are exp(v_j). The
    start gap g_s exists only with ``free_start`` (the grid may then start below σ_max, as
    diffusers' ``leading`` spacing does); otherwise σ_0 = σ_max.
    """

    def __init__(self, sigma_max: float, sigma_floor: float, steps: int, free_start: bool) -> None:
        self.hi, self.lo, self.steps = math.log(sigma_max), math.log(sigma_floor), steps
        self.sigma_max, self.free_start = sigma_max, free_start
        self.dim = steps if free_start else steps - 1

    def grid(self, v: np.ndarray) -> np.ndarray:
        v = np.clip(np.asarray(v, dtype=np.float64), -30.0, 30.0)
        logs = np.concatenate([[v[0], 0.0], v[1:]]) if self.free_start else np.concatenate([[0.0], v])
        gaps = np.exp(logs)
        knots = np.exp(self.hi - (self.hi - self.lo) * (np.cumsum(gaps)[:-1] / gaps.sum()))
        head = [] if self.free_start else [self.sigma_max]
        return np.concatenate([head, knots, [0.0]])

    def params(self, sigmas: np.ndarray) -> np.ndarray:
        """Parameters of the grid nearest ``sigmas`` (clipped into the floor, every gap kept positive)."""
        inner = sigmas[:-1] if self.free_start else sigmas[1:-1]
        logs = np.log(np.clip(inner, math.exp(self.lo), self.sigma_max))
        points = np.concatenate([[self.hi], logs, [self.lo]])
        gaps = np.maximum(-np.diff(points), 1e-3 * (self.hi - self.lo) / self.steps)
        if self.free_start:
            return np.log(np.concatenate([[gaps[0]], gaps[2:]]) / gaps[1])
        return np.log(gaps[1:] / gaps[0])


def _parse_init(init: Any) -> list[tuple[str, dict[str, Any]]]:
    """``init`` as a list of ``(grid name, grid_options)``: one name, one ``(name, options)`` or a sequence of them."""
    single = isinstance(init, str) or (isinstance(init, tuple) and len(init) == 2 and isinstance(init[1], Mapping))
    init = [init] if single else list(init)
    parsed = []
    for item in init:
        name, grid_options = (item, {}) if isinstance(item, str) else (tuple(item) + ({},))[:2]
        if name not in GRIDS or not isinstance(grid_options, Mapping):
            raise ValueError(f"init must name grids to start from (a name, or (name, grid_options)), got {item!r}; "
                             f"accepted names: {', '.join(GRIDS)}")
        parsed.append((name, dict(grid_options)))
    if not parsed:
        raise ValueError(f"init must name at least one grid to start from; accepted: {', '.join(GRIDS)}")
    return parsed


def _refuse_search_options(out: Mapping[str, Any]) -> None:
    """``method="dp"`` runs no search: the search's options set to anything but their defaults are refused."""
    defaults = {"max_evals": None, "restarts": 1, "init": _parse_init(DEFAULT_INIT), "seed": 0, "free_start": False}
    given = {"init": _parse_init(out["init"])} if "init" in out else {}
    unused = [f"{name}={out[name]!r}" for name in defaults
              if name in out and given.get(name, out[name]) != defaults[name]]
    if unused:
        raise ValueError(f"{', '.join(unused)} configure the search (its evaluations, restarts, starting grids, "
                         "the restarts' seed and whether it may move the first σ), which method='dp' does not run: "
                         "it returns the better DP grid as it is; "
                         f"drop {'them' if len(unused) > 1 else 'it'} or use method='dp+search'. The DP takes "
                         "candidates= (candidate σ) and dp_orders= (its local-error rules) instead")


def _check_options(options: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"tune_grid got unknown option(s) {unknown}; accepted: {', '.join(_OPTIONS)}")
    out = dict(options)
    for name in ("max_evals", "restarts"):
        if name in out and out[name] is not None:
            v = out[name]
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "max_evals" else 0):
                raise ValueError(f"{name} must be an int >= {1 if name == 'max_evals' else 0}, got {v!r}")
    check_seed(out.get("seed", 0))  # numpy's error for -1 ("expected non-negative integer") named no argument
    out["init"] = _parse_init(out.get("init", DEFAULT_INIT))
    if out.get("select", "validation") not in ("validation", "pooled"):
        raise ValueError(f"select must be 'validation' or 'pooled', got {out['select']!r}")
    if not isinstance(out.get("validate", True), bool):
        raise TypeError(f"validate must be a bool, got {type(out['validate']).__name__}")
    tol = out.get("reference_tol", 1e-7)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol <= 1e-3:
        raise ValueError(f"reference_tol must be a number in (0, 1e-3], got {tol!r}")
    if out.get("objective", "rms") not in ("geomean", "rms"):
        raise ValueError(f"objective must be 'geomean' or 'rms', got {out['objective']!r}")
    if not isinstance(out.get("progress", True), bool):
        raise TypeError(f"progress must be a bool, got {type(out['progress']).__name__}")
    if out.get("method", "dp+search") not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {out['method']!r}")
    if not isinstance(out.get("free_start", False), bool):
        raise TypeError(f"free_start must be a bool, got {type(out['free_start']).__name__}")
    if out.get("method") == "dp":
        _refuse_search_options(options)  # the user's own values, in their words
    if out.get("method", "dp+search") == "search":
        unused = [k for k in ("candidates", "dp_orders") if k in out]
        if unused:
            raise ValueError(f"{', '.join(unused)} configure the DP, which method='search' does not run; drop "
                             f"{'them' if len(unused) > 1 else 'it'} or use method='dp' or 'dp+search'")
    count = out.get("candidates", _dp.DEFAULT_CANDIDATES)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 2):
        raise ValueError(f"candidates must be an int >= 2 (candidate σ of the DP), got {count!r}")
    orders = out.get("dp_orders", (1, 2))
    if isinstance(orders, int) and not isinstance(orders, bool):
        orders = (orders,)
    if not isinstance(orders, (tuple, list)) or not orders or any(o not in (1, 2) or isinstance(o, bool)
                                                                  for o in orders):
        raise ValueError(f"dp_orders must be 1, 2 or a sequence of them (the DP's local-error rules), got {orders!r}")
    out["dp_orders"] = tuple(orders)
    return out


def tune(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str,
    nfe: int,
    solver_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> TunedGrid:
    """Tune the σ grid of ``solver`` at a budget of ``nfe`` evaluations on calibration ``noise``.

    Returns the :class:`TunedGrid` (the grid, its calibration error, what it cost); see
    :func:`tune_grid` for the options. ``generate(flow, other_noise,
    solver=solvers.get(solver, **solver_options), grid=tuned.sigmas)`` spends at most ``nfe`` evaluations.
    """
    return _tuned(flow, noise, solver=solver, nfe=nfe, solver_options=solver_options, record=True, **options)


def _tuned(flow: ProbabilityFlow, noise: Tensor, *, solver: str, nfe: int, solver_options: Mapping[str, Any] | None,
           record: bool, **options: Any) -> TunedGrid:
    """:func:`tune`; ``record=False`` (:func:`tune_grid`, whose caller gets the grid alone) takes no fingerprint, so
    a flow that cannot be fingerprinted is tuned too (its result's ``fingerprint`` is empty)."""
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")
    flow.check_input(noise, "noise")  # the whole batch, before the reference solve and the halves
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name (str), got {type(solver).__name__}")
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a mapping, got {type(solver_options).__name__}")
    solver_options = dict(solver_options or {})
    registered_only(solver, "solver", "that tune runs")
    solver_obj = _solvers.get(solver, **solver_options)
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    steps = _solvers.steps_for_nfe(solver_obj, nfe, eval_end=False)  # ValueError when one step costs more
    opts = _check_options(options)
    model_kwargs = opts.get("model_kwargs")
    seed = opts.get("seed", 0)
    restarts = opts.get("restarts", 1)
    floor = flow.schedule.sigma_min if opts.get("sigma_floor") is None else float(opts["sigma_floor"])
    sigma_max = flow.schedule.sigma_max
    if not 0 < floor < sigma_max:
        raise ValueError(f"sigma_floor must lie in (0, sigma_max={sigma_max:.6g}), got {opts.get('sigma_floor')!r}")
    dim = steps - 1
    max_evals = opts.get("max_evals") or (40 + 40 * dim)
    tol = float(opts.get("reference_tol", 1e-7))
    objective = opts.get("objective", "rms")
    validate = opts.get("validate", True) and noise.shape[0] >= 2
    if opts.get("validate", True) and not validate:
        warnings.warn(f"{NO_VALIDATION}: noise holds {noise.shape[0]} sample, and the held-out validation needs at "
                      "least 2 (every other sample is held out), so the grid is fitted to it without validation "
                      "(recorded as validate=False in the result's options); give 2 or more samples, or "
                      "validate=False to ask for this", UserWarning, stacklevel=2)
    fingerprint = record_fingerprint(flow, model_kwargs, "tune") if record else ""  # before any evaluation
    start = time.perf_counter()
    ref = reference_solution(flow, noise, rtol=tol, atol=tol, model_kwargs=model_kwargs,
                             sigma_end=0.0 if flow.sigma_field is not None else None,
                             progress=opts.get("progress", True))
    ref_cost = ref.nfe + ref.error_nfe  # the teacher and the looser solve that checks it
    target = ref.x.to(device=noise.device, dtype=torch.float64)
    halves = (slice(0, None, 2), slice(1, None, 2)) if validate else (slice(None), None)
    spent = {"nfe": check_rows_split(flow, noise, model_kwargs, halves), "evals": 0}

    def error(sigmas: np.ndarray, part: slice) -> float:
        """The RMS image error of the grid on ``noise[part]`` (inf where the solve fails)."""
        try:
            with torch.no_grad():
                out = generate(flow, noise[part], solver=solver_obj, grid=sigmas,  # conditioning: the part's rows
                               model_kwargs=model_kwargs_rows(model_kwargs, noise.shape[0], part) or None)
        except _solvers.SolveError:
            return math.inf
        spent["nfe"] += out.stats.nfe
        spent["evals"] += 1
        if out.stats.nfe > nfe:  # never: the step count was chosen by the driver's own count
            raise RuntimeError(f"a tuned candidate spent {out.stats.nfe} evaluations, over the budget {nfe}")
        diff = (out.x.to(torch.float64) - target[part]).reshape(out.x.shape[0], -1)
        per_sample = diff.pow(2).mean(dim=1).sqrt()
        value = float(per_sample.pow(2).mean().sqrt() if objective == "rms" else per_sample.log().mean().exp())
        return value if math.isfinite(value) else math.inf

    search = _Search(error, halves, int(noise.shape[0]), max_evals, opts.get("progress", True),
                     opts.get("select", "validation"))
    knots = _Knots(sigma_max, floor, steps, opts.get("free_start", False))
    method = opts.get("method", "dp+search")
    teacher_nfe = 0
    starts: list[tuple[str, np.ndarray]] = []
    if method in ("dp", "dp+search"):  # GITS: DP over candidate σ against teacher trajectories of the fitted half
        count = opts.get("candidates") or max(_dp.DEFAULT_CANDIDATES, 2 * steps)
        candidates = _dp.candidate_sigmas(sigma_max, floor, count)
        if steps > len(candidates) - 1:
            raise ValueError(f"{steps} steps need at least {steps} candidate σ for the DP; got candidates="
                             f"{len(candidates) - 1}")
        rows_kw = model_kwargs_rows(model_kwargs, noise.shape[0], halves[0]) or None  # the fitted half's conditioning
        teacher = _dp.teacher_trajectory(flow, noise[halves[0]], candidates, model_kwargs=rows_kw)
        teacher_nfe = teacher.nfe
        starts += [(f"dp order {order}", _dp.dp_sigmas(teacher, steps, order)) for order in opts["dp_orders"]]
    initial = None
    for label, sig in starts:
        e = search.evaluate(sig)
        if initial is None or e < initial[0]:
            initial = (e, label, sig)
    for name, grid_options in ([] if method == "dp" else opts["init"]):
        try:
            sig = make_sigmas(flow.schedule, name, steps, **grid_options)
        except ValueError:  # e.g. a timestep grid that cannot hold this many steps
            continue
        if sig[0] != sigma_max and not knots.free_start:  # σ_0 = σ_max: where the noise is read as the state
            continue
        e = search.evaluate(sig)
        if initial is None or e < initial[0]:
            initial = (e, _init_name(name, grid_options), sig)
    if initial is None:
        initial = (search.evaluate(knots.grid(np.zeros(knots.dim))), "uniform in log σ",
                   knots.grid(np.zeros(knots.dim)))
    rng = np.random.default_rng(seed)
    try:
        if method == "dp":
            max_evals = search.evals  # the DP grids alone: no search
        if dim >= 2 and method != "dp":  # a two-parameter warp of the log-σ grid first: few knobs, little to overfit
            warp = _Warp(sigma_max, floor, steps)
            search.minimize(warp.grid, np.array([0.0, math.log(max(initial[2][-2], floor) / floor) + 1e-3]),
                            np.eye(2) * 0.5, budget=min(max_evals // 4, 40))
        for attempt in range(restarts + 1 if method != "dp" else 0):  # then every knot
            left = max_evals - search.evals
            if knots.dim == 0 or left <= knots.dim + 1:
                break
            x = knots.params(search.best_sigmas)
            k = knots.dim
            directions = np.eye(k) if attempt == 0 else np.linalg.qr(rng.standard_normal((k, k)))[0].T
            if knots.free_start and attempt == 0:
                directions[0, 0] = 4.0 / 0.7  # the start gap begins tiny: move it by a large factor
            search.minimize(knots.grid, x, (0.7 if attempt == 0 else 0.4) * directions,
                            budget=left // (restarts + 1 - attempt))
    finally:
        search.close()
    best_sigmas, best_err = search.result()
    elapsed = time.perf_counter() - start
    stored = {k: v for k, v in opts.items() if k not in ("model_kwargs", "progress", "init")}
    stored.update(max_evals=max_evals, restarts=restarts, seed=seed, reference_tol=tol, sigma_floor=floor,
                  objective=objective, validate=validate, calibration_batch=int(noise.shape[0]),
                  init=[_init_name(*g) for g in opts["init"]], dp_orders=list(opts["dp_orders"]))
    initial_err = search.full_error(initial[2])
    if initial_err < best_err:  # the held-out choice may not undo the start: never worse on the whole batch
        best_sigmas, best_err = initial[2], initial_err
    return TunedGrid(best_sigmas.copy(), solver, solver_options, nfe, fingerprint, stored,
                     best_err, initial[1], initial_err, spent["evals"], spent["nfe"] + ref_cost + teacher_nfe, ref_cost,
                     elapsed, method, teacher_nfe)


def _init_name(name: str, grid_options: Mapping[str, Any]) -> str:
    return name + "".join(f" {k}={v}" for k, v in grid_options.items())


class _Warp:
    """Two parameters (log p, log(σ_{n−1}/σ_floor)): log σ_i = log σ_max + (i/(n−1))^p·(log σ_{n−1} − log σ_max)."""

    def __init__(self, sigma_max: float, sigma_floor: float, steps: int) -> None:
        self.hi, self.floor, self.steps, self.sigma_max = math.log(sigma_max), sigma_floor, steps, sigma_max
        self.span = math.log(sigma_max / sigma_floor)

    def grid(self, v: np.ndarray) -> np.ndarray:
        power = math.exp(float(np.clip(v[0], -3.0, 3.0)))
        last = math.log(self.floor) + float(np.clip(v[1], 0.0, 0.95 * self.span))
        ramp = (np.arange(1, self.steps) / (self.steps - 1)) ** power
        inner = np.exp(self.hi + ramp * (last - self.hi))
        return np.concatenate([[self.sigma_max], inner, [0.0]])


#: How many times the model's own spread (two evaluations of one batch) a half's field may differ from the batch's
#: before :func:`check_rows_split` takes a model that draws random numbers for a table cut by accident
ROWS_SPREAD = 4.0


def check_rows_split(flow: ProbabilityFlow, xbar: Tensor, model_kwargs: Mapping[str, Any] | None,
                     halves: Sequence[slice | None]) -> int:
    """Check that the calibration halves' rows of ``model_kwargs`` are what the model sees per sample.

    :func:`flowdiff.engine._checks.model_kwargs_rows` takes a tensor whose leading size is the batch as one row per
    sample; one of that size by accident (a lookup table with as many rows as the batch) would be cut, and each half
    solved with the wrong table, silently or with an unnamed IndexError. Where a tensor is cut, the field of each half
    with its rows must equal the whole batch's at those rows: one evaluation of the batch and one of each half, at
    σ_max; nothing where no tensor is cut. A model that draws random numbers (dropout in training mode, a stochastic
    layer) differs from itself between calls, and the halves draw tensors of other sizes, so no seed makes their draws
    the whole batch's: on a first difference the batch is evaluated once more, and a half is refused only where it
    differs from the batch by more than :data:`ROWS_SPREAD` times the model's own spread between those two (0 for a
    deterministic model). Returns the model evaluations it made (0, 1 + the halves, or one more where the batch was
    evaluated again), which the caller counts in its cost."""
    batch = xbar.shape[0]
    cut = sorted(key for key, value in (model_kwargs or {}).items()
                 if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch)
    parts = [rows for rows in halves if rows is not None and rows != slice(None)]
    if not cut or not parts or batch < 2:  # a batch of one has no held-out half (nothing to cut it against)
        return 0
    shapes = ", ".join(f"{key}: {tuple(model_kwargs[key].shape)}" for key in cut)
    problem = (f"model_kwargs {shapes} have the calibration batch's leading size {batch}, so each calibration half "
               "(the even and the odd samples) is given its rows of them; ")
    advice = ("a tensor that is not one row per sample (a lookup table of as many rows as the batch) must not have "
              "the batch's leading size: give one more or fewer calibration samples, or make it the model's attribute")
    sigma = flow.schedule.sigma_max
    evaluations = 1 + len(parts)
    spread: float | None = None  # max|ε − ε'| between two evaluations of the batch, measured on a first difference
    with torch.no_grad():
        whole = flow.eps(xbar, sigma, **model_kwargs)
        tol = 1e3 * torch.finfo(whole.dtype).eps if whole.is_floating_point() else 0.0
        for rows in parts:
            try:
                part = flow.eps(xbar[rows], sigma, **model_kwargs_rows(model_kwargs, batch, rows))
            except (IndexError, RuntimeError, ValueError) as err:
                failed = f"the model failed on them ({type(err).__name__}: {err}); "
                raise ValueError(problem + failed + advice) from err
            if part.shape != whole[rows].shape:
                raise ValueError(problem + f"the model's output on a half has shape {tuple(part.shape)}, the whole "
                                 f"batch's at those rows {tuple(whole[rows].shape)}; " + advice)
            if torch.allclose(part, whole[rows], rtol=tol, atol=tol * float(whole.abs().max())):
                continue
            if spread is None:  # the model's own randomness, measured once: the batch again
                spread = float((flow.eps(xbar, sigma, **model_kwargs) - whole).abs().max())
                evaluations += 1
            gap = float((part - whole[rows]).abs().max())
            if not gap <= ROWS_SPREAD * spread:
                own = (f", more than {ROWS_SPREAD:g} times the model's own spread between two evaluations of the batch "
                       f"({spread:.3g})" if spread > 0 else " (the model gives the batch the same output every call)")
                raise ValueError(problem + f"the model's output on a half differs from the whole batch's at those "
                                 f"rows by {gap:.3g}{own}; " + advice)
    return evaluations


class _Search:
    """Counts candidate solves, keeps the best grid on the fitting half of the calibration batch and,
    along the way, the validation half's error of every new best; the result is the grid of that path
    that did best on the validation half (early stopping against over-fitting the batch)."""

    def __init__(self, error, halves: tuple[slice, slice | None], batch: int, max_evals: int, progress: bool,
                 select: str = "validation") -> None:
        self.error, (self.fit, self.val) = error, halves
        self.select = select
        self.sizes = (len(range(batch)[self.fit]), len(range(batch)[self.val]) if self.val is not None else 0)
        self.max_evals = max_evals
        self.evals = 0
        self.best_fit = math.inf
        self.best_sigmas: np.ndarray | None = None
        self.path: list[tuple[float, float, np.ndarray]] = []  # (validation error, fit error, grid)
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=max_evals, desc="tune grid", unit="solve", leave=False)

    def evaluate(self, sigmas: np.ndarray) -> float:
        e = self.error(sigmas, self.fit)
        self.evals += 1
        if e < self.best_fit:
            self.best_fit, self.best_sigmas = e, sigmas
            val = self.error(sigmas, self.val) if self.val is not None else e
            self.path.append((val, e, sigmas))
        if self.bar is not None:
            self.bar.set_postfix_str(f"RMS error {self.best_fit:.3g}", refresh=False)
            self.bar.update(1)
        return e

    def minimize(self, to_grid, x0: np.ndarray, steps: np.ndarray, budget: int) -> None:
        """Nelder–Mead on log(error) from ``x0`` with the simplex ``x0 + rows of steps``."""
        from scipy.optimize import minimize

        stop = min(self.max_evals, self.evals + budget)

        def objective(v: np.ndarray) -> float:
            if self.evals >= stop:
                return math.inf
            e = self.evaluate(to_grid(v))
            return math.log(e) if e > 0 else -math.inf

        if self.evals < stop:
            minimize(objective, x0, method="Nelder-Mead",
                     options={"initial_simplex": np.vstack([x0, x0 + steps]), "maxfev": budget,
                              "xatol": 1e-3, "fatol": 1e-4})

    def full_error(self, sigmas: np.ndarray) -> float:
        """The RMS error on the whole calibration batch (from the two halves' errors)."""
        for val, fit, grid in self.path:
            if grid is sigmas:
                return self._pooled(fit, val)
        fit = self.error(sigmas, self.fit)
        return self._pooled(fit, self.error(sigmas, self.val) if self.val is not None else fit)

    def _pooled(self, fit: float, val: float) -> float:
        n_fit, n_val = self.sizes
        return math.sqrt((n_fit * fit * fit + n_val * val * val) / (n_fit + n_val))

    def result(self) -> tuple[np.ndarray, float]:
        if not self.path:
            raise ValueError("every candidate grid failed (non-finite images); the model or noise may be at fault")
        if self.select == "pooled":
            val, fit, grid = min(self.path, key=lambda p: self._pooled(p[1], p[0]))
        else:
            val, fit, grid = min(self.path, key=lambda p: (p[0], p[1]))
        return grid, self.full_error(grid)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def tune_grid(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str,
    nfe: int,
    solver_options: Mapping[str, Any] | None = None,
    **options: Any,
) -> np.ndarray:
    """A σ grid (decreasing, ending at 0) for ``solver`` at ``nfe`` evaluations, tuned on ``noise``.

    The grid minimises the RMS error of the image generated from ``noise`` (the calibration
    batch, DDIM scale) against :func:`flowdiff.reference_solution` of that noise, by a direct
    search over its log-σ knots (see :mod:`flowdiff.tools.tuning`). Use it on *other* noise:
    ``generate(flow, other, solver=solvers.get(solver, **solver_options), grid=grid)``
    spends at most ``nfe`` evaluations. :func:`tune` returns the same grid with its cost and
    errors as a :class:`TunedGrid` (which saves and loads as JSON).

    The search fits the even-indexed half of ``noise`` and keeps, of the grids that improved
    on it, the one best on the odd-indexed half (``validate=False``: the whole batch is fitted
    and the best fit kept). A batch of a few dozen samples is enough for a smooth model; a
    model whose samples can jump between modes at low NFE needs more (the error is then
    dominated by the samples that jump).

    Options: ``model_kwargs`` (conditioning; a tensor with one entry per sample, first axis of the noise's
    length, is split into the halves with the noise), ``seed`` (of the random restarts, default 0;
    the result is reproducible for a seed), ``max_evals`` (candidate solves, named starting
    grids included, default 40 + 40·(steps − 1)), ``restarts`` (default 1), ``init`` (grids
    to start from: names or ``(name, grid_options)``, default logsnr, logsnr with power 0.7,
    karras, trailing: the best on the calibration noise starts the search), ``sigma_floor``
    (the smallest σ a knot may take, default the schedule's σ_min), ``reference_tol`` (rtol =
    atol of the reference, default 1e-7), ``objective`` (``"rms"``, the RMS image error, or
    ``"geomean"``, the geometric mean of the per-sample errors), ``validate`` (default True; a batch of
    one sample has no half to hold out: it is fitted whole, with a ``UserWarning``, and ``validate=False`` recorded),
    ``select`` (which improving grid is kept: ``"validation"``, the best on the held-out half,
    default; ``"pooled"``, the best on the whole batch),
    ``free_start`` (let the first σ move below σ_max too, default False), ``progress`` (tqdm
    bars of the reference and the search, default True), ``method`` (``"dp+search"``, default:
    the GITS-style DP grids join the starting grids; ``"dp"``: the better DP grid, no search, and
    ``max_evals``, ``restarts``, ``init``, ``seed``, ``free_start`` other than their defaults refused;
    ``"search"``: the named grids start), ``candidates`` (candidate σ of the DP, uniform in log σ,
    default 64 or twice the steps if more) and ``dp_orders`` (the local-error rules whose DP grids are tried: 1,
    Euler's, 2, the trapezoidal rule's; default both).
    """
    return _tuned(flow, noise, solver=solver, nfe=nfe, solver_options=solver_options, record=False, **options).sigmas


# ---------------------------------------------------------------------------------------------- stored grids

_SET_FORMAT = "flowdiff.TunedGrids/1"
#: Where flowdiff's own tuned grids are shipped (``*.tuned.json``, one file per model; see
#: ``benchmarks/tune_shipped.py``, which writes the one of ``pretrained("digits")``).
STORED_DIR = Path(__file__).parents[1] / "weights"


def save_grids(grids: list[TunedGrid], path: str | Path) -> Path:
    """Write several tuned grids (e.g. one model's, for every solver and budget) to one JSON file."""
    if not grids or not all(isinstance(g, TunedGrid) for g in grids):
        raise TypeError("grids must be a non-empty list of flowdiff.TunedGrid")
    items = []
    for grid in grids:
        data = asdict(grid)
        data["sigmas"] = [float(s).hex() for s in grid.sigmas]
        items.append(data)
    return write_record(path, _SET_FORMAT, {"grids": items}, "tuned grid")


def load_grids(path: str | Path) -> list[TunedGrid]:
    """Read a file written by :func:`save_grids` (every grid, of whatever model: see :meth:`TunedGrid.check`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:  # a binary file is not UTF-8
        raise ValueError(f"{path}: not a readable tuned-grids JSON file ({err})") from None
    if not isinstance(data, dict) or data.get("format") != _SET_FORMAT or not isinstance(data.get("grids"), list):
        found = data.get("format") if isinstance(data, dict) else None
        raise ValueError(f"{path} is not a flowdiff tuned-grids file (format {found!r}, expected {_SET_FORMAT!r})")
    out = []
    for k, item in enumerate(data["grids"]):
        try:
            item = dict(item)
            item["sigmas"] = np.array([float.fromhex(s) for s in item["sigmas"]], dtype=np.float64)
            out.append(_consistent(TunedGrid(**item)))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: grid {k} is malformed ({err})") from None
    return out


_STORED: dict[Path, tuple[float, list[TunedGrid]]] = {}


def stored_grid(flow: ProbabilityFlow, solver: str, nfe: int, solver_options: Mapping[str, Any] | None = None,
                model_kwargs: Mapping[str, Any] | None = None, directory: str | Path | None = None
                ) -> TunedGrid | None:
    """The shipped grid tuned for exactly this flow (by fingerprint), solver, options and budget, or ``None``.

    Looks in ``directory`` (default :data:`STORED_DIR`; a ``directory`` given that is not a folder is an
    ``OSError`` naming it) at every ``*.tuned.json``. A flow whose network, schedule or conditioning differs in any
    bit has another fingerprint and finds none.
    """
    registered_only(solver, "solver", "that tune runs, the ones grids are stored for")
    if solver not in _solvers.available():  # a misspelt name is not a solver without a stored grid
        raise ValueError(f"unknown solver {solver!r}; available: {', '.join(_solvers.available())}")
    if isinstance(nfe, bool) or not isinstance(nfe, (int, np.integer)):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    if nfe < 1:
        raise ValueError(f"nfe must be >= 1, got {nfe}")
    folder = STORED_DIR if directory is None else Path(directory)
    if directory is not None and not folder.is_dir():  # a misspelt folder is not a folder without stored grids
        raise (NotADirectoryError if folder.exists() else FileNotFoundError)(
            f"directory {str(directory)!r} is not a folder{'' if folder.exists() else ' (it does not exist)'}; "
            "stored_grid looks there for *.tuned.json files (flowdiff.save_grids writes them)")
    files = sorted(folder.glob("*.tuned.json"))
    if not files:
        return None
    try:
        fingerprints = accepted_fingerprints(flow, model_kwargs)
    except TypeError:  # conditioning that cannot be fingerprinted has no stored grid
        return None
    options = dict(solver_options or {})
    for path in files:
        mtime = path.stat().st_mtime
        cached = _STORED.get(path)
        if cached is None or cached[0] != mtime:
            cached = _STORED[path] = (mtime, load_grids(path))
        for grid in cached[1]:
            if grid.fingerprint in fingerprints and (grid.solver, grid.nfe, grid.solver_options) == \
                    (solver, nfe, options):
                return replace(grid, source=str(path))
    return None


def compare_grid(flow: ProbabilityFlow, calibration: Tensor, *, solver: str, nfe: int,
                 model_kwargs: Mapping[str, Any] | None, stored: bool = True, **options: Any) -> TunedGrid:
    """:func:`flowdiff.compare`'s ``"tuned"`` grid: the shipped one for this flow when ``stored`` and one
    matches, else tuned now on ``calibration``.

    Tuning options (``tune_options`` of :func:`flowdiff.compare`, other than ``progress``) ask for a grid
    tuned that way, which a stored grid is not: with any of them the grid is tuned now."""
    if stored and not set(options) - {"progress"}:
        grid = stored_grid(flow, solver, nfe, model_kwargs=model_kwargs)
        if grid is not None:
            return grid
    return tune(flow, calibration, solver=solver, nfe=nfe, model_kwargs=model_kwargs, **options)
