"""A batched Jacobian-free Newton–Krylov root finder: F(y) = 0, one independent system per sample.

Inverting an explicit step (find the start y_b whose step lands on a given y_a) is a root
problem whose Jacobian I + ∂Ψ/∂y can be far from the identity: plain or Anderson-mixed
fixed-point iteration then diverges or stalls. Newton's method with the linear systems
solved by GMRES (Saad and Schultz 1986) needs only Jacobian–vector products, taken here as
forward differences of F (Knoll and Keyes, "Jacobian-free Newton–Krylov methods", J. Comput.
Phys. 2004), so every evaluation is one plain call of F and is counted; no autograd, so any
model works. Each sample (the first dimension) is its own system: inner products, Krylov
bases, line searches and convergence are per sample, while every call of F is one batched
evaluation.

Globalisation: a backtracking line search on the residual's 2-norm (Armijo condition), and
restarts from further initial guesses for samples whose line search fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._checks import check_batch, check_count, check_scale, check_tol, check_value


@dataclass
class RootResult:
    """The outcome of :func:`newton_krylov`, per sample where it is a tensor.

    ``y`` is the best iterate found (the one with the smallest residual; the root where
    ``converged``); ``residual`` its scaled max-norm residual, max |F(y)|/scale;
    ``iterations`` Newton iterations taken (all samples together), ``evaluations`` calls of
    F (each a batched evaluation), ``restarts`` the number of initial guesses tried beyond
    the first.
    """

    y: Tensor
    residual: Tensor
    converged: Tensor
    iterations: int
    evaluations: int
    restarts: int


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(-1, *([1] * (like.ndim - 1)))


class _Counted:
    def __init__(self, F: Callable[[Tensor], Tensor]) -> None:
        self.F = F
        self.calls = 0

    def __call__(self, y: Tensor) -> Tensor:
        self.calls += 1
        return check_value(self.F(y), y, "F")


def _gmres(F: _Counted, y: Tensor, r: Tensor, active: Tensor, *, dim: int, rel_tol: float, eps: float) -> Tensor:
    """Per-sample GMRES for J d = −r with J v ≈ (F(y + h v) − F(y))/h; returns d (zero for inactive samples).

    One Arnoldi step is one batched call of F. The Krylov basis is built in float64 for the
    small Hessenberg problem; iteration stops once every active sample's linear residual is
    below ``rel_tol``·|r| (an inexact Newton forcing term) or ``dim`` vectors are built.
    """
    b = y.shape[0]
    dtype = y.dtype
    rf = _flat(r).double()
    active = active & torch.isfinite(rf).all(dim=1)
    rf = torch.where(active[:, None], rf, torch.zeros_like(rf))  # a non-finite sample must not poison the batch
    beta = rf.norm(dim=1)
    beta_safe = torch.where(beta > 0, beta, torch.ones_like(beta))
    V = [-rf / beta_safe[:, None]]
    H = torch.zeros(b, dim + 1, dim, dtype=torch.float64, device=y.device)
    y_norm = _flat(y).double().norm(dim=1)
    h = math.sqrt(eps) * (1.0 + y_norm)  # forward-difference step, per sample (|v| = 1)
    done = ~active | (beta == 0)
    k_used = 0
    e1 = torch.zeros(b, dim + 1, dtype=torch.float64, device=y.device)
    e1[:, 0] = beta
    coeffs = torch.zeros(b, 0, dtype=torch.float64, device=y.device)
    for k in range(dim):
        v = V[k]
        yp = y + (h[:, None] * v).reshape(y.shape).to(dtype)
        w = (_flat(F(yp)).double() - rf) / h[:, None]
        active = active & torch.isfinite(w).all(dim=1)
        w = torch.where(active[:, None], w, torch.zeros_like(w))
        for j in range(k + 1):
            hj = (w * V[j]).sum(dim=1)
            H[:, j, k] = hj
            w = w - hj[:, None] * V[j]
        hn = w.norm(dim=1)
        H[:, k + 1, k] = hn
        V.append(w / torch.where(hn > 0, hn, torch.ones_like(hn))[:, None])
        k_used = k + 1
        # least squares min |β e1 − H c| per sample
        Hk = H[:, : k + 2, : k + 1]
        # the small Hessenberg problem on the host with an SVD driver: it can be rank-deficient (a sample whose
        # residual is already 0, a lucky breakdown), which CUDA's only driver (gels, full rank) does not allow
        coeffs = torch.linalg.lstsq(Hk.cpu(), e1[:, : k + 2, None].cpu(), driver="gelsd").solution[:, :, 0]
        coeffs = coeffs.to(y.device)
        lin_res = (e1[:, : k + 2] - (Hk @ coeffs[:, :, None])[:, :, 0]).norm(dim=1)
        done = done | ~active | (lin_res <= rel_tol * beta) | (hn <= 1e-14 * beta)
        if bool(done.all()):
            break
    d = sum(coeffs[:, j, None] * V[j] for j in range(k_used))
    d = torch.where(active[:, None], d, torch.zeros_like(d))
    return d.reshape(y.shape).to(dtype)


def newton_krylov(
    F: Callable[[Tensor], Tensor],
    guesses: Sequence[Tensor],
    *,
    scale: Tensor,
    tol: float,
    max_iter: int = 50,
    krylov_dim: int = 40,
    forcing: float = 1e-3,
    max_backtracks: int = 8,
    eps: float | None = None,
) -> RootResult:
    """Solve F(y) = 0 per sample to max |F(y)|/scale ≤ ``tol``, from ``guesses`` in order.

    ``F`` maps a batch to a batch of the same shape, sample i depending on sample i only.
    ``scale`` is a positive tensor broadcastable to y. Each Newton iteration solves
    J d = −F(y) by GMRES (at most ``krylov_dim`` vectors, to relative residual ``forcing``)
    and backtracks y + λd, λ = 1, ½, … (``max_backtracks`` halvings) until the residual's
    2-norm decreases by the Armijo factor (1 − 10⁻⁴λ). A sample whose line search fails
    restarts from the next guess; after the last guess it stops. At most ``max_iter``
    Newton iterations in all. ``eps`` is the relative precision of F's values (default: the
    machine epsilon of y's dtype; larger when F computes in lower precision), which sets the
    forward-difference step √eps·(1 + |y|). A sample whose residual is not finite counts as
    unconverged (residual inf) and is restarted, without disturbing the others.
    """
    if not isinstance(guesses, (list, tuple)):
        raise TypeError(f"guesses must be a list of initial guesses (tensors), got {type(guesses).__name__}; one "
                        "guess is [y0]")
    if not guesses:
        raise ValueError("newton_krylov needs at least one initial guess")
    for i, guess in enumerate(guesses):
        check_batch(guess, f"guesses[{i}]")
        if guess.shape != guesses[0].shape or guess.dtype != guesses[0].dtype:
            raise ValueError(f"guesses[{i}] is {guess.dtype} of shape {tuple(guess.shape)}, guesses[0] "
                             f"{guesses[0].dtype} of shape {tuple(guesses[0].shape)}; all must match")
    if not callable(F):
        raise TypeError(f"F must be callable as F(y) -> tensor of y's shape, got {type(F).__name__}")
    check_scale(scale, guesses[0])
    tol = check_tol(tol)
    max_iter, krylov_dim = check_count(max_iter, "max_iter", 1), check_count(krylov_dim, "krylov_dim", 1)
    max_backtracks = check_count(max_backtracks, "max_backtracks", 0)
    if isinstance(forcing, bool) or not isinstance(forcing, (int, float)) or not 0 < forcing < 1:
        raise ValueError(f"forcing must be a number in (0, 1) (GMRES's relative residual), got {forcing!r}")
    if eps is not None and (isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < 1):
        raise ValueError(f"eps must be None or a number in (0, 1) (the relative precision of F), got {eps!r}")
    Fc = _Counted(F)
    eps = torch.finfo(guesses[0].dtype).eps if eps is None else float(eps)
    y = guesses[0].clone()
    r = Fc(y)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=y.device)

    def measure(res: Tensor) -> tuple[Tensor, Tensor]:
        res_max = _flat(res.abs() / scale).double().amax(dim=1)
        res_norm = _flat(res).double().norm(dim=1)
        finite = torch.isfinite(res_max) & torch.isfinite(res_norm)
        return torch.where(finite, res_max, inf), torch.where(finite, res_norm, inf)

    res_max, res_norm = measure(r)
    best_y, best_res = y.clone(), res_max.clone()
    guess_idx = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    stopped = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    restarts = 0
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007  (the count is reported)
        converged = res_max <= tol
        active = ~converged & ~stopped
        if not bool(active.any()):
            it -= 1
            break
        d = _gmres(Fc, y, r, active & torch.isfinite(res_norm), dim=min(krylov_dim, _flat(y).shape[1]),
                   rel_tol=forcing, eps=eps)
        lam = torch.ones(y.shape[0], dtype=torch.float64, device=y.device)
        pending = active.clone()
        y_new, r_new = y.clone(), r.clone()
        for _ in range(max_backtracks + 1):
            trial = y + _bcast(lam, y).to(y.dtype) * d
            r_trial = Fc(trial)
            t_max, t_norm = measure(r_trial)
            ok = pending & torch.isfinite(t_norm) & torch.isfinite(res_norm) & (t_norm <= (1.0 - 1e-4 * lam) * res_norm)
            m = _bcast(ok, y)
            y_new = torch.where(m, trial, y_new)
            r_new = torch.where(m, r_trial, r_new)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            lam = torch.where(pending, lam * 0.5, lam)
        y, r = y_new, r_new
        res_max, res_norm = measure(r)
        better = res_max < best_res
        best_y = torch.where(_bcast(better, y), y, best_y)
        best_res = torch.where(better, res_max, best_res)
        # samples whose line search failed: the next guess, or stop
        failed = pending
        if bool(failed.any()):
            guess_idx = torch.where(failed, guess_idx + 1, guess_idx)
            stopped = stopped | (failed & (guess_idx >= len(guesses)))
            fresh = failed & ~stopped
            if bool(fresh.any()):
                restarts += int(fresh.sum())
                g = torch.stack([guesses[int(i)][n] for n, i in enumerate(guess_idx.clamp(max=len(guesses) - 1))])
                y = torch.where(_bcast(fresh, y), g, y)
                r_g = Fc(y)
                r = torch.where(_bcast(fresh, y), r_g, r)
                res_max, res_norm = measure(r)
                better = res_max < best_res
                best_y = torch.where(_bcast(better, y), y, best_y)
                best_res = torch.where(better, res_max, best_res)
    return RootResult(best_y, best_res, best_res <= tol, it, Fc.calls, restarts)
