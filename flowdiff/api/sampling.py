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
from ..engine.flow import ProbabilityFlow
from ..engine.formulations import formulation_for
from ..engine.latent import Latent
from ..engine.loop import DIVERGENCE_ENCODE, DIVERGENCE_GENERATE, divergence_limit, solve_grid
from ..engine.options import (
    Adaptive,
    Grid,
    Inversion,
    Request,
    Stochastic,
    build_grid,
    check_callback,
    check_flow,
    check_state,
    compute_dtype,
    exact_dtype,
)
from ..engine.plugins import decodes_with, procedure, solver_plugin
from ..engine.results import Result, StepState
from ..engine.schedules import ArrayLike
from ..engine.terminal import generate_from_infinity, refuse_encode_to_infinity, starts_at_infinity
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


def _request(flow: ProbabilityFlow, solver: Solver, name: str, options: dict[str, Any], grid: Grid,
             adaptive: Adaptive | None, model_kwargs: Mapping[str, Any] | None, callback: object,
             check_finite: bool) -> Request:
    if model_kwargs is not None and not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping, got {type(model_kwargs).__name__}")
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    return Request(flow, solver, name, options, grid, adaptive, dict(model_kwargs or {}), check_callback(callback),
                   check_finite)


def _adaptive_or_none(adaptive: Adaptive | None, rtol: float | None, atol: float | None, max_nfe: int | None,
                      adaptive_options: Mapping[str, Any] | None, grid: Grid, sigmas: ArrayLike | None
                      ) -> Adaptive | None:
    """The adaptive spec from ``adaptive=`` or the flat keywords; None for a fixed-grid solve."""
    flat = rtol is not None or atol is not None
    if adaptive is not None:
        if not isinstance(adaptive, Adaptive):
            raise TypeError(f"adaptive must be a flowdiff.Adaptive, got {type(adaptive).__name__}")
        if flat or max_nfe is not None or adaptive_options is not None:
            raise ValueError("adaptive= is a flowdiff.Adaptive: give rtol/atol/max_nfe/options inside it")
    elif flat:
        adaptive = Adaptive.from_keywords(rtol, atol, max_nfe, adaptive_options, sigmas)
    else:
        if max_nfe is not None:
            raise ValueError("max_nfe= applies to adaptive solves (rtol=/atol=); for a fixed budget use nfe=")
        if adaptive_options is not None:
            raise ValueError("adaptive_options= apply to adaptive solves (rtol=/atol=)")
        return None
    if grid.steps is not None or grid.nfe is not None:
        raise ValueError("an adaptive solve (rtol=/atol=) chooses its own steps; drop steps=/nfe= "
                         "(use max_nfe= to cap the evaluations)")
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
    final_euler: bool = True,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    eta: float | str | None = None,
    generator: torch.Generator | int | None = None,
    step_noise: Tensor | None = None,
    adaptive: Adaptive | None = None,
    stochastic: Stochastic | None = None,
    divergence: float | None = DIVERGENCE_GENERATE,
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

    ``divergence`` (default 1000) is the divergence guard of fixed-grid and adaptive solves: when the
    VP-scaled end state max|x̄|/√(1+σ²) exceeds ``divergence × max(1, max|noise|)`` the solve
    is run again to find the first step past that bound and a :class:`solvers.SolveError`
    names it (step, σ, the value: ``err.value``) instead of returning garbage. It costs one
    host sync at the end, none in the loop. ``None`` turns it off.
    """
    flow = check_flow(flow)
    noise = check_state(noise, "noise")
    _checks.check_flags(final_euler=final_euler, check_finite=check_finite)
    _checks.check_model_kwargs(model_kwargs)
    adaptive_given = rtol is not None or atol is not None or adaptive is not None
    grid_spec = build_grid(grid, steps=steps, nfe=nfe, sigmas=None if adaptive_given else sigmas,
                           timesteps=timesteps, grid_options=grid_options, final_euler=final_euler)
    flat_noise = eta is not None or generator is not None or step_noise is not None
    if stochastic is not None or flat_noise:
        if stochastic is not None and flat_noise:
            raise ValueError("stochastic= is a flowdiff.Stochastic: give eta/generator/step_noise inside it")
        spec = stochastic if stochastic is not None else Stochastic(0.0 if eta is None else eta, generator, step_noise)
        if not isinstance(spec, Stochastic):
            raise TypeError(f"stochastic must be a flowdiff.Stochastic, got {type(spec).__name__}")
        if adaptive_given:
            raise ValueError("eta= (stochastic generation) takes a fixed grid, not rtol=/atol=")
        if solver_options or max_nfe is not None:
            raise ValueError("eta= (stochastic generation) takes its own DDIM step: no solver_options= or max_nfe=")
        name = solver if isinstance(solver, str) else getattr(solver, "name", type(solver).__name__)
        request = _request(flow, solvers.get("euler"), name, {}, grid_spec, None, model_kwargs, callback,
                           check_finite)
        return procedure("eta", "generate").run(request, noise, spec)
    solver_obj, name, options = _resolve_solver(solver, solver_options, "generate")
    adaptive_spec = _adaptive_or_none(adaptive, rtol, atol, max_nfe, adaptive_options, grid_spec, sigmas)
    request = _request(flow, solver_obj, name, options, grid_spec, adaptive_spec, model_kwargs, callback,
                       check_finite)
    dtype = compute_dtype(noise)
    model_dtype = noise.dtype if noise.dtype != dtype else None
    if adaptive_spec is not None:
        return solve_adaptive_flow(request, noise, direction="generate", model_dtype=model_dtype,
                                   bound=divergence_limit(divergence, noise))
    sig = grid_spec.generation_sigmas(flow, solver_obj)
    form = formulation_for(solver_obj, "generate")
    eps = flow.field(request.model_kwargs, model_dtype)
    bound = divergence_limit(divergence, noise)

    def run(noise: Tensor, sig: np.ndarray) -> Result:
        xbar0 = noise.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)
        sol = solve_grid(eps, form, sig.tolist(), solver_obj, xbar0=xbar0,
                         eval_end=not (grid_spec.final_euler and sig[-1] == 0.0), callback=request.callback,
                         check_finite=check_finite, bound=bound)
        return Result(sol.xbar.to(noise.dtype), sol.stats, sig, solver_obj.name)

    if starts_at_infinity(sig):  # from pure noise (zero terminal SNR): a boundary step first (flowdiff.engine.terminal)
        return generate_from_infinity(flow, noise, sig, run, request.model_kwargs, model_dtype, check_finite)
    return run(noise, sig)


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
    adaptive_given = rtol is not None or atol is not None or adaptive is not None
    grid_spec = build_grid(grid, steps=steps, nfe=nfe, sigmas=None if adaptive_given else sigmas,
                           timesteps=timesteps, grid_options=grid_options, final_euler=True)
    if inversion is not None:
        spec = inversion if isinstance(inversion, Inversion) else None
        if spec is None:
            if not isinstance(inversion, str):
                raise TypeError(f"inversion must be a name or a flowdiff.Inversion, got {type(inversion).__name__}")
            spec = Inversion(inversion, inversion_options or {})
        elif inversion_options is not None:
            raise ValueError("inversion= is a flowdiff.Inversion: give its options inside it")
        plugin = procedure(spec.method, "encode")
        if adaptive_given:
            raise ValueError(f"inversion={spec.method!r} works on a fixed grid; drop rtol=/atol=")
        if solver_plugin(solver) is not None:
            raise ValueError(f"inversion={spec.method!r} inverts a decode solver; {solver!r} is an encode method "
                             "(use solver='euler' to invert DDIM decoding)")
        solver_obj, name, options = _resolve_solver(solver, solver_options, "encode")
        request = _request(flow, solver_obj, name, options, grid_spec, None, model_kwargs, callback, check_finite)
        res = plugin.run(request, images, spec)
        res.latent.set_origin(flow, model_kwargs)  # the latent records its model
        return res
    if inversion_options is not None:
        raise ValueError("inversion_options= given without inversion=")
    state_dtype = None if images.dtype == torch.float64 else exact_dtype(images)
    solver_obj, name, options = _resolve_solver(solver, solver_options, "encode", state_dtype=state_dtype)
    dtype = exact_dtype(images) if solver_obj.reversible else compute_dtype(images)
    model_dtype = images.dtype if images.dtype != dtype else None
    adaptive_spec = _adaptive_or_none(adaptive, rtol, atol, max_nfe, adaptive_options, grid_spec, sigmas)
    request = _request(flow, solver_obj, name, options, grid_spec, adaptive_spec, model_kwargs, callback,
                       check_finite)
    if adaptive_spec is not None:
        res = solve_adaptive_flow(request, images, direction="encode", model_dtype=model_dtype,
                                  bound=divergence_limit(divergence, images))
        res.latent.set_origin(flow, model_kwargs)
        return res
    sig = grid_spec.generation_sigmas(flow, solver_obj, final_euler=False)[::-1].copy()
    refuse_encode_to_infinity(sig)  # zero terminal SNR: see flowdiff.engine.terminal
    form = formulation_for(solver_obj, "encode")
    flow_for = getattr(solver_obj, "flow_for", None)  # a method that feeds the model its own way (ddim_inverse)
    run_flow = flow if flow_for is None else flow_for(flow, sig.tolist())
    sol = solve_grid(run_flow.field(request.model_kwargs, model_dtype), form, sig.tolist(), solver_obj,
                     xbar0=images.to(dtype), callback=request.callback, check_finite=check_finite,
                     bound=divergence_limit(divergence, images))
    x_T = sol.xbar / math.sqrt(1.0 + sig[-1] ** 2)
    if solver_obj.reversible:  # the latent keeps the exact state; the result's x_T is at the images' precision
        latent = Latent(x_T, sig, name, options, sol.state, dtype=images.dtype)
    else:
        x_T = x_T.to(images.dtype)
        latent = Latent(x_T, sig, name, options)
    return Result(x_T.to(images.dtype), sol.stats, sig, solver_obj.name, latent.set_origin(flow, model_kwargs))


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
    final_euler: bool = True,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    check_model: bool = True,
    divergence: float | None = DIVERGENCE_GENERATE,
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
    """
    flow = check_flow(flow)
    _checks.check_flags(final_euler=final_euler, check_finite=check_finite, check_model=check_model)
    _checks.check_model_kwargs(model_kwargs)
    if isinstance(latent, Latent):
        if check_model:  # a latent decodes only with the model that encoded it
            latent.check_model(flow, model_kwargs)
        return _decode_latent(flow, latent, solver=solver, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas,
                              timesteps=timesteps, model_kwargs=model_kwargs, solver_options=solver_options,
                              grid_options=grid_options, final_euler=final_euler, callback=callback,
                              check_finite=check_finite, divergence=divergence)
    return generate(flow, latent, solver="euler" if solver is None else solver, steps=steps, nfe=nfe,
                    grid="trailing" if grid is None else grid, sigmas=sigmas, timesteps=timesteps,
                    model_kwargs=model_kwargs, solver_options=solver_options, grid_options=grid_options,
                    final_euler=final_euler, callback=callback, check_finite=check_finite, divergence=divergence)


def _decode_latent(flow: ProbabilityFlow, latent: Latent, *, solver, steps, nfe, grid, sigmas, timesteps,
                   model_kwargs, solver_options, grid_options, final_euler, callback, check_finite,
                   divergence) -> Result:
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
        built = build_grid("trailing" if grid is None else grid,
                           steps=latent.steps if steps is None and nfe is None and timesteps is None else steps,
                           nfe=nfe, sigmas=None, timesteps=timesteps, grid_options=grid_options, final_euler=True)
        rebuilt = built.generation_sigmas(flow, encoder, final_euler=False)
        if not np.array_equal(rebuilt, sig):
            shown = ", ".join(f"{k}={v!r}" for k, v in (("grid", grid), ("steps", steps), ("nfe", nfe),
                                                        ("timesteps", timesteps)) if v is not None)
            raise ValueError(f"{shown} builds the σ grid {np.array2string(rebuilt, precision=4)}, not the one "
                             f"this latent was encoded on, {np.array2string(sig, precision=4)}")
    elif steps is not None and steps != latent.steps:
        raise ValueError(f"this latent was encoded with {latent.steps} steps; got steps={steps}")
    if latent.final_euler is not None and final_euler != latent.final_euler:  # a fixed-point latent
        raise ValueError(f"this latent inverts a decode with final_euler={latent.final_euler}; "
                         f"got final_euler={final_euler}")
    solver_obj = solvers.get(own, **options)
    request = _request(flow, solver_obj, own, options, Grid(sigmas=sig), None, model_kwargs, callback, check_finite)
    if latent.solver_state is not None:
        return decode_reversible(request, latent)
    dtype = compute_dtype(x)
    model_dtype = latent.dtype if latent.dtype != dtype else None
    xbar0 = x.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)
    form = formulation_for(solver_obj, "decode")
    eval_end = not (final_euler and own != "euler" and sig[-1] == 0.0)
    eps = flow.field(request.model_kwargs, model_dtype)
    sol = solve_grid(eps, form, sig.tolist(), solver_obj, xbar0=xbar0,
                     eval_end=eval_end, callback=request.callback, check_finite=check_finite,
                     bound=divergence_limit(divergence, x))
    return Result(sol.xbar.to(latent.dtype), sol.stats, sig, solver_obj.name)

