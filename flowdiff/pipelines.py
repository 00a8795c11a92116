"""Latent-diffusion pipelines as flows: the autoencoder, the prompt encoder, and a scheduler's loop.

Stable Diffusion and its successors (Rombach et al., "High-Resolution Image Synthesis with
Latent Diffusion Models", 2022) run the probability flow in an autoencoder's latent space:
images become latents z = scaling_factor·(E(x) − shift_factor) and back x = D(z/scaling_factor
+ shift_factor); prompts become the denoiser's ``encoder_hidden_states`` through the
pipeline's text encoder. :class:`DiffusersFlow` is the :class:`~flowdiff.ProbabilityFlow` of
such a pipeline's denoiser with those two pieces attached; every solver, encode and decode
works on it unchanged, on latents.

:func:`sample_like` runs a diffusers scheduler's own grid (:func:`flowdiff.scheduler_sigmas`)
with the pipeline's conventions: noise and result in the model's scale (the latents a
pipeline's ``output_type="latent"`` returns), a first σ of ∞ taken as one step from pure noise.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .flow import ProbabilityFlow
from .sampling import Result, generate
from .scheduler_grids import scheduler_sigmas


class Autoencoder:
    """A diffusers ``AutoencoderKL``: ``encode(images)`` = scaling_factor·(latent mean − shift_factor),
    ``decode(latents)`` = the decoder's image of latents/scaling_factor + shift_factor.

    Images are (batch, 3, H, W) in [−1, 1] as diffusers' pipelines use them. The posterior mean
    (not a sample) makes ``encode`` deterministic. Inputs are cast to the VAE's dtype and
    results returned in the input's dtype.
    """

    def __init__(self, vae: nn.Module) -> None:
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents of ``images``: scaling_factor·(mean of q(z | x) − shift_factor)."""
        _check_tensor(images, "images")
        mean = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        return ((mean - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images of ``latents`` (in [−1, 1] up to the decoder's range; not clamped)."""
        _check_tensor(latents, "latents")
        z = latents.to(self.vae.dtype) / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.to(latents.dtype)

    def __repr__(self) -> str:
        return f"Autoencoder({type(self.vae).__name__}, scaling_factor={self.scaling_factor:g})"


class PromptEncoder:
    """A CLIP-style tokenizer and text encoder: prompts → ``{"encoder_hidden_states": ...}``.

    As Stable Diffusion's pipeline does: each prompt padded to the tokenizer's
    ``model_max_length`` and truncated, the encoder's last hidden state taken (with the
    attention mask only where the encoder's config asks for it), cast to ``dtype``.
    """

    def __init__(self, tokenizer: Any, text_encoder: nn.Module, dtype: torch.dtype) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.dtype = dtype

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
                or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r}")
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.to(self.dtype)}


class DiffusersFlow(ProbabilityFlow):
    """The flow of a diffusers denoiser, with what its pipeline adds around it.

    ``autoencoder``: an :class:`Autoencoder` for latent pipelines (None for pixel models);
    ``prompt_encoder``: a :class:`PromptEncoder` (None without a supported text encoder);
    ``scheduler_config``: the scheduler config it was loaded with (for
    :func:`flowdiff.scheduler_sigmas` and :func:`sample_like`); ``sample_shape``: one sample's
    (latent) shape, for making noise.
    """

    autoencoder: Autoencoder | None = None
    prompt_encoder: PromptEncoder | None = None
    scheduler_config: dict[str, Any]
    sample_shape: tuple[int, ...]

    def encode_prompt(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """``model_kwargs`` for ``prompts`` through the pipeline's own text encoder.

        The unconditional branch of classifier-free guidance is the empty (or negative)
        prompt: ``classifier_free_guidance(flow, 7.5, unconditional_kwargs=flow.encode_prompt([""] * n))``.
        """
        if self.prompt_encoder is None:
            raise ValueError("this flow has no prompt encoder (no supported tokenizer + text_encoder in its "
                             "pipeline); pass the denoiser's conditioning as model_kwargs yourself")
        kwargs = self.prompt_encoder(prompts)
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None) \
            if isinstance(self.model, nn.Module) else None
        return {k: v.to(dtype) if dtype is not None else v for k, v in kwargs.items()}  # the denoiser's dtype now

    def scheduler_sigmas(self, steps: int, *, mu: float | None = None, sigmas: Any = None) -> np.ndarray:
        """The σ grid its own scheduler runs for ``steps`` steps (:func:`flowdiff.scheduler_sigmas`)."""
        return scheduler_sigmas(self.scheduler_config, steps, mu=mu, sigmas=sigmas)


def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    return x


def _model_per_ddim(schedule: Any, sigma: float) -> float:
    """x_model / x_DDIM at σ: α(σ)·√(1+σ²) — exactly 1 for VP, whose model scale is DDIM's."""
    return 1.0 if schedule.kind == "vp" else schedule.alpha(sigma) * math.sqrt(1.0 + sigma * sigma)


def sample_like(flow: ProbabilityFlow, noise: Tensor, scheduler: object = None, steps: int | None = None, *,
                solver: str = "euler", mu: float | None = None, sigmas: Any = None,
                model_kwargs: Mapping[str, Any] | None = None,
                **generate_kwargs: Any) -> Result:
    """What a diffusers pipeline's loop with ``scheduler`` returns from ``noise``, by ``solver``.

    ``noise`` is the pipeline's initial latents in the model's own scale (``randn`` for DDIM and
    flow matching, whose ``init_noise_sigma`` is 1); the result's ``x`` is the final latents as
    the pipeline returns them (``output_type="latent"``), i.e. α(σ_end)·x̄ — σ_end is σ_min for
    DDIM with ``set_alpha_to_one=False``. The grid is :func:`flowdiff.scheduler_sigmas`
    (``scheduler`` defaults to the flow's own ``scheduler_config``). With ``solver="euler"`` this
    is the scheduler's loop: DDIM's step and flow matching's x + (t' − t)·v are both Euler on
    dx̄/dσ = ε. ``mu`` and ``sigmas`` are those a flow-matching pipeline passes to
    ``set_timesteps`` (Flux: its resolution-dependent shift and ``linspace(1, 1/steps, steps)``).
    A grid starting at σ = ∞ (flow matching, zero terminal SNR) takes its first step with
    :meth:`~flowdiff.ProbabilityFlow.step_from_noise`, as :func:`flowdiff.generate` does
    (:mod:`flowdiff.terminal`; counted in ``stats.nfe``). Further keywords go to :func:`flowdiff.generate`.
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    _check_tensor(noise, "noise")
    if steps is None:
        raise TypeError("sample_like needs steps= (the pipeline's num_inference_steps)")
    if scheduler is None:
        scheduler = getattr(flow, "scheduler_config", None)
        if scheduler is None:
            raise ValueError("this flow carries no scheduler_config; pass scheduler= (a diffusers scheduler, "
                             "its config or its directory)")
    grid = scheduler_sigmas(scheduler, steps, mu=mu, sigmas=sigmas)
    schedule = flow.schedule
    # at σ = ∞ the model's input is the noise itself (α = 0, s = 1), which is also DDIM's x_T there
    x_T = noise if math.isinf(grid[0]) else noise / _model_per_ddim(schedule, float(grid[0]))
    res = generate(flow, x_T, solver=solver, sigmas=grid, model_kwargs=model_kwargs, **generate_kwargs)
    end = float(grid[-1])
    return dataclasses.replace(res, x=res.x if end == 0 else res.x * schedule.alpha(end))
