"""Solve statistics: NFE is the currency of this field, so it is counted, not estimated."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Stats:
    """Counts of one solve.

    ``nfe`` is the exact number of evaluations of the vector field; ``steps`` the number
    of steps attempted, ``accepted`` and ``rejected`` their split (fixed grids accept
    every step); ``wall_time`` seconds; ``extra`` anything a method adds (e.g. iterations).
    """

    nfe: int = 0
    steps: int = 0
    accepted: int = 0
    rejected: int = 0
    wall_time: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __add__(self, other: Stats) -> Stats:
        extra = dict(self.extra)
        for key, value in other.extra.items():
            extra[key] = extra[key] + value if key in extra and isinstance(value, (int, float)) else value
        return Stats(self.nfe + other.nfe, self.steps + other.steps, self.accepted + other.accepted,
                     self.rejected + other.rejected, self.wall_time + other.wall_time, extra)
