"""The models the command line can load: the shipped digits model, the closed-form mixture, a diffusers directory."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..engine.flow import ProbabilityFlow
from ._errors import CommandError

BUILTIN_MODELS = ("digits", "analytic-mixture")
#: Kernel bandwidth of ``--model analytic-mixture`` in the image scale [−1, 1] (pixel steps are 1/8).
MIXTURE_BANDWIDTH = 0.1
#: denoisers that run only on a text conditioning (what their pipeline's text encoders make of a prompt)
TEXT_CONDITIONED = {"UNet2DConditionModel": "encoder_hidden_states",
                    "SD3Transformer2DModel": "encoder_hidden_states and pooled_projections",
                    "FluxTransformer2DModel": "encoder_hidden_states and pooled_projections"}


@dataclass(frozen=True)
class ClassLabels:
    """What a class-conditional network takes as ``class_labels``: the classes 0 … ``classes`` − 1, and ``null``,
    the label of no class (a DiT's index ``classes``), or None where the network's own default, no
    ``class_labels`` at all, is its unconditional model (the shipped digits model, trained with label dropout)."""

    classes: int
    null: int | None
    #: the network cannot run without a label (a UNet with ``num_class_embeds``: no null class, no unconditional model)
    required: bool = False


@dataclass
class LoadedModel:
    """A flow and the image shape (C, H, W) its samples have, in the model's data range [−1, 1]; ``labels``
    where its network takes class labels (``--class-label``)."""

    name: str
    flow: ProbabilityFlow
    shape: tuple[int, int, int]
    model_kwargs: dict[str, Any]
    labels: ClassLabels | None = None


def _mixture_digits(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A Gaussian mixture of bandwidth :data:`MIXTURE_BANDWIDTH` on each training digit of the shipped model."""
    from ..models.analytic import Mixture
    from ..models.pretrained import digits_data

    try:
        images = digits_data("train").images
    except ImportError:
        raise CommandError("--model analytic-mixture needs scikit-learn, which bundles its digit images "
                           "(pip install scikit-learn)") from None
    model = Mixture(images.to(device), bandwidth=MIXTURE_BANDWIDTH, schedule=_digits_schedule())
    return LoadedModel("analytic-mixture", model.flow(), (1, 8, 8), {})


def _digits_schedule() -> Any:
    """The shipped digits model's schedule (so that both built-in models share σ_max and the grids)."""
    from ..engine.schedules import Schedule
    from ..models.pretrained import load_config

    try:
        return Schedule.from_config(**load_config("digits")["schedule"])
    except (OSError, ValueError, KeyError):
        return Schedule.linear()


def _pretrained_digits(dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from ..models.pretrained import pretrained

    flow = pretrained("digits", device=device)
    labels = ClassLabels(int(flow.model.num_classes), None)  # no class_labels: its own null class
    return LoadedModel("digits", _to(flow, dtype, device), (1, 8, 8), {}, labels)


def _diffusers_dir(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from ..models.diffusers_io import from_diffusers

    flow = from_diffusers(path, device=device)
    net = flow.model.net
    labels = None
    if getattr(net.config, "num_embeds_ada_norm", None) and type(net).__name__ == "DiTTransformer2DModel":
        classes = int(net.config.num_embeds_ada_norm)  # trained with label dropout: index `classes` is no class
        labels = ClassLabels(classes, classes)
    elif type(net).__name__ in ("UNet2DModel", "UNet2DConditionModel") and getattr(flow.model, "class_rows", None):
        labels = ClassLabels(int(flow.model.class_rows), None, required=True)  # num_class_embeds, no null class
    _refuse_unsupported_labels(path, flow, labels)
    if flow.model.sample_shape is None:
        raise CommandError(f"--model {str(path)!r}: a {type(flow.model.net).__name__} without its pipeline's VAE takes "
                           "packed latents of a length the caller chooses; give the pipeline folder (with vae/), or "
                           "use it from Python (flowdiff.from_diffusers)")
    needs = TEXT_CONDITIONED.get(type(net).__name__)
    if needs is not None and getattr(flow, "prompt_encoder", None) is None:
        raise CommandError(f"--model {str(path)!r}: a {type(net).__name__} runs on a text conditioning ({needs}), "
                           "which the command line makes from --prompt with the pipeline's own tokenizers and text "
                           "encoders, and this folder has none; give the pipeline folder (with model_index.json), or "
                           "use the model from Python with model_kwargs= (flowdiff.from_diffusers)")
    return LoadedModel(path.name, _to(flow, dtype, device), tuple(flow.model.sample_shape), {}, labels)


def _refuse_unsupported_labels(path: Path, flow: ProbabilityFlow, labels: ClassLabels | None) -> None:
    """Refuse, at load, a network that needs ``class_labels`` the command line cannot give: labels read through a
    timestep, identity or projection embedding (class_embed_type; not class indices into a table, so no
    --class-label), or a UNet2DConditionModel's label table beside its text (--class-label and --prompt are one or
    the other). Either stopped later, the first inside the network (it asks for ``class_labels``)."""
    net = flow.model.net
    name = type(net).__name__
    if labels is None and getattr(flow.model, "takes_class_labels", False):
        kind = getattr(net.config, "class_embed_type", None)
        raise CommandError(f"--model {str(path)!r}: this {name} takes class_labels through its class_embed_type="
                           f"{kind!r} embedding (values it embeds as they are, not class indices into a table), which "
                           "--class-label does not give; use it from Python: generate(flowdiff.from_diffusers(DIR), "
                           "noise, model_kwargs={'class_labels': labels}) with the labels that embedding takes")
    if labels is not None and name in TEXT_CONDITIONED:
        raise CommandError(f"--model {str(path)!r}: this {name} needs a prompt's text conditioning and a class label "
                           f"(num_class_embeds={labels.classes}, no null class) together, and the command line "
                           "conditions on --prompt or --class-label, not both; use it from Python: flow = "
                           "flowdiff.from_diffusers(DIR); generate(flow, noise, model_kwargs={**flow.encode_prompt("
                           "[prompt]), 'class_labels': torch.tensor([N])})")


def _to(flow: ProbabilityFlow, dtype: torch.dtype | None, device: torch.device) -> ProbabilityFlow:
    """Move a flow's torch network to the device and (unless ``dtype`` is None) to the state's precision.

    float16/bfloat16 networks run in that precision while generate keeps a float32 state.
    """
    model = flow.model
    if isinstance(model, torch.nn.Module):
        model.to(device=device, dtype=dtype)
        model.eval()
    return flow


def in_dtype(flow: ProbabilityFlow, dtype: torch.dtype) -> ProbabilityFlow:
    """The flow with a copy of its torch network in ``dtype`` (the flow itself if already so, or not a network)."""
    model = flow.model
    if flow.sigma_field is not None or not isinstance(model, torch.nn.Module):
        return flow
    if all(p.dtype == dtype for p in model.parameters() if p.is_floating_point()):
        return flow
    # a copy of the flow itself (ProbabilityFlow.with_model): a DiffusersFlow keeps its
    # scheduler_config, packed tokens and autoencoder, which compare's flow-matching peers are configured from
    return flow.with_model(copy.deepcopy(model).to(dtype))


def load_model(spec: str, *, dtype: torch.dtype | None = torch.float32,
               device: str | torch.device = "cpu") -> LoadedModel:
    """The model named by ``--model``: ``digits``, ``analytic-mixture`` or a diffusers model directory.

    A network is put in ``dtype`` (``None``: left in the precision its weights were saved in).
    """
    device = torch.device(device)
    if spec == "digits":
        return _pretrained_digits(dtype, device)
    if spec == "analytic-mixture":
        return _mixture_digits(dtype, device)
    path = Path(spec)
    if not spec.strip() or not path.exists():
        raise CommandError(f"--model {spec!r}: no such directory; give {' or '.join(BUILTIN_MODELS)}, "
                           "or a local diffusers model directory")
    if not path.is_dir():
        raise CommandError(f"--model {spec!r} is a file; a diffusers model is a directory (with model_index.json "
                           "or config.json)")
    try:
        return _diffusers_dir(path, dtype, device)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CommandError(f"--model {spec!r}: {' '.join(str(err).split()) or type(err).__name__}") from None

