"""diffusers' scheduler loops against flowdiff's routes: the configuration table and the runner.

One :class:`Case` is a diffusers scheduler class, its config, a step count and the expected
outcome: ``"equal"`` (flowdiff's route gives diffusers' result to float rounding) or the name of
the option (or class) whose refusal message flowdiff must give. :func:`run_case` runs both on the
same fixed random network and noise. ``tests/test_scheduler_equivalence.py`` asserts the table;
``benchmarks/bench_scheduler_suite.py`` writes it with the measured differences.

The network is a fixed random function of (x, t) that changes with t by about 1e-3 per unit: a
route that fed fractional t(σ) where the scheduler feeds integer timesteps would differ by far
more than the tolerance.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

from ..engine.flow import ProbabilityFlow, from_model_scale
from ..engine.options import Checks
from ..engine.scheduler_grids import schedule_from_config, with_defaults
from ..models.pipelines import INVERTED_SCHEDULERS, sample_like, scheduler_plan

SHAPE = (2, 6)
BOTH = (torch.float32, torch.float64)
F32 = (torch.float32,)


@dataclass(frozen=True)
class Case:
    """One configuration: ``cls`` (a diffusers scheduler class name), ``config``, ``steps``,
    ``expect`` (``"equal"`` or the word the refusal must name), ``dtypes`` compared, and for flow
    matching's dynamic shifting the ``mu`` given to ``set_timesteps`` and its custom ``sigmas`` (the unshifted
    times a pipeline passes, e.g. Flux's); ``skipped``: diffusers' steps of zero
    length that flowdiff leaves out (each costs diffusers one model evaluation)."""

    name: str
    cls: str
    config: Mapping[str, Any]
    steps: int = 8
    expect: str = "equal"
    dtypes: tuple[torch.dtype, ...] = F32
    mu: float | None = None
    sigmas: tuple[float, ...] | None = None
    skipped: int = 0


def network(dtype: torch.dtype, T: int = 1000) -> Any:
    """``model(x, t)``: a fixed random nonlinear map of x whose output changes with t."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(SHAPE[1], SHAPE[1], generator=g, dtype=torch.float64) * 0.4).to(dtype)
    b = torch.randn(SHAPE[1], generator=g, dtype=torch.float64).to(dtype)

    def model(x: Tensor, t: Tensor | float) -> Tensor:
        t = torch.as_tensor(t).to(x.dtype).reshape(-1)
        t = t.expand(x.shape[0]) if t.numel() == 1 else t
        s = (t / T).view(-1, 1)
        return torch.tanh(x @ w + b * s) * (1 + s) + 0.3 * torch.sin(3 * s) * x

    return model


def _scheduler(case: Case) -> Any:
    import diffusers

    return getattr(diffusers, case.cls).from_config(dict(case.config))


def _noise(dtype: torch.dtype) -> Tensor:
    return torch.randn(*SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)


def _diffusers_generate(sched: Any, model: Any, noise: Tensor, case: Case) -> tuple[Tensor, int]:
    kwargs = {k: v for k, v in (("mu", case.mu), ("sigmas", case.sigmas)) if v is not None}
    sched.set_timesteps(case.steps, **kwargs)
    x = noise * getattr(sched, "init_noise_sigma", 1.0)  # flow matching has none: 1
    calls = 0
    for t in sched.timesteps:
        calls += 1
        out = model(sched.scale_model_input(x, t) if hasattr(sched, "scale_model_input") else x, t)
        x = sched.step(out, t, x, return_dict=False)[0]
    return x, calls


def _same_table(sched: Any, flow: ProbabilityFlow, dtype: torch.dtype) -> None:
    """DDIM's loop on flowdiff's float64 ᾱ table (in float64), so that both solve one ODE."""
    if dtype != torch.float64:
        return  # (DDIM, DDIMInverse and PNDM keep the caller's dtype in their step)
    acp = torch.tensor(flow.schedule.alphas_cumprod, dtype=torch.float64)
    sched.alphas_cumprod = acp
    if hasattr(sched, "final_alpha_cumprod"):
        sched.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if sched.config.set_alpha_to_one \
            else acp[0]
    if hasattr(sched, "initial_alpha_cumprod"):
        sched.initial_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if sched.config.set_alpha_to_one \
            else acp[0]


def run_case(case: Case, dtype: torch.dtype, *, feed_scheduler_timesteps: bool = True,
             **like_kwargs: Any) -> tuple[Tensor, Tensor, int, int]:
    """(flowdiff's result, diffusers' result, flowdiff's NFE, diffusers' model calls) for ``case`` in ``dtype``.

    flowdiff's refusals propagate (ValueError). ``feed_scheduler_timesteps=False`` runs the same
    grid feeding t(σ) instead of the scheduler's timesteps (to show the suite tells them apart).
    ``like_kwargs`` go to :func:`sample_like` / :func:`encode_like` (e.g. ``checks=``).
    """
    config = {"_class_name": case.cls, **case.config}
    model = network(dtype, int(config.get("num_train_timesteps", 1000)))
    noise = _noise(dtype)
    if case.cls == "DDIMInverseScheduler":
        return _run_inverse(case, config, model, noise, dtype, like_kwargs)
    plan = scheduler_plan(config, case.steps, mu=case.mu, sigmas=case.sigmas)  # refusals first, before diffusers
    schedule, prediction_type = schedule_from_config(config)
    flow = ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    sched = _scheduler(case)
    if case.cls in ("DDIMScheduler", "PNDMScheduler"):
        _same_table(sched, flow, dtype)
    ref, calls = _diffusers_generate(sched, model, noise, case)
    if not feed_scheduler_timesteps:
        res = _sample_continuous(flow, noise, plan)
    else:
        res = sample_like(flow, noise, config, case.steps, mu=case.mu, sigmas=case.sigmas, **like_kwargs)
    return res.x, ref, res.stats.nfe, calls


def _sample_continuous(flow: ProbabilityFlow, noise: Tensor, plan: Any) -> Any:
    from ..api.sampling import generate

    sigma0 = float(plan.sigmas[0])
    x_T = noise if plan.state == "model" else noise * plan.init_noise_sigma / math.sqrt(1 + sigma0 ** 2)
    solver = _solvers.get(plan.solver, **plan.solver_options) if plan.solver_options else plan.solver
    res = generate(flow, x_T, solver=solver, grid=plan.sigmas)  # at σ_end > 0: the model's α·x̄, DDIM's sample
    end = float(plan.sigmas[-1])
    if end and plan.state == "sigma":  # Euler's sample: x̄ itself
        res.x.copy_(from_model_scale(flow, res.x, end))
    return res


def _run_inverse(case: Case, config: dict[str, Any], model: Any, images: Tensor, dtype: torch.dtype,
                 like_kwargs: Mapping[str, Any]) -> tuple[Tensor, Tensor, int, int]:
    from ..models.pipelines import encode_like

    schedule, prediction_type = schedule_from_config(config)
    flow = ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    res = encode_like(flow, images, config, case.steps, **like_kwargs)  # refusals first
    sched = _scheduler(case)
    sched.set_timesteps(case.steps)
    _same_table(sched, flow, dtype)
    z, calls = images.clone(), 0
    for t in sched.timesteps:
        calls += 1
        z = sched.step(model(z, t), t, z, return_dict=False)[0]
    return res.x, z, res.stats.nfe, calls


def _cases() -> list[Case]:
    cases: list[Case] = []
    add = cases.append
    # -- DDIM: spacings, offsets, the final ᾱ, predictions, beta schedules, zero SNR ---------------------------
    base = {"clip_sample": False, "beta_schedule": "linear"}
    for spacing in ("leading", "trailing"):
        for offset in (0, 1):
            for one in (True, False):
                zero_step = spacing == "leading" and offset == 0 and not one  # σ_min → σ_min
                add(Case(f"ddim-{spacing}-offset{offset}-alpha1{one}", "DDIMScheduler",
                         {**base, "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": one},
                         steps=10, dtypes=BOTH, skipped=int(zero_step)))
    for pred in ("v_prediction", "sample"):
        add(Case(f"ddim-{pred}", "DDIMScheduler", {**base, "prediction_type": pred}, dtypes=BOTH))
    add(Case("ddim-sd15", "DDIMScheduler", {**base, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                            "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False},
             steps=10, dtypes=BOTH))
    add(Case("ddim-sd21-v", "DDIMScheduler", {**base, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                              "beta_end": 0.012, "steps_offset": 1, "set_alpha_to_one": False,
                                              "prediction_type": "v_prediction"}, steps=10, dtypes=BOTH))
    add(Case("ddim-cosine", "DDIMScheduler", {**base, "beta_schedule": "squaredcos_cap_v2"}, dtypes=BOTH))
    add(Case("ddim-trained-betas", "DDIMScheduler", {**base, "num_train_timesteps": 100,
                                                     "trained_betas": [0.0001 + 0.0002 * i for i in range(100)]},
             steps=5, dtypes=BOTH))
    add(Case("ddim-zero-snr-v", "DDIMScheduler", {**base, "rescale_betas_zero_snr": True,
                                                  "timestep_spacing": "trailing",
                                                  "prediction_type": "v_prediction"}, dtypes=BOTH))

    add(Case("ddim-linspace", "DDIMScheduler", {**base, "timestep_spacing": "linspace"}, steps=7,
             expect="timestep_spacing"))
    add(Case("ddim-clip-sample", "DDIMScheduler", {"clip_sample": True}, expect="clip_sample"))
    add(Case("ddim-default-clip", "DDIMScheduler", {}, expect="clip_sample"))
    add(Case("ddim-thresholding", "DDIMScheduler", {**base, "thresholding": True}, expect="thresholding"))
    # -- Euler ------------------------------------------------------------------------------------------------
    for spacing in ("leading", "trailing", "linspace"):
        add(Case(f"euler-{spacing}", "EulerDiscreteScheduler", {"timestep_spacing": spacing, "steps_offset": 1}))
    for kind in ("karras", "exponential", "beta"):
        add(Case(f"euler-{kind}", "EulerDiscreteScheduler", {f"use_{kind}_sigmas": True}))
    add(Case("euler-sdxl", "EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085,
                                                       "beta_end": 0.012, "steps_offset": 1,
                                                       "timestep_spacing": "leading"}, steps=10))
    add(Case("euler-v", "EulerDiscreteScheduler", {"prediction_type": "v_prediction"}))
    add(Case("euler-sigma-min", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}, skipped=1))
    add(Case("euler-sigma-min-trailing", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min",
                                                                     "timestep_spacing": "trailing"}))
    add(Case("euler-log-linear", "EulerDiscreteScheduler", {"interpolation_type": "log_linear"}))
    add(Case("euler-leading-offset-steps-T", "EulerDiscreteScheduler",  # a first timestep past the table: a step
             {"num_train_timesteps": 100, "timestep_spacing": "leading", "steps_offset": 1},  # of zero length
             steps=100, skipped=1))
    add(Case("euler-zero-snr", "EulerDiscreteScheduler", {"rescale_betas_zero_snr": True,
                                                           "timestep_spacing": "trailing",
                                                           "prediction_type": "v_prediction"}))
    add(Case("euler-continuous-v", "EulerDiscreteScheduler", {"timestep_type": "continuous",
                                                               "prediction_type": "v_prediction"}))
    # -- DPM-Solver++ -----------------------------------------------------------------------------------------
    add(Case("dpm2m", "DPMSolverMultistepScheduler", {}))
    add(Case("dpm2m-16steps", "DPMSolverMultistepScheduler", {}, steps=16))
    add(Case("dpm1", "DPMSolverMultistepScheduler", {"solver_order": 1}))
    add(Case("dpm2m-sigma-min", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}))
    add(Case("dpm2m-sigma-min-16steps", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"},
             steps=16))
    add(Case("dpm2m-sigma-min-no-lof", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min",
                                                                        "lower_order_final": False}))
    add(Case("dpm2m-euler-at-final", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min",
                                                                      "euler_at_final": True}, steps=16))
    for kind in ("karras", "exponential", "beta", "lu_lambdas"):
        add(Case(f"dpm2m-{kind}", "DPMSolverMultistepScheduler", {f"use_{kind}" if kind == "lu_lambdas"
                                                                   else f"use_{kind}_sigmas": True}))
    add(Case("dpm2m-karras-sigma-min", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True,
                                                                        "final_sigmas_type": "sigma_min"},
             skipped=1))
    add(Case("dpm2m-v", "DPMSolverMultistepScheduler", {"prediction_type": "v_prediction"}))
    add(Case("dpm2m-sample", "DPMSolverMultistepScheduler", {"prediction_type": "sample"}))
    add(Case("dpm2m-trailing", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}))
    add(Case("dpm2m-zero-snr", "DPMSolverMultistepScheduler", {"rescale_betas_zero_snr": True,
                                                                "prediction_type": "v_prediction",
                                                                "timestep_spacing": "trailing"}))
    add(Case("dpm3m", "DPMSolverMultistepScheduler", {"solver_order": 3}, expect="solver_order"))
    add(Case("dpm2m-heun", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, expect="solver_type"))
    add(Case("dpm-dpmsolver", "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver",
                                                               "final_sigmas_type": "sigma_min"},
             expect="algorithm_type"))
    add(Case("dpm-sde", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"},
             expect="algorithm_type"))
    add(Case("dpm-thresholding", "DPMSolverMultistepScheduler", {"thresholding": True}, expect="thresholding"))
    # -- flow matching ----------------------------------------------------------------------------------------
    add(Case("flowmatch", "FlowMatchEulerDiscreteScheduler", {}))
    add(Case("flowmatch-sd3-shift3", "FlowMatchEulerDiscreteScheduler", {"shift": 3.0}))
    add(Case("flowmatch-flux-dynamic", "FlowMatchEulerDiscreteScheduler",
             {"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, mu=0.8))
    add(Case("flowmatch-linear-shift", "FlowMatchEulerDiscreteScheduler",
             {"use_dynamic_shifting": True, "time_shift_type": "linear"}, mu=1.3))
    add(Case("flowmatch-karras", "FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}))
    add(Case("flowmatch-beta-shift3", "FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True, "shift": 3.0}))
    add(Case("flowmatch-karras-dynamic-flux-sigmas", "FlowMatchEulerDiscreteScheduler",
             {"use_karras_sigmas": True, "use_dynamic_shifting": True}, mu=1.15,
             sigmas=tuple(np.linspace(1.0, 1 / 8, 8).tolist())))
    add(Case("flowmatch-stochastic", "FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True},
             expect="stochastic_sampling"))
    add(Case("flowmatch-invert", "FlowMatchEulerDiscreteScheduler", {"invert_sigmas": True},
             expect="invert_sigmas"))
    add(Case("flowmatch-exponential", "FlowMatchEulerDiscreteScheduler", {"use_exponential_sigmas": True}))
    add(Case("flowmatch-shift-terminal", "FlowMatchEulerDiscreteScheduler", {"shift_terminal": 0.1}))
    add(Case("flowmatch-shift-terminal-one-step", "FlowMatchEulerDiscreteScheduler",  # diffusers' time: 0/0 = NaN
             {"shift_terminal": 0.1}, steps=1, expect="shift_terminal"))
    add(Case("flowmatch-karras-invert", "FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True,
                                                                             "invert_sigmas": True},
             expect="invert_sigmas"))
    add(Case("flowmatch-heun", "FlowMatchHeunDiscreteScheduler", {}))
    add(Case("flowmatch-heun-shift3", "FlowMatchHeunDiscreteScheduler", {"shift": 3.0}, steps=5))
    add(Case("flowmatch-lcm", "FlowMatchLCMScheduler", {}, expect="FlowMatchLCMScheduler"))
    # -- DDIMInverse (encoding) -------------------------------------------------------------------------------
    inv = {"clip_sample": False}
    for spacing in ("leading", "trailing"):
        for pred in ("epsilon", "v_prediction"):
            add(Case(f"ddim-inverse-{spacing}-{pred}", "DDIMInverseScheduler",
                     {**inv, "timestep_spacing": spacing, "prediction_type": pred}, steps=10, dtypes=BOTH))
    add(Case("ddim-inverse-sd15", "DDIMInverseScheduler", {**inv, "beta_schedule": "scaled_linear",
                                                           "beta_start": 0.00085, "beta_end": 0.012,
                                                           "steps_offset": 1, "set_alpha_to_one": False},
             steps=10, dtypes=BOTH))
    add(Case("ddim-inverse-sd21-v", "DDIMInverseScheduler", {**inv, "beta_schedule": "scaled_linear",
                                                             "beta_start": 0.00085, "beta_end": 0.012,
                                                             "steps_offset": 1, "set_alpha_to_one": False,
                                                             "prediction_type": "v_prediction"},
             steps=10, dtypes=BOTH))
    add(Case("ddim-inverse-sample-from-zero", "DDIMInverseScheduler", {**inv, "prediction_type": "sample"},
             steps=10, expect="sample"))
    add(Case("ddim-inverse-offset0-alpha1False", "DDIMInverseScheduler", {**inv, "steps_offset": 0,
                                                                          "set_alpha_to_one": False},
             steps=10, dtypes=BOTH, skipped=1))  # its first step, ᾱ_0 → timestep 0, has zero length
    add(Case("ddim-inverse-zero-snr-trailing", "DDIMInverseScheduler", {**inv, "rescale_betas_zero_snr": True,
                                                                        "timestep_spacing": "trailing",
                                                                        "prediction_type": "v_prediction"},
             steps=10, expect="rescale_betas_zero_snr"))
    add(Case("ddim-inverse-of-ddim-thresholding", "DDIMInverseScheduler",  # DDIMInverse has no thresholding: ignored
             {"_class_name": "DDIMScheduler", "clip_sample": False, "thresholding": True}, steps=10, dtypes=BOTH))
    add(Case("ddim-inverse-of-sd15-pndm", "DDIMInverseScheduler",  # as inversion pipelines read SD 1.5's scheduler
             {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
              "beta_end": 0.012, "skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False,
              "clip_sample": False}, steps=10, dtypes=BOTH))
    # -- schedulers refused by name ---------------------------------------------------------------------------
    add(Case("euler-karras-sigma-min", "EulerDiscreteScheduler", {"use_karras_sigmas": True,
                                                                   "final_sigmas_type": "sigma_min"}, skipped=1))
    add(Case("euler-trained-betas", "EulerDiscreteScheduler", {"num_train_timesteps": 100, "trained_betas":
                                                                [0.0001 + 0.0002 * i for i in range(100)]}, steps=5))
    add(Case("euler-sample", "EulerDiscreteScheduler", {"prediction_type": "sample"}))
    add(Case("euler-original-sample-karras", "EulerDiscreteScheduler", {"prediction_type": "original_sample",
                                                                         "use_karras_sigmas": True}))
    add(Case("euler-zero-snr-trailing-steps-T", "EulerDiscreteScheduler",  # σ rises from 4096 (ᾱ = 2⁻²⁴) to 15406
             {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, steps=1000,
             expect="rescale_betas_zero_snr"))
    add(Case("euler-one-step-to-sigma-min", "EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min"}, steps=1,
             expect="final_sigmas_type"))  # linspace's one timestep is 0: σ_min to σ_min
    add(Case("dpm2m-linspace-offset-steps-T", "DPMSolverMultistepScheduler",  # diffusers' own loop: non-finite
             {"num_train_timesteps": 100, "steps_offset": 1}, steps=100, expect="steps_offset"))
    add(Case("dpm2m-exponential-sigma-min", "DPMSolverMultistepScheduler", {"use_exponential_sigmas": True,
                                                                             "final_sigmas_type": "sigma_min"},
             skipped=1))
    add(Case("dpm2m-leading-offset", "DPMSolverMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1,
                                                                      "beta_schedule": "scaled_linear",
                                                                      "beta_start": 0.00085, "beta_end": 0.012},
             steps=10))
    add(Case("heun", "HeunDiscreteScheduler", {}, steps=6))
    add(Case("heun-trailing-v", "HeunDiscreteScheduler", {"timestep_spacing": "trailing",
                                                          "prediction_type": "v_prediction"}, steps=6))
    add(Case("lms-v-trailing", "LMSDiscreteScheduler", {"prediction_type": "v_prediction",
                                                        "timestep_spacing": "trailing"}))
    add(Case("heun-clip-sample", "HeunDiscreteScheduler", {"clip_sample": True}, steps=6, expect="clip_sample"))
    add(Case("heun-karras-v", "HeunDiscreteScheduler", {"use_karras_sigmas": True, "prediction_type": "v_prediction"},
             steps=6))
    add(Case("lms", "LMSDiscreteScheduler", {}))
    add(Case("lms-karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}))
    add(Case("pndm-sd15", "PNDMScheduler", {"skip_prk_steps": True, "steps_offset": 1, "beta_schedule":
                                            "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}, steps=10,
             dtypes=BOTH))
    add(Case("pndm", "PNDMScheduler", {"skip_prk_steps": True}, skipped=1, dtypes=BOTH))
    add(Case("pndm-trailing", "PNDMScheduler", {"skip_prk_steps": True, "timestep_spacing": "trailing"}, steps=10,
             dtypes=BOTH))
    add(Case("pndm-alpha1", "PNDMScheduler", {"skip_prk_steps": True, "set_alpha_to_one": True}, dtypes=BOTH))
    add(Case("pndm-prk", "PNDMScheduler", {"skip_prk_steps": False}, expect="skip_prk_steps"))
    add(Case("pndm-v", "PNDMScheduler", {"skip_prk_steps": True, "prediction_type": "v_prediction"},
             expect="prediction_type"))
    for cls in ("UniPCMultistepScheduler", "DEISMultistepScheduler",
                "DPMSolverMultistepInverseScheduler", "EulerAncestralDiscreteScheduler",
                "DDPMScheduler", "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler", "LCMScheduler"):
        add(Case(cls.removesuffix("Scheduler").lower(), cls, {}, expect=cls))
    return cases


CASES: list[Case] = _cases()


def route(case: Case) -> str:
    """What flowdiff does with ``case``'s config: the route and solver, or the refusal's reason."""
    config = {"_class_name": case.cls, **case.config}
    try:
        if case.cls == "DDIMInverseScheduler":
            from ..engine.scheduler_grids import ddim_inverse_sigmas

            ddim_inverse_sigmas(config, case.steps)
            if config.get("prediction_type") == "sample" and config.get("set_alpha_to_one", True):
                raise ValueError("prediction_type='sample' from ᾱ = 1 divides by 0 (diffusers' too)")
            return "`encode_like`: ddim_inverse"
        plan = scheduler_plan(config, case.steps, mu=case.mu, sigmas=case.sigmas)
    except ValueError as e:
        message = str(e).split(": ", 1)[-1] if str(e).startswith(("scheduler config", case.cls)) else str(e)
        return "refused: " + message.replace("|", "\\|").split("; ")[0]
    options = ", ".join(f"{k}={v}" for k, v in plan.solver_options.items())
    return f"`sample_like`: {plan.solver}" + (f" ({options})" if options else "")


def _config_text(case: Case) -> str:
    items = [f"{k}={v!r}" for k, v in case.config.items() if k != "trained_betas"]
    if "trained_betas" in case.config:
        items.append("trained_betas=[…]")
    if case.mu is not None:
        items.append(f"mu={case.mu}")
    if case.sigmas is not None:
        items.append(f"sigmas={list(case.sigmas)}")
    return ", ".join(items).replace("|", "\\|") or "defaults"


def outcome_table(cases: list[Case] | None = None) -> str:
    """The markdown table of every case's expected outcome and route (README's scheduler table)."""
    rows = ["| diffusers scheduler | config | steps | outcome | flowdiff |", "|---|---|---:|---|---|"]
    for case in cases or CASES:
        outcome = "equal" if case.expect == "equal" else "refused"
        rows.append(f"| {case.cls.removesuffix('Scheduler')} | {_config_text(case)} | {case.steps} | {outcome} | "
                    f"{route(case)} |")
    return "\n".join(rows) + "\n"


def readme_table(cases: list[Case] | None = None) -> str:
    """README's summary of the suite: per scheduler class, flowdiff's route, the options its equal
    cases exercise, and what is refused (the option and value, or the class)."""
    cases = cases or CASES
    order = list(dict.fromkeys(c.cls for c in cases))
    rows = ["| diffusers scheduler | flowdiff | equal (configs; options varied) | refused |", "|---|---|---|---|"]
    skip = {"clip_sample", "beta_start", "beta_end"}
    for cls in order:
        mine = [c for c in cases if c.cls == cls]
        equal = [c for c in mine if c.expect == "equal"]
        refused = [c for c in mine if c.expect != "equal"]
        routes = sorted({route(c).removeprefix("`sample_like`: ").removeprefix("`encode_like`: ") for c in equal})
        how = ("`encode_like`: " if cls == "DDIMInverseScheduler" else "`sample_like`: ") + "; ".join(routes) \
            if equal else "—"
        keys = sorted({k for c in equal for k in c.config if k not in skip} | ({"mu"} if any(c.mu for c in equal)
                                                                                else set()))
        eq = f"{len(equal)}; {', '.join(f'`{k}`' for k in keys) or 'defaults'}" if equal else "—"
        ref = []
        for c in refused:
            if c.expect == cls:
                ref.append(route(c).split("not reproduced: ", 1)[-1])
            elif c.expect in c.config:
                default = with_defaults({"_class_name": cls})
                also = [f"`{k}={v!r}`" for k, v in c.config.items()
                        if k != c.expect and k not in skip and not (k in default and default[k] == v)]
                also += [f"steps={c.steps}"] if f"steps={c.steps}" in route(c) else []
                ref.append(f"`{c.expect}={c.config[c.expect]!r}`" + (f" with {', '.join(also)}" if also else ""))
            elif c.expect in c.config.values():
                ref.append(" with ".join(f"`{k}={v!r}`" for k, v in c.config.items() if v == c.expect))
            else:
                ref.append(f"`{c.expect}` (its default)")
        rows.append(f"| {cls} | {how.replace('|', '/')} | {eq} | {'; '.join(ref) or '—'} |")
    return "\n".join(rows) + "\n"


# -- the configuration space: every option of each routed class over the values diffusers accepts ------------------

#: a ``trained_betas`` drawn from the space: a ramp of ``num_train_timesteps`` betas (built by :func:`drawn_case`)
TRAINED_BETAS = "ramp"
_BETAS: dict[str, tuple[Any, ...]] = {
    "num_train_timesteps": (1000, 100), "beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "beta_start": (0.0001, 0.00085), "beta_end": (0.02, 0.012), "trained_betas": (None, TRAINED_BETAS),
    "prediction_type": ("epsilon", "v_prediction", "sample"),
    "timestep_spacing": ("leading", "trailing", "linspace"), "steps_offset": (0, 1, 2)}
_SIGMA_KINDS: dict[str, tuple[Any, ...]] = {"use_karras_sigmas": (False, True), "use_exponential_sigmas": (False, True),
                                            "use_beta_sigmas": (False, True)}
#: the clipping and thresholding bounds (they matter only with ``clip_sample`` or ``thresholding`` on)
_CLIPPING: dict[str, tuple[Any, ...]] = {"clip_sample_range": (1.0, 1.5), "dynamic_thresholding_ratio": (0.995, 0.9),
                                         "sample_max_value": (1.0, 2.0)}
#: per scheduler class flowdiff routes (``sample_like``, ``encode_like`` for DDIMInverse), each option it accepts and
#: the values drawn for it (an option left out of a drawn config is at the class's default)
CONFIG_SPACE: dict[str, dict[str, tuple[Any, ...]]] = {
    "DDIMScheduler": {**_BETAS, "clip_sample": (False, True), "set_alpha_to_one": (True, False),
                      "thresholding": (False, True), "rescale_betas_zero_snr": (False, True), **_CLIPPING},
    "DDIMInverseScheduler": {**_BETAS, "timestep_spacing": ("leading", "trailing"), "clip_sample": (False, True),
                             "set_alpha_to_one": (True, False), "rescale_betas_zero_snr": (False, True),
                             "clip_sample_range": _CLIPPING["clip_sample_range"]},
    "PNDMScheduler": {**_BETAS, "skip_prk_steps": (True, False), "set_alpha_to_one": (False, True)},
    "EulerDiscreteScheduler": {**_BETAS, **_SIGMA_KINDS,
                               "prediction_type": ("epsilon", "v_prediction", "sample", "original_sample"),
                               "interpolation_type": ("linear", "log_linear"), "sigma_min": (None, 0.1),
                               "sigma_max": (None, 10.0), "timestep_type": ("discrete", "continuous"),
                               "rescale_betas_zero_snr": (False, True), "final_sigmas_type": ("zero", "sigma_min")},
    "HeunDiscreteScheduler": {**_BETAS, **_SIGMA_KINDS, "clip_sample": (False, True),
                              "clip_sample_range": _CLIPPING["clip_sample_range"]},
    "LMSDiscreteScheduler": {**_BETAS, **_SIGMA_KINDS},
    "DPMSolverMultistepScheduler": {
        **_BETAS, **_SIGMA_KINDS, "solver_order": (2, 1, 3), "thresholding": (False, True),
        "algorithm_type": ("dpmsolver++", "dpmsolver", "sde-dpmsolver++", "sde-dpmsolver"),
        "solver_type": ("midpoint", "heun"), "lower_order_final": (True, False), "euler_at_final": (False, True),
        "use_lu_lambdas": (False, True), "use_flow_sigmas": (False, True), "flow_shift": (1.0, 3.0),
        "final_sigmas_type": ("zero", "sigma_min"), "lambda_min_clipped": (-math.inf, -5.1),
        "variance_type": (None, "learned_range"), "rescale_betas_zero_snr": (False, True),
        "dynamic_thresholding_ratio": _CLIPPING["dynamic_thresholding_ratio"],
        "sample_max_value": _CLIPPING["sample_max_value"], "use_dynamic_shifting": (False, True),
        "time_shift_type": ("exponential",)},
    "FlowMatchEulerDiscreteScheduler": {
        "num_train_timesteps": (1000, 100), "shift": (1.0, 3.0), "use_dynamic_shifting": (False, True),
        "time_shift_type": ("exponential", "linear"), "invert_sigmas": (False, True), "shift_terminal": (None, 0.1),
        "base_shift": (0.5, 0.3), "max_shift": (1.15, 2.0), "base_image_seq_len": (256, 1024),
        "max_image_seq_len": (4096, 8192),
        **_SIGMA_KINDS, "stochastic_sampling": (False, True)},
    "FlowMatchHeunDiscreteScheduler": {"num_train_timesteps": (1000, 100), "shift": (1.0, 3.0)},
}
#: step counts drawn: few, odd, and the table's own length ``T`` and ``T − 1`` (written as these strings)
STEP_CHOICES: tuple[int | str, ...] = (1, 2, 3, 4, 5, 7, 10, 16, "T-1", "T")


def drawn_case(cls: str, options: Mapping[str, Any], steps: int | str, *, mu: float | None = None,
               sigmas_from: float | None = None) -> Case:
    """The :class:`Case` of a point of :data:`CONFIG_SPACE`: ``options`` (each at one of its drawn values),
    ``steps`` (an int, or ``"T"``/``"T-1"`` of the config's ``num_train_timesteps``); flow matching's
    ``mu`` for ``set_timesteps`` and, with ``sigmas_from`` = s, a pipeline's unshifted times ``linspace(s, 1/N, N)``
    (s = 1: Flux's; s > 1 reaches past t = 1, where flowdiff must refuse). The case expects ``"equal"``:
    :func:`check_drawn` accepts a refusal that names an option."""
    config = dict(options)
    T = int(config.get("num_train_timesteps", 1000))
    if config.get("trained_betas") == TRAINED_BETAS:
        config["trained_betas"] = [1e-4 + (0.02 - 1e-4) * i / max(T - 1, 1) for i in range(T)]
    n = T if steps == "T" else T - 1 if steps == "T-1" else int(steps)
    sigmas = None if sigmas_from is None else tuple(np.linspace(sigmas_from, 1.0 / n, n).tolist())
    name = "drawn-" + cls.removesuffix("Scheduler").lower()
    return Case(name, cls, config, steps=n, mu=mu, sigmas=sigmas)


_FLOW_MATCHING = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def draw_case(cls: str, pick: Callable[[Sequence[Any]], Any]) -> tuple[Case, torch.dtype]:
    """A point of ``cls``'s configuration space and a dtype, each choice made by ``pick`` (one element of the
    sequence it is given: hypothesis' ``data.draw(sampled_from(...))`` in the test, ``random.choice`` in the
    benchmark): every option left out (its default) or set to one of its values, a step count of
    :data:`STEP_CHOICES` (for a 1000-level table, half of the T- and T−1-step draws become 1, 2 or 3 steps:
    they take seconds), flow matching's ``mu`` and a pipeline's own ``sigmas`` (each one draw in two; for
    FlowMatchHeun, whose ``set_timesteps`` takes neither, one in four; half of the ``sigmas`` start past
    t = 1, at 1.2). For DDIMInverse, one draw in four
    is a DDIM config and one a PNDM config (with their ``_class_name``; the PNDM one with a ``clip_sample``, as
    Stable Diffusion 1.5's carries), which ``encode_like`` reads as inversion pipelines do,
    ``DDIMInverseScheduler.from_config(config)``."""
    source = pick((cls, cls, *INVERTED_SCHEDULERS[1:])) if cls == "DDIMInverseScheduler" else cls
    options = {key: pick(values) for key, values in CONFIG_SPACE[source].items() if pick((False, True))}
    if source == "PNDMScheduler":  # SD 1.5's PNDM config carries clip_sample: PNDM ignores it, DDIMInverse reads it
        options["clip_sample"] = pick((False, True))
    if source != cls:
        options = {"_class_name": source, **options}
    steps = pick(STEP_CHOICES)
    if steps in ("T", "T-1") and options.get("num_train_timesteps", 1000) > 100 and not pick((False, True)):
        steps = pick((1, 2, 3))
    # (FlowMatchHeun's set_timesteps takes neither mu nor sigmas: diffusers refuses them, so they are drawn seldom)
    seldom = (False, False, False, True) if cls == "FlowMatchHeunDiscreteScheduler" else (False, True)
    mu = pick((0.5, 1.15)) if cls in _FLOW_MATCHING and pick(seldom) else None
    sigmas_from = pick((1.0, 1.2)) if cls in _FLOW_MATCHING and pick(seldom) else None
    dtype = pick((torch.float32, torch.float64))
    return drawn_case(cls, options, steps, mu=mu, sigmas_from=sigmas_from), dtype


def zero_length_calls(sched: Any, steps: int) -> int:
    """The model evaluations diffusers' loop (after ``set_timesteps(steps)``) spends on steps of zero length —
    σ to the same σ, which leave its sample as it is and which flowdiff's grids leave out."""
    name = type(sched).__name__
    ts = sched.timesteps.double()
    if name in ("DDIMScheduler", "PNDMScheduler", "DDIMInverseScheduler"):
        acp = sched.alphas_cumprod.double()
        edge = getattr(sched, "initial_alpha_cumprod" if name == "DDIMInverseScheduler" else "final_alpha_cumprod")
        ratio = sched.config.num_train_timesteps // steps
        levels = ts.long().unique() if name == "PNDMScheduler" else ts.long()  # PNDM repeats its first timestep
        prev = levels - ratio
        def level(t: Tensor) -> Tensor:
            return torch.where(t >= 0, acp[t.clamp(0, len(acp) - 1)], edge.double())
        return int((level(levels) == level(prev)).sum())
    sig = sched.sigmas.double()
    if name in ("HeunDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"):  # [σ0, σ1, σ1, …, σn−1, σn−1, end]
        sig = torch.cat([sig[0::2], sig[-1:]])
        calls = torch.full((len(sig) - 1,), 2)
        calls[-1] = 1  # the last step, into the end, evaluates once
        return int(calls[sig[:-1] == sig[1:]].sum())
    sig = sig[: len(ts) + 1]
    return int((sig[:-1] == sig[1:]).sum())


#: what a drawn configuration came to (:func:`check_drawn`)
OUTCOMES = ("equal", "refused", "both refuse")
#: relative tolerance per dtype; float64 only where diffusers' step keeps the caller's dtype (on the same ᾱ table)
REL = {torch.float32: 1e-5, torch.float64: 1e-10}
_KEEPS_DTYPE = ("DDIMScheduler", "DDIMInverseScheduler", "PNDMScheduler")


def _diffusers_alone(case: Case, dtype: torch.dtype) -> tuple[BaseException | None, int]:
    """diffusers' own loop on the case, alone: the error it raises (a non-finite result counts as one) and
    the model evaluations it spends on zero-length steps."""
    config = {"_class_name": case.cls, **case.config}
    model = network(dtype, int(config.get("num_train_timesteps", 1000)))
    noise = _noise(dtype)
    try:
        sched = _scheduler(case)
        if case.cls == "DDIMInverseScheduler":
            sched.set_timesteps(case.steps)
            zero = zero_length_calls(sched, case.steps)
            x = noise.clone()
            for t in sched.timesteps:
                x = sched.step(model(x, t), t, x, return_dict=False)[0]
        else:
            x, _ = _diffusers_generate(sched, model, noise, case)
            zero = zero_length_calls(sched, case.steps)
    except Exception as e:  # noqa: BLE001 - whatever diffusers raises, it cannot run this config
        return e, 0
    if not torch.isfinite(x).all():
        return FloatingPointError("diffusers' own loop returns non-finite values"), 0
    return None, zero


def check_drawn(case: Case, dtype: torch.dtype) -> str:
    """One of :data:`OUTCOMES` for ``case`` in ``dtype``, or AssertionError saying how flowdiff broke the rule:
    flowdiff's route equals diffusers' own loop (relative difference within :data:`REL`, in float32 plus four times
    what float32 moves diffusers' own result from float64, with diffusers'
    model evaluations less those of its zero-length steps), or raises ValueError naming an option of the
    config (or ``steps``, ``mu``, ``sigmas``) — never a different result, never another exception; where
    diffusers' own loop raises or returns non-finite values, flowdiff must refuse."""
    broken, zero = _diffusers_alone(case, dtype)
    what = f"{case.cls}({_config_text(case)}), steps={case.steps}, {dtype}"
    try:
        # flowdiff's divergence guard off: diffusers has none, and the random network grows on steps from σ ~ 1e4
        got, ref, nfe, calls = run_case(case, dtype, checks=Checks(growth=None))
    except ValueError as e:
        import diffusers

        names = {p for c in {case.cls, case.config.get("_class_name", case.cls)}
                 for p in inspect.signature(getattr(diffusers, c).__init__).parameters} - {"self", "kwargs"}
        # a whole word: "steps" in "timesteps" or "num_train_timesteps", "shift" in "shift_terminal" name nothing
        named = [k for k in (*names, "steps", "mu", "sigmas") if re.search(rf"(?<!\w){k}(?!\w)", str(e))]
        assert named, f"{what}: the refusal names no option: {e}"
        return "refused" if broken is None else "both refuse"
    except Exception as e:  # noqa: BLE001 - the property: flowdiff raises nothing but its refusal
        if broken is not None:  # (raised by diffusers' loop in run_case, after flowdiff's plan accepted it)
            raise AssertionError(f"{what}: diffusers' own loop fails ({type(broken).__name__}: {broken}) and "
                                 f"flowdiff does not refuse it") from e
        raise AssertionError(f"{what}: flowdiff raised {type(e).__name__}: {e}") from e
    assert broken is None, (f"{what}: diffusers' own loop fails ({type(broken).__name__}: {broken}) where flowdiff "
                            "returns a result")
    assert nfe == calls - zero, f"{what}: flowdiff evaluated the model {nfe} times, diffusers {calls} ({zero} on " \
                                "zero-length steps)"
    tol = REL[dtype] if dtype == torch.float32 or case.cls in _KEEPS_DTYPE else REL[torch.float32]
    rel = _rel(got, ref)
    if rel > tol and tol == REL[torch.float32]:  # float32 rounding grows with the config's conditioning: allow
        other = torch.float64 if dtype == torch.float32 else torch.float32  # 4× what it moves diffusers' own result
        _, ref2, _, _ = run_case(case, other, checks=Checks(growth=None))  # (not flowdiff's: that would excuse a
        tol += 4 * _rel(ref, ref2)                                          # float32-only error of flowdiff's own)
    assert rel <= tol, f"{what}: relative difference {rel:.3g} > {tol:.3g}"
    return "equal"


def _rel(a: Tensor, b: Tensor, scale: Tensor | None = None) -> float:
    """max |a − b| / max |scale| (``scale`` default ``b``), in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / (b if scale is None else scale.double()).abs().max())


def check_round_trip(case: Case, dtype: torch.dtype) -> tuple[float, float] | None:
    """For a DDIMInverse case flowdiff reproduces: encode, then decode with the DDIM config of the same options
    (``DDIMScheduler.from_config``), on both sides; flowdiff's decode equals diffusers' (AssertionError
    otherwise: within :data:`REL`, and in float32 within twice what float32 rounding moves each side's round
    trip too, which the decode from σ_max amplifies). Returns both round trips' relative reconstruction
    errors, (flowdiff's, diffusers'); None where flowdiff refuses the DDIM config's loop by name (a DDIM config's
    ``thresholding``, which DDIMInverse does not have)."""
    try:
        back, x, images = _round_trip(case, dtype)
    except ValueError:  # the decode's refusal (the encode, checked by check_drawn, is reproduced)
        return None
    rel, tol = _rel(back, x), REL[dtype]
    if rel > tol and dtype == torch.float32:
        back64, x64, _ = _round_trip(case, torch.float64)
        tol += 2 * (_rel(back, back64, x) + _rel(x, x64))
    assert rel <= tol, (f"{case.cls}({_config_text(case)}), steps={case.steps}, {dtype}: the decode differs "
                        f"from diffusers' DDIM by {rel:.3g} > {tol:.3g}")
    return _rel(back, images), _rel(x, images)


def _round_trip(case: Case, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(flowdiff's decode of its encode, diffusers' decode of its encode, the images) for a DDIMInverse case."""
    config = {**case.config, "_class_name": "DDIMScheduler"}
    decoder = Case(case.name + "-decode", "DDIMScheduler", {k: v for k, v in config.items() if k != "_class_name"},
                   steps=case.steps)
    model = network(dtype, int(config.get("num_train_timesteps", 1000)))
    z, z_ref, _, _ = run_case(case, dtype, checks=Checks(growth=None))
    schedule, prediction_type = schedule_from_config(config)
    flow = ProbabilityFlow(model, schedule, prediction_type=prediction_type)
    back = sample_like(flow, z, config, case.steps, checks=Checks(growth=None)).x
    sched = _scheduler(decoder)
    _same_table(sched, flow, dtype)
    sched.set_timesteps(case.steps)
    x = z_ref.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x, return_dict=False)[0]
    return back, x, _noise(dtype)
