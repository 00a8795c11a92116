"""The DDIM paper's generalized generative process: η from the ODE (η = 0) to DDPM (η = 1), and σ̂.

Song et al., "Denoising Diffusion Implicit Models" (ICLR 2021), eq. 12, with DDIM's own
notation (ᾱ the cumulative schedule, s the step's target, t its start):

    x_s = √ᾱ_s·x̂₀ + √(1 − ᾱ_s − c²)·ε_θ(x_t, t) + c·z,      x̂₀ = (x_t − √(1−ᾱ_t)·ε_θ)/√ᾱ_t,
    c(η) = η·√((1−ᾱ_s)/(1−ᾱ_t))·√(1 − ᾱ_t/ᾱ_s)                       (eq. 16),  z ~ N(0, I).

In flowdiff's frame, σ = √((1−ᾱ)/ᾱ) and x̄ = x/√ᾱ, dividing by √ᾱ_s turns the step into a
deterministic Euler step to a lower level σ_down followed by fresh noise of size σ_up:

    x̄_s = x̄_t + (σ_down − σ_t)·ε_θ(x̄_t, σ_t) + σ_up·z,
    σ_up = η·σ_s·√(1 − σ_s²/σ_t²),   σ_down = √(σ_s² − σ_up²) = σ_s·√(1 − η² + η²·σ_s²/σ_t²),

since c·√(1+σ_s²) = σ_up (the noise, unit variance in x, is σ_up in x̄). At η = 0, σ_down = σ_s
and σ_up = 0: the step *is* the Euler step of the probability-flow ODE (DDIM), to the bit.
At η = 1 the mean is the DDPM posterior mean q(x_s | x_t, x̂₀) and c² its variance β̃ (DDPM
with the "small" variance), and σ_down = σ_s²/σ_t; the same step is k-diffusion's "Euler
ancestral" sampler.

``eta="sigma_hat"`` is the paper's σ̂ column of Table 1: DDPM's larger variance
σ̂² = β = 1 − ᾱ_t/ᾱ_s. With that variance eq. 12's √(1 − ᾱ_s − σ̂²) can be imaginary, so
the paper's code (``ddpm_steps`` in ermongroup/ddim) keeps the η = 1 (posterior) mean and
only enlarges the noise; so does this module:

    x̄_s = x̄_t + (σ_s²/σ_t − σ_t)·ε + σ̂_up·z,   σ̂_up = √((σ_t² − σ_s²)(1 + σ_s²)/(1 + σ_t²)).

The step into σ = 0 (the image) adds no noise for any η, as DDPM's last step does: the
result is the model's x̂₀. (diffusers' DDPMScheduler adds noise whenever the current
timestep is > 0, so on grids whose last timestep is not 0 its σ̂ sample ends with noise of
size √(1−ᾱ_t); on grids ending at timestep 0, "leading" among them, the two agree.)

Randomness: one z per noisy step (every step but the one into σ = 0 when η > 0), drawn in
order with ``torch.randn(shape, generator=generator, dtype, device)`` — the same draws as
diffusers' schedulers make from the same generator — or given explicitly per step in
``step_noise`` so that samplers can be compared on identical noise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import Solver, StepResult

from ..engine import _checks
from ..engine._checks import check_seed
from ..engine.flow import to_model_scale
from ..engine.formulations import formulation_for
from ..engine.loop import solve_grid
from ..engine.options import SIGMA_HAT, Request, Stochastic, check_eta, compute_dtype
from ..engine.plugins import Plugin, register_plugin
from ..engine.results import Result
from ..engine.terminal import refuse_infinite_start


def noise_levels(sigma: float, sigma_next: float, eta: float | str) -> tuple[float, float]:
    """``(σ_down, σ_up)`` of one generalized DDIM step from σ_t = ``sigma`` to σ_s = ``sigma_next``.

    The step is x̄_s = x̄_t + (σ_down − σ_t)·ε + σ_up·z (see the module docstring):
    σ_up = η·σ_s·√(1 − σ_s²/σ_t²) and σ_down = σ_s·√(1 − η² + η²·σ_s²/σ_t²), written without
    cancellation; for ``"sigma_hat"`` σ_down = σ_s²/σ_t and σ_up = √((σ_t²−σ_s²)(1+σ_s²)/(1+σ_t²)).
    Into σ_s = 0 both are 0. Requires σ_t > σ_s ≥ 0 (a generation step).
    """
    eta = check_eta(eta)
    sigma, sigma_next = float(sigma), float(sigma_next)
    if not (math.isfinite(sigma) and 0.0 <= sigma_next < sigma):
        raise ValueError(f"a generation step needs sigma > sigma_next >= 0, got {sigma!r} -> {sigma_next!r}")
    if sigma_next == 0.0:
        return 0.0, 0.0
    ratio2 = (sigma_next / sigma) ** 2
    if eta == SIGMA_HAT:
        sigma_up = math.sqrt((sigma - sigma_next) * (sigma + sigma_next) * (1.0 + sigma_next**2) / (1.0 + sigma**2))
        return sigma_next * (sigma_next / sigma), sigma_up
    if eta == 0.0:
        return sigma_next, 0.0
    eta2 = eta * eta
    return sigma_next * math.sqrt(1.0 - eta2 + eta2 * ratio2), eta * sigma_next * math.sqrt(1.0 - ratio2)


class _StepNoise:
    """Where each step's z comes from: explicit ``step_noise[i]``, or drawn in step order."""

    def __init__(self, step_noise: Tensor | Sequence[Tensor] | None, generator: torch.Generator | None,
                 like: Tensor, steps: int) -> None:
        self.shape, self.dtype, self.device = like.shape, like.dtype, like.device
        self.generator = generator
        self.given: list[Tensor] | None = None
        self.draws = 0
        if step_noise is not None:
            self.given = _check_step_noise(step_noise, like, steps)

    def __call__(self, i: int) -> Tensor:
        self.draws += 1
        if self.given is not None:
            return self.given[i]
        try:
            return torch.randn(self.shape, generator=self.generator, dtype=self.dtype, device=self.device)
        except RuntimeError as err:  # a vmap left to its default randomness="error" (jacfwd's own, or a user's)
            if "randomness" not in str(err):
                raise
            source = "its generator" if self.generator is not None else "torch's global generator (no generator=)"
            raise ValueError(f"generate(solver=flowdiff.Stochastic(eta=...)) draws its step noise from {source}, and "
                             "it runs under torch.func.vmap (a jacfwd's, or one around a jvp) whose randomness is "
                             "'error', which refuses random draws: give the noise as Stochastic(step_noise=...) (shape "
                             "(steps, *noise.shape)), or pass randomness='same' or 'different' to that vmap or "
                             "jacfwd") from None


def _check_step_noise(step_noise: object, like: Tensor, steps: int) -> list[Tensor]:
    if isinstance(step_noise, Tensor):
        items = list(step_noise.unbind(0)) if step_noise.ndim == like.ndim + 1 else None
        if items is None or step_noise.shape[1:] != like.shape:
            raise ValueError(f"step_noise as a tensor must have shape (steps, *noise.shape) = "
                             f"({steps}, {', '.join(map(str, like.shape))}), got {tuple(step_noise.shape)}")
    elif isinstance(step_noise, (list, tuple)):
        items = list(step_noise)
    else:
        raise TypeError(f"step_noise must be a tensor of shape (steps, *noise.shape) or a list of tensors, "
                        f"got {type(step_noise).__name__}")
    if len(items) != steps:
        raise ValueError(f"step_noise must hold one noise per step, {steps} for this grid (the entry for the "
                         f"step into σ = 0 is not used), got {len(items)}")
    out = []
    for i, z in enumerate(items):
        if not isinstance(z, Tensor) or not z.is_floating_point():
            raise TypeError(f"step_noise[{i}] must be a floating-point torch.Tensor, got "
                            f"{type(z).__name__ if not isinstance(z, Tensor) else z.dtype}")
        if z.shape != like.shape:
            raise ValueError(f"step_noise[{i}] has shape {tuple(z.shape)}; each must have noise's shape "
                             f"{tuple(like.shape)}")
        if z.device != like.device:
            raise ValueError(f"step_noise[{i}] is on {z.device}, noise on {like.device}; put them on one device")
        out.append(z.to(like.dtype))
    if not bool(torch.isfinite(torch.stack(out)).all()):
        raise ValueError("step_noise contains NaN or inf")
    return out


class GeneralizedDDIM(Solver):
    """One step of the DDIM paper's generalized generative process in x̄/σ (one model evaluation).

    x̄_s = x̄_t + (σ_down − σ_t)·ε(x̄_t, σ_t) + σ_up·z with ``(σ_down, σ_up) = noise_levels(σ_t, σ_s, η)``;
    ``z = noise(i)`` for the i-th step. The carried state is the step index. For generation
    only (σ decreasing): the process injects fresh noise and has no inverse.
    """

    name = "ddim_eta"
    order = 1

    def __init__(self, eta: float | str, noise: Callable[[int], Tensor]) -> None:
        self.eta = check_eta(eta)
        self.noise = noise

    def init(self, f: Any, t0: float, y0: Tensor) -> int:
        return 0

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: int) -> StepResult:
        sigma_down, sigma_up = noise_levels(t0, t1, self.eta)
        eps = f(t0, y0)
        y1 = y0.add(eps, alpha=sigma_down - t0)
        if sigma_up > 0.0:
            # out of place: under a vmap with randomness='different' (its own, or a jacfwd's) z is mapped while
            # the state may not be, and an in-place add into the unmapped state stopped inside torch
            y1 = y1.add(self.noise(state), alpha=sigma_up)
        return StepResult(y1, state + 1)


def _check_generator(generator: object, noise: Tensor) -> torch.Generator | None:
    if generator is None:
        return None
    if isinstance(generator, bool):
        raise TypeError("generator must be a torch.Generator or an int seed, got bool")
    if isinstance(generator, (int, np.integer)):
        return torch.Generator(device=noise.device).manual_seed(check_seed(generator, "generator"))
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or an int seed, got {type(generator).__name__}")
    if generator.device.type != noise.device.type:
        raise ValueError(f"generator is on {generator.device}, noise on {noise.device}; "
                         "create the generator on noise's device")
    return generator


def generate_stochastic(request: Request, noise: Tensor, spec: Stochastic) -> Result:
    """Generate with the DDIM paper's generalized process (``flowdiff.generate(..., solver=flowdiff.Stochastic(eta))``
    runs this; its one-evaluation step replaces the solver).

    ``eta`` in [0, 1] interpolates from the ODE (0: DDIM, bit for bit the Euler solve) to the
    DDPM posterior (1); ``"sigma_hat"`` is DDPM's larger variance (the paper's σ̂). The grid
    arguments mean what they mean for :func:`flowdiff.generate`; each step costs one model
    evaluation, so ``nfe=N`` runs N steps and ``stats.nfe`` counts them exactly.

    Randomness: ``generator`` (a ``torch.Generator`` on noise's device, or an int seed) draws
    one z per noisy step in order; the same generator state gives the same images on the same
    device and dtype, and the same z for every η > 0 (a sweep over η with one seed compares
    the samplers on identical noise). Without it the global torch RNG is used. Or pass
    ``step_noise``: a tensor of shape ``(steps, *noise.shape)`` or a list of ``steps`` tensors,
    ``step_noise[i]`` used at step i (the entry for the step into σ = 0 is unused, as it is in
    diffusers' DDIMScheduler, whose ``step(..., variance_noise=step_noise[i])`` this reproduces).
    At η = 0 no noise is drawn or used. ``stats.extra`` records ``eta`` and ``noise_draws``.
    """
    eta = check_eta(spec.eta)
    gen = _check_generator(spec.generator, noise)  # given with step_noise: refused by Stochastic itself
    euler = solvers.get("euler")
    sig = request.grid.solve_sigmas(request.flow, euler, "generate")  # Euler never evaluates σ = 0
    refuse_infinite_start(float(sig[0]), "the stochastic (eta) process")  # zero terminal SNR (flowdiff.engine.terminal)
    dtype = compute_dtype(noise)
    model_dtype = noise.dtype if noise.dtype != dtype else None
    xbar0 = noise.to(dtype) * math.sqrt(1.0 + sig[0] ** 2)
    source = _StepNoise(spec.step_noise, gen, xbar0, len(sig) - 1)
    step = GeneralizedDDIM(eta, source)
    eps = request.flow.field(request.model_kwargs, model_dtype)
    if (request.check_finite or request.bound is not None) and "Vmap" in _checks.functorch_transforms():
        eps = _checks.refusing_mapped_output(eps, (  # a vmap right around a jvp (others are refused before)
            "generate(solver=flowdiff.Stochastic(...)) under torch.func.vmap around a jvp, with the model's output "
            "mapped over although the noise is not (the model closes over mapped tensors, e.g. an ensemble's "
            "weights stacked by torch.func.stack_module_state, or that vmap's randomness='different' drew each "
            "mapped sample its own step noise, as jacfwd's does), and with the checks on: they read the solve's states "
            "on the host (non-finite states, the divergence guard), which vmap cannot; give "
            "checks=flowdiff.Checks(finite=False, growth=None) to run under vmap"))
    sol = solve_grid(eps, formulation_for(step, "generate"), sig.tolist(), step, xbar0=xbar0,
                     state=0, callback=request.callback, check_finite=request.check_finite, bound=request.bound)
    sol.stats.extra.update(eta=eta, noise_draws=source.draws)
    label = "ddim(sigma_hat)" if eta == SIGMA_HAT else f"ddim(eta={eta:g})"
    return Result(to_model_scale(request.flow, sol.xbar, sig[-1]).to(noise.dtype), sol.stats, sig, label)


register_plugin(Plugin("eta", "generate", "procedure", "the DDIM paper's generalized generative process (eta in "
                       "[0, 1] or 'sigma_hat'): generate(solver=flowdiff.Stochastic(eta, ...))",
                       run=generate_stochastic))
