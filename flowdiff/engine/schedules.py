"""Noise schedules: x_t = α_t·x₀ + s_t·ε, σ = s/α, and the map between σ and the model's time t.

Every schedule of this form is one ODE: with x̄ = x/α and σ = s/α, x̄ = x₀ + σ·ε, and the
probability flow is dx̄/dσ = ε whatever α and s are (Karras et al., "Elucidating the Design
Space of Diffusion-Based Generative Models", 2022, eq. 4 with s(t) = α). Schedules differ only
in the model's input scaling x = α(σ)·x̄, its time t(σ), and how a prediction becomes ε:

* variance preserving (:class:`Schedule`, DDPM/DDIM/Stable Diffusion): α² + s² = 1,
  α = √ᾱ = 1/√(1+σ²), σ = √((1−ᾱ)/ᾱ), discrete trained timesteps;
* variance exploding (:class:`VESchedule`, NCSN/EDM): α = 1, s = σ;
* rectified flow / flow matching (:class:`FlowMatchingSchedule`, SD3, Flux): α = 1 − t,
  s = t, so σ = t/(1−t) and α = 1/(1+σ).

Everything here is float64 on the host. The schedule is the only place that knows the
trained timesteps; the ODE itself lives in σ.
"""

from __future__ import annotations

import bisect
import math
import numbers
from collections.abc import Sequence
from decimal import Decimal

import numpy as np
import torch

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")


def real_values(values: object, name: str) -> np.ndarray:
    """``values`` (a list, array or tensor of real numbers) as float64; strings, bools, complex numbers and other
    objects are refused rather than converted (``["2", "0"]`` became a grid, ``1+2j`` lost its imaginary part)."""
    if hasattr(values, "detach"):  # a tensor
        values = values.detach().cpu()
        dtype = str(values.dtype).removeprefix("torch.")
        kind = "f" if values.is_floating_point() else "c" if values.is_complex() else "b" if dtype == "bool" else "i"
        values = values.double() if kind in "fi" else values
    elif isinstance(values, (list, tuple)):  # item by item: NumPy makes [True, 0.0] floats, [Fraction(1, 2)] objects
        kind, dtype = "f", ""
        for i, item in enumerate(values):
            if not _real_item(item):
                of = str(getattr(item, "dtype", type(item).__name__)).removeprefix("torch.")
                kind, dtype = "item", f"{of} (item {i})"
                break
    else:
        values = np.asarray(values)
        kind, dtype = values.dtype.kind, str(values.dtype)
    if kind not in "fiu":
        shown = repr(values.tolist() if hasattr(values, "tolist") else values)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise TypeError(f"{name} must be real numbers (ints or floats), got {shown} of dtype {dtype}")
    return np.asarray(values, dtype=np.float64)


def _real_item(item: object) -> bool:
    """Whether a list's item is a real number (not a bool: a Python, NumPy or ``decimal`` number, a fraction), a real
    tensor or array, or a nested list (whose shape the caller checks)."""
    if isinstance(item, (list, tuple)):
        return True
    if isinstance(item, torch.Tensor):
        return not (item.is_complex() or item.dtype == torch.bool)
    if isinstance(item, np.ndarray):
        return item.dtype.kind in "fiu"
    if isinstance(item, (bool, np.bool_)):
        return False
    return isinstance(item, (numbers.Real, Decimal))


def _as_float64(values: ArrayLike, name: str) -> np.ndarray:
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}")
    try:
        arr = real_values(values, name)
    except ValueError:  # ragged lists
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

    The last ᾱ alone may be exactly 0: a zero-terminal-SNR schedule (Lin et al., "Common
    Diffusion Noise Schedules and Sample Steps are Flawed", 2024; :func:`rescale_zero_terminal_snr`),
    whose last timestep is pure noise, σ_max = ∞. There x̄ is infinite but the model's input
    x = ε is not: a generation starting there takes its first step with
    :meth:`flowdiff.ProbabilityFlow.step_from_noise` (see :mod:`flowdiff.engine.terminal`).
    """

    #: which family of (α, s) the schedule is: "vp", "ve" or "flow_matching"
    kind = "vp"

    def __init__(self, alphas_cumprod: ArrayLike) -> None:
        acp = _as_float64(alphas_cumprod, "alphas_cumprod")
        if np.any(acp[:-1] <= 0) or acp[-1] < 0 or np.any(acp > 1):
            raise ValueError("alphas_cumprod must lie in (0, 1] (the last value may be exactly 0: zero terminal "
                             "SNR)")
        if np.any(np.diff(acp) >= 0):
            i = int(np.argmax(np.diff(acp) >= 0))
            raise ValueError(f"alphas_cumprod must be strictly decreasing; it is not at index {i} -> {i + 1}")
        self.alphas_cumprod = acp
        #: True when ᾱ_{T−1} = 0: the last timestep is pure noise, σ_max = ∞
        self.zero_terminal_snr = bool(acp[-1] == 0.0)
        with np.errstate(divide="ignore"):
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
    def from_betas(cls, betas: ArrayLike, *, rescale_zero_snr: bool = False) -> Schedule:
        """The schedule ᾱ_t = ∏(1 − β) of ``betas`` in (0, 1); with ``rescale_zero_snr``, first rescaled to
        zero terminal SNR (:func:`rescale_zero_terminal_snr`, diffusers' ``rescale_betas_zero_snr=True``)."""
        b = _as_float64(betas, "betas")
        if np.any(b <= 0) or np.any(b >= 1):
            raise ValueError("betas must lie in (0, 1)")
        acp = np.cumprod(1.0 - b)
        return cls(rescale_zero_terminal_snr(acp) if rescale_zero_snr else acp)

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
        """Improved DDPM's cosine schedule (Nichol & Dhariwal 2021), betas capped at ``max_beta``.

        ``s`` (the offset that keeps β small near t = 0) must be a finite number ≥ 0, and
        ``max_beta`` in (0, 1); others are errors naming them.
        """
        _check_T(num_train_timesteps)
        for name, value, ok, accepted in (("s", s, lambda v: v >= 0, "a finite number >= 0 (0.008 in the paper)"),
                                          ("max_beta", max_beta, lambda v: 0 < v < 1, "a number in (0, 1)")):
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) \
                    or not math.isfinite(value) or not ok(value):
                raise ValueError(f"Schedule.cosine: {name} must be {accepted}, got {value!r}")
        T = num_train_timesteps

        def alpha_bar(x: np.ndarray) -> np.ndarray:
            return np.cos((x / T + s) / (1 + s) * np.pi / 2) ** 2

        t = np.arange(T, dtype=np.float64)
        betas = np.minimum(1 - alpha_bar(t + 1) / alpha_bar(t), max_beta)
        return cls.from_betas(betas)

    @classmethod
    def from_config(cls, beta_schedule: str = "linear", num_train_timesteps: int = 1000,
                    beta_start: float = 1e-4, beta_end: float = 0.02,
                    trained_betas: ArrayLike | None = None, rescale_betas_zero_snr: bool = False) -> Schedule:
        """A schedule named as diffusers names it (``beta_schedule`` of a scheduler config); with
        ``rescale_betas_zero_snr`` rescaled to zero terminal SNR (:func:`rescale_zero_terminal_snr`)."""
        if not isinstance(rescale_betas_zero_snr, bool):
            raise TypeError(f"rescale_betas_zero_snr must be True or False, got {rescale_betas_zero_snr!r}")
        if trained_betas is not None:
            schedule = cls.from_betas(trained_betas)
        elif beta_schedule == "linear":
            schedule = cls.linear(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule == "scaled_linear":
            schedule = cls.scaled_linear(num_train_timesteps, beta_start, beta_end)
        elif beta_schedule in ("squaredcos_cap_v2", "cosine"):
            schedule = cls.cosine(num_train_timesteps)
        else:
            raise ValueError(f"unsupported beta_schedule {beta_schedule!r}; supported: {', '.join(BETA_SCHEDULES)}")
        return cls(rescale_zero_terminal_snr(schedule.alphas_cumprod)) if rescale_betas_zero_snr else schedule

    @classmethod
    def flow_matching(cls, num_train_timesteps: int = 1000, shift: float = 1.0) -> FlowMatchingSchedule:
        """Rectified flow x = (1−t)·x₀ + t·ε with model time T·t (SD3, Flux); see :class:`FlowMatchingSchedule`."""
        return FlowMatchingSchedule(num_train_timesteps, shift)

    @classmethod
    def variance_exploding(cls, sigma_min: float = 0.002, sigma_max: float = 80.0, num_levels: int = 1000,
                           time: str = "log_sigma") -> VESchedule:
        """x = x₀ + σ·ε (NCSN, EDM); see :class:`VESchedule`."""
        return VESchedule(sigma_min, sigma_max, num_levels, time)

    # -- the model's variables ------------------------------------------------------------
    def alpha(self, sigma: float) -> float:
        """The model's input scale α(σ): the model sees x = α·x̄ (VP: α = √ᾱ = 1/√(1+σ²))."""
        return 1.0 / math.sqrt(1.0 + sigma * sigma)

    def velocity_coefficients(self, sigma: float) -> tuple[float, float]:
        """(a, b) with ε = a·x̄ + b·v for a flow-matching velocity v = dx/dt; VP's discrete time has none."""
        raise ValueError(f"prediction_type 'velocity' (v = dx/dt) needs a continuous-time schedule "
                         f"(flowdiff.Schedule.flow_matching or .variance_exploding); {self!r} is discrete VP. "
                         "For the VP 'v' of Salimans & Ho use prediction_type='v_prediction'")

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
        """σ at (possibly fractional) timestep t, by the same interpolation as :meth:`timestep`."""
        if np.ndim(t) == 0:
            t = float(t)
            if not 0 <= t <= self.num_train_timesteps - 1:
                raise ValueError(f"timestep t={t} is outside [0, {self.num_train_timesteps - 1}]")
            if t == int(t):
                return self._sigma_list[int(t)]
            i = int(t)
            frac = t - i
            if self._sigma_list[i + 1] == math.inf:  # zero terminal SNR: linear in α = 1/√(1+σ²) down to α = 0
                a = (1 - frac) / math.sqrt(1.0 + self._sigma_list[i] ** 2)
                return math.sqrt(1.0 - a * a) / a
            return math.exp(self._log_sigmas[i] * (1 - frac) + self._log_sigmas[i + 1] * frac)
        return np.array([self.sigma_at(float(x)) for x in np.asarray(t, dtype=np.float64)])

    def timestep(self, sigma: float) -> float:
        """The model's timestep for noise level σ ≥ 0 (a float).

        Linear in log σ between trained steps, exact at them; 0 below the smallest trained σ
        (including σ = 0) and T−1 above the largest. Between the last finite level and σ = ∞ of
        a zero-terminal-SNR schedule (where log σ has no finite end) it is linear in the signal
        scale α = 1/√(1+σ²), which falls to 0 there.
        """
        if sigma != sigma:  # NaN fails every comparison below
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        if sigma <= self._sigma_list[0]:
            if sigma < 0:
                raise ValueError(f"sigma must be >= 0, got {sigma}")
            return 0.0
        if sigma >= self._sigma_list[-1]:
            return float(self.num_train_timesteps - 1)
        ls = math.log(sigma)
        i = bisect.bisect_right(self._log_sigmas, ls) - 1
        lo, hi = self._log_sigmas[i], self._log_sigmas[i + 1]
        if hi == math.inf:
            return i + 1.0 - math.sqrt((1.0 + self._sigma_list[i] ** 2) / (1.0 + sigma * sigma))
        return i + (ls - lo) / (hi - lo)

    def timesteps(self, sigmas: ArrayLike) -> np.ndarray:
        """:meth:`timestep` for each σ."""
        return np.array([self.timestep(float(s)) for s in np.asarray(sigmas, dtype=np.float64)])

    def __repr__(self) -> str:
        zero = ", zero terminal SNR" if self.zero_terminal_snr else ""
        return (f"Schedule(T={self.num_train_timesteps}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g}{zero})")


class _ContinuousSchedule(Schedule):
    """A schedule whose model time is a closed-form function of σ (valid for every σ ≥ 0).

    The discrete table (``alphas_cumprod``, ``sigmas``) holds the trained noise levels as their
    variance-preserving equivalents ᾱ = 1/(1+σ²), so that the named grids (``trailing``,
    ``karras``, ...) and ``sigma_min``/``sigma_max`` mean what they mean for VP; the model
    itself is fed :meth:`alpha` · x̄ and :meth:`timestep`, both closed form.
    """

    def __init__(self, level_sigmas: np.ndarray) -> None:
        super().__init__(1.0 / (1.0 + level_sigmas.astype(np.float64) ** 2))

    def _time(self, sigma: float) -> float:
        raise NotImplementedError  # abstract

    def _sigma(self, t: float) -> float:
        raise NotImplementedError  # abstract

    def _time_range(self) -> tuple[float, float]:
        raise NotImplementedError  # abstract

    def timestep(self, sigma: float) -> float:
        """The model's time for noise level σ ≥ 0, in closed form (no interpolation)."""
        if not sigma >= 0:
            raise ValueError(f"sigma must be >= 0, got {sigma}")
        return self._time(float(sigma))

    def sigma_at(self, t: float | ArrayLike) -> float | np.ndarray:
        """σ at the model's time t (the inverse of :meth:`timestep`)."""
        if np.ndim(t) == 0:
            lo, hi = self._time_range()
            t = float(t)
            if not lo <= t < hi:
                raise ValueError(f"time t={t} is outside this schedule's [{lo}, {hi})")
            return self._sigma(t)
        return np.array([self.sigma_at(float(x)) for x in np.asarray(t, dtype=np.float64)])


class FlowMatchingSchedule(_ContinuousSchedule):
    """Rectified flow (Liu et al., "Flow Straight and Fast", 2022; Esser et al., "Scaling Rectified
    Flow Transformers for High-Resolution Image Synthesis" (SD3), 2024): x = (1−t)·x₀ + t·ε.

    With σ = t/(1−t) and x̄ = x/(1−t) this is the σ-ODE dx̄/dσ = ε; the model sees
    x = x̄/(1+σ) and the time ``T·t`` = T·σ/(1+σ) (diffusers' FlowMatchEulerDiscreteScheduler
    feeds ``sigma·num_train_timesteps``). Its velocity v = dx/dt = ε − x₀ gives
    ε = x + (1−t)·v = (x̄ + v)/(1+σ).

    SD3's time shift t ↦ shift·t/(1 + (shift−1)·t) is σ ↦ shift·σ: a shifted grid is the
    unshifted one scaled. The trained levels (the table) are diffusers' t_i = shift(i/T),
    i = 1 … T−1; t = 1 (σ = ∞, pure noise) is left out, as no grid can start at σ = ∞: a
    sampler starting from pure noise takes its first step with
    :meth:`flowdiff.ProbabilityFlow.step_from_noise`.
    """

    kind = "flow_matching"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        _check_T(num_train_timesteps)
        if isinstance(shift, (bool, np.bool_)) or not isinstance(shift, numbers.Real) \
                or not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"shift must be a finite number > 0, got {shift!r}")
        self.train_steps = num_train_timesteps
        self.shift = float(shift)
        u = np.arange(1, num_train_timesteps, dtype=np.float64) / num_train_timesteps
        super().__init__(self.shift * u / (1.0 - u))  # σ of the shifted levels: shift · u/(1−u)

    def _time(self, sigma: float) -> float:
        if sigma == math.inf:
            return float(self.train_steps)
        return self.train_steps * sigma / (1.0 + sigma)

    def _sigma(self, t: float) -> float:
        return t / (self.train_steps - t)

    def _time_range(self) -> tuple[float, float]:
        return 0.0, float(self.train_steps)

    def alpha(self, sigma: float) -> float:
        """x = (1−t)·x̄ = x̄/(1+σ)."""
        return 1.0 / (1.0 + sigma)

    def velocity_coefficients(self, sigma: float) -> tuple[float, float]:
        """ε = (x̄ + v)/(1+σ) for v = dx/dt = ε − x₀."""
        a = 1.0 / (1.0 + sigma)
        return a, a

    def __repr__(self) -> str:
        return (f"FlowMatchingSchedule(T={self.train_steps}, shift={self.shift:g}, sigma_min={self.sigma_min:.4g}, "
                f"sigma_max={self.sigma_max:.4g})")


class VESchedule(_ContinuousSchedule):
    """Variance exploding, x = x₀ + σ·ε (Song & Ermon's NCSN; EDM's preconditioned form):
    α = 1, so the model sees x̄ itself and the ODE is dx̄/dσ = ε directly.

    ``time`` is what the model is fed: ``"sigma"`` (σ itself, as diffusers' ScoreSdeVe models)
    or ``"log_sigma"`` (EDM's c_noise = ¼·ln σ; below ``sigma_min``, e.g. at σ = 0, it is
    fed ¼·ln σ_min, as a VP schedule feeds timestep 0 there). The table is ``num_levels``
    geometric levels in [σ_min, σ_max]. Its velocity v = dx/dσ is ε itself.
    """

    kind = "ve"
    TIMES = ("sigma", "log_sigma")

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, num_levels: int = 1000,
                 time: str = "log_sigma") -> None:
        sigma_min, sigma_max = _real_number(sigma_min, "sigma_min"), _real_number(sigma_max, "sigma_max")
        if not (0 < sigma_min < sigma_max < math.inf):
            raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got {sigma_min}, {sigma_max}")
        if time not in self.TIMES:
            raise ValueError(f"unknown time {time!r}; accepted: {', '.join(self.TIMES)}")
        _check_T(num_levels, "num_levels")
        self.time = time
        super().__init__(np.geomspace(sigma_min, sigma_max, num_levels))

    def _time(self, sigma: float) -> float:
        if self.time == "sigma":
            return sigma
        return 0.25 * math.log(max(sigma, self.sigma_min))

    def _sigma(self, t: float) -> float:
        return t if self.time == "sigma" else math.exp(4.0 * t)

    def _time_range(self) -> tuple[float, float]:
        # ¼·ln σ is σ's for every σ > 0: a time below ¼·ln σ_min (the floor fed below σ_min, rounded down to float32
        # as a model receives it) is a σ just under σ_min, not an error
        return (0.0, math.inf) if self.time == "sigma" else (-math.inf, math.inf)

    def alpha(self, sigma: float) -> float:
        return 1.0

    def velocity_coefficients(self, sigma: float) -> tuple[float, float]:
        return 0.0, 1.0

    def __repr__(self) -> str:
        return f"VESchedule(sigma_min={self.sigma_min:.4g}, sigma_max={self.sigma_max:.4g}, time={self.time!r})"


def rescale_zero_terminal_snr(alphas_cumprod: ArrayLike) -> np.ndarray:
    """ᾱ rescaled to zero terminal SNR (Lin et al., "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", WACV 2024, Algorithm 1): √ᾱ is shifted so that its last value is 0 and
    scaled so that its first is kept,

        √ᾱ'_t = (√ᾱ_t − √ᾱ_{T−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{T−1}),

    so that the last timestep is pure noise (σ = ∞) and the model can be trained, and sampled,
    from there. In float64; diffusers' ``rescale_betas_zero_snr=True`` does the same on its betas.
    """
    acp = _as_float64(alphas_cumprod, "alphas_cumprod")
    root = np.sqrt(acp)
    first, last = root[0], root[-1]
    if not first > last:
        raise ValueError("alphas_cumprod must decrease to rescale it to zero terminal SNR")
    rescaled = (root - last) * (first / (first - last))
    rescaled[-1] = 0.0
    return rescaled**2


def _check_T(num_train_timesteps: int, name: str = "num_train_timesteps") -> None:
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"{name} must be an int >= 2, got {num_train_timesteps!r}")


def _real_number(value: object, name: str) -> float:
    """A real number (a Python or NumPy int or float, or a 0-d real tensor; not a bool or a string) as a float, else a
    TypeError naming it."""
    if isinstance(value, torch.Tensor) and value.ndim == 0 and (value.is_floating_point() or value.dtype in (
            torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)):
        return float(value.item())
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number (an int or float), got {value!r} of type {type(value).__name__}")
    return float(value)


def as_schedule(schedule: Schedule | ArrayLike | None, *, name: str = "alphas_cumprod") -> Schedule:
    """A Schedule from a Schedule, or from ᾱ values."""
    if isinstance(schedule, Schedule):
        return schedule
    if schedule is None:
        raise TypeError(f"{name} is required: a flowdiff.Schedule or a 1-D sequence of ᾱ values")
    return Schedule(schedule)
