"""Time grids (sampling trajectories) as σ values, float64 on the host.

A generation grid is strictly decreasing and ends at σ = 0; encoding uses the same grid
reversed, so that a decode retraces the encode. ``trailing`` and ``leading`` are
diffusers' definitions, ``linear`` and ``quadratic`` the DDIM paper's (App. D.2),
``karras`` EDM's (ρ = 7 by default) and ``logsnr`` uniform in log σ.
"""

from __future__ import annotations

import numpy as np

from .schedules import ArrayLike, Schedule

GRIDS = ("trailing", "leading", "linear", "quadratic", "karras", "logsnr")


def _check_steps(steps: object) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"steps must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return int(steps)


def grid_timesteps(schedule: Schedule, grid: str, steps: int) -> np.ndarray | None:
    """The integer timesteps of a timestep-based grid, decreasing; ``None`` for σ-based grids."""
    steps = _check_steps(steps)
    T = schedule.num_train_timesteps
    if grid in ("trailing", "leading", "linear", "quadratic") and steps > T:
        raise ValueError(f"steps={steps} exceeds the schedule's {T} trained timesteps for grid {grid!r}")
    if grid == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif grid == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round().astype(np.int64)[::-1]
    elif grid == "linear":
        ts = np.floor(np.arange(steps) * (T / steps)).astype(np.int64)[::-1]
    elif grid == "quadratic":
        ts = (np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64)[::-1]
        if np.any(np.diff(ts) >= 0):
            raise ValueError(f"grid 'quadratic' repeats timesteps at steps={steps} (T={T}); use fewer steps")
    elif grid in ("karras", "logsnr"):
        return None
    else:
        raise ValueError(f"unknown grid {grid!r}; available: {', '.join(GRIDS)}, or pass sigmas= or timesteps=")
    return ts.copy()


def make_sigmas(
    schedule: Schedule,
    grid: str = "trailing",
    steps: int | None = None,
    *,
    sigmas: ArrayLike | None = None,
    timesteps: ArrayLike | None = None,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    power: float = 1.0,
) -> np.ndarray:
    """The generation grid: ``steps + 1`` σ values, strictly decreasing, ending with 0.

    Exactly one of ``steps`` (with a named ``grid``), ``sigmas`` or ``timesteps`` is used.
    Explicit ``sigmas`` end at 0, or above it for a grid that stops short of the image
    (diffusers' ``set_alpha_to_one=False``; :func:`flowdiff.scheduler_sigmas`); explicit ``timesteps`` (in [0, T−1],
    strictly decreasing, fractional allowed) get σ = 0 appended. ``power`` (logsnr only)
    warps the log-uniform grid: below 1 it spends more steps at large σ, which at 10–20
    evaluations measured better on the digits mixture (``benchmarks/results/lownfe.md``).
    """
    given = [name for name, v in (("steps", steps), ("sigmas", sigmas), ("timesteps", timesteps)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of steps, sigmas or timesteps; got {given or 'none'}")
    if sigmas is not None:
        s = np.asarray(sigmas.detach().cpu().double() if hasattr(sigmas, "detach") else sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {s.shape}")
        if not np.all(np.isfinite(s)) or np.any(s < 0):
            raise ValueError("sigmas must be finite and >= 0")
        if np.any(np.diff(s) >= 0):
            raise ValueError("sigmas must be strictly decreasing (a generation grid); encode reverses it itself")
        # A grid may stop above 0: diffusers' DDIMScheduler with set_alpha_to_one=False ends at σ_min
        # (see flowdiff.scheduler_grids); the result is then x̄ at that σ.
        return s
    if timesteps is not None:
        t = np.asarray(timesteps.detach().cpu().double() if hasattr(timesteps, "detach") else timesteps,
                       dtype=np.float64)
        T = schedule.num_train_timesteps
        if t.ndim != 1 or t.size < 1:
            raise ValueError(f"timesteps must be 1-D and non-empty, got shape {t.shape}")
        if np.any(t < 0) or np.any(t > T - 1) or not np.all(np.isfinite(t)):
            raise ValueError(f"timesteps must lie in [0, {T - 1}]")
        if np.any(np.diff(t) >= 0):
            raise ValueError("timesteps must be strictly decreasing (a generation grid)")
        return np.append(schedule.sigma_at(t), 0.0)
    ts = grid_timesteps(schedule, grid, steps)  # validates grid and steps
    if ts is not None:
        return np.append(schedule.sigmas[ts], 0.0)
    lo = schedule.sigma_min if sigma_min is None else float(sigma_min)
    hi = schedule.sigma_max if sigma_max is None else float(sigma_max)
    if not 0 < lo < hi:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {lo}, {hi}")
    if steps == 1:
        return np.array([hi, 0.0])
    ramp = np.linspace(0.0, 1.0, steps)
    if grid == "karras":
        if not rho > 0:
            raise ValueError(f"rho must be > 0, got {rho}")
        s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    else:  # logsnr; power < 1 moves steps towards σ_max (log σ_i = log σ_max + (i/(n−1))^power · Δ)
        if not (isinstance(power, (int, float)) and 0 < power < 10):
            raise ValueError(f"power must be a number in (0, 10), got {power!r}")
        s = np.exp(np.log(hi) + ramp**power * (np.log(lo) - np.log(hi)))
    s[0], s[-1] = hi, lo
    return np.append(s, 0.0)
