"""What generate, encode and decode return, and what their callbacks receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from torch import Tensor

from solvers import Stats

from .latent import Latent


class StepState(NamedTuple):
    """What a flowdiff callback receives after each accepted step, in every kind of solve:
    the step index, the σ reached, the VP-scaled state ``x`` = x̄/√(1+σ²), ``xbar`` itself,
    and the model's ``denoised`` image there when the step already evaluated it (else
    ``None``: no evaluation is spent on it; for predictor–corrector methods it is taken at
    the predicted point)."""

    step: int
    sigma: float
    x: Tensor
    xbar: Tensor
    denoised: Tensor | None = None


#: The adaptive solves' callback record is the same :class:`StepState` (kept as a name for old code).
AdaptiveStep = StepState


@dataclass
class Result:
    """The outcome of generate/encode/decode: ``x`` (image, or latent x_T for encode), the
    statistics (``stats.nfe`` is the exact number of model evaluations), the σ grid used,
    and for encode the :class:`Latent` that :func:`decode` takes back."""

    x: Tensor
    stats: Stats
    sigmas: np.ndarray
    solver: str
    latent: Latent | None = None
