"""Classifier-free guidance as a probability flow.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (2021): a model trained with label
dropout predicts both ε_c = ε(x, t | c) and ε_u = ε(x, t | ∅); sampling uses

    ε_w = ε_u + w·(ε_c − ε_u)

with guidance scale w (w = 1: the conditional model, w = 0: the unconditional one, w > 1:
sharper, less diverse samples). diffusers' pipelines skip guidance for ``guidance_scale`` ≤ 1 (their
result is then the conditional model's, w = 1 here); w here is the formula at every value.
ε_w is still a deterministic field of (x̄, σ), so the guided
model is an ordinary ODE: every solver and both directions (generation and encoding)
apply unchanged. Each guided evaluation costs two network evaluations; ``stats.nfe``
counts guided evaluations.

Guidance combines the model's raw outputs: for ``v_prediction``, ``sample`` and ``velocity``
models the conversion to ε is affine in the output at fixed (x̄, σ), so combining outputs and
then converting equals combining the ε's.

The unconditional branch is the model called with ``unconditional_kwargs`` — the null class,
or the empty/negative prompt's embeddings of a text-to-image model, as diffusers'
``guidance_scale`` with ``negative_prompt``. When both branches take the same keywords with
batched tensors, both run as one model call on the doubled batch ([unconditional,
conditional], the order of diffusers' Stable Diffusion pipeline).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from ..engine.flow import ProbabilityFlow


class GuidedModel(nn.Module):
    """``model(x, t, **kwargs)`` → out_c + (w − 1)·(out_c − out_u) (= out_u + w·(out_c − out_u)).

    ``out_c`` is the wrapped model called with the caller's keyword arguments, ``out_u`` with
    ``unconditional_kwargs`` instead. Written around out_c so that w = 1 returns the
    conditional output exactly. Works for ``model(x_t, t)`` models and σ-native ``eps(x̄, σ)``.
    Both branches are one call on the doubled batch where :func:`batched_kwargs` can pair
    their keyword arguments (``batch=False`` always makes two calls).

    A ``torch.nn.Module``: a wrapped network is its submodule and the unconditional tensors
    (e.g. negative-prompt embeddings) and w are buffers, so that ``.to(dtype)``/``.to(device)``
    move them all and :func:`flowdiff.flow_fingerprint` covers weights, w and the negative prompt.
    """

    def __init__(self, model: Callable[..., Tensor], scale: float | Tensor,
                 unconditional_kwargs: Mapping[str, Any] | None = None, *, batch: bool = True) -> None:
        super().__init__()
        self.model = model
        self.scale = scale
        self.batch = batch
        self._plain: dict[str, Any] = {}
        self._tensor_keys: list[str] = []
        for key, value in dict(unconditional_kwargs or {}).items():
            if isinstance(value, Tensor):
                self.register_buffer(f"uncond_{key}", value)
                self._tensor_keys.append(key)
            else:
                self._plain[key] = value
        # w as a buffer only so that the fingerprint (a state dict) sees it; the arithmetic uses ``scale``
        w = float(scale.detach()) if isinstance(scale, Tensor) else float(scale)
        self.register_buffer("guidance_scale", torch.tensor([w], dtype=torch.float64))

    @property
    def unconditional_kwargs(self) -> dict[str, Any]:
        return {**self._plain, **{k: getattr(self, f"uncond_{k}") for k in self._tensor_keys}}

    @property
    def input_shape(self) -> tuple[int | None, ...] | None:
        """The wrapped model's one-sample shape (:meth:`flowdiff.ProbabilityFlow.check_input`): guidance takes the
        states its model takes; None where the model declares none."""
        return getattr(self.model, "input_shape", None)

    def forward(self, x: Tensor, t: Any, **model_kwargs: Any) -> Tensor:
        uncond = self.unconditional_kwargs
        if not model_kwargs and not uncond:  # both branches the same call: w would change nothing, at twice the cost
            raise ValueError(f"classifier-free guidance (w = {float(self.guidance_scale):g}) got no model_kwargs, "
                             "and its unconditional branch takes none either, so both branches are the same call "
                             "and the result the unconditional model's at twice the cost; pass the condition as "
                             "model_kwargs (e.g. {'class_labels': labels}), or sample the unguided flow")
        joint = batched_kwargs(uncond, model_kwargs, x.shape[0], _per_sample_keys(self.model)) if self.batch else None
        if joint is not None:
            tt = torch.cat([t, t]) if isinstance(t, Tensor) and t.ndim == 1 and t.shape[0] == x.shape[0] else t
            out_u, out_c = self.model(torch.cat([x, x]), tt, **joint).chunk(2)
        else:
            out_c = self.model(x, t, **model_kwargs)
            out_u = self.model(x, t, **uncond)
        return out_c + (self.scale - 1.0) * (out_c - out_u)

    def __repr__(self) -> str:
        return f"GuidedModel({type(self.model).__name__}, scale={self.scale})"


def _per_sample_keys(model: Any) -> frozenset[str]:
    """The keywords ``model`` reads one value per sample from, so that a 0-d value there is one for all: the class
    labels of a network with a label table (a diffusers model's ``class_rows``, flowdiff's nets' ``null_class``);
    a class-embedding-free or timestep/identity-embedded model says nothing, and its 0-d tensors stay unpaired."""
    if getattr(model, "class_rows", None) is not None or isinstance(getattr(model, "null_class", None), int):
        return frozenset({"class_labels"})
    return frozenset()


def batched_kwargs(first: Mapping[str, Any], second: Mapping[str, Any], batch: int,
                   per_sample: frozenset[str] = frozenset()) -> dict[str, Any] | None:
    """The keyword arguments of one call on the batch [first; second], or None where they do not pair.

    They pair when both name the same keys and each key holds either two tensors of leading
    size ``batch`` or 1 (one prompt for the batch, broadcast to it) and equal trailing shape and dtype
    (concatenated), or the same non-tensor value. (One negative prompt beside per-sample prompts pairs too: it
    ran as two calls, whose float rounding differed from the one call of the same request spelt with one prompt.)
    Under a key in ``per_sample`` (values the model reads one per sample, e.g. class labels), a 0-d tensor is one
    for all, as the shape (1,) is: ``class_labels=torch.tensor(3)`` ran as two calls while ``torch.tensor([3])``
    paired, and the two spellings of one request differed in their last digits.
    """
    if set(first) != set(second):
        return None
    joint: dict[str, Any] = {}
    for key, a in first.items():
        b = second[key]
        if isinstance(a, Tensor) and isinstance(b, Tensor):
            if key in per_sample:  # one label for all, spelt 0-d
                a, b = (a.reshape(1) if a.ndim == 0 else a), (b.reshape(1) if b.ndim == 0 else b)
            if a.ndim == 0 or b.ndim == 0 or a.shape[1:] != b.shape[1:] or a.dtype != b.dtype \
                    or a.device != b.device or a.shape[0] not in (1, batch) or b.shape[0] not in (1, batch):
                return None
            if batch > 1:  # one prompt for the whole batch: broadcast before pairing
                a, b = a.expand(batch, *a.shape[1:]), b.expand(batch, *b.shape[1:])
            joint[key] = torch.cat([a, b])
        elif isinstance(a, Tensor) or isinstance(b, Tensor) or a is not b and a != b:
            return None
        else:
            joint[key] = a
    return joint


def classifier_free_guidance(flow: ProbabilityFlow, scale: float | Tensor, *,
                             unconditional_kwargs: Mapping[str, Any] | None = None,
                             batch: bool = True) -> ProbabilityFlow:
    """The guided flow ε_u + w·(ε_c − ε_u) of a conditional flow, with w = ``scale``.

    The condition is given as usual, ``generate(guided, noise, model_kwargs={"class_labels": y})``;
    the unconditional branch calls the model with ``unconditional_kwargs`` instead (default:
    no keyword arguments, which is the null class of :func:`flowdiff.pretrained` models;
    for other models pass e.g. ``{"class_labels": null_labels}``, or a text-to-image flow's
    ``flow.encode_prompt([""] * n)`` / negative prompts). ``batch``: run both branches as one
    model call where their keywords pair (see :class:`GuidedModel`).

    ``scale``: a number, or a 0-dim floating-point tensor, which the guided model keeps as it is (a
    solve is then differentiable with respect to it).

    The result is a copy of ``flow`` (of its class, with its autoencoder and other attributes)
    whose model is the guided one.
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if isinstance(scale, Tensor):  # kept as it is: a solve is differentiable with respect to it
        if scale.ndim != 0 or not scale.is_floating_point() or not bool(torch.isfinite(scale.detach())):
            raise TypeError(f"scale must be a finite number or a 0-dim finite floating-point tensor (the guidance "
                            f"weight w; 1 = conditional), got {scale!r}")
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number (the guidance weight w; 1 = conditional), got {scale!r}")
    else:
        scale = float(scale)
    if not isinstance(batch, bool):  # batch="no" would batch (a truthy string), batch=None would not
        raise TypeError(f"batch must be True (both branches as one model call where their keywords pair) or False "
                        f"(two calls), got {batch!r}")
    if unconditional_kwargs is not None and not isinstance(unconditional_kwargs, Mapping):
        raise TypeError(f"unconditional_kwargs must be a mapping of model keyword arguments, "
                        f"got {type(unconditional_kwargs).__name__}")
    if flow.sigma_field is not None:
        guided = flow.with_model(GuidedModel(flow.sigma_field, scale, unconditional_kwargs, batch=batch))
        guided.sigma_field = guided.model
        return guided
    return flow.with_model(GuidedModel(flow.model, scale, unconditional_kwargs, batch=batch))
