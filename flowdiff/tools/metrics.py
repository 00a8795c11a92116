"""Reconstruction metrics: how close ``decode(encode(x))`` comes to ``x``.

Errors are measured on the [0, 1] pixel scale, as the DDIM paper's Table 2 reports its
per-dimension MSE (Song et al., "Denoising Diffusion Implicit Models", ICLR 2021): images in
the model's data range ``data_range = (lo, hi)`` (default (−1, 1)) are mapped by
(x − lo)/(hi − lo). PSNR = 10·log10(1 / MSE) for that unit peak; an exact reconstruction has
MSE 0 and PSNR +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from solvers import Stats

from ..engine._checks import check_has_values


def _pair(original: Tensor, reconstruction: Tensor, data_range: tuple[float, float]) -> tuple[Tensor, float]:
    for name, x in (("original", original), ("reconstruction", reconstruction)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if original.shape != reconstruction.shape:
        raise ValueError(f"original and reconstruction must have the same shape, got {tuple(original.shape)} and "
                         f"{tuple(reconstruction.shape)}")
    if original.ndim < 1 or original.shape[0] < 1:
        raise ValueError(f"images must have a batch dimension first, got shape {tuple(original.shape)}")
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise TypeError(f"data_range must be a pair (lo, hi) of numbers, got {data_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and hi > lo):
        raise ValueError(f"data_range must be a finite pair with hi > lo, got {data_range!r}")
    for name, x in (("original", original), ("reconstruction", reconstruction)):
        check_has_values(x, name)
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or inf; reconstruction metrics need finite images")
    diff = (reconstruction.double() - original.double()).reshape(original.shape[0], -1)
    return diff, hi - lo


def mse(original: Tensor, reconstruction: Tensor, *, data_range: tuple[float, float] = (-1.0, 1.0),
        reduction: str = "mean") -> Tensor:
    """Per-dimension mean squared error on the [0, 1] scale (float64); per sample with ``reduction="none"``."""
    diff, width = _pair(original, reconstruction, data_range)
    per_sample = (diff / width).pow(2).mean(dim=1)
    return _reduce(per_sample, reduction)


def max_abs_error(original: Tensor, reconstruction: Tensor, *, data_range: tuple[float, float] = (-1.0, 1.0),
                  reduction: str = "mean") -> Tensor:
    """Largest absolute error on the [0, 1] scale; ``reduction="mean"`` gives the max over the whole batch."""
    diff, width = _pair(original, reconstruction, data_range)
    per_sample = (diff / width).abs().amax(dim=1)
    if reduction == "mean":
        return per_sample.amax()
    return _reduce(per_sample, reduction)


def psnr(original: Tensor, reconstruction: Tensor, *, data_range: tuple[float, float] = (-1.0, 1.0),
         reduction: str = "mean") -> Tensor:
    """Peak signal-to-noise ratio in dB for peak 1 on the [0, 1] scale, 10·log10(1/MSE) per sample (+inf if exact).

    ``reduction="mean"`` averages the per-sample PSNR (the convention of image benchmarks).
    """
    per_sample = -10.0 * torch.log10(mse(original, reconstruction, data_range=data_range, reduction="none"))
    return _reduce(per_sample, reduction)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


@dataclass(frozen=True)
class Reconstruction:
    """One round trip's figures: MSE, max abs error and PSNR on the [0, 1] scale, and the NFE per direction."""

    mse: float
    max_abs: float
    psnr: float
    nfe_encode: int | None = None
    nfe_decode: int | None = None


def reconstruction(original: Tensor, reconstruction: Tensor, *, data_range: tuple[float, float] = (-1.0, 1.0),
                   encode_stats: Stats | None = None, decode_stats: Stats | None = None) -> Reconstruction:
    """All reconstruction metrics of a batch at once, with the NFE of each direction when the stats are given.

    Figures, not a loss: inputs that require a gradient (a reconstruction being optimised) are read detached, as
    :func:`mse` and the others are not (their tensors carry the gradient).
    """
    for name, stats in (("encode_stats", encode_stats), ("decode_stats", decode_stats)):
        if stats is not None and not isinstance(stats, Stats):
            raise TypeError(f"{name} must be a solvers.Stats (a result's .stats) or None, got {type(stats).__name__}")
    if isinstance(original, Tensor) and isinstance(reconstruction, Tensor):
        original, reconstruction = original.detach(), reconstruction.detach()
    return Reconstruction(
        float(mse(original, reconstruction, data_range=data_range)),
        float(max_abs_error(original, reconstruction, data_range=data_range)),
        float(psnr(original, reconstruction, data_range=data_range)),
        None if encode_stats is None else encode_stats.nfe,
        None if decode_stats is None else decode_stats.nfe,
    )
