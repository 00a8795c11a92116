"""Noise schedules: ᾱ_t, σ_t = √((1−ᾱ_t)/ᾱ_t), and the map between σ and the model's timestep t.

Everything here is float64 on the host. The schedule is the only place that knows the
trained timesteps; the ODE itself lives in σ.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


def _as_float64(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}") from None
    if arr.ndim != 1 or arr.size < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    return arr


class Schedule:
    """A discrete diffusion schedule of ``T`` trained timesteps, given by ``alphas_cumprod`` (ᾱ).

    ᾱ must be strictly decreasing in (0, 1], so σ_t increases strictly with t. Build one with
    :meth:`linear` (DDPM), :meth:`scaled_linear` (Stable Diffusion), :meth:`cosine`
    (improved DDPM), :meth:`from_betas` or :meth:`from_alphas_cumprod`.
    """

    def __init__(self, alphas_cumprod: ArrayLike) -> None:
        acp = _as_float64(alphas_cumprod, "alphas_cumprod")
        if np.any(acp <= 0) or np.any(acp > 1):
            raise ValueError("alphas_cumprod must lie in (0, 1]")
        if np.any(np.diff(acp) >= 0):
            i = int(np.argmax(np.diff(acp) >= 0))
            raise ValueError(f"alphas_cumprod must be strictly decreasing; it is not at index {i} -> {i + 1}")
        self.alphas_cumprod = acp
        self.sigmas = np.sqrt((1.0 - acp) / acp)
        if self.sigmas[0] <= 0:
            raise ValueError("alphas_cumprod[0] must be < 1 (σ_0 > 0) so that t(σ) is defined")
        self._sigma_list = self.sigmas.tolist()
        self._log_sigmas = [math.log(s) for s in self._sigma_list]

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: ArrayLike) -> Schedule:
        return cls(alphas_cumprod)

    @classmethod
    def from_betas(cls, betas: ArrayLike) -> Schedule:
        b = _as_float64(betas, "betas")
        if np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must lie in (0, 1)")
        return cls(np.cumprod(1.0 - b))

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Schedule:
        """DDPM's linear betas (Ho et al. 2020)."""
        _check_T(num_train_timesteps)
        return cls.from_betas(np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64))

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
                      beta_end: float = 0.012) -> Schedule:
        """Stable Diffusion's betas: linear in √β."""
        _check_T(num_train_timesteps)
        return cls.from_betas(np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                                          dtype=np.float64) ** 2)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> Schedule:
        """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021), betas capped at ``max_beta``."""
        _check_T(num_train_timesteps)
        T = num_train_timesteps

        def alpha_bar(x: np.ndarray) -> np.ndarray:
            return np.cos((x / T + s) / (1 + s) * np.pi / 2) ** 2

        t = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)
        return cls.from_betas(betas)

    @classmethod
    def from_config(cls, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 0.02,
                    trained_betas: ArrayLike | None = None) -> Schedule:
        """A schedule named as diffusers names it (``beta_schedule`` of a scheduler config)."""
        if trained_betas is not None:
            return cls.from_betas(trained_betas)
        if beta_schedule == "linear":
            return cls.linear(num_train_timesteps, beta_start, beta_end)
        if beta_schedule == "scaled_linear":
            return cls.scaled_linear(num_train_timesteps, beta_start, beta_end)
        if beta_schedule in ("squaredcos_cap_v2", "cosine"):
            return cls.cosine(num_train_timesteps)
        raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")

    # -- conversions ----------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @property
    def sigma_min(self) -> float:
        return self._sigma_list[0]

    @property
    def sigma_max(self) -> float:
        return self._sigma_list[-1]

    def sigma_at(self, t: float | ArrayLike) -> float | np.ndarray:
        """σ at (possibly fractional) timestep t, by the same log-linear interpolation as :meth:`timestep`."""
        if np.ndim(t) == 0:
            t = float(t)
            if not 0 <= t <= self.num_train_timesteps - 1:
                raise ValueError(f"timestep t={t} is outside [0, {self.num_train_timesteps - 1}]")
            if t == int(t):
                return self._sigma_list[int(t)]
            i = int(t)
            frac = t - i
            return math.exp(self._log_sigmas[i] * (1 - frac) + self._log_sigmas[i + 1] * frac)
        return np.array([self.sigma_at(float(x)) for x in np.asarray(t, dtype=np.float64)])

    def timestep(self, sigma: float) -> float:
        """The model's timestep for noise level σ ≥ 0 (a float).

        Linear in log σ between trained steps, exact at them; 0 below the smallest trained σ
        (including σ = 0) and T−1 above the largest.
        """
        if sigma <= self._sigma_list[0]:
            if sigma < 0 or sigma != sigma:
                raise ValueError(f"sigma must be >= 0, got {sigma}")
            return 0.0
        if sigma >= self._sigma_list[-1]:
            return float(self.num_train_timesteps - 1)
        ls = math.log(sigma)
        i = bisect.bisect_right(self._log_sigmas, ls) - 1
        lo, hi = self._log_sigmas[i], self._log_sigmas[i + 1]
        return i + (ls - lo) / (hi - lo)

    def timesteps(self, sigmas: ArrayLike) -> np.ndarray:
        """:meth:`timestep` for each σ."""
        return np.array([self.timestep(float(s)) for s in np.asarray(sigmas, dtype=np.float64)])

    def __repr__(self) -> str:
        return (f"Schedule(T={self.num_train_timesteps}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g})")


def _check_T(num_train_timesteps: int) -> None:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")


def as_schedule(schedule: Schedule | ArrayLike | None, *, name: str = "alphas_cumprod") -> Schedule:
    """A Schedule from a Schedule, or from ᾱ values."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule is None:
        raise TypeError(f"{name} is required: a flowdiff.Schedule or a 1-D sequence of ᾱ values")
    return Schedule(schedule)
