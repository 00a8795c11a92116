"""Learned low-NFE solvers: a multistep method's coefficients fitted to one model on teacher trajectories.

At 5–10 evaluations a tuned grid (:mod:`flowdiff.tools.tuning`) leaves an error that a better
grid alone no longer removes; the method's own coefficients can take the model's shape too.
S4S (Frankel et al., "S4S: Solving for a Diffusion Model Solver", ICML 2025) and LD3 (Tong et
al., "Learning to Discretize Denoising Diffusion ODEs", ICLR 2025) fit them to a few dozen
teacher trajectories in minutes. Here the fitted part is an order-keeping correction
(:class:`solvers.CorrectedAdams`): at every step whose history holds more derivatives than the
base method uses, ``terms`` multiples ``c`` of the next-order Adams terms are added,

    y₁ = y₁^{base} + Σ_m c_{i,m}·T_{i,m},   T_{i,m} = O(h^{n+m+1}),

so the solver keeps the base method's convergence order for any bounded ``c`` (the
compensation of DC-Solver, Zhao et al., ECCV 2024, is of this kind), and ``c`` is fitted by
least squares on the image error against the teacher:

    min_c  Σ_samples |generate(noise_fit, c) − x_ref|²,   |c_{i,m}| ≤ bound,

with ``x_ref`` = :func:`flowdiff.reference_solution` (the teacher) on the grid the solver
would use anyway (the shipped tuned grid of that model, solver and budget when there is one,
else ``logsnr``), the Jacobian by forward differences (one candidate solve per coefficient).
The noise is split: the even-indexed half is fitted, the odd-indexed half decides — the
learned coefficients are kept only if their RMS error on the held-out half is below the base
method's on the same grid; otherwise the result is the base method (``kept=False``).

A :class:`LearnedSolver` records the flow's fingerprint, the grid, the coefficients, its errors
and its cost in model evaluations (``fitting_nfe``: the teacher's and every candidate solve's),
saves to JSON and loads only for the flow it was fitted on, like a :class:`~flowdiff.TunedGrid`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

from ..api.sampling import decode, encode, generate
from ..engine.fingerprint import flow_fingerprint
from ..engine.flow import ProbabilityFlow
from ..engine.formulations import (
    encode_evaluates_end,
    encode_refusal,
    formulation_for,
    prefer_variables,
    variables_of,
)
from ..engine.grids import make_sigmas
from .compare import reference_solution
from .tuning import TunedGrid, _Warp, read_record, stored_grid

__all__ = ["LearnedSolver", "learn_solver", "tune_roundtrip"]

_FORMAT = "flowdiff.LearnedSolver/1"


@dataclass(frozen=True)
class LearnedSolver:
    """A multistep ``solver`` with coefficients fitted at budget ``nfe`` on the flow of ``fingerprint``.

    ``sigmas`` is the generation grid the coefficients belong to, ``coefficients[i]`` the
    correction multiples of step ``i`` (empty where a step takes none). ``kept`` says whether
    the held-out half preferred them to the base method; when not, the coefficients are zero
    and :meth:`as_solver` is the base method itself. ``calibration_error`` /
    ``base_calibration_error`` are the RMS image errors of the learned and the base method on
    the fitted half, ``validation_error`` / ``base_validation_error`` on the held-out half.
    ``fitting_nfe`` counts every model evaluation the fit spent (teacher included:
    ``reference_nfe``), ``solves`` the candidate solves. ``source`` is the file it was read from.

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

    def base(self) -> _solvers.Adams:
        """The base multistep method (registry name and options)."""
        return _base_solver(self.solver, self.solver_options)

    def as_solver(self) -> _solvers.Solver:
        """The solver to generate with on :attr:`sigmas`: the corrected method, or the base one if not kept."""
        base = self.base()
        if not self.kept:
            return base
        return _corrected(base, self.sigmas, self.coefficients)

    def check(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` unless this solver was fitted on ``flow`` (with ``model_kwargs``)."""
        other = flow_fingerprint(flow, model_kwargs)
        if other != self.fingerprint:
            raise ValueError(f"this learned solver was fitted on the flow with fingerprint {self.fingerprint}; the "
                             f"flow given has fingerprint {other} (another model, schedule or conditioning): fit "
                             "it again with flowdiff.learn_solver")

    def validated(self, flow: ProbabilityFlow, noise: Tensor, *,
                  model_kwargs: Mapping[str, Any] | None = None) -> LearnedSolver:
        """This solver judged on ``noise`` (held out from its fit): kept only if its RMS error against the
        reference is below the base method's on the same grid; otherwise the base method (``kept=False``)."""
        self.check(flow, model_kwargs)
        _check_noise(noise)
        target = _reference(flow, noise, model_kwargs, float(self.options.get("reference_tol", 1e-7)))[0]
        learned = _rms(generate(flow, noise, solver=_corrected(self.base(), self.sigmas, self.coefficients),
                                grid=self.sigmas, model_kwargs=model_kwargs).x, target)
        base = _rms(generate(flow, noise, solver=self.base(), grid=self.sigmas, model_kwargs=model_kwargs).x,
                    target)
        return self._decided(learned, base)

    def _decided(self, learned: float, base: float) -> LearnedSolver:
        kept = learned < base
        coefficients = self.coefficients if kept else tuple(tuple(0.0 for _ in c) for c in self.coefficients)
        return replace(self, kept=kept, coefficients=coefficients, validation_error=learned if kept else base,
                       base_validation_error=base)

    def save(self, path: str | Path) -> Path:
        """Write the solver (σ and coefficients as exact float hex strings) and what it was fitted for as JSON."""
        data = asdict(self)
        data["sigmas"] = [float(s).hex() for s in self.sigmas]
        data["coefficients"] = [[float(c).hex() for c in cs] for cs in self.coefficients]
        data.pop("source")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": _FORMAT, **data}, indent=1, default=_json_default) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, flow: ProbabilityFlow,
             model_kwargs: Mapping[str, Any] | None = None) -> LearnedSolver:
        """Read a file written by :meth:`save` and check that it belongs to ``flow`` (see :meth:`check`)."""
        path = Path(path)
        data = read_record(path, _FORMAT, "learned solver")
        try:
            data["sigmas"] = np.array([float.fromhex(s) for s in data["sigmas"]], dtype=np.float64)
            data["coefficients"] = tuple(tuple(float.fromhex(c) for c in cs) for cs in data["coefficients"])
            learned = cls(**data, source=str(path))
            learned.base()
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: malformed learned solver ({err})") from None
        learned.check(flow, model_kwargs)
        return learned


def _json_default(value: object) -> object:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a learned solver's options")


def _base_solver(name: str, options: Mapping[str, Any]) -> _solvers.Adams:
    obj = _solvers.get(name, **dict(options))
    if not isinstance(obj, _solvers.Adams) or isinstance(obj, _solvers.CorrectedAdams):
        multistep = [n for n in _solvers.available(multistep=True)
                     if isinstance(_solvers.get(n), _solvers.Adams)]
        raise ValueError(f"solver must be a variable-step Adams method to learn coefficients for, got {name!r}; "
                         f"accepted: {', '.join(multistep)}")
    return obj


def _corrected(base: _solvers.Adams, sigmas: np.ndarray, coefficients) -> _solvers.CorrectedAdams:
    """The corrected solver, its coefficients keyed by the start times of ``sigmas`` in ``base``'s variables."""
    name = f"{base.name}+learned"
    if variables_of(base) == "data":
        prefer_variables(name, "data")  # the same change of variables as its base
    times = formulation_for(base, "generate").times(sigmas)
    table = {(t0, t1): tuple(c) for t0, t1, c in zip(times[:-1], times[1:], coefficients)}
    return _solvers.CorrectedAdams(base, table, name=name)


def _layout(base: _solvers.Adams, sigmas: np.ndarray, terms: int) -> list[int]:
    """The number of coefficients each generation step takes: none where the formulation gives the step its own
    method (into σ = 0), else as many terms as its history allows (step i holds i + 1 derivatives)."""
    form = formulation_for(base, "generate")
    replaced = form.grid(list(map(float, sigmas)), base, eval_end=sigmas[-1] != 0.0).methods
    probe = _solvers.CorrectedAdams(base, {(1.0, 0.0): (0.0,) * terms})
    return [0 if i in replaced else probe.available_terms(i + 1) for i in range(len(sigmas) - 1)]


def _check_noise(noise: Tensor) -> None:
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")


def _reference(flow: ProbabilityFlow, noise: Tensor, model_kwargs, tol: float) -> tuple[Tensor, int]:
    ref = reference_solution(flow, noise, rtol=tol, atol=tol, model_kwargs=model_kwargs,
                             sigma_end=0.0 if flow.sigma_field is not None else None)
    return ref.x.to(device=noise.device, dtype=torch.float64), ref.nfe


def _rms(x: Tensor, target: Tensor) -> float:
    value = float((x.to(torch.float64) - target).pow(2).mean().sqrt())
    return value if math.isfinite(value) else math.inf


def learn_solver(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str = "unipc",
    nfe: int,
    solver_options: Mapping[str, Any] | None = None,
    sigmas: np.ndarray | None = None,
    terms: int = 2,
    bound: float = 4.0,
    iterations: int = 8,
    ridge: float = 0.0,
    model_kwargs: Mapping[str, Any] | None = None,
    reference_tol: float = 1e-7,
) -> LearnedSolver:
    """Fit the correction coefficients of the multistep ``solver`` at ``nfe`` evaluations on calibration ``noise``.

    ``noise`` (DDIM scale, at least 2 samples) is split: the even-indexed half is fitted, the
    odd-indexed half decides whether the fit is kept (see the module docstring). The grid is
    ``sigmas`` when given (it must cost at most ``nfe``), else the stored tuned grid of this
    flow, solver and budget (:func:`flowdiff.stored_grid`), else ``logsnr``. ``terms`` (1–3)
    correction terms per step, each coefficient in ``[−bound, bound]``; ``iterations`` caps
    the least-squares iterations (each costs one candidate solve per coefficient plus one); ``ridge`` adds
    ``ridge·|r₀|²·|c|²/dim(c)`` to the fitted sum of squares (``r₀`` the base method's residual), pulling the
    coefficients towards the base method where the calibration batch is small.
    ``solver`` is a variable-step Adams method (``unipc``, ``dpmpp_3m``, ``dpmpp_2m``, ``lms``,
    ``abm``). Measure the result on other noise (:meth:`LearnedSolver.validated`).
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    _check_noise(noise)
    if noise.shape[0] < 2:
        raise ValueError(f"noise must hold at least 2 samples (one to fit, one held out), got {noise.shape[0]}")
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name (str), got {type(solver).__name__}")
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a mapping, got {type(solver_options).__name__}")
    options = dict(solver_options or {})
    base = _base_solver(solver, options)
    if isinstance(nfe, bool) or not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an int >= 1, got {nfe!r}")
    for name, value, lo, hi in (("terms", terms, 1, 3), ("iterations", iterations, 0, 1000)):
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{name} must be an int in {lo}..{hi}, got {value!r}")
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (0 <= ridge < math.inf):
        raise ValueError(f"ridge must be a finite number >= 0 (the weight of |c|² in the fit), got {ridge!r}")
    if isinstance(bound, bool) or not isinstance(bound, (int, float)) or not (0 < bound < math.inf):
        raise ValueError(f"bound must be a positive finite number (the largest |coefficient|), got {bound!r}")
    if isinstance(reference_tol, bool) or not isinstance(reference_tol, (int, float)) or not 0 < reference_tol <= 1e-3:
        raise ValueError(f"reference_tol must be a number in (0, 1e-3], got {reference_tol!r}")
    start = time.perf_counter()
    if sigmas is not None:
        grid_name = "given"
        sigmas = np.asarray(sigmas, dtype=np.float64)
    else:
        stored = stored_grid(flow, solver, nfe, options, model_kwargs)
        if stored is not None:
            grid_name, sigmas = f"tuned ({Path(stored.source).name})", np.asarray(stored.sigmas, dtype=np.float64)
        else:
            grid_name = "logsnr"
            sigmas = make_sigmas(flow.schedule, "logsnr", _solvers.steps_for_nfe(base, nfe, eval_end=False))
    if not math.isfinite(sigmas[0]):
        raise ValueError("sigmas must start at a finite σ (a grid from σ = ∞ has its own first step)")
    layout = _layout(base, sigmas, terms)
    slots = [(i, m) for i, n in enumerate(layout) for m in range(n)]
    fit, held = noise[0::2], noise[1::2]
    target, ref_nfe = _reference(flow, noise, model_kwargs, float(reference_tol))
    spent = {"nfe": ref_nfe, "solves": 0}

    def coefficients_of(v: np.ndarray) -> tuple[tuple[float, ...], ...]:
        out = [[0.0] * n for n in layout]
        for (i, m), c in zip(slots, v):
            out[i][m] = float(c)
        return tuple(tuple(c) for c in out)

    def images(v: np.ndarray, part: Tensor) -> Tensor:
        with torch.no_grad():
            res = generate(flow, part, solver=_corrected(base, sigmas, coefficients_of(v)), grid=sigmas,
                           model_kwargs=model_kwargs)
        if res.stats.nfe > nfe:
            raise ValueError(f"the grid spends {res.stats.nfe} evaluations with solver {solver!r}, over nfe={nfe}")
        spent["nfe"] += res.stats.nfe
        spent["solves"] += 1
        return res.x.to(torch.float64)

    fit_target, held_target = target[0::2], target[1::2]

    def residual(v: np.ndarray) -> np.ndarray:
        r = (images(v, fit) - fit_target).reshape(-1).cpu().numpy()
        return r if np.all(np.isfinite(r)) else np.full_like(r, 1e6)

    zero = np.zeros(len(slots))
    r0 = residual(zero)
    v = zero
    if slots and iterations > 0:
        v = _fit(residual, r0, len(slots), float(bound), iterations, float(ridge))
    r = residual(v) if slots else r0
    calib, base_calib = float(np.sqrt(np.mean(r * r))), float(np.sqrt(np.mean(r0 * r0)))
    learned_val = _rms(images(v, held), held_target)
    base_val = _rms(images(zero, held), held_target)
    out = LearnedSolver(solver, options, nfe, sigmas.copy(), coefficients_of(v), flow_fingerprint(flow, model_kwargs),
                        True, calib, base_calib, math.nan, math.nan, grid_name,
                        options={"terms": terms, "bound": float(bound), "iterations": iterations,
                                 "reference_tol": float(reference_tol), "calibration_batch": int(noise.shape[0])})
    out = out._decided(learned_val, base_val)
    return replace(out, fitting_nfe=spent["nfe"], reference_nfe=ref_nfe, solves=spent["solves"],
                   fitting_seconds=time.perf_counter() - start)


def _fit(residual, r0: np.ndarray, dim: int, bound: float, iterations: int, ridge: float) -> np.ndarray:
    """Box-bounded Levenberg–Marquardt (scipy's trust-region reflective least squares), forward-difference
    Jacobian: one candidate solve per coefficient and iteration."""
    from scipy.optimize import least_squares

    step = 1e-3 * bound
    weight = math.sqrt(ridge * float(np.dot(r0, r0)) / dim)  # ridge·|r₀|² for |c|² = dim
    cache: dict[bytes, np.ndarray] = {np.zeros(dim).tobytes(): np.concatenate([r0, np.zeros(dim)])}

    def fun(v: np.ndarray) -> np.ndarray:
        key = v.tobytes()
        if key not in cache:
            cache[key] = np.concatenate([residual(v), weight * v])
        return cache[key]

    def jac(v: np.ndarray) -> np.ndarray:
        base = fun(v)
        cols = []
        for j in range(dim):
            w = v.copy()
            w[j] += step if w[j] + step <= bound else -step
            cols.append((fun(w) - base) / (w[j] - v[j]))
        return np.stack(cols, axis=1)

    result = least_squares(fun, np.zeros(dim), jac=jac, bounds=(-bound, bound), method="trf",
                           max_nfev=iterations, x_scale=1.0)
    return np.clip(result.x, -bound, bound)


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
    there beats the starting grid's, otherwise the starting grid (``initial_grid`` says which). An encode's
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
    if not isinstance(solver, str):
        raise TypeError(f"solver must be a registered solver name (str), got {type(solver).__name__}")
    refusal = encode_refusal(solver)
    if refusal is not None:
        raise ValueError(f"solver {solver!r} cannot encode: {refusal}")
    options = dict(solver_options or {})
    solver_obj = _solvers.get(solver, **options)
    if solver_obj.reversible:
        raise ValueError(f"solver {solver!r} is reversible: its round trip is exact on any grid; nothing to tune")
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be an int >= 1 (candidate round trips), got {max_evals!r}")
    if isinstance(nfe, bool) or not isinstance(nfe, int):
        raise TypeError(f"nfe must be an int, got {type(nfe).__name__}")
    steps = _solvers.steps_for_nfe(solver_obj, nfe, eval_end=encode_evaluates_end(solver_obj))
    start = time.perf_counter()
    fit, held = images[0::2], images[1::2]
    spent = {"nfe": 0, "evals": 0}

    def error(sigmas: np.ndarray, part: Tensor) -> float:
        try:
            with torch.no_grad():
                enc = encode(flow, part, solver=solver_obj, grid=sigmas, model_kwargs=model_kwargs)
                dec = decode(flow, enc.latent, model_kwargs=model_kwargs)
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
                     flow_fingerprint(flow, model_kwargs),
                     {"objective": "roundtrip", "max_evals": max_evals, "calibration_batch": int(images.shape[0])},
                     tuned_err, initial_name, initial_err, spent["evals"], spent["nfe"], 0,
                     time.perf_counter() - start, "roundtrip")
