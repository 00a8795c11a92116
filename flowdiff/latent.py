"""The result of an encode: the DDIM-scale latent and what a decode needs to retrace it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from torch import Tensor


@dataclass
class Latent:
    """An encoding: the DDIM-scale latent ``x`` (x_T) and what a decode needs to retrace it.

    ``sigmas`` is the encode grid (increasing, starting at 0); ``solver`` and
    ``solver_options`` the method that made it; ``solver_state`` the extra state of a
    reversible solver (``None`` for plain solvers, whose latent is ``x`` alone).
    """

    x: Tensor
    sigmas: np.ndarray
    solver: str
    solver_options: dict[str, Any] = field(default_factory=dict)
    solver_state: Any = None

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1
