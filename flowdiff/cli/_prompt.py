"""The command line's text-to-image and latent-pipeline parts: prompts, guidance, the autoencoder.

``flowdiff sample|encode|decode|roundtrip|compare --model DIR --prompt "a cat" [--negative-prompt
"blurry"] [--guidance 7.5]``: the prompt becomes the denoiser's ``model_kwargs`` through the
pipeline's own text encoder(s) (Stable Diffusion's CLIP; SDXL's two CLIP, with its pooled embedding
and size ids; SD3's two CLIP and T5; Flux's CLIP and T5), guidance is
:func:`flowdiff.classifier_free_guidance` with the negative (default: empty) prompt as the
unconditional branch (default scale: the pipeline's own, ``flow.default_guidance``), and a pipeline
with an autoencoder takes and writes images while the flow runs on its latents (Flux's packed ones
included). Without ``--prompt`` a text-to-image model is conditioned on the
empty prompt, unguided. A latents file records, in its
``info`` (``info["prompt"]``), the prompt, the guidance and the fingerprint of the conditioned
model, so that ``decode`` reuses the prompt and refuses a different one.

``--class-label N`` conditions a class-conditional model (the shipped digits model, a DiT folder) on
class N: ``model_kwargs={"class_labels": labels}`` with one label per sample, and ``--guidance W``
with it is :func:`flowdiff.classifier_free_guidance` with the null class as the unconditional branch
(a DiT's index ``num_embeds_ada_norm``; the digits model's own default, no ``class_labels``). Without
it such a model runs unconditionally (a DiT on its null class). A latents file records the label and
the guidance in ``info["class_label"]``; ``decode`` follows that record and refuses another label.

These are the functions the CLI calls; the CLI itself adds a line per hook.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..engine.fingerprint import accepted_fingerprints
from ..engine.latent import Latent
from ..models.guidance import classifier_free_guidance
from ._argtypes import int_at_least
from ._errors import UsageError

#: diffusers' Stable Diffusion default guidance scale, used when --prompt is given without --guidance (and the flow
#: names no ``default_guidance`` of its own)
DEFAULT_GUIDANCE = 7.5


def add_prompt_options(parser: argparse.ArgumentParser) -> None:
    """--prompt, --negative-prompt and --guidance for a subcommand."""
    group = parser.add_argument_group("prompt (text-to-image pipelines, e.g. Stable Diffusion)")
    group.add_argument("--prompt", default=None, metavar="TEXT",
                       help="condition a text-to-image model on this prompt (through its own text encoder)")
    group.add_argument("--negative-prompt", default=None, metavar="TEXT",
                       help="the unconditional branch of guidance (default: the empty prompt)")
    group.add_argument("--guidance", type=float, default=None, metavar="W",
                       help=f"classifier-free guidance scale w, ε_u + w·(ε_c − ε_u) as diffusers' guidance_scale "
                            f"(Flux: true_cfg_scale; default with --prompt: the pipeline's own, {DEFAULT_GUIDANCE} for "
                            "Stable Diffusion, 5 for SDXL, 7 for SD3, 1 for Flux; with --class-label: against the null "
                            "class, default 1; 1: no guidance)")
    group.add_argument("--embedded-guidance", type=float, default=None, metavar="G",
                       help="a guidance-distilled Flux model's embedded guidance (FluxPipeline's guidance_scale; "
                            "default 3.5)")


def class_label(text: str) -> int:
    """``--class-label``'s type: a class index, an integer ≥ 0 (the model's range is checked once it is loaded)."""
    return int_at_least(text, 0, "a class index, an integer >= 0")


def add_class_label_option(parser: argparse.ArgumentParser) -> None:
    """--class-label for a subcommand (its --guidance is the prompt group's)."""
    parser.add_argument("--class-label", type=class_label, default=None, metavar="N",
                        help="condition a class-conditional model (--model digits: 0 … 9; a DiT folder: 0 … "
                             "num_embeds_ada_norm − 1; a UNet2DModel with num_class_embeds: 0 … num_class_embeds − 1, "
                             "required, no guidance) on class N, one label per image; with --guidance W, "
                             "classifier-free guidance against the null class (default: unconditional, unguided)")


def condition(loaded: Any, args: argparse.Namespace, record: dict[str, Any] | None = None, *,
              label_record: dict[str, Any] | None = None, batch: int | None = None) -> Any:
    """``loaded`` with its flow conditioned on ``--prompt`` or ``--class-label`` (and guided), or unchanged
    without one.

    ``loaded`` is the CLI's LoadedModel (``flow``, ``model_kwargs``); it gets the prompt's
    ``model_kwargs`` and, for w ≠ 1, the guided flow, plus ``prompt_record`` for latents files.
    ``record`` (a decode's latents' ``info["prompt"]``) supplies the prompt when none is given, and
    ``label_record`` (``info["class_label"]``) the class label; ``batch`` is the number of samples
    (one class label each), None where it varies (``--data``).
    """
    loaded.label_record = None
    label = getattr(args, "class_label", None)
    if label is not None and args.prompt is not None:
        raise UsageError(f"--class-label {label} and --prompt {args.prompt!r}: a model is conditioned on a class or "
                         "on a prompt, not both; give one")
    if args.prompt is None and (label is not None or getattr(loaded, "labels", None) is not None):
        return _condition_on_class(loaded, args, label_record, batch)
    prompt, negative, w = args.prompt, args.negative_prompt, args.guidance
    embedded = getattr(args, "embedded_guidance", None)
    if prompt is None:
        if isinstance(record, dict) and "prompt" in record:  # decode: the prompt the latents were made with
            prompt, negative, w = record["prompt"], record["negative_prompt"], record["guidance"]
            embedded = record.get("embedded_guidance", embedded)
        elif negative is not None or w is not None or embedded is not None:
            given = ", ".join(f"{option} {value!r}" for option, value in (
                ("--negative-prompt", negative), ("--guidance", w), ("--embedded-guidance", embedded))
                if value is not None)
            raise UsageError(f"{given}: --negative-prompt, --guidance and --embedded-guidance need --prompt")
        else:
            loaded.prompt_record = None
            if getattr(loaded.flow, "prompt_encoder", None) is not None:  # a text-to-image denoiser needs its text
                loaded.model_kwargs = dict(loaded.flow.encode_prompt([""]))  # input: the empty prompt, unguided
            return loaded
    # a prompt given now is a usage error where it cannot work; one read from the latents is a file that does not fit
    error = UsageError if args.prompt is not None else ValueError
    if w is None:
        w = float(getattr(loaded.flow, "default_guidance", DEFAULT_GUIDANCE))
    if not math.isfinite(w):
        raise error(f"--guidance must be a finite number, got {w}")
    if args.prompt is not None:  # a decode follows its latents' record: guidance 0 there is how they were encoded
        _refuse_zero_guidance(w, f"--prompt {prompt!r}", "the negative prompt's (default: the empty prompt's)",
                              UsageError)
    flow = loaded.flow
    if getattr(flow, "prompt_encoder", None) is None:
        raise error(f"--prompt {prompt!r}: model {loaded.name!r} has no text encoder flowdiff can use (a Stable "
                    "Diffusion, SDXL, SD3 or Flux pipeline folder with its tokenizers and text encoders)")
    if embedded is not None:
        if not getattr(flow.prompt_encoder, "guidance_embeds", False):
            raise error(f"--embedded-guidance {embedded}: model {loaded.name!r} has no guidance embedding (a guidance-"
                        "distilled Flux transformer, guidance_embeds=True, has one); use --guidance")
        if not math.isfinite(embedded):
            raise error(f"--embedded-guidance must be a finite number, got {embedded}")
        flow.prompt_encoder.embedded_guidance = float(embedded)
    cond = flow.encode_prompt([prompt])
    kwargs: dict[str, Any] = {"cond": cond, "guidance": w}
    if w != 1:
        uncond = flow.encode_negative_prompt(None if negative is None else [negative])  # SDXL: zeros without one
        kwargs["uncond"] = uncond
        loaded.flow = classifier_free_guidance(flow, w, unconditional_kwargs=uncond)
    loaded.model_kwargs = dict(cond)
    loaded.prompt_fingerprints = accepted_fingerprints(flow, kwargs)  # latents from before the repeated-sample rule
    loaded.prompt_record = {"prompt": prompt, "negative_prompt": negative, "guidance": w,
                            "fingerprint": loaded.prompt_fingerprints[0]}
    if embedded is not None:
        loaded.prompt_record["embedded_guidance"] = float(embedded)
    return loaded


def _condition_on_class(loaded: Any, args: argparse.Namespace, record: dict[str, Any] | None,
                        batch: int | None) -> Any:
    """:func:`condition` for a class-conditional model (or a ``--class-label`` given to another)."""
    labels = getattr(loaded, "labels", None)
    label, w = getattr(args, "class_label", None), args.guidance
    if labels is None:
        raise UsageError(f"--class-label {label}: model {loaded.name!r} takes no class labels; accepted for "
                         "--model digits, class-conditional DiT folders (DiTTransformer2DModel) and UNet2DModels with "
                         "num_class_embeds")
    for option, value in (("--negative-prompt", args.negative_prompt),
                          ("--embedded-guidance", getattr(args, "embedded_guidance", None))):
        if value is not None:
            raise UsageError(f"{option} {value!r}: model {loaded.name!r} is class-conditional and has no text "
                             "encoder; give --class-label N (and --guidance W)")
    recorded = label is None and w is None and isinstance(record, dict)  # decode: the latents' label and guidance
    if recorded:
        label = record.get("class_label")
        w = record.get("guidance") if label is not None else None
        if not (label is None or type(label) is int) or not (w is None or type(w) in (int, float)):
            raise ValueError(f"the latents' class-label record {record!r} is not a class index and a guidance "
                             "scale; pass --class-label N (and --guidance W) to decode them")
    if label is not None and not 0 <= label < labels.classes:
        given = f"the latents' class label {label}" if recorded else f"--class-label {label}"
        error = ValueError if recorded else UsageError  # a file that does not fit the model is no usage error
        raise error(f"{given}: model {loaded.name!r} has {labels.classes} classes; accepted: 0 … {labels.classes - 1}")
    if w is not None and label is None:
        raise UsageError(f"--guidance {w}: guiding model {loaded.name!r} needs --class-label N (the class to guide "
                         "towards)")
    if labels.required and label is None:
        raise UsageError(f"model {loaded.name!r} is class-conditional with no null class (a UNet with "
                         f"num_class_embeds={labels.classes}), so it has no unconditional model: give --class-label N, "
                         f"0 … {labels.classes - 1}")
    if labels.required and w is not None and w != 1:
        raise (ValueError if recorded else UsageError)(
            f"--guidance {w}: model {loaded.name!r} has no null class (a UNet with num_class_embeds), so "
            "classifier-free guidance has no unconditional branch; leave --guidance out")
    if w is not None and not math.isfinite(w):
        raise (ValueError if recorded else UsageError)(f"--guidance must be a finite number, got {w}")
    if w is not None and not recorded:  # a decode follows its latents' record (written before 0 was refused)
        _refuse_zero_guidance(w, f"--class-label {label}", "the null class's", UsageError)
    if batch is None and (label is not None or labels.null is not None):
        raise UsageError(f"--data: model {loaded.name!r} takes one class label per image, and a --data run's "
                         "batches differ in size; give the image files one by one" +
                         (f" with --class-label {label}" if label is not None else ""))
    device = _device_of(loaded.flow)
    if label is not None:
        loaded.model_kwargs = {"class_labels": torch.full((batch,), label, dtype=torch.long, device=device)}
    elif labels.null is not None:  # unconditional: the null class
        loaded.model_kwargs = {"class_labels": torch.full((batch,), labels.null, dtype=torch.long, device=device)}
    if w is not None and w != 1:
        null = None if labels.null is None else {
            "class_labels": torch.full((batch,), labels.null, dtype=torch.long, device=device)}
        loaded.flow = classifier_free_guidance(loaded.flow, w, unconditional_kwargs=null)
    loaded.prompt_record = None
    loaded.label_record = {"class_label": label, "guidance": 1.0 if w is None else float(w)}
    return loaded


def _refuse_zero_guidance(w: float, condition: str, unconditional: str, error: type[Exception]) -> None:
    """Refuse ``--guidance 0``: ε_u + 0·(ε_c − ε_u) is the unconditional branch alone, so the condition would change
    nothing. (diffusers' pipelines read ``guidance_scale`` ≤ 1 as "no guidance", the conditional model, which is
    ``--guidance 1`` here; SD-Turbo's ``guidance_scale=0.0`` is meant that way.) Only what is given now: latents
    whose record says guidance 0 (written before this refusal) decode with it, as they were encoded."""
    if w == 0:
        raise error(f"--guidance 0 with {condition}: ε_u + 0·(ε_c − ε_u) is {unconditional} model alone, so "
                         f"{condition.split()[0]} would change nothing; for no guidance (diffusers' guidance_scale "
                         "≤ 1, e.g. SD-Turbo's 0.0) give --guidance 1 or leave it out where the pipeline's default is "
                         "1; accepted: any other finite number")


def _device_of(flow: Any) -> torch.device:
    model = flow.model
    if isinstance(model, torch.nn.Module):
        for tensor in (*model.parameters(), *model.buffers()):
            return tensor.device
    return torch.device("cpu")


def write_record(loaded: Any, latent: Latent) -> None:
    """Record the prompt or class label (if any) in the latent's ``info``, which its file keeps."""
    record = getattr(loaded, "prompt_record", None)
    if record is not None:
        latent.info = {**(latent.info or {}), "prompt": record}
    label_record = getattr(loaded, "label_record", None)
    if label_record is not None:
        latent.info = {**(latent.info or {}), "class_label": label_record}


def check_label_record(loaded: Any, latent: Latent, latents_path: str | Path) -> None:
    """Refuse to decode latents made with another class label or guidance than the one given now."""
    recorded = (latent.info or {}).get("class_label")
    if not isinstance(recorded, dict):
        return
    now = getattr(loaded, "label_record", None)
    if now is None:  # the model loaded now takes no class labels: another model, which the fingerprint check names
        return
    if now != recorded:
        def said(record: dict) -> str:
            label = record.get("class_label")
            return (f"--class-label {label}" if label is not None else "no --class-label") + \
                f" (guidance {record.get('guidance')})"

        raise ValueError(f"latents {str(latents_path)!r} were encoded with {said(recorded)}, not with "
                         f"{said(now)}; omit --class-label and --guidance to follow the latents' record")


def check_record(loaded: Any, latent: Latent, latents_path: str | Path) -> None:
    """Refuse to decode latents made with another model or prompt than the one loaded now."""
    recorded = (latent.info or {}).get("prompt")
    if not isinstance(recorded, dict):  # latents without a record: decoded with whatever prompt is given
        return
    now = getattr(loaded, "prompt_record", None)
    if now is None or recorded["fingerprint"] not in loaded.prompt_fingerprints:
        raise ValueError(f"latents {str(latents_path)!r} were encoded with prompt {recorded['prompt']!r} "
                         f"(guidance {recorded['guidance']}) on another model or conditioning than this one "
                         f"(fingerprint {recorded['fingerprint'][:12]} vs "
                         f"{now['fingerprint'][:12] if now else 'none'})")


def image_shape(loaded: Any) -> tuple[int, int, int]:
    """The (C, H, W) of the images the model takes: its own shape, or its autoencoder's image size."""
    autoencoder = getattr(loaded.flow, "autoencoder", None)
    if autoencoder is None:
        return loaded.shape
    return autoencoder.image_shape(loaded.shape)  # Flux: the images of its packed (tokens, channels) latents


def to_latents(loaded: Any, images: Tensor) -> Tensor:
    """Images → the flow's data (the autoencoder's latents, or the images themselves)."""
    autoencoder = getattr(loaded.flow, "autoencoder", None)
    return images if autoencoder is None else autoencoder.encode(images)


def to_images(loaded: Any, x: Tensor) -> Tensor:
    """The flow's data → images (through the autoencoder's decoder, or as they are)."""
    autoencoder = getattr(loaded.flow, "autoencoder", None)
    return x if autoencoder is None else autoencoder.decode(x)


def autoencoder_line(loaded: Any, images: Tensor, reconstruction: Tensor) -> str | None:
    """For a latent pipeline, how far the round trip is from the autoencoder's own reconstruction D(E(x)):
    what the ODE round trip adds on top of the autoencoder's loss (0 for an exact encoding)."""
    if getattr(loaded.flow, "autoencoder", None) is None:
        return None
    own = to_images(loaded, to_latents(loaded, images))
    err = float((reconstruction.double() - own.double()).abs().max()) / 2  # [−1, 1] → the [0, 1] pixel scale
    return (f"  vs the autoencoder's own reconstruction: max_abs_error {err:.3e} (the rest is the autoencoder's "
            "loss)")
