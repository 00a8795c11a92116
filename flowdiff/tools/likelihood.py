"""Log-likelihoods of images through the probability-flow ODE (instantaneous change of variables).

In flowdiff's variables the flow is dx̄/dσ = ε(x̄, σ) with the image x̄(0). Along a trajectory
the marginal densities p_σ that the flow transports obey (Chen et al., "Neural Ordinary
Differential Equations", 2018, Theorem 1; Song et al., "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR 2021, App. D.2)

    d log p_σ(x̄(σ)) / dσ = −div_x̄ ε(x̄(σ), σ),

so the image's log-density is a prior term plus an ODE term,

    log p_0(x̄(0)) = log p_{σ_max}(x̄(σ_max)) + ∫₀^{σ_max} div_x̄ ε(x̄(σ), σ) dσ.

The augmented state [x̄, ∫div] is integrated from σ = 0 to σ_max, in the time variable
τ = log(σ + c) (relative steps where σ ≫ c; σ = 0 is the finite point log c, reached with no
division by σ), with the field (σ + c)·[ε, div ε].

**The prior.** p_{σ_max} = p_data ∗ N(0, σ_max²I). flowdiff's generator starts from DDIM's
x_T ~ N(0, I), i.e. x̄ ~ N(0, (1 + σ_max²)I): with the defaults ``data_mean=0``,
``data_var=1`` that is the prior, and ``log_prob`` is then *exactly* the density of what
:func:`flowdiff.generate` samples (up to the solve's error). Against the data's true p_0 (a
closed-form model, or a trained model that has learnt its data) the Gaussian N(m, (v + σ²)I)
with the data's mean m and per-pixel variance v matches p_{σ_max}'s first two moments (for
data with isotropic covariance; per-pixel v otherwise captures the diagonal). The remaining
mismatch, for Gaussian data of covariance Σ: the log-density at x̄ = μ + σ_max·z is off by
about zᵀ(Σ − diag v)z/(2σ_max²) (zero mean, standard deviation ‖Σ − diag v‖_F/(√2·σ_max²)) plus
terms of order 1/σ_max⁴ and the data's higher cumulants over σ_max⁴ — ~1e-4 nats for the
digits (σ_max = 157, ‖Σ − diag v‖_F/σ_max² = 1.7e-4). The VP prior instead (m = 0, v = 1) is off
by about −μ·z/σ_max + Σᵢ(vᵢ − 1)/(2σ_max²) nats per sample (μ the data mean, z the latent noise):
a spread of |μ|/σ_max = 0.033 nats for the digits. That difference is a statement about the model's
prior, not the solve.

**Divergences** (``divergence=``): ``"exact"`` is the trace of the Jacobian from D
vector–Jacobian products (``torch.func.vjp``, one forward pass shared by all of them,
vectorised with ``torch.func.vmap`` in chunks of ``chunk`` rows; tr J = tr Jᵀ);
``"hutchinson"`` is vᵀ(∂ε/∂x̄)v with ``probes`` Rademacher or Gaussian vectors v fixed along
the solve (Hutchinson 1989; Grathwohl et al., "FFJORD", 2019); ``"hutch++"`` (Meyer, Musco,
Musco & Woodruff, "Hutch++: Optimal Stochastic Trace Estimation", 2021) takes the trace
exactly on the span Q of the (shifted) Jacobian applied to ``sketch`` fixed vectors and
Hutchinson's estimate on the rest, tr(QᵀJQ) + g̃ᵀJg̃ with g̃ = (I − QQᵀ)g (see
:class:`_HutchPlusPlus` for the shift by α·I that makes the sketch see a diffusion model's
low-rank part). The trajectory x̄(σ) does not depend on the probes, so each probe gives its
own unbiased ODE term ℓⱼ; ``log_prob`` uses their mean and ``std_error`` is their standard
deviation over √probes (for Hutch++ conditional on the sketch, under which it is unbiased).

**Counting.** ``stats.nfe`` counts model evaluations on the batch, each vector–Jacobian
product one (as k-diffusion counts its one VJP a step; the forward pass they need is shared):
per field evaluation D for ``"exact"``, ``probes`` for ``"hutchinson"``, 2·``sketch`` +
``probes`` for ``"hutch++"``. ``stats.extra`` has ``field_evals`` (the solver's count of
augmented-field evaluations) and ``model_calls`` (forward passes: one per field evaluation and
piece of ``chunk`` samples).

**Bits per dimension.** ``bits_per_dim = −log_prob/(D ln 2) + offset``. For data quantized to
``dequantize = K`` levels over the model's range [−1, 1] (lattice spacing Δ = 2/(K − 1)), the
images are first dequantized uniformly, ỹ = y + Δ·(u − ½) with u ~ U[0, 1)^D, and
offset = −log₂ Δ: then bits/dim bounds the discrete data's code length (Theis et al., "A note
on the evaluation of generative models", 2016; Ho et al., "DDPM", 2020). For 8-bit images
(K = 256, y = k/127.5 − 1) the offset is log₂ 127.5 = 6.994 bits; the convention of Song et
al.'s code, which maps (k + u)/256 to [−1, 1), adds 7. Without ``dequantize`` the offset is 0
and bits/dim is the continuous density's (it can be negative).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import SolveError, Solver, Stats, StepController

from ..engine.flow import ProbabilityFlow
from ..engine.formulations import variables_of
from ..engine.grids import MAX_STEPS

DIVERGENCES = ("exact", "hutchinson", "hutch++")
PROBE_NOISES = ("rademacher", "gaussian")

#: Defaults of the adaptive solve (image-scale tolerances; the log-density column in nats).
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_PROBES = {"hutchinson": 8, "hutch++": 8}
#: Steps of at most 1 in log(σ + c) (σ + c grows by at most e per step), as flowdiff's adaptive generate.
CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=10.0, max_step=1.0)


@dataclass
class Likelihood:
    """The log-density of each image and its parts (float64 tensors of shape (batch,)).

    ``log_prob = prior + delta``: ``prior`` is log N(x̄(σ_max); m, (v + σ_max²)I) and ``delta``
    the ODE term ∫₀^{σ_max} div ε dσ (mean over probes). ``std_error`` (stochastic divergences
    with ≥ 2 probes, else ``None``) is the standard error of ``log_prob`` from the probes;
    ``per_probe`` the ODE term of each probe, shape (batch, probes). ``offset_bits`` is what
    dequantization added to ``bits_per_dim``. ``latent`` is x̄(σ_max) in DDIM's scale
    (x̄/√(1 + σ_max²)), in the images' dtype.
    """

    log_prob: Tensor
    prior: Tensor
    delta: Tensor
    bits_per_dim: Tensor
    std_error: Tensor | None
    per_probe: Tensor | None
    dim: int
    offset_bits: float
    divergence: str
    latent: Tensor
    stats: Stats = field(default_factory=Stats)

    @property
    def bits_per_dim_std_error(self) -> Tensor | None:
        """The standard error of ``bits_per_dim`` (``std_error`` / (D ln 2))."""
        return None if self.std_error is None else self.std_error / (self.dim * math.log(2))

    def mean_bits_per_dim(self) -> tuple[float, float | None]:
        """The batch's mean bits/dim and its standard error over the batch and the probes together.

        The error is the spread of the per-image values over √batch (the sampling error of the
        mean over images, which contains the probes' noise); ``None`` for a batch of one.
        """
        bpd = self.bits_per_dim
        n = bpd.numel()
        return float(bpd.mean()), (float(bpd.std() / math.sqrt(n)) if n > 1 else None)


# -- divergence estimators ------------------------------------------------------------------------

class _Jacobian:
    """ε(x̄, σ) on a piece of the batch, and products of the transposed Jacobian (∂ε/∂x̄)ᵀ·v with it.

    Reverse mode: one forward pass per piece (``torch.func.vjp``) serves every vector, and the
    vector–Jacobian products are vectorised over the vectors with ``torch.func.vmap``, at most
    ``chunk`` rows (vectors × samples) at a time. (Forward-mode JVPs cost 10–40× a forward pass
    of the closed-form models in torch 2.13, whose forward-mode rules for softmax and friends are
    Python decompositions; a VJP costs ~3.) Traces are the same for J and Jᵀ. A model that vmap
    cannot trace is given the vectors one at a time (same values; ``stats.extra["vjp"]``).
    ``rows`` counts vector–Jacobian products row by row (NFE = rows / batch), ``calls`` forward
    passes of the model.
    """

    def __init__(self, eps: Callable[..., Tensor], shape: tuple[int, ...], chunk: int) -> None:
        self.eps = eps
        self.shape = shape
        self.chunk = chunk
        self.rows = 0
        self.calls = 0
        self.mode = "vmap"

    def linearize(self, sigma: float, xbar: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """ε at the rows ``xbar`` (b, D) and ``apply(v)``: (m, b, D) vectors → (∂ε/∂x̄)ᵀ·v, (m, b, D)."""
        b, dim = xbar.shape
        with torch.enable_grad():
            out, pullback = torch.func.vjp(lambda inp: self.eps(sigma, inp), xbar.reshape(b, *self.shape))
        self.calls += 1
        per = max(1, self.chunk // b)

        def apply(vectors: Tensor) -> Tensor:
            m = vectors.shape[0]
            parts = []
            for j0 in range(0, m, per):
                v = vectors[j0:j0 + per].reshape(-1, b, *self.shape)
                parts.append(self._pull(pullback, v).reshape(-1, b, dim))
            self.rows += m * b
            return torch.cat(parts)

        return out.reshape(b, dim), apply

    def _pull(self, pullback: Callable[..., tuple[Tensor]], v: Tensor) -> Tensor:
        if self.mode == "vmap":
            try:
                return torch.func.vmap(pullback)(v)[0]
            except RuntimeError as err:
                if "vmap" not in str(err) and "functorch" not in str(err) and "Batched" not in str(err):
                    raise
                self.mode = "looped"
        return torch.stack([pullback(vi)[0] for vi in v])


class _Exact:
    """tr(∂ε/∂x̄) = Σᵢ eᵢᵀ(∂ε/∂x̄)ᵀeᵢ over the D basis vectors, a chunk of them at a time."""

    columns = 1

    def __init__(self, dim: int, chunk: int) -> None:
        self.dim, self.chunk = dim, chunk
        self.cost = dim

    def __call__(self, apply: Callable[[Tensor], Tensor], rows: slice, b: int, like: Tensor) -> Tensor:
        per = max(1, self.chunk // b)
        div = like.new_zeros(b)
        for i0 in range(0, self.dim, per):
            idx = torch.arange(i0, min(self.dim, i0 + per), device=like.device)
            m = torch.arange(idx.numel(), device=like.device)
            basis = like.new_zeros(idx.numel(), b, self.dim)
            basis[m, :, idx] = 1.0
            div += apply(basis)[m, :, idx].sum(0)
        return div[:, None]


class _Hutchinson:
    """vⱼᵀ(∂ε/∂x̄)vⱼ for fixed probes vⱼ, one column per probe."""

    def __init__(self, probes: Tensor) -> None:
        self.probes = probes
        self.columns = self.cost = probes.shape[0]

    def __call__(self, apply: Callable[[Tensor], Tensor], rows: slice, b: int, like: Tensor) -> Tensor:
        v = self.probes[:, rows]
        return (v * apply(v)).sum(2).T


class _HutchPlusPlus:
    """Hutch++ on the shifted Jacobian J − αI: αD + tr(Qᵀ(J − αI)Q) + g̃ⱼᵀ(J − αI)g̃ⱼ.

    A diffusion model's ∂ε/∂x̄ = (I − ∂D/∂x̄)/σ is a multiple of I plus a denoiser Jacobian of
    low effective rank, while Hutch++'s plain sketch J·S would span mostly S itself. The shift
    α, the sketch vectors' mean Rayleigh quotient sᵀJs/|s|², takes out the bulk: Q, an
    orthonormal basis of (J − αI)·S, then captures the low-rank part, and the residual probes
    g̃ⱼ = (I − QQᵀ)gⱼ see little but the rest. tr(J) = αD + tr(J − αI) for every α; α and Q
    depend on the sketch only, so each column is unbiased given the sketch. (Run on Jᵀ, whose
    trace is J's: the products are vector–Jacobian products.)
    """

    def __init__(self, sketch: Tensor, probes: Tensor) -> None:
        self.sketch, self.probes = sketch, probes
        self.columns = probes.shape[0]
        self.cost = 2 * sketch.shape[0] + probes.shape[0]

    def __call__(self, apply: Callable[[Tensor], Tensor], rows: slice, b: int, like: Tensor) -> Tensor:
        s = self.sketch[:, rows]                                        # (k, b, D)
        k, dim = s.shape[0], s.shape[2]
        js = apply(s)
        alpha = ((s * js).sum(2) / (s * s).sum(2)).mean(0)              # (b,)
        q = torch.linalg.qr((js - alpha[None, :, None] * s).permute(1, 2, 0)).Q   # (b, D, k)
        g = self.probes[:, rows].permute(1, 2, 0)                       # (b, D, n)
        g_res = g - q @ (q.transpose(1, 2) @ g)
        vectors = torch.cat([q.permute(2, 0, 1), g_res.permute(2, 0, 1)])
        quad = (vectors * apply(vectors)).sum(2)                        # vᵀJv, (k + n, b)
        low = quad[:k].sum(0) - alpha * k                               # tr(Qᵀ(J − αI)Q)
        residual = quad[k:].T - alpha[:, None] * (g_res * g_res).sum(1)  # g̃ᵀ(J − αI)g̃, (b, n)
        return (alpha * dim + low)[:, None] + residual


# -- validation -----------------------------------------------------------------------------------

def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def _check_tol(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (batch, ...), got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] < 1 or images[0].numel() < 1:
        raise ValueError(f"images must have shape (batch, ...) with batch >= 1 and at least one value per "
                         f"sample, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (the model's data scale), got {images.dtype}")
    finite = torch.isfinite(images.reshape(images.shape[0], -1)).all(1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).reshape(-1).tolist()
        raise ValueError(f"images must be finite; sample(s) {bad[:10]} hold NaN or inf")
    return images


def _per_pixel(name: str, value: object, shape: tuple[int, ...], *, positive: bool) -> Tensor:
    """A scalar or a tensor broadcastable to one image, as float64 of shape (D,)."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
        t = torch.broadcast_to(t.cpu(), shape).reshape(-1)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"{name} must be a number or a tensor broadcastable to one image {shape}, "
                         f"got {value!r}") from None
    if not bool(torch.isfinite(t).all()) or (positive and bool((t < 0).any())):
        raise ValueError(f"{name} must be finite{' and >= 0' if positive else ''}, got {value!r}")
    return t


def _dequantize(images: Tensor, levels: object, generator: torch.Generator | None) -> tuple[Tensor, float]:
    """Uniform dequantization on the lattice of ``levels`` values over [−1, 1]; returns ỹ and −log₂ Δ."""
    if isinstance(levels, bool) or not isinstance(levels, int) or levels < 2:
        raise ValueError(f"dequantize must be None or the number of quantization levels over [-1, 1] "
                         f"(an int >= 2; 256 for 8-bit images), got {levels!r}")
    delta = 2.0 / (levels - 1)
    k = (images.double() + 1.0) / delta
    off = (k - k.round()).abs().max()
    if float(off) > 1e-3 or float(k.min()) < -1e-3 or float(k.max()) > levels - 1 + 1e-3:
        raise ValueError(f"dequantize={levels}: the images are not on the {levels}-level lattice of [-1, 1] "
                         f"(spacing {delta:.6g}; largest distance {float(off) * delta:.3g}); pass the images as "
                         "quantized, or dequantize=None for the continuous density")
    u = torch.rand(images.shape, dtype=torch.float64, generator=generator).to(images.device)
    return (images.double() + delta * (u - 0.5)).to(images.dtype), -math.log2(delta)


def _draw(noise: str, n: int, batch: int, dim: int, generator: torch.Generator | None) -> Tensor:
    if noise == "rademacher":
        return torch.randint(0, 2, (n, batch, dim), generator=generator).double() * 2 - 1
    return torch.randn(n, batch, dim, dtype=torch.float64, generator=generator)


# -- the solve -----------------------------------------------------------------------------------

def log_likelihood(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str | Solver = "dopri5",
    rtol: float | None = None,
    atol: float | None = None,
    steps: int | None = None,
    divergence: str = "exact",
    probes: int | None = None,
    sketch: int | None = None,
    noise: str = "rademacher",
    generator: torch.Generator | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    dequantize: int | None = None,
    data_mean: float | Tensor = 0.0,
    data_var: float | Tensor = 1.0,
    sigma_c: float | None = None,
    chunk: int = 4096,
    max_nfe: int | None = None,
    check_finite: bool = True,
) -> Likelihood:
    """The log-density (nats) of each image under the flow's distribution at σ = 0, and its bits/dim.

    ``images`` (batch, ...) are in the model's data scale (the image x̄ at σ = 0). The augmented
    ODE d[x̄, ℓ]/dσ = [ε, div ε] runs from σ = 0 to σ_max (see the module docstring for the
    equations, the prior and the estimators):

    * adaptive (default): ``solver`` any embedded pair (``solvers.available(adaptive=True)``), in
      τ = log(σ + c); a step is accepted when, for every sample, the RMS over pixels of the
      state's error on the image scale x = x̄/√(1+σ²) is ≤ ``atol + rtol·|x|``, and each
      log-density column's error (nats) is ≤ ``atol + rtol·|ℓ|``. The defaults (1e-5) came
      within 0.027 nats at worst of the exact log-density of a 256-dimensional closed-form
      mixture (mean 0.010; ``benchmarks/results/likelihood.md``); 1e-4 within 0.05 on average
      but up to 0.5 at worst.
    * ``steps=N``: a fixed grid of N steps uniform in τ with any σ-variable solver (``rk4``,
      ``heun``, ``ipndm``, ...).

    ``divergence``: ``"exact"``, ``"hutchinson"`` or ``"hutch++"``; ``probes`` (default 8) the
    stochastic estimators' probes, drawn once from ``generator`` (``noise``: ``"rademacher"`` or
    ``"gaussian"``); ``sketch`` Hutch++'s sketch size (default ``probes``). ``chunk`` bounds the
    rows (samples × vectors) of one batched vector–Jacobian product (memory). ``dequantize=K``
    (levels over [−1, 1]; 256 for 8-bit images) adds uniform dequantization noise from
    ``generator`` and its offset −log₂(2/(K−1)) to bits/dim. ``data_mean``/``data_var`` (scalars
    or per-pixel tensors) set the prior N(m, (v + σ_max²)I); the defaults are the VP prior that
    :func:`flowdiff.generate` samples. ``max_nfe`` bounds model evaluations (VJPs included).
    """
    start = time.perf_counter()
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    images = _check_images(images)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; accepted: {', '.join(DIVERGENCES)}")
    if noise not in PROBE_NOISES:
        raise ValueError(f"unknown noise {noise!r} for the probes; accepted: {', '.join(PROBE_NOISES)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    chunk = _check_int("chunk", chunk, 1)
    shape = tuple(images.shape[1:])
    batch, dim = images.shape[0], images[0].numel()
    if divergence == "exact":
        if probes is not None or sketch is not None:
            raise ValueError(f"probes= and sketch= apply to the stochastic divergences (hutchinson, hutch++), "
                             f"not divergence='exact'; got probes={probes!r}, sketch={sketch!r}")
    else:
        probes = _check_int("probes", DEFAULT_PROBES[divergence] if probes is None else probes, 1)
        if divergence == "hutchinson" and sketch is not None:
            raise ValueError(f"sketch= applies to divergence='hutch++' only, got sketch={sketch!r}")
        if divergence == "hutch++":
            sketch = _check_int("sketch", probes if sketch is None else sketch, 1)
            if sketch > dim:
                raise ValueError(f"sketch must be <= the dimension D={dim}, got {sketch}")
    solver_obj = solvers.get(solver)
    if variables_of(solver_obj) != "sigma":
        raise ValueError(f"solver {solver_obj.name!r} runs in the flow's {variables_of(solver_obj)!r} variables, "
                         "which carry no log-density; use a σ-variable solver, e.g. dopri5, bosh3, rk4, heun, "
                         "ipndm")
    if steps is None:
        if not solver_obj.adaptive:
            raise ValueError(f"solver {solver_obj.name!r} has no error estimate: give steps=N for a fixed grid, or "
                             f"an adaptive solver ({', '.join(solvers.available(adaptive=True))})")
        rtol = _check_tol("rtol", DEFAULT_RTOL if rtol is None else rtol)
        atol = _check_tol("atol", DEFAULT_ATOL if atol is None else atol)
        if rtol == 0 and atol == 0:
            raise ValueError("rtol and atol cannot both be 0")
    else:
        steps = _check_int("steps", steps, 1)
        if steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS:,} (flowdiff.engine.grids.MAX_STEPS), got {steps:,}")
        if rtol is not None or atol is not None:
            raise ValueError(f"rtol=/atol= set an adaptive solve; steps={steps} sets a fixed grid: give one of them")
    if max_nfe is not None:
        max_nfe = _check_int("max_nfe", max_nfe, 1)
    schedule = flow.schedule
    s_max = float(schedule.sigma_max)
    c = float(schedule.sigma_min) if sigma_c is None else sigma_c
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not (math.isfinite(c) and 0 < c < s_max):
        raise ValueError(f"sigma_c must be a number in (0, σ_max={s_max:.6g}), got {sigma_c!r}")
    c = float(c)
    mean = _per_pixel("data_mean", data_mean, shape, positive=False)
    var = _per_pixel("data_var", data_var, shape, positive=True)

    offset = 0.0
    if dequantize is not None:
        images, offset = _dequantize(images, dequantize, generator)
    dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    device = images.device
    xbar0 = images.to(dtype).reshape(batch, dim)

    jac = _Jacobian(flow.field(model_kwargs, model_dtype), shape, chunk)
    if divergence == "exact":
        estimator: Any = _Exact(dim, chunk)
    elif divergence == "hutchinson":
        estimator = _Hutchinson(_draw(noise, probes, batch, dim, generator).to(device, dtype))
    else:
        s = _draw(noise, sketch, batch, dim, generator).to(device, dtype)
        estimator = _HutchPlusPlus(s, _draw(noise, probes, batch, dim, generator).to(device, dtype))
    k = estimator.columns

    tau_zero, tau_max = math.log(c), math.log(s_max + c)

    def sigma_of(tau: float) -> float:
        return 0.0 if tau <= tau_zero else max(math.exp(tau) - c, 0.0)

    piece = min(batch, chunk)

    def augmented(tau: float, y: Tensor) -> Tensor:
        sigma = sigma_of(tau)
        out = []
        for b0 in range(0, batch, piece):
            rows = slice(b0, min(batch, b0 + piece))
            eps, apply = jac.linearize(sigma, y[rows, :dim])
            div = estimator(apply, rows, eps.shape[0], eps)
            out.append(torch.cat([eps.detach(), div.detach().to(y.dtype)], 1))
        return torch.cat(out).mul_(sigma + c)

    def norm(error: Tensor, y0: Tensor, y1: Tensor, tau: float) -> Tensor:
        s = sigma_of(tau)
        a = 1.0 / math.sqrt(1.0 + s * s)
        img = (error[:, :dim] * a).abs() / (y1[:, :dim].abs() * (rtol * a) + atol)
        img = img.pow(2).mean(1).sqrt()
        lp = error[:, dim:].abs() / (y1[:, dim:].abs() * rtol + atol)
        return torch.maximum(img, lp.amax(1)).max()

    y0 = torch.cat([xbar0, xbar0.new_zeros(batch, k)], 1)
    with torch.no_grad():
        try:
            if steps is None:
                budget = None if max_nfe is None else max(1, max_nfe // estimator.cost)
                sol = solvers.solve_adaptive(augmented, y0, tau_zero, tau_max, solver_obj, rtol=rtol, atol=atol,
                                             norm=norm, controller=CONTROLLER, max_nfe=budget,
                                             check_finite=check_finite, time_name="log(σ+c)")
            else:
                cost = solvers.nfe_for_steps(solver_obj, steps) * estimator.cost
                if max_nfe is not None and cost > max_nfe:
                    raise ValueError(f"max_nfe={max_nfe}: {steps} steps of {solver_obj.name} cost {cost} model "
                                     f"evaluations ({estimator.cost} per field evaluation); raise max_nfe or "
                                     "use fewer steps")
                ts = np.linspace(tau_zero, tau_max, steps + 1)
                sol = solvers.solve(augmented, y0, ts, solver_obj, check_finite=check_finite, time_name="log(σ+c)")
        except SolveError as err:
            if err.stats is not None:
                err.stats.extra.update(field_evals=err.stats.nfe, model_calls=jac.calls, vjp=jac.mode)
                err.stats.nfe = jac.rows // batch
            raise
    y = sol.y
    xbar_max = y[:, :dim].double()
    total_var = var.to(device) + s_max * s_max
    prior = -0.5 * (((xbar_max - mean.to(device)) ** 2 / total_var).sum(1)
                    + torch.log(2 * math.pi * total_var).sum())
    per_probe = y[:, dim:].double()
    delta = per_probe.mean(1)
    log_prob = prior + delta
    std_error = None
    if divergence != "exact" and k > 1:
        std_error = per_probe.std(1) / math.sqrt(k)
    bpd = -log_prob / (dim * math.log(2)) + offset
    stats = sol.stats
    stats.extra.update(field_evals=stats.nfe, model_calls=jac.calls, vjp=jac.mode)
    stats.nfe = jac.rows // batch
    stats.wall_time = time.perf_counter() - start
    latent = (y[:, :dim] / math.sqrt(1.0 + s_max * s_max)).reshape(batch, *shape).to(images.dtype)
    return Likelihood(log_prob, prior, delta, bpd, std_error, None if divergence == "exact" else per_probe,
                      dim, offset, divergence, latent, stats)


__all__ = ["DIVERGENCES", "Likelihood", "log_likelihood"]
