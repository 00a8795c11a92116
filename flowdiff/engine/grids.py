"""Time grids (sampling trajectories) as σ values, float64 on the host.

A generation grid is strictly decreasing and ends at σ = 0; encoding uses the same grid
reversed, so that a decode retraces the encode. :func:`reversed_grid` is the one place a σ grid
is turned around (an encode's grid from its generation grid, a decode's from a latent's stored
grid); ``tests/test_architecture.py`` fails on another. ``trailing`` and ``leading`` are
diffusers' definitions, ``linear`` and ``quadratic`` the DDIM paper's (App. D.2),
``karras`` EDM's (ρ = 7 by default) and ``logsnr`` uniform in log σ.
"""

from __future__ import annotations

import math

import numpy as np

from .schedules import ArrayLike, Schedule, real_values

GRIDS = ("trailing", "leading", "linear", "quadratic", "karras", "logsnr")
#: The options each grid takes (``Grid(options=...)``); the timestep grids and explicit sigmas/timesteps take none.
GRID_OPTIONS: dict[str, tuple[str, ...]] = {"karras": ("rho", "sigma_min", "sigma_max"),
                                            "logsnr": ("power", "sigma_min", "sigma_max")}
_DEFAULTS = {"rho": 7.0, "power": 1.0}


def reversed_grid(sigmas: ArrayLike) -> np.ndarray:
    """The σ grid ``sigmas`` run the other way, as a new float64 array.

    A generation grid (σ_max down to 0) becomes the encode grid that retraces it, and an
    encode's stored grid (``Latent.sigmas``, 0 up to σ_max) the grid of its decode: both
    directions visit the same σ values, so a decode evaluates the model where its encode did.
    """
    grid = np.asarray(sigmas, dtype=np.float64)
    if grid.ndim != 1:
        raise ValueError(f"sigmas must be a 1-D σ grid, got shape {grid.shape}")
    return grid[::-1].copy()


def check_grid_options(grid: object, options: dict[str, object], *, explicit: str | None = None) -> dict[str, float]:
    """The options of ``grid`` as floats; an option the grid does not take, or a value that is not a finite real
    number, is an error naming the option, the value and what is accepted. ``explicit`` names the argument
    (``"sigmas"``/``"timesteps"``) when the grid is given explicitly, which takes no options."""
    if not options:
        return {}
    if explicit is None and grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r}; available: {', '.join(GRIDS)}, or pass sigmas= or timesteps=")
    accepted = () if explicit is not None else GRID_OPTIONS.get(grid, ()) if isinstance(grid, str) else ()
    for name, value in options.items():
        if name not in accepted:
            where = f"an explicit {explicit}= grid" if explicit is not None else f"grid {grid!r}"
            takes = ", ".join(accepted) if accepted else "no options"
            others = "; ".join(f"{g}: {', '.join(o)}" for g, o in GRID_OPTIONS.items())
            raise TypeError(f"{where} takes {takes}; got grid option {name!r}={value!r} (grid options: {others})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"grid option {name} must be a real number, got {value!r} ({type(value).__name__})")
        if not np.isfinite(value):
            raise ValueError(f"grid option {name} must be finite, got {value!r}")
    return {name: float(value) for name, value in options.items()}


#: The most steps a named grid may have. Past it a step count is a mistake (10**12 would build arrays until the
#: kernel kills the process) rather than a sampler: a million steps of the cheapest loop take minutes.
MAX_STEPS = 1_000_000


def _check_steps(steps: object, name: str = "steps") -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(steps).__name__}")
    if steps < 1:
        raise ValueError(f"{name} must be >= 1, got {steps}")
    if steps > MAX_STEPS:
        raise ValueError(f"{name} must be at most {MAX_STEPS:,} (flowdiff.engine.grids.MAX_STEPS), got {steps:,}; "
                         "for a longer solve pass the grid itself as sigmas=")
    return int(steps)


def check_budget(solver_name: str, nfe: int, steps: int) -> int:
    """``steps``, the count that ``nfe`` evaluations buy with ``solver_name``, within :data:`MAX_STEPS` (the
    error names the budget, which is what the caller gave)."""
    if steps > MAX_STEPS:
        raise ValueError(f"nfe={nfe:,} buys {steps:,} steps of solver {solver_name!r}, more than a grid may have "
                         f"({MAX_STEPS:,}, flowdiff.engine.grids.MAX_STEPS); give a smaller nfe")
    return steps


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
    **grid_options: float,
) -> np.ndarray:
    """The generation grid: ``steps + 1`` σ values, strictly decreasing, ending with 0.

    Exactly one of ``steps`` (with a named ``grid``), ``sigmas`` or ``timesteps`` is used.
    Explicit ``sigmas`` end at 0, or above it for a grid that stops short of the image
    (diffusers' ``set_alpha_to_one=False``; :func:`flowdiff.scheduler_sigmas`); explicit ``timesteps`` (in [0, T−1],
    strictly decreasing, fractional allowed) get σ = 0 appended. ``power`` (logsnr only)
    warps the log-uniform grid: below 1 it spends more steps at large σ, which at 10–20
    evaluations measured better on the digits mixture (``benchmarks/results/lownfe.md``).

    ``grid_options`` are the named grid's (:data:`GRID_OPTIONS`): ``rho`` (karras, default 7),
    ``power`` (logsnr, default 1), ``sigma_min``/``sigma_max`` (karras and logsnr; default and
    bounds: the schedule's trained range, outside which the model's timestep would be clamped).
    Any other option, or one that the grid does not take, is a ``TypeError``.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a flowdiff.Schedule (e.g. flow.schedule, Schedule.linear()), got "
                        f"{type(schedule).__name__}")
    given = [name for name, v in (("steps", steps), ("sigmas", sigmas), ("timesteps", timesteps)) if v is not None]
    if len(given) != 1:
        raise ValueError(f"give exactly one of steps, sigmas or timesteps; got {given or 'none'}")
    options = check_grid_options(grid, grid_options, explicit=given[0] if given[0] != "steps" else None)
    if sigmas is not None:
        s = real_values(sigmas, "sigmas")
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {s.shape}")
        if not np.all(np.isfinite(s[1:])) or np.isnan(s[0]) or np.any(s < 0):
            raise ValueError("sigmas must be finite and >= 0 (the first may be inf: pure noise, for models that "
                             "define a step from there, see flowdiff.engine.terminal)")
        if np.any(np.diff(s) >= 0):
            raise ValueError("sigmas must be strictly decreasing (a generation grid); encode reverses it itself")
        # A grid may stop above 0: diffusers' DDIMScheduler with set_alpha_to_one=False ends at σ_min
        # (see flowdiff.engine.scheduler_grids); the result is then the model's x = α(σ)·x̄ at that σ.
        return s
    if timesteps is not None:
        t = real_values(timesteps, "timesteps")
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
    lo = options.get("sigma_min", schedule.sigma_min)
    hi = options.get("sigma_max", schedule.sigma_max)
    rho = options.get("rho", _DEFAULTS["rho"])
    power = options.get("power", _DEFAULTS["power"])
    for name, value in (("sigma_min", lo), ("sigma_max", hi)):
        if not schedule.sigma_min * (1 - 1e-12) <= value <= schedule.sigma_max * (1 + 1e-12):
            raise ValueError(f"grid option {name}={value!r} is outside the schedule's trained range "
                             f"[{schedule.sigma_min:.6g}, {schedule.sigma_max:.6g}] (the model's timestep would be "
                             "clamped there)")
    if not lo < hi:
        raise ValueError(f"grid options need sigma_min < sigma_max, got sigma_min={lo!r}, sigma_max={hi!r}")
    if hi == math.inf:
        raise ValueError(f"the {grid} grid needs a finite sigma_max, and this schedule's is ∞ (zero terminal SNR); "
                         "pass grid_options={'sigma_max': ...}, or use a timestep grid (trailing, leading)")
    if steps == 1:
        return np.array([hi, 0.0])
    ramp = np.linspace(0.0, 1.0, steps)
    if grid == "karras":
        if not rho > 0:
            raise ValueError(f"grid option rho must be > 0 (EDM uses 7), got {rho!r}")
        s = (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
    else:  # logsnr; power < 1 moves steps towards σ_max (log σ_i = log σ_max + (i/(n−1))^power · Δ)
        if not 0 < power < 10:
            raise ValueError(f"grid option power must be a number in (0, 10), got {power!r}")
        s = np.exp(np.log(hi) + ramp**power * (np.log(lo) - np.log(hi)))
    s[0], s[-1] = hi, lo
    return np.append(s, 0.0)
