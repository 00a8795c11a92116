"""Fixed-point inversion: a plain latent that the standard decode with a given solver turns back into the image.

Per encode step σ_a → σ_b (a grid step of the decode, run backwards) the noisier state solves

    F(x̄_b) = x̄_b + Ψ_{σ_b→σ_a}(x̄_b) − x̄_a = 0,

Ψ the decode step's increment, so that the *plain* decode step from x̄_b lands on x̄_a. The
latent is a plain tensor: the standard decode (DDIM, Heun, …) with the same grid reproduces
the image. Three root finders (``method=``):

* ``"newton"``: Jacobian-free Newton–Krylov (:func:`solvers.newton_krylov`), with
  forward-difference Jacobian–vector products (each one model evaluation, counted), a
  backtracking line search and restarts from further guesses. It is needed where the
  decode step is far from the identity: the last DDIM step into σ = 0 is the denoiser
  x̂₀ = D(x̄₁, σ₁), and for a trained network its Jacobian is nearly singular (on the shipped
  digits model, singular values 1.3 … 0.004) and the fixed-point map x̄ ↦ x̄_a − Ψ(x̄) has
  spectral radius above 1, so fixed-point and Anderson iterations diverge there.
* ``"anderson"``: Anderson-accelerated fixed-point iteration (Walker and Ni, SIAM J. Numer.
  Anal. 2011) x̄ ← x̄_a − Ψ(x̄), one decode step per iteration: cheap where the step is a
  contraction (closed-form models, high σ), the approach of exact-inversion methods such as
  Hong et al., "On Exact Inversion of DPM-Solvers" (CVPR 2024), with mixing instead of
  gradient descent.
* ``"hybrid"`` (default): Anderson for at most :data:`HYBRID_ANDERSON_ITER` iterations, then
  Newton–Krylov for the samples still off ``tol``, starting from Anderson's best iterate. On
  the digits model it needs about half Newton's evaluations on the contracting steps and
  finds more preimages on the first one (Anderson's best is a better start than the Euler
  guess).

Neither can promise a root: the decode step need not be onto (an image outside the model's
reach has no preimage) nor one-to-one (the residual can have local minima). A sample that
misses ``tol`` is an error naming the step, σ and residual; with ``on_failure="keep"`` it
keeps its least-residual iterate and is listed in ``stats.extra["unconverged"]`` instead, with
every sample's largest residual in ``stats.extra["sample_residuals"]``. On the shipped digits
model the misses look like images outside the last step's range: for held-out digits that miss at
10 steps, a Levenberg–Marquardt search with the exact Jacobian stalls where the Jacobian's
smallest singular value is ~1e-9, and continuation from σ₁ ≈ 0 meets that fold at σ₁ ≈ 0.01–0.02.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

import solvers
from solvers import Derivative, Solver, StepFailure, StepResult

from ..engine.flow import from_model_scale
from ..engine.formulations import Sigma, formulation_for
from ..engine.grids import reversed_grid
from ..engine.latent import Latent
from ..engine.loop import solve_grid
from ..engine.options import Inversion, Request, compute_dtype, idle_final_euler
from ..engine.plugins import Plugin, register_plugin
from ..engine.results import Result
from ..engine.terminal import refuse_encode_to_infinity

METHODS = ("hybrid", "newton", "anderson")
#: Anderson iterations a step before ``method="hybrid"`` hands the samples still off tol to Newton–Krylov
HYBRID_ANDERSON_ITER = 20
ON_FAILURE = ("raise", "keep")
#: The residual's rounding floor in machine epsilons at the state's scale: x̄_b + Δσ·ε(x̄_b) − x̄_a rounds twice at
#: the size of x̄_b (the product and the sum, half an ulp each). Measured (a float64 root cast to float32, the residual
#: then computed in float32, Euler steps of the 8-centre mixture at 2-10 steps and of N(0, I) in one step to σ_max;
#: benchmarks/fixed_point_rounding_floor.py): 0.28-0.66 epsilons of max|x̄_b|.
ROUNDING_EPS = 1.0
#: The option each single method has no use for, and why (``"hybrid"`` uses both).
UNUSED_BY = {"newton": ("anderson", "Newton–Krylov runs no Anderson mixing"),
             "anderson": ("krylov_dim", "Anderson mixing runs no GMRES")}


class _Watch:
    """Keeps the first evaluation made at (t, y) for a watched y object (reused as the next step's guess)."""

    def __init__(self, f: Callable[[float, Tensor], Tensor]) -> None:
        self.f = f
        self.calls = 0
        self.watch: tuple[float, Tensor] | None = None
        self.seen: Tensor | None = None

    def __call__(self, t: float, y: Tensor) -> Tensor:
        self.calls += 1
        k = self.f(t, y)
        if self.watch is not None and self.seen is None and t == self.watch[0] and y is self.watch[1]:
            self.seen = k
        return k


def _default_tol(state_dtype: torch.dtype, model_dtype: torch.dtype) -> float:
    """32 machine epsilons of the state, but no less than 4 of the model's input (float16 resolves no better)."""
    return max(32.0 * torch.finfo(state_dtype).eps, 4.0 * torch.finfo(model_dtype).eps)


def _check_int(name: str, value: object, low: int, what: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{what}, got {value!r}")
    return int(value)


def _check_options(tol: float | None, max_iter: int | None, method: str, anderson: int, krylov_dim: int,
                   final_euler: bool, on_failure: str) -> None:
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol > 0
                            or not math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0 (the residual per element, relative to 1 + |x̄|), "
                         f"got {tol!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    if max_iter is not None:
        _check_int("max_iter", max_iter, 1)
    _check_int("anderson", anderson, 0, " (the history depth; 0 is plain fixed-point iteration)")
    _check_int("krylov_dim", krylov_dim, 1, " (GMRES vectors per Newton iteration)")
    if not isinstance(final_euler, bool):
        raise TypeError(f"final_euler must be a bool, got {type(final_euler).__name__}")
    if on_failure not in ON_FAILURE:
        raise ValueError(f"on_failure must be one of {', '.join(map(repr, ON_FAILURE))}, got {on_failure!r}")


class FixedPointInverse(Solver):
    """One encode step σ_a → σ_b that inverts a decode step: x̄_b with x̄_b + Ψ_{σ_b→σ_a}(x̄_b) = x̄_a.

    Run by the one loop across the encode grid (which counts every evaluation, Jacobian–vector
    products included); the carried state is ``f(σ_a, x̄_a)`` when the previous step saw it.
    Per-step figures accumulate in the attributes ``iterations``, ``residuals``,
    ``evaluations``, ``restarts`` and ``unconverged``; ``sample_residuals`` is each sample's
    largest residual over the steps so far.
    """

    name = "fixed_point_inverse"
    order = 1

    def __init__(self, decode: Solver, *, last_euler_at: float | None, method: str, tol: float, max_iter: int,
                 anderson: int, krylov_dim: int, on_failure: str, check_finite: bool, eps_floor: float,
                 tol_given: bool) -> None:
        self.decode, self.last_euler_at = decode, last_euler_at
        self.method, self.tol, self.max_iter = method, tol, max_iter
        self.tol_given = tol_given
        self.anderson, self.krylov_dim, self.on_failure = anderson, krylov_dim, on_failure
        self.check_finite, self.eps_floor = check_finite, eps_floor
        self.iterations: list[int] = []
        self.residuals: list[float] = []
        self.tolerances: list[float] = []
        self.evaluations: list[int] = []
        self.unconverged: set[int] = set()
        self.sample_residuals: Tensor | None = None
        self.restarts = 0

    @staticmethod
    def _ratio(x: Tensor, scale: Tensor) -> Tensor:
        """Per sample, max|x̄_b| / max(1 + |x̄_a|), at least 1: the state's scale in units of the residual's."""
        state, image = x.detach().abs().flatten(1).amax(1), scale.detach().flatten(1).amax(1)  # no grad: read as floats
        return (state.double() / image.double()).clamp_min(1.0)

    def _floor(self, x: Tensor, scale: Tensor) -> Tensor:
        """Per sample, the residual's rounding floor relative to 1 + |x̄_a|: :data:`ROUNDING_EPS` epsilons of max|x̄_b|.
        The residual is computed from x̄_b and Ψ(x̄_b), whose rounding grows with the state, not with x̄_a: where the
        preimage is much larger than the image (one step from σ = 0 to σ_max) it alone exceeds the default tol."""
        return ROUNDING_EPS * self.eps_floor * self._ratio(x, scale)

    def _limit(self, x: Tensor, scale: Tensor) -> Tensor:
        """Per sample, the residual it must reach: ``tol`` as given, or the default tol raised to the rounding floor
        where that floor exceeds it (a step of a normal grid keeps the default exactly)."""
        floor = self._floor(x, scale)
        return torch.full_like(floor, self.tol) if self.tol_given else floor.clamp_min(self.tol)

    def _rounding(self, state: torch.dtype) -> str:
        """The precision whose rounding sets the floor (``eps_floor``): the state's, or where the images are in half
        precision (the model evaluated in it, the state in float32), the model's evaluations'."""
        if torch.finfo(state).eps >= self.eps_floor:
            return str(state)
        half = next((d for d in (torch.bfloat16, torch.float16) if torch.finfo(d).eps == self.eps_floor), None)
        return str(half if half is not None else state)

    def _unresolved(self, s_b: float) -> str:
        """The advice to try ``method='hybrid'`` after Newton alone failed, with why where Newton may miss a root that
        exists: its Jacobian–vector products are forward differences, which resolve a Jacobian only to about √eps,
        while from a large σ_b the decode step's is ~1/(1 + σ_b²) (the denoiser there barely depends on x̄; exactly
        that for N(0, I) data into σ = 0)."""
        shrink, resolved = 1.0 / (1.0 + s_b * s_b), math.sqrt(self.eps_floor)
        if shrink >= resolved:
            return ", or try method='hybrid'"
        return (f"; from σ={s_b:.6g} the decode step's Jacobian can be as small as 1/(1 + σ²) = {shrink:.2g}, "
                f"below the about √eps = {resolved:.2g} that Newton's forward-difference Jacobian–vector products "
                "resolve in this precision, so Newton may miss a root that exists: try method='hybrid' (Anderson "
                "first, which needs no Jacobian)")

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        s_a, s_b, x_a = t0, t1, y0
        field = _Watch(f)
        decode_step = solvers.FINAL_EULER if self.last_euler_at == s_a else self.decode
        method, tol, max_iter = self.method, self.tol, self.max_iter

        def step(x: Tensor) -> Tensor:
            return decode_step.step(field, s_b, s_a, x, None).y

        k_a = state.k if isinstance(state, Derivative) and state.t == s_a else field(s_a, x_a)
        guess = x_a.add(k_a, alpha=s_b - s_a)
        scale = x_a.abs().add_(1.0)
        x, res, it, k_b, exhausted = guess, None, 0, None, False
        if method != "newton":  # Anderson: alone, or first (hybrid: a short run, divergence allowed)
            budget = max_iter if method == "anderson" else min(HYBRID_ANDERSON_ITER, max_iter)
            def g(x: Tensor) -> Tensor:  # x̄ ← x̄_a − Ψ(x̄); f(σ_b, x̄) is kept for the next step's guess
                field.watch, field.seen = (s_b, x), None
                return x_a - (step(x) - x)

            try:
                mixed = solvers.anderson(g, guess, scale=scale, tol=tol, max_iter=budget, depth=self.anderson,
                                         check_finite=self.check_finite and method == "anderson")
            except FloatingPointError as err:
                raise StepFailure(f"fixed-point inversion, {{where}}: {err}") from None
            x, res, it = mixed.y, mixed.residual, mixed.iterations
            k_b = field.seen if mixed.last_is_best else None
            exhausted = method == "anderson" and it >= max_iter
        if method == "newton" or (method == "hybrid" and not bool((res <= self._limit(x, scale)).all())):
            guesses = [guess, x_a] if method == "newton" else [x, guess, x_a]
            root = solvers.newton_krylov(lambda y: step(y) - x_a, guesses, scale=scale, tol=tol, max_iter=max_iter,
                                         krylov_dim=self.krylov_dim, eps=self.eps_floor)
            x, res, it, k_b = root.y, root.residual, it + root.iterations, None
            exhausted = root.iterations >= max_iter
            self.restarts += root.restarts
        res = res.detach()  # a diagnostic: read as floats below (torch warns doing that to a tensor needing grad)
        if self.check_finite and not bool(torch.isfinite(res).all()):
            raise StepFailure("fixed-point inversion, {where}: the residual is not finite (the model returned NaN/inf "
                              "or the iteration diverged)")
        floor, limit_of = self._floor(x, scale), self._limit(x, scale)
        at_floor = ~(res <= tol) & (res <= floor)
        missed_mask = ~(res <= limit_of)  # NaN counts as missed
        missed = missed_mask.nonzero().flatten().tolist()
        worst = float(torch.where(missed_mask, res, torch.zeros_like(res)).amax()) if missed else float(res.amax())
        if missed and self.on_failure == "raise":
            extra = {"method": method, "iterations": sum(self.iterations) + it, "tol": tol, "restarts": self.restarts}
            limit = float(floor[missed_mask].amax())
            rounding = self._rounding(x.dtype)
            if bool(at_floor[missed_mask].all()):  # only an explicit tol below the rounding floor gets here
                why = (f"that is as close as {rounding} rounding gets at this step's scale (the state reaches "
                       f"max|x̄| = {float(x.detach().abs().amax()):.3g}, so the residual cannot be resolved below about "
                       f"{limit:.3g}): tol={tol:.3g} is below it; give inversion option tol >= {limit:.3g}, leave tol "
                       "out (the default is raised to that floor where rounding requires), or use more steps")
            else:
                fact = f"{rounding} rounding at this step's scale allows about {limit:.3g}, so the miss is not rounding"
                why = (f"the budget max_iter={max_iter} ran out ({fact}); use a larger max_iter or tol, or more steps"
                       if exhausted else
                       f"Newton's line search failed from every initial guess (max_iter={max_iter} was not reached; "
                       f"{fact}): this decode step has no preimage of the image near them, or none at all, or "
                       "Newton cannot find it; more steps make each step's preimage nearer"
                       + (self._unresolved(s_b) if method == "newton" else ""))
            need = float(limit_of[missed_mask].amax())
            raised = f" (the default tol {tol:.3g} raised to this step's rounding floor)" if need > tol else ""
            raise StepFailure(f"fixed-point inversion did not converge at {{where}}: residual {worst:.3g} > tol "
                              f"{need:.3g}{raised} for sample(s) {missed[:8]} after {it} {method} iteration(s); {why}. "
                              "on_failure='keep' keeps the best iterate instead", extra)
        self.unconverged.update(missed)
        per_sample = torch.nan_to_num(res.detach().double(), nan=math.inf)
        self.sample_residuals = (per_sample if self.sample_residuals is None
                                 else torch.maximum(self.sample_residuals, per_sample))
        self.iterations.append(it)
        self.residuals.append(worst)
        # the step's tolerance beside its residual: where samples missed, the largest of *their* limits (the residual
        # is the worst of theirs, above each), not another sample's raised floor that hid the miss
        self.tolerances.append(float(limit_of[missed_mask].amax() if missed else limit_of.amax()))
        self.evaluations.append(field.calls)
        return StepResult(x, None if k_b is None else Derivative(s_b, k_b))


def encode_fixed_point(request: Request, images: Tensor, spec: Inversion) -> Result:
    """Encode so that the *plain* decode with the request's solver on its grid reproduces ``images``.

    Per encode step σ_a → σ_b the noisier state solves x̄_b + Ψ_{σ_b→σ_a}(x̄_b) = x̄_a (Ψ the
    decode step's increment; with ``final_euler`` the decode's last step into σ = 0 is Euler,
    as :func:`flowdiff.decode` takes it by default), until every element's residual
    |x̄_b + Ψ(x̄_b) − x̄_a| ≤ ``tol``·(1 + |x̄_a|) (default 32 machine epsilons of the state's
    dtype, and at least 4 of the images' dtype for float16/bfloat16). The residual's rounding
    grows with the state, not with x̄_a: where the preimage is much larger than the image (one
    step from σ = 0 to σ_max) the default is out of reach, so at that step it is raised to the
    rounding floor, :data:`ROUNDING_EPS` epsilons of max|x̄_b| / max(1 + |x̄_a|); on a normal
    grid (that ratio below 32) every step keeps the default exactly. An explicit ``tol`` is held
    as given; missing it only by rounding is an error that says so and names the smallest
    ``tol`` that rounding allows. Options
    (``spec.options``): ``method`` — ``"newton"`` (Newton–Krylov, at most ``max_iter`` Newton
    iterations a step, default 50, with up to ``krylov_dim`` GMRES vectors each), ``"anderson"``
    (Anderson mixing of depth ``anderson``, 0 for plain fixed-point iteration, at most
    ``max_iter`` iterations a step, default 100) or ``"hybrid"`` (default: Anderson for up to
    20 iterations, then Newton with ``max_iter`` for what is left); ``tol``; ``final_euler``;
    ``on_failure``. ``anderson`` beside ``method="newton"`` and ``krylov_dim`` beside
    ``method="anderson"`` are refused (that method would not use them). The first guess is the
    explicit Euler encode step; Newton restarts a stuck sample from the Euler guess and from x̄_a itself.

    A sample that misses ``tol`` raises :class:`solvers.SolveError` naming the step, σ and
    residual; ``on_failure="keep"`` instead keeps its best iterate, warns, and lists it in
    ``stats.extra["unconverged"]``. ``nfe=`` picks the step count whose plain *decode* fits
    that budget. The statistics count every model evaluation (Jacobian–vector products
    included); ``stats.extra`` holds ``method``, ``iterations`` (total),
    ``iterations_per_step``, ``evaluations_per_step`` (model evaluations), ``residuals`` (per
    step, the achieved max over samples, or over those that missed their tolerance where any
    did), ``sample_residuals`` (per sample, its largest residual over the steps), ``tol``,
    ``tolerances`` (per step, the largest tolerance those samples were held to: ``tol``, or the
    default raised to a sample's rounding floor; a step missed exactly where its residual
    exceeds it), ``unconverged`` and, for Newton,
    ``restarts``.
    """
    options = dict(spec.options)
    known = ("method", "tol", "max_iter", "anderson", "krylov_dim", "final_euler", "on_failure")
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise TypeError(f"encode_fixed_point() got unknown inversion option(s) {unknown}; accepted: {', '.join(known)}")
    method = options.get("method", "hybrid")
    tol, max_iter = options.get("tol"), options.get("max_iter")
    anderson, krylov_dim = options.get("anderson", 3), options.get("krylov_dim", 40)
    final_euler, on_failure = options.get("final_euler", True), options.get("on_failure", "raise")
    _check_options(tol, max_iter, method, anderson, krylov_dim, final_euler, on_failure)
    unused = UNUSED_BY.get(method)
    if unused is not None and unused[0] in options:
        raise ValueError(f"inversion option {unused[0]}={options[unused[0]]!r} does not apply to method={method!r}: "
                         f"{unused[1]}; leave it out, or use method='hybrid', which runs both")
    max_iter, anderson, krylov_dim = (None if max_iter is None else int(max_iter)), int(anderson), int(krylov_dim)
    solver_obj = request.solver
    if solver_obj.reversible:
        raise ValueError(f"solver {solver_obj.name!r} is reversible: encode with it directly (no Inversion) and "
                         "its latent decodes exactly by the algebraic inverse")
    if solver_obj.multistep:
        raise ValueError(f"fixed-point inversion needs a one-step solver; {solver_obj.name!r} is multistep")
    form = formulation_for(solver_obj, "decode")  # the variables of the decode this encode inverts
    if not isinstance(form, Sigma):
        raise ValueError(f"fixed-point inversion inverts a decode in (σ, x̄); {solver_obj.name!r} decodes in "
                         f"{type(form).__name__} variables: encode with it directly, or invert 'euler' or 'heun'")
    if max_iter is None:
        max_iter = 100 if method == "anderson" else 50
    dtype = compute_dtype(images)
    model_dtype = images.dtype if images.dtype != dtype else None
    tol_given = tol is not None
    tol = _default_tol(dtype, images.dtype) if tol is None else float(tol)
    gen = request.grid.generation_sigmas(request.flow, solver_obj, final_euler=final_euler)
    idle = None if final_euler else idle_final_euler(solver_obj, gen, "decode")
    if idle is not None:  # the decode it inverts would be the same without it (and so would the latent)
        raise ValueError(f"final_euler=False (the Inversion's options or the Grid's) beside Inversion solver "
                         f"{solver_obj.name!r}: {idle}, so it would change nothing (the same latent, decode and NFE "
                         "as without it); leave final_euler out")
    enc = reversed_grid(gen)
    refuse_encode_to_infinity(enc)  # zero terminal SNR (flowdiff.engine.terminal)
    last_euler = final_euler and solver_obj.evaluates_end and enc[0] == 0.0
    inverse = FixedPointInverse(solver_obj, last_euler_at=0.0 if last_euler else None, method=method, tol=tol,
                                max_iter=max_iter, anderson=anderson, krylov_dim=krylov_dim, on_failure=on_failure,
                                check_finite=request.check_finite,
                                eps_floor=max(torch.finfo(dtype).eps, torch.finfo(images.dtype).eps),
                                tol_given=tol_given)
    sol = solve_grid(request.flow.field(request.model_kwargs, model_dtype), form, enc.tolist(), inverse,
                     xbar0=from_model_scale(request.flow, images.to(dtype), enc[0]), callback=request.callback,
                     check_finite=request.check_finite, bound=request.bound)
    stats = sol.stats
    iters, residuals, unconverged = inverse.iterations, inverse.residuals, sorted(inverse.unconverged)
    sample_residuals = [] if inverse.sample_residuals is None else inverse.sample_residuals.cpu().tolist()
    stats.extra.update(method=method, iterations=sum(iters), iterations_per_step=iters,
                       evaluations_per_step=inverse.evaluations, residuals=residuals, tol=tol,
                       tolerances=inverse.tolerances,
                       unconverged=unconverged, sample_residuals=sample_residuals)
    if method != "anderson":
        stats.extra["restarts"] = inverse.restarts
    if unconverged:
        listed = ", ".join(f"{i} ({sample_residuals[i]:.3g})" for i in unconverged[:8])
        warnings.warn(f"fixed-point inversion: {len(unconverged)} of {images.shape[0]} sample(s) missed tol "
                      f"{tol:.3g}, kept at their least-residual iterate: sample (residual) {listed}"
                      f"{', ...' if len(unconverged) > 8 else ''}; their plain decode will not reproduce them exactly "
                      "(stats.extra['unconverged'] and ['sample_residuals'] list them)", RuntimeWarning, stacklevel=3)
    x_T = (sol.xbar / math.sqrt(1.0 + enc[-1] ** 2)).to(images.dtype)
    latent = Latent(x_T, enc, request.solver_name, dict(request.solver_options), None, "fixed_point", final_euler)
    return Result(x_T, stats, enc, solver_obj.name, latent)


register_plugin(Plugin("fixed_point", "encode", "procedure", "a plain latent that the standard decode turns back into "
                       "the images (Newton–Krylov / Anderson): encode(solver=flowdiff.Inversion('fixed_point'))",
                       run=encode_fixed_point))
