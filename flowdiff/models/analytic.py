"""Closed-form models: data whose noised densities, ε and ODE trajectories are known exactly.

In DDIM's variables x̄ = x₀ + σ·z, so p_σ(x̄) is the data density convolved with N(0, σ²I)
and the exact noise prediction is ε(x̄, σ) = −σ·∇ log p_σ(x̄).

* :class:`Gaussian` — data N(μ, Σ) (Σ isotropic, diagonal or full): p_σ = N(μ, Σ + σ²I),
  ε = σ(Σ + σ²I)⁻¹(x̄ − μ), and the ODE solution between any two σ is
  x̄(σ) − μ = (Σ + σ²I)^{1/2} (Σ + σ₀²I)^{−1/2} (x̄(σ₀) − μ).
* :class:`Mixture` — a Gaussian mixture Σᵢ πᵢ N(cᵢ, s²I) (a kernel density over points, e.g.
  images, with bandwidth s > 0): ε = σ/(s² + σ²) · (x̄ − Σᵢ wᵢ(x̄) cᵢ) with posterior weights wᵢ
  from a log-sum-exp; no division by σ, exact at σ = 0. Its trajectories are nonlinear.

Each model is callable in the user convention ``model(x_t, t)`` (t mapped to σ by its
schedule, so below σ_min it sees σ_min like any trained model) and offers ``eps(xbar, σ)``
exactly at every σ ≥ 0; :meth:`flow` builds the exact σ-native :class:`ProbabilityFlow`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..engine.flow import ProbabilityFlow
from ..engine.schedules import ArrayLike, Schedule, as_schedule


def _flat(x: Tensor, dim: int, name: str) -> Tensor:
    if x.ndim < 2 or x[0].numel() != dim:
        raise ValueError(f"{name} must have shape (batch, ...) with {dim} values per sample, got {tuple(x.shape)}")
    return x.reshape(x.shape[0], dim)


def _sigma(value: object, name: str) -> float:
    """A noise level σ ≥ 0 (the formulas square σ, so a negative one would silently read as |σ|)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0 (a noise level σ), got {value!r}")
    return float(value)


def _count(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an int >= 1 (the number of samples), got {n!r}")
    return int(n)


class _ClosedForm:
    dim: int
    schedule: Schedule

    def eps(self, xbar: Tensor, sigma: float) -> Tensor:
        raise NotImplementedError  # abstract

    def __call__(self, x_t: Tensor, t: Tensor) -> Tensor:
        """``model(x_t, t)``: ε at the input x_t = α(σ)·x̄ and (possibly fractional) timestep t, α the
        schedule's (:meth:`flowdiff.Schedule.alpha`: 1/√(1+σ²) for VP, 1 for VE, 1/(1+σ) for flow matching)."""
        t_vals = t.detach().cpu().double().reshape(-1).tolist()
        alpha = self.schedule.alpha
        if len(set(t_vals)) == 1:
            s = float(self.schedule.sigma_at(t_vals[0]))
            return self.eps(x_t / alpha(s), s)
        out = [self.eps(x_t[i:i + 1] / alpha(s), s)
               for i, s in enumerate(float(self.schedule.sigma_at(v)) for v in t_vals)]
        return torch.cat(out)

    def _on(self, device: torch.device, *tensors: Tensor) -> list[Tensor]:
        """The model's constant ``tensors`` on ``device``, copied there once and kept: a host-to-device copy
        per evaluation would make the host wait for the GPU at every step of a solve."""
        copies: dict[tuple[int, torch.device], tuple[Tensor, Tensor]] = self.__dict__.setdefault("_copies", {})
        out = []
        for t in tensors:
            if t.device == device:
                out.append(t)
                continue
            hit = copies.get((id(t), device))
            if hit is None or hit[0] is not t:  # not copied yet, or the attribute was replaced since
                hit = copies[(id(t), device)] = (t, t.to(device))
            out.append(hit[1])
        return out

    def flow(self) -> ProbabilityFlow:
        """The exact σ-native flow of this model (no timestep rounding, exact down to σ = 0)."""
        return ProbabilityFlow.from_sigma_field(self.eps, self.schedule)

    def denoised(self, xbar: Tensor, sigma: float) -> Tensor:
        """E[x₀ | x̄] = x̄ − σ·ε."""
        return xbar - sigma * self.eps(xbar, sigma)


class Gaussian(_ClosedForm):
    """Data N(mean, cov): ``cov`` a scalar variance, a vector of D variances or the same in the data's
    shape (``mean``'s, e.g. (1, 2, 2): per-pixel variances, flattened), or a full D×D matrix."""

    def __init__(self, mean: Tensor, cov: float | Tensor, schedule: Schedule | ArrayLike | None = None) -> None:
        self.schedule = Schedule.linear() if schedule is None else as_schedule(schedule)
        mean = torch.as_tensor(mean, dtype=torch.float64)
        if mean.ndim < 1 or mean.numel() < 1 or not bool(torch.isfinite(mean).all()):
            raise ValueError(f"mean must be a finite tensor of the data's shape (at least 1-D), got shape "
                             f"{tuple(mean.shape)}")
        self.shape = tuple(mean.shape)
        self.dim = mean.numel()
        self.mean = mean.reshape(-1)
        cov_t = torch.as_tensor(cov, dtype=torch.float64)
        if not bool(torch.isfinite(cov_t).all()):
            raise ValueError("cov must be finite")
        if cov_t.ndim == 0:
            cov_t = cov_t.expand(self.dim).clone()
        if mean.ndim >= 2 and tuple(cov_t.shape) == self.shape and self.dim > 1:
            # per-pixel variances in the data's shape: never a D×D matrix's shape, since D > 1 pixels fill it
            cov_t = cov_t.reshape(-1)
        if cov_t.ndim == 1:
            if cov_t.numel() != self.dim or bool((cov_t <= 0).any()):
                raise ValueError(f"cov as variances must have {self.dim} positive entries, got {tuple(cov_t.shape)}")
            self.evals, self.evecs = cov_t, None
        elif cov_t.ndim == 2:
            if cov_t.shape != (self.dim, self.dim) or not torch.allclose(cov_t, cov_t.T):
                raise ValueError(f"cov as a matrix must be symmetric {self.dim}x{self.dim}, got {tuple(cov_t.shape)}")
            self.evals, self.evecs = torch.linalg.eigh(cov_t)
            if bool((self.evals <= 0).any()):
                raise ValueError("cov must be positive definite")
        else:
            raise ValueError(f"cov must be a scalar, {self.dim} variances (shape ({self.dim},) or the data's "
                             f"{self.shape}) or a {self.dim}x{self.dim} matrix, got shape {tuple(cov_t.shape)}")

    def _apply(self, v: Tensor, fn_of_evals: Tensor) -> Tensor:
        """Multiply rows of v by g(Σ) given g's values on the eigenvalues."""
        if self.evecs is None:
            return v * fn_of_evals
        (evecs,) = self._on(v.device, self.evecs)
        return ((v @ evecs) * fn_of_evals) @ evecs.T

    def eps(self, xbar: Tensor, sigma: float) -> Tensor:
        mean, evals = self._on(xbar.device, self.mean, self.evals)
        v = _flat(xbar, self.dim, "xbar").double() - mean
        out = self._apply(v, sigma / (evals + sigma * sigma))
        return out.reshape(xbar.shape).to(xbar.dtype)

    def solution(self, xbar0: Tensor, sigma0: float, sigma1: float) -> Tensor:
        """The exact ODE solution at σ₁ from x̄(σ₀) = xbar0 (either direction)."""
        sigma0, sigma1 = _sigma(sigma0, "sigma0"), _sigma(sigma1, "sigma1")
        mean, evals = self._on(xbar0.device, self.mean, self.evals)
        v = _flat(xbar0, self.dim, "xbar0").double() - mean
        g = torch.sqrt((evals + sigma1**2) / (evals + sigma0**2))
        return (self._apply(v, g) + mean).reshape(xbar0.shape).to(xbar0.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples of the data, shape (n, *mean.shape), float64."""
        n = _count(n)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self._apply(z, self.evals.sqrt()) + self.mean).reshape(n, *self.shape)

    def log_prob(self, xbar: Tensor, sigma: float) -> Tensor:
        """log p_σ(x̄) (float64), for checking ε = −σ ∇ log p_σ."""
        sigma = _sigma(sigma, "sigma")
        mean, evals = self._on(xbar.device, self.mean, self.evals)
        v = _flat(xbar, self.dim, "xbar").double() - mean
        var = evals + sigma * sigma
        w = v if self.evecs is None else v @ self._on(xbar.device, self.evecs)[0]
        return -0.5 * ((w * w / var).sum(1) + torch.log(2 * math.pi * var).sum())


class Mixture(_ClosedForm):
    """Σᵢ πᵢ N(centers[i], bandwidth²·I): a kernel density over points (e.g. a set of images).

    ``centers`` has shape (N, ...); ``weights`` (optional) the mixture weights πᵢ. The
    bandwidth must be > 0 so that the data density is smooth and ε is exact at σ = 0.
    ε is computed in float64 with a log-sum-exp over the components, in chunks of the batch.
    """

    def __init__(self, centers: Tensor, bandwidth: float, weights: Tensor | None = None,
                 schedule: Schedule | ArrayLike | None = None, chunk: int = 256) -> None:
        self.schedule = Schedule.linear() if schedule is None else as_schedule(schedule)
        centers = torch.as_tensor(centers, dtype=torch.float64)
        if centers.ndim < 2 or centers.shape[0] < 1 or centers[0].numel() < 1:
            raise ValueError(f"centers must have shape (N, ...) with N >= 1, got {tuple(centers.shape)}")
        if not bool(torch.isfinite(centers).all()):
            raise ValueError("centers must be finite")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be an int >= 1, got {chunk!r}")
        if isinstance(bandwidth, bool) or not (isinstance(bandwidth, (int, float)) and bandwidth > 0
                                                and math.isfinite(bandwidth)):
            raise ValueError(f"bandwidth must be a finite number > 0, got {bandwidth!r}")
        self.shape = tuple(centers.shape[1:])
        self.dim = centers[0].numel()
        self.centers = centers.reshape(centers.shape[0], self.dim)
        self.bandwidth = float(bandwidth)
        if weights is None:
            self.log_weights = torch.full((centers.shape[0],), -math.log(centers.shape[0]), dtype=torch.float64)
        else:
            w = torch.as_tensor(weights, dtype=torch.float64)
            if w.shape != (centers.shape[0],) or not bool(((w > 0) & torch.isfinite(w)).all()):
                raise ValueError(f"weights must be {centers.shape[0]} positive numbers, got shape {tuple(w.shape)}")
            self.log_weights = torch.log(w / w.sum())
        self._sq = (self.centers**2).sum(1)
        self.chunk = chunk

    def _posterior(self, v: Tensor, var: float) -> Tensor:
        c, sq, log_weights = self._on(v.device, self.centers, self._sq, self.log_weights)
        d2 = (v * v).sum(1, keepdim=True) - 2 * v @ c.T + sq
        return torch.softmax(log_weights - d2 / (2 * var), dim=1)

    def eps(self, xbar: Tensor, sigma: float) -> Tensor:
        v = _flat(xbar, self.dim, "xbar").double()
        var = self.bandwidth**2 + sigma * sigma
        (c,) = self._on(v.device, self.centers)
        out = torch.empty_like(v)
        for i in range(0, v.shape[0], self.chunk):
            vi = v[i:i + self.chunk]
            mean = self._posterior(vi, var) @ c
            out[i:i + self.chunk] = (vi - mean) * (sigma / var)
        return out.reshape(xbar.shape).to(xbar.dtype)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n samples of the data (float64)."""
        n = _count(n)
        idx = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, dtype=torch.float64, generator=generator)
        return (self.centers[idx] + self.bandwidth * z).reshape(n, *self.shape)

    def log_prob(self, xbar: Tensor, sigma: float) -> Tensor:
        """log p_σ(x̄) (float64)."""
        sigma = _sigma(sigma, "sigma")
        v = _flat(xbar, self.dim, "xbar").double()
        var = self.bandwidth**2 + sigma * sigma
        centers, log_weights = self._on(v.device, self.centers, self.log_weights)
        d2 = ((v[:, None, :] - centers[None]) ** 2).sum(-1)
        return torch.logsumexp(log_weights - d2 / (2 * var), dim=1) - 0.5 * self.dim * math.log(2 * math.pi * var)
