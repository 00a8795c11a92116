"""Benchmark-only statistics of a frontier measured on a large evaluation batch: the ratio of flowdiff's pick to the
best peer with a bootstrap interval, and the same ratio with the rare far-off samples capped or left out.

Every method is given as its per-sample RMS errors over the same evaluation noise (``per_sample_error``); the
batch's RMSE is the RMS of those. The best peer is chosen on the evaluation noise itself, and chosen again in
every bootstrap draw and for every variant (capped, samples left out), so the peers keep that advantage
throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

#: per-sample RMS error above which a sample counts as far off in the capped ratio (the mixture's samples that land
#: on their reference's training image are ≤ 0.12 off at NFE 10; those that land on another are 0.2–0.7 off)
CAP = 0.1


@dataclass(frozen=True)
class Ratio:
    """flowdiff's RMSE over the best peer's, with a percentile bootstrap interval (peer re-chosen in every draw)."""

    ours: float
    peer: float
    peer_index: int
    ratio: float
    low: float
    high: float

    def cell(self) -> str:
        return f"{self.ratio:.2f}× [{self.low:.2f}, {self.high:.2f}]"


def _rms(err: Tensor) -> Tensor:
    return err.pow(2).mean(dim=-1).sqrt()


def ratio(ours: Tensor, peers: Tensor, draws: int = 2000, seed: int = 0, level: float = 0.95) -> Ratio:
    """``ours`` (N per-sample errors) against the best row of ``peers`` (P × N), and a ``level`` bootstrap interval
    of the ratio over ``draws`` resamples of the N samples (the best peer chosen anew on each resample)."""
    if peers.ndim != 2 or ours.ndim != 1 or peers.shape[1] != ours.shape[0]:
        raise ValueError(f"ours must be (N,) and peers (P, N), got {tuple(ours.shape)} and {tuple(peers.shape)}")
    ours, peers = ours.double(), peers.double()
    n = ours.shape[0]
    peer_rmse = _rms(peers)
    best = int(peer_rmse.argmin())
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(draws, n, dtype=torch.float64)
    counts.scatter_add_(1, torch.randint(n, (draws, n), generator=gen), torch.ones(draws, n, dtype=torch.float64))
    ours_b = (counts @ ours.pow(2) / n).sqrt()
    peer_b = (counts @ peers.pow(2).T / n).min(dim=1).values.sqrt()
    boot = ours_b / peer_b
    tail = (1 - level) / 2
    low, high = torch.quantile(boot, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    ours_rmse = float(_rms(ours))
    return Ratio(ours_rmse, float(peer_rmse[best]), best, ours_rmse / float(peer_rmse[best]), low, high)


def capped_ratio(ours: Tensor, peers: Tensor, cap: float = CAP) -> float:
    """The ratio with every per-sample error capped at ``cap`` (for both sides; the best peer re-chosen)."""
    return float(_rms(ours.clamp(max=cap)) / _rms(peers.clamp(max=cap)).min())


def ratio_without(ours: Tensor, peers: Tensor, keep: Tensor) -> float:
    """The ratio on the samples where ``keep`` is true only (the best peer re-chosen on them)."""
    if not bool(keep.any()):
        return math.nan
    return float(_rms(ours[keep]) / _rms(peers[:, keep]).min())


def nearest(x: Tensor, centres: Tensor) -> Tensor:
    """The index of the centre nearest to each sample of ``x`` (the training image a mixture sample lands on)."""
    return torch.cdist(x.double().reshape(x.shape[0], -1), centres.double().reshape(centres.shape[0], -1)).argmin(1)
