"""Diffusers scheduler configs: the training schedule they define, and the σ grid their loop runs.

A diffusers scheduler config holds two different things. Its training definition
(``beta_schedule``, ``num_train_timesteps``, ``prediction_type``, flow matching's ``shift``)
defines the ODE: :func:`schedule_from_config`. Its sampling settings (``timestep_spacing``,
``steps_offset``, ``set_alpha_to_one``, the time shift, ``mu``) define one grid on it:
:func:`scheduler_sigmas` gives that grid, so that ``generate(..., grid=grid)`` with Euler is
the scheduler's loop to float rounding.

* ``DDIMScheduler``: the timesteps of ``set_timesteps(steps)`` (``leading`` with
  ``steps_offset``, ``trailing``, ``linspace``), each step going to t − T//steps. The last step
  goes to σ = 0 when ``set_alpha_to_one`` and to the first trained level σ_min otherwise
  (diffusers' ``final_alpha_cumprod = alphas_cumprod[0]``), so the grid ends at σ_min there.
  With ``set_alpha_to_one=False`` and a last timestep of 0 (``steps_offset=0``) that last step
  goes from σ_min to σ_min: diffusers spends a model evaluation on it and leaves the sample
  unchanged; the grid leaves it out (``steps`` values, one evaluation fewer, the same result).
  A loop whose step does not land on its next timestep (``trailing`` when T is not a multiple
  of ``steps``, ``linspace`` mostly) is no single grid and is refused, as are ``clip_sample``
  and ``thresholding`` (they change x̂₀ at each step: not an ODE).
* ``PNDMScheduler``: the same timesteps and steps to t − T//steps as DDIM (no ``clip_sample``).
* ``FlowMatchEulerDiscreteScheduler``: its σ_FM = t values (the static ``shift`` or the
  resolution-dependent ``mu``), with float32 rounding where diffusers rounds, mapped to
  σ = t/(1−t). ``FlowMatchHeunDiscreteScheduler`` (``shift`` alone) and ``FlowMatchLCMScheduler``
  compute the same t values (Heun visits each inner one twice: the grid lists it once). The first
  t is 1, σ = ∞ (pure noise): the grid starts with ``inf``, which
  :func:`flowdiff.models.pipelines.sample_like` takes as one step from noise (Euler's) or, for
  Heun, in rectified flow's own variables where t = 1 is a finite time.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .flow import PREDICTION_TYPES
from .grids import _check_steps
from .schedules import BETA_SCHEDULES, FlowMatchingSchedule, Schedule

#: rectified-flow schedulers: one training definition (``num_train_timesteps``, ``shift``) and one grid rule
FLOW_MATCHING_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler",
                            "FlowMatchLCMScheduler")
VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "DDIMInverseScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
                 "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LMSDiscreteScheduler",
                 "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler")
GRID_SCHEDULERS = ("DDIMScheduler", "PNDMScheduler", *FLOW_MATCHING_SCHEDULERS)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def config_of(scheduler: object) -> tuple[dict[str, Any], str]:
    """A scheduler config as a dict (from a dict, a diffusers scheduler, a directory or a json path), and its source."""
    if isinstance(scheduler, Mapping):
        return dict(scheduler), "scheduler config"
    if hasattr(scheduler, "config") and isinstance(scheduler.config, Mapping):
        config = dict(scheduler.config)
        config.setdefault("_class_name", type(scheduler).__name__)
        return config, f"scheduler {type(scheduler).__name__}"
    if isinstance(scheduler, (str, Path)):
        p = Path(scheduler)
        if p.is_dir():
            p = p / "scheduler_config.json"
        if not p.is_file():
            raise FileNotFoundError(f"scheduler config {p} does not exist")
        return read_json(p, "scheduler config"), str(p)
    raise TypeError("scheduler must be a directory or scheduler_config.json path, a dict, or a diffusers scheduler; "
                    f"got {type(scheduler).__name__}")


#: the scheduler classes a config without ``_class_name`` is told apart among, by its keys
KNOWN_SCHEDULERS = (*FLOW_MATCHING_SCHEDULERS, *VP_SCHEDULERS, "DPMSolverMultistepInverseScheduler",
                    "DEISMultistepScheduler", "KDPM2DiscreteScheduler", "DPMSolverSinglestepScheduler")


def _parameters(name: str) -> frozenset[str] | None:
    """The config keys (``__init__`` parameters) of diffusers' scheduler ``name``, or None without diffusers."""
    try:
        import diffusers
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    cls = getattr(diffusers, name, None)
    if cls is None:
        return None
    parameters = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values()):
        return None  # a placeholder for a class whose extra is missing (DPMSolverSDEScheduler without torchsde)
    return frozenset(p for p in parameters if p not in ("self", "kwargs"))


def candidates(config: Mapping[str, Any]) -> list[str]:
    """The known scheduler classes whose parameters include every key of ``config`` (underscored keys aside)."""
    keys = {k for k in config if not k.startswith("_")}
    found = []
    for name in KNOWN_SCHEDULERS:
        params = _parameters(name)
        if params is not None and keys <= params:
            found.append(name)
    return found


def class_name(config: Mapping[str, Any]) -> str | None:
    """The scheduler class a config is for: its ``_class_name`` (written by save_pretrained), or, for a
    dict without one (a live ``scheduler.config``, a hand-written dict), the one known diffusers
    scheduler whose parameters are exactly its keys, else the only one whose parameters include them
    all. None when the keys fit no class or several (never a guess): callers refuse it by name."""
    name = config.get("_class_name")
    if name is not None:
        return name
    keys = {k for k in config if not k.startswith("_")}
    found = candidates(config)
    exact = [n for n in found if _parameters(n) == keys]
    if len(exact) == 1:
        return exact[0]
    return found[0] if len(found) == 1 else None


def with_defaults(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with each missing parameter at its class's own default (diffusers' ``__init__``): a
    hand-written ``{"skip_prk_steps": True}`` for PNDM means ``set_alpha_to_one=False``, as in diffusers,
    not DDIM's True. Unchanged without diffusers or for an unknown class."""
    name = class_name(config)
    try:
        import diffusers
    except ImportError:  # pragma: no cover - depends on the environment
        return dict(config)
    cls = getattr(diffusers, name, None) if name else None
    if cls is None:
        return dict(config)
    defaults = {p.name: p.default for p in inspect.signature(cls.__init__).parameters.values()
                if p.name not in ("self", "kwargs") and p.default is not inspect.Parameter.empty}
    return {**defaults, **config, "_class_name": name}


def without_filled(config: Mapping[str, Any], scheduler: object, target: str, source: str) -> dict[str, Any]:
    """``config`` without the keys that the class which wrote it filled in with its own defaults, as
    ``target``'s ``from_config`` reads it: a diffusers scheduler's config lists them in ``_use_default_values``, and
    ``from_config`` drops them, so that ``target``'s defaults hold (``DDIMInverseScheduler.from_config`` of a
    ``PNDMScheduler(skip_prk_steps=True)``'s config has ``set_alpha_to_one=True``, not PNDM's False).

    ``scheduler`` is what the caller gave: a live diffusers scheduler's config is as diffusers wrote it. A dict
    may have been edited (``{**scheduler.config, key: value}``, or relabelled with another ``_class_name``): where a
    listed key's value differs from ``target``'s default, which one is meant cannot be told, and it is refused
    naming the key."""
    filled = [k for k in (config.get("_use_default_values") or ()) if k in config]
    if filled and isinstance(scheduler, Mapping):
        defaults = with_defaults({"_class_name": target})
        for k in filled:
            if k in defaults and config[k] != defaults[k]:
                raise ValueError(
                    f"{source}: {k}={config[k]!r} is listed in its _use_default_values (a default that the class "
                    f"which wrote the config filled in), so diffusers' {target}.from_config drops it and reads "
                    f"{target}'s own {k}={defaults[k]!r}: remove {k!r} from _use_default_values to mean "
                    f"{config[k]!r}, or remove the key {k!r} to mean {defaults[k]!r}")
    return {k: v for k, v in config.items() if k not in filled}


def _as_from_config(config: Mapping[str, Any], scheduler: object, source: str) -> dict[str, Any]:
    """``config`` as its own class's ``from_config`` reads it (:func:`without_filled` with that class: an edited
    ``_use_default_values`` key refused by name), for :func:`scheduler_sigmas` and :func:`config_grid` as for
    :func:`flowdiff.models.pipelines.scheduler_plan`. Unchanged for a config whose class is not identified."""
    name = class_name(config)
    return dict(config) if name is None else without_filled(config, scheduler, name, source)


def unidentified(config: Mapping[str, Any], source: str) -> ValueError:
    """The error for a config without ``_class_name`` whose keys do not identify one scheduler."""
    found = candidates(config)
    which = (f"they fit {', '.join(found)}" if found else "they fit none of " + ", ".join(KNOWN_SCHEDULERS))
    return ValueError(f"{source}: no _class_name, and its keys ({', '.join(sorted(config)) or 'none'}) do not identify "
                      f"one scheduler ({which}); add _class_name")


def _is_flow_matching(config: Mapping[str, Any]) -> bool:
    """A flow-matching config: its class, or, for a dict without one whose keys fit several classes, every
    candidate (a hand-written ``{"shift": 3.0}``: all of them define the same schedule and grid from it)."""
    name = class_name(config)
    if name is not None:
        return name in FLOW_MATCHING_SCHEDULERS
    found = candidates(config)
    return bool(found) and all(n in FLOW_MATCHING_SCHEDULERS for n in found)


def _as_read_by_class(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` as diffusers' ``from_config`` of its class reads it: without the keys that class does not have
    (diffusers ignores them, with a warning). ``FlowMatchHeunDiscreteScheduler`` has ``num_train_timesteps`` and
    ``shift`` alone, so a ``use_dynamic_shifting``, ``base_shift``, karras σ, ... beside them do nothing and it
    shifts by ``shift``; ``FlowMatchLCMScheduler`` has no ``stochastic_sampling``; ``PNDMScheduler``,
    ``LMSDiscreteScheduler`` and ``HeunDiscreteScheduler`` have no ``rescale_betas_zero_snr`` (their betas are
    not rescaled) and PNDM no ``clip_sample``. Reading those keys here would make a schedule or grid that
    diffusers' own scheduler does not run. Unchanged for a class diffusers cannot inspect here."""
    name = class_name(config)
    params = _parameters(name) if name in KNOWN_SCHEDULERS else None
    if params is None:
        return dict(config)
    return {k: v for k, v in config.items() if k.startswith("_") or k in params}


def _no_betas_advice(name: str | None, config: Mapping[str, Any]) -> str:
    """What to do with a network trained for a scheduler without betas: a VE one is not a VP model, so
    another scheduler= would read it as the wrong ODE; it is built by hand on a VESchedule."""
    lo, hi = config.get("sigma_min"), config.get("sigma_max")
    if lo is None or hi is None:
        return ("Pass scheduler= one of those only if the network was trained with it; otherwise build the flow "
                "with flowdiff.ProbabilityFlow (or flowdiff.from_denoiser) on the schedule it was trained with")
    if name == "ScoreSdeVeScheduler":
        return ("A score-SDE VE network (NCSN++) is fed σ itself and returns the score ∇log p = −ε/σ, so another "
                "scheduler= would read it as a different ODE; build its flow as flowdiff.ProbabilityFlow("
                "lambda x, t: -t.view(-1, *[1] * (x.ndim - 1)) * unet(x, t).sample, "
                f"flowdiff.VESchedule({lo!r}, {hi!r}, time='sigma'))")
    return ("A variance-exploding (EDM-style) network is preconditioned by its scheduler, so another scheduler= "
            "would read it as a different ODE; build its flow from the scheduler's own preconditioning as a "
            "k-diffusion denoiser: sch = diffusers." + (name or "EDMEulerScheduler") + ".from_config(config); "
            "D = lambda x, s: sch.precondition_outputs(x, unet(sch.precondition_inputs(x, s[0]), "
            "sch.precondition_noise(s[0])).sample, s[0]); "
            f"flowdiff.from_denoiser(D, flowdiff.VESchedule({lo!r}, {hi!r}))")


def schedule_from_config(config: Mapping[str, Any], source: str = "scheduler config") -> tuple[Schedule, str]:
    """The :class:`Schedule` and prediction type that a diffusers scheduler config defines.

    A flow-matching config (``FlowMatchEulerDiscreteScheduler``, ``FlowMatchHeunDiscreteScheduler``,
    ``FlowMatchLCMScheduler``: the same training definition) is rectified flow with prediction type
    ``velocity`` (:class:`~flowdiff.engine.schedules.FlowMatchingSchedule` with its ``shift``; with
    ``use_dynamic_shifting`` the shift depends on the image size and belongs to the grid, so
    the table is unshifted; a key its class does not have is ignored, as diffusers' ``from_config``
    ignores it: Heun's ``shift`` holds with ``use_dynamic_shifting`` beside it); any other is a VP
    schedule of betas, rescaled to zero terminal SNR with ``rescale_betas_zero_snr``
    (ᾱ_{T−1} = 0: the schedule's last σ is ∞, where a ``v_prediction`` or ``sample``
    model's step starts from pure noise; an ``epsilon`` model defines no clean image there and is
    refused when a solve starts at σ = ∞). Euler's old ``prediction_type="original_sample"`` is its ``"sample"``.
    """
    config = _as_read_by_class(config)
    if _is_flow_matching(config):
        shift = 1.0 if config.get("use_dynamic_shifting") else config.get("shift", 1.0)
        try:
            schedule = FlowMatchingSchedule(int(config.get("num_train_timesteps", 1000)), float(shift))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from None
        return schedule, "velocity"
    name = class_name(config)
    params = _parameters(name) if name else None
    betas = {"beta_schedule", "trained_betas"}
    if params is None:  # a class diffusers cannot inspect here: its config says it, EDM-type ones by their σ range
        no_betas = bool(name) and not (betas | {"beta_start", "beta_end"}) & set(config) and "sigma_max" in config
    else:
        no_betas = not betas & params  # EDM, score-SDE VE, consistency, Wuerstchen
    if no_betas:
        vp = ", ".join(VP_SCHEDULERS[:3])
        known = "sigma_min" in config or "sigma_max" in config
        schedule = (f" (its schedule is σ_min = {config.get('sigma_min')!r}, σ_max = {config.get('sigma_max')!r})"
                    if known else "")
        raise ValueError(f"{source}: the {name} config defines no betas{schedule}, and flowdiff reads a "
                         f"variance-preserving schedule from a betas scheduler ({vp}, ...) or rectified flow from "
                         f"{', '.join(FLOW_MATCHING_SCHEDULERS)}. " + _no_betas_advice(name, config))
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type == "original_sample" and name == "EulerDiscreteScheduler":
        prediction_type = "sample"  # Euler's step reads its old name as "sample" (kept for old configs)
    if prediction_type not in PREDICTION_TYPES or prediction_type == "velocity":
        raise ValueError(f"{source}: unsupported prediction_type {prediction_type!r}; "
                         f"supported: epsilon, v_prediction, sample (flow matching: a "
                         f"{', '.join(FLOW_MATCHING_SCHEDULERS)} config)")
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{source}: unsupported beta_schedule {beta_schedule!r}; "
                         f"supported: {', '.join(BETA_SCHEDULES)} (or trained_betas)")
    try:
        schedule = Schedule.from_config(beta_schedule=beta_schedule,
                                        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                        beta_start=float(config.get("beta_start", 1e-4)),
                                        beta_end=float(config.get("beta_end", 0.02)),
                                        trained_betas=config.get("trained_betas"),
                                        rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
    return schedule, prediction_type


def _steps_offset(config: Mapping[str, Any], source: str) -> int:
    """The config's ``steps_offset``: an int >= 0 (a negative timestep would index the ᾱ table from its end)."""
    offset = config.get("steps_offset", 0)
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or offset < 0:
        raise ValueError(f"{source}: steps_offset must be an int >= 0 (added to every timestep), got {offset!r}")
    return int(offset)


def _spacing_said(config: Mapping[str, Any]) -> str:
    """The options that place DDIM's timesteps, as given (``steps_offset`` only where the spacing reads it)."""
    spacing = config.get("timestep_spacing", "leading")
    offset = f", steps_offset={config.get('steps_offset', 0)!r}" if spacing == "leading" else (
        f"; {spacing!r} spacing does not add steps_offset" if config.get("steps_offset", 0) else "")
    return f"timestep_spacing={spacing!r}{offset}"


def ddim_timesteps(config: Mapping[str, Any], steps: int, source: str = "scheduler config") -> np.ndarray:
    """The integer timesteps of ``DDIMScheduler.set_timesteps(steps)`` for this config, decreasing."""
    T = int(config.get("num_train_timesteps", 1000))
    if steps > T:
        raise ValueError(f"{source}: steps={steps} exceeds num_train_timesteps={T}")
    spacing = config.get("timestep_spacing", "leading")
    offset = _steps_offset(config, source)
    if spacing == "leading":
        ts = np.arange(steps, dtype=np.int64)[::-1] * (T // steps) + offset
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"{source}: unknown timestep_spacing {spacing!r}; accepted: leading, trailing, linspace")
    if ts[0] > T - 1:
        raise ValueError(f"{source}: steps_offset={offset} puts the first timestep at {ts[0]}, past the last "
                         f"trained one ({T - 1})")
    return ts.copy()


def _ddim_sigmas(config: Mapping[str, Any], steps: int, source: str) -> np.ndarray:
    config = _as_read_by_class(config)  # PNDM has no clip_sample: diffusers ignores one in its config
    clips = class_name(config) != "PNDMScheduler"  # DDIMScheduler's default clip_sample is True; PNDM has none
    for key in ("clip_sample", "thresholding"):
        if config.get(key, clips and key == "clip_sample"):
            raise ValueError(f"{source}: {key}=True changes x̂₀ at every step, so that loop is not the ODE any solver "
                             f"here solves; the grid is that of the same config with {key}=False")
    schedule, _ = schedule_from_config(config, source)
    T = schedule.num_train_timesteps
    ts = ddim_timesteps(config, steps, source)
    ratio = T // steps
    targets = ts - ratio  # DDIM's (and PNDM's) step goes from t to t − T//steps, whatever the next timestep is
    if not np.array_equal(targets[:-1], ts[1:]):
        i = int(np.argmax(targets[:-1] != ts[1:]))
        whose = "PNDM" if class_name(config) == "PNDMScheduler" else "DDIM"
        raise ValueError(f"{source}: with timestep_spacing={config.get('timestep_spacing', 'leading')!r} and "
                         f"steps={steps}, {whose}'s step from timestep {ts[i]} lands on {targets[i]} while the next "
                         f"step starts at {ts[i + 1]}: that loop re-labels its state between steps and is no single "
                         "σ grid; use steps dividing num_train_timesteps, or 'leading' spacing")
    last = int(targets[-1])
    if last >= 0:
        end = schedule.sigmas[last]
    else:
        end = 0.0 if config.get("set_alpha_to_one", True) else schedule.sigmas[0]
    grid = np.append(schedule.sigmas[ts], end)
    if grid[-1] == grid[-2]:  # the last timestep is 0 and the step goes to ᾱ_0 again: a zero-length step
        if len(grid) == 2:
            raise ValueError(f"{source}: steps=1 with set_alpha_to_one=False, whose one timestep is 0 "
                             f"({_spacing_said(config)}), is one step of zero length (σ_min to σ_min): that loop "
                             "returns its input; use steps >= 2 or set_alpha_to_one=True")
        grid = grid[:-1]
    return grid


def ddim_inverse_sigmas(scheduler: object, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """The increasing σ grid of ``DDIMInverseScheduler.set_timesteps(steps)``'s loop, and its timesteps.

    ``scheduler`` is read as ``DDIMInverseScheduler.from_config`` reads it, with that class's defaults for
    the fields it lacks (a DDIM or PNDM config, as inversion pipelines build their inverse scheduler).

    Its step i goes from the level ``timesteps[i] − T//steps`` (below 0: ᾱ = 1, σ = 0, with
    ``set_alpha_to_one``, else the first trained level σ_min) to ``timesteps[i]``, where the model is
    evaluated. The grid starts at that first source level — 0, or σ_min for configs such as Stable
    Diffusion's (``steps_offset=1``, ``set_alpha_to_one=False``) — and a loop whose step does not
    start where the previous one ended is refused, as for DDIM, and so is a zero-terminal-SNR loop that ends at
    ᾱ = 0 (σ = ∞: its last step returns ε̂, no encode). A first step of zero length (σ_min to
    σ_min: timestep 0 with ``set_alpha_to_one=False``; diffusers spends a model evaluation on it and
    returns its sample unchanged) is left out, as :func:`scheduler_sigmas` leaves out DDIM's last.
    """
    config, source = config_of(scheduler)
    steps = _check_steps(steps)
    # read as DDIMInverseScheduler.from_config(config) reads it: its defaults, not those of the config's class
    # (a PNDM config lacking set_alpha_to_one is True here, as in diffusers' inverse, not PNDM's False)
    # (and only its keys: a DDIM config's thresholding is no DDIMInverseScheduler option, and diffusers ignores it)
    # (and not those its own class filled in: a diffusers scheduler's config lists them in _use_default_values, and
    # from_config drops them, so that PNDMScheduler(skip_prk_steps=True)'s set_alpha_to_one=False reads as True)
    config = without_filled(config, scheduler, "DDIMInverseScheduler", source)
    config = {**with_defaults({"_class_name": "DDIMInverseScheduler"}),
              **_as_read_by_class({**config, "_class_name": "DDIMInverseScheduler"})}
    for key in ("clip_sample", "thresholding"):
        if config.get(key, key == "clip_sample"):
            raise ValueError(f"{source}: {key}=True changes x̂₀ at every step, so that loop is not the ODE any solver "
                             f"here solves; the grid is that of the same config with {key}=False")
    # DDIMInverseScheduler's betas: it has rescale_betas_zero_snr, which a PNDM config's own class ignores
    schedule, _ = schedule_from_config({**config, "_class_name": "DDIMInverseScheduler"}, source)
    T = schedule.num_train_timesteps
    spacing = config.get("timestep_spacing", "leading")
    if steps > T:
        raise ValueError(f"{source}: steps={steps} exceeds num_train_timesteps={T}")
    if spacing == "leading":
        ts = np.arange(steps, dtype=np.int64) * (T // steps) + _steps_offset(config, source)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)[::-1]).astype(np.int64) - 1
    else:
        raise ValueError(f"{source}: DDIMInverseScheduler's timestep_spacing is 'leading' or 'trailing', got "
                         f"{spacing!r}")
    if ts[-1] > T - 1:
        raise ValueError(f"{source}: steps_offset={config.get('steps_offset')} puts the last timestep at {ts[-1]}, "
                         f"past the last trained one ({T - 1})")
    sources = np.minimum(ts - T // steps, T - 1)
    if not np.array_equal(sources[1:], ts[:-1]):
        i = int(np.argmax(sources[1:] != ts[:-1])) + 1
        raise ValueError(f"{source}: with timestep_spacing={spacing!r} and steps={steps}, DDIMInverse's step to "
                         f"timestep {ts[i]} starts from {sources[i]} while the previous step ended at {ts[i - 1]}: "
                         "no single σ grid; use steps dividing num_train_timesteps")
    if np.isinf(schedule.sigmas[ts[-1]]):
        raise ValueError(f"{source}: rescale_betas_zero_snr=True with timestep_spacing={spacing!r} ends the "
                         f"inversion at timestep {ts[-1]}, where ᾱ = 0 (σ = ∞) and its last step returns the model's "
                         "ε alone: not an encode (no decode retraces it); not reproduced. Use 'leading' spacing, "
                         "whose last timestep stops short of it")
    if sources[0] >= 0:
        start = schedule.sigmas[sources[0]]
    else:
        start = 0.0 if config.get("set_alpha_to_one", True) else schedule.sigmas[0]
    grid = np.concatenate([[start], schedule.sigmas[ts]])
    if grid[0] == grid[1]:  # the first timestep is 0 and the step starts at ᾱ_0 already: a zero-length step
        if len(grid) == 2:
            raise ValueError(f"{source}: steps=1 with set_alpha_to_one=False, whose one timestep is 0 "
                             f"({_spacing_said(config)}), is one step of zero length (σ_min to σ_min): that loop "
                             "returns its input; use steps >= 2 or set_alpha_to_one=True")
        return grid[1:], ts[1:].copy()
    return grid, ts.copy()


#: the grid names a flow that carries its scheduler config resolves through it (:func:`config_grid`)
CONFIG_GRIDS = ("leading", "trailing")


def config_grid(scheduler: object, spacing: str, steps: int) -> np.ndarray | None:
    """The σ grid of a VP scheduler config's own ``spacing`` timesteps (``leading`` with its
    ``steps_offset``, ``trailing``), then σ = 0: the image, as every named grid ends. None for
    flow-matching configs and other names, whose generic grid is used. This is how a
    :class:`~flowdiff.models.pipelines.DiffusersFlow` reads ``grid="leading"``/``"trailing"``:
    diffusers' timesteps, fed to the model as the integers they are. A loop that stops short of the
    image (``set_alpha_to_one=False``: at σ_min) is :func:`flowdiff.models.pipelines.sample_like`'s;
    here the last step goes on to σ = 0, so that every tool that compares against the image
    (``compare``, ``tune``) reads these grids as it reads the generic ones.
    """
    config, source = config_of(scheduler)
    if spacing not in CONFIG_GRIDS or _is_flow_matching(config):
        return None
    steps = _check_steps(steps)
    config = with_defaults(_as_from_config(config, scheduler, source))
    schedule, _ = schedule_from_config(config, source)
    ts = ddim_timesteps({**config, "timestep_spacing": spacing}, steps, source)
    return np.append(schedule.sigmas[ts], 0.0)


def _flow_matching_sigmas(config: Mapping[str, Any], steps: int, mu: float | None, base: Any,
                          source: str) -> np.ndarray:
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling"):
        if config.get(key):
            raise ValueError(f"{source}: {key}=True is not supported by scheduler_sigmas"
                             + ("" if key in ("invert_sigmas", "stochastic_sampling") else
                                " (flowdiff.scheduler_plan(scheduler, steps).sigmas reads that grid off diffusers' own "
                                "scheduler, and sample_like runs it)"))
    if config.get("shift_terminal"):
        raise ValueError(f"{source}: shift_terminal={config['shift_terminal']!r} is not supported by scheduler_sigmas "
                         "(it stretches the shifted times to end there; flowdiff.scheduler_plan(scheduler, "
                         "steps).sigmas reads that grid off diffusers' own scheduler, and sample_like runs it); "
                         "accepted: None")
    T = int(config.get("num_train_timesteps", 1000))
    shift = float(config.get("shift", 1.0))
    dynamic = bool(config.get("use_dynamic_shifting", False))
    if dynamic and mu is None:
        raise ValueError(f"{source}: use_dynamic_shifting=True needs mu= (the resolution-dependent shift)")
    if not dynamic and mu is not None:
        raise ValueError(f"{source}: mu= is for use_dynamic_shifting=True configs; this one shifts by shift={shift}")
    if base is None:
        # The trained levels as the scheduler builds them, in float32: t_i = shift(i/T), i = T … 1; the
        # inference times are uniform between the largest and smallest, then shifted (again), in float64.
        levels = (np.linspace(1, T, T, dtype=np.float32)[::-1] / np.float32(T)).astype(np.float32)
        if not dynamic:
            levels = (shift * levels / (1 + (shift - 1) * levels)).astype(np.float32)
        t_max, t_min = float(levels[0]), float(levels[-1])
        t = np.linspace(t_max * T, t_min * T, steps) / T
    else:  # the pipeline's own unshifted times (FluxPipeline: linspace(1, 1/N, N)), kept in float32 as diffusers does
        t = np.asarray(base, dtype=np.float64).astype(np.float32)
        if t.ndim != 1 or t.size != steps or not np.all((t > 0) & (t <= 1)) or np.any(np.diff(t) >= 0):
            raise ValueError(f"sigmas must be {steps} decreasing flow-matching times in (0, 1], got {base!r}")
    if dynamic:
        kind = config.get("time_shift_type", "exponential")
        if kind == "exponential":
            t = math.exp(mu) / (math.exp(mu) + (1 / t - 1))
        elif kind == "linear":
            t = mu / (mu + (1 / t - 1))
        else:
            raise ValueError(f"{source}: unknown time_shift_type {kind!r}; accepted: exponential, linear")
    else:
        t = shift * t / (1 + (shift - 1) * t)
    t = np.append(t.astype(np.float32).astype(np.float64), 0.0)
    with np.errstate(divide="ignore"):
        return np.where(t < 1, t / (1 - t), np.inf)


def scheduler_sigmas(scheduler: object, steps: int, *, mu: float | None = None, sigmas: Any = None) -> np.ndarray:
    """The σ grid that diffusers' ``scheduler.set_timesteps(steps)`` loop runs, float64, decreasing.

    ``scheduler``: a diffusers scheduler, its config dict, a directory or a
    ``scheduler_config.json`` path (``DDIMScheduler``, ``PNDMScheduler`` or a flow-matching one).
    The grid has ``steps + 1`` values: it ends at 0, or at σ_min for DDIM with
    ``set_alpha_to_one=False``; a flow-matching grid starts at ``inf`` (t = 1). Pass it to
    ``generate(..., grid=grid)`` (or, for ``inf``-started grids and model-scale latents, to
    :func:`flowdiff.models.pipelines.sample_like`). ``mu`` is the shift of ``use_dynamic_shifting``
    configs (Flux), as given to ``set_timesteps(mu=...)``; ``sigmas`` a flow-matching pipeline's
    own unshifted times, as given to ``set_timesteps(sigmas=...)`` (FluxPipeline passes
    ``np.linspace(1, 1/steps, steps)``).
    """
    config, source = config_of(scheduler)
    steps = _check_steps(steps)
    name = class_name(config)
    config = with_defaults(_as_from_config(config, scheduler, source))
    if name == "PNDMScheduler" and not config.get("skip_prk_steps"):
        raise ValueError(f"{source}: PNDMScheduler with skip_prk_steps=False runs Runge–Kutta steps through half "
                         f"levels first; scheduler_sigmas knows the grids of {', '.join(GRID_SCHEDULERS)} (PNDM with "
                         "skip_prk_steps=True, as Stable Diffusion's configs)")
    if name in ("DDIMScheduler", "PNDMScheduler"):
        if mu is not None or sigmas is not None:
            raise ValueError(f"mu= and sigmas= apply to flow-matching schedulers, not {name}")
        return _ddim_sigmas(config, steps, source)
    if name in FLOW_MATCHING_SCHEDULERS or (name is None and _is_flow_matching(config)):
        config = _as_read_by_class(config)
        if name == "FlowMatchHeunDiscreteScheduler" and (mu is not None or sigmas is not None):
            given = ", ".join(f"{k}={v!r}" for k, v in (("mu", mu), ("sigmas", sigmas)) if v is not None)
            shift = config.get("shift", 1.0)
            raise ValueError(f"{source}: mu= and sigmas= are not arguments of {name}.set_timesteps (got {given}); "
                             f"it takes the step count alone and its grid is that of its shift={shift!r}: pass "
                             "neither (a dynamic shift is FlowMatchEulerDiscreteScheduler's)")
        return _flow_matching_sigmas(config, steps, mu, sigmas, source)
    if name is None:
        raise unidentified(config, source)
    raise ValueError(f"{source}: scheduler_sigmas knows the grids of {', '.join(GRID_SCHEDULERS)}; got "
                     f"_class_name={name!r} (flowdiff.scheduler_plan(scheduler, steps).sigmas reads the grids of "
                     "Euler, Heun, LMS and DPM-Solver off diffusers' own scheduler)")
