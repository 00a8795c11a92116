"""The samplers a user would otherwise pick, run on a flowdiff model: diffusers' schedulers and k-diffusion's.

:func:`flowdiff.compare` (``peers=``) and ``flowdiff compare --peers`` put them in the same table as
flowdiff's solvers: same model, same noise, same budgets, same reference, every model call counted
as one NFE. Each peer runs through its own code, not a reimplementation:

* diffusers: the scheduler's own ``set_timesteps`` / ``scale_model_input`` / ``step`` loop from
  ``x = noise · init_noise_sigma``, the model given as diffusers' ``model(x_t, t)``: a timestep model predicting
  ε, v or x₀ called on the scheduler's sample and timestep, its output converted by the scheduler (built with the
  flow's ``prediction_type``); other flows give ε at the σ of timestep t in the flow's table of noise levels
  (x̄ = x_t·√(1+σ²)), :class:`DiffusersEps`. Its schedulers are
  built from the flow's own ``alphas_cumprod`` (``trained_betas``), with ``num_inference_steps`` = the
  budget (one evaluation a step). :data:`DIFFUSERS_DEFAULT` is the default set;
  :func:`diffusers_configs` every scheduler × order × spacing or σ option
  (``benchmarks/bench_frontier.py`` runs them all).
* diffusers on a flow-matching flow (rectified flow: SD3, Flux): the flow-matching schedulers an SD3/Flux
  user runs instead (:data:`FLOW_MATCHING_DEFAULT`, configured by :func:`flow_matching_samplers` from the
  flow's own scheduler config: its ``shift`` or dynamic shifting, with ``mu`` as the SD3/Flux pipelines
  compute it for the noise's size), each through its own ``set_timesteps`` / ``step`` loop from
  ``x = noise`` (t = 1) on the flow's model output, the velocity, fed the scheduler's own timesteps as the
  pipelines feed them. A configuration the flow cannot express (a dynamic shift that Heun has no option for,
  a start at t = 1 for a σ-native field, an option the installed diffusers lacks, ...) is left out and
  the reason is reported (:func:`fits`), never run wrong; schedulers that take flow-matching configs but do not
  solve the ODE are no peers (:data:`NOT_FLOW_MATCHING_PEERS`: DEIS, SA-Solver).
* k-diffusion: its ``sample_*`` functions on :func:`flowdiff.models.kdiffusion.to_denoiser` of the
  flow (D(x̄, σ) = x̄ − σ·ε), on k-diffusion's own Karras grid between the schedule's σ_min and
  σ_max, started at x̄ = noise·√(1+σ_max²). Heun spends two evaluations a step but one on the last
  step into σ = 0, so a budget N buys (N + 1) // 2 steps. k-diffusion is installed without its
  dependencies (``pip install --no-deps k-diffusion``): :func:`load_kdiffusion` loads only its
  ``sampling`` and ``utils`` modules.

Both are optional: :func:`unavailable` says why a peer cannot run instead of raising.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import time
import types
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..engine.flow import ProbabilityFlow, checked_output
from ..engine.scheduler_grids import FLOW_MATCHING_SCHEDULERS, class_name
from ..engine.schedules import Schedule
from ..models.kdiffusion import to_denoiser

#: The peers :func:`flowdiff.compare` can run, by the name rows carry in ``Run.source``.
PEERS = ("diffusers", "k-diffusion")


@dataclass(frozen=True)
class PeerSampler:
    """One peer's sampler: ``source`` (a name of :data:`PEERS`), its ``name`` and ``grid`` as the table shows
    them, and what runs it: a diffusers scheduler class name with its config, or a k-diffusion ``sample_*``."""

    source: str
    name: str
    grid: str
    target: str
    options: Mapping[str, Any] = field(default_factory=dict)
    #: why this configuration is not run on the flow it was made for (:func:`flow_matching_samplers`), or None
    left_out: str | None = None


@dataclass(frozen=True)
class PeerRun:
    """What one peer sampler made from the noise: the image, the evaluations counted, its steps, seconds."""

    x: Tensor
    nfe: int
    steps: int
    wall_time: float
    sigma_start: float


#: diffusers' schedulers in the default comparison: DDIM on trailing timesteps (flowdiff's Euler on the
#: trailing grid is the same method where the budget N divides T, as the default budgets 10, 20, 50 divide 1000, so
#: its row checks the harness; at other N DDIM's ``step`` goes to t − T // N, which is not its next listed timestep
#: when the trailing timesteps were rounded: at N = 6 it steps from 999 to 833 and reads the model at 832, and its
#: error on the digits model differs from Euler's by 2e-3) and the samplers a diffusers pipeline
#: ships with, each in diffusers' default configuration unless the name says otherwise (DDIM without
#: ``clip_sample``, which clips the predicted image to [−1, 1] and so solves another equation than the ODE).
DIFFUSERS_DEFAULT = (
    PeerSampler("diffusers", "DDIM", "trailing", "DDIMScheduler",
                {"timestep_spacing": "trailing", "clip_sample": False}),
    PeerSampler("diffusers", "Euler", "linspace", "EulerDiscreteScheduler"),
    PeerSampler("diffusers", "DPM++ 2M", "linspace", "DPMSolverMultistepScheduler"),
    PeerSampler("diffusers", "DPM++ 2M Karras", "karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    PeerSampler("diffusers", "UniPC", "linspace", "UniPCMultistepScheduler"),
)
#: k-diffusion's samplers in the default comparison, each on k-diffusion's Karras grid.
KDIFFUSION_DEFAULT = tuple(PeerSampler("k-diffusion", name, "karras", f"sample_{name}")
                           for name in ("euler", "heun", "lms", "dpmpp_2m"))

_SPACINGS = ("linspace", "leading", "trailing")


def diffusers_configs() -> list[PeerSampler]:
    """Every diffusers scheduler × order × timestep spacing or σ option: DDIM, DPM++ 2M/3M, DEIS and UniPC
    (bh1, bh2) of orders 2 and 3, on linspace, leading, trailing, Karras, exponential and beta σ (and
    DPM++'s λ-uniform ``lu_lambdas``)."""
    configs = [PeerSampler("diffusers", "DDIM", sp, "DDIMScheduler", {"timestep_spacing": sp, "clip_sample": False})
               for sp in _SPACINGS]

    def grids(lu: bool) -> list[tuple[str, dict]]:
        out = [(sp, {"timestep_spacing": sp}) for sp in _SPACINGS]
        out += [(name, {f"use_{name}_sigmas": True}) for name in ("karras", "exponential", "beta")]
        return out + ([("lu_lambdas", {"use_lu_lambdas": True})] if lu else [])

    for order in (2, 3):
        for grid, kw in grids(lu=True):
            configs.append(PeerSampler("diffusers", f"DPM++ {order}M", grid, "DPMSolverMultistepScheduler",
                                       {"algorithm_type": "dpmsolver++", "solver_order": order, **kw}))
        for grid, kw in grids(lu=False):
            configs.append(PeerSampler("diffusers", f"DEIS order {order}", grid, "DEISMultistepScheduler",
                                       {"solver_order": order, **kw}))
        for kind in ("bh1", "bh2"):
            for grid, kw in grids(lu=False):
                configs.append(PeerSampler("diffusers", f"UniPC {kind} order {order}", grid,
                                           "UniPCMultistepScheduler", {"solver_type": kind, "solver_order": order,
                                                                       **kw}))
    return configs


#: diffusers' flow-matching schedulers in the default comparison on a flow-matching flow, as templates that
#: :func:`flow_matching_samplers` configures from the flow: FlowMatchEuler on its own spacing (uniform in
#: t, shifted) and on Karras, exponential and beta σ, FlowMatchHeun, and the multistep schedulers that take
#: rectified flow's σ (``use_flow_sigmas``) and velocity (``prediction_type="flow_prediction"``).
FLOW_MATCHING_DEFAULT = (
    PeerSampler("diffusers", "FlowMatch Euler", "linspace", "FlowMatchEulerDiscreteScheduler"),
    PeerSampler("diffusers", "FlowMatch Euler", "karras", "FlowMatchEulerDiscreteScheduler",
                {"use_karras_sigmas": True}),
    PeerSampler("diffusers", "FlowMatch Euler", "exponential", "FlowMatchEulerDiscreteScheduler",
                {"use_exponential_sigmas": True}),
    PeerSampler("diffusers", "FlowMatch Euler", "beta", "FlowMatchEulerDiscreteScheduler", {"use_beta_sigmas": True}),
    PeerSampler("diffusers", "FlowMatch Heun", "linspace", "FlowMatchHeunDiscreteScheduler"),
    PeerSampler("diffusers", "DPM++ 2M flow", "flow sigmas", "DPMSolverMultistepScheduler",
                {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
    PeerSampler("diffusers", "UniPC flow", "flow sigmas", "UniPCMultistepScheduler",
                {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}),
)
#: diffusers schedulers that take a flow-matching config (``use_flow_sigmas``, ``flow_prediction``) in diffusers 0.42
#: but are not peers, and why (``tests/test_peers_flowmatch.py`` checks the first against the installed version)
NOT_FLOW_MATCHING_PEERS = {
    "DEISMultistepScheduler": "its loop on flow σ does not solve the flow's ODE: on a constant velocity v = 1 it moves "
                              "x by about −0.62 where the ODE moves it by −t₀ ≈ −1 (6 steps, shift 3; at order 1 too)",
    "SASolverScheduler": "it adds fresh noise at every step (a stochastic sampler, not the ODE)",
}
#: the sets of diffusers peers, said in reports: on a flow-matching flow, and on any other
FLOW_MATCHING_SET = "flow-matching schedulers (FlowMatchEuler, FlowMatchHeun, DPM++/UniPC on flow σ) on its velocity"
VP_SET = "VP schedulers built from the flow's ᾱ table (trained_betas) on its model's ε, v or x₀"
#: each set by the sampler names its rows carry (:func:`peer_set`)
PEER_SETS = {FLOW_MATCHING_SET: {s.name for s in FLOW_MATCHING_DEFAULT}, VP_SET: {s.name for s in DIFFUSERS_DEFAULT}}


def peer_set(source: str, solver: str) -> str | None:
    """Which set of a peer's samplers a row of ``source``'s sampler ``solver`` belongs to (the diffusers peers on a
    flow-matching flow are its flow-matching schedulers, elsewhere VP schedulers), or None (k-diffusion, flowdiff)."""
    if source != "diffusers":
        return None
    return next((name for name, solvers in PEER_SETS.items() if solver in solvers), None)


def is_flow_matching(flow: ProbabilityFlow) -> bool:
    """Whether ``flow`` is rectified flow (SD3, Flux): its diffusers peers are then the flow-matching schedulers."""
    return getattr(flow.schedule, "kind", None) == "flow_matching"


def default_samplers(peers: tuple[str, ...] | list[str], flow: ProbabilityFlow | None = None) -> list[PeerSampler]:
    """The default samplers of each named peer; on a flow-matching ``flow`` the diffusers ones are its
    flow-matching schedulers (:func:`flow_matching_samplers`), some perhaps left out with the reason."""
    fm = flow is not None and is_flow_matching(flow)
    table = {"diffusers": flow_matching_samplers(flow) if fm and "diffusers" in peers else DIFFUSERS_DEFAULT,
             "k-diffusion": KDIFFUSION_DEFAULT}
    return [s for peer in peers for s in table[peer]]


def flow_matching_config(flow: ProbabilityFlow) -> dict[str, Any]:
    """The flow-matching scheduler config of ``flow``: the one it was loaded with (``scheduler_config`` of a
    FlowMatch scheduler: its shift, dynamic shifting and spacing options), else its schedule's training definition
    (``num_train_timesteps``, ``shift``)."""
    if not is_flow_matching(flow):
        raise ValueError(f"flow must have a flow-matching schedule (rectified flow), got {flow.schedule!r}")
    config = getattr(flow, "scheduler_config", None)
    if isinstance(config, Mapping) and class_name(config) in FLOW_MATCHING_SCHEDULERS:
        return {k: v for k, v in config.items() if not k.startswith("_")}
    return {"num_train_timesteps": flow.schedule.train_steps, "shift": flow.schedule.shift}


def _parameters(target: str) -> frozenset[str] | None:
    import diffusers

    cls = getattr(diffusers, target, None)
    if cls is None:
        return None
    return frozenset(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "kwargs"))


def _patch_size(flow: ProbabilityFlow) -> int | None:
    """The patch size of the flow's diffusers transformer (SD3's pipeline counts the sequence length in patches)."""
    config = getattr(getattr(flow.model, "net", None), "config", None)
    patch = getattr(config, "patch_size", None)
    return patch if isinstance(patch, int) and patch > 0 else None


def _flow_matching_kwargs(template: PeerSampler, config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler's keyword arguments for ``template`` on a flow of scheduler config ``config``."""
    if template.target.startswith("FlowMatch"):
        # the flow's own config as the class's from_config reads it (Heun: num_train_timesteps and shift alone),
        # the spacing as the template says
        spacing = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
        params = _parameters(template.target) or frozenset()
        kwargs = {k: v for k, v in config.items() if k in params and k not in spacing}
    else:  # the multistep schedulers: rectified flow's σ shifted by flow_shift (exp(mu) with dynamic shifting)
        kwargs = {"num_train_timesteps": config.get("num_train_timesteps", 1000),
                  "flow_shift": config.get("shift", 1.0)}
        kwargs.update({k: config[k] for k in ("use_dynamic_shifting", "time_shift_type", "shift_terminal")
                       if config.get(k)})
    return {**kwargs, **dict(template.options)}


def _why_left_out(template: PeerSampler, config: Mapping[str, Any], kwargs: Mapping[str, Any],
                  flow: ProbabilityFlow) -> str | None:
    """Why ``template`` cannot run as configured on ``flow`` (see :func:`flow_matching_samplers`), or None."""
    params = _parameters(template.target)
    if params is None:
        return f"the installed diffusers ({version('diffusers')}) has no {template.target}"
    missing = sorted(k for k in kwargs if k not in params)
    if missing:
        why = "the flow's config asks for it" if any(k in config for k in missing) else "this configuration is it"
        return f"the installed diffusers' {template.target} has no {', '.join(missing)} ({why})"
    dynamic = bool(config.get("use_dynamic_shifting"))
    if template.target == "FlowMatchHeunDiscreteScheduler":
        for key in ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                    "use_beta_sigmas"):
            if config.get(key):
                return (f"FlowMatchHeunDiscreteScheduler has no {key}: from the flow's config it would run the static "
                        f"shift={config.get('shift', 1.0)!r} grid, not the one the config asks for")
    if template.target == "DPMSolverMultistepScheduler" and dynamic \
            and config.get("time_shift_type", "exponential") != "exponential":
        return (f"DPMSolverMultistepScheduler's dynamic shift is exponential alone; the flow's config has "
                f"time_shift_type={config.get('time_shift_type')!r}")
    if template.target.startswith("FlowMatch"):
        for key, why in (("stochastic_sampling", "re-noises at every step (not the ODE)"),
                         ("invert_sigmas", "runs t from 0 to 1 (not a generation)")):
            if kwargs.get(key):  # FlowMatchHeun has neither option: it ignores them, as its from_config does
                return f"the flow's config has {key}=True, whose loop {why}"
        if flow.sigma_field is not None:
            return ("it starts at t = 1 (σ = ∞), where a σ-native field has no value; the flow needs a "
                    "model(x_t, t)")
        if flow.prediction_type == "epsilon":
            return "it starts at t = 1 (σ = ∞), where an epsilon model defines no clean image"
    if dynamic and not getattr(flow, "packed", False) and _patch_size(flow) is None:
        return ("the flow's config shifts by the image's sequence length (use_dynamic_shifting), which flowdiff "
                "reads off a diffusers transformer's patch_size or a Flux flow's packed tokens; this flow has neither")
    return None


def flow_matching_samplers(flow: ProbabilityFlow) -> list[PeerSampler]:
    """:data:`FLOW_MATCHING_DEFAULT` configured for the flow-matching ``flow``, as its users run them.

    Each takes the flow's config (:func:`flow_matching_config`): FlowMatchEuler all of it (the template's
    spacing replacing the config's own), FlowMatchHeun its ``num_train_timesteps`` and ``shift`` (its only
    options), the multistep schedulers ``flow_shift`` = ``shift`` and the dynamic shifting. With
    ``use_dynamic_shifting`` each is given the ``mu`` that the pipeline computes for the noise's size
    (Flux: :func:`flowdiff.models.pipelines.flux_grid_arguments`, with its ``sigmas``; SD3: the sequence
    length in patches). A configuration that cannot run as the config says carries ``left_out``, the reason,
    which :func:`fits` reports for each budget. The grid label says the spacing and the shift."""
    config = flow_matching_config(flow)
    dynamic = bool(config.get("use_dynamic_shifting"))
    out = []
    for template in FLOW_MATCHING_DEFAULT:
        kwargs = _flow_matching_kwargs(template, config)
        heun = template.target == "FlowMatchHeunDiscreteScheduler"
        shift = "mu" if dynamic and not heun else f"shift {float(config.get('shift', 1.0)):g}"
        if dynamic and getattr(flow, "packed", False) and template.target == "FlowMatchEulerDiscreteScheduler":
            shift = "Flux sigmas, mu"
        out.append(PeerSampler(template.source, template.name, f"{template.grid}, {shift}", template.target,
                               kwargs, _why_left_out(template, config, kwargs, flow)))
    return out


def check_peers(peers: Any) -> list[str]:
    """``peers`` as a list of names of :data:`PEERS` (a comma-free string is one name); errors name what is accepted."""
    values = [peers] if isinstance(peers, str) else peers
    try:
        values = list(values)
    except TypeError:
        raise TypeError(f"peers must be names of {', '.join(PEERS)}, got {type(peers).__name__}") from None
    if not values:
        raise ValueError(f"peers must name at least one peer (or be None); accepted: {', '.join(PEERS)}")
    for v in values:
        if not isinstance(v, str):
            raise TypeError(f"peers must be names (str), got {type(v).__name__}")
        if v not in PEERS:
            raise ValueError(f"unknown peer {v!r} in peers; accepted: {', '.join(PEERS)}")
    return list(dict.fromkeys(values))


def unavailable(peer: str) -> str | None:
    """Why ``peer`` cannot run here (not installed, or its import fails), or ``None``."""
    try:
        _LOADERS[peer]()
    except ImportError as err:
        return f"{peer} is not available ({err}); install it to compare against it ({_INSTALL[peer]})"
    return None


def version(peer: str) -> str:
    """The installed version of ``peer`` (its distribution's metadata), or ``"not installed"``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _version

    try:
        return _version(peer)
    except PackageNotFoundError:
        return "not installed"


def run(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, budget: int,
        model_kwargs: Mapping[str, Any] | None = None) -> PeerRun:
    """``sampler`` on ``flow`` from ``noise`` (DDIM scale, x_T ~ N(0, I)) within ``budget`` evaluations: its steps
    are sized for one evaluation a step, or two and one on the last for Heun, DPM2 (ancestral too) and DPM++ 2S
    ancestral and SDE (:data:`_TWO_A_STEP`); a run that spends more
    is a ``ValueError``, as is a k-diffusion sampler that is not the ODE's peer (:func:`kdiffusion_sampler`)."""
    if sampler.left_out is not None:
        raise ValueError(f"{sampler.source} {sampler.name} on {sampler.grid} is left out on this flow: "
                         f"{sampler.left_out}")
    refuse_infinite_sigma_max(flow, f"{sampler.source} {sampler.name} on {sampler.grid}")
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral):
        raise TypeError(f"budget must be a positive int (model evaluations), got {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be a positive int (model evaluations), got {budget!r}")
    budget = int(budget)
    if sampler.source == "diffusers" and _on_flow_matching(sampler):
        if not is_flow_matching(flow):
            raise ValueError(f"{sampler.name} on {sampler.grid} is a flow-matching scheduler; the flow's schedule is "
                             f"{flow.schedule!r} (its diffusers peers: default_samplers(['diffusers'], flow))")
        out = _run_flow_matching(sampler, flow, noise, budget, model_kwargs)
    elif sampler.source == "diffusers":
        out = _run_diffusers(sampler, flow, noise, budget, model_kwargs)
    elif sampler.source == "k-diffusion":
        out = _run_kdiffusion(sampler, flow, noise, budget, model_kwargs)
    else:
        raise ValueError(f"unknown peer {sampler.source!r}; accepted: {', '.join(PEERS)}")
    if out.nfe > budget:  # its steps were sized for one evaluation a step, or Heun's count (_steps)
        raise ValueError(f"{sampler.source} {sampler.target} spent {out.nfe} model evaluations of a budget of {budget} "
                         f"in {out.steps} steps: flowdiff sizes the steps of samplers that spend one evaluation a step "
                         f"and of {', '.join(_TWO_A_STEP)} (two a step, one on the last)")
    return out


def refuse_infinite_sigma_max(flow: ProbabilityFlow, who: str) -> None:
    """Refuse ``who`` (peers' samplers) on a zero-terminal-SNR schedule (σ_max = ∞), before any evaluation: the
    adapters here pass the schedule's σ range to the peers' loops, which have no σ = ∞ (diffusers' Euler came out NaN,
    k-diffusion's σ NaN)."""
    if flow.schedule.sigma_max == math.inf:
        raise ValueError(f"{who}: the peers' samplers are not run on a zero-terminal-SNR schedule (σ_max = ∞), where "
                         "their grids have no finite first σ; compare flowdiff's solvers there (leave peers= out), "
                         "which start as generate does, with the boundary step out of σ = ∞")


def fits(sampler: PeerSampler, budget: int) -> str | None:
    """Why ``sampler`` cannot spend ``budget`` evaluations, or cannot run on the flow it was made for, or ``None``."""
    if sampler.left_out is not None:
        return f"left out: {sampler.left_out}"
    if _steps(sampler, budget) < 1:
        return f"one step costs more than {budget} evaluations"
    repeat = _repeated_timestep(sampler, _steps(sampler, budget))
    if repeat is not None:
        return (f"at {_steps(sampler, budget)} steps its integer timesteps repeat ({repeat} twice, T = "
                f"{sampler.options.get('num_train_timesteps', 1000)}): diffusers' own loop looks its step up by "
                "timestep and fails or re-reads a level")
    if sampler.options.get("shift_terminal") and _steps(sampler, budget) == 1:
        return ("shift_terminal with one step: diffusers stretches the times to end at it by dividing 1 − t_last = 0 "
                "by itself (its timestep is NaN)")
    return None


def _repeated_timestep(sampler: PeerSampler, steps: int) -> int | None:
    """A timestep that a multistep scheduler on flow σ lists twice at ``steps`` steps (it rounds them to integers),
    or None; not checked with dynamic shifting, whose ``mu`` comes with the noise."""
    if sampler.source != "diffusers" or not sampler.options.get("use_flow_sigmas") \
            or sampler.options.get("use_dynamic_shifting") or sampler.left_out is not None:
        return None
    import diffusers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = getattr(diffusers, sampler.target)(**dict(sampler.options))
        scheduler.set_timesteps(steps)
    values, counts = torch.unique(scheduler.timesteps, return_counts=True)
    return int(values[counts > 1][0]) if bool((counts > 1).any()) else None


#: the peers' samplers that spend two evaluations a step and one on the last (its Euler step into σ = 0); the ancestral
#: and SDE ones run as the ODE's peers at eta=0 alone (:func:`kdiffusion_sampler`)
_TWO_A_STEP = ("sample_heun", "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpmpp_2s_ancestral", "sample_dpmpp_sde",
               "FlowMatchHeunDiscreteScheduler")


def _steps(sampler: PeerSampler, budget: int) -> int:
    return (budget + 1) // 2 if sampler.target in _TWO_A_STEP else budget


# ---------------------------------------------------------------------------------------------- diffusers


def table_sigma(flow: ProbabilityFlow, t: Tensor | float) -> float:
    """σ of diffusers' (possibly fractional) timestep ``t``: the schedule's table of trained noise levels
    (its ``alphas_cumprod``, the one the scheduler is built from), interpolated in log σ between
    timesteps as diffusers does — also for a schedule whose model time is continuous."""
    return float(Schedule.sigma_at(flow.schedule, float(t)))


class DiffusersEps:
    """The flow's model as diffusers' ``model(x_t, t)``, counting its calls (``nfe``): one per scheduler step,
    whatever the batch.

    A timestep model predicting ε, v or x₀ (:attr:`direct`) is called as a diffusers pipeline calls its network:
    on the scheduler's sample and its own timestep, its output returned as it is, and the scheduler converts it
    with its own σ (:func:`diffusers_scheduler` gives it the flow's ``prediction_type``). Where a scheduler feeds
    a timestep rounded off its σ (Karras σ on integer timesteps), converting v to ε at the rounded timestep's σ
    instead moved DPM++ 2M Karras off a diffusers user's own loop by 8e-4. Other flows (a σ-native field, a
    ``timesteps`` table, a ``velocity`` model) give ε = the field at σ = :func:`table_sigma` of t,
    x̄ = x_t·√(1+σ²)."""

    def __init__(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        self.field = flow.field(model_kwargs)  # also checks model_kwargs
        self.flow = flow
        self.kwargs = dict(model_kwargs or {})
        self.direct = _direct_prediction(flow) is not None
        self.nfe = 0

    def __call__(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        """The model at the scheduler's timestep ``t``; the loops here give it as a Python number, read off the
        scheduler's timesteps once before the loop (a tensor's value read here would be a device sync a step)."""
        self.nfe += 1
        t = float(t)
        if self.direct:
            t_dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32
            timestep = torch.full((x_t.shape[0],), t, dtype=t_dtype, device=x_t.device)
            return checked_output(self.flow.model(x_t, timestep, **self.kwargs), x_t, f"timestep {t}")
        sigma = table_sigma(self.flow, t)
        return self.field(sigma, x_t * math.sqrt(1.0 + sigma * sigma))


def _direct_prediction(flow: ProbabilityFlow) -> str | None:
    """The ``prediction_type`` a diffusers scheduler is given to take the flow's model output as it is (a timestep
    model predicting ε, v or x₀, fed t(σ) everywhere), or None where :class:`DiffusersEps` gives it ε. Only on a VP
    table's own timesteps and input scale (:class:`Schedule`'s ``timestep`` and ``alpha``), which are what the
    scheduler feeds: a VE model reads x̄ itself at ¼·ln σ, and fed the scheduler's x_t at timestep 999 its DDIM row
    was 21 off flowdiff's Euler on the same trailing grid (3e-5 through ε)."""
    schedule = type(flow.schedule)
    if flow.sigma_field is None and not flow.timesteps and flow.prediction_type in ("epsilon", "v_prediction",
                                                                                    "sample") \
            and schedule.timestep is Schedule.timestep and schedule.alpha is Schedule.alpha:
        return flow.prediction_type
    return None


def diffusers_scheduler(sampler: PeerSampler, flow: ProbabilityFlow) -> Any:
    """The diffusers scheduler of ``sampler`` on the flow's noise schedule (its ``alphas_cumprod``), taking the
    flow's model output (``prediction_type``) as :class:`DiffusersEps` gives it."""
    import diffusers

    ac = np.asarray(flow.schedule.alphas_cumprod, dtype=np.float64)
    betas = (1.0 - ac / np.concatenate([[1.0], ac[:-1]])).tolist()
    cls = getattr(diffusers, sampler.target, None)
    if not (isinstance(cls, type) and sampler.target.endswith("Scheduler")):
        raise ValueError(f"diffusers {diffusers.__version__} has no scheduler {sampler.target!r}; a diffusers peer's "
                         "target is a scheduler class name, e.g. DDIMScheduler, DPMSolverMultistepScheduler")
    return cls(num_train_timesteps=len(ac), trained_betas=betas,
               prediction_type=_direct_prediction(flow) or "epsilon", **dict(sampler.options))


def _run_diffusers(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, budget: int,
                   model_kwargs: Mapping[str, Any] | None) -> PeerRun:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of scheduler options
        scheduler = diffusers_scheduler(sampler, flow)
        scheduler.set_timesteps(budget, device=noise.device)
    model = DiffusersEps(flow, model_kwargs)
    start = time.perf_counter()
    x = noise * scheduler.init_noise_sigma
    host = scheduler.timesteps.tolist()  # the model's times, read once: no device sync inside the loop
    with torch.no_grad():
        for t, t_host in zip(scheduler.timesteps, host):
            eps = model(scheduler.scale_model_input(x, t), t_host)
            x = scheduler.step(eps, t, x).prev_sample
    wall = time.perf_counter() - start
    return PeerRun(x, model.nfe, len(host), wall, table_sigma(flow, host[0]))


# ---------------------------------------------------------------------------------------------- flow matching


class DiffusersVelocity:
    """The flow's velocity as a flow-matching pipeline's ``model(x, timestep)`` (x = x̄/(1+σ), t = timestep / T).

    A velocity model (``model(x_t, t)``, ``prediction_type="velocity"``) is called as the SD3/Flux pipelines call
    their transformer: on the scheduler's sample and its own timestep (the multistep schedulers round it to an
    integer), its output returned as it is. Other flows give v = (1+σ)·(ε(x̄, σ) − x) at the σ = t/(1−t) of that
    timestep, t = timestep / T; at t = 1 (σ = ∞) v = x − x̂₀ with x̂₀ from
    :meth:`~flowdiff.ProbabilityFlow.step_from_noise`. Counts its calls (``nfe``)."""

    def __init__(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        self.flow = flow
        self.kwargs = dict(model_kwargs or {})
        self.direct = flow.sigma_field is None and flow.prediction_type == "velocity"
        self.field = None if self.direct else flow.field(model_kwargs)
        self.T = float(flow.schedule.train_steps)
        self.nfe = 0

    def __call__(self, x: Tensor, timestep: Tensor | float) -> Tensor:
        """The velocity at the scheduler's ``timestep``, given by the loop here as a Python number (read once before
        the loop, as :class:`DiffusersEps`'s)."""
        self.nfe += 1
        timestep = float(timestep)
        if self.direct:
            t_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            t = torch.full((x.shape[0],), timestep, dtype=t_dtype, device=x.device)
            return checked_output(self.flow.model(x, t, **self.kwargs), x, f"timestep {timestep}")
        t_fm = timestep / self.T
        if t_fm >= 1.0:
            return x - self.flow.step_from_noise(x, 0.0, self.kwargs)
        sigma = t_fm / (1.0 - t_fm)
        return (self.field(sigma, x * (1.0 + sigma)) - x) * (1.0 + sigma)


def flow_matching_scheduler(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, steps: int) -> Any:
    """``sampler``'s diffusers scheduler with ``set_timesteps`` called as the SD3/Flux pipelines call it for
    ``noise`` and ``steps``: with ``mu`` (and Flux's ``sigmas``) where its config shifts dynamically."""
    import diffusers

    from ..models.pipelines import flux_grid_arguments

    options = dict(sampler.options)
    scheduler = getattr(diffusers, sampler.target)(**options)
    config = flow_matching_config(flow)  # its base_shift, max_shift, ... give mu for every scheduler
    kwargs: dict[str, Any] = {}
    if options.get("use_dynamic_shifting"):
        if getattr(flow, "packed", False):  # FluxPipeline: its mu and linspace(1, 1/N, N) times for FlowMatchEuler
            mu, base = flux_grid_arguments(config, noise.shape[1], steps)
            kwargs = {"mu": mu, "sigmas": base} if sampler.target == "FlowMatchEulerDiscreteScheduler" else {"mu": mu}
        else:  # StableDiffusion3Pipeline: the latents' sequence length in patches
            from diffusers.pipelines.flux.pipeline_flux import calculate_shift

            patch = _patch_size(flow)
            seq = (noise.shape[-2] // patch) * (noise.shape[-1] // patch)
            kwargs = {"mu": calculate_shift(seq, config.get("base_image_seq_len", 256),
                                            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                            config.get("max_shift", 1.16))}
    scheduler.set_timesteps(steps, device=noise.device, **kwargs)
    return scheduler


def _run_flow_matching(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, budget: int,
                       model_kwargs: Mapping[str, Any] | None) -> PeerRun:
    steps = _steps(sampler, budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = flow_matching_scheduler(sampler, flow, noise, steps)
    model = DiffusersVelocity(flow, model_kwargs)
    start = time.perf_counter()
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # the FlowMatch schedulers start from the noise itself
    host = scheduler.timesteps.tolist()  # the model's times, read once: no device sync inside the loop
    with torch.no_grad():
        for t, t_host in zip(scheduler.timesteps, host):
            x = scheduler.step(model(x, t_host), t, x).prev_sample
    wall = time.perf_counter() - start
    t0 = float(scheduler.sigmas[0])  # rectified flow's time t of its first sample (its timestep may be rounded)
    return PeerRun(x, model.nfe, steps, wall, math.inf if t0 >= 1 else t0 / (1.0 - t0))


# ---------------------------------------------------------------------------------------------- k-diffusion


class _CountingDenoiser:
    """k-diffusion's ``model(x, sigma, **extra_args)`` = D(x̄, σ) of the flow, counting calls."""

    def __init__(self, flow: ProbabilityFlow) -> None:
        self.denoiser = to_denoiser(flow)
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor, **extra_args: Any) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, **extra_args)


def kdiffusion_sigmas(flow: ProbabilityFlow, steps: int, dtype: torch.dtype = torch.float64,
                      device: torch.device | str = "cpu") -> Tensor:
    """k-diffusion's own Karras grid of ``steps`` steps between the schedule's σ_min and σ_max, then 0."""
    K = load_kdiffusion()
    sigmas = K.get_sigmas_karras(steps, flow.schedule.sigma_min, flow.schedule.sigma_max, device="cpu")
    return sigmas.to(dtype=dtype, device=device)


#: the arguments of a k-diffusion ``sample_*`` that the harness gives; the others are a sampler's options
_KDIFFUSION_OWN = ("model", "x", "sigmas", "extra_args", "callback", "disable", "noise_sampler")


def kdiffusion_sampler(sampler: PeerSampler) -> Callable[..., Tensor]:
    """The k-diffusion ``sample_*`` function of ``sampler``, refused where it cannot be the ODE's peer: no such
    function, one that takes no σ grid (``sample_dpm_fast``, ``sample_dpm_adaptive``), an option it does not take or
    that the harness gives, or a configuration that adds fresh noise at every step (``s_churn`` > 0, or ``eta`` ≠ 0
    for the ancestral and SDE samplers: a stochastic sampler, not the ODE the table measures)."""
    K = load_kdiffusion()
    fn = getattr(K, sampler.target, None) if sampler.target.startswith("sample_") else None
    params = inspect.signature(fn).parameters if callable(fn) else {}
    if "sigmas" not in params:
        accepted = sorted(n for n in dir(K) if n.startswith("sample_")
                          and "sigmas" in inspect.signature(getattr(K, n)).parameters)
        raise ValueError(f"k-diffusion has no sampler {sampler.target!r} on a σ grid; accepted targets: "
                         f"{', '.join(accepted)}")
    options = dict(sampler.options)
    unknown = sorted(k for k in options if k not in params or k in _KDIFFUSION_OWN)
    if unknown:
        takes = sorted(k for k in params if k not in _KDIFFUSION_OWN)
        raise ValueError(f"k-diffusion {sampler.target} option(s) {', '.join(unknown)} are not its options (the "
                         f"harness gives the model, x, sigmas, extra_args); it takes: {', '.join(takes) or 'none'}")

    def value(name: str) -> Any:
        return options.get(name, params[name].default)

    noisy = [f"s_churn={value('s_churn')!r}"] if "s_churn" in params and value("s_churn") != 0 else []
    if "noise_sampler" in params and "eta" in params and value("eta") != 0:
        noisy.append(f"eta={value('eta')!r}")
    if noisy:
        raise ValueError(f"k-diffusion {sampler.target} with {', '.join(noisy)} adds fresh noise at every step: a "
                         "stochastic sampler, not the ODE the comparison measures; give s_churn=0 / eta=0, or compare "
                         "it with flowdiff.generate(..., solver=flowdiff.Stochastic(eta))")
    return fn


def _run_kdiffusion(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, budget: int,
                    model_kwargs: Mapping[str, Any] | None) -> PeerRun:
    sample = kdiffusion_sampler(sampler)
    steps = _steps(sampler, budget)
    # its σ grid as its users hold it, in float32 (get_sigmas_karras' own dtype) beside a half-precision state:
    # sample_lms reads it through NumPy, which has no bfloat16 (a bfloat16 comparison stopped there)
    sigmas = kdiffusion_sigmas(flow, steps, torch.promote_types(noise.dtype, torch.float32), noise.device)
    model = _CountingDenoiser(flow)
    x_start = noise * math.sqrt(1.0 + float(sigmas[0]) ** 2)
    # the ancestral and SDE samplers run here at eta=0 alone (kdiffusion_sampler), where their noise is multiplied by
    # 0: given as zeros, it draws nothing from torch's generator and needs no torchsde (their default Brownian tree)
    given = {"noise_sampler": lambda sigma, sigma_next: torch.zeros_like(x_start)} \
        if "noise_sampler" in inspect.signature(sample).parameters else {}
    start = time.perf_counter()
    with torch.no_grad():
        x = sample(model, x_start, sigmas, extra_args=dict(model_kwargs or {}), disable=True, **given,
                   **dict(sampler.options))
    return PeerRun(x, model.nfe, steps, time.perf_counter() - start, float(sigmas[0]))


def load_kdiffusion() -> types.ModuleType:
    """k-diffusion's ``sampling`` module, without its package ``__init__`` (which imports torchvision, clip
    and more for training): only its ``utils`` and ``sampling`` are executed, under a private package name,
    with ``torchvision`` and ``torchsde`` stood in for while they load if they are not installed (they serve
    image transforms and the SDE samplers, neither of which the ODE samplers use)."""
    name = "_flowdiff_peer_k_diffusion"
    if f"{name}.sampling" in sys.modules:
        return sys.modules[f"{name}.sampling"]
    try:
        spec = importlib.util.find_spec("k_diffusion")
    except (ImportError, ValueError) as err:
        raise ImportError(f"k_diffusion cannot be imported: {err}") from None
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'k_diffusion'")
    root = Path(list(spec.submodule_search_locations)[0])
    stubs = [m for m in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchsde")
             if m not in sys.modules and importlib.util.find_spec(m.split(".")[0]) is None]
    package = types.ModuleType(name)
    package.__path__ = [str(root)]
    sys.modules[name] = package
    try:
        for m in stubs:
            sys.modules[m] = types.ModuleType(m)
        for sub in ("utils", "sampling"):
            sub_spec = importlib.util.spec_from_file_location(f"{name}.{sub}", root / f"{sub}.py")
            if sub_spec is None or sub_spec.loader is None:
                raise ImportError(f"k_diffusion has no {sub}.py in {root}")
            module = importlib.util.module_from_spec(sub_spec)
            sys.modules[f"{name}.{sub}"] = module
            sub_spec.loader.exec_module(module)
            setattr(package, sub, module)
    except BaseException:
        for sub in ("utils", "sampling"):
            sys.modules.pop(f"{name}.{sub}", None)
        sys.modules.pop(name, None)
        raise
    finally:
        for m in stubs:
            sys.modules.pop(m, None)
    return sys.modules[f"{name}.sampling"]


def _load_diffusers() -> types.ModuleType:
    return importlib.import_module("diffusers")


def _on_flow_matching(sampler: PeerSampler) -> bool:
    """Whether a diffusers sampler runs rectified flow (a FlowMatch scheduler, or a multistep one on flow σ)."""
    return sampler.target.startswith("FlowMatch") or bool(sampler.options.get("use_flow_sigmas"))


_LOADERS: dict[str, Callable[[], types.ModuleType]] = {"diffusers": _load_diffusers, "k-diffusion": load_kdiffusion}
_INSTALL = {"diffusers": "pip install diffusers", "k-diffusion": "pip install --no-deps k-diffusion"}
