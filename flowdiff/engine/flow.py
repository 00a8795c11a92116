"""The probability-flow ODE of a noise-prediction model, in DDIM's variables.

With ᾱ the schedule, σ = √((1−ᾱ)/ᾱ) and x̄ = x/√ᾱ = x·√(1+σ²), deterministic DDIM is
explicit Euler for

    dx̄/dσ = ε_θ( x̄/√(σ²+1), t(σ) )

(Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, eq. 14). The image is x̄ at
σ = 0; DDIM's x_T ~ N(0, I) is x̄/√(1+σ_max²).

The same ODE holds for every schedule x = α·x₀ + s·ε with σ = s/α and x̄ = x/α (see
:mod:`flowdiff.engine.schedules`): variance exploding (α = 1) and rectified flow (α = 1 − t, s = t)
differ from VP only in the model's input x = α(σ)·x̄, its time t(σ), and the conversion of
its prediction to ε, all of which the schedule supplies.
"""

from __future__ import annotations

import bisect
import copy
import math
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._checks import check_model_kwargs, refusing_mapped_output
from .schedules import ArrayLike, Schedule, as_schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "velocity")

#: How many (batch, device, dtype) tables of timestep tensors a flow keeps. A model that modifies its timestep
#: argument in place (seen by the tensor's version counter, a host-side integer: no copy, no sync) keeps that
#: tensor: the table forgets it and the next call at that σ gets a new one, so later calls see the right t.
_TIMESTEP_CACHE = 64
#: σ kept per (batch, device, dtype) table: a fixed grid uses a few dozen; an adaptive solve meets a new σ at every
#: step it tries, and the tables live as long as the flow, so without a bound they grew by one entry per σ ever tried
#: (660k entries, 1.67 GB in one long solve): a full table starts again
_SIGMA_CACHE = 4096

#: State dtypes whose product with a 0-dim tensor equals the product with a Python float, bit for bit.
_EXACT_SCALARS = (torch.float32, torch.float64)

#: ``model(x_t, t, **model_kwargs) -> prediction``; x_t = α(σ)·x̄ (VP-scaled for VP schedules), t a float
#: tensor of shape (batch,).
Model = Callable[..., Tensor]



def checked_output(out: object, x: Tensor, where: str) -> Tensor:
    """A model's raw output for input ``x`` at ``where`` (e.g. "σ = ∞"), outside the field's own cached path (the step
    out of σ = ∞, the peers' direct calls): a real floating-point tensor of ``x``'s shape, cast to ``x``'s dtype."""
    if not isinstance(out, Tensor):
        raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__} at {where} (wrap models that "
                        "return objects, e.g. flowdiff.from_diffusers)")
    if out.shape != x.shape:
        raise ValueError(f"model returned shape {tuple(out.shape)} for input shape {tuple(x.shape)} at {where}; it "
                         "must return the input's shape")
    _check_output_dtype(out, "model", where)
    return out.to(x.dtype)


def _check_output_dtype(out: Tensor, who: str, where: str) -> None:
    """A model's output is cast to the state's dtype only between floating-point types: an integer or bool output
    (a rounded or thresholded ε) or a complex one would be silently converted into another prediction."""
    if not out.is_floating_point():
        raise TypeError(f"{who} returned a tensor of dtype {str(out.dtype).removeprefix('torch.')} at {where}; it "
                        "must return real floating-point values (float16, bfloat16, float32 or float64)")

def with_denoised(field: Callable[[float, Tensor], Tensor], denoised: Callable[[float, Tensor], Tensor]
                  ) -> Callable[[float, Tensor], Tensor]:
    """``field`` (a function) carrying ``field.denoised(σ, x̄)``, its D = x̄ − σ·ε read off the model's own prediction
    (:func:`flowdiff.engine.formulations.data_field` uses it). ``denoised.field`` is a weak reference to ``field``
    itself: a wrapper of ``field`` that copies its attributes (``functools.wraps``) or forwards them carries a
    ``denoised`` that is not its own, and data_field then reads D off the wrapper's ε instead of bypassing it."""
    denoised.field = weakref.ref(field)  # type: ignore[attr-defined]  # weak: no cycle holding the model's kwargs
    field.denoised = denoised  # type: ignore[attr-defined]
    return field


def own_denoised(field: Callable[[float, Tensor], Tensor]) -> Callable[[float, Tensor], Tensor] | None:
    """``field.denoised`` where :func:`with_denoised` gave it to ``field`` itself, else None (also for a wrapper
    that copied or forwards a wrapped field's attribute: its D is x̄ − σ·(its own ε))."""
    denoised = getattr(field, "denoised", None)
    owner = getattr(denoised, "field", None)
    return denoised if isinstance(owner, weakref.ref) and owner() is field else None


def refusing_mapped_field(field: Callable[[float, Tensor], Tensor], refusal: str) -> Callable[[float, Tensor], Tensor]:
    """``field`` refusing a mapped model output by name (:func:`~flowdiff.engine._checks.refusing_mapped_output`,
    for a solve under a vmap right around a jvp), its own D (:func:`own_denoised`) kept and checked alike: a wrapper
    without it would have the data variables read x̄ − σ·ε, which loses the digits of x̂₀ at large σ."""
    denoised = own_denoised(field)
    checked = refusing_mapped_output(field, refusal)
    return checked if denoised is None else with_denoised(checked, refusing_mapped_output(denoised, refusal))


class ProbabilityFlow:
    """The vector field ``dx̄/dσ = ε(x̄, σ)`` of a model and its schedule.

    ``model(x_t, t, **model_kwargs)`` receives its input x_t = α(σ)·x̄ (for VP x̄/√(1+σ²))
    and its time t(σ) (float, shape (batch,)), both from the schedule; it predicts ``epsilon``,
    ``v_prediction`` (v = α·ε − s·x₀, Salimans & Ho 2022), ``sample`` (x₀) or ``velocity``
    (flow matching's v = dx/dt, e.g. ε − x₀ for rectified flow), converted here to ε:

        ε = (s·x + α·v)/(α² + s²) = σ/(1+σ²)·x̄ + v/(α(1+σ²))      (v_prediction)
        ε = (x̄ − x₀)/σ                                              (sample)
        ε = a(σ)·x̄ + b(σ)·v, (a, b) = schedule.velocity_coefficients(σ)   (velocity)

    States may have any shape (batch, ...).

    ``timesteps`` (a mapping σ → t, default None): the model's time at those σ instead of the
    schedule's t(σ) (σ matched to a relative 1e-12). A diffusers scheduler feeds its network the
    timesteps of its own table — integers (DDIM, DPM-Solver, also on Karras or exponential σ grids),
    float32 values (Euler), t = 999 at a zero-terminal-SNR start — where t(σ) is fractional;
    :func:`flowdiff.models.pipelines.sample_like` runs the scheduler's grid with them, so that the
    network sees what the scheduler would feed it. Off for plain callables and for every σ not
    in the table (another solver's intermediate σ get t(σ)).
    """

    def __init__(self, model: Model, alphas_cumprod: Schedule | ArrayLike | None = None, *,
                 prediction_type: str = "epsilon", timesteps: Mapping[float, float] | None = None) -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t, **kwargs), got {type(model).__name__}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                             f"accepted: {', '.join(PREDICTION_TYPES)}")
        self.model = model
        self.schedule = as_schedule(alphas_cumprod)
        if prediction_type == "velocity":
            self.schedule.velocity_coefficients(self.schedule.sigma_min)  # raises for schedules without one
        self.prediction_type = prediction_type
        self.sigma_field: Callable[..., Tensor] | None = None
        self._fed = _timestep_table(timesteps)

    @property
    def timesteps(self) -> dict[float, float]:
        """The ``timesteps`` option: σ → the model's time there (empty: t(σ) everywhere). Read-only: a
        flow's timestep tensors are cached, so another table is another flow (:meth:`with_timesteps`)."""
        return self._fed

    def field_timestep(self, sigma: float) -> float:
        """The time the model is fed at σ: the ``timesteps`` option's where it has σ, else t(σ)."""
        if self._fed:
            return _table_lookup(self._fed, self.schedule.timestep)(float(sigma))
        return self.schedule.timestep(float(sigma))

    def with_timesteps(self, timesteps: Mapping[float, float] | None) -> ProbabilityFlow:
        """A copy of this flow (sharing its model and schedule) that feeds the model ``timesteps[σ]`` at those σ.

        See the ``timesteps`` option of the class: the timesteps a diffusers scheduler feeds on its
        own grid (:func:`flowdiff.models.pipelines.scheduler_plan`), ``None`` for t(σ) everywhere.
        """
        flow = copy.copy(self)
        flow._fed = _timestep_table(timesteps)
        flow._timesteps_of = None  # its own cache of timestep tensors
        return flow

    def with_model(self, model: Model) -> ProbabilityFlow:
        """A copy of this flow (its class, schedule, options and attributes) with ``model`` in place of its model:
        the same network in another precision (a float64 reference, the CLI's ``--dtype``), or a wrapper of it."""
        flow = copy.copy(self)
        flow.model = model
        flow._timesteps_of = None  # its own cache of timestep tensors
        return flow

    @classmethod
    def from_sigma_field(cls, eps: Callable[..., Tensor], alphas_cumprod: Schedule | ArrayLike) -> ProbabilityFlow:
        """A flow from ``eps(xbar, sigma, **model_kwargs) -> ε`` given directly in σ (σ a Python float).

        For models defined at every σ ≥ 0 (closed-form models, k-diffusion denoisers) there
        is no timestep to round through: the field is exact down to σ = 0. The schedule
        still supplies σ_min, σ_max and the timestep grids.
        """
        if not callable(eps):
            raise TypeError(f"eps must be callable as eps(xbar, sigma), got {type(eps).__name__}")
        flow = cls(eps, alphas_cumprod)
        flow.sigma_field = eps
        return flow

    def __repr__(self) -> str:
        return (f"ProbabilityFlow(model={type(self.model).__name__}, {self.schedule!r}, "
                f"prediction_type={self.prediction_type!r})")

    def check_input(self, x: Tensor, name: str) -> None:
        """Refuse, before any solve, a state of a shape the model declares it does not take.

        A model declares one sample's shape as ``model.input_shape``, None where any size goes
        (a UNet's height and width): :class:`~flowdiff.models.nets.DigitsNet` takes (1, 8, 8), a
        diffusers network its ``in_channels``. Undeclared, every shape goes to the model. Checked
        once at the entry point, not per evaluation; ``name`` is the argument (``noise``, ``images``).
        """
        expected = getattr(self.model, "input_shape", None)
        if expected is None:
            return
        shape = tuple(x.shape[1:])
        if len(shape) != len(expected) or any(e is not None and s != e for s, e in zip(shape, expected)):
            takes = ", ".join("any" if e is None else str(e) for e in expected)
            raise ValueError(f"{name} has shape {tuple(x.shape)}; the model ({type(self.model).__name__}) takes "
                             f"(batch, {takes})")

    def field(self, model_kwargs: Mapping[str, Any] | None = None,
              model_dtype: torch.dtype | None = None) -> Callable[[float, Tensor], Tensor]:
        """The right-hand side ``f(σ, x̄) -> ε`` for the solvers, with conditioning bound.

        ``model_dtype`` casts the model's input (e.g. float16) while the state stays in its
        own dtype (float32 accumulation). The timestep tensors and input scales of the σ
        visited are kept on the flow (a bounded cache), so that repeated solves on one grid
        build no tensor inside the step loop.
        """
        kwargs = dict(check_model_kwargs(model_kwargs) or {})  # every tool's solve comes here: compare, tune, ...
        if self.sigma_field is not None:
            return self._native_field(kwargs, model_dtype)
        timestep = self.schedule.timestep if not self.timesteps else _table_lookup(self.timesteps,
                                                                                   self.schedule.timestep)
        alpha = self.schedule.alpha
        velocity_coefficients = self.schedule.velocity_coefficients
        model = self.model
        prediction_type = self.prediction_type
        if getattr(self, "_timesteps_of", None) is not self.schedule:  # a new (or replaced) schedule: a new cache
            self._timesteps: dict[tuple, dict[float, tuple[Tensor, Tensor | float, float]]] = {}
            self._timesteps_of = self.schedule
        t_cache = self._timesteps

        # The (batch, device, state dtype) of the solve's state and that combination's table σ → (t, input
        # scale α, α). For float32/float64 states α is kept as a 0-dim tensor of the state's dtype, made by a
        # fill kernel (no host-to-device copy, so no sync on CUDA): multiplying by it is the same float
        # operation as by the Python float (checked bit for bit), and about half as costly on small states,
        # where a Python scalar is wrapped into a new tensor on every call. (Half precision computes a Python
        # scalar in float32, so there α stays a float.) A state of another batch size, device or dtype
        # switches table.
        current: list[Any] = [None, None]

        def table(xbar: Tensor) -> dict[float, tuple[Tensor, Tensor | float, float]]:
            combo = (xbar.shape[0], xbar.device, xbar.dtype)
            if len(t_cache) >= _TIMESTEP_CACHE:
                t_cache.clear()
            current[0], current[1] = combo, t_cache.setdefault((*combo, model_dtype), {})
            return current[1]

        def output(sigma: float, xbar: Tensor) -> tuple[Tensor, float]:
            """The model's output at (σ, x̄), checked and in x̄'s dtype, and α(σ)."""
            combo, by_sigma = current
            if combo is None or xbar.shape[0] != combo[0]:
                by_sigma = table(xbar)
                combo = current[0]
            hit = by_sigma.get(sigma)
            if hit is None:  # a σ not seen yet for this state
                if (xbar.device, xbar.dtype) != combo[1:]:  # the same batch size, another state
                    by_sigma = table(xbar)
                    combo = current[0]
                t_dtype = torch.float64 if (model_dtype or combo[2]) == torch.float64 else torch.float32
                scale = alpha(sigma)
                with torch._C._DisableFuncTorch():  # plain tensors: made under a torch.func transform (hessian) they
                    # were wrapped at its levels, and a later transform's solve reading them back failed inside torch
                    hit = (torch.full((combo[0],), timestep(sigma), dtype=t_dtype, device=combo[1]),
                           torch.full((), scale, dtype=combo[2], device=combo[1]) if combo[2] in _EXACT_SCALARS
                           else scale, scale)
                if len(by_sigma) >= _SIGMA_CACHE:
                    by_sigma.clear()
                by_sigma[sigma] = hit
            t, scale_t, inv_scale = hit
            x = xbar * scale_t
            if model_dtype is not None and x.dtype != model_dtype:
                x = x.to(model_dtype)
            if t.is_inference():  # made under torch.inference_mode: no version counter, so the model gets a copy
                out = model(x, t.clone(), **kwargs) if kwargs else model(x, t.clone())
            else:
                version = t._version
                out = model(x, t, **kwargs) if kwargs else model(x, t)
                if t._version != version:  # the model modified its timestep in place: the tensor is the model's now
                    by_sigma.pop(sigma, None)
            # Checked on every call (a model's output may change type or shape between calls at one σ);
            # dtypes are singletons: `is` is the cheap test.
            if not isinstance(out, Tensor) or out.dtype is not xbar.dtype or out.shape != xbar.shape:
                if not isinstance(out, Tensor):
                    raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__} at σ={sigma:.6g} "
                                    "(wrap models that return objects, e.g. flowdiff.from_diffusers)")
                if out.shape != xbar.shape:
                    raise ValueError(f"model returned shape {tuple(out.shape)} for input shape {tuple(xbar.shape)} "
                                     f"at σ={sigma:.6g} (t={t[0].item() if t.device.type == 'cpu' else '?'}); "
                                     "it must return the input's shape")
                if out.dtype != xbar.dtype:
                    _check_output_dtype(out, "model", f"σ={sigma:.6g}")
                    out = out.to(xbar.dtype)
            return out, inv_scale

        def f(sigma: float, xbar: Tensor) -> Tensor:
            out, inv_scale = output(sigma, xbar)
            if prediction_type == "epsilon":
                return out
            if prediction_type == "v_prediction":
                # x = a·x0 + s·ε, v = a·ε − s·x0  ⇒  ε = (s·x + a·v)/(a² + s²), with s = σ·a, x = a·x̄.
                c = 1.0 / (1.0 + sigma * sigma)
                return out.mul(c / inv_scale).add_(xbar, alpha=sigma * c)
            if prediction_type == "velocity":
                a, b = velocity_coefficients(sigma)
                return out.mul(b).add_(xbar, alpha=a)
            if sigma == 0:
                raise ValueError("prediction_type='sample' defines no ε at σ = 0 (ε = (x̄ − x₀)/σ); "
                                 "use a grid that does not evaluate the model at σ = 0")
            return (xbar - out) / sigma

        def denoised(sigma: float, xbar: Tensor) -> Tensor:
            # D = x̄ − σ·ε read off the model's own prediction, not off ε: with x̄ ≈ σ·ε at large σ, the
            # difference of the two cancels, and ε's rounding times σ is the error (2e-4 at σ = 2e4 in float32)
            out, inv_scale = output(sigma, xbar)
            if prediction_type == "epsilon":
                return xbar - sigma * out
            if prediction_type == "v_prediction":  # x̂₀ = a·x − s·v = x̄/(1+σ²) − σ·a·v
                return out.mul(-sigma * inv_scale).add_(xbar, alpha=1.0 / (1.0 + sigma * sigma))
            if prediction_type == "velocity":  # x̄ − σ·(a·x̄ + b·v), its coefficients in float64
                a, b = velocity_coefficients(sigma)
                return out.mul(-sigma * b).add_(xbar, alpha=1.0 - sigma * a)
            return out  # sample: x̂₀ itself

        return with_denoised(f, denoised)

    def _native_field(self, kwargs: dict[str, Any], model_dtype: torch.dtype | None) -> Callable[..., Tensor]:
        eps_fn = self.sigma_field

        def f(sigma: float, xbar: Tensor) -> Tensor:
            inp = xbar
            if model_dtype is not None:
                inp = inp.to(model_dtype)
            out = eps_fn(inp, sigma, **kwargs)
            if not isinstance(out, Tensor) or out.shape != xbar.shape:
                got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ValueError(f"eps returned {got} for input shape {tuple(xbar.shape)} at σ={sigma:.6g}; "
                                 "it must return a tensor of the input's shape")
            if out.dtype != xbar.dtype:
                _check_output_dtype(out, "eps", f"σ={sigma:.6g}")
                out = out.to(xbar.dtype)
            return out

        return f

    def step_from_noise(self, noise: Tensor, sigma: float, model_kwargs: Mapping[str, Any] | None = None,
                        model_dtype: torch.dtype | None = None) -> Tensor:
        """The Euler (= DDIM) step from σ = ∞ to ``sigma``, returned at DDIM scale for :func:`flowdiff.generate`.

        No grid can start at σ = ∞, where the model's input is pure noise (flow matching's t = 1,
        a zero-terminal-SNR schedule's last step), yet that is where SD3/Flux samplers start.
        The step there is finite in the data form x̄' = x̂₀ + σ'·ε̂: at α = 0 the input is the
        noise itself (x = s·ε with s = 1), so ε̂ = ``noise`` and x̂₀ comes from the prediction
        (``sample``: x̂₀ = out; ``v_prediction``: −out; ``velocity``: x − out for rectified flow).
        ``epsilon`` models define no x̂₀ there (0/0) and are refused. One model evaluation;
        the return value is x̄'/√(1+σ'²), the ``noise`` that ``generate(..., grid=grid[1:])``
        continues from.
        """
        check_from_noise(self)
        sigma = float(sigma)
        if not 0 <= sigma < math.inf:
            raise ValueError(f"sigma must be finite and >= 0 (the first grid point after σ = ∞), got {sigma}")
        t_max = self.timesteps.get(math.inf, self.schedule.timestep(math.inf))
        t_dtype = torch.float64 if (model_dtype or noise.dtype) == torch.float64 else torch.float32
        t = torch.full((noise.shape[0],), t_max, dtype=t_dtype, device=noise.device)
        x = noise if model_dtype is None else noise.to(model_dtype)
        out = self.model(x, t, **dict(model_kwargs or {}))
        out = checked_output(out, noise, "σ = ∞")
        if self.prediction_type == "sample":
            x0 = out
        elif self.prediction_type == "v_prediction":  # v = α·ε − s·x₀ with α = 0, s = 1
            x0 = -out
        else:  # rectified flow at t = 1: v = ε − x₀ and x = ε
            x0 = noise - out
        return (x0 + sigma * noise) / math.sqrt(1.0 + sigma * sigma)

    def eps(self, xbar: Tensor, sigma: float, **model_kwargs: Any) -> Tensor:
        """ε(x̄, σ): the vector field at one point."""
        return self.field(model_kwargs)(float(sigma), xbar)

    def denoised(self, xbar: Tensor, sigma: float, **model_kwargs: Any) -> Tensor:
        """The model's estimate of the clean image, x̂₀ = x̄ − σ·ε(x̄, σ), read off its own prediction where the field
        carries that form (:func:`with_denoised`), as the data-variables solvers read it: x̄ − σ·ε cancels at large σ
        (v-prediction in float32 on the cosine schedule: 2e-5 off float64 instead of 1e-7)."""
        sigma = float(sigma)
        field = self.field(model_kwargs)
        own = own_denoised(field)
        return own(sigma, xbar) if own is not None else xbar - sigma * field(sigma, xbar)


def to_model_scale(flow: ProbabilityFlow, xbar: Tensor, sigma: float) -> Tensor:
    """The state a solve hands back at its grid's data end σ (a generation's or decode's last σ): the model's own
    variable x = α(σ)·x̄ (VP: x̄/√(1+σ²); VE: x̄; flow matching: x̄/(1+σ)), as diffusers' DDIMScheduler with
    ``set_alpha_to_one=False`` returns x at ᾱ_0; the image x̄ itself at σ = 0. :func:`from_model_scale` is its
    inverse, how an encode reads its input there."""
    return xbar if sigma == 0.0 else xbar * flow.schedule.alpha(float(sigma))


def from_model_scale(flow: ProbabilityFlow, x: Tensor, sigma: float) -> Tensor:
    """x̄ = x/α(σ) of the model's variable ``x`` at an encode's first σ (:func:`to_model_scale`'s inverse)."""
    return x if sigma == 0.0 else x / flow.schedule.alpha(float(sigma))


def check_from_noise(flow: ProbabilityFlow) -> None:
    """Refuse a flow that has no step out of σ = ∞ (:meth:`ProbabilityFlow.step_from_noise`): a σ-native field,
    an ``epsilon`` model (x̂₀ = (x − s·ε)/α is 0/0 at α = 0), ``velocity`` off a flow-matching schedule. Called
    before a solve from σ = ∞ evaluates anything, and by the step itself."""
    sigma_max = flow.schedule.sigma_max
    shown = "∞ (zero terminal SNR)" if sigma_max == math.inf else f"{sigma_max:.6g}"
    instead = ("start from a finite σ: the same grid without its first point (grid=grid[1:], e.g. "
               "flow.scheduler_sigmas(n)[1:] or make_sigmas(schedule, 'trailing', n)[1:])")
    if flow.sigma_field is not None:
        raise ValueError(f"a σ-native field (ProbabilityFlow.from_sigma_field) has no σ = ∞, where this grid starts "
                         f"(the schedule's σ_max = {shown}); the step out of σ = ∞ needs a model(x_t, t) with "
                         f"prediction_type 'v_prediction' or 'sample'; {instead}")
    if flow.prediction_type == "epsilon":
        raise ValueError(f"prediction_type 'epsilon' defines no clean estimate at σ = ∞ (x̂₀ = (x − s·ε)/α with "
                         f"α = 0), where this grid starts (the schedule's σ_max = {shown}); a grid from σ = ∞ "
                         f"accepts prediction_type 'v_prediction' or 'sample' (or 'velocity' on a flow-matching "
                         f"schedule). For an epsilon model, {instead}")
    if flow.prediction_type == "velocity" and flow.schedule.kind != "flow_matching":
        raise ValueError(f"prediction_type 'velocity' has a step out of σ = ∞ only on a flow-matching schedule, got "
                         f"{flow.schedule!r} (σ_max = {shown}); accepted from σ = ∞ here: prediction_type "
                         f"'v_prediction' or 'sample'; or {instead}")


def _timestep_table(timesteps: Mapping[float, float] | None) -> dict[float, float]:
    """``timesteps`` checked: σ ≥ 0 (or ∞) → a finite t."""
    if timesteps is None:
        return {}
    if not isinstance(timesteps, Mapping):
        raise TypeError(f"timesteps must be a mapping σ -> t (or None), got {type(timesteps).__name__}")
    table = {}
    for sigma, t in timesteps.items():
        sigma, t = float(sigma), float(t)
        if not sigma >= 0 or not math.isfinite(t):
            raise ValueError(f"timesteps must map σ >= 0 to finite times, got {sigma!r} -> {t!r}")
        table[sigma] = t
    return table


def _table_lookup(table: dict[float, float], timestep: Callable[[float], float]) -> Callable[[float], float]:
    """t(σ) that answers ``table[σ]`` for σ within a relative 1e-12 of a key (a change of variables, e.g.
    σ = 1/(1/σ), may round the grid's σ by an ulp), ``timestep(σ)`` elsewhere."""
    keys = sorted(table)

    def t_of(sigma: float) -> float:
        i = bisect.bisect_left(keys, sigma)
        for j in (i - 1, i):
            if 0 <= j < len(keys) and abs(keys[j] - sigma) <= 1e-12 * keys[j]:
                return table[keys[j]]
        return timestep(sigma)

    return t_of
