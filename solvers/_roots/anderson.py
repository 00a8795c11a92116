"""Batched Anderson-accelerated fixed-point iteration: x = g(x), one independent problem per sample.

Anderson mixing (type II; Walker and Ni, "Anderson acceleration for fixed-point iterations",
SIAM J. Numer. Anal. 2011) replaces the plain update x ← g(x) by the combination of the last
``depth`` iterates that minimises the linearised residual, per sample (the first dimension).
It converges where g is a contraction, often much faster than plain iteration; where g is not,
it may diverge, and :func:`newton_krylov` is the tool. A sample that has converged is frozen;
each keeps its best iterate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_batch, check_count, check_scale, check_tol, check_value


@dataclass
class AndersonResult:
    """The best iterate ``y`` per sample, its scaled max-norm residual max|g(y) − y|/scale, the
    iterations taken, and whether ``y`` is the last point g was evaluated at (for every sample)."""

    y: Tensor
    residual: Tensor
    iterations: int
    last_is_best: bool


def _mix(g: Tensor, r: Tensor, dg: list[Tensor], dr: list[Tensor]) -> Tensor:
    """x⁺ = g − ΔG γ with γ = argmin ‖r − ΔR γ‖ per sample (float64 normal equations, lightly regularised)."""
    b = r.shape[0]
    dR = torch.stack([d.reshape(b, -1) for d in dr], dim=2).double()
    dG = torch.stack([d.reshape(b, -1) for d in dg], dim=2).double()
    A = dR.transpose(1, 2) @ dR
    rhs = dR.transpose(1, 2) @ r.reshape(b, -1, 1).double()
    scale = torch.diagonal(A, dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(torch.float64).tiny)
    A = A + torch.eye(A.shape[1], dtype=A.dtype, device=A.device) * (1e-13 * scale)[:, None, None]
    gamma = torch.linalg.solve(A, rhs)
    return (g.reshape(b, -1).double() - (dG @ gamma).squeeze(2)).reshape(g.shape).to(g.dtype)


def _bcast(mask: Tensor, like: Tensor) -> Tensor:
    return mask.reshape(-1, *([1] * (like.ndim - 1)))


def anderson(g: Callable[[Tensor], Tensor], x0: Tensor, *, scale: Tensor, tol: float, max_iter: int,
             depth: int = 3, check_finite: bool = True) -> AndersonResult:
    """Iterate x ← g(x) with Anderson mixing of ``depth`` (0: plain iteration) from ``x0``.

    A sample converges when max|g(x) − x|/scale ≤ ``tol``; the iteration stops when all have
    or after ``max_iter`` evaluations of g. With ``check_finite`` a non-finite residual raises
    ``FloatingPointError``; otherwise a NaN sample counts as unconverged (residual inf).
    """
    check_batch(x0, "x0")
    if not callable(g):
        raise TypeError(f"g must be callable as g(x) -> tensor of x's shape, got {type(g).__name__}")
    check_scale(scale, x0)
    tol = check_tol(tol)
    max_iter, depth = check_count(max_iter, "max_iter", 1), check_count(depth, "depth", 0)
    if not isinstance(check_finite, bool):
        raise TypeError(f"check_finite must be True or False, got {check_finite!r}")
    x = x0
    dg: list[Tensor] = []
    dr: list[Tensor] = []
    g_prev = r_prev = None
    best_x, best_res = x, None
    converged = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for it in range(1, max_iter + 1):
        gx = check_value(g(x), x, "g")
        r = gx - x
        res = (r.abs() / scale).reshape(r.shape[0], -1).amax(dim=1)
        if check_finite and not bool(torch.isfinite(res).all()):
            raise FloatingPointError("the fixed-point residual is not finite (the map returned NaN/inf or the "
                                     "iteration diverged)")
        res = torch.nan_to_num(res, nan=math.inf)  # a NaN sample is unconverged, and any finite iterate beats it
        if best_res is None:
            best_x, best_res = x, res
        else:  # samples frozen at convergence keep their residual; others keep their best iterate
            better = res < best_res
            best_x = torch.where(_bcast(better, x), x, best_x)
            best_res = torch.where(better, res, best_res)
        converged = converged | (res <= tol)
        if bool(converged.all()):
            return AndersonResult(best_x, best_res, it, bool((best_x == x).all()))
        if depth > 0 and g_prev is not None:
            dg.append(gx - g_prev)
            dr.append(r - r_prev)
            if len(dg) > depth:
                dg.pop(0)
                dr.pop(0)
            x_new = _mix(gx, r, dg, dr)
        else:
            x_new = gx
        g_prev, r_prev = gx, r
        x = torch.where(_bcast(converged, x), x, x_new)
    return AndersonResult(best_x, best_res, max_iter, False)
