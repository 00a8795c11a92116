"""Log-likelihoods of images through the probability-flow ODE (instantaneous change of variables).

In flowdiff's variables the flow is dx̄/dσ = ε(x̄, σ) with the image x̄(0). Along a trajectory
the marginal densities p_σ that the flow transports obey (Chen et al., "Neural Ordinary
Differential Equations", 2018, Theorem 1; Song et al., "Score-Based Generative Modeling
through Stochastic Differential Equations", ICLR 2021, App. D.2)

    d log p_σ(x̄(σ)) / dσ = −div_x̄ ε(x̄(σ), σ),

so the image's log-density is a prior term plus an ODE term,

    log p_0(x̄(0)) = log p_{σ_max}(x̄(σ_max)) + ∫₀^{σ_max} div_x̄ ε(x̄(σ), σ) dσ.

The augmented state [x̄, ∫div] is integrated from σ = 0 to σ_max in the variables the engine
picks for it (``formulation_for(solver, "encode", augmented=True, sigma_c=c)``: the time
τ = log(σ + c), relative steps where σ ≫ c, σ = 0 the finite point log c reached with no
division by σ), with the field (σ + c)·[ε, div ε] that its ``augmented_field`` makes of the
σ-field [ε, div ε]; its ``uniform_grid`` places the steps of ``steps=N`` and its ``x_factor``
gives the error norm's image scale. The log-density column is this module's own.

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

**Divergences** (``estimator=flowdiff.Trace(method=...)``): ``"auto"`` (default) is ``"exact"`` up to
D = 256 and ``"hutch++"`` (sketch 32, probes 16: 80 products per evaluation, whatever D) beyond,
so that the cost stays bounded as the dimension grows. ``"exact"`` is the trace of the Jacobian from D
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

**Counting.** ``stats`` are the solve's own: ``stats.nfe`` counts evaluations of the
augmented field (each one forward pass of the model on the batch, and the estimator's products
with it). ``stats.extra["vjps"]`` counts the estimator's vector–Jacobian products per sample
(D a field evaluation for ``"exact"``, ``probes`` for ``"hutchinson"``, 2·``sketch`` + ``probes``
for ``"hutch++"``), ``model_calls`` forward passes (one per field evaluation and piece of
``chunk`` samples), and ``check`` the check solve's statistics.

**The error bar.** Two errors: the estimator's (its variance over the probes, ``std_error``)
and the solve's. A second solve with the same probes at 10× the tolerances and twice the largest
step (a fixed grid: half the steps) differs from the first by about the looser solve's error (the
step cap too is loosened: where the cap, not the tolerance, sets every step, two solves of one cap
took the same steps and measured an error of exactly 0), which, where the error
falls with the tolerance, bounds the tighter one's; ``solve_error`` is that difference and
``error`` = √(std_error² + solve_error²). The check solve costs less than the first (~0.6× on
the closed-form mixtures). For one image the two solves' errors can happen to agree, and their difference is then a
fraction of the error: the adaptive solve's bar is floored by a third, coarse check (100× the tolerances, four times
the step cap; ~0.6× the solve's evaluations), at its difference to the check over 10^1.5 (:data:`COARSE_FALL`).

**Bits per dimension.** ``bits_per_dim = −log_prob/(D ln 2) + offset`` for a continuous density.
Data quantized to ``dequantize = K`` levels over the model's range [−1, 1] (lattice spacing
Δ = 2/(K − 1)) have a discrete probability P(y) = ∫_cell p, and for any noise density q on
the cell, in lattice units, log P(y) ≥ D log Δ + E_q[log p(y + Δ(u − ½)) − log q(u)] (Theis et
al., "A note on the evaluation of generative models", 2016; Ho et al., "DDPM", 2020, with
uniform q; Zheng et al., "Improved Techniques for Maximum Likelihood Estimation for Diffusion
ODEs" (i-DODE), 2023, with a truncated normal). One draw of u per image gives the bound's
unbiased estimate, bits/dim = −(log p(ỹ) − log q(u))/(D ln 2) + offset, offset = −log₂ Δ: the
discrete data's code length, the figure the literature reports. ``dequantization="uniform"``
(q = 1) or ``"truncated_normal"``: u − ½ ~ N(0, (σ_min/Δ)²) truncated to the cell, i.e. noise of
the schedule's smallest level σ_min, the least the model was trained at — i-DODE's training-free
choice, there to start the ODE at σ_min; here it is the dequantization noise and the ODE starts at
σ = 0. It helps a model that is not resolved below σ_min; for a density that is flat across a
cell uniform noise is the better q (the tighter bound). For 8-bit images
(K = 256, y = k/127.5 − 1) the offset is log₂ 127.5 = 6.994 bits; the convention of Song et
al.'s code, which maps (k + u)/256 to [−1, 1), adds 7. Without ``dequantize`` the offset is 0
and bits/dim is the continuous density's (it can be negative).
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import reduce
from typing import Any

import torch
from torch import Tensor

import solvers
from solvers import SolveError, Solver, Stats, StepController

from ..engine._checks import (
    check_data_range,
    check_has_values,
    check_seed,
    model_kwargs_rows,
    refuse_removed,
)
from ..engine.flow import ProbabilityFlow
from ..engine.formulations import formulation_for
from ..engine.grids import MAX_STEPS
from ..engine.options import Adaptive, Checks

DIVERGENCES = ("auto", "exact", "hutchinson", "hutch++")
PROBE_NOISES = ("rademacher", "gaussian")
DEQUANTIZATIONS = ("uniform", "truncated_normal")

#: Defaults of the adaptive solve (image-scale tolerances; the log-density column in nats).
DEFAULT_RTOL = 1e-5
DEFAULT_ATOL = 1e-5
DEFAULT_PROBES = {"hutchinson": 16, "hutch++": 16}
DEFAULT_SKETCH = 32
#: ``Trace(method="auto")`` takes the exact trace (D products) up to this dimension, Hutch++ (2·32 + 16 = 80) beyond.
AUTO_EXACT_MAX_DIM = 256
#: The check solve's tolerances are this many times the solve's (a fixed grid: half the steps).
CHECK_FACTOR = 10.0
#: A fixed grid's bar needs the solves of N/4, N/2 and N steps in their asymptotic regime: their differences shrinking
#: by between this share of 2^p (p the method's order; at least by 2) and 2^p over it a doubling, with one sign.
REGIME_SHARE = 0.75
#: The fewest steps whose error bar a fixed grid reports (its N/4-step check solve then has 4).
MIN_REGIME_STEPS = 16
#: Steps of at most 1 in log(σ + c) (σ + c grows by at most e per step), as flowdiff's adaptive generate.
CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=10.0, max_step=1.0)
#: The check solve's: twice the step cap, so that it is looser than the solve even where the cap sets the steps.
CHECK_CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=10.0, max_step=2.0)
#: The adaptive solve's coarse check (100× the tolerances, four times the step cap): two solves whose errors happen to
#: agree for an image (their difference crossing zero) gave that image a bar of a fraction of its error (one image at
#: a time on 8-dimensional mixtures, 4–24% of the exact trace's bars missed, by up to 8 000×; sweep 18). The
#: difference of the coarse check to the check, over CHECK_FACTOR ** COARSE_FALL, floors the bar: it assumes the error
#: falls at most as tol^1.5 a decade (it fell as tol^1.2–1.6 between the checks at the median, benchmarks/RESULTS.md
#: "S21").
COARSE_CONTROLLER = StepController(safety=0.9, factor_min=0.2, factor_max=10.0, max_step=4.0)
COARSE_FALL = 1.5


@dataclass(frozen=True, eq=False)
class Trace:
    """How :func:`log_likelihood` estimates the divergence tr(∂ε/∂x̄) (see the module docstring).

    ``method``: ``"auto"`` (``"exact"`` up to D = :data:`AUTO_EXACT_MAX_DIM`, ``"hutch++"`` beyond),
    ``"exact"``, ``"hutchinson"`` or ``"hutch++"``. ``probes``: the stochastic estimators' probe
    vectors (default 16), drawn once from ``probes_from`` (``"rademacher"``, the default, or ``"gaussian"``) with
    :func:`log_likelihood`'s ``generator``; ``sketch``: Hutch++'s sketch size (default min(32, D)).
    ``chunk`` bounds the rows (samples × vectors) of one batched vector–Jacobian product (memory); a batch larger
    than ``chunk`` runs in pieces, each with its rows of the per-sample model keywords (tensors of leading size batch).
    """

    method: str = "auto"
    probes: int | None = None
    sketch: int | None = None
    probes_from: str | None = None  # rademacher unless given: given beside the exact trace, it is refused
    chunk: int = 4096

    def __post_init__(self) -> None:
        if self.method not in DIVERGENCES:
            raise ValueError(f"Trace.method {self.method!r} is unknown; accepted: {', '.join(DIVERGENCES)}")
        if self.probes_from is not None and self.probes_from not in PROBE_NOISES:
            raise ValueError(f"Trace.probes_from {self.probes_from!r} is unknown; accepted: {', '.join(PROBE_NOISES)}")
        _check_int("Trace.chunk", self.chunk, 1)
        if self.probes is not None:
            _check_int("Trace.probes", self.probes, 1)
        if self.sketch is not None:
            _check_int("Trace.sketch", self.sketch, 1)
        if self.method == "exact" and not self.probes == self.sketch == self.probes_from is None:
            raise ValueError(f"Trace.probes and Trace.sketch apply to the stochastic methods (hutchinson, hutch++), "
                             f"as does Trace.probes_from, not method='exact'; got probes={self.probes!r}, "
                             f"sketch={self.sketch!r}, probes_from={self.probes_from!r}")
        if self.method == "hutchinson" and self.sketch is not None:
            raise ValueError(f"Trace.sketch applies to method='hutch++' only, got sketch={self.sketch!r}")


#: The keywords removed from log_likelihood in 0.x, each with what says it now.
REMOVED = {
    "rtol": "adaptive=flowdiff.Adaptive(rtol=..., atol=...)",
    "atol": "adaptive=flowdiff.Adaptive(rtol=..., atol=...)",
    "max_nfe": "adaptive=flowdiff.Adaptive(..., max_nfe=...)",
    "sigma_c": "adaptive=flowdiff.Adaptive(..., sigma_c=...)",
    "divergence": "estimator=flowdiff.Trace(method=...)",
    "probes": "estimator=flowdiff.Trace(method=..., probes=...)",
    "sketch": "estimator=flowdiff.Trace(method='hutch++', sketch=...)",
    "noise": "estimator=flowdiff.Trace(..., probes_from='rademacher' or 'gaussian')",
    "chunk": "estimator=flowdiff.Trace(..., chunk=...)",
    "check_finite": "checks=flowdiff.Checks(finite=...)",
}

#: The Adaptive fields log_likelihood has no use for (its controller and σ range are its own).
_UNUSED_ADAPTIVE = ("controller", "first_step", "sigma_end", "sigma_start")


@dataclass
class Likelihood:
    """The log-density of each image and its parts (float64 tensors of shape (batch,)).

    ``log_prob = prior + delta``: ``prior`` is log N(x̄(σ_max); m, (v + σ_max²)I) and ``delta``
    the ODE term ∫₀^{σ_max} div ε dσ (mean over probes). ``std_error`` (stochastic divergences
    with ≥ 2 probes, else ``None``) is the standard error of ``log_prob`` from the probes;
    ``solve_error`` (with ``solve_check``) the difference from the check solve; ``error`` the
    error bar √(std_error² + solve_error²) of what is there (``None`` if neither is).
    ``per_probe`` is the ODE term of each probe, shape (batch, probes). With dequantization,
    ``log_prob`` is the continuous density at the dequantized images, ``log_q`` the log-density
    of their dequantization noise (in lattice units; 0 for uniform) and ``offset_bits`` =
    −log₂ Δ; ``bits_per_dim`` = −(log_prob − log_q)/(D ln 2) + offset_bits. ``latent`` is
    x̄(σ_max) in DDIM's scale (x̄/√(1 + σ_max²)), in the images' dtype.
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
    solve_error: Tensor | None = None
    error: Tensor | None = None
    dequantization: str | None = None
    log_q: Tensor | None = None

    @property
    def bits_per_dim_std_error(self) -> Tensor | None:
        """The standard error of ``bits_per_dim`` from the probes (``std_error`` / (D ln 2))."""
        return None if self.std_error is None else self.std_error / (self.dim * math.log(2))

    @property
    def bits_per_dim_error(self) -> Tensor | None:
        """The error bar of ``bits_per_dim`` (``error`` / (D ln 2)): the probes' and the solve's."""
        return None if self.error is None else self.error / (self.dim * math.log(2))

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

    def __init__(self, shape: tuple[int, ...], chunk: int) -> None:
        self.shape = shape
        self.chunk = chunk
        self.rows = 0
        self.calls = 0
        self.mode = "vmap"

    def linearize(self, eps: Callable[[float, Tensor], Tensor], sigma: float,
                  xbar: Tensor) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
        """``eps`` (the field of these rows' model keywords) at the rows ``xbar`` (b, D) and ``apply(v)``: (m, b, D)
        vectors → (∂ε/∂x̄)ᵀ·v, (m, b, D)."""
        b, dim = xbar.shape
        with torch.enable_grad():
            out, pullback = torch.func.vjp(lambda inp: eps(sigma, inp), xbar.reshape(b, *self.shape))
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

    Q spans only the directions of (J − αI)·S that stand above its rounding (:func:`_range_basis`): where the
    sketch is rank-deficient (two Rademacher vectors ±equal, likely in few dimensions) or J − αI vanishes below
    the precision (σ = 0; large σ in float32), a plain QR would fill Q with rounding noise that changes at every
    evaluation, and the adaptive solve, fed a rough field, took 260× the steps for the whole batch.
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
        # the rounding of js − αs is of the size of js and αs
        scale = (js.norm(dim=2) + alpha.abs() * s.norm(dim=2)).amax(0)  # (b,)
        q = _range_basis((js - alpha[None, :, None] * s).permute(1, 2, 0), scale)   # (b, D, k), zero columns
        kept = (q.abs().amax(1) > 0).sum(1).to(alpha.dtype)             # (b,)
        g = self.probes[:, rows].permute(1, 2, 0)                       # (b, D, n)
        g_res = g - q @ (q.transpose(1, 2) @ g)
        vectors = torch.cat([q.permute(2, 0, 1), g_res.permute(2, 0, 1)])
        quad = (vectors * apply(vectors)).sum(2)                        # vᵀJv, (k + n, b)
        low = quad[:k].sum(0) - alpha * kept                            # tr(Qᵀ(J − αI)Q)
        residual = quad[k:].T - alpha[:, None] * (g_res * g_res).sum(1)  # g̃ᵀ(J − αI)g̃, (b, n)
        return (alpha * dim + low)[:, None] + residual


def _range_basis(m: Tensor, scale: Tensor) -> Tensor:
    """An orthonormal basis of the columns of ``m`` (b, D, k) that stand above the rounding, as (b, D, k) with a
    zero column for each column of ``m`` that adds no direction.

    Gram–Schmidt, each column projected twice (CGS2) against the kept ones; a column whose remainder is at most
    √eps·``scale`` (b,) — ``scale`` the size of the rounding that made ``m`` — is dropped. Kept columns span the
    range of ``m`` whatever its rank, so the basis is a smooth function of ``m`` (QR's extra columns of a
    rank-deficient ``m`` are rounding noise).
    """
    tol = math.sqrt(torch.finfo(m.dtype).eps) * scale
    q = torch.zeros_like(m)
    for j in range(m.shape[2]):
        v = m[:, :, j]
        for _ in range(2):
            v = v - (q @ (q.transpose(1, 2) @ v[:, :, None]))[:, :, 0]
        norm = v.norm(dim=1)
        keep = norm > tol
        q[:, :, j] = torch.where(keep[:, None], v / torch.where(keep, norm, 1.0)[:, None], 0.0)
    return q


# -- validation -----------------------------------------------------------------------------------

def _check_int(name: str, value: object, low: int) -> int:
    """An int (a NumPy integer too, as ``generate``'s ``steps`` takes it) >= ``low``, returned as int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def _check_checks(checks: object) -> bool:
    """``Checks(finite=...)``; the fields log_likelihood does not use are refused unless at their defaults."""
    if checks is None:
        return True
    if not isinstance(checks, Checks):
        raise TypeError(f"checks must be a flowdiff.Checks or None, got {type(checks).__name__}")
    if checks.growth != "auto":
        raise ValueError(f"checks=Checks(growth={checks.growth!r}): log_likelihood has no divergence guard (its solve "
                         "runs to σ_max by design); it uses Checks(finite=...) only")
    if checks.model is not True:
        raise ValueError("checks=Checks(model=False): log_likelihood has no model check to turn off (that is "
                         "decode's Latent check); it uses Checks(finite=...) only")
    return checks.finite


def _check_images(images: object) -> Tensor:
    if not isinstance(images, Tensor):
        raise TypeError(f"images must be a torch.Tensor of shape (batch, ...), got {type(images).__name__}")
    if images.ndim < 2 or images.shape[0] < 1 or images[0].numel() < 1:
        raise ValueError(f"images must have shape (batch, ...) with batch >= 1 and at least one value per "
                         f"sample, got {tuple(images.shape)}")
    if not images.is_floating_point():
        raise TypeError(f"images must be a floating-point tensor (the model's data scale), got {images.dtype}")
    if images.requires_grad:  # the solve runs under no_grad: log_prob would silently carry no gradient
        raise ValueError("images require grad, but log_likelihood is not differentiable (its solves run without "
                         "autograd, and log_prob would carry no gradient); pass images.detach()")
    check_has_values(images, "images")
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


def _dequantize(images: Tensor, levels: object, kind: str, sigma_min: float,
                u: Tensor) -> tuple[Tensor, float, Tensor]:
    """Dequantization on the lattice of ``levels`` values over [−1, 1]: ỹ = y + Δ(u − ½).

    ``kind="uniform"``: u ~ U[0, 1)^D, log q(u) = 0. ``"truncated_normal"``: u − ½ ~ N(0, s²)
    truncated to [−½, ½] per pixel, s = σ_min/Δ (the schedule's smallest noise level in lattice
    units), drawn by inverting the normal CDF of ``u`` (U[0, 1) draws of the images' shape, float64), with its
    log-density log q(u) summed over pixels.
    The images may carry their dtype's rounding (float16, bfloat16: up to a quarter ulp of 1, eps/4, off the
    lattice): each is snapped to its lattice point y in float64, and ỹ is returned in float32 or the images'
    wider dtype, since a half-precision ỹ would round the noise away (bfloat16 resolves half a cell at 256 levels).
    Returns ỹ, −log₂ Δ and log q.
    """
    if isinstance(levels, bool) or not isinstance(levels, numbers.Integral) or levels < 2:
        raise ValueError(f"dequantize must be None or the number of quantization levels over [-1, 1] "
                         f"(an int >= 2; 256 for 8-bit images), got {levels!r}")
    levels = int(levels)
    delta = 2.0 / (levels - 1)
    k = (images.double() + 1.0) / delta
    off = (k - k.round()).abs().max()
    # in lattice units: 1e-3, plus the images' own rounding of a lattice point in [-1, 1] (a quarter ulp of 1)
    slack = 1e-3 + torch.finfo(images.dtype).eps / (4.0 * delta)
    if slack >= 0.5:  # any value is then within the slack of a lattice point: its level cannot be told
        raise ValueError(f"dequantize={levels}: {str(images.dtype).removeprefix('torch.')} images cannot hold the "
                         f"{levels}-level lattice of [-1, 1] (spacing {delta:.3g}; they round values near 1 by up to "
                         f"{torch.finfo(images.dtype).eps / 4:.3g}, so a pixel's level cannot be told, nor whether "
                         "the images are quantized at all): pass them in float32 or float64")
    if float(off) > slack:
        raise ValueError(f"dequantize={levels}: the images are not on the {levels}-level lattice of [-1, 1] "
                         f"(spacing {delta:.6g}; largest distance {float(off) * delta:.3g}); pass the images as "
                         "quantized, or dequantize=None for the continuous density")
    if float(k.min()) < -slack or float(k.max()) > levels - 1 + slack:
        low, high = float(images.min()), float(images.max())
        raise ValueError(f"dequantize={levels}: the images span [{low:.6g}, {high:.6g}], "
                         f"outside the lattice's range [-1, 1] (its {levels} levels, spacing {delta:.6g}, end there); "
                         "pass pixels in [-1, 1] (8-bit values v as v / 127.5 - 1), or dequantize=None for the "
                         "continuous density")
    _warn_if_coarser(k.round().long(), levels)
    batch = images.shape[0]
    if kind == "uniform":
        centred = u - 0.5
        log_q = torch.zeros(batch, dtype=torch.float64)
    else:
        std = sigma_min / delta
        normal = torch.distributions.Normal(0.0, 1.0)
        lo, hi = normal.cdf(torch.tensor(-0.5 / std)), normal.cdf(torch.tensor(0.5 / std))
        z = normal.icdf(lo + u * (hi - lo)).clamp(-0.5 / std, 0.5 / std)
        centred = z * std
        log_q = (normal.log_prob(z) - math.log(std) - torch.log(hi - lo)).reshape(batch, -1).sum(1)
    lattice = k.round() * delta - 1.0
    out_dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    moved = (lattice + delta * centred.to(images.device)).to(out_dtype)
    return moved, -math.log2(delta), log_q.to(images.device)


def _warn_if_coarser(indices: Tensor, levels: int) -> None:
    """Warn when the images' lattice indices all lie on a coarser sublattice of the ``levels`` given.

    Pixels that use only every g-th level (g | levels − 1; 8-bit data in a 16-bit file: g = 257; binary images
    read as 8-bit: g = 255) are data on (levels − 1)/g + 1 levels, and the bits/dim against ``levels`` is larger
    by about log₂ g — a statement about the levels asked for, not about the data. One distinct value says nothing.
    """
    values = indices.unique().tolist()
    if len(values) < 2:
        return
    g = reduce(math.gcd, values, levels - 1)
    if g > 1:
        coarse = (levels - 1) // g + 1
        warnings.warn(f"dequantize={levels}: every pixel of the images lies on the coarser {coarse}-level lattice "
                      f"(they use one level in {g} of the {levels}); bits/dim is measured on the {levels}-level "
                      f"lattice, about log2({g}) = {math.log2(g):.3g} bits/dim more than on theirs: give "
                      f"dequantize={coarse} if the data are {coarse}-level (8-bit pixels in a 16-bit file, say)",
                      UserWarning, stacklevel=4)


def _draw_per_image(generator: torch.Generator | None, shape: tuple[int, ...], batch: int, dequantize: bool,
                    noise: str | None, counts: list[int]) -> tuple[Tensor | None, list[Tensor]]:
    """The random numbers of each image, drawn image after image: its dequantization's U[0, 1) draws (if
    ``dequantize``), then ``counts[j]`` probe vectors for each j (Hutch++: the sketch, then the probes).

    Image i's numbers depend on the seed and on i only, not on the batch after it: the first images of a batch give
    the same numbers alone (on a fixed grid, the same values). Returns u (batch, *shape) or ``None``, and each draw
    as (counts[j], batch, D), float64.
    """
    dim = math.prod(shape)
    us: list[Tensor] = []
    draws: list[list[Tensor]] = [[] for _ in counts]
    for _ in range(batch):
        if dequantize:
            us.append(torch.rand(shape, dtype=torch.float64, generator=generator))
        for j, n in enumerate(counts):
            if noise == "rademacher":
                draws[j].append(torch.randint(0, 2, (n, dim), generator=generator).double() * 2 - 1)
            else:
                draws[j].append(torch.randn(n, dim, dtype=torch.float64, generator=generator))
    return (torch.stack(us) if dequantize else None), [torch.stack(d, 1) for d in draws]


# -- the solve -----------------------------------------------------------------------------------

class ErrorBarWarning(UserWarning):
    """A fixed grid's error bar is unchecked (``steps=2``) or ``inf`` (the grids are outside their asymptotic regime):
    :func:`log_likelihood` warns with it, and ``flowdiff likelihood`` prints it under its table."""


def _fixed_grid_bar(steps: int, order: int, half: Tensor, check_prob: Tensor, log_prob: Tensor,
                    integrate: Callable[[float, str], Any], log_density: Callable[[Tensor], tuple[Tensor, ...]],
                    stats: Stats) -> Tensor:
    """The fixed grid's solve error from the solves of N, N/2 and N/4 steps (``half`` = |ℓ_N − ℓ_{N/2}|).

    |ℓ_N − ℓ_{N/2}| bounds the error of ℓ_N only in the asymptotic regime, where a method of order p leaves an error
    C·h^p: the differences d₁ = ℓ_{N/2} − ℓ_N and d₂ = ℓ_{N/4} − ℓ_{N/2} then have one sign and d₂/d₁ ≈ 2^p, and
    |d₁| = (2^p − 1)·|error| over-covers. The third solve measures d₂; where the ratio lies within a factor
    :data:`REGIME_SHARE` of 2^p (and is at least 2), with one sign, the bar is |d₁| as before; elsewhere it is ``inf``
    with a warning naming ``steps=``: outside that regime the differences say nothing of the error (rk4 on the CLI's
    analytic-mixture at 16 steps: differences shrinking 3.9× a doubling and a bar of 28 nats, the error 139). Below
    :data:`MIN_REGIME_STEPS` steps the N/4-step solve is too coarse to show a regime (its ratios fell in the window by
    chance, and the bars then missed; ``benchmarks/RESULTS.md``): the bar is ``inf``, and no check solve is run."""
    if steps < MIN_REGIME_STEPS:
        warnings.warn(f"steps={steps}: a fixed grid of fewer than {MIN_REGIME_STEPS} steps gets no error bar for its "
                      "solve (inf), and no check solve is run: solves of N/2 and N/4 steps would be too coarse to "
                      "show that the error falls at the method's order, and without that their difference bounds "
                      "nothing; give "
                      f"steps={MIN_REGIME_STEPS} or more, or the adaptive default", ErrorBarWarning, stacklevel=3)
        return torch.full_like(half, math.inf)
    y_quarter, quarter_stats = integrate(4.0, "second check solve")
    stats.extra["check_quarter"] = quarter_stats
    d1, d2 = check_prob - log_prob, log_density(y_quarter)[2] - check_prob
    least, most = max(2.0, REGIME_SHARE * 2.0**order), 2.0**order / REGIME_SHARE
    asymptotic = (d1 * d2 >= 0) & (d2.abs() >= least * d1.abs()) & (d2.abs() <= most * d1.abs())
    bar = torch.where(asymptotic, half, torch.full_like(half, math.inf))
    if not bool(asymptotic.all()):
        which = torch.nonzero(~asymptotic).flatten().tolist()
        warnings.warn(f"steps={steps}: the solves of {steps}, {max(1, round(steps / 2))} and "
                      f"{max(1, round(steps / 4))} steps are not in their asymptotic regime for image(s) {which} "
                      f"(their differences do not shrink by {least:g} to {most:g}, about 2^p for a method of order "
                      f"p = {order}, with one sign, as the steps double), so nothing bounds the solve's error there "
                      "and its error bar is inf; give more steps, or the adaptive default", ErrorBarWarning,
                      stacklevel=3)
    return bar


def draws_random(estimator: Trace, dim: int, dequantize: int | None) -> bool:
    """Whether :func:`log_likelihood` draws from its ``generator``: a stochastic trace's probes (``"auto"`` is one
    beyond :data:`AUTO_EXACT_MAX_DIM` dimensions) or the dequantization noise of ``dequantize=K``. Where it draws
    nothing a ``generator`` is refused (it would change nothing); the command line asks the same rule."""
    return _choose_divergence(estimator.method, dim) != "exact" or dequantize is not None


def _choose_divergence(divergence: str, dim: int) -> str:
    """``"auto"``: the exact trace up to :data:`AUTO_EXACT_MAX_DIM` dimensions (no estimator variance, at most
    256 products an evaluation), Hutch++ beyond (80 products an evaluation, whatever D)."""
    if divergence != "auto":
        return divergence
    return "exact" if dim <= AUTO_EXACT_MAX_DIM else "hutch++"


class _TimeBar:
    """A tqdm bar (stderr) of a solve from σ = 0 to σ_max: its steps of a fixed grid (with the time left), or the
    share of its time τ an adaptive solve has reached; σ and the step beside it."""

    def __init__(self, stage: str, form: Any, t_zero: float, t_max: float, steps: int | None) -> None:
        from tqdm.auto import tqdm

        self.form, self.t_zero, self.span, self.steps = form, t_zero, t_max - t_zero, steps
        self.of = "" if steps is None else f" of {steps:,}"
        left = "" if steps is None else "<{remaining}"  # an adaptive solve's pace in τ says little of its end
        self.bar = tqdm(total=1000 if steps is None else steps, desc=stage, leave=False,
                        postfix=f"σ=0, step 0{self.of}",
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}" + left + "{postfix}")

    def update(self, info: solvers.StepInfo) -> None:
        if self.steps is None:
            done = min(1000, round(1000 * (info.t1 - self.t_zero) / self.span))
        else:
            done = info.step + 1
        self.bar.set_postfix_str(f"σ={self.form.sigma(info.t1):.3g}, step {info.step + 1:,}{self.of}", refresh=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def log_likelihood(
    flow: ProbabilityFlow,
    images: Tensor,
    *,
    solver: str | Solver = "dopri5",
    steps: int | None = None,
    adaptive: Adaptive | None = None,
    estimator: Trace | None = None,
    generator: torch.Generator | int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    dequantize: int | None = None,
    dequantization: str = "uniform",
    data_mean: float | Tensor = 0.0,
    data_var: float | Tensor = 1.0,
    solve_check: bool = True,
    checks: Checks | None = None,
    progress: bool = False,
    **removed: Any,
) -> Likelihood:
    """The log-density (nats) of each image under the flow's distribution at σ = 0, its bits/dim and error bar.

    ``images`` (batch, ...) are in the model's data scale (the image x̄ at σ = 0). The augmented
    ODE d[x̄, ℓ]/dσ = [ε, div ε] runs from σ = 0 to σ_max (see the module docstring for the
    equations, the prior and the estimators):

    * adaptive (default): ``solver`` any embedded pair (``solvers.available(adaptive=True)``), in
      τ = log(σ + c); a step is accepted when, for every sample, the RMS over pixels of the
      state's error on the image scale x = x̄/√(1+σ²) is ≤ ``atol + rtol·|x|``, and each
      log-density column's error is ≤ ``atol`` nats (absolute: its errors add up in nats whatever
      the size of ℓ, which grows with D). ``adaptive=flowdiff.Adaptive(rtol=, atol=, max_nfe=,
      sigma_c=)`` sets them (``max_nfe`` bounds each solve's field evaluations, ``sigma_c`` the c
      of τ); a tolerance it leaves out, or all of them without it, is 1e-5 (:data:`DEFAULT_RTOL`,
      :data:`DEFAULT_ATOL`; not generate's 1e-3: ``Adaptive(max_nfe=N)`` caps the default solve) and
      c = σ_min. Adaptive's ``controller``, ``first_step``, ``sigma_end`` and ``sigma_start`` are refused.
    * ``steps=N``: a fixed grid of N steps uniform in τ with any σ-variable solver (``rk4``,
      ``heun``, ``ipndm``, ...); refused beside ``adaptive=``.

    **Error bar.** With ``solve_check`` (default) a second solve at 10× the tolerances and twice the step cap (or half
    the steps), with the same probes,
    measures the solve's error: ``solve_error`` is |ℓ − ℓ_check| per sample, an overestimate of
    the reported solve's own error wherever the error falls with the tolerance. On a fixed grid that holds only once
    the solve is in its asymptotic regime, so a third solve of N/4 steps checks it (:func:`_fixed_grid_bar`): where
    the differences do not shrink by about 2^p (p the order) a doubling, with one sign, or below N = 16 steps, the bar
    is ``inf`` (with an :class:`ErrorBarWarning` naming ``steps=``); the check solves then cost N/2 + N/4 steps besides
    the solve's N (``stats.extra``'s ``check`` and ``check_quarter``; below 16 steps none are run). ``error`` =
    √(``std_error``² + ``solve_error``²) covers both the estimator's variance and the solve.

    ``estimator``: a :class:`Trace` (default ``Trace()``: method ``"auto"``, ``"exact"`` up to D =
    :data:`AUTO_EXACT_MAX_DIM`, beyond it ``"hutch++"`` with sketch 32 and probes 16, whose 80
    products per evaluation do not grow with D). Its probes are drawn once from ``generator`` (a CPU
    ``torch.Generator`` or an int seed; draws are made on the CPU whatever the images' device), which also
    draws the dequantization noise, image after image (its noise, then its sketch and probes), so that an image's
    draws do not depend on the images after it. With the exact trace and no dequantization nothing is drawn, and a
    ``generator`` is refused (:func:`draws_random`). With one probe there is no ``std_error`` (one value has no
    spread): ``error`` is then the solve's alone and leaves out the probe's variance, which can be far larger.
    ``checks=flowdiff.Checks(finite=...)``:
    stop with a :class:`solvers.SolveError` when the state turns NaN/inf (default on); its
    ``growth`` and ``model`` fields do not apply here and are refused unless left at their defaults.
    ``progress=True`` shows a tqdm bar on stderr of the time each solve has reached, its σ and step (of ``steps=N``
    on a fixed grid), first for the solve, then for the check solve.

    ``dequantize=K`` (levels over [−1, 1]; 256 for 8-bit images) dequantizes the images with noise
    from ``generator`` — ``dequantization="uniform"`` or ``"truncated_normal"`` — and reports
    the discrete data's bits/dim (see the module docstring); float16/bfloat16 images on the lattice are
    snapped to it, and dequantized in float32. ``data_mean``/``data_var``
    (scalars or per-pixel tensors) set the prior N(m, (v + σ_max²)I); the defaults are the VP
    prior that :func:`flowdiff.generate` samples. ``stats`` are the solve's own (``stats.nfe`` its field evaluations);
    ``stats.extra`` adds ``vjps`` (the estimator's vector–Jacobian products, per sample),
    ``model_calls`` (forward passes, one per field evaluation and piece of ``chunk`` samples)
    and ``check`` (the check solve's statistics; on a fixed grid also ``check_quarter``, the N/4-step solve's).
    """
    start = time.perf_counter()
    refuse_removed("log_likelihood", removed, REMOVED)
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    images = _check_images(images)
    flow.check_input(images, "images")
    # warns, as encode does, for images on another scale ([0, 255], say); called here, not in _check_images, so
    # that the warning's stacklevel lands on the caller's line
    check_data_range(images, "images")
    if estimator is None:
        estimator = Trace()
    elif not isinstance(estimator, Trace):
        raise TypeError(f"estimator must be a flowdiff.Trace or None, got {type(estimator).__name__}")
    if dequantization not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {dequantization!r}; accepted: {', '.join(DEQUANTIZATIONS)}")
    if dequantize is None and dequantization != "uniform":
        raise ValueError(f"dequantization={dequantization!r} chooses the noise of dequantize=K levels, which is "
                         "None (the continuous density): give dequantize=K, or leave dequantization out")
    given_generator = generator
    if isinstance(generator, numbers.Integral) and not isinstance(generator, bool):  # a seed, as Stochastic's
        generator = torch.Generator().manual_seed(check_seed(generator, "generator"))
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a CPU torch.Generator, an int seed or None, got {type(generator).__name__}")
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"generator is on {generator.device}; log_likelihood draws its probes and dequantization "
                         "noise on the CPU (the same numbers whatever the images' device): give a CPU "
                         "torch.Generator or an int seed")
    if given_generator is not None and not draws_random(estimator, images[0].numel(), dequantize):
        shown = repr(given_generator) if isinstance(given_generator, numbers.Integral) else "a torch.Generator"
        how = "method='exact'" if estimator.method == "exact" else (
            f"method='auto' takes it at D={images[0].numel()} <= {AUTO_EXACT_MAX_DIM}")
        raise ValueError(f"generator={shown} would change nothing: log_likelihood draws only a stochastic trace's "
                         f"probes and dequantize=K's noise, and here the trace is exact ({how}) and dequantize=None; "
                         "drop generator=")
    if not isinstance(solve_check, bool):
        raise TypeError(f"solve_check must be a bool, got {type(solve_check).__name__}")
    check_finite = _check_checks(checks)
    if model_dtype is not None and (not isinstance(model_dtype, torch.dtype) or not model_dtype.is_floating_point):
        raise TypeError(f"model_dtype must be a floating-point torch.dtype (torch.float16, torch.bfloat16, "
                        f"torch.float32 or torch.float64) or None (the images' dtype), got {model_dtype!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
    chunk, probes, sketch, noise = estimator.chunk, estimator.probes, estimator.sketch, estimator.probes_from
    shape = tuple(images.shape[1:])
    batch, dim = images.shape[0], images[0].numel()
    divergence = _choose_divergence(estimator.method, dim)
    if divergence == "exact":
        if not probes == sketch == noise is None:
            raise ValueError(f"Trace.probes and Trace.sketch apply to the stochastic methods (hutchinson, hutch++), "
                             f"as does Trace.probes_from, not 'exact' (which method='auto' takes at D={dim} <= "
                             f"{AUTO_EXACT_MAX_DIM}); got probes={probes!r}, sketch={sketch!r}, probes_from={noise!r}")
    else:
        noise = "rademacher" if noise is None else noise
        probes = DEFAULT_PROBES[divergence] if probes is None else probes
        if divergence == "hutch++":
            sketch = min(DEFAULT_SKETCH, dim) if sketch is None else sketch
            if sketch > dim:
                raise ValueError(f"Trace.sketch must be <= the dimension D={dim}, got {sketch}")
    solver_obj = solvers.get(solver)
    if adaptive is not None and not isinstance(adaptive, Adaptive):
        raise TypeError(f"adaptive must be a flowdiff.Adaptive or None, got {type(adaptive).__name__}")
    schedule = flow.schedule
    s_max = float(schedule.sigma_max)
    if not math.isfinite(s_max):
        raise ValueError("log_likelihood integrates from σ = 0 to the schedule's σ_max, which is ∞ here (zero terminal "
                         "SNR: ᾱ = 0 at the last timestep), where x̄ is infinite and the prior has no density; the "
                         "likelihood is defined for schedules with a finite σ_max")
    sigma_c = None if adaptive is None else adaptive.sigma_c
    c = float(schedule.sigma_min) if sigma_c is None else sigma_c
    if not (math.isfinite(c) and 0 < c < s_max):
        raise ValueError(f"Adaptive.sigma_c must be a number in (0, σ_max={s_max:.6g}), got {sigma_c!r}")
    # the engine picks the variables (LogSigma(c): the state is x̄, the time τ = log(σ + c)); it refuses a solver
    # built for the data variables, whose state carries no log-density
    form = formulation_for(solver_obj, "encode", adaptive=steps is None, sigma_c=float(c), augmented=True)
    if adaptive is not None:
        unused = [f"{name}={getattr(adaptive, name)!r}" for name in _UNUSED_ADAPTIVE
                  if getattr(adaptive, name) is not None]
        if unused:
            raise ValueError(f"adaptive=Adaptive({', '.join(unused)}): log_likelihood has its own step controller "
                             "and runs from σ = 0 to σ_max; it takes Adaptive(rtol=, atol=, max_nfe=, sigma_c=) only")
    rtol = atol = max_nfe = None
    if steps is None:
        if not solver_obj.adaptive:
            raise ValueError(f"solver {solver_obj.name!r} has no error estimate: give steps=N for a fixed grid, or "
                             f"an adaptive solver ({', '.join(solvers.available(adaptive=True))})")
        # a tolerance the Adaptive leaves out is the likelihood's own default (1e-5), not generate's 1e-3
        spec = (Adaptive() if adaptive is None else adaptive).resolved(DEFAULT_RTOL, DEFAULT_ATOL)
        rtol, atol, max_nfe = float(spec.rtol), float(spec.atol), spec.max_nfe
        if atol == 0:
            raise ValueError("Adaptive.atol must be > 0 here: it is also the log-density column's tolerance, in nats "
                             "per step (rtol does not apply to that column), got 0.0")
    else:
        steps = _check_int("steps", steps, 1)
        if steps > MAX_STEPS:
            raise ValueError(f"steps must be at most {MAX_STEPS:,} (flowdiff.engine.grids.MAX_STEPS), got {steps:,}")
        if adaptive is not None:
            raise ValueError(f"adaptive=Adaptive(...) sets an error-controlled solve; steps={steps} sets a fixed "
                             "grid: give one of them")
    mean = _per_pixel("data_mean", data_mean, shape, positive=False)
    var = _per_pixel("data_var", data_var, shape, positive=True)

    offset, log_q = 0.0, None
    images_dtype = images.dtype  # the latent's; a dequantized half-precision batch is held in float32
    counts = {"exact": [], "hutchinson": [probes], "hutch++": [sketch, probes]}[divergence]
    u, draws = _draw_per_image(generator, shape, batch, dequantize is not None, noise, counts)
    if dequantize is not None:
        images, offset, log_q = _dequantize(images, dequantize, dequantization, float(schedule.sigma_min), u)
    dtype = torch.float32 if images.dtype in (torch.float16, torch.bfloat16) else images.dtype
    device = images.device
    xbar0 = images.to(dtype).reshape(batch, dim)

    jac = _Jacobian(shape, chunk)
    if divergence == "exact":
        estimator: Any = _Exact(dim, chunk)
    elif divergence == "hutchinson":
        estimator = _Hutchinson(draws[0].to(device, dtype))
    else:
        estimator = _HutchPlusPlus(draws[0].to(device, dtype), draws[1].to(device, dtype))
    k = estimator.columns

    # the engine's time (τ = log(σ + c) from the chooser above), its ends mapping back to σ = 0 and σ_max exactly
    t_zero, t_max = form.times([0.0, s_max])
    piece = min(batch, chunk)
    pieces = [slice(b0, min(batch, b0 + piece)) for b0 in range(0, batch, piece)]
    # each piece's field sees its own rows of the per-sample model keywords (class labels, prompt embeddings)
    fields = [flow.field(model_kwargs if len(pieces) == 1 else model_kwargs_rows(model_kwargs, batch, rows),
                         model_dtype) for rows in pieces]

    def sigma_field(sigma: float, y: Tensor) -> Tensor:
        """d[x̄, ℓ]/dσ = [ε, div ε] (ℓ: one column per probe), the batch in pieces of ``chunk``."""
        out = []
        for rows, eps_field in zip(pieces, fields):
            eps, apply = jac.linearize(eps_field, sigma, y[rows, :dim].to(dtype))
            div = estimator(apply, rows, eps.shape[0], eps)
            out.append(torch.cat([eps.detach(), div.detach()], 1).to(y.dtype))
        return torch.cat(out)

    augmented = form.augmented_field(sigma_field)
    # the augmented state in float64 (where the device has it), the model in the images' precision: the
    # log-density column reaches hundreds of nats, whose float32 rounding (~1e-5) would be the tolerance itself
    state_dtype = torch.float32 if device.type == "mps" else torch.float64
    y0 = torch.cat([form.to_state(xbar0, 0.0), xbar0.new_zeros(batch, k)], 1).to(state_dtype)

    def integrate(scale: float, stage: str) -> tuple[Tensor, Stats]:
        """One solve at ``scale`` × the tolerances (adaptive) or 1/``scale`` × the steps (fixed grid)."""
        rows0, calls0 = jac.rows, jac.calls
        count = None if steps is None else max(1, round(steps / scale))
        bar = _TimeBar(stage, form, t_zero, t_max, count) if progress else None
        def norm(error: Tensor, y0: Tensor, y1: Tensor, t: float) -> Tensor:
            a = form.x_factor(t)  # the image's scale x = x̄/√(1+σ²)
            img = (error[:, :dim] * a).abs() / (y1[:, :dim].abs() * (rtol * scale * a) + atol * scale)
            img = img.pow(2).mean(1).sqrt()
            lp = error[:, dim:].abs() / (atol * scale)   # nats, whatever the size of ℓ
            return torch.maximum(img, lp.amax(1)).max()

        callback = None if bar is None else bar.update
        controller = {1.0: CONTROLLER, CHECK_FACTOR: CHECK_CONTROLLER}.get(scale, COARSE_CONTROLLER)
        try:
            with torch.no_grad():
                if steps is None:
                    sol = solvers.solve_adaptive(augmented, y0, t_zero, t_max, solver_obj, rtol=rtol * scale,
                                                 atol=atol * scale, norm=norm, controller=controller, max_nfe=max_nfe,
                                                 callback=callback, check_finite=check_finite,
                                                 time_name=form.time_name)
                else:
                    grid = form.uniform_grid(0.0, s_max, count, solver_obj)
                    sol = solvers.integrate(augmented, y0, solver_obj, grid, callback=callback,
                                            check_finite=check_finite, time_name=form.time_name)
        except SolveError as err:
            if err.stats is not None:
                err.stats.extra.update(vjps=(jac.rows - rows0) // batch, model_calls=jac.calls - calls0,
                                       vjp=jac.mode)
            raise
        finally:
            if bar is not None:
                bar.close()
        sol.stats.extra.update(vjps=(jac.rows - rows0) // batch, model_calls=jac.calls - calls0, vjp=jac.mode)
        return sol.y, sol.stats

    total_var = var.to(device) + s_max * s_max

    def log_density(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """prior (log N(x̄(σ_max); m, (v + σ_max²)I)), the ODE term of each probe, and their sum (mean over probes)."""
        xbar_max = form.to_xbar(y[:, :dim], t_max).double()
        prior = -0.5 * (((xbar_max - mean.to(device)) ** 2 / total_var).sum(1)
                        + torch.log(2 * math.pi * total_var).sum())
        per_probe = y[:, dim:].double()
        return prior, per_probe, prior + per_probe.mean(1)

    y, stats = integrate(1.0, "likelihood solve")
    prior, per_probe, log_prob = log_density(y)
    delta = per_probe.mean(1)
    solve_error = None
    if solve_check and steps is not None and steps < MIN_REGIME_STEPS:  # no check solve could bound the error
        solve_error = _fixed_grid_bar(steps, solver_obj.order, torch.zeros_like(log_prob), log_prob, log_prob,
                                      integrate, log_density, stats)
    elif solve_check:
        y_check, check_stats = integrate(CHECK_FACTOR if steps is None else 2.0, "check solve")
        stats.extra["check"] = check_stats
        check_prob = log_density(y_check)[2]
        solve_error = (check_prob - log_prob).abs()
        if steps is None:  # the coarse check: a floor where the two solves' errors happen to agree
            y_coarse, coarse_stats = integrate(CHECK_FACTOR ** 2, "coarse check solve")
            stats.extra["check_coarse"] = coarse_stats
            coarse_diff = (log_density(y_coarse)[2] - check_prob).abs()
            solve_error = torch.maximum(solve_error, coarse_diff / CHECK_FACTOR ** COARSE_FALL)
        if steps is not None:
            solve_error = _fixed_grid_bar(steps, solver_obj.order, solve_error, check_prob, log_prob, integrate,
                                         log_density, stats)
    std_error = None
    if divergence != "exact" and k > 1:
        std_error = per_probe.std(1) / math.sqrt(k)
    parts = [e for e in (std_error, solve_error) if e is not None]
    error = torch.stack(parts).pow(2).sum(0).sqrt() if parts else None
    q = 0.0 if log_q is None else log_q
    bpd = -(log_prob - q) / (dim * math.log(2)) + offset
    stats.wall_time = time.perf_counter() - start
    latent = (form.to_xbar(y[:, :dim], t_max) / math.sqrt(1.0 + s_max * s_max)).reshape(batch, *shape)
    latent = latent.to(images_dtype)  # DDIM's x_T = x̄(σ_max)/√(1+σ_max²), as encode's
    return Likelihood(log_prob, prior, delta, bpd, std_error, None if divergence == "exact" else per_probe,
                      dim, offset, divergence, latent, stats, solve_error=solve_error, error=error,
                      dequantization=None if dequantize is None else dequantization, log_q=log_q)


__all__ = ["DIVERGENCES", "REMOVED", "ErrorBarWarning", "Likelihood", "Trace", "draws_random", "log_likelihood"]
