"""Exact encoding: decode a reversible solver's latent by its inverse steps, or invert a plain solver by fixed point.

Encoding with an explicit solver and decoding with the same solver is not the identity: each
direction makes its own O(h^p) error (the DDIM paper's Table 2 measures it). Two ways to make
``decode(encode(x)) == x`` up to floating-point rounding:

* **Reversible solvers** (:mod:`solvers` ``reversible_heun``, ``reversible``): the encode
  carries the solver's second variable in ``Latent.solver_state``, and :func:`decode_reversible`
  runs the exact algebraic inverse of every encode step (:func:`solvers.unsolve`). No
  iteration, no tolerance; the decode costs one (reversible Heun) or two (wrapped Euler)
  evaluations a step.

  They are integrated in the VP-scaled state x = x̄/√(1+σ²) with time τ = log(1 + σ)
  (:func:`vp_field`, :func:`solve_vp`), not in (σ, x̄). The variables describe the same ODE,
  but the rounding of the algebraic inverse is not the same: x̄ grows to σ_max·|noise| (157
  for DDPM's linear schedule, 2·10⁴ for the cosine one), and a reversible method's inverse
  multiplies the rounding of its second variable by about h·L (step times the field's
  Lipschitz constant at the step's low end), which for coarse σ steps is of order σ_max.
  Measured on a closed-form mixture: 10⁻³ max error in float32 and 10⁻⁷ in float64 (cosine)
  in (σ, x̄); in (τ, x), where |x| = O(1), the field is nearly zero at large σ and steps are
  relative, the round trip is at rounding level for every schedule, grid and step count
  (≈10⁻¹⁵ in float64, ≈10⁻⁶ in float32).

* **Fixed-point inversion** of any explicit solver (:func:`encode_fixed_point`): per encode
  step σ_a → σ_b, find the noisier state x̄_b whose *plain decode step* lands on x̄_a,

      x̄_b + Ψ_{σ_b→σ_a}(x̄_b) = x̄_a,   i.e.  x̄_b = g(x̄_b) := x̄_a − Ψ_{σ_b→σ_a}(x̄_b),

  with Ψ the solver's increment. It is solved by Anderson-accelerated fixed-point iteration
  (Walker and Ni, "Anderson Acceleration for Fixed-Point Iterations", SIAM J. Numer. Anal.
  2011) to a tolerance, from the explicit Euler encode step as first guess (the approach of
  exact-inversion methods such as Hong et al., "On Exact Inversion of DPM-Solvers", CVPR 2024,
  here with Anderson mixing instead of gradient descent). The latent is a plain tensor: the
  standard decode with the same solver and grid reproduces the image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import ReversibleState, SolveError, Solver, Stats

from .flow import ProbabilityFlow
from .latent import Latent
from .sampling import Result, StepState, _check_flow, _check_state, _compute_dtype, _grid, _resolve_solver
from .schedules import ArrayLike


def vp_field(eps: Callable[..., Tensor]) -> Callable[[float, Tensor], Tensor]:
    """The probability-flow ODE in the VP-scaled state x = x̄/√(1+σ²), time σ.

    With c = √(1+σ²): dx/dσ = ε/c − σx̄/c³ = (ε(x·c, σ) − σx/c)/c. No division by σ (exact at
    σ = 0, where x = x̄), |x| stays O(1) at every σ, and at large σ, where ε ≈ x̄/σ, the field
    is nearly zero.
    """

    def f(sigma: float, x: Tensor) -> Tensor:
        c = math.sqrt(1.0 + sigma * sigma)
        return (eps(sigma, x * c) - x * (sigma / c)) / c

    return f


class _LogTime:
    """Time τ = log(1 + σ) for the VP field: dx/dτ = (1 + σ)·dx/dσ.

    Steps are additive in σ below 1 and relative above (σ = 0 is τ = 0, exactly). At grid
    points the model sees the grid's own σ (looked up, not recomputed through exp), so that
    encode and decode evaluate it at identical times.
    """

    def __init__(self, eps: Callable[..., Tensor], sigmas: list[float]) -> None:
        self.taus = [math.log1p(s) for s in sigmas]
        self.sigma_of = dict(zip(self.taus, sigmas))
        self.vp = vp_field(eps)

    def sigma(self, tau: float) -> float:
        s = self.sigma_of.get(tau)
        return max(math.expm1(tau), 0.0) if s is None else s

    def __call__(self, tau: float, x: Tensor) -> Tensor:
        s = self.sigma(tau)
        return self.vp(s, x) * (1.0 + s)

    def state_in_tau(self, state: Any) -> Any:
        return state._replace(t=math.log1p(state.t)) if isinstance(state, ReversibleState) else state

    def state_in_sigma(self, state: Any) -> Any:
        return state._replace(t=self.sigma(state.t)) if isinstance(state, ReversibleState) else state


def solve_vp(eps: Callable[..., Tensor], xbar0: Tensor, sigmas: list[float], solver: Solver, *, state: Any = None,
             eval_end: bool = True, callback: Callable[[solvers.StepInfo], None] | None = None,
             check_finite: bool = True) -> solvers.Solution:
    """Run ``solver`` across the σ grid in the variables (τ = log(1+σ), x = x̄/√(1+σ²)); ``y`` comes back as x̄.

    ``state`` and the returned ``Solution.state`` are a reversible solver's second variable in
    x, timed in σ (what a :class:`Latent` stores); the callback sees σ and x̄ like any solve.
    """
    problem = _LogTime(eps, sigmas)
    c0 = math.sqrt(1.0 + sigmas[0] ** 2)
    wrapped = None
    if callback is not None:
        def wrapped(info: solvers.StepInfo) -> None:
            s0, s1 = problem.sigma(info.t0), problem.sigma(info.t1)
            callback(solvers.StepInfo(info.step, s0, s1, info.y * math.sqrt(1.0 + s1 * s1)))
    sol = solvers.solve(problem, xbar0 / c0, problem.taus, solver, state=problem.state_in_tau(state),
                        eval_end=eval_end, callback=wrapped, check_finite=check_finite, time_name="log(1+σ)")
    return solvers.Solution(sol.y * math.sqrt(1.0 + sigmas[-1] ** 2), sol.stats, problem.state_in_sigma(sol.state),
                            list(sigmas))


def decode_reversible(
    flow: ProbabilityFlow,
    latent: Latent,
    xbar0: Tensor,
    sig: np.ndarray,
    solver_obj: Solver,
    *,
    model_kwargs: Mapping[str, Any] | None,
    model_dtype: torch.dtype | None,
    callback: Callable[[StepState], None] | None,
    check_finite: bool,
) -> Result:
    """Decode a reversible solver's latent by running the encode's exact inverse steps.

    ``sig`` is the decode grid (the encode grid reversed). The inverse runs in the VP
    variables the encode used (:func:`solve_vp`) and starts from the latent's x_T itself
    (``xbar0`` = x_T·√(1+σ_max²) only fixes the dtype and device), with the second variable
    from ``latent.solver_state``. It is :func:`solvers.unsolve` along the encode grid, so
    ``final_euler`` does not apply: every step is the inverse of the encode step it undoes.
    """
    _check_flow(flow)
    if not solver_obj.reversible:
        raise TypeError(f"decode_reversible needs a reversible solver, got {solver_obj.name!r}")
    state = latent.solver_state
    if not isinstance(state, ReversibleState):
        raise ValueError(f"this latent carries no reversible solver state (solver {latent.solver!r}); "
                         "decode it with flowdiff.decode")
    enc = np.asarray(latent.sigmas, dtype=np.float64)
    if not np.array_equal(np.asarray(sig, dtype=np.float64)[::-1], enc):
        raise ValueError("the decode grid is not the latent's encode grid reversed")
    cast = {"dtype": xbar0.dtype, "device": xbar0.device}
    state = ReversibleState(state.t, state.z.to(**cast), None if state.k is None else state.k.to(**cast))
    problem = _LogTime(flow.field(model_kwargs, model_dtype), enc.tolist())
    wrapped = None
    if callback is not None:
        def wrapped(info: solvers.StepInfo) -> None:
            s = problem.sigma(info.t1)
            callback(StepState(info.step, s, info.y, info.y * math.sqrt(1.0 + s * s)))
    sol = solvers.unsolve(problem, latent.x.to(**cast), problem.taus, solver_obj, state=problem.state_in_tau(state),
                          callback=wrapped, check_finite=check_finite, time_name="log(1+σ)")
    return Result(sol.y.to(latent.x.dtype), sol.stats, np.asarray(sig, dtype=np.float64), solver_obj.name)


class _RecordingField:
    """Counts evaluations and keeps the first one made at (t, y) for a given y object (reused as a guess)."""

    def __init__(self, f: Callable[..., Tensor]) -> None:
        self.f = f
        self.nfe = 0
        self.watch: tuple[float, Tensor] | None = None
        self.seen: Tensor | None = None

    def __call__(self, t: float, y: Tensor, **kwargs: Any) -> Tensor:
        self.nfe += 1
        k = self.f(t, y, **kwargs)
        if self.watch is not None and self.seen is None and t == self.watch[0] and y is self.watch[1]:
            self.seen = k
        return k


def _default_tol(dtype: torch.dtype) -> float:
    return 32.0 * torch.finfo(dtype).eps


def _check_options(tol: float | None, max_iter: int, anderson: int, final_euler: bool) -> None:
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol > 0
                            or not math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0 (the residual per element, relative to 1 + |x̄|), "
                         f"got {tol!r}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if isinstance(anderson, bool) or not isinstance(anderson, int) or anderson < 0:
        raise ValueError(f"anderson must be an int >= 0 (the history depth; 0 is plain fixed-point iteration), "
                         f"got {anderson!r}")
    if not isinstance(final_euler, bool):
        raise TypeError(f"final_euler must be a bool, got {type(final_euler).__name__}")


def _anderson_mix(g: Tensor, r: Tensor, dg: list[Tensor], dr: list[Tensor]) -> Tensor:
    """Anderson type-II update per sample: x⁺ = g − ΔG γ with γ = argmin ‖r − ΔR γ‖ (float64 normal equations)."""
    b = r.shape[0]
    dR = torch.stack([d.reshape(b, -1) for d in dr], dim=2).double()
    dG = torch.stack([d.reshape(b, -1) for d in dg], dim=2).double()
    A = dR.transpose(1, 2) @ dR
    rhs = dR.transpose(1, 2) @ r.reshape(b, -1, 1).double()
    scale = torch.diagonal(A, dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    A = A + torch.eye(A.shape[1], dtype=A.dtype, device=A.device) * (1e-13 * scale)[:, None, None]
    gamma = torch.linalg.solve(A, rhs)
    return (g.reshape(b, -1).double() - (dG @ gamma).squeeze(2)).reshape(g.shape).to(g.dtype)


def encode_fixed_point(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str | Solver = "euler",
    steps: int | None = None,
    nfe: int | None = None,
    grid: str = "trailing",
    sigmas: ArrayLike | None = None,
    timesteps: ArrayLike | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    solver_options: Mapping[str, Any] | None = None,
    grid_options: Mapping[str, Any] | None = None,
    callback: Callable[[StepState], None] | None = None,
    check_finite: bool = True,
    tol: float | None = None,
    max_iter: int = 100,
    anderson: int = 3,
    final_euler: bool = True,
) -> Result:
    """Encode so that the *plain* decode with ``solver`` on the same grid reproduces ``images``.

    Per encode step σ_a → σ_b the noisier state solves x̄_b + Ψ_{σ_b→σ_a}(x̄_b) = x̄_a (Ψ the
    decode step's increment; with ``final_euler`` the decode's last step into σ = 0 is Euler,
    as :func:`flowdiff.decode` takes it by default). Anderson acceleration of depth
    ``anderson`` (0: plain fixed-point iteration) runs until every element's residual
    |x̄_b + Ψ(x̄_b) − x̄_a| ≤ ``tol``·(1 + |x̄_a|) (default 32 machine epsilons of the state's
    dtype), at most ``max_iter`` iterations a step, else a :class:`solvers.SolveError` names
    the step, σ and residual. ``nfe=`` picks the step count whose plain *decode* fits that
    budget. The statistics count every model evaluation; ``stats.extra`` holds
    ``iterations`` (total), ``iterations_per_step``, ``residuals`` (per step, the achieved
    max) and ``tol``.
    """
    flow = _check_flow(flow)
    images = _check_state(images, "images")
    _check_options(tol, max_iter, anderson, final_euler)
    if isinstance(solver, str) and solver == "ddim_inverse":
        raise ValueError("inversion='fixed_point' inverts a decode solver; 'ddim_inverse' is an encode method "
                         "(use solver='euler' to invert DDIM decoding)")
    solver_obj = _resolve_solver(solver, solver_options)
    if solver_obj.reversible:
        raise ValueError(f"solver {solver_obj.name!r} is reversible: encode with it directly (no inversion=) and "
                         "its latent decodes exactly by the algebraic inverse")
    if solver_obj.multistep:
        raise ValueError(f"fixed-point inversion needs a one-step solver; {solver_obj.name!r} is multistep")
    dtype = _compute_dtype(images)
    model_dtype = images.dtype if images.dtype != dtype else None
    tol = _default_tol(dtype) if tol is None else float(tol)
    gen = _grid(flow, solver_obj, steps=steps, nfe=nfe, grid=grid, sigmas=sigmas, timesteps=timesteps,
                final_euler=final_euler, grid_options=grid_options)
    enc = gen[::-1].copy()
    euler = solvers.get("euler")
    last_euler = final_euler and solver_obj.evaluates_end and enc[0] == 0.0
    field = _RecordingField(flow.field(model_kwargs, model_dtype))
    stats = Stats()
    iters: list[int] = []
    residuals: list[float] = []
    x_a = images.to(dtype)
    k_a: Tensor | None = None  # f(σ_a, ≈x̄_a), reused for the Euler guess
    n_steps = len(enc) - 1
    for n in range(n_steps):
        s_a, s_b = float(enc[n]), float(enc[n + 1])
        method = euler if (last_euler and n == 0) else solver_obj
        if k_a is None:
            k_a = field(s_a, x_a)
        x = x_a.add(k_a, alpha=s_b - s_a)
        scale = x_a.abs().add_(1.0)
        dg: list[Tensor] = []
        dr: list[Tensor] = []
        g_prev = r_prev = None
        converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        worst = math.inf
        for it in range(1, max_iter + 1):
            field.watch, field.seen = (s_b, x), None
            try:
                g = x_a - (method.step(field, s_b, s_a, x, None).y - x)
            except Exception as err:
                stats.nfe = field.nfe
                raise SolveError(f"fixed-point inversion, step {n} (σ {s_a:.6g} -> {s_b:.6g}), iteration {it}: "
                                 f"{err}", step=n, t0=s_a, t1=s_b, stats=stats) from err
            k_seen = field.seen
            r = g - x
            per_sample = (r.abs() / scale).reshape(r.shape[0], -1).amax(dim=1)
            if check_finite and not bool(torch.isfinite(per_sample).all()):
                stats.nfe = field.nfe
                raise SolveError(f"fixed-point inversion, step {n} (σ {s_a:.6g} -> {s_b:.6g}), iteration {it}: the "
                                 "residual is not finite (the model returned NaN/inf or the iteration diverged)",
                                 step=n, t0=s_a, t1=s_b, stats=stats)
            newly = per_sample <= tol
            worst = float(per_sample.amax())
            if bool((converged | newly).all()):
                break
            converged = converged | newly
            if anderson > 0 and g_prev is not None:
                dg.append(g - g_prev)
                dr.append(r - r_prev)
                if len(dg) > anderson:
                    dg.pop(0)
                    dr.pop(0)
                x_new = _anderson_mix(g, r, dg, dr)
            else:
                x_new = g
            g_prev, r_prev = g, r
            x = torch.where(_bcast(converged, x), x, x_new)
        else:
            stats.nfe = field.nfe
            stats.extra.update(iterations=sum(iters) + max_iter, tol=tol)
            raise SolveError(f"fixed-point inversion did not converge at step {n} (σ {s_a:.6g} -> {s_b:.6g}): "
                             f"residual {worst:.3g} > tol {tol:.3g} after max_iter={max_iter} iterations; "
                             "use more steps, a larger tol, a deeper anderson= history or a larger max_iter",
                             step=n, t0=s_a, t1=s_b, stats=stats)
        # every sample's residual in ``worst`` was measured at the accepted x̄_b itself (converged
        # samples are frozen), and k_seen = f(σ_b, x̄_b) seeds the next step's Euler guess
        iters.append(it)
        residuals.append(worst)
        x_a, k_a = x, k_seen
        if callback is not None:
            callback(StepState(n, s_b, x / math.sqrt(1.0 + s_b * s_b), x))
    stats.nfe, stats.steps, stats.accepted = field.nfe, n_steps, n_steps
    stats.extra.update(iterations=sum(iters), iterations_per_step=iters, residuals=residuals, tol=tol)
    x_T = (x_a / math.sqrt(1.0 + enc[-1] ** 2)).to(images.dtype)
    name = solver if isinstance(solver, str) else solver_obj.name
    latent = Latent(x_T, enc, name, dict(solver_options or {}), None, "fixed_point", final_euler)
    return Result(x_T, stats, enc, solver_obj.name, latent)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))

