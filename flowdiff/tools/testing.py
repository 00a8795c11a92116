"""Property-testing helpers: hypothesis strategies for flowdiff's inputs, and invariant checks.

Use them to property-test your own models and settings the way flowdiff tests itself::

    import torch
    from hypothesis import given, strategies as st
    from flowdiff.tools import testing as ft

    @given(ft.round_trip_cases(solvers=["reversible_heun"], dtype=st.just(torch.float64)))
    def test_my_round_trip(case):
        ft.assert_round_trip(case.flow, case.images, solver=case.solver, steps=case.steps, grid=case.grid,
                             atol=1e-10)

Strategies (all draw small, fast cases): :func:`schedules`, :func:`grid_names`,
:func:`step_counts`, :func:`batch_shapes`, :func:`dtypes`, :func:`closed_form_models`
(:class:`~flowdiff.models.analytic.Gaussian` and :class:`~flowdiff.models.analytic.Mixture` models, whose
flows are exact at every σ), and :func:`round_trip_cases` combining them with a batch of
data drawn from the model. Checks: :func:`round_trip_error`, :func:`assert_round_trip` (an
AssertionError that reports solver, grid, steps, dtype, the worst sample and element, and
the NFE), :func:`assert_fixed_point_converged` and :func:`round_trip_order` (the slope of
log round-trip error against log step count).

Hypothesis is a test dependency (``pip install flowdiff[test]``); importing this module
without it raises ImportError naming it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

try:
    from hypothesis import strategies as st
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError("flowdiff.tools.testing needs hypothesis (pip install 'flowdiff[test]')") from err

from ..api.roundtrip import encoders
from ..api.sampling import Result, decode, encode
from ..engine.flow import ProbabilityFlow
from ..engine.grids import GRIDS
from ..engine.schedules import Schedule
from ..models.analytic import Gaussian, Mixture

__all__ = [
    "RoundTrip",
    "RoundTripCase",
    "STATE_DTYPES",
    "assert_fixed_point_converged",
    "assert_round_trip",
    "batch_shapes",
    "closed_form_models",
    "dtypes",
    "grid_names",
    "round_trip_cases",
    "round_trip_error",
    "round_trip_order",
    "schedules",
    "step_counts",
]


# -- strategies ------------------------------------------------------------------------------

def _names(values: Sequence[str] | str, argument: str, accepted: Sequence[str], *, empty: bool = False) -> list[str]:
    """``values`` as a list of names of ``accepted`` (one name may be given as a string), checked when the strategy
    is built: a misspelt name is an error naming it, not one drawn (or, in an exclusion, one never excluded)."""
    names = [values] if isinstance(values, str) else list(values)
    unknown = [v for v in names if not isinstance(v, str) or v not in accepted]
    if unknown:
        raise ValueError(f"{argument}: unknown name(s) {unknown}; accepted: {', '.join(accepted)}")
    if not names and not empty:
        raise ValueError(f"{argument} must name at least one of {', '.join(accepted)}")
    return names


def schedules(*, kinds: Sequence[str] | str = ("linear", "scaled_linear", "cosine"),
              num_train_timesteps: Sequence[int] = (1000,)) -> st.SearchStrategy[Schedule]:
    """Noise schedules by diffusers' names (``linear``, ``scaled_linear``, ``cosine``) and training lengths."""
    makers = {"linear": Schedule.linear, "scaled_linear": Schedule.scaled_linear, "cosine": Schedule.cosine}
    kinds = _names(kinds, "kinds", list(makers))
    return st.builds(lambda k, T: makers[k](T), st.sampled_from(kinds), st.sampled_from(list(num_train_timesteps)))


def grid_names(*, exclude: Sequence[str] | str = ("quadratic",)) -> st.SearchStrategy[str]:
    """Named σ grids of :func:`flowdiff.make_sigmas` (``quadratic`` excluded by default: it repeats timesteps at
    large step counts)."""
    exclude = _names(exclude, "exclude", GRIDS, empty=True)
    left = [g for g in GRIDS if g not in exclude]
    if not left:
        raise ValueError(f"exclude={exclude} leaves no grid to draw")
    return st.sampled_from(left)


def step_counts(min_value: int = 1, max_value: int = 50) -> st.SearchStrategy[int]:
    """Step counts in [min_value, max_value], min_value >= 1."""
    if isinstance(min_value, bool) or not isinstance(min_value, (int, np.integer)) or min_value < 1:
        raise ValueError(f"min_value must be an int >= 1 (a solve takes at least one step), got {min_value!r}")
    return st.integers(min_value=min_value, max_value=max_value)


def batch_shapes(*, max_batch: int = 3, max_side: int = 4, channels: Sequence[int] | int = (1, 3)
                 ) -> st.SearchStrategy[tuple[int, ...]]:
    """Image-like shapes (batch, channels, height, width), small enough for closed-form models; ``channels`` are
    ints >= 1 (one may be given alone), ``max_batch`` and ``max_side`` ints >= 1, checked when built."""
    def count(value: object) -> bool:
        return not isinstance(value, bool) and isinstance(value, (int, np.integer)) and value >= 1

    values = [channels] if count(channels) else list(channels) if isinstance(channels, Sequence) and \
        not isinstance(channels, str) else None
    if not values or not all(count(c) for c in values):
        raise ValueError(f"channels must be channel counts (ints >= 1), got {channels!r}")
    for name, value in (("max_batch", max_batch), ("max_side", max_side)):
        if not count(value):
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return st.tuples(st.integers(1, int(max_batch)), st.sampled_from([int(c) for c in values]),
                     st.integers(1, int(max_side)), st.integers(1, int(max_side)))


#: The state dtypes :func:`dtypes` draws from: those ``generate``/``encode`` take.
STATE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def dtypes(*, include: Sequence[torch.dtype] | torch.dtype = (torch.float64, torch.float32)
           ) -> st.SearchStrategy[torch.dtype]:
    """State dtypes (float64 and float32 by default; any of :data:`STATE_DTYPES`, one may be given alone)."""
    values = [include] if isinstance(include, (torch.dtype, str)) else list(include)
    bad = [v for v in values if v not in STATE_DTYPES]
    if bad or not values:
        raise ValueError(f"include must list torch dtypes of {', '.join(map(str, STATE_DTYPES))}, got {include!r}")
    return st.sampled_from(values)


def closed_form_models(sample_shape: tuple[int, ...], *, schedule: st.SearchStrategy[Schedule] | None = None,
                       kinds: Sequence[str] | str = ("gaussian", "mixture"),
                       min_bandwidth: float = 0.2) -> st.SearchStrategy[Gaussian | Mixture]:
    """A closed-form model on samples of ``sample_shape`` (without the batch dimension).

    ``gaussian``: N(μ, diag(v)) with μ in [−0.5, 0.5] and variances in [0.01, 0.5];
    ``mixture``: 2–8 centres in [−1, 1] with bandwidth in [min_bandwidth, 0.5]. Parameters
    are drawn from a seed so that a failing case shrinks to a small, reproducible one.
    """
    if isinstance(sample_shape, (str, bytes)) or not isinstance(sample_shape, Sequence) or not sample_shape or any(
            isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in sample_shape):
        raise ValueError(f"sample_shape must be a non-empty tuple of positive ints (one sample's shape, without the "
                         f"batch), got {sample_shape!r}")
    kinds = _names(kinds, "kinds", ("gaussian", "mixture"))
    if isinstance(min_bandwidth, bool) or not isinstance(min_bandwidth, (int, float, np.floating)) \
            or not 0 < min_bandwidth <= 0.5:
        raise ValueError(f"min_bandwidth must be a number in (0, 0.5] (bandwidths are drawn up to 0.5), got "
                         f"{min_bandwidth!r}")
    return _closed_form_models(tuple(sample_shape), schedule, kinds, float(min_bandwidth))


@st.composite
def _closed_form_models(draw: st.DrawFn, sample_shape: tuple[int, ...], schedule: st.SearchStrategy[Schedule] | None,
                        kinds: list[str], min_bandwidth: float) -> Gaussian | Mixture:
    kind = draw(st.sampled_from(kinds))
    sched = draw(schedule if schedule is not None else st.just(Schedule.linear()))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    dim = int(np.prod(sample_shape))
    if kind == "gaussian":
        mean = (torch.rand(dim, dtype=torch.float64, generator=gen) - 0.5).reshape(sample_shape)
        var = 0.01 + 0.49 * torch.rand(dim, dtype=torch.float64, generator=gen)
        return Gaussian(mean, var, sched)
    if kind == "mixture":
        n = draw(st.integers(2, 8))
        bandwidth = draw(st.floats(min_bandwidth, 0.5))
        centers = (2 * torch.rand(n, dim, dtype=torch.float64, generator=gen) - 1).reshape(n, *sample_shape)
        return Mixture(centers, bandwidth, schedule=sched)
    raise ValueError(f"unknown closed-form model kind {kind!r}; accepted: 'gaussian', 'mixture'")


@dataclass
class RoundTripCase:
    """One drawn case: the model, its exact flow, a batch of its data and the encode settings."""

    model: Gaussian | Mixture
    flow: ProbabilityFlow
    images: Tensor
    solver: str
    solver_options: dict[str, Any]
    steps: int
    grid: str


def round_trip_cases(*, solvers: Sequence[str] | str = ("reversible_heun",),
                     solver_options: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
                     steps: st.SearchStrategy[int] | None = None, grids: st.SearchStrategy[str] | None = None,
                     dtype: st.SearchStrategy[torch.dtype] | None = None,
                     shapes: st.SearchStrategy[tuple[int, ...]] | None = None,
                     schedule: st.SearchStrategy[Schedule] | None = None,
                     kinds: Sequence[str] = ("gaussian", "mixture")) -> st.SearchStrategy[RoundTripCase]:
    """A closed-form model, a batch of its data (clipped to [−1, 1]) and encode settings drawn together.

    ``solvers`` are names of solvers that encode (a single name may be given as a string); ``solver_options``
    maps some of them to the option sets to draw from (e.g. ``{"reversible": [{"base": "euler"}, {"base":
    "heun"}]}``; pass them as ``solvers.get(case.solver, **case.solver_options)``). Both are checked when the
    strategy is built: an unknown or non-encoding solver, options for a solver not in ``solvers`` and options a
    solver does not take are a ``ValueError``/``TypeError`` naming them, not a case drawn and never run.
    """
    names, options = _check_case_solvers(solvers, solver_options)
    kinds = _names(kinds, "kinds", ("gaussian", "mixture"))
    return _round_trip_cases(names, options, steps, grids, dtype, shapes, schedule, kinds)


def _check_case_solvers(solvers: Sequence[str] | str, solver_options: Mapping[str, Sequence[Mapping[str, Any]]] | None
                        ) -> tuple[list[str], dict[str, list[dict[str, Any]]]]:
    """``round_trip_cases``' solvers and option sets, checked once, before any case is drawn."""
    names = [solvers] if isinstance(solvers, str) else list(solvers)
    accepted = [*encoders(), "reversible"]
    if not names:
        raise ValueError(f"solvers must name at least one solver that encodes, got {solvers!r}; accepted: "
                         f"{', '.join(sorted(accepted))}")
    for name in names:
        if not isinstance(name, str) or name not in accepted:
            raise ValueError(f"solvers: {name!r} is not a solver that encodes; accepted: {', '.join(sorted(accepted))}")
    if solver_options is None:
        return names, {}
    if not isinstance(solver_options, Mapping):
        raise TypeError(f"solver_options must map solver names to lists of option dicts, got "
                        f"{type(solver_options).__name__}")
    options: dict[str, list[dict[str, Any]]] = {}
    for name, sets in solver_options.items():
        if name not in names:
            raise ValueError(f"solver_options names {name!r}, which is not among solvers {names}: its options would "
                             "never be drawn")
        if isinstance(sets, Mapping) or isinstance(sets, str) or not isinstance(sets, Sequence) or not sets \
                or not all(isinstance(o, Mapping) for o in sets):
            raise TypeError(f"solver_options[{name!r}] must be a non-empty list of option dicts (one per set to draw "
                            f"from), got {sets!r}")
        for opts in sets:
            if name in _solvers.available():
                _solvers.get(name, **opts)  # an option the solver does not take: its TypeError names it
            elif opts:
                raise TypeError(f"solver_options[{name!r}]: {name} takes no options, got {dict(opts)!r}")
        options[name] = [dict(o) for o in sets]
    return names, options


@st.composite
def _round_trip_cases(draw: st.DrawFn, names: list[str], options: dict[str, list[dict[str, Any]]],
                      steps: st.SearchStrategy[int] | None, grids: st.SearchStrategy[str] | None,
                      dtype: st.SearchStrategy[torch.dtype] | None, shapes: st.SearchStrategy[tuple[int, ...]] | None,
                      schedule: st.SearchStrategy[Schedule] | None, kinds: Sequence[str]) -> RoundTripCase:
    shape = draw(shapes if shapes is not None else batch_shapes())
    model = draw(closed_form_models(shape[1:], schedule=schedule, kinds=kinds))
    name = draw(st.sampled_from(names))
    choices = options.get(name, [{}])
    opts = dict(draw(st.sampled_from(choices)))
    n = draw(steps if steps is not None else step_counts(1, 30))
    grid = draw(grids if grids is not None else grid_names())
    dt = draw(dtype if dtype is not None else dtypes())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    images = model.sample(shape[0], generator=gen).clamp(-1, 1).to(dt)
    return RoundTripCase(model, model.flow(), images, name, opts, n, grid)


# -- invariant checks ------------------------------------------------------------------------

@dataclass
class RoundTrip:
    """An encode, its decode and the reconstruction error (max abs, the images' scale)."""

    encoded: Result
    decoded: Result
    max_abs: float


def round_trip_error(flow: ProbabilityFlow, images: Tensor, **encode_kwargs: Any) -> RoundTrip:
    """Encode ``images`` with ``encode_kwargs`` (see :func:`flowdiff.encode`) and decode the latent it returns
    (with the encode's ``model_kwargs``: a conditional latent decodes under the same conditioning)."""
    enc = encode(flow, images, **encode_kwargs)
    if enc.latent is None:
        raise ValueError("this encode returned no Latent (an adaptive encode?); round trips need a fixed grid")
    dec = decode(flow, enc.latent, model_kwargs=encode_kwargs.get("model_kwargs"))  # the same conditioning
    return RoundTrip(enc, dec, float((dec.x.double() - images.double()).abs().max()))


def _check_tolerance(name: str, value: object) -> float:
    """A tolerance: a finite number >= 0 (a negative or NaN one would fail every check, and say so as a failure)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
            or not np.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def assert_round_trip(flow: ProbabilityFlow, images: Tensor, *, atol: float, **encode_kwargs: Any) -> RoundTrip:
    """Assert ``max |decode(encode(x)) − x| ≤ atol``; the failure names the settings, worst sample/element and NFE."""
    _check_tolerance("atol", atol)
    rt = round_trip_error(flow, images, **encode_kwargs)
    if not rt.max_abs <= atol:
        err = (rt.decoded.x.double() - images.double()).abs()
        flat = int(err.reshape(-1).argmax())
        where = np.unravel_index(flat, tuple(err.shape))
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(encode_kwargs.items()))
        raise AssertionError(
            f"round trip error {rt.max_abs:.3g} > atol {atol:.3g}\n"
            f"  settings: {settings}\n"
            f"  images: shape {tuple(images.shape)}, dtype {images.dtype}; grid σ = "
            f"{rt.encoded.sigmas[1]:.4g} … {rt.encoded.sigmas[-1]:.4g} ({len(rt.encoded.sigmas) - 1} steps)\n"
            f"  worst element {tuple(int(i) for i in where)}: original {images.reshape(-1)[flat].item():.17g}, "
            f"decoded {rt.decoded.x.reshape(-1)[flat].item():.17g}\n"
            f"  per-sample max error: {[f'{v:.3g}' for v in err.reshape(err.shape[0], -1).amax(1).tolist()]}\n"
            f"  NFE encode {rt.encoded.stats.nfe}, decode {rt.decoded.stats.nfe}")
    return rt


def assert_fixed_point_converged(result: Result, tol: float | None = None) -> None:
    """Assert that a fixed-point encode reached its tolerance at every step (``stats.extra['residuals']``)."""
    if not isinstance(result, Result):
        raise TypeError(f"result must be the Result of a fixed-point encode (flowdiff.encode(..., solver="
                        f"flowdiff.Inversion('fixed_point'))), got {type(result).__name__}")
    extra = result.stats.extra
    if "residuals" not in extra:
        raise ValueError("this result is not a fixed-point inversion (no stats.extra['residuals'])")
    # each step's own tolerance: the default tol, raised where that step's rounding floor exceeds it
    limits = extra["tolerances"] if tol is None else \
        [_check_tolerance("tol", tol)] * len(extra["residuals"])
    bad = [(i, r, t) for i, (r, t) in enumerate(zip(extra["residuals"], limits)) if not r <= t]
    if bad:
        raise AssertionError("fixed-point inversion missed its tolerance at step(s) "
                             + ", ".join(f"{i} (residual {r:.3g} > tol {t:.3g})" for i, r, t in bad[:5]))


#: Round-trip errors all within this many machine epsilons of the images' scale per step are rounding, not an
#: order's error (each step rounds the state once more: an exact round trip's error grows with the steps).
ROUNDING_ULPS = 64


def round_trip_order(flow: ProbabilityFlow, images: Tensor, step_list: Sequence[int], *, sigmas_for=None,
                     **encode_kwargs: Any) -> tuple[float, list[float]]:
    """The fitted slope p of log round-trip error against log step count (error ∝ steps^−p), and the errors.

    An exact round trip has no order and is refused: errors of 0, or each within :data:`ROUNDING_ULPS` epsilons of
    the images' scale per step of its solve (a reversible solver's ulps in float64, which add up over the steps).
    So are errors that do not fall from each step count to the next larger one: outside the asymptotic regime a
    fitted slope is no order (rk4 on a flow-matching Gaussian, shift 3, at 8, 16 and 32 steps: errors 1.3e-5,
    3.7e-3, 1.5e-4, a "slope" of −1.8).

    ``sigmas_for(steps)`` gives the generation grid for a step count (default: the
    schedule's Karras grid reaching σ = 0 smoothly, σ_i = σ_max (1 − i/N)^7, so that every
    step shrinks as N grows).
    """
    counts = list(step_list)
    if len(counts) < 2:
        raise ValueError(f"step_list needs at least 2 step counts, got {counts}")
    if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in counts) \
            or len(set(counts)) != len(counts):
        raise ValueError(f"step_list must hold distinct step counts (ints >= 1) to fit a slope over, got {counts}")
    given = sorted(k for k in ("grid", "steps", "nfe") if k in encode_kwargs)
    if given:
        raise TypeError(f"round_trip_order makes each solve's grid from step_list (by sigmas_for), so it takes no "
                        f"{', '.join(k + '=' for k in given)}; give the grid family as sigmas_for(steps) -> σ values")
    if sigmas_for is None:
        smax = flow.schedule.sigma_max

        def sigmas_for(n: int) -> np.ndarray:
            return smax * (1.0 - np.arange(n + 1) / n) ** 7

    errors = [round_trip_error(flow, images, grid=sigmas_for(int(n)), **encode_kwargs).max_abs for n in counts]
    if not all(math.isfinite(e) and e > 0 for e in errors):
        raise ValueError(f"round-trip errors {errors} at steps {counts}: an order is the slope of log error against "
                         "log steps, and a zero error (an exact round trip) or a non-finite one has no logarithm")
    floor = ROUNDING_ULPS * torch.finfo(images.dtype).eps * max(1.0, float(images.detach().abs().amax()))
    if all(e <= floor * int(n) for e, n in zip(errors, counts)):  # a reversible solver in float64: ulps per step
        raise ValueError(f"round-trip errors {errors} at steps {counts} are all at float rounding (at most "
                         f"{ROUNDING_ULPS} epsilons of the images' scale per step, {floor:.1e} a step): an exact round "
                         "trip's error does not fall with the steps, so it has no order; check it with "
                         "assert_round_trip instead")
    by_steps = sorted(zip(counts, errors))
    rises = [(n0, n1) for (n0, e0), (n1, e1) in zip(by_steps, by_steps[1:]) if not e1 < e0]
    if rises:  # a slope fitted through them is no order (rk4 on a flow-matching Gaussian at 8, 16, 32: -1.8)
        raise ValueError(f"round-trip errors {errors} at steps {counts} do not fall as the steps grow (from "
                         f"{', '.join(f'{a} to {b} steps' for a, b in rises)}): the solves are not in their asymptotic "
                         "regime (or are at float rounding), and a slope fitted through them is no order; give step "
                         "counts where the error falls (more steps), or a grid family (sigmas_for) that resolves the "
                         "model at these counts")
    slope = -float(np.polyfit(np.log(counts), np.log(errors), 1)[0])
    return slope, errors
