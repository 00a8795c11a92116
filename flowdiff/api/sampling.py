"""Generation, encoding and decoding: the entry points.

``generate``, ``encode`` and ``decode`` take the flat keywords the README documents, build
the option objects of :mod:`flowdiff.engine.options` once (validated there), and dispatch:

* a procedure plug-in (:mod:`flowdiff.engine.plugins`: the η process, fixed-point inversion) when
  its option object is given;
* an adaptive solve (:mod:`flowdiff.api.adaptive`) when tolerances are;
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
from ..engine.flow import ProbabilityFlow
from ..engine.formulations import encode_evaluates_end, formulation_for
from ..engine.latent import Latent
from ..engine.loop import DIVERGENCE_ENCODE, DIVERGENCE_GENERATE, FlowSolution, divergence_limit, solve_grid
from ..engine.options import (
    Adaptive,
    Grid,
    Inversion,
    Request,
    Save,
    Stochastic,
    _shown,
    build_grid,
    check_callback,
    check_flow,
    check_state,
    compute_dtype,
    exact_dtype,
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

__all__ = ["Result", "StepState", "decode", "encode", "generate"]


def _resolve_solver(solver: str | Solver, solver_options: Mapping[str, Any] | None, direction: str,
                    state_dtype: torch.dtype | None = None) -> tuple[Solver, str, dict[str, Any]]:
    """The solver object, its name and options (as a latent records them) for ``direction``."""
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a mapping, got {type(solver_options).__name__}")
    options = dict(solver_options or {})
    plugin = solver_plugin(solver)
    if plugin is not None:
        if plugin.direction != direction:
            what = "an encoding" if plugin.direction == "encode" else "a generation"
            raise ValueError(f"solver {plugin.name!r} is {what} method only; use it with flowdiff.{plugin.direction}")
        return plugin.make(options), plugin.name, options
    obj = solvers.get(solver, **options)
    if (state_dtype == torch.float64 and isinstance(obj, ReversibleHeun) and obj.quantum is None
            and "quantum" not in options):
        # float32 (or lower) images with a float64 state: states on 2⁻⁴⁰ℤ make the inverse bit-exact
        options["quantum"] = EXACT_QUANTUM
        obj = ReversibleHeun(quantum=EXACT_QUANTUM)
    return obj, obj.name, options


def _check_final_euler(final_euler: object) -> None:
    if final_euler is not None and not isinstance(final_euler, bool):
        raise TypeError(f"final_euler must be True, False or None (the default: True unless the Grid or the latent "
                        f"says otherwise), got {final_euler!r} ({type(final_euler).__name__})")


def _inversion_final_euler(spec: Inversion, grid: Grid) -> Inversion:
    """The inversion's ``final_euler`` said once: in its options or in the Grid (equal values agree)."""
    if grid.final_euler is None:
        return spec
    own = spec.options.get("final_euler")
    if own is None:
        return Inversion(spec.method, {**spec.options, "final_euler": grid.final_euler})
    if own != grid.final_euler:
        raise ValueError(f"inversion_options={{'final_euler': {own!r}}} and grid=Grid(..., final_euler="
                         f"{grid.final_euler}) say two different things; give final_euler once")
    return spec


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

    ``start`` is the VP-scaled state at ``sig[0]`` (noise, images at σ = 0, a latent's x_T), taken to
    x̄ here; a grid from σ = ∞ starts from the noise itself with its boundary step (engine.terminal)."""
    flow, solver = request.flow, request.solver
    flow_for = getattr(solver, "flow_for", None)  # a method that feeds the model its own way (ddim_inverse)
    if flow_for is not None:
        flow = flow_for(flow, sig.tolist())
    eps = flow.field(request.model_kwargs, model_dtype)
    if isinstance(request.callback, Saver):  # a σ to save that the grid does not step to: refused before the solve
        request.callback.check(sig)
    if starts_at_infinity(sig):
        eps = field_from_infinity(flow, eps, sig, request.model_kwargs, model_dtype)
        begin = {"y0": start.to(dtype)}
    else:
        begin = {"xbar0": start.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)}
    grads = adjoint_for(adjoint, solver, flow.model, request.model_kwargs)
    return solve_grid(eps, formulation_for(solver, direction), sig.tolist(), solver, **begin, eval_end=eval_end,
                      callback=request.callback, check_finite=request.check_finite, bound=request.bound, **grads)


def _request(flow: ProbabilityFlow, solver: Solver, name: str, options: dict[str, Any], grid: Grid,
             adaptive: Adaptive | None, model_kwargs: Mapping[str, Any] | None, callback: object,
             check_finite: bool, *, bound: float | None = None) -> Request:
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    return Request(flow, solver, name, options, grid, adaptive, dict(model_kwargs or {}), check_callback(callback),
                   check_finite, bound)


def _adaptive_or_none(adaptive: Adaptive | None, rtol: float | None, atol: float | None, max_nfe: int | None,
                      adaptive_options: Mapping[str, Any] | None, *, grid: str | Grid, steps: int | None,
                      nfe: int | None, sigmas: ArrayLike | None, timesteps: ArrayLike | None,
                      grid_options: Mapping[str, Any] | None, final_euler: bool | None) -> Adaptive | None:
    """The adaptive spec from ``adaptive=`` or the flat keywords; None for a fixed-grid solve.

    An adaptive request can be spelt one way each: tolerances as ``rtol=``/``atol=`` (with
    ``max_nfe=``, ``adaptive_options=``, ``sigmas=[σ_start, 0]``) or inside ``adaptive=``; a
    fixed-grid keyword beside either (``steps``, ``nfe``, ``timesteps``, ``grid``, ``grid_options``,
    ``final_euler``) would be ignored, so it is refused, naming both spellings."""
    flat = {"rtol": rtol, "atol": atol, "max_nfe": max_nfe, "adaptive_options": adaptive_options}
    if adaptive is not None:
        if not isinstance(adaptive, Adaptive):
            raise TypeError(f"adaptive must be a flowdiff.Adaptive, got {type(adaptive).__name__}")
        given = [f"{k}={_shown(v)}" for k, v in flat.items() if v is not None]
        if given:
            raise ValueError(f"adaptive= is a flowdiff.Adaptive and {', '.join(given)} was given beside it: give "
                             "rtol/atol/max_nfe/options inside it, not beside it")
        if sigmas is not None:
            raise ValueError(f"sigmas={_shown(sigmas)} beside adaptive=flowdiff.Adaptive(...): an adaptive solve's "
                             "start is Adaptive(sigma_start=...); give it there (sigmas=[σ_start, 0] is the "
                             "rtol=/atol= spelling)")
        what = "adaptive="
    elif rtol is not None or atol is not None:
        adaptive = Adaptive.from_keywords(rtol, atol, max_nfe, adaptive_options, sigmas)
        what = "rtol=/atol="
    else:
        if max_nfe is not None:
            raise ValueError("max_nfe= applies to adaptive solves (rtol=/atol=); for a fixed budget use nfe=")
        if adaptive_options is not None:
            raise ValueError("adaptive_options= apply to adaptive solves (rtol=/atol=)")
        return None
    if steps is not None or nfe is not None:
        given = "steps=" + _shown(steps) if steps is not None else "nfe=" + _shown(nfe)
        raise ValueError(f"{given} beside {what}: an adaptive solve chooses its own steps; drop steps=/nfe= "
                         "(use max_nfe= to cap the evaluations)")
    fixed = {"timesteps": timesteps, "grid_options": grid_options, "final_euler": final_euler,
             "grid": grid if isinstance(grid, Grid) or grid != "trailing" else None}
    given = [f"{k}={_shown(v) if k != 'grid' or not isinstance(v, Grid) else 'Grid(...)'}"
             for k, v in fixed.items() if v is not None]
    if given:
        raise ValueError(f"{', '.join(given)} and {what} ask for two kinds of solve: {given[0].split('=')[0]}= "
                         "belongs to a fixed grid, and an adaptive solve places its own steps from its start "
                         "(sigmas=[σ_start, 0] or Adaptive(sigma_start=)) to 0. Drop one of them")
    return adaptive


def generate(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str | Solver = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Grid = "trailing",
    sigmas: ArrayLike | None = None,
    timesteps: ArrayLike | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    adaptive_options: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    final_euler: bool | None = None,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    eta: float | str | None = None,
    generator: torch.Generator | int | None = None,
    step_noise: Tensor | None = None,
    adaptive: Adaptive | None = None,
    stochastic: Stochastic | None = None,
    divergence: float | None = DIVERGENCE_GENERATE,
    save: Save | None = None,
    adjoint: str = "autograd",
) -> Result:
    """Generate images from DDIM-scale noise x_T ~ N(0, I) by solving from the grid's first σ to 0.

    Fixed grids: ``steps`` on a named ``grid`` (``trailing``, ``leading``, ``linear``,
    ``quadratic``, ``karras``, ``logsnr``), explicit ``sigmas`` (decreasing, ending at 0) or
    ``timesteps``, or ``grid=flowdiff.Grid(...)``. ``nfe=N`` is the fixed-budget form: the
    step count is chosen so that ``stats.nfe`` is the largest count ≤ N that the solver's
    steps allow (exactly N for one-evaluation-per-step solvers; Heun with its Euler step into
    σ = 0 spends odd counts). With ``rtol``/``atol`` (or ``adaptive=flowdiff.Adaptive(...)``)
    the solve is adaptive (an adaptive solver is required; ``max_nfe`` caps its evaluations
    with an error, ``nfe=`` is refused; ``adaptive_options`` holds the controller knobs of
    :class:`flowdiff.Adaptive`).

    ``final_euler`` (default True): a solver that would evaluate the model at σ = 0 takes
    its last step as Euler instead, as EDM and k-diffusion do. The state keeps the noise's
    dtype; float16/bfloat16 noise is integrated in float32 with the model fed in the
    noise's dtype, and the image returned in it.

    ``eta`` (a number in [0, 1], or ``"sigma_hat"``), or ``stochastic=flowdiff.Stochastic(...)``,
    selects the DDIM paper's stochastic generative process instead of the ODE (see
    :mod:`flowdiff.api.stochastic`), with randomness from ``generator`` or given per step in ``step_noise``.

    ``divergence`` (default 1000) is the divergence guard of fixed-grid, adaptive and η solves: when the
    VP-scaled end state max|x̄|/√(1+σ²) exceeds ``divergence × max(1, max|noise|)`` the solve
    is run again to find the first step past that bound and a :class:`solvers.SolveError`
    names it (step, σ, the value: ``err.value``) instead of returning garbage. It costs one
    host sync at the end, none in the loop. ``None`` turns it off.

    ``save=flowdiff.Save(sigmas=[...], steps=True, denoised=True)`` returns the states at chosen σ
    (or after every step) in ``result.saved``: the records a callback would receive there.

    ``adjoint`` is how the solve is differentiated (:mod:`flowdiff.engine.adjoint`): ``"autograd"``
    (default), ``"checkpoint"`` (step-boundary states kept, each step recomputed backwards) or
    ``"reversible"`` (reversible solvers: nothing kept per step). Fixed grids only.
    """
    flow = check_flow(flow)
    noise = check_state(noise, "noise")
    _checks.check_flags(check_finite=check_finite)
    _check_final_euler(final_euler)
    _checks.check_model_kwargs(model_kwargs)
    adaptive_spec = _adaptive_or_none(adaptive, rtol, atol, max_nfe, adaptive_options, grid=grid, steps=steps,
                                      nfe=nfe, sigmas=sigmas, timesteps=timesteps, grid_options=grid_options,
                                      final_euler=final_euler)
    saver = _saver(save, callback, adaptive_spec is not None)
    callback = saver or callback
    grid_spec = Grid() if adaptive_spec is not None else build_grid(
        grid, steps=steps, nfe=nfe, sigmas=sigmas, timesteps=timesteps, grid_options=grid_options,
        final_euler=final_euler)
    flat_noise = {"eta": eta, "generator": generator, "step_noise": step_noise}
    if stochastic is not None or any(v is not None for v in flat_noise.values()):
        given = [f"{k}={_shown(v) if k != 'step_noise' else '...'}" for k, v in flat_noise.items() if v is not None]
        if stochastic is not None and given:
            raise ValueError(f"stochastic= is a flowdiff.Stochastic and {', '.join(given)} was given beside it: "
                             "give eta/generator/step_noise inside it, not beside it")
        spec = stochastic if stochastic is not None else Stochastic(0.0 if eta is None else eta, generator, step_noise)
        if not isinstance(spec, Stochastic):
            raise TypeError(f"stochastic must be a flowdiff.Stochastic, got {type(spec).__name__}")
        refuse_adjoint(adjoint, "stochastic generation (eta=/stochastic=)")
        if adaptive_spec is not None:
            raise ValueError("eta= (stochastic generation) takes a fixed grid, not rtol=/atol=/adaptive=")
        if solver_options:
            raise ValueError("eta= (stochastic generation) takes its own DDIM step: no solver_options= or max_nfe=")
        name = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__)
        request = _request(flow, solvers.get("euler"), name, {}, grid_spec, None, model_kwargs, callback,
                           check_finite, bound=divergence_limit(divergence, noise))
        return _kept(saver, procedure("eta", "generate").run(request, noise, spec))
    solver_obj, name, options = _resolve_solver(solver, solver_options, "generate")
    request = _request(flow, solver_obj, name, options, grid_spec, adaptive_spec, model_kwargs, callback,
                       check_finite, bound=divergence_limit(divergence, noise))
    dtype = compute_dtype(noise)
    model_dtype = noise.dtype if noise.dtype != dtype else None
    if adaptive_spec is not None:
        refuse_adjoint(adjoint, "an adaptive solve (rtol=/atol=)")
        return _kept(saver, solve_adaptive_flow(request, noise, direction="generate", model_dtype=model_dtype))
    sig = grid_spec.solve_sigmas(flow, solver_obj, "generate")
    sol = _solve_fixed(request, noise, sig, "generate", dtype=dtype, model_dtype=model_dtype,
                       eval_end=not (grid_spec.euler_into_zero and sig[-1] == 0.0), adjoint=adjoint)
    return _kept(saver, Result(sol.xbar.to(noise.dtype), sol.stats, sig, solver_obj.name))


def encode(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str | Solver = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str | Grid = "trailing",
    sigmas: ArrayLike | None = None,
    timesteps: ArrayLike | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    max_nfe: int | None = None,
    adaptive_options: Mapping[str, Any] | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    inversion: str | Inversion | None = None,
    inversion_options: Mapping[str, Any] | None = None,
    eta: float | str | None = None,
    adaptive: Adaptive | None = None,
    divergence: float | None = DIVERGENCE_ENCODE,
    save: Save | None = None,
    adjoint: str = "autograd",
) -> Result:
    """Encode images (model data scale, σ = 0) to DDIM-scale latents x_T along the reversed grid.

    The grid arguments mean what they mean for :func:`generate`; the encode runs that grid
    backwards (0 → σ_max), so that decoding with the same arguments retraces it.
    ``solver="ddim_inverse"`` reproduces diffusers' DDIMInverseScheduler (see
    :mod:`flowdiff.api.ddim_inverse` for how it differs from the Euler encode). The result's
    ``latent`` carries the grid and solver for :func:`decode`.

    ``inversion="fixed_point"`` (or ``flowdiff.Inversion(...)``) encodes so that the *plain*
    solver's decode reproduces the images (see :mod:`flowdiff.api.fixed_point`). ``eta`` other
    than 0 is refused: the stochastic process has no inverse.

    Every registered solver encodes at its order or is refused: multistep methods run in the
    variables :func:`flowdiff.engine.formulations.formulation_for` picks for encoding (ρ = 1/σ, where
    an encode's steps shrink), iPNDM is refused. ``divergence`` is the guard of
    :func:`generate` on the latent x_T, tighter by default (``divergence × max(1, max|images|)``,
    default 50: a latent is N(0, I)-distributed; see :data:`flowdiff.engine.loop.DIVERGENCE_ENCODE`).
    ``adjoint``: how the encode is differentiated, as for :func:`generate` (the latent's
    solver state, when it keeps one, is differentiable too).
    """
    flow = check_flow(flow)
    images = check_state(images, "images")
    _checks.check_flags(check_finite=check_finite)
    _checks.check_model_kwargs(model_kwargs)
    _checks.check_data_range(images, "images")
    if eta is not None and eta != 0:
        raise ValueError(f"encode takes no eta={eta!r}: the stochastic generative process (eta > 0 or "
                         "'sigma_hat') injects fresh noise at every step and has no inverse; encoding is "
                         "deterministic (eta=0, the ODE)")
    adaptive_spec = _adaptive_or_none(adaptive, rtol, atol, max_nfe, adaptive_options, grid=grid, steps=steps,
                                      nfe=nfe, sigmas=sigmas, timesteps=timesteps, grid_options=grid_options,
                                      final_euler=None)
    saver = _saver(save, callback, adaptive_spec is not None)
    callback = saver or callback
    grid_spec = Grid() if adaptive_spec is not None else build_grid(
        grid, steps=steps, nfe=nfe, sigmas=sigmas, timesteps=timesteps, grid_options=grid_options, final_euler=None)
    if inversion is not None:
        spec = inversion if isinstance(inversion, Inversion) else None
        if spec is None:
            if not isinstance(inversion, str):
                raise TypeError(f"inversion must be a name or a flowdiff.Inversion, got {type(inversion).__name__}")
            spec = Inversion(inversion, inversion_options or {})
        elif inversion_options is not None:
            raise ValueError(f"inversion= is a flowdiff.Inversion and inversion_options={_shown(inversion_options)} "
                             "was given beside it: give its options inside it, not beside it")
        plugin = procedure(spec.method, "encode")
        refuse_adjoint(adjoint, f"inversion={spec.method!r}")
        if adaptive_spec is not None:
            raise ValueError(f"inversion={spec.method!r} works on a fixed grid; drop rtol=/atol=/adaptive=")
        if solver_plugin(solver) is not None:
            raise ValueError(f"inversion={spec.method!r} inverts a decode solver; {solver!r} is an encode method "
                             "(use solver='euler' to invert DDIM decoding)")
        spec = _inversion_final_euler(spec, grid_spec)
        solver_obj, name, options = _resolve_solver(solver, solver_options, "encode")
        request = _request(flow, solver_obj, name, options, grid_spec, None, model_kwargs, callback, check_finite,
                           bound=divergence_limit(divergence, images))
        res = plugin.run(request, images, spec)
        res.latent.set_origin(flow, model_kwargs)  # the latent records its model
        return _kept(saver, res)
    if inversion_options is not None:
        raise ValueError("inversion_options= given without inversion=")
    if grid_spec.final_euler is not None:
        raise ValueError(f"grid=Grid(..., final_euler={grid_spec.final_euler}) on a plain encode: final_euler is "
                         "about the step into σ = 0 of a decode (or of the decode that inversion='fixed_point' "
                         "inverts); an encode starts at σ = 0 and has none. Give it to decode, or drop it")
    state_dtype = None if images.dtype == torch.float64 else exact_dtype(images)
    solver_obj, name, options = _resolve_solver(solver, solver_options, "encode", state_dtype=state_dtype)
    dtype = exact_dtype(images) if solver_obj.reversible else compute_dtype(images)
    model_dtype = images.dtype if images.dtype != dtype else None
    request = _request(flow, solver_obj, name, options, grid_spec, adaptive_spec, model_kwargs, callback,
                       check_finite, bound=divergence_limit(divergence, images))
    if adaptive_spec is not None:
        refuse_adjoint(adjoint, "an adaptive solve (rtol=/atol=)")
        res = solve_adaptive_flow(request, images, direction="encode", model_dtype=model_dtype)
        res.latent.set_origin(flow, model_kwargs)
        return _kept(saver, res)
    sig = grid_spec.solve_sigmas(flow, solver_obj, "encode")
    refuse_encode_to_infinity(sig)  # zero terminal SNR: see flowdiff.engine.terminal
    sol = _solve_fixed(request, images, sig, "encode", dtype=dtype, model_dtype=model_dtype, eval_end=True,
                       adjoint=adjoint)
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
    grid: str | Grid | None = None,
    sigmas: ArrayLike | None = None,
    timesteps: ArrayLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    final_euler: bool | None = None,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    check_model: bool = True,
    divergence: float | None = DIVERGENCE_GENERATE,
    save: Save | None = None,
    adjoint: str = "autograd",
) -> Result:
    """Decode a latent back to an image.

    A :class:`Latent` from :func:`encode` carries its grid and solver: the decode retraces
    that grid with that solver (a ``ddim_inverse`` latent decodes with Euler, i.e. DDIM).
    The encode's own arguments are accepted — ``solver``, ``steps``/``nfe``/``grid``/
    ``timesteps``/``grid_options`` that build the latent's grid, ``sigmas`` equal to the grid
    in either order, equal ``solver_options`` — and only disagreements are refused, naming
    both values. A plain tensor decodes like :func:`generate` with the grid arguments given
    (defaults: Euler on the trailing grid). ``divergence``: the guard of :func:`generate`.
    A latent that records its model (``latent.fingerprint``) refuses another flow or other
    ``model_kwargs`` with a ValueError naming both, unless ``check_model=False``.
    ``adjoint``: how the decode is differentiated, as for :func:`generate`.
    """
    flow = check_flow(flow)
    _checks.check_flags(check_finite=check_finite, check_model=check_model)
    _check_final_euler(final_euler)
    _checks.check_model_kwargs(model_kwargs)
    if isinstance(latent, Latent):
        if check_model:  # a latent decodes only with the model that encoded it
            latent.check_model(flow, model_kwargs)
        saver = _saver(save, callback, adaptive=False)
        return _kept(saver, _decode_latent(flow, latent, solver=solver, steps=steps, nfe=nfe, grid=grid,
                                           sigmas=sigmas, timesteps=timesteps, model_kwargs=model_kwargs,
                                           solver_options=solver_options, grid_options=grid_options,
                                           final_euler=final_euler, callback=saver or callback,
                                           check_finite=check_finite, divergence=divergence, adjoint=adjoint))
    return generate(flow, latent, solver="euler" if solver is None else solver, steps=steps, nfe=nfe,
                    grid="trailing" if grid is None else grid, sigmas=sigmas, timesteps=timesteps,
                    model_kwargs=model_kwargs, solver_options=solver_options, grid_options=grid_options,
                    final_euler=final_euler, callback=callback, check_finite=check_finite, divergence=divergence,
                    save=save, adjoint=adjoint)


def _decode_latent(flow: ProbabilityFlow, latent: Latent, *, solver, steps, nfe, grid, sigmas, timesteps,
                   model_kwargs, solver_options, grid_options, final_euler, callback, check_finite,
                   divergence, adjoint) -> Result:
    x = check_state(latent.x, "latent.x")
    own = decodes_with(latent.solver)
    if solver is not None:
        name = solver if isinstance(solver, str) else solver.name
        if name not in (own, latent.solver):
            raise ValueError(f"this latent was encoded with solver {latent.solver!r} and decodes with {own!r}; "
                             f"got solver={name!r} (pass latent.x to decode a plain tensor another way)")
    sig = np.asarray(latent.sigmas, dtype=np.float64)[::-1].copy()
    if sigmas is not None:
        given = np.asarray(sigmas, dtype=np.float64)
        if not (np.array_equal(given, sig) or np.array_equal(given, sig[::-1])):
            raise ValueError(f"sigmas= {np.array2string(given, precision=4)} differs from the grid this latent "
                             f"was encoded on, {np.array2string(sig, precision=4)} (either order is accepted)")
    options = dict(latent.solver_options)
    if solver_options is not None and dict(solver_options) != options:
        raise ValueError(f"this latent was encoded with solver_options={options}; got {dict(solver_options)}")
    if grid is not None or nfe is not None or timesteps is not None or grid_options is not None:
        if sigmas is not None:
            raise ValueError("give sigmas= or grid=/nfe=/timesteps=, not both")
        plugin = solver_plugin(latent.solver)
        encoder = plugin.make(options) if plugin is not None else solvers.get(latent.solver, **options)
        if isinstance(grid, Grid):  # a Grid holds its own steps (and may say final_euler once)
            built = build_grid(grid, steps=steps, nfe=nfe, sigmas=None, timesteps=timesteps,
                               grid_options=grid_options, final_euler=final_euler)
            final_euler = built.final_euler
        else:
            built = build_grid("trailing" if grid is None else grid,
                               steps=latent.steps if steps is None and nfe is None and timesteps is None else steps,
                               nfe=nfe, sigmas=None, timesteps=timesteps, grid_options=grid_options,
                               final_euler=None)
        rebuilt = built.generation_sigmas(flow, encoder, final_euler=not encode_evaluates_end(encoder))
        if not np.array_equal(rebuilt, sig):
            shown = ", ".join(f"{k}={v!r}" for k, v in (("grid", grid), ("steps", steps), ("nfe", nfe),
                                                        ("timesteps", timesteps)) if v is not None)
            raise ValueError(f"{shown} builds the σ grid {np.array2string(rebuilt, precision=4)}, not the one "
                             f"this latent was encoded on, {np.array2string(sig, precision=4)}")
    elif steps is not None and steps != latent.steps:
        raise ValueError(f"this latent was encoded with {latent.steps} steps; got steps={steps}")
    if latent.final_euler is not None:  # a fixed-point latent says how its decode ends
        if final_euler is not None and final_euler != latent.final_euler:
            raise ValueError(f"this latent inverts a decode with final_euler={latent.final_euler} "
                             f"(Latent.final_euler); got final_euler={final_euler}")
        final_euler = latent.final_euler
    final_euler = final_euler is not False
    solver_obj = solvers.get(own, **options)
    request = _request(flow, solver_obj, own, options, Grid(sigmas=sig), None, model_kwargs, callback, check_finite,
                       bound=divergence_limit(divergence, x))
    if latent.solver_state is not None:
        return decode_reversible(request, latent, **adjoint_for(adjoint, solver_obj, flow.model,
                                                                request.model_kwargs))
    dtype = compute_dtype(x)
    model_dtype = latent.dtype if latent.dtype != dtype else None
    sol = _solve_fixed(request, x, sig, "decode", dtype=dtype, model_dtype=model_dtype,
                       eval_end=not (final_euler and own != "euler" and sig[-1] == 0.0), adjoint=adjoint)
    return Result(sol.xbar.to(latent.dtype), sol.stats, sig, solver_obj.name)

