"""Generation, encoding and decoding: the probability-flow ODE solved across a σ grid.

One driver call serves every direction: generation runs the grid from σ_max down to 0,
encoding runs the same grid reversed (0 up to σ_max), decoding runs an encode's grid back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import Solver, Stats

from . import _checks
from .flow import ProbabilityFlow
from .grids import make_sigmas
from .latent import Latent
from .schedules import ArrayLike

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class StepState(NamedTuple):
    """What a flowdiff callback receives after each step: the step index, the σ reached,
    the VP-scaled state ``x`` = x̄/√(1+σ²) and ``xbar`` itself."""

    step: int
    sigma: float
    x: Tensor
    xbar: Tensor


@dataclass
class Result:
    """The outcome of generate/encode/decode: ``x`` (image, or latent x_T for encode), the
    statistics (``stats.nfe`` is the exact number of model evaluations), the σ grid used,
    and for encode the :class:`Latent` that :func:`decode` takes back."""

    x: Tensor
    stats: Stats
    sigmas: np.ndarray
    solver: str
    latent: Latent | None = None


def _check_flow(flow: object) -> ProbabilityFlow:
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    return flow


def _check_state(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float64, float32, float16, bfloat16), got {x.dtype}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"{name} must have a batch dimension first, shape (batch, ...), got {tuple(x.shape)}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _resolve_solver(solver: str | Solver, solver_options: Mapping[str, Any] | None) -> Solver:
    if solver_options is not None and not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must be a mapping, got {type(solver_options).__name__}")
    if isinstance(solver, str) and solver == "ddim_inverse":
        raise ValueError("solver 'ddim_inverse' is an encoding method only; use it with flowdiff.encode")
    return solvers.get(solver, **dict(solver_options or {}))


def _grid(flow: ProbabilityFlow, solver: Solver, *, steps: int | None, nfe: int | None, grid: str,
          sigmas: ArrayLike | None, timesteps: ArrayLike | None, final_euler: bool,
          grid_options: Mapping[str, Any] | None) -> np.ndarray:
    """The generation grid (decreasing to 0), with ``nfe=`` turned into a step count exactly."""
    if nfe is not None:
        if steps is not None:
            raise ValueError("give steps or nfe, not both")
        if sigmas is not None or timesteps is not None:
            raise ValueError("nfe= picks the step count of a named grid; it cannot be combined with sigmas= or "
                             "timesteps= (their length fixes the steps)")
        steps = solvers.steps_for_nfe(solver, nfe, eval_end=not final_euler)
    elif steps is None and sigmas is None and timesteps is None:
        raise ValueError("give one of steps=, nfe=, sigmas= or timesteps= (or rtol=/atol= for an adaptive solve)")
    return make_sigmas(flow.schedule, grid, steps, sigmas=sigmas, timesteps=timesteps, **dict(grid_options or {}))


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in _LOW_PRECISION else x.dtype


#: reversible Heun's grid for float32 (and lower) images integrated in float64: states are multiples of 2⁻⁴⁰ (below
#: float32's resolution by 2¹⁶ at |x| = 1, exact for |x| < 2¹³), so the decode recomputes bit-identical model inputs
EXACT_QUANTUM = 2.0**-40


def _exact_dtype(x: Tensor) -> torch.dtype:
    """The state dtype of a reversible encode: float64 wherever the device has it (not on MPS).

    A reversible solver's inverse steps amplify the rounding of the state they start from by
    the model's Lipschitz constant, step after step; in float64 that stays far below float32's
    resolution, so float32 images come back to their last bit while the model runs in float32.
    """
    return torch.float32 if x.device.type == "mps" else torch.float64


def _run(flow: ProbabilityFlow, xbar0: Tensor, grid: np.ndarray, solver: Solver, *, model_kwargs, model_dtype,
         final_euler: bool, callback, check_finite: bool, state: Any = None) -> solvers.Solution:
    f = flow.field(model_kwargs, model_dtype)
    wrapped = None
    if callback is not None:
        def wrapped(info: solvers.StepInfo) -> None:
            s = info.t1
            callback(StepState(info.step, s, info.y / math.sqrt(1.0 + s * s), info.y))
    if getattr(solver, "variables", None) == "data":  # a change of variables (flowdiff.formulations)
        from .formulations import solve_data

        return solve_data(f, xbar0, grid.tolist(), solver, callback=wrapped, check_finite=check_finite)
    eval_end = not (final_euler and grid[-1] == 0.0)
    if solver.reversible:  # exact encoding runs in the VP-scaled state (see flowdiff.inversion)
        from .inversion import solve_vp

        return solve_vp(f, xbar0, grid.tolist(), solver, state=state, eval_end=eval_end, callback=wrapped,
                        check_finite=check_finite)
    return solvers.solve(f, xbar0, grid.tolist(), solver, state=state, eval_end=eval_end, callback=wrapped,
                         check_finite=check_finite, time_name="σ")


def generate(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    solver: str | Solver = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str = "trailing",
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
    generator: torch.Generator | None = None,
    step_noise: Tensor | None = None,
) -> Result:
    """Generate images from DDIM-scale noise x_T ~ N(0, I) by solving from the grid's first σ to 0.

    Fixed grids: ``steps`` on a named ``grid`` (``trailing``, ``leading``, ``linear``,
    ``quadratic``, ``karras``, ``logsnr``), explicit ``sigmas`` (decreasing, ending at 0) or
    ``timesteps``. ``nfe=N`` is the fixed-budget form: the step count is chosen so that
    ``stats.nfe`` is the largest count ≤ N that the solver's steps allow (exactly N for
    one-evaluation-per-step solvers; Heun with its Euler step into σ = 0 spends odd counts).
    With ``rtol``/``atol`` the solve is adaptive (an adaptive solver is required; ``max_nfe``
    caps its evaluations with an error, ``nfe=`` is refused; ``adaptive_options`` holds the
    controller knobs of :func:`flowdiff.adaptive.solve_adaptive_flow`).

    ``final_euler`` (default True): a solver that would evaluate the model at σ = 0 takes
    its last step as Euler instead, as EDM and k-diffusion do. The state keeps the noise's
    dtype; float16/bfloat16 noise is integrated in float32 with the model fed in the
    noise's dtype, and the image returned in it.

    ``eta`` (a number in [0, 1], or ``"sigma_hat"``) selects the DDIM paper's stochastic
    generative process instead of the ODE (see :mod:`flowdiff.stochastic`), with randomness
    from ``generator`` or given per step in ``step_noise``.
    """
    flow = _check_flow(flow)
    noise = _check_state(noise, "noise")
    _checks.check_flags(final_euler=final_euler, check_finite=check_finite)  # issue 13
    _checks.check_model_kwargs(model_kwargs)
    if eta is not None or generator is not None or step_noise is not None:
        from .stochastic import generate_stochastic

        if rtol is not None or atol is not None:
            raise ValueError("eta= (stochastic generation) takes a fixed grid, not rtol=/atol=")
        if solver_options or max_nfe is not None:
            raise ValueError("eta= (stochastic generation) takes its own DDIM step: no solver_options= or max_nfe=")
        return generate_stochastic(flow, noise, eta=0.0 if eta is None else eta, generator=generator,
                                   step_noise=step_noise, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas,
                                   timesteps=timesteps, model_kwargs=model_kwargs, grid_options=grid_options,
                                   callback=callback, check_finite=check_finite, solver=solver)
    solver_obj = _resolve_solver(solver, solver_options)
    dtype = _compute_dtype(noise)
    model_dtype = noise.dtype if noise.dtype != dtype else None
    if rtol is not None or atol is not None:
        from .adaptive import solve_adaptive_flow

        if steps is not None or nfe is not None:
            raise ValueError("an adaptive solve (rtol=/atol=) chooses its own steps; drop steps=/nfe= "
                             "(use max_nfe= to cap the evaluations)")
        return solve_adaptive_flow(flow, noise, solver_obj, direction="generate", rtol=rtol, atol=atol,
                                   max_nfe=max_nfe, sigmas=sigmas, model_kwargs=model_kwargs,
                                   model_dtype=model_dtype, callback=callback, check_finite=check_finite,
                                   **dict(adaptive_options or {}))
    if max_nfe is not None:
        raise ValueError("max_nfe= applies to adaptive solves (rtol=/atol=); for a fixed budget use nfe=")
    if adaptive_options is not None:
        raise ValueError("adaptive_options= apply to adaptive solves (rtol=/atol=)")
    sig = _grid(flow, solver_obj, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas, timesteps=timesteps,
                final_euler=final_euler, grid_options=grid_options)
    xbar0 = noise.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)
    sol = _run(flow, xbar0, sig, solver_obj, model_kwargs=model_kwargs, model_dtype=model_dtype,
               final_euler=final_euler, callback=callback, check_finite=check_finite)
    return Result(sol.y.to(noise.dtype), sol.stats, sig, solver_obj.name)


def encode(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str | Solver = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str = "trailing",
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
    inversion: str | None = None,
    inversion_options: Mapping[str, Any] | None = None,
    eta: float | str | None = None,
) -> Result:
    """Encode images (model data scale, σ = 0) to DDIM-scale latents x_T along the reversed grid.

    The grid arguments mean what they mean for :func:`generate`; the encode runs that grid
    backwards (0 → σ_max), so that decoding with the same arguments retraces it.
    ``solver="ddim_inverse"`` reproduces diffusers' DDIMInverseScheduler (see
    :mod:`flowdiff.ddim_inverse` for how it differs from the Euler encode). The result's
    ``latent`` carries the grid and solver for :func:`decode`.

    ``inversion="fixed_point"`` encodes so that the *plain* solver's decode reproduces the
    images (see :mod:`flowdiff.fixed_point`). ``eta`` other than 0 is refused: the stochastic
    process has no inverse.
    """
    flow = _check_flow(flow)
    images = _check_state(images, "images")
    _checks.check_flags(check_finite=check_finite)  # issue 13
    _checks.check_model_kwargs(model_kwargs)
    _checks.check_data_range(images, "images")
    if eta is not None and eta != 0:
        raise ValueError(f"encode takes no eta={eta!r}: the stochastic generative process (eta > 0 or "
                         "'sigma_hat') injects fresh noise at every step and has no inverse; encoding is "
                         "deterministic (eta=0, the ODE)")
    if inversion is not None:
        from .fixed_point import encode_fixed_point

        if inversion != "fixed_point":
            raise ValueError(f"unknown inversion {inversion!r}; accepted: 'fixed_point' (or None)")
        if rtol is not None or atol is not None:
            raise ValueError("inversion='fixed_point' works on a fixed grid; drop rtol=/atol=")
        res = encode_fixed_point(flow, images, solver=solver, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas,
                                 timesteps=timesteps, model_kwargs=model_kwargs, solver_options=solver_options,
                                 grid_options=grid_options, callback=callback, check_finite=check_finite,
                                 **dict(inversion_options or {}))
        res.latent.set_origin(flow, model_kwargs)  # issue 13: the latent records its model
        return res
    elif inversion_options is not None:
        raise ValueError("inversion_options= given without inversion=")
    options = dict(solver_options or {})
    name = solver if isinstance(solver, str) else solver.name
    if name == "ddim_inverse":
        from .ddim_inverse import DDIMInverse

        if options:
            raise TypeError(f"solver 'ddim_inverse' takes no options, got {sorted(options)}")
        solver_obj: Solver = DDIMInverse()
    else:
        if (solver == "reversible_heun" and images.dtype != torch.float64
                and _exact_dtype(images) == torch.float64):
            options.setdefault("quantum", EXACT_QUANTUM)  # bit-exact inverse (see solvers.ReversibleHeun)
        solver_obj = _resolve_solver(solver, options)
    dtype = _exact_dtype(images) if solver_obj.reversible else _compute_dtype(images)
    model_dtype = images.dtype if images.dtype != dtype else None
    if rtol is not None or atol is not None:
        from .adaptive import solve_adaptive_flow

        if steps is not None or nfe is not None:
            raise ValueError("an adaptive solve (rtol=/atol=) chooses its own steps; drop steps=/nfe=")
        res = solve_adaptive_flow(flow, images, solver_obj, direction="encode", rtol=rtol, atol=atol,
                                  max_nfe=max_nfe, sigmas=sigmas, model_kwargs=model_kwargs,
                                  model_dtype=model_dtype, callback=callback, check_finite=check_finite,
                                  **dict(adaptive_options or {}))
        # the latent records the solver's options, so that its decode runs the same method
        res.latent = dataclasses.replace(res.latent, solver_options=options).set_origin(flow, model_kwargs)
        return res
    if max_nfe is not None:
        raise ValueError("max_nfe= applies to adaptive solves (rtol=/atol=); for a fixed budget use nfe=")
    if adaptive_options is not None:
        raise ValueError("adaptive_options= apply to adaptive solves (rtol=/atol=)")
    sig = _grid(flow, solver_obj, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas, timesteps=timesteps,
                final_euler=False, grid_options=grid_options)[::-1].copy()
    sol = _run(flow, images.to(dtype), sig, solver_obj, model_kwargs=model_kwargs, model_dtype=model_dtype,
               final_euler=False, callback=callback, check_finite=check_finite)
    x_T = sol.y / math.sqrt(1.0 + sig[-1] ** 2)
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
    grid: str | None = None,
    sigmas: ArrayLike | None = None,
    timesteps: ArrayLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    final_euler: bool = True,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    check_model: bool = True,
) -> Result:
    """Decode a latent back to an image.

    A :class:`Latent` from :func:`encode` carries its grid and solver: the decode retraces
    that grid with that solver (a ``ddim_inverse`` latent decodes with Euler, i.e. DDIM), and
    grid or solver arguments that disagree with it are an error. A plain tensor decodes like
    :func:`generate` with the grid arguments given (defaults: Euler on the trailing grid).
    A latent that records its model (``latent.fingerprint``) refuses another flow or other
    ``model_kwargs`` with a ValueError naming both, unless ``check_model=False``.
    """
    flow = _check_flow(flow)
    _checks.check_flags(final_euler=final_euler, check_finite=check_finite, check_model=check_model)  # issue 13
    _checks.check_model_kwargs(model_kwargs)
    if isinstance(latent, Latent):
        if check_model:  # issue 13: a latent decodes only with the model that encoded it
            latent.check_model(flow, model_kwargs)
        return _decode_latent(flow, latent, solver=solver, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas,
                              timesteps=timesteps, model_kwargs=model_kwargs, solver_options=solver_options,
                              final_euler=final_euler, callback=callback, check_finite=check_finite)
    return generate(flow, latent, solver="euler" if solver is None else solver, steps=steps, nfe=nfe,
                    grid="trailing" if grid is None else grid, sigmas=sigmas, timesteps=timesteps,
                    model_kwargs=model_kwargs, solver_options=solver_options, grid_options=grid_options,
                    final_euler=final_euler, callback=callback, check_finite=check_finite)


def _decode_latent(flow: ProbabilityFlow, latent: Latent, *, solver, steps, nfe, grid, sigmas, timesteps,
                   model_kwargs, solver_options, final_euler, callback, check_finite) -> Result:
    x = _check_state(latent.x, "latent.x")
    own = "euler" if latent.solver == "ddim_inverse" else latent.solver
    if solver is not None:
        name = solver if isinstance(solver, str) else solver.name
        if name != own:
            raise ValueError(f"this latent was encoded with solver {latent.solver!r} and decodes with {own!r}; "
                             f"got solver={name!r} (pass latent.x to decode a plain tensor another way)")
    if steps is not None and steps != latent.steps:
        raise ValueError(f"this latent was encoded with {latent.steps} steps; got steps={steps}")
    if nfe is not None or grid is not None or timesteps is not None:
        raise ValueError("a Latent carries its own grid; drop nfe=/grid=/timesteps= "
                         "(or pass latent.x to decode a plain tensor on another grid)")
    sig = np.asarray(latent.sigmas, dtype=np.float64)[::-1].copy()
    if sigmas is not None and not np.array_equal(np.asarray(sigmas, dtype=np.float64), sig):
        raise ValueError("sigmas= differs from the grid this latent was encoded on")
    options = dict(latent.solver_options)
    if solver_options is not None and dict(solver_options) != options:
        raise ValueError(f"this latent was encoded with solver_options={options}; got {dict(solver_options)}")
    if latent.final_euler is not None and final_euler != latent.final_euler:  # a fixed-point latent
        raise ValueError(f"this latent inverts a decode with final_euler={latent.final_euler}; "
                         f"got final_euler={final_euler}")
    solver_obj = solvers.get(own, **options)
    dtype = _compute_dtype(x)
    model_dtype = latent.dtype if latent.dtype != dtype else None
    xbar0 = x.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)
    if latent.solver_state is not None:
        from .inversion import decode_reversible

        return decode_reversible(flow, latent, xbar0, sig, solver_obj, model_kwargs=model_kwargs,
                                 model_dtype=model_dtype, callback=callback, check_finite=check_finite)
    sol = _run(flow, xbar0, sig, solver_obj, model_kwargs=model_kwargs, model_dtype=model_dtype,
               final_euler=final_euler and own != "euler", callback=callback, check_finite=check_finite)
    return Result(sol.y.to(latent.dtype), sol.stats, sig, solver_obj.name)
