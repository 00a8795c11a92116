"""Classifier-free guidance as a probability flow.

Ho & Salimans, "Classifier-Free Diffusion Guidance" (2021): a model trained with label
dropout predicts both ε_c = ε(x, t | c) and ε_u = ε(x, t | ∅); sampling uses

    ε_w = ε_u + w·(ε_c − ε_u)

with guidance scale w (w = 1: the conditional model, w = 0: the unconditional one, w > 1:
sharper, less diverse samples). ε_w is still a deterministic field of (x̄, σ), so the guided
model is an ordinary ODE: every solver and both directions (generation and encoding)
apply unchanged. Each guided evaluation costs two network evaluations; ``stats.nfe``
counts guided evaluations.

Guidance combines the model's raw outputs: for ``v_prediction`` and ``sample`` models the
conversion to ε is affine in the output at fixed (x̄, σ), so combining outputs and then
converting equals combining the ε's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

from .flow import ProbabilityFlow


class GuidedModel:
    """``model(x, t, **kwargs)`` → out_c + (w − 1)·(out_c − out_u) (= out_u + w·(out_c − out_u)).

    ``out_c`` is the wrapped model called with the caller's keyword arguments, ``out_u`` with
    ``unconditional_kwargs`` instead. Written around out_c so that w = 1 returns the
    conditional output exactly. Works for ``model(x_t, t)`` models and σ-native ``eps(x̄, σ)``.
    """

    def __init__(self, model: Callable[..., Tensor], scale: float,
                 unconditional_kwargs: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.scale = scale
        self.unconditional_kwargs = dict(unconditional_kwargs or {})

    def __call__(self, x: Tensor, t: Any, **model_kwargs: Any) -> Tensor:
        out_c = self.model(x, t, **model_kwargs)
        out_u = self.model(x, t, **self.unconditional_kwargs)
        return out_c + (self.scale - 1.0) * (out_c - out_u)

    def __repr__(self) -> str:
        return f"GuidedModel({type(self.model).__name__}, scale={self.scale})"


def classifier_free_guidance(flow: ProbabilityFlow, scale: float, *,
                             unconditional_kwargs: Mapping[str, Any] | None = None) -> ProbabilityFlow:
    """The guided flow ε_u + w·(ε_c − ε_u) of a conditional flow, with w = ``scale``.

    The condition is given as usual, ``generate(guided, noise, model_kwargs={"class_labels": y})``;
    the unconditional branch calls the model with ``unconditional_kwargs`` instead (default:
    no keyword arguments, which is the null class of :func:`flowdiff.pretrained` models;
    for other models pass e.g. ``{"class_labels": null_labels}``).
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite number (the guidance weight w; 1 = conditional), got {scale!r}")
    if unconditional_kwargs is not None and not isinstance(unconditional_kwargs, Mapping):
        raise TypeError(f"unconditional_kwargs must be a mapping of model keyword arguments, "
                        f"got {type(unconditional_kwargs).__name__}")
    if flow.sigma_field is not None:
        return ProbabilityFlow.from_sigma_field(GuidedModel(flow.sigma_field, float(scale), unconditional_kwargs),
                                                flow.schedule)
    return ProbabilityFlow(GuidedModel(flow.model, float(scale), unconditional_kwargs), flow.schedule,
                           prediction_type=flow.prediction_type)
