"""The k-diffusion convention, both ways: a flow as a denoiser D(x̄, σ), and a denoiser as a flow.

Karras et al., "Elucidating the Design Space of Diffusion-Based Generative Models" (EDM,
2022) and Crowson's k-diffusion write the sampler state in the variance-exploding scale,
which is flowdiff's x̄ = x₀ + σ·z, and the model as a denoiser ``D(x̄, σ, **extra_args)``
(σ a tensor of shape (batch,)) predicting x₀. With ε the noise prediction,

    D(x̄, σ) = x̄ − σ·ε(x̄, σ),     dx̄/dσ = (x̄ − D(x̄, σ))/σ = ε(x̄, σ),

so k-diffusion's ``sample_euler`` on :func:`to_denoiser` of a flow is flowdiff's Euler, and
:func:`from_denoiser` turns a denoiser back into a flow (``ProbabilityFlow.from_sigma_field``).
k-diffusion starts from x̄ = σ_max·z; flowdiff's DDIM-scale noise is z·σ_max/√(1+σ_max²).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..engine.flow import ProbabilityFlow, own_denoised
from ..engine.schedules import ArrayLike, Schedule, as_schedule

#: ``denoiser(xbar, sigma, **extra_args) -> x̂₀``, sigma a tensor of shape (batch,).
Denoiser = Callable[..., Tensor]


def _sigma_values(sigma: Tensor | float, batch: int) -> list[float]:
    s = torch.as_tensor(sigma).detach().reshape(-1)
    if s.numel() == 1:
        s = s.expand(batch)
    if s.numel() != batch:
        raise ValueError(f"sigma must be a scalar or have shape ({batch},), got {tuple(torch.as_tensor(sigma).shape)}")
    values = s.cpu().double().tolist()
    if any(not (v >= 0 and math.isfinite(v)) for v in values):
        raise ValueError(f"sigma must be finite and >= 0, got {values}")
    return values


class FlowDenoiser:
    """A :class:`ProbabilityFlow` as a k-diffusion denoiser ``D(x̄, σ, **extra_args) = x̄ − σ·ε``.

    Rows with different σ are evaluated in groups of equal σ (k-diffusion's samplers pass
    one σ for the whole batch). ``sigma_min``/``sigma_max`` are the schedule's, as
    k-diffusion's own wrappers expose them.
    """

    def __init__(self, flow: ProbabilityFlow) -> None:
        if not isinstance(flow, ProbabilityFlow):
            raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
        self.flow = flow
        self.sigma_min = flow.schedule.sigma_min
        self.sigma_max = flow.schedule.sigma_max

    def __call__(self, xbar: Tensor, sigma: Tensor | float, **extra_args: Any) -> Tensor:
        return self._by_sigma(xbar, sigma, extra_args, denoised=True)

    def eps(self, xbar: Tensor, sigma: Tensor | float, **extra_args: Any) -> Tensor:
        """ε(x̄, σ) with per-row σ."""
        return self._by_sigma(xbar, sigma, extra_args, denoised=False)

    def _by_sigma(self, xbar: Tensor, sigma: Tensor | float, extra_args: dict[str, Any], *, denoised: bool) -> Tensor:
        """ε, or D read off the model's own prediction where the flow's field gives it (x̄ − σ·ε cancels at large σ:
        v-prediction in float32 lost ε's rounding times σ; :func:`flowdiff.engine.flow.own_denoised`), per σ group."""
        if not isinstance(xbar, Tensor) or xbar.ndim < 1:
            raise TypeError(f"xbar must be a tensor of shape (batch, ...), got {type(xbar).__name__}")
        values = _sigma_values(sigma, xbar.shape[0])
        field = self.flow.field(extra_args)
        own = own_denoised(field) if denoised else None
        if own is not None:
            f = own
        elif denoised:
            def f(v: float, x: Tensor) -> Tensor:
                return x - v * field(v, x)
        else:
            f = field
        if len(set(values)) == 1:
            return f(values[0], xbar)
        if extra_args:
            raise ValueError("rows with different σ cannot be split when extra_args are given "
                             "(they may carry per-row tensors); pass one σ for the batch")
        out = torch.empty_like(xbar)
        for v in sorted(set(values)):
            rows = torch.tensor([i for i, s in enumerate(values) if s == v], device=xbar.device)
            out[rows] = f(v, xbar[rows])
        return out

    @staticmethod
    def eps_to_denoised(xbar: Tensor, sigma: Tensor | float, eps: Tensor) -> Tensor:
        s = torch.as_tensor(sigma, dtype=xbar.dtype, device=xbar.device).reshape(-1)
        return xbar - s.reshape(-1, *([1] * (xbar.ndim - 1))) * eps


def to_denoiser(flow: ProbabilityFlow) -> FlowDenoiser:
    """A flow as a k-diffusion denoiser ``D(x̄, σ, **extra_args)`` (see :class:`FlowDenoiser`)."""
    return FlowDenoiser(flow)


def from_denoiser(denoiser: Denoiser, schedule: Schedule | ArrayLike, *,
                  sigma_floor: float | None = None) -> ProbabilityFlow:
    """A k-diffusion denoiser ``D(x̄, σ, **extra_args) -> x̂₀`` as a flow: ε = (x̄ − D(x̄, σ))/σ.

    ε is undefined from D at σ = 0, so below ``sigma_floor`` (default: the schedule's σ_min,
    the smallest trained noise level) the denoiser is evaluated at the floor with the state
    rescaled to it, x̄·α(σ)/α(σ_f) (the schedule's :meth:`~flowdiff.Schedule.alpha`: √((1+σ_f²)/(1+σ²))
    for VP, 1 for VE, (1+σ_f)/(1+σ) for flow matching), so that the model's input α·x̄ is the one
    it got at σ: this is how a timestep model treats σ below its first timestep, and for a flow whose
    model time stops there (VP's timesteps, VE's ``time="log_sigma"``) the round trip
    flow → denoiser → flow returns the same ε at every σ, 0 included (a model fed σ itself, VE's
    ``time="sigma"`` or flow matching's t, differs below the floor: lower ``sigma_floor`` for it).
    Generation with ``final_euler`` (the default) never evaluates σ = 0.
    ``model_kwargs`` of generate/encode are passed to the denoiser as ``extra_args``.
    """
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable as denoiser(xbar, sigma, **extra_args), "
                        f"got {type(denoiser).__name__}")
    schedule = as_schedule(schedule, name="schedule")
    floor = schedule.sigma_min if sigma_floor is None else sigma_floor
    if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not (0 < floor < math.inf):
        raise ValueError(f"sigma_floor must be a finite number > 0, got {sigma_floor!r}")
    floor = float(floor)

    def eps(xbar: Tensor, sigma: float, **extra_args: Any) -> Tensor:
        if sigma < floor:
            xbar = xbar * (schedule.alpha(sigma) / schedule.alpha(floor))
            sigma = floor
        s = torch.full((xbar.shape[0],), sigma, dtype=xbar.dtype, device=xbar.device)
        denoised = denoiser(xbar, s, **extra_args)
        if not isinstance(denoised, Tensor) or denoised.shape != xbar.shape:
            got = tuple(denoised.shape) if isinstance(denoised, Tensor) else type(denoised).__name__
            raise ValueError(f"denoiser returned {got} for input shape {tuple(xbar.shape)} at σ={sigma:.6g}; "
                             "it must return the denoised input, same shape")
        return (xbar - denoised.to(xbar.dtype)) / sigma

    return ProbabilityFlow.from_sigma_field(eps, schedule)
