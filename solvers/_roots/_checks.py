"""The arguments of the root finders, checked once at their entry (each error names the argument and the value)."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor


def check_batch(x: object, name: str) -> Tensor:
    """A real floating-point tensor with a first (sample) dimension: each sample is its own problem."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a first dimension of samples (each its own problem), got a 0-dim tensor; "
                         f"use {name}.reshape(1)")
    return x


def check_scale(scale: object, like: Tensor) -> None:
    """A positive number, or a tensor of positive values broadcastable to ``like`` (one host sync)."""
    if isinstance(scale, Tensor):
        try:
            torch.broadcast_shapes(scale.shape, like.shape)
        except RuntimeError:
            raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to the state's "
                             f"{tuple(like.shape)}") from None
        positive = bool((scale > 0).all())
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        positive = scale > 0
    else:
        raise TypeError(f"scale must be a positive number or tensor, got {type(scale).__name__}")
    if not positive:
        raise ValueError("scale must be positive everywhere (residuals are measured as |F(y)|/scale)")


def check_tol(tol: object) -> float:
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"tol must be a number, got {type(tol).__name__} {tol!r}")
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    return float(tol)


def check_count(value: object, name: str, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < least:
        raise ValueError(f"{name} must be >= {least}, got {value!r}")
    return value


def check_value(value: object, x: Tensor, what: str) -> Tensor:
    """The map's value at ``x`` is a tensor of ``x``'s shape (a smaller one would broadcast into a wrong root)."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{what} returned {type(value).__name__}; it must return a torch.Tensor")
    if value.shape != x.shape:
        raise ValueError(f"{what} returned shape {tuple(value.shape)} for an argument of shape {tuple(x.shape)}; it "
                         "must return the argument's shape")
    return value
