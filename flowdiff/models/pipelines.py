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

import solvers

from ..api.sampling import Result, encode, generate
from ..engine._checks import check_data_range
from ..engine.flow import ProbabilityFlow, from_model_scale
from ..engine.formulations import prefer_variables
from ..engine.grids import _check_steps, reversed_grid
from ..engine.plugins import Plugin, register_plugin
from ..engine.scheduler_grids import (
    class_name,
    config_grid,
    config_of,
    ddim_inverse_sigmas,
    ddim_timesteps,
    schedule_from_config,
    scheduler_sigmas,
    unidentified,
    with_defaults,
    without_filled,
)


class Autoencoder:
    """A diffusers ``AutoencoderKL``: ``encode(images)`` = scaling_factor·(latent mean − shift_factor),
    ``decode(latents)`` = the decoder's image of latents/scaling_factor + shift_factor.

    Images are (batch, 3, H, W) in [−1, 1] as diffusers' pipelines use them. The posterior mean
    (not a sample) makes ``encode`` deterministic. Inputs are cast to the VAE's dtype and
    results returned in the input's dtype.
    """

    def __init__(self, vae: nn.Module, *, latents_stats: bool = False) -> None:
        self.vae = vae
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        shift = getattr(cfg, "shift_factor", None)
        self.shift_factor = 0.0 if shift is None else float(shift)
        #: per-channel latent statistics (``latents_mean``, ``latents_std`` of the VAE's config) where the pipeline
        #: reads them (SDXL's, e.g. Playground v2.5): z = scaling_factor·(mean − latents_mean)/latents_std
        self.latents_mean: Tensor | None = None
        self.latents_std: Tensor | None = None
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        if latents_stats and mean is not None and std is not None:
            self.latents_mean = torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)
            self.latents_std = torch.tensor(std, dtype=torch.float64).view(1, -1, 1, 1)

    @property
    def factor(self) -> int:
        """Image pixels per latent pixel: 2 to the number of the encoder's downsamplings."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _check_shape(self, x: Tensor, name: str, channels: int, what: str, factor: int = 1) -> None:
        """``x`` is (batch, channels, H, W) with H and W multiples of ``factor``: a ValueError naming ``name``."""
        if x.ndim != 4 or x.shape[1] != channels or x.shape[-1] % factor or x.shape[-2] % factor:
            sizes = f", H and W multiples of {factor} (the VAE's downsampling)" if factor > 1 else ""
            raise ValueError(f"{name} must be (batch, {channels}, H, W): {what}{sizes}; got shape {tuple(x.shape)}")

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latents of ``images``: scaling_factor·(mean of q(z | x) − shift_factor).

        ``images`` are (batch, C, H, W) with the VAE's ``in_channels`` and H, W multiples of :attr:`factor`:
        the encoder would drop the rows and columns past the last multiple, and the decode be smaller."""
        _check_tensor(images, "images")
        self._check_shape(images, "images", int(self.vae.config.in_channels),
                          f"the VAE's in_channels={self.vae.config.in_channels}", self.factor)
        check_data_range(images, "images")  # a warning for [0, 255] pixels: the VAE takes [−1, 1]
        mean = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
        if self.latents_mean is not None:  # SDXL's img2img: (z − latents_mean)·scaling_factor/latents_std
            m, s = (v.to(mean.device, mean.dtype) for v in (self.latents_mean, self.latents_std))
            return ((mean - m) * self.scaling_factor / s).to(images.dtype)
        return ((mean - self.shift_factor) * self.scaling_factor).to(images.dtype)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images of ``latents`` (in [−1, 1] up to the decoder's range; not clamped)."""
        _check_tensor(latents, "latents")
        self._check_shape(latents, "latents", int(self.vae.config.latent_channels),
                          f"the VAE's latent_channels={self.vae.config.latent_channels}")
        z = latents.to(self.vae.dtype)
        if self.latents_mean is not None:  # SDXL's decode: z·latents_std/scaling_factor + latents_mean
            m, s = (v.to(z.device, z.dtype) for v in (self.latents_mean, self.latents_std))
            z = z * s / self.scaling_factor + m
        else:
            z = z / self.scaling_factor + self.shift_factor
        return self.vae.decode(z).sample.to(latents.dtype)

    def image_shape(self, sample_shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) of the images whose latents have ``sample_shape`` (C, h, w)."""
        _, h, w = sample_shape
        return int(self.vae.config.in_channels), int(h) * self.factor, int(w) * self.factor

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.vae).__name__}, scaling_factor={self.scaling_factor:g})"


class PackedAutoencoder(Autoencoder):
    """Flux's autoencoder with its 2×2 packing: the flow runs on packed latents (batch, tokens, 4·C).

    ``encode(images)``: the VAE's latents (:class:`Autoencoder`), each 2×2 patch of them one token
    of 4·C channels (diffusers' ``FluxPipeline._pack_latents``); ``decode`` unpacks
    (``FluxPipeline._unpack_latents``) and decodes. Both helpers are diffusers' own static
    methods, passed in. The image size of a decode is ``image_size`` (the VAE's ``sample_size``)
    when the token count fits it, else the square one the token count gives (:meth:`image_hw`).
    """

    def __init__(self, vae: nn.Module, pack: Any, unpack: Any, image_size: tuple[int, int] | None = None) -> None:
        super().__init__(vae)
        self._pack, self._unpack = pack, unpack
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        size = getattr(vae.config, "sample_size", None) if image_size is None else image_size
        self.image_size = None if size is None else ((size, size) if isinstance(size, int) else tuple(size))

    @property
    def patch(self) -> int:
        """Image pixels per token side: the VAE's factor times the 2×2 packing."""
        return 2 * self.vae_scale_factor

    def token_grid(self, tokens: int) -> tuple[int, int]:
        """The (rows, columns) of tokens that ``tokens`` packed latents stand for (see :meth:`image_hw`)."""
        h, w = self.image_hw(tokens)
        return h // self.patch, w // self.patch

    def image_hw(self, tokens: int) -> tuple[int, int]:
        """The (H, W) of the images ``tokens`` packed latents decode to."""
        if self.image_size is not None:
            h, w = self.image_size
            if (h // self.patch) * (w // self.patch) == tokens:
                return h, w
        side = math.isqrt(tokens)
        if side * side != tokens:
            raise ValueError(f"packed latents of {tokens} tokens fit neither the autoencoder's image size "
                             f"{self.image_size} nor a square image; pass img_ids for other shapes")
        return side * self.patch, side * self.patch

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Packed latents of ``images``: (batch, (h/2)·(w/2), 4·C) for latents of (C, h, w)."""
        _check_tensor(images, "images")
        if images.ndim != 4 or images.shape[-1] % self.patch or images.shape[-2] % self.patch:
            raise ValueError(f"images must be (batch, C, H, W) with H and W multiples of {self.patch} (the VAE's "
                             f"factor {self.vae_scale_factor} times Flux's 2×2 packing), got {tuple(images.shape)}")
        z = super().encode(images)
        b, c, h, w = z.shape
        return self._pack(z, b, c, h, w)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Images of packed ``latents`` (batch, tokens, 4·C)."""
        _check_tensor(latents, "latents")
        if latents.ndim != 3:
            raise ValueError(f"packed latents must be (batch, tokens, channels), got {tuple(latents.shape)}")
        h, w = self.image_hw(latents.shape[1])
        return super().decode(self._unpack(latents, h, w, self.vae_scale_factor))

    def image_shape(self, sample_shape: Sequence[int]) -> tuple[int, int, int]:
        """The (C, H, W) of the images whose packed latents have ``sample_shape`` (tokens, channels)."""
        h, w = self.image_hw(int(sample_shape[0]))
        return int(self.vae.config.in_channels), h, w


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
        _check_prompts(prompts)
        tokens = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        device = next(self.text_encoder.parameters()).device
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return {"encoder_hidden_states": hidden.to(self.dtype)}


class PipelinePromptEncoder:
    """The text encoders of an SD3 or Flux pipeline: prompts → ``model_kwargs``, by the pipeline's own
    ``encode_prompt``.

    ``pipeline`` is the diffusers pipeline holding only its tokenizers and text encoders (no
    denoiser, VAE or scheduler). SDXL (Podell et al. 2023): two CLIP encoders, their penultimate hidden
    states side by side as ``encoder_hidden_states``, the second's pooled projection as ``text_embeds``
    and the size conditioning ``time_ids`` (:meth:`time_ids`; the UNet gets both as
    ``added_cond_kwargs``). Stable Diffusion 3 (Esser et al. 2024): two CLIP encoders with
    projection and T5; its ``encoder_hidden_states`` are the CLIP embeddings (zero-padded to T5's
    width) followed by T5's, its ``pooled_projections`` the two pooled CLIP outputs side by side.
    Flux: T5's ``encoder_hidden_states`` and the CLIP pooled output; for a guidance-distilled Flux
    (``guidance_embeds``) also ``guidance``, the embedded guidance scale :attr:`embedded_guidance`
    (FluxPipeline's ``guidance_scale``, 3.5 by default). ``max_sequence_length``: T5's padded
    length (the pipelines' defaults: SD3 256, Flux 512).
    """

    #: the pipeline class name → its ``__call__``'s default ``max_sequence_length`` (None: CLIP only)
    MAX_SEQUENCE_LENGTH = {"StableDiffusion3Pipeline": 256, "FluxPipeline": 512, "StableDiffusionXLPipeline": None}

    def __init__(self, pipeline: Any, dtype: torch.dtype, *, guidance_embeds: bool = False) -> None:
        name = type(pipeline).__name__
        if name not in self.MAX_SEQUENCE_LENGTH:
            raise ValueError(f"PipelinePromptEncoder supports {', '.join(self.MAX_SEQUENCE_LENGTH)}, got {name}")
        self.pipeline = pipeline
        self.kind = name
        self.dtype = dtype
        self.max_sequence_length = self.MAX_SEQUENCE_LENGTH[name]
        self.guidance_embeds = guidance_embeds
        self._embedded_guidance = 3.5
        #: SDXL: the (H, W) of its images, for the size ids (from_diffusers sets it from the UNet and VAE)
        self.image_size: tuple[int, int] | None = None
        #: SDXL's ``force_zeros_for_empty_prompt`` (its model_index.json, True by default): without a negative
        #: prompt the unconditional branch is zero embeddings, not the empty prompt's
        #: (:meth:`DiffusersFlow.encode_negative_prompt`)
        self.zeros_for_no_negative = False

    @property
    def embedded_guidance(self) -> float:
        """A guidance-distilled Flux's embedded guidance scale (FluxPipeline's ``guidance_scale``, 3.5 by default)."""
        return self._embedded_guidance

    @embedded_guidance.setter
    def embedded_guidance(self, value: float) -> None:
        if not self.guidance_embeds:  # it reaches no model: the attribute was set and nothing changed
            raise ValueError(f"embedded_guidance={value!r}: this {self.kind}'s transformer has no guidance embedding "
                             "(guidance_embeds=False), so it would change nothing; a guidance-distilled Flux "
                             "(Flux-dev) has one; guide this one with classifier_free_guidance")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"embedded_guidance must be a finite number (FluxPipeline's guidance_scale), got {value!r}")
        self._embedded_guidance = float(value)

    def time_ids(self, n: int, device: torch.device) -> Tensor:
        """SDXL's size conditioning for ``n`` prompts: (original H, W, crop top, left, target H, W), the
        pipeline's defaults — original = target = its default image size, no crop."""
        if self.image_size is None:
            raise ValueError("SDXL's time_ids need the image size: set PipelinePromptEncoder.image_size")
        h, w = self.image_size
        return torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=device).expand(n, 6)

    @property
    def text_encoders(self) -> list[nn.Module]:
        return [m for k in ("text_encoder", "text_encoder_2", "text_encoder_3")
                if isinstance(m := getattr(self.pipeline, k, None), nn.Module)]

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        _check_prompts(prompts)
        device = next(self.text_encoders[0].parameters()).device
        if self.kind == "StableDiffusionXLPipeline":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(list(prompts), device=device,
                                                               do_classifier_free_guidance=False)
            return {"encoder_hidden_states": embeds.to(self.dtype), "text_embeds": pooled.to(self.dtype),
                    "time_ids": self.time_ids(len(prompts), device)}
        if self.kind == "StableDiffusion3Pipeline":
            embeds, _, pooled, _ = self.pipeline.encode_prompt(
                list(prompts), None, None, device=device, do_classifier_free_guidance=False,
                max_sequence_length=self.max_sequence_length)
        else:
            embeds, pooled, _ = self.pipeline.encode_prompt(list(prompts), None, device=device,
                                                            max_sequence_length=self.max_sequence_length)
        kwargs = {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}
        if self.guidance_embeds:  # FluxPipeline: torch.full([1], guidance_scale) expanded to the batch
            kwargs["guidance"] = torch.full([1], float(self.embedded_guidance), device=device, dtype=torch.float32)
        return kwargs


def _check_prompts(prompts: object) -> None:
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts \
            or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"prompts must be a non-empty list of strings, got {prompts!r}")


class DiffusersFlow(ProbabilityFlow):
    """The flow of a diffusers denoiser, with what its pipeline adds around it.

    ``autoencoder``: an :class:`Autoencoder` for latent pipelines (None for pixel models; a
    :class:`PackedAutoencoder` for Flux, whose flow runs on packed latents);
    ``prompt_encoder``: a :class:`PromptEncoder` (Stable Diffusion 1/2) or
    :class:`PipelinePromptEncoder` (SD3, Flux), None without supported text encoders;
    ``default_guidance``: the guidance scale the pipeline uses by default (SD 7.5, SD3 7.0, Flux
    1.0: its ``true_cfg_scale``); ``packed``: a Flux flow, on packed latents (batch, tokens, channels);
    ``scheduler_config``: the scheduler config it was loaded with (for
    :func:`flowdiff.scheduler_sigmas` and :func:`sample_like`); ``sample_shape``: one sample's
    (latent) shape, for making noise.
    """

    autoencoder: Autoencoder | None = None
    prompt_encoder: PromptEncoder | PipelinePromptEncoder | None = None
    default_guidance: float = 7.5
    packed: bool = False
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

    def encode_negative_prompt(self, negative_prompts: Sequence[str] | None = None,
                               n: int | None = None) -> dict[str, Tensor]:
        """The unconditional branch's ``model_kwargs`` as the pipeline makes it for its ``negative_prompt``.

        Given prompts: their embeddings (:meth:`encode_prompt`), one per prompt (``n`` is for no prompts only).
        ``None`` (the pipeline called without one): the empty prompt's embeddings for ``n`` samples (default 1) —
        except for SDXL, whose pipeline (``force_zeros_for_empty_prompt``, its default) takes zero text embeddings
        and zero pooled embeddings then (the size ids stay), so
        ``classifier_free_guidance(flow, 5.0, unconditional_kwargs=flow.encode_negative_prompt())`` is its loop.
        """
        if negative_prompts is not None:
            if n is not None:  # the prompts' count is their batch: n beside them was ignored
                raise TypeError(f"encode_negative_prompt takes n= (default 1) without negative_prompts only: the "
                                f"batch is one per prompt of negative_prompts={negative_prompts!r}; got n={n!r} "
                                "beside them")
            return self.encode_prompt(negative_prompts)
        n = 1 if n is None else n
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be the number of samples, an int >= 1, got {type(n).__name__} {n!r}")
        if n < 1:
            raise ValueError(f"n must be the number of samples, an int >= 1, got {n}")
        kwargs = self.encode_prompt([""] * n)
        if getattr(self.prompt_encoder, "zeros_for_no_negative", False):
            kwargs = {k: v if k == "time_ids" else torch.zeros_like(v) for k, v in kwargs.items()}
        return kwargs

    def named_grid(self, name: str, steps: int) -> np.ndarray | None:
        """The grid ``grid=name`` means for this model: ``leading``/``trailing`` are its scheduler config's own
        timesteps (:func:`flowdiff.engine.scheduler_grids.config_grid`: ``steps_offset``), then σ = 0;
        None (the generic grid) for other names, for flow-matching configs, or without a
        ``scheduler_config``."""
        config = getattr(self, "scheduler_config", None)
        return None if config is None else config_grid(config, name, steps)

    def scheduler_sigmas(self, steps: int, *, mu: float | None = None, sigmas: Any = None) -> np.ndarray:
        """The σ grid its own scheduler runs for ``steps`` steps (:func:`scheduler_plan`: for DDIM, PNDM and
        flow matching :func:`flowdiff.scheduler_sigmas`; Euler, Heun, LMS and DPM-Solver read off diffusers)."""
        return scheduler_plan(self.scheduler_config, steps, mu=mu, sigmas=sigmas).sigmas


def _check_tensor(x: object, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{name} must be a floating-point torch.Tensor, got {got}")
    return x


def _model_per_ddim(schedule: Any, sigma: float) -> float:
    """x_model / x_DDIM at σ: α(σ)·√(1+σ²) — exactly 1 for VP, whose model scale is DDIM's."""
    return 1.0 if schedule.kind == "vp" else schedule.alpha(sigma) * math.sqrt(1.0 + sigma * sigma)


def flux_grid_arguments(scheduler: object, tokens: int, steps: int) -> tuple[float | None, np.ndarray]:
    """The ``mu`` and unshifted ``sigmas`` that ``FluxPipeline`` passes to ``set_timesteps`` for ``tokens``
    packed latents: its times ``linspace(1, 1/steps, steps)`` and, for a ``use_dynamic_shifting``
    config, the shift diffusers' own ``calculate_shift`` gives for that sequence length (None otherwise)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    config = config_of(scheduler)[0]
    base = np.linspace(1.0, 1 / steps, steps)
    if not config.get("use_dynamic_shifting"):
        return None, base
    mu = calculate_shift(tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return float(mu), base


#: diffusers' FlowMatchHeunDiscreteScheduler's method: Heun's trapezoidal rule in rectified flow's own time
#: t = σ/(1+σ) and sample x = x̄/(1+σ), with the velocity as the field
#: (:class:`flowdiff.engine.formulations.FlowMatching`). The time-dependent scaling of the state makes it
#: another method than ``heun`` in σ; Euler is the same in both (DDIM).
FLOWMATCH_HEUN = "flowmatch_heun"


def _flowmatch_heun(options: dict[str, Any]) -> solvers.Solver:
    if options:
        raise TypeError(f"solver {FLOWMATCH_HEUN!r} takes no options, got {sorted(options)}")
    return solvers.ExplicitRK(FLOWMATCH_HEUN, solvers.get("heun").tableau, 2)


prefer_variables(FLOWMATCH_HEUN, "flow_matching")
register_plugin(Plugin(FLOWMATCH_HEUN, "generate", "solver", "diffusers' FlowMatchHeunDiscreteScheduler: Heun in "
                       "rectified flow's t and x = x̄/(1+σ) (velocity field); 2 evaluations a step, the last into "
                       "σ = 0 Euler", make=_flowmatch_heun, decodes_with="euler"))

#: the scheduler configs :func:`encode_like` reads as ``DDIMInverseScheduler.from_config(config)`` does
INVERTED_SCHEDULERS = ("DDIMInverseScheduler", "DDIMScheduler", "PNDMScheduler")
#: the diffusers schedulers whose deterministic loop flowdiff reproduces (:func:`scheduler_plan`)
PLANNED_SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", "FlowMatchEulerDiscreteScheduler",
                      "FlowMatchHeunDiscreteScheduler", "EulerDiscreteScheduler", "HeunDiscreteScheduler",
                      "LMSDiscreteScheduler", "DPMSolverMultistepScheduler")
#: schedulers refused by name, and why (their nearest flowdiff solver is named in the message)
_NOT_EQUAL = {
    "UniPCMultistepScheduler": "its bh1/bh2 predictor–corrector is not flowdiff's solver='unipc' (the nearest)",
    "DEISMultistepScheduler": "its multistep weights are not checked equal to solver='deis' (the nearest)",
    "DPMSolverMultistepInverseScheduler": "its inverse grid and steps are not checked equal to flowdiff's "
                                          "encode (the nearest: flowdiff.encode with solver='dpmpp_2m')",
    "EulerAncestralDiscreteScheduler": "it adds fresh noise at every step (a stochastic sampler, not the ODE)",
    "DDPMScheduler": "it adds fresh noise at every step (a stochastic sampler, not the ODE)",
    "FlowMatchLCMScheduler": "its step jumps to the model's x̂₀ and re-noises it with fresh noise at the next level "
                             "(a consistency sampler, not the ODE); its σ levels are flowdiff.scheduler_sigmas",
    "DDIMInverseScheduler": "it encodes: flowdiff.encode_like(flow, images, scheduler, steps) is its loop",
}


@dataclasses.dataclass(frozen=True)
class SchedulerPlan:
    """How flowdiff runs a diffusers scheduler's deterministic loop (:func:`scheduler_plan`).

    ``sigmas``: the σ grid (float64, decreasing; ``inf`` first for a start from pure noise);
    ``timesteps``: σ → the time the scheduler feeds the model there (before a pipeline's own
    scaling, e.g. Flux's 1/1000); ``solver`` and ``solver_options``: the flowdiff method whose
    steps are the scheduler's; ``state``: what the scheduler's sample is — ``"model"`` (x = α·x̄:
    DDIM, DPM-Solver, flow matching) or ``"sigma"`` (x̄ itself: Euler, k-diffusion's scale);
    ``init_noise_sigma``: the factor of the pipeline's initial latents (``randn·init_noise_sigma``).
    """

    scheduler: str
    sigmas: np.ndarray
    timesteps: dict[float, float]
    solver: str
    solver_options: dict[str, Any]
    state: str
    init_noise_sigma: float


def _refuse(source: str, config: Mapping[str, Any], checks: Sequence[tuple[str, Any, str]]) -> None:
    """ValueError naming the first option whose value leaves the ODE or a method flowdiff has."""
    for key, accepted, why in checks:
        value = config.get(key, accepted[0])
        if value not in accepted:
            raise ValueError(f"{source}: {key}={value!r} is not reproduced ({why}); accepted: "
                             f"{', '.join(repr(a) for a in accepted)}")


def _from_diffusers_scheduler(name: str, config: Mapping[str, Any], steps: int, **set_timesteps: Any) -> Any:
    try:
        import diffusers
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError(f"the grid of {name} is read from diffusers' own scheduler: pip install diffusers") from None
    scheduler = getattr(diffusers, name).from_config(dict(config))
    arguments = {k: v for k, v in set_timesteps.items() if v is not None}
    try:
        scheduler.set_timesteps(steps, **arguments)
    except (ArithmeticError, IndexError, KeyError, ValueError, AssertionError) as e:  # its own failure, named
        given = "".join(f", {k}={v!r}" for k, v in arguments.items())
        raise ValueError(f"scheduler {name}: diffusers' own set_timesteps fails with steps={steps}{given}"
                         f"{_grid_options({**config, '_class_name': name})} ({type(e).__name__}: {e}); "
                         "not reproduced") from e
    return scheduler


def _without_zero_length_steps(sig: np.ndarray, ts: np.ndarray, solver: str) -> tuple[np.ndarray, np.ndarray]:
    """The grid and timesteps less the steps of zero length that can be left out exactly: every one for Euler (one
    evaluation a step, at its start); for Heun the first, or one whose timestep is the next step's (Heun's step into
    that level evaluates there with the level's own timestep, which the next step's would replace). Zero-length
    steps that remain are refused by the caller."""
    n = len(sig) - 1
    drop = np.diff(sig) == 0
    if solver == "heun":
        same_next = np.array([i + 1 < len(ts) and ts[i] == ts[i + 1] for i in range(n)], dtype=bool)
        drop &= (np.arange(n) == 0) | same_next
    if not drop.any() or drop.all():
        return sig, ts
    keep = ~drop
    return np.append(sig[:-1][keep], sig[-1]), ts[:n][keep]


#: the config options that shape the σ grid of the schedulers whose grid is read off diffusers
_GRID_OPTIONS = ("num_train_timesteps", "timestep_spacing", "steps_offset", "rescale_betas_zero_snr",
                 "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas",
                 "interpolation_type", "sigma_min", "sigma_max", "timestep_type", "final_sigmas_type", "shift",
                 "shift_terminal", "use_dynamic_shifting")


def _grid_options(config: Mapping[str, Any]) -> str:
    """``", key=value, …"`` for the grid-shaping options of a diffusers scheduler config that differ from its class's
    defaults (``timestep_spacing`` always)."""
    defaults = with_defaults({"_class_name": class_name(config)})
    items = [f"{k}={config[k]!r}" for k in _GRID_OPTIONS if k in config
             and (k == "timestep_spacing" or config[k] != defaults.get(k, config[k]))]
    return "".join(", " + item for item in items)


def _read_plan(name: str, scheduler: Any, solver: str, options: dict[str, Any], state: str) -> SchedulerPlan:
    ts = scheduler.timesteps.double().numpy()
    if len(ts) > 1 and np.sum(ts == ts[0]) > 1:  # e.g. use_lu_lambdas or Karras σ on a zero-terminal-SNR table
        raise ValueError(f"{name}: its timesteps {np.array2string(ts[:4], precision=3)}... repeat the first one, "
                         f"{ts[0]:g}; diffusers' step finds its place by timestep, takes the repeat for the first "
                         "step and runs past its σ table (IndexError), so this loop is not reproduced; use fewer "
                         "steps, or another σ spacing")
    # the loop runs len(timesteps) steps: Euler's interpolation_type="log_linear" keeps one σ more, never reached
    sig = scheduler.sigmas.double().numpy()[: len(ts) + 1].copy()
    if len(sig) > 2 and sig[-1] == sig[-2]:  # a last step from σ_min to σ_min (final_sigmas_type="sigma_min"
        sig = sig[:-1]                       # on a grid ending at σ_min): it leaves the sample as it is
        options = {k: v for k, v in options.items() if k != "lower_order_final"}  # that step was the first-order one
    if solver in ("euler", "heun"):  # one-step methods: a step of zero length (a timestep past the table, clamped
        sig, ts = _without_zero_length_steps(sig, ts, solver)  # to its last σ) leaves the sample as it is
    if not np.all(np.diff(sig) < 0):  # (NaN too: a shift_terminal that divides by 0)
        i = int(np.argmax(~(np.diff(sig) < 0)))
        shaped_by = _grid_options({**scheduler.config, "_class_name": name})
        raise ValueError(f"{name}: its σ grid {np.array2string(sig, precision=4, threshold=8)} is not "
                         f"strictly decreasing: step {i} goes from σ {sig[i]:.6g} to {sig[i + 1]:.6g}, with "
                         f"steps={len(ts)}{shaped_by}; one σ grid cannot run it: not reproduced")
    return SchedulerPlan(name, sig, dict(zip(sig[:-1].tolist(), ts.tolist())), solver, options, state,
                         float(scheduler.init_noise_sigma))


#: FlowMatchEulerDiscreteScheduler's options whose grid :func:`scheduler_plan` reads off diffusers' own scheduler
#: (Karras, exponential or beta σ over the shifted times, the stretch to ``shift_terminal``)
_FLOW_MATCHING_READ = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "shift_terminal")


def _read_flow_matching_plan(name: str, config: Mapping[str, Any], steps: int, mu: float | None, sigmas: Any,
                             source: str) -> SchedulerPlan:
    """The plan of a FlowMatchEulerDiscreteScheduler config whose times diffusers computes with one of
    :data:`_FLOW_MATCHING_READ`: its own ``set_timesteps(steps, mu=, sigmas=)``, the times t read as σ = t/(1−t)
    (t = 1: σ = ∞) and its float32 timesteps t·T fed as they are; Euler, as for its other grids."""
    _refuse(source, config, (
        ("invert_sigmas", (False,), "its steps run from t = 1 − t₀ up to 1, toward noise, feeding the model 1 − t"),
        ("stochastic_sampling", (False,), "it re-noises the model's x̂₀ with fresh noise at every step: not the ODE"),
    ))
    dynamic = bool(config.get("use_dynamic_shifting"))
    if dynamic and mu is None:
        raise ValueError(f"{source}: use_dynamic_shifting=True needs mu= (the resolution-dependent shift)")
    if not dynamic and mu is not None:
        raise ValueError(f"{source}: mu= is for use_dynamic_shifting=True configs; this one shifts by "
                         f"shift={config.get('shift', 1.0)}")
    sched = _from_diffusers_scheduler(name, config, steps, mu=mu, sigmas=None if sigmas is None else list(sigmas))
    t = sched.sigmas.double().numpy()
    if not np.isfinite(t).all():
        raise ValueError(f"{source}: diffusers' {name}.set_timesteps({steps}) gives times "
                         f"{np.array2string(t, precision=4, threshold=8)}, not all finite, with steps={steps}"
                         f"{_grid_options({**config, '_class_name': name})}"
                         f"{'' if mu is None else f', mu={mu!r}'}: its loop fails; not reproduced")
    if np.any(t > 1):  # only a pipeline's own sigmas= reach past t = 1 (Karras, exponential, beta σ span them)
        given = np.asarray(sigmas, dtype=np.float64).tolist()
        raise ValueError(f"{source}: sigmas={given!r} holds flow-matching times above 1, and diffusers' "
                         f"{name}.set_timesteps({steps}) steps from t = {float(t[0]):.6g}: a time t > 1 has no "
                         "σ = t/(1−t) ≥ 0, so no flowdiff grid runs it; give times in (0, 1]")
    with np.errstate(divide="ignore", invalid="ignore"):
        sig = np.where(t < 1, t / (1 - t), np.inf)
    shim = _ReadGrid(torch.from_numpy(sig), sched.timesteps, 1.0, sched.config)
    return _read_plan(name, shim, "euler", {}, "model")


@dataclasses.dataclass(frozen=True)
class _ReadGrid:
    """What :func:`_read_plan` reads of a diffusers scheduler: its σ, timesteps, initial noise scale and config."""

    sigmas: Tensor
    timesteps: Tensor
    init_noise_sigma: float
    config: Mapping[str, Any]


def scheduler_plan(scheduler: object, steps: int, *, mu: float | None = None, sigmas: Any = None) -> SchedulerPlan:
    """The grid, the fed timesteps and the solver that reproduce ``scheduler``'s loop of ``steps`` steps.

    ``scheduler``: a diffusers scheduler, its config dict, a directory or a ``scheduler_config.json``
    (a dict without ``_class_name`` is recognised by its keys, or refused). Reproduced, to float
    rounding, by :func:`sample_like`:

    * ``DDIMScheduler`` (η = 0) and ``FlowMatchEulerDiscreteScheduler``: Euler on
      :func:`flowdiff.scheduler_sigmas`; ``PNDMScheduler`` with ``skip_prk_steps`` (Stable Diffusion 1.x's
      own scheduler) and ε prediction: ``pndm`` (a Heun first step, then iPNDM) on the same grid; flow matching
      with Karras, exponential or beta σ or ``shift_terminal``: Euler on the grid read off diffusers' own
      ``set_timesteps`` (σ = t/(1−t));
    * ``EulerDiscreteScheduler`` (``s_churn = 0``): Euler on its σ grid, whatever the spacing,
      ``interpolation_type``, Karras/exponential/beta σ, ``final_sigmas_type`` or zero-SNR σ_max;
      ``HeunDiscreteScheduler``: ``heun`` (its last step, into σ = 0, Euler); ``LMSDiscreteScheduler``:
      ``lms`` of order 4;
    * ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` and the ``midpoint``
      solver: ``solver_order=1`` is ``dpmpp_2m`` with ``order=1`` (DPM-Solver++(1): DDIM in the data
      variables), ``2`` is ``dpmpp_2m`` with its ``lower_order_final`` option where diffusers' last step is
      first order (``euler_at_final``, or ``lower_order_final`` below 15 steps); Karras, exponential, beta
      and ``use_lu_lambdas`` grids.

    The grids of Euler, Heun, LMS and DPM-Solver are read off diffusers' own scheduler (``set_timesteps``),
    float32 as diffusers keeps them. A last step of zero length (σ_min to σ_min, where the grid's
    last timestep is 0 and the final σ is σ_min) is left out: diffusers spends one model
    evaluation on it and leaves its sample unchanged; so is any zero-length step of Euler and Heun
    (a 'leading' timestep past the table, read at its last σ: ``steps_offset`` with steps near T).
    A loop whose first timestep repeats (diffusers' own crashes), a σ grid that is not strictly decreasing
    and a ``set_timesteps`` that fails in diffusers are refused, naming ``steps`` and the options that shape
    the grid. Other schedulers and options are refused by
    name, saying why (``clip_sample`` and ``thresholding`` change x̂₀ at every step: not the ODE).
    """
    config, source = config_of(scheduler)
    steps = _check_steps(steps)  # every route: the ones read off diffusers' own scheduler did not check it
    name = class_name(config)
    if name is None:
        raise unidentified(config, source)
    if name in _NOT_EQUAL:
        raise ValueError(f"{source}: {name} is not reproduced: {_NOT_EQUAL[name]}; reproduced: "
                         f"{', '.join(PLANNED_SCHEDULERS)}")
    if name not in PLANNED_SCHEDULERS:
        raise ValueError(f"{source}: unknown scheduler {name!r}; reproduced: {', '.join(PLANNED_SCHEDULERS)}")
    config = with_defaults({**without_filled(config, scheduler, name, source), "_class_name": name})  # as from_config
    _refuse_set_shift(scheduler, config, source)
    solver = "euler"
    if name == "PNDMScheduler":
        _refuse(source, config, (
            ("skip_prk_steps", (True,), "its Runge–Kutta warm-up (PRK) steps at half levels are none of flowdiff's "
                                        "solvers; Stable Diffusion's configs skip them"),
            ("prediction_type", ("epsilon",), "PNDM turns v into ε at the level of the step's start, also for "
                                              "its first step's end evaluation: not the ODE's field"),
        ))
        solver = "pndm"
    if name == "FlowMatchEulerDiscreteScheduler" and any(config.get(k) for k in _FLOW_MATCHING_READ):
        return _read_flow_matching_plan(name, config, steps, mu, sigmas, source)
    if name == "FlowMatchHeunDiscreteScheduler":  # scheduler_sigmas refuses mu= and sigmas= for it
        solver = FLOWMATCH_HEUN
    if name in ("DDIMScheduler", "PNDMScheduler", "FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):
        grid = scheduler_sigmas(config, steps, mu=mu, sigmas=sigmas)
        if solver == "pndm" and steps >= 2 and len(grid) == 2:  # its second step, of zero length, left out (below)
            solver = "heun"  # what is left is PNDM's Heun start alone (pndm's one step in all is DDIM's, as diffusers')
        if not name.startswith("FlowMatch"):
            ts = ddim_timesteps(config, steps, source)[: len(grid) - 1].astype(np.float64)
        else:  # flow matching feeds sigma·T in float32 (the times of the grid, t = σ/(1+σ))
            with np.errstate(invalid="ignore"):
                t = np.where(np.isinf(grid[:-1]), 1.0, grid[:-1] / (1.0 + grid[:-1])).astype(np.float32)
            ts = (t * np.float32(config.get("num_train_timesteps", 1000))).astype(np.float64)
        return SchedulerPlan(name, grid, dict(zip(grid[:-1].tolist(), ts.tolist())), solver, {}, "model", 1.0)
    if mu is not None or sigmas is not None:
        raise ValueError(f"mu= and sigmas= apply to flow-matching schedulers, not {name}")
    if name == "EulerDiscreteScheduler":
        _refuse(source, config, (("prediction_type", ("epsilon", "v_prediction", "sample", "original_sample"),
                                  "a VP prediction"),))
        return _read_plan(name, _from_diffusers_scheduler(name, config, steps), "euler", {}, "sigma")
    if name == "HeunDiscreteScheduler":  # its σ and timesteps repeat each inner level: [σ0, σ1, σ1, σ2, σ2, …, 0]
        _refuse(source, config, (("clip_sample", (False,), "clipping x̂₀ at every step is not the ODE"),))
        sched = _from_diffusers_scheduler(name, config, steps)
        sched.sigmas = torch.cat([sched.sigmas[0::2], sched.sigmas[-1:]])
        sched.timesteps = sched.timesteps[0::2]
        return _read_plan(name, sched, "heun", {}, "sigma")
    if name == "LMSDiscreteScheduler":
        return _read_plan(name, _from_diffusers_scheduler(name, config, steps), "lms", {"order": 4}, "sigma")
    # DPMSolverMultistepScheduler
    _refuse(source, config, (
        ("algorithm_type", ("dpmsolver++",), "the other algorithms are other methods: dpmsolver takes ε steps, "
                                             "the SDE variants add noise"),
        ("solver_order", (2, 1), "DPM-Solver++(3M)'s multistep weights differ from solver='dpmpp_3m', the "
                                 "nearest"),
        ("solver_type", ("midpoint",), "the 'heun' variant's second-order weights are not dpmpp_2m's"),
        ("thresholding", (False,), "thresholding changes x̂₀ at every step: not the ODE"),
        ("prediction_type", ("epsilon", "v_prediction", "sample"), "a VP prediction"),
        ("variance_type", (None,), "a learned variance is not read by this loop"),
        ("use_flow_sigmas", (False,), "flow-matching σ in a VP scheduler"),
    ))
    sched = _from_diffusers_scheduler(name, config, steps)
    order = int(config.get("solver_order", 2))
    if order == 1:  # DPM-Solver++(1) in the data variables, as diffusers' data form: Euler in σ cancels in float32
        return _read_plan(name, sched, "dpmpp_2m", {"order": 1}, "model")
    n = len(sched.timesteps)
    final_first_order = bool(config.get("euler_at_final", False)) or (
        bool(config.get("lower_order_final", True)) and n < 15)
    options = {"lower_order_final": True} if final_first_order else {}
    return _read_plan(name, sched, "dpmpp_2m", options, "model")


#: the keywords of generate/encode that sample_like/encode_like set from the scheduler, and what sets them
_SET_BY_THE_SCHEDULER = {
    "sample_like": {"grid": "its σ grid is the scheduler's", "adaptive": "a fixed grid, the scheduler's",
                    "nfe": "its step count is steps=, the pipeline's num_inference_steps"},
    "encode_like": {"grid": "its σ grid is DDIMInverseScheduler's", "solver": "its method is ddim_inverse",
                    "adaptive": "a fixed grid, DDIMInverseScheduler's",
                    "nfe": "its step count is steps=, the inversion's num_inference_steps"},
}


def _like_arguments(function: str, flow: object, x: object, name: str, scheduler: object, steps: int | None,
                    steps_are: str, passed: Mapping[str, Any]) -> object:
    """The checks shared by :func:`sample_like` and :func:`encode_like`; the scheduler to follow (the flow's
    own ``scheduler_config`` when none is given)."""
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    _check_tensor(x, name)
    if steps is None:
        raise TypeError(f"{function} needs steps= ({steps_are})")
    taken = [k for k in _SET_BY_THE_SCHEDULER[function] if k in passed]
    if taken:
        raise TypeError(f"{function} takes no {', '.join(k + '=' for k in taken)}: it runs the scheduler's own loop "
                        f"({_SET_BY_THE_SCHEDULER[function][taken[0]]}); for another grid or solve call "
                        f"flowdiff.{'generate' if function == 'sample_like' else 'encode'} with the flow")
    if scheduler is None:
        scheduler = getattr(flow, "scheduler_config", None)
        if scheduler is None:
            raise ValueError("this flow carries no scheduler_config; pass scheduler= (a diffusers scheduler, "
                             "its config or its directory)")
    _check_same_model(function, flow, scheduler)
    return scheduler


def _check_same_model(function: str, flow: ProbabilityFlow, scheduler: object) -> None:
    """Refuse a scheduler that reads the model's output as another prediction type than the flow does: the loop would
    not be the scheduler's (its grid and timesteps make it so whatever the flow's ᾱ table, not its reading of the
    output)."""
    config, source = config_of(scheduler)
    if class_name(config) is None:
        return  # refused by name where the plan is made
    try:
        _, prediction_type = schedule_from_config(with_defaults(config), source)
    except ValueError:
        return  # a config flowdiff reads no schedule from (Euler's 'original_sample'): the plan decides
    if prediction_type != flow.prediction_type:
        raise ValueError(f"{function}: {source} reads the model's output as {prediction_type!r}, the flow as "
                         f"{flow.prediction_type!r}, so the loop run would not be the scheduler's; give both the "
                         "model's own prediction type (ProbabilityFlow(..., prediction_type=) or the scheduler's "
                         "prediction_type)")


def _refuse_set_shift(scheduler: object, config: Mapping[str, Any], source: str) -> None:
    """Refuse a live flow-matching scheduler whose ``set_shift`` moved its shift off its config's: its
    ``set_timesteps`` then shifts the levels built at the config's shift by the other, a loop that no config (one
    shift) gives, and flowdiff reads the config."""
    if not isinstance(getattr(type(scheduler), "shift", None), property) or config.get("use_dynamic_shifting"):
        return  # (a config, or a class whose shift is its config's; dynamic shifting shifts by mu, not by shift)
    held = scheduler.shift
    if not isinstance(held, (int, float)) or "shift" not in config or float(held) == float(config["shift"]):
        return
    raise ValueError(f"{source}: its shift is {float(held)!r} (set by set_shift) and its config's "
                     f"shift={config['shift']!r}: its set_timesteps shifts the times of levels built at "
                     f"shift={config['shift']!r} by {float(held)!r}, which no config of one shift gives, and flowdiff "
                     "reads the config: not reproduced; use a scheduler whose config holds the shift "
                     "(FlowMatchEulerDiscreteScheduler.from_config(config, shift=...): another grid)")


def _check_live_timesteps(scheduler: object, steps: int, mu: float | None, sigmas: Any) -> None:
    """Refuse a live diffusers scheduler whose ``set_timesteps`` was given its own ``timesteps=``/``sigmas=`` (a
    pipeline called with them): sample_like follows its config's ``set_timesteps(steps)``, so that loop would not be
    the one the scheduler holds. Checked where it holds ``steps`` timesteps, against a fresh copy set to ``steps``."""
    held = getattr(scheduler, "timesteps", None)
    if not isinstance(held, Tensor) or getattr(scheduler, "num_inference_steps", None) != steps \
            or not hasattr(scheduler, "config"):
        return
    kwargs = {k: v for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None}
    try:
        fresh = type(scheduler).from_config(dict(scheduler.config))
        fresh.set_timesteps(steps, **kwargs)
    except (TypeError, ValueError):  # a loop scheduler_plan accepted but this copy cannot rebuild: nothing to compare
        return
    for name in ("timesteps", "sigmas"):
        mine, theirs = getattr(scheduler, name, None), getattr(fresh, name, None)
        if isinstance(mine, Tensor) and isinstance(theirs, Tensor) and not (
                mine.shape == theirs.shape and torch.equal(mine.cpu().double(), theirs.cpu().double())):
            raise ValueError(f"scheduler {type(scheduler).__name__} holds {name} "
                             f"{np.array2string(mine.cpu().double().numpy()[:5], precision=4)}... that its "
                             f"set_timesteps({steps}) does not give (custom timesteps=/sigmas= passed to "
                             "set_timesteps, or a pipeline called with them); sample_like runs set_timesteps(steps)'s "
                             "loop, so it would not be this one: not reproduced (for flow matching, give sample_like "
                             "the same sigmas=)")


def sample_like(flow: ProbabilityFlow, noise: Tensor, scheduler: object = None, steps: int | None = None, *,
                solver: str | None = None, mu: float | None = None, sigmas: Any = None,
                model_kwargs: Mapping[str, Any] | None = None,
                **generate_kwargs: Any) -> Result:
    """What a diffusers pipeline's loop with ``scheduler`` returns from ``noise``: a call to
    :func:`flowdiff.generate` with the scheduler's own grid, timesteps and method (:func:`scheduler_plan`).

    ``noise`` is the pipeline's ``randn`` latents before ``init_noise_sigma`` (the pipeline multiplies
    them by it); the result's ``x`` is the final latents as the pipeline returns them
    (``output_type="latent"``) — at σ_end, in the scheduler's own scale (α·x̄ for DDIM and DPM-Solver,
    x̄ for Euler), which is the image itself when σ_end = 0. ``scheduler`` defaults to the flow's
    own ``scheduler_config``. ``solver=None`` is the scheduler's own method; another solver name runs
    that solver on the same grid and timesteps (a solver object: ``solvers.get(name, **options)``).
    ``mu`` and ``sigmas`` are those a flow-matching pipeline passes to ``set_timesteps`` (Flux: its
    resolution-dependent shift and ``linspace(1, 1/steps, steps)``, which a Flux flow gets by default
    from :func:`flux_grid_arguments`). A grid starting at σ = ∞ (flow matching, zero terminal SNR)
    takes its first step with :meth:`~flowdiff.ProbabilityFlow.step_from_noise`. The model sees the
    timesteps the scheduler feeds (the flow's ``timesteps`` option). Further keywords go to
    :func:`flowdiff.generate`.
    """
    scheduler = _like_arguments("sample_like", flow, noise, "noise", scheduler, steps,
                                "the pipeline's num_inference_steps", generate_kwargs)
    if mu is None and sigmas is None and getattr(flow, "packed", False):
        mu, sigmas = flux_grid_arguments(scheduler, noise.shape[1], steps)
    plan = scheduler_plan(scheduler, steps, mu=mu, sigmas=sigmas)
    _check_live_timesteps(scheduler, steps, mu, sigmas)
    if solver is None:  # the scheduler's own method, its options with it
        solver = solvers.get(plan.solver, **plan.solver_options) if plan.solver_options else plan.solver
    grid = plan.sigmas
    schedule = flow.schedule
    run_flow = flow if flow.sigma_field is not None else flow.with_timesteps(plan.timesteps)
    sigma0, end = float(grid[0]), float(grid[-1])
    if math.isinf(sigma0):  # the model's input is the noise itself (α = 0, s = 1), also DDIM's x_T there
        x_T = noise
    elif plan.state == "sigma":  # the scheduler's sample is x̄ = noise·init_noise_sigma; generate takes x̄/√(1+σ²)
        x_T = noise * (plan.init_noise_sigma / math.sqrt(1.0 + sigma0 * sigma0))
    else:
        x_T = noise / _model_per_ddim(schedule, sigma0)
    res = generate(run_flow, x_T, solver=solver, grid=grid, model_kwargs=model_kwargs, **generate_kwargs)
    if end == 0 or plan.state == "model":  # generate's x at σ_end is the model's α·x̄, the scheduler's sample
        return res
    return dataclasses.replace(res, x=from_model_scale(flow, res.x, end))  # Euler's sample: x̄ itself


def encode_like(flow: ProbabilityFlow, images: Tensor, scheduler: object = None, steps: int | None = None, *,
                model_kwargs: Mapping[str, Any] | None = None, **encode_kwargs: Any) -> Result:
    """What diffusers' ``DDIMInverseScheduler`` loop returns from ``images`` (the latents it is given):
    :func:`flowdiff.encode` with ``solver="ddim_inverse"`` on its grid (:func:`flowdiff.engine.scheduler_grids.
    ddim_inverse_sigmas`) and timesteps.

    ``images`` are the scheduler's input sample at its first level — σ = 0, or σ_min for
    ``set_alpha_to_one=False`` (Stable Diffusion's configs), where it stands for x̄ = x·√(1+σ_min²) —
    and the result's ``x`` is its final sample x_T = α(σ_max)·x̄ (the encode's own x_T).
    ``scheduler`` (default the flow's ``scheduler_config``) must be a DDIMInverse, DDIM or PNDM
    config (Stable Diffusion 1.x's own), read as ``DDIMInverseScheduler.from_config(config)`` reads
    it: its ``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one`` and ``clip_sample``, and
    DDIMInverseScheduler's defaults for those it lacks (``clip_sample=True``, refused; a PNDM config's
    own default ``set_alpha_to_one=False`` is not DDIMInverse's). Further keywords go to
    :func:`flowdiff.encode`.
    """
    scheduler = _like_arguments("encode_like", flow, images, "images", scheduler, steps,
                                "the inversion's num_inference_steps", encode_kwargs)
    config, source = config_of(scheduler)
    name = class_name(config)
    if name is None:
        raise unidentified(config, source)
    if name not in INVERTED_SCHEDULERS:
        raise ValueError(f"{source}: encode_like reproduces DDIMInverseScheduler (or a DDIMScheduler or PNDMScheduler "
                         f"config read as one, DDIMInverseScheduler.from_config(config)); got {name!r}")
    grid, ts = ddim_inverse_sigmas(scheduler, steps)  # (a live scheduler: its config as diffusers wrote it)
    start = float(grid[0])
    if flow.sigma_field is not None:
        raise ValueError("encode_like feeds the model DDIMInverse's timesteps; a σ-native field has none")
    if flow.prediction_type == "sample" and start == 0:
        raise ValueError(f"{source}: DDIMInverseScheduler with prediction_type='sample' and set_alpha_to_one=True "
                         "divides by √(1−ᾱ) = 0 at its first step (ε = (x − √ᾱ·x̂₀)/√(1−ᾱ)); not reproduced")
    # DDIMInverse feeds its own integer timesteps at the grid's levels; the ddim_inverse method feeds each
    # step's target timestep at its source level (flowdiff.api.ddim_inverse)
    run_flow = flow.with_timesteps(dict(zip(grid[1:].tolist(), ts.astype(float).tolist())))
    # encode takes its input as the model's sample at the grid's first level (VP: x̄ = x·√(1+σ_min²))
    return encode(run_flow, images, solver="ddim_inverse", grid=reversed_grid(grid), model_kwargs=model_kwargs,
                  **encode_kwargs)
