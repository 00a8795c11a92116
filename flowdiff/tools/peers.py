"""The samplers a user would otherwise pick, run on a flowdiff model: diffusers' schedulers and k-diffusion's.

:func:`flowdiff.compare` (``peers=``) and ``flowdiff compare --peers`` put them in the same table as
flowdiff's solvers: same model, same noise, same budgets, same reference, every model call counted
as one NFE. Each peer runs through its own code, not a reimplementation:

* diffusers: the scheduler's own ``set_timesteps`` / ``scale_model_input`` / ``step`` loop from
  ``x = noise · init_noise_sigma``, the model given as diffusers' ``model(x_t, t)`` returning ε at
  the σ of timestep t in the flow's table of noise levels (x̄ = x_t·√(1+σ²)). Its schedulers are
  built from the flow's own ``alphas_cumprod`` (``trained_betas``), with ``num_inference_steps`` = the
  budget (one evaluation a step). :data:`DIFFUSERS_DEFAULT` is the default set;
  :func:`diffusers_configs` every scheduler × order × spacing or σ option
  (``benchmarks/bench_frontier.py`` runs them all).
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
import math
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

from ..engine.flow import ProbabilityFlow
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


@dataclass(frozen=True)
class PeerRun:
    """What one peer sampler made from the noise: the image, the evaluations counted, its steps, seconds."""

    x: Tensor
    nfe: int
    steps: int
    wall_time: float
    sigma_start: float


#: diffusers' schedulers in the default comparison: DDIM on trailing timesteps (flowdiff's Euler on the
#: trailing grid is the same method, so its row checks the harness) and the samplers a diffusers pipeline
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


def default_samplers(peers: tuple[str, ...] | list[str]) -> list[PeerSampler]:
    """The default samplers of each named peer."""
    table = {"diffusers": DIFFUSERS_DEFAULT, "k-diffusion": KDIFFUSION_DEFAULT}
    return [s for peer in peers for s in table[peer]]


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
    """``sampler`` on ``flow`` from ``noise`` (DDIM scale, x_T ~ N(0, I)) within ``budget`` evaluations."""
    if sampler.source == "diffusers":
        return _run_diffusers(sampler, flow, noise, budget, model_kwargs)
    if sampler.source == "k-diffusion":
        return _run_kdiffusion(sampler, flow, noise, budget, model_kwargs)
    raise ValueError(f"unknown peer {sampler.source!r}; accepted: {', '.join(PEERS)}")


def fits(sampler: PeerSampler, budget: int) -> str | None:
    """Why ``sampler`` cannot spend ``budget`` evaluations, or ``None``."""
    if _steps(sampler, budget) < 1:
        return f"one step costs more than {budget} evaluations"
    return None


def _steps(sampler: PeerSampler, budget: int) -> int:
    # k-diffusion's Heun: 2 evaluations a step, 1 on the last (its Euler step into σ = 0)
    return (budget + 1) // 2 if sampler.target == "sample_heun" else budget


# ---------------------------------------------------------------------------------------------- diffusers


def table_sigma(flow: ProbabilityFlow, t: Tensor | float) -> float:
    """σ of diffusers' (possibly fractional) timestep ``t``: the schedule's table of trained noise levels
    (its ``alphas_cumprod``, the one the scheduler is built from), interpolated in log σ between
    timesteps as diffusers does — also for a schedule whose model time is continuous."""
    return float(Schedule.sigma_at(flow.schedule, float(t)))


class DiffusersEps:
    """The flow's ε as diffusers' ``model(x_t, t)``: σ = :func:`table_sigma` of t, x̄ = x_t·√(1+σ²).

    Counts its calls (``nfe``): one per scheduler step, whatever the batch."""

    def __init__(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        self.field = flow.field(model_kwargs)
        self.flow = flow
        self.nfe = 0

    def __call__(self, x_t: Tensor, t: Tensor | float) -> Tensor:
        self.nfe += 1
        sigma = table_sigma(self.flow, t)
        return self.field(sigma, x_t * math.sqrt(1.0 + sigma * sigma))


def diffusers_scheduler(sampler: PeerSampler, flow: ProbabilityFlow) -> Any:
    """The diffusers scheduler of ``sampler`` on the flow's noise schedule (its ``alphas_cumprod``)."""
    import diffusers

    ac = np.asarray(flow.schedule.alphas_cumprod, dtype=np.float64)
    betas = (1.0 - ac / np.concatenate([[1.0], ac[:-1]])).tolist()
    cls = getattr(diffusers, sampler.target)
    return cls(num_train_timesteps=len(ac), trained_betas=betas, prediction_type="epsilon", **dict(sampler.options))


def _run_diffusers(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, budget: int,
                   model_kwargs: Mapping[str, Any] | None) -> PeerRun:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes of scheduler options
        scheduler = diffusers_scheduler(sampler, flow)
        scheduler.set_timesteps(budget, device=noise.device)
    model = DiffusersEps(flow, model_kwargs)
    start = time.perf_counter()
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = model(scheduler.scale_model_input(x, t), t)
            x = scheduler.step(eps, t, x).prev_sample
    wall = time.perf_counter() - start
    first = table_sigma(flow, scheduler.timesteps[0])
    return PeerRun(x, model.nfe, len(scheduler.timesteps), wall, first)


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


def _run_kdiffusion(sampler: PeerSampler, flow: ProbabilityFlow, noise: Tensor, budget: int,
                    model_kwargs: Mapping[str, Any] | None) -> PeerRun:
    K = load_kdiffusion()
    steps = _steps(sampler, budget)
    # its σ grid as its users hold it, in float32 (get_sigmas_karras' own dtype) beside a half-precision state:
    # sample_lms reads it through NumPy, which has no bfloat16 (a bfloat16 comparison stopped there)
    sigmas = kdiffusion_sigmas(flow, steps, torch.promote_types(noise.dtype, torch.float32), noise.device)
    model = _CountingDenoiser(flow)
    start = time.perf_counter()
    with torch.no_grad():
        x = getattr(K, sampler.target)(model, noise * math.sqrt(1.0 + float(sigmas[0]) ** 2), sigmas,
                                       extra_args=dict(model_kwargs or {}), disable=True, **dict(sampler.options))
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


_LOADERS: dict[str, Callable[[], types.ModuleType]] = {"diffusers": _load_diffusers, "k-diffusion": load_kdiffusion}
_INSTALL = {"diffusers": "pip install diffusers", "k-diffusion": "pip install --no-deps k-diffusion"}
