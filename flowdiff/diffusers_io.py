"""Local diffusers models as probability flows: a saved ``UNet2DModel`` or DDPM/DDIM pipeline, offline.

:func:`from_diffusers` reads a directory written by diffusers' ``save_pretrained``:

* a pipeline directory (``model_index.json``, with ``unet/`` and ``scheduler/``), or
* a model directory (``config.json`` of a ``UNet2DModel`` and its weights), whose scheduler
  config is ``scheduler_config.json`` beside it, in ``../scheduler/``, or given as ``scheduler=``.

From the scheduler config only the model's training definition is used: ``beta_schedule``,
``beta_start``, ``beta_end``, ``trained_betas``, ``num_train_timesteps`` and
``prediction_type``. Sampling settings (``timestep_spacing``, ``steps_offset``,
``set_alpha_to_one``, ``clip_sample``, ``thresholding``) describe a scheduler's loop, not the
ODE, and are ignored: choose the grid with ``generate(grid=...)``. Nothing is downloaded
(``local_files_only``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .flow import PREDICTION_TYPES, ProbabilityFlow
from .schedules import BETA_SCHEDULES, Schedule

SUPPORTED_MODELS = ("UNet2DModel",)
_WEIGHT_PREFIX = "diffusion_pytorch_model"


class DiffusersUNet(nn.Module):
    """A diffusers ``UNet2DModel`` in flowdiff's convention ``model(x_t, t, **kwargs) -> Tensor``.

    The input is cast to the network's dtype and the output returned in the input's dtype,
    so a float32 network serves a float64 solve (``.double()`` the network for a float64
    model). ``sample_shape`` is (channels, height, width) of one sample, for making noise.
    """

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        cfg = unet.config
        size = cfg.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        self.sample_shape = (int(cfg.in_channels), int(h), int(w))

    def forward(self, x_t: Tensor, t: Tensor, **model_kwargs: Any) -> Tensor:
        out = self.unet(x_t.to(self.unet.dtype), t, return_dict=False, **model_kwargs)[0]
        return out.to(x_t.dtype)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _scheduler_config(scheduler: object, model_dir: Path) -> tuple[dict[str, Any], str]:
    """The scheduler config as a dict, and where it came from (for error messages)."""
    if scheduler is None:
        beside, sibling = model_dir / "scheduler_config.json", model_dir.parent / "scheduler" / "scheduler_config.json"
        for candidate in (beside, sibling):
            if candidate.is_file():
                return _read_json(candidate, "scheduler config"), str(candidate)
        raise FileNotFoundError(f"no scheduler config for the model in {model_dir}: looked for scheduler_config.json "
                                "there and in ../scheduler/; pass scheduler= (a directory, a scheduler_config.json "
                                "path, a dict or a diffusers scheduler)")
    if isinstance(scheduler, Mapping):
        return dict(scheduler), "scheduler="
    if hasattr(scheduler, "config") and isinstance(scheduler.config, Mapping):
        return dict(scheduler.config), f"scheduler={type(scheduler).__name__}"
    if isinstance(scheduler, (str, Path)):
        p = Path(scheduler)
        if p.is_dir():
            p = p / "scheduler_config.json"
        if not p.is_file():
            raise FileNotFoundError(f"scheduler config {p} does not exist")
        return _read_json(p, "scheduler config"), str(p)
    raise TypeError("scheduler must be a directory or scheduler_config.json path, a dict, or a diffusers scheduler; "
                    f"got {type(scheduler).__name__}")


def schedule_from_config(config: Mapping[str, Any], source: str = "scheduler config") -> tuple[Schedule, str]:
    """The :class:`Schedule` and prediction type that a diffusers scheduler config defines."""
    if config.get("rescale_betas_zero_snr"):
        raise ValueError(f"{source}: rescale_betas_zero_snr=True gives ᾱ_T = 0 (σ = ∞ at the last timestep), "
                         "which this ODE in σ cannot start from; unsupported")
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{source}: unsupported prediction_type {prediction_type!r}; "
                         f"supported: {', '.join(PREDICTION_TYPES)}")
    beta_schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is None and beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"{source}: unsupported beta_schedule {beta_schedule!r}; "
                         f"supported: {', '.join(BETA_SCHEDULES)} (or trained_betas)")
    try:
        schedule = Schedule.from_config(beta_schedule=beta_schedule,
                                        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
                                        beta_start=float(config.get("beta_start", 1e-4)),
                                        beta_end=float(config.get("beta_end", 0.02)),
                                        trained_betas=config.get("trained_betas"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None
    return schedule, prediction_type


def _locate(path: Path) -> Path:
    """The UNet's directory inside a pipeline or model directory."""
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory (expected a diffusers model or pipeline saved with "
                                "save_pretrained)")
    index = path / "model_index.json"
    if index.is_file():
        components = _read_json(index, "pipeline index")
        entry = components.get("unet")
        if not (isinstance(entry, list) and len(entry) == 2):
            raise ValueError(f"pipeline {path} has no 'unet' component in model_index.json "
                             f"(components: {', '.join(k for k in components if not k.startswith('_'))})")
        if entry[1] not in SUPPORTED_MODELS:
            raise ValueError(f"pipeline {path}: unet is a {entry[1]}; supported: {', '.join(SUPPORTED_MODELS)}")
        return path / "unet"
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a diffusers model or pipeline directory: it has neither model_index.json "
                         "nor config.json")
    return path


def from_diffusers(path: str | Path, *, scheduler: object = None, device: str | torch.device | None = None,
                   dtype: torch.dtype | None = None) -> ProbabilityFlow:
    """A :class:`ProbabilityFlow` from a local diffusers ``UNet2DModel`` or DDPM pipeline directory.

    ``scheduler``: where the noise schedule comes from if not beside the model (a directory,
    a ``scheduler_config.json`` path, a config dict or a diffusers scheduler object).
    ``device``/``dtype`` move the network. The flow's ``model`` is a :class:`DiffusersUNet`
    (``flow.model.sample_shape`` gives one sample's shape); model keyword arguments such as
    ``class_labels`` pass through to the UNet.
    """
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a directory path (str or Path), got {type(path).__name__}")
    model_dir = _locate(Path(path))
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model config {config_path} is missing")
    config = _read_json(config_path, "model config")
    class_name = config.get("_class_name")
    if class_name not in SUPPORTED_MODELS:
        raise ValueError(f"{config_path}: model class {class_name!r} is not supported; "
                         f"supported: {', '.join(SUPPORTED_MODELS)}")
    weights = sorted(p.name for p in model_dir.iterdir() if p.name.startswith(_WEIGHT_PREFIX))
    if not weights:
        raise FileNotFoundError(f"no weights in {model_dir}: expected {_WEIGHT_PREFIX}.safetensors "
                                f"(or {_WEIGHT_PREFIX}.bin)")
    sched_config, source = _scheduler_config(scheduler, model_dir)
    schedule, prediction_type = schedule_from_config(sched_config, source)

    try:
        from diffusers import UNet2DModel
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("loading diffusers models needs diffusers: pip install 'flowdiff[diffusers]'") from None
    try:
        unet = UNet2DModel.from_pretrained(str(model_dir), local_files_only=True, low_cpu_mem_usage=False,
                                           torch_dtype=dtype)
    except Exception as e:  # diffusers raises OSError, ValueError, RuntimeError or SafetensorError here
        raise ValueError(f"could not load the UNet2DModel weights in {model_dir} ({', '.join(weights)}): "
                         f"{type(e).__name__}: {e}") from None
    unet.eval().requires_grad_(False)
    if device is not None:
        unet.to(device)
    return ProbabilityFlow(DiffusersUNet(unet), schedule, prediction_type=prediction_type)
