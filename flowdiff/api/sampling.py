"""Generation, encoding and decoding: the entry points.

``generate``, ``encode`` and ``decode`` take at most ten keywords each: the everyday ``solver``,
``steps``/``nfe`` and ``grid``, and the option objects of :mod:`flowdiff.engine.options` for the rest
(validated there). They dispatch:

* a procedure plug-in (:mod:`flowdiff.engine.plugins`: the η process, fixed-point inversion) when
  ``solver=`` is its option object (:class:`Stochastic`, :class:`Inversion`);
* an adaptive solve (:mod:`flowdiff.api.adaptive`) for ``adaptive=Adaptive(...)``;
* otherwise a fixed grid, in the variables :func:`flowdiff.engine.formulations.formulation_for`
  picks for the solver and the direction, run by :func:`flowdiff.engine.loop.solve_grid`.

Generation runs the grid from σ_max down to 0, encoding the same grid reversed (0 up to
σ_max), decoding an encode's grid back (by exact inverse steps for a reversible latent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import ReversibleHeun, Solver

from ..engine import _checks
from ..engine.adjoint import adjoint_for, refuse_adjoint
from ..engine.flow import ProbabilityFlow, check_from_noise, from_model_scale, refusing_mapped_field, to_model_scale
from ..engine.formulations import encode_evaluates_end, formulation_for
from ..engine.grids import reversed_grid
from ..engine.latent import Latent
from ..engine.loop import DIVERGENCE_ENCODE, DIVERGENCE_GENERATE, FlowSolution, divergence_limit, solve_grid
from ..engine.options import (
    Adaptive,
    Checks,
    Grid,
    Inversion,
    Request,
    Save,
    Stochastic,
    _shown,
    as_grid,
    build_grid,
    check_callback,
    check_checks,
    check_flow,
    check_state,
    compute_dtype,
    exact_dtype,
    idle_final_euler,
)
from ..engine.plugins import decodes_with, procedure, solver_plugin
from ..engine.results import Result, Saver, StepState
from ..engine.schedules import ArrayLike
from ..engine.terminal import field_from_infinity, refuse_encode_to_infinity, starts_at_infinity
from . import ddim_inverse as _ddim_inverse  # noqa: F401  (registers the 'ddim_inverse' plug-in)
from .adaptive import solve_adaptive_flow
from .fixed_point import encode_fixed_point as _fixed_point  # noqa: F401  (registers 'fixed_point')
from .inversion import EXACT_QUANTUM, decode_reversible
from .pndm import PNDM as _pndm  # noqa: F401  (registers the 'pndm' plug-in)
from .stochastic import generate_stochastic as _stochastic  # noqa: F401  (registers 'eta')

__all__ = ["REMOVED", "Result", "StepState", "decode", "encode", "generate"]


def _resolve_solver(solver: str | Solver, direction: str,
                    state_dtype: torch.dtype | None = None) -> tuple[Solver, str, dict[str, Any]]:
    """The solver object, its name and options (as a latent records them) for ``direction``.

    ``solver`` is a registered name or a :class:`solvers.Solver`, whose options travel with it
    (:func:`solvers.options_of`: the options ``solvers.get`` built it with). A :class:`solvers.Shifted`
    method is recorded as its base: shifted evaluations belong to one grid and one direction, and an
    encode with them (:func:`flowdiff.learn_encoder`) is undone by the base decode (with the decode's own
    shifts when the latent records them, :attr:`Latent.decode_shifts`)."""
    if not isinstance(solver, (str, Solver)):
        raise TypeError(f"solver must be a registered name, a solvers.Solver, flowdiff.Stochastic (generate) or "
                        f"flowdiff.Inversion (encode), got {type(solver).__name__}")
    plugin = solver_plugin(solver)
    if plugin is not None:
        if plugin.direction != direction:
            what = "an encoding" if plugin.direction == "encode" else "a generation"
            raise ValueError(f"solver {plugin.name!r} is {what} method only; use it with flowdiff.{plugin.direction}")
        return plugin.make({}), plugin.name, {}
    obj = solvers.get(solver)
    recorded = obj.base if isinstance(obj, solvers.Shifted) else obj
    options = {} if isinstance(solver, str) else (solvers.options_of(recorded) or {})
    if (state_dtype == torch.float64 and isinstance(obj, ReversibleHeun) and obj.quantum is None
            and "quantum" not in options):
        # float32 (or lower) images with a float64 state: states on 2⁻⁴⁰ℤ make the inverse bit-exact
        options["quantum"] = EXACT_QUANTUM
        obj = ReversibleHeun(quantum=EXACT_QUANTUM)
    return obj, recorded.name, options


def _refuse_idle_final_euler(solver: Solver, sig: np.ndarray, direction: str, beside: str) -> None:
    """``grid=Grid(..., final_euler=False)`` where it changes nothing (:func:`idle_final_euler`) is refused, saying
    why: the same images and NFE come out without it."""
    why = idle_final_euler(solver, sig, direction)
    if why is not None:
        raise ValueError(f"grid=Grid(..., final_euler=False) beside {beside}: {why}, so final_euler=False would "
                         "change nothing (the same images and NFE as without it); leave final_euler out")


def _inversion_final_euler(spec: Inversion, grid: Grid) -> Inversion:
    """The inversion's ``final_euler`` said once: in its options or in the Grid (equal values agree)."""
    if grid.final_euler is None:
        return spec
    own = spec.options.get("final_euler")
    if own is None:
        return Inversion(spec.method, {**spec.options, "final_euler": grid.final_euler}, spec.solver)
    if own != grid.final_euler:
        raise ValueError(f"Inversion(options={{'final_euler': {own!r}}}) and grid=Grid(..., final_euler="
                         f"{grid.final_euler}) say two different things; give final_euler once")
    return spec


#: The keywords removed from generate/encode/decode in 0.x, each with what says it now.
REMOVED = {
    "sigmas": "grid=<σ values> (a 1-D list, array or tensor) or grid=flowdiff.Grid(sigmas=...)",
    "timesteps": "grid=flowdiff.Grid(timesteps=...)",
    "grid_options": "grid=flowdiff.Grid(name, options={...})",
    "final_euler": "grid=flowdiff.Grid(..., final_euler=...)",
    "rtol": "adaptive=flowdiff.Adaptive(rtol=..., atol=...)",
    "atol": "adaptive=flowdiff.Adaptive(rtol=..., atol=...)",
    "max_nfe": "adaptive=flowdiff.Adaptive(..., max_nfe=...)",
    "adaptive_options": "adaptive=flowdiff.Adaptive(..., controller=, first_step=, sigma_c=, sigma_end=)",
    "solver_options": "solver=solvers.get(name, **options)",
    "check_finite": "checks=flowdiff.Checks(finite=...)",
    "divergence": "checks=flowdiff.Checks(growth=...)",
    "check_model": "checks=flowdiff.Checks(model=...)",
    "eta": "solver=flowdiff.Stochastic(eta, generator, step_noise) (generate only)",
    "generator": "solver=flowdiff.Stochastic(eta, generator=...)",
    "step_noise": "solver=flowdiff.Stochastic(eta, step_noise=...)",
    "stochastic": "solver=flowdiff.Stochastic(...)",
    "inversion": "solver=flowdiff.Inversion(method, options, solver=...) (encode only)",
    "inversion_options": "solver=flowdiff.Inversion(method, options={...})",
}


def _saver(save: object, callback: object, adaptive: bool) -> Saver | None:
    """The callback keeping what ``save`` asks for (None without ``save``)."""
    if save is None:
        return None
    if not isinstance(save, Save):
        raise TypeError(f"save must be a flowdiff.Save, got {type(save).__name__}")
    if save.sigmas and adaptive:
        raise ValueError(f"Save(sigmas={list(save.sigmas)}) with an adaptive solve, which places its own steps "
                         "and reaches given σ only by chance; use Save(steps=True) (every accepted step)")
    return Saver(save, check_callback(callback))


def _kept(saver: Saver | None, result: Result) -> Result:
    return result if saver is None else saver.attach(result)


def _solve_fixed(request: Request, start: Tensor, sig: np.ndarray, direction: str, *, dtype: torch.dtype,
                 model_dtype: torch.dtype | None, eval_end: bool, adjoint: str = "autograd") -> FlowSolution:
    """The one fixed-grid solve of generate, encode and decode, in the variables the engine picks.

    ``start`` is the state at ``sig[0]``, taken to x̄ here: noise or a latent's x_T at the DDIM scale x̄/√(1+σ²)
    (generate, decode), images as the model's x = α(σ)·x̄ (encode: x̄ itself at σ = 0;
    :func:`~flowdiff.engine.flow.from_model_scale`); a grid from σ = ∞ starts from the noise itself with its
    boundary step (engine.terminal)."""
    flow, solver = request.flow, request.solver
    flow_for = getattr(solver, "flow_for", None)  # a method that feeds the model its own way (ddim_inverse)
    if flow_for is not None:
        flow = flow_for(flow, sig.tolist())
    eps = flow.field(request.model_kwargs, model_dtype)
    if isinstance(request.callback, Saver):  # a σ to save that the grid does not step to: refused before the solve
        request.callback.check(sig)
    if starts_at_infinity(sig):
        check_from_noise(flow)  # before any evaluation: an epsilon model has no step out of σ = ∞
        eps = field_from_infinity(flow, eps, sig, request.model_kwargs, model_dtype)
        begin = {"y0": start.to(dtype)}
    elif direction == "encode":
        begin = {"xbar0": from_model_scale(request.flow, start.to(dtype), sig[0])}
    else:
        begin = {"xbar0": start.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)}
    checking = request.check_finite or request.bound is not None
    if (checking or direction == "encode") and "Vmap" in _checks.functorch_transforms():
        mapped = ("under torch.func.vmap around a jvp, with the model's output mapped over although its inputs are "
                  "not (the model closes over mapped tensors, e.g. an ensemble's weights stacked by "
                  "torch.func.stack_module_state)")
        refusal = (  # a vmap right around a jvp: the states may still be mapped
            f"encode does not run {mapped}, as under any vmap whose states are mapped: call it once on the members' "
            "inputs, or per member" if direction == "encode" else
            f"{direction} {mapped}, and with the checks on: they read the solve's states on the host (non-finite "
            "states, the divergence guard), which vmap cannot; give checks=flowdiff.Checks(finite=False, "
            "growth=None) to run under vmap")
        eps = refusing_mapped_field(eps, refusal)  # D read off the model's prediction: checked alike, kept
    grads = adjoint_for(adjoint, solver, flow.model, request.model_kwargs)
    return solve_grid(eps, formulation_for(solver, direction), sig.tolist(), solver, **begin, eval_end=eval_end,
                      callback=request.callback, check_finite=request.check_finite, bound=request.bound, **grads)


def _given(grid: object, steps: int | None, nfe: int | None) -> str:
    """How the call asked for its grid, as its arguments read."""
    if isinstance(grid, str):
        shown = f"grid={grid!r}"
    else:
        shown = "grid=Grid(...)" if isinstance(grid, Grid) else "grid=<explicit σ>"
    return shown + (f", steps={_shown(steps)}" if steps is not None else "") + (
        f", nfe={_shown(nfe)}" if nfe is not None else "")


def _unfitted(err: solvers.GridMismatch, solver: Solver, direction: str, given: str,
              sig: np.ndarray | None) -> ValueError:
    """The refusal of a grid that a fitted solver (per-step values for one grid and direction: a
    :class:`~flowdiff.LearnedSolver`'s) has no values for, in σ, naming the grid it needs."""
    sigma = formulation_for(solver, direction).sigma

    def shown(ts: list[float]) -> str:
        return "[" + ", ".join(f"{sigma(t):.6g}" for t in ts) + "]"

    fitted, chained, (one, many) = err.fitted, err.chained, err.what
    need = f"the σ grid {shown(fitted)} (in that order)" if chained else f"the steps σ {shown(fitted)} (pairs from, to)"
    if sig is None:  # refused while counting the steps of a grid of the call's own choosing
        message = (f"{given} asks for a grid of its own: solver {solver.name!r} has {many} only for the steps of "
                   f"{need}. ")
    else:
        message = (f"{given} gives the σ grid [{', '.join(f'{float(s):.6g}' for s in sig)}]: solver {solver.name!r} "
                   f"has no {one} for the step σ {sigma(err.t0):.6g} -> {sigma(err.t1):.6g} (step {err.step}): its "
                   f"{many} (and any other per-step values) belong to {need}, and to no other step. ")
    downward = chained and len(fitted) > 1 and sigma(fitted[0]) > sigma(fitted[-1])
    if sig is not None and chained and len(sig) == len(fitted) and np.allclose(
            np.asarray(sig, dtype=np.float64), [sigma(t) for t in fitted], rtol=1e-5, atol=0.0):
        # the two read alike at 6 digits: name the first σ that differs in full, and what makes such a copy
        i = next((j for j, t in enumerate(fitted) if float(sig[j]) != sigma(t)), 0)
        message += (f"The given grid is a rounded copy of that one (σ[{i}] = {float(sig[i])!r} where the fitted "
                    f"σ[{i}] = {sigma(fitted[i])!r}: a float32 array or torch.tensor of the list rounds it); the steps "
                    "must be those exact float64 values. ")
    if direction == "encode" and downward:
        message += ("An encode runs its grid upward from σ = 0, so a solver fitted for generation has no step of "
                    "it: encode with its base method (LearnedSolver.base()), the same grid= and no learned values")
    else:
        message += ("Accepted: that grid as grid= (a LearnedSolver's grid=learned.sigmas), without steps=/nfe=; "
                    "a learned solver runs on the grid and budget it was fitted for")
    return ValueError(message)


def _refuse_fitted_adaptive(solver: Solver, direction: str) -> None:
    """A fitted solver (per-step values for one grid: a :class:`~flowdiff.LearnedSolver`'s) has no values for the
    steps an adaptive solve chooses: refused before the solve, naming ``adaptive=``."""
    if solver.fitted_steps() is not None:
        raise ValueError(f"adaptive=flowdiff.Adaptive(...) beside solver {solver.name!r} ({direction}): its "
                         "per-step values (a LearnedSolver's shifts, scales, directions or coefficients) belong to the "
                         "fixed grid it was fitted on, and an adaptive solve chooses steps of its own; accepted: "
                         "that grid as grid= (grid=learned.sigmas) without adaptive=, or adaptive= with the base "
                         "method (LearnedSolver.base())")


def _request(flow: ProbabilityFlow, solver: Solver, name: str, options: dict[str, Any], grid: Grid,
             adaptive: Adaptive | None, model_kwargs: Mapping[str, Any] | None, callback: object,
             check_finite: bool, *, bound: float | None = None) -> Request:
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    return Request(flow, solver, name, options, grid, adaptive, dict(model_kwargs or {}), check_callback(callback),
                   check_finite, bound)


def _adaptive_or_none(adaptive: object, grid: object, steps: int | None, nfe: int | None,
                      default_grid: object = "trailing") -> Adaptive | None:
    """``adaptive=`` checked: None for a fixed-grid solve; a fixed-grid keyword beside it is refused."""
    if adaptive is None:
        return None
    if not isinstance(adaptive, Adaptive):
        raise TypeError(f"adaptive must be a flowdiff.Adaptive, got {type(adaptive).__name__}")
    if steps is not None or nfe is not None:
        given = "steps=" + _shown(steps) if steps is not None else "nfe=" + _shown(nfe)
        raise ValueError(f"{given} beside adaptive=flowdiff.Adaptive(...): an adaptive solve chooses its own steps; "
                         "drop steps=/nfe= (Adaptive(max_nfe=...) caps the evaluations)")
    if not (isinstance(grid, str) and grid == default_grid) and grid is not default_grid:
        shown = f"grid={grid!r}" if isinstance(grid, str) else ("grid=Grid(...)" if isinstance(grid, Grid)
                                                                else f"grid={_shown(grid)}")
        raise ValueError(f"{shown} and adaptive=flowdiff.Adaptive(...) ask for two kinds of solve: grid= is a fixed "
                         "grid, and an adaptive solve places its own steps from its start (Adaptive(sigma_start=)) "
                         "to 0. Drop one of them")
    return adaptive


def _vmapped(x: object) -> bool:
    """Whether ``x`` (a tensor, or ``model_kwargs`` with nested mappings, lists and tuples, as SDXL's
    ``added_cond_kwargs``) is or holds a tensor mapped over by ``torch.func.vmap``."""
    if isinstance(x, Tensor):
        return _checks.functorch_levels(x)[1]
    if isinstance(x, Mapping):
        return any(_vmapped(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return any(_vmapped(v) for v in x)
    return False


def _refuse_vmap(function: str, name: str, x: object, model_kwargs: object, checks: Checks, adaptive: Adaptive | None,
                 solver: object) -> None:
    """What ``torch.func.vmap`` cannot run, refused before any evaluation, where ``function`` runs under vmap (its
    input ``x``, called ``name``, or a ``model_kwargs`` tensor mapped over, or neither, where the model closes over
    mapped tensors: an ensemble's weights stacked by ``torch.func.stack_module_state``; nothing outside vmap):
    each of these reads values on the host inside the solve, which vmap calls data-dependent control flow. A
    fixed-grid generation or decode with ``Checks(finite=False, growth=None)`` runs, equal to the loop of un-mapped
    calls (``name`` is still checked for NaN/inf, once over the whole mapped batch)."""
    if _vmapped(x):
        mapped = f"{name} is mapped over"
    elif _vmapped(model_kwargs):
        mapped = "model_kwargs are mapped over"
    elif _checks.vmap_may_map_states(_checks.functorch_transforms()):  # an ensemble's stacked weights, closed over
        # by the model (not jacfwd's vmap around a jvp: it maps the tangents alone, which no check reads)
        mapped = f"called inside it with {name} and model_kwargs unmapped: what the model closes over may be mapped"
    else:
        return
    instead = (f"{function} already solves a batch along the first dimension of {name}: call it once on the mapped "
               f"inputs stacked along it (x.flatten(0, 1) for two batch dimensions)")
    if function == "encode":
        raise ValueError(f"{function} does not run under torch.func.vmap ({mapped}): its checks "
                         f"read the values on the host; {instead}")
    if adaptive is not None:
        raise ValueError(f"generate(adaptive=...) does not run under torch.func.vmap ({mapped}): its "
                         f"step control reads each step's error on the host; {instead}")
    if isinstance(solver, Stochastic):
        raise ValueError(f"generate(solver=flowdiff.Stochastic(...)) does not run under torch.func.vmap ({mapped}): "
                         f"it draws its step noise from its generator call by call; {instead}")
    reading = (("finite", checks.finite, False), ("growth", checks.growth, None))
    on = [f"{what}={value!r}" for what, value, off in reading if value is not off]
    if on:
        raise ValueError(f"{function} under torch.func.vmap ({mapped}) with checks=Checks({', '.join(on)}):"
                         " these checks read the solve's states on the host (non-finite states, the divergence "
                         f"guard), which vmap cannot; {instead}, or give checks=flowdiff.Checks(finite=False, "
                         "growth=None) to run under vmap")



def _refuse_model_check(checks: Checks, function: str) -> None:
    if not checks.model:
        raise ValueError(f"checks=Checks(model=False) given to {function}: the model check is decode's (a latent "
                         "refuses another model); drop model=False here")


def generate(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str | Solver | Stochastic = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Grid | ArrayLike = "trailing",
    model_kwargs: Mapping[str, Any] | None = None,
    adaptive: Adaptive | None = None,
    callback: Callable[[StepState], None] | None = None,
    save: Save | None = None,
    checks: Checks | None = None,
    adjoint: str = "autograd",
    **removed: Any,
) -> Result:
    """Generate images from DDIM-scale noise x_T ~ N(0, I) by solving from the grid's first σ to 0.

    ``solver``: a registered name, a :class:`solvers.Solver` (its options travel with it:
    ``solvers.get("unipc", order=2)``), or ``flowdiff.Stochastic(eta, generator, step_noise)``
    for the DDIM paper's stochastic generative process instead of the ODE (see
    :mod:`flowdiff.api.stochastic`).

    Fixed grids: ``steps`` on a named ``grid`` (``trailing``, ``leading``, ``linear``,
    ``quadratic``, ``karras``, ``logsnr``), explicit σ values ``grid=[...]`` (decreasing, ending
    at 0, or above it: the result is then the model's own variable x = α(σ_end)·x̄ there, VP's
    x̄/√(1+σ²), as diffusers' DDIMScheduler with ``set_alpha_to_one=False`` returns it), or
    ``grid=flowdiff.Grid(...)`` (timesteps, grid options, ``final_euler``). ``nfe=N``
    is the fixed-budget form: the step count is chosen so that ``stats.nfe`` is the largest
    count ≤ N that the solver's steps allow (exactly N for one-evaluation-per-step solvers;
    Heun with its Euler step into σ = 0 spends odd counts). With
    ``adaptive=flowdiff.Adaptive(rtol, atol, ...)`` the solve is adaptive (an adaptive solver is
    required; ``steps``/``nfe``/``grid`` are refused beside it).

    ``Grid(final_euler=...)`` (default True): a solver that would evaluate the model at σ = 0
    takes its last step as Euler instead, as EDM and k-diffusion do; ``False`` is refused where no
    such step exists (:func:`flowdiff.engine.options.idle_final_euler`). The state keeps the
    noise's dtype; float16/bfloat16 noise is integrated in float32 with the model fed in the
    noise's dtype, and the image returned in it.

    ``checks=flowdiff.Checks(finite=True, growth="auto")``: non-finite states stop the
    solve naming the step; the divergence guard (default 1000): when the VP-scaled end state
    max|x̄|/√(1+σ²) exceeds ``growth × max(1, max|noise|)`` the solve is run again to find
    the first step past that bound and a :class:`solvers.SolveError` names it (step, σ, the
    value: ``err.value``) instead of returning garbage. It costs one host sync at the end,
    none in the loop. ``Checks(growth=None)`` turns it off.

    ``save=flowdiff.Save(sigmas=[...], steps=True, denoised=True)`` returns the states at chosen σ
    (or after every step) in ``result.saved``: the records a callback would receive there.

    ``adjoint`` is how the solve is differentiated (:mod:`flowdiff.engine.adjoint`): ``"autograd"``
    (default), ``"checkpoint"`` (step-boundary states kept, each step recomputed backwards) or
    ``"reversible"`` (reversible solvers: nothing kept per step). Fixed grids only.

    Under ``torch.func.vmap`` (noise or a ``model_kwargs`` tensor mapped over) a fixed-grid solve runs with
    ``checks=Checks(finite=False, growth=None)``, equal to the loop of un-mapped calls; the checks that read the
    solve's states on the host, adaptive solves and ``Stochastic`` are refused up front (the noise's NaN/inf
    check reads the whole mapped batch once).
    """
    _checks.refuse_removed("generate", removed, REMOVED)
    flow = check_flow(flow)
    noise = check_state(noise, "noise")
    flow.check_input(noise, "noise")
    checks = check_checks(checks)
    _refuse_model_check(checks, "generate")
    _checks.check_model_kwargs(model_kwargs)
    _refuse_vmap("generate", "noise", noise, model_kwargs, checks, adaptive, solver)
    adaptive_spec = _adaptive_or_none(adaptive, grid, steps, nfe)
    saver = _saver(save, callback, adaptive_spec is not None)
    callback = saver or callback
    grid_spec = Grid() if adaptive_spec is not None else build_grid(grid, steps=steps, nfe=nfe)
    bound = divergence_limit(checks.bound(DIVERGENCE_GENERATE), noise)
    if isinstance(solver, Stochastic):
        refuse_adjoint(adjoint, "stochastic generation (solver=flowdiff.Stochastic)")
        if grid_spec.final_euler is False:
            raise ValueError("grid=Grid(..., final_euler=False) beside solver=flowdiff.Stochastic(...): its steps "
                             "are DDIM's (Euler's with fresh noise), none of which evaluates the model at its end, "
                             "so final_euler=False would change nothing (the same images and NFE as without it); "
                             "leave final_euler out")
        if adaptive_spec is not None:
            raise ValueError("solver=flowdiff.Stochastic(...) (stochastic generation) takes a fixed grid, not "
                             "adaptive=flowdiff.Adaptive(...)")
        request = _request(flow, solvers.get("euler"), "euler", {}, grid_spec, None, model_kwargs, callback,
                           checks.finite, bound=bound)
        return _kept(saver, procedure("eta", "generate").run(request, noise, solver))
    if isinstance(solver, Inversion):
        raise ValueError(f"solver=flowdiff.Inversion({solver.method!r}, ...) is an encoding method; use it with "
                         "flowdiff.encode")
    solver_obj, name, options = _resolve_solver(solver, "generate")
    request = _request(flow, solver_obj, name, options, grid_spec, adaptive_spec, model_kwargs, callback,
                       checks.finite, bound=bound)
    dtype = compute_dtype(noise)
    model_dtype = noise.dtype if noise.dtype != dtype else None
    if adaptive_spec is not None:
        refuse_adjoint(adjoint, "an adaptive solve (adaptive=)")
        _refuse_fitted_adaptive(solver_obj, "generate")
        return _kept(saver, solve_adaptive_flow(request, noise, direction="generate", model_dtype=model_dtype))
    sig = None
    try:  # a solver fitted to one grid (a LearnedSolver's) is refused before the solve on another
        sig = grid_spec.solve_sigmas(flow, solver_obj, "generate")
        if grid_spec.final_euler is False:
            _refuse_idle_final_euler(solver_obj, sig, "generate", f"solver {name!r}")
        if (solver_obj.fitted_steps() is not None and solver_obj.evaluates_end and not grid_spec.euler_into_zero
                and sig[-1] == 0.0):
            raise ValueError(f"grid=Grid(..., final_euler=False) beside solver {solver_obj.name!r}: its per-step "
                             "values (a LearnedSolver's) were fitted with the last step into σ = 0 taken as Euler (the "
                             "default, as learn_solver solves); final_euler=False would take it with the fitted "
                             "method, evaluating the model at σ = 0 once more than the budget it was fitted for. "
                             "Accepted: final_euler=True (grid=learned.sigmas), or the base method "
                             "(LearnedSolver.base()) with final_euler=False")
        sol = _solve_fixed(request, noise, sig, "generate", dtype=dtype, model_dtype=model_dtype,
                           eval_end=not (grid_spec.euler_into_zero and sig[-1] == 0.0), adjoint=adjoint)
    except solvers.GridMismatch as err:
        raise _unfitted(err, solver_obj, "generate", _given(grid, steps, nfe), sig) from None
    return _kept(saver, Result(to_model_scale(flow, sol.xbar, sig[-1]).to(noise.dtype), sol.stats, sig,
                               solver_obj.name))


def encode(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str | Solver | Inversion = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Grid | ArrayLike = "trailing",
    model_kwargs: Mapping[str, Any] | None = None,
    adaptive: Adaptive | None = None,
    callback: Callable[[StepState], None] | None = None,
    save: Save | None = None,
    checks: Checks | None = None,
    adjoint: str = "autograd",
    **removed: Any,
) -> Result:
    """Encode images (model data scale, σ = 0) to DDIM-scale latents x_T along the reversed grid.

    The grid arguments mean what they mean for :func:`generate`; the encode runs that grid
    backwards (0 → σ_max), so that decoding with the same arguments retraces it. A grid whose
    generation ends above 0 starts the encode there, reading ``images`` as what :func:`generate`
    and :func:`decode` return at that σ: the model's x = α(σ)·x̄.
    ``solver="ddim_inverse"`` reproduces diffusers' DDIMInverseScheduler (see
    :mod:`flowdiff.api.ddim_inverse` for how it differs from the Euler encode). The result's
    ``latent`` carries the grid and solver for :func:`decode`.

    ``solver=flowdiff.Inversion("fixed_point", options, solver=...)`` encodes so that the *plain*
    decode with ``Inversion.solver`` reproduces the images (see :mod:`flowdiff.api.fixed_point`).
    ``flowdiff.Stochastic`` is refused: the stochastic process has no inverse (η = 0 is the ODE:
    ``solver="euler"``).

    Every registered solver encodes at its order or is refused: multistep methods run in the
    variables :func:`flowdiff.engine.formulations.formulation_for` picks for encoding (ρ = 1/σ, where
    an encode's steps shrink), iPNDM is refused. ``checks=Checks(growth=...)`` is the guard of
    :func:`generate` on the latent x_T, tighter by default (``growth × max(1, max|images|)``,
    default 50: a latent is N(0, I)-distributed; see :data:`flowdiff.engine.loop.DIVERGENCE_ENCODE`).
    ``adjoint``: how the encode is differentiated, as for :func:`generate` (the latent's
    solver state, when it keeps one, is differentiable too).
    """
    _checks.refuse_removed("encode", removed, REMOVED)
    flow = check_flow(flow)
    images = check_state(images, "images")
    flow.check_input(images, "images")
    checks = check_checks(checks)
    _refuse_model_check(checks, "encode")
    _checks.check_model_kwargs(model_kwargs)
    _refuse_vmap("encode", "images", images, model_kwargs, checks, adaptive, solver)
    _checks.check_data_range(images, "images")
    if isinstance(solver, Stochastic):
        raise ValueError(f"encode takes no solver=flowdiff.Stochastic(eta={solver.eta!r}, ...): the stochastic "
                         "generative process injects fresh noise at every step and has no inverse; encoding is "
                         "deterministic (eta=0 is the ODE: solver='euler')")
    adaptive_spec = _adaptive_or_none(adaptive, grid, steps, nfe)
    saver = _saver(save, callback, adaptive_spec is not None)
    callback = saver or callback
    grid_spec = Grid() if adaptive_spec is not None else build_grid(grid, steps=steps, nfe=nfe)
    if isinstance(solver, Inversion):
        spec = solver
        plugin = procedure(spec.method, "encode")
        refuse_adjoint(adjoint, f"solver=Inversion({spec.method!r})")
        if adaptive_spec is not None:
            raise ValueError(f"solver=Inversion({spec.method!r}) works on a fixed grid; drop adaptive=")
        if solver_plugin(spec.solver) is not None:
            raise ValueError(f"Inversion({spec.method!r}) inverts a decode solver; Inversion.solver={spec.solver!r} "
                             "is an encode method (use solver='euler' to invert DDIM decoding)")
        spec = _inversion_final_euler(spec, grid_spec)
        solver_obj, name, options = _resolve_solver(spec.solver, "encode")
        request = _request(flow, solver_obj, name, options, grid_spec, None, model_kwargs, callback, checks.finite,
                           bound=divergence_limit(checks.bound(DIVERGENCE_ENCODE), images))
        res = plugin.run(request, images, spec)
        res.latent.set_origin(flow, model_kwargs)  # the latent records its model
        return _kept(saver, res)
    if grid_spec.final_euler is not None:
        raise ValueError(f"grid=Grid(..., final_euler={grid_spec.final_euler}) on a plain encode: final_euler is "
                         "about the step into σ = 0 of a decode (or of the decode that solver=Inversion(...) "
                         "inverts); an encode starts at σ = 0 and has none. Give it to decode, or drop it")
    state_dtype = None if images.dtype == torch.float64 else exact_dtype(images)
    solver_obj, name, options = _resolve_solver(solver, "encode", state_dtype=state_dtype)
    if solver_obj.reversible and solvers.get(name, **options).state_maker != solver_obj.state_maker:
        # its latent records the name and options, from which the decode rebuilds the method its state needs
        raise ValueError(f"solver={solver_obj!r} makes states recorded as {solver_obj.state_maker!r}, but a latent "
                         f"records it as solver {name!r} with solver_options={options}, which make "
                         f"{solvers.get(name, **options).state_maker!r} (it was not built by solvers.get, whose "
                         f"options a latent keeps): build it as solvers.get({name!r}, ...) with the options of "
                         f"{solver_obj.state_maker!r}")
    dtype = exact_dtype(images) if solver_obj.reversible else compute_dtype(images)
    model_dtype = images.dtype if images.dtype != dtype else None
    request = _request(flow, solver_obj, name, options, grid_spec, adaptive_spec, model_kwargs, callback,
                       checks.finite, bound=divergence_limit(checks.bound(DIVERGENCE_ENCODE), images))
    if adaptive_spec is not None:
        refuse_adjoint(adjoint, "an adaptive solve (adaptive=)")
        _refuse_fitted_adaptive(solver_obj, "encode")
        res = solve_adaptive_flow(request, images, direction="encode", model_dtype=model_dtype)
        res.latent.set_origin(flow, model_kwargs)
        return _kept(saver, res)
    sig = None
    try:  # a solver fitted to one grid and direction (a LearnedSolver's) is refused before the solve
        sig = grid_spec.solve_sigmas(flow, solver_obj, "encode")
        refuse_encode_to_infinity(sig)  # zero terminal SNR: see flowdiff.engine.terminal
        sol = _solve_fixed(request, images, sig, "encode", dtype=dtype, model_dtype=model_dtype, eval_end=True,
                           adjoint=adjoint)
    except solvers.GridMismatch as err:
        raise _unfitted(err, solver_obj, "encode", _given(grid, steps, nfe), sig) from None
    x_T = sol.xbar / math.sqrt(1.0 + sig[-1] ** 2)
    if solver_obj.reversible:  # the latent keeps the exact state; the result's x_T is at the images' precision
        latent = Latent(x_T, sig, name, options, sol.state, dtype=images.dtype)
    else:
        x_T = x_T.to(images.dtype)
        latent = Latent(x_T, sig, name, options)
    return _kept(saver, Result(x_T.to(images.dtype), sol.stats, sig, solver_obj.name,
                               latent.set_origin(flow, model_kwargs)))


def decode(
    flow: ProbabilityFlow,
    latent: Latent | Tensor,
    *,
    solver: str | Solver | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Grid | ArrayLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    callback: Callable[[StepState], None] | None = None,
    save: Save | None = None,
    checks: Checks | None = None,
    adjoint: str = "autograd",
    **removed: Any,
) -> Result:
    """Decode a latent back to an image.

    A :class:`Latent` from :func:`encode` carries its grid and solver: the decode retraces
    that grid with that solver (a ``ddim_inverse`` latent decodes with Euler, i.e. DDIM), to the
    encode's first σ: above 0, the model's x = α(σ)·x̄ there, as the encode read it.
    The encode's own arguments are accepted — ``solver`` (a name, or an instance with the
    latent's options), ``steps``/``nfe``/``grid`` that build the latent's grid, explicit σ equal
    to the grid in either order — and only disagreements are refused, naming both values. A
    plain tensor decodes like :func:`generate` with the grid arguments given (defaults: Euler on
    the trailing grid). ``checks``: the checks of :func:`generate`; besides, a latent that
    records its model (``latent.fingerprint``) refuses another flow or other ``model_kwargs``
    with a ValueError naming both, unless ``checks=Checks(model=False)``. A latent that records
    ``decode_shifts`` (a :class:`flowdiff.LearnedEncoder`'s) decodes with its steps evaluated at them.
    ``adjoint``: how the decode is differentiated, as for :func:`generate`. Under ``torch.func.vmap`` it runs as
    :func:`generate` does, with ``checks=Checks(finite=False, growth=None)`` (and ``model=False`` where mapped
    ``model_kwargs`` meet a latent that records its model), equal to the loop of un-mapped calls.
    """
    _checks.refuse_removed("decode", removed, REMOVED)
    flow = check_flow(flow)
    checks = check_checks(checks)
    _checks.check_model_kwargs(model_kwargs)
    if isinstance(solver, (Stochastic, Inversion)):
        raise ValueError(f"decode takes a solver name or a solvers.Solver, got flowdiff.{type(solver).__name__}: "
                         "a latent decodes with the solver that encoded it")
    _refuse_vmap("decode", "latent.x" if isinstance(latent, Latent) else "latent",
                 latent.x if isinstance(latent, Latent) else latent, model_kwargs, checks, None, solver)
    if isinstance(latent, Latent) and checks.model and latent.fingerprint is not None and _vmapped(model_kwargs):
        raise ValueError("decode under torch.func.vmap (model_kwargs are mapped over) with checks=Checks(model=True): "
                         "this latent's model check fingerprints model_kwargs' values on the host, which vmap cannot; "
                         "decode already solves a batch along the first dimension of latent.x: call it once on the "
                         "mapped inputs stacked along it, or give checks=flowdiff.Checks(finite=False, growth=None, "
                         "model=False) to run under vmap without the model check")
    if isinstance(latent, Latent):
        if checks.model:  # a latent decodes only with the model that encoded it
            latent.check_model(flow, model_kwargs)
        saver = _saver(save, callback, adaptive=False)
        return _kept(saver, _decode_latent(flow, latent, solver=solver, steps=steps, nfe=nfe, grid=grid,
                                           model_kwargs=model_kwargs, callback=saver or callback, checks=checks,
                                           adjoint=adjoint))
    if not isinstance(latent, Tensor):
        raise TypeError(f"latent must be a flowdiff.Latent (from encode) or a torch.Tensor, got "
                        f"{type(latent).__name__}")
    flow.check_input(check_state(latent, "latent"), "latent")  # named as the caller gave it, not generate's noise
    if not checks.model:
        checks = Checks(checks.finite, checks.growth)  # a plain tensor records no model: nothing to skip
    return generate(flow, latent, solver="euler" if solver is None else solver, steps=steps, nfe=nfe,
                    grid="trailing" if grid is None else grid, model_kwargs=model_kwargs, callback=callback,
                    save=save, checks=checks, adjoint=adjoint)


def _decode_latent(flow: ProbabilityFlow, latent: Latent, *, solver, steps, nfe, grid, model_kwargs, callback,
                   checks: Checks, adjoint) -> Result:
    x = check_state(latent.x, "latent.x")
    flow.check_input(x, "latent.x")
    own = decodes_with(latent.solver)
    options = dict(latent.solver_options)
    if solver is not None:
        name = solver if isinstance(solver, str) else solver.name
        if name not in (own, latent.solver):
            raise ValueError(f"this latent was encoded with solver {latent.solver!r} and decodes with {own!r}; "
                             f"got solver={name!r} (pass latent.x to decode a plain tensor another way)")
        if isinstance(solver, Solver):
            given = solvers.options_of(solver)
            if given is not None and given != options:
                raise ValueError(f"this latent was encoded with solver options {options}; got "
                                 f"solvers.get({name!r}, **{given})")
    sig = reversed_grid(latent.sigmas)  # the encode's grid, run back (the engine's one reversal)
    grid = None if grid is None else as_grid(grid)
    final_euler = None
    if isinstance(grid, Grid):
        final_euler = grid.final_euler
        if not grid.given and grid.name == "trailing" and not grid.options:
            grid = None  # Grid(final_euler=...) alone says how the decode ends, nothing about the grid
    if isinstance(grid, Grid) and grid.sigmas is not None:
        given = np.asarray(grid.sigmas, dtype=np.float64)
        if not (np.array_equal(given, sig) or np.array_equal(given, latent.sigmas)):
            raise ValueError(f"grid= {np.array2string(given, precision=4)} differs from the grid this latent "
                             f"was encoded on, {np.array2string(sig, precision=4)} (either order is accepted)")
        if steps is not None or nfe is not None:
            build_grid(grid, steps=steps, nfe=nfe)  # refused, naming both
    elif grid is not None or nfe is not None:
        plugin = solver_plugin(latent.solver)
        encoder = plugin.make(options) if plugin is not None else solvers.get(latent.solver, **options)
        if isinstance(grid, Grid):  # a Grid holds its own steps (and may say final_euler once)
            built = build_grid(grid, steps=steps if steps is not None or nfe is not None or grid.given
                               else latent.steps, nfe=nfe)
        else:
            built = build_grid("trailing" if grid is None else grid,
                               steps=latent.steps if steps is None and nfe is None else steps, nfe=nfe)
        rebuilt = built.generation_sigmas(flow, encoder, final_euler=not encode_evaluates_end(encoder))
        if not np.array_equal(rebuilt, sig):
            shown = ", ".join(f"{k}={v!r}" for k, v in (("grid", grid), ("steps", steps), ("nfe", nfe))
                              if v is not None)
            raise ValueError(f"{shown} builds the σ grid {np.array2string(rebuilt, precision=4)}, not the one "
                             f"this latent was encoded on, {np.array2string(sig, precision=4)}")
    elif steps is not None and steps != latent.steps:
        raise ValueError(f"this latent was encoded with {latent.steps} steps; got steps={steps}")
    if latent.final_euler is not None:  # a fixed-point latent says how its decode ends
        if final_euler is not None and final_euler != latent.final_euler:
            raise ValueError(f"this latent inverts a decode with final_euler={latent.final_euler} "
                             f"(Latent.final_euler); got grid=Grid(..., final_euler={final_euler})")
        final_euler = latent.final_euler
    solver_obj = solvers.get(own, **options)
    if final_euler is False and latent.solver_state is not None:
        raise ValueError(f"grid=Grid(..., final_euler=False) beside this latent of the reversible solver {own!r}: it "
                         "decodes by the exact inverse of each step of its encode, the one into σ = 0 included, never "
                         "an Euler step, so final_euler=False would change nothing (the same images and NFE as "
                         "without it); leave final_euler out")
    if final_euler is False and latent.final_euler is None:  # said here, not recorded by the latent
        _refuse_idle_final_euler(solver_obj, sig, "decode", f"this latent's decode with solver {own!r}")
        if latent.decode_shifts is not None:  # learn_encoder fits them on decode's default, its last step Euler
            raise ValueError(f"grid=Grid(..., final_euler=False) beside this latent's decode_shifts (a "
                             f"LearnedEncoder's, solver {own!r}): they were fitted for the decode whose last step, "
                             "into σ = 0, is Euler (the default, as learn_encoder decodes); final_euler=False would "
                             f"take it with {own!r}, evaluating the model at σ = 0 once more than that decode and "
                             "moving an evaluation its shift was not fitted for. Accepted: final_euler left out (or "
                             "True), or the plain decode without the shifts "
                             "(dataclasses.replace(latent, decode_shifts=None)) with final_euler=False")
    final_euler = final_euler is not False
    if latent.decode_shifts is not None:  # a learned encoder's latent: the decode it was fitted with
        times = formulation_for(solver_obj, "decode").times(sig.tolist())
        solver_obj = solvers.Shifted(solver_obj, dict(zip(zip(times[:-1], times[1:]), latent.decode_shifts)),
                                     name=solver_obj.name)
    request = _request(flow, solver_obj, own, options, Grid(sigmas=sig), None, model_kwargs, callback, checks.finite,
                       bound=divergence_limit(checks.bound(DIVERGENCE_GENERATE), x))
    if latent.solver_state is not None:
        return decode_reversible(request, latent, **adjoint_for(adjoint, solver_obj, flow.model,
                                                                request.model_kwargs))
    dtype = compute_dtype(x)
    model_dtype = latent.dtype if latent.dtype != dtype else None
    sol = _solve_fixed(request, x, sig, "decode", dtype=dtype, model_dtype=model_dtype,
                       eval_end=not (final_euler and own != "euler" and sig[-1] == 0.0), adjoint=adjoint)
    return Result(to_model_scale(flow, sol.xbar, sig[-1]).to(latent.dtype), sol.stats, sig, solver_obj.name)
