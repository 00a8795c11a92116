"""The probability-flow ODE of a noise-prediction model, in DDIM's variables.

With ᾱ the schedule, σ = √((1−ᾱ)/ᾱ) and x̄ = x/√ᾱ = x·√(1+σ²), deterministic DDIM is
explicit Euler for

    dx̄/dσ = ε_θ( x̄/√(σ²+1), t(σ) )

(Song et al., "Denoising Diffusion Implicit Models", ICLR 2021, eq. 14). The image is x̄ at
σ = 0; DDIM's x_T ~ N(0, I) is x̄/√(1+σ_max²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from .schedules import ArrayLike, Schedule, as_schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

#: ``model(x_t, t, **model_kwargs) -> prediction``; x_t VP-scaled, t a float tensor of shape (batch,).
Model = Callable[..., Tensor]


class ProbabilityFlow:
    """The vector field ``dx̄/dσ = ε(x̄, σ)`` of a model and its schedule.

    ``model(x_t, t, **model_kwargs)`` receives the VP-scaled input x_t = x̄/√(1+σ²) and the
    timestep t(σ) (float, shape (batch,)); it predicts ``epsilon``, ``v_prediction`` or
    ``sample`` (x₀), converted here to ε. States may have any shape (batch, ...).
    """

    def __init__(self, model: Model, alphas_cumprod: Schedule | ArrayLike | None = None, *,
                 prediction_type: str = "epsilon") -> None:
        if not callable(model):
            raise TypeError(f"model must be callable as model(x_t, t, **kwargs), got {type(model).__name__}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"unknown prediction_type {prediction_type!r}; "
                             f"accepted: {', '.join(PREDICTION_TYPES)}")
        self.model = model
        self.schedule = as_schedule(alphas_cumprod)
        self.prediction_type = prediction_type
        self.sigma_field: Callable[..., Tensor] | None = None

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

    def field(self, model_kwargs: Mapping[str, Any] | None = None,
              model_dtype: torch.dtype | None = None, *, sigmas: Sequence[float] | None = None
              ) -> Callable[[float, Tensor], Tensor]:
        """The right-hand side ``f(σ, x̄) -> ε`` for the solvers, with conditioning bound.

        ``model_dtype`` casts the model's input (e.g. float16) while the state stays in its
        own dtype (float32 accumulation). ``sigmas`` (the grid about to be solved, optional)
        lets the timestep tensors of all its σ be built at once, outside the step loop.
        """
        kwargs = dict(model_kwargs or {})
        if self.sigma_field is not None:
            return self._native_field(kwargs, model_dtype)
        timestep = self.schedule.timestep
        model = self.model
        prediction_type = self.prediction_type
        t_cache: dict[tuple[float, int, torch.device], Tensor] = {}
        pending = [float(s) for s in sigmas] if sigmas is not None else []
        built: set[tuple[int, torch.device]] = set()

        def f(sigma: float, xbar: Tensor) -> Tensor:
            inv_scale = 1.0 / math.sqrt(1.0 + sigma * sigma)
            x = xbar * inv_scale
            if model_dtype is not None and x.dtype != model_dtype:
                x = x.to(model_dtype)
            batch, device = xbar.shape[0], xbar.device
            t = t_cache.get((sigma, batch, device))
            if t is None:
                t_dtype = torch.float64 if (model_dtype or xbar.dtype) == torch.float64 else torch.float32
                grid = [sigma]
                if pending and (batch, device) not in built:  # the whole grid, once per batch size and device
                    grid = [*pending, sigma]
                    built.add((batch, device))
                table = torch.tensor([timestep(s) for s in grid], dtype=t_dtype, device=device)
                for s, row in zip(grid, table.unsqueeze(1).expand(-1, batch).contiguous().unbind(0)):
                    t_cache.setdefault((s, batch, device), row)
                t = t_cache[(sigma, batch, device)]
            out = model(x, t, **kwargs)
            if not isinstance(out, Tensor):
                raise TypeError(f"model must return a torch.Tensor, got {type(out).__name__} "
                                "(wrap models that return objects, e.g. flowdiff.from_diffusers)")
            if out.shape != xbar.shape:
                raise ValueError(f"model returned shape {tuple(out.shape)} for input shape {tuple(xbar.shape)} "
                                 f"at σ={sigma:.6g} (t={t[0].item() if t.device.type == 'cpu' else '?'}); "
                                 "it must return the input's shape")
            if out.dtype != xbar.dtype:
                out = out.to(xbar.dtype)
            if prediction_type == "epsilon":
                return out
            if prediction_type == "v_prediction":
                # x = a·x0 + s·ε, v = a·ε − s·x0  ⇒  ε = s·x + a·v, with a = 1/√(1+σ²), s = σ·a.
                return out.mul(inv_scale).add_(xbar, alpha=sigma * inv_scale * inv_scale)
            if sigma == 0:
                raise ValueError("prediction_type='sample' defines no ε at σ = 0 (ε = (x̄ − x₀)/σ); "
                                 "use a grid that does not evaluate the model at σ = 0")
            return (xbar - out) / sigma

        return f

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
            return out if out.dtype == xbar.dtype else out.to(xbar.dtype)

        return f

    def eps(self, xbar: Tensor, sigma: float, **model_kwargs: Any) -> Tensor:
        """ε(x̄, σ): the vector field at one point."""
        return self.field(model_kwargs)(float(sigma), xbar)

    def denoised(self, xbar: Tensor, sigma: float, **model_kwargs: Any) -> Tensor:
        """The model's estimate of the clean image, x̂₀ = x̄ − σ·ε(x̄, σ)."""
        return xbar - float(sigma) * self.eps(xbar, sigma, **model_kwargs)
