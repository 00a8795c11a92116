"""The float64 reference a fixed-budget solve is measured against, its error estimate, and its file.

:func:`reference_solution` solves the probability-flow ODE from one batch of noise to high accuracy
(adaptive, float64) and estimates its own error; :class:`Reference` holds the image and its cost and
saves it to safetensors, so that a comparison, a tuning run or a command line keeps it across runs.
A reference records what it belongs to (the flow's fingerprint with its conditioning, and a digest of the
noise), and :func:`check_reference` refuses it beside another flow, other conditioning or other noise.
It lives apart from :mod:`flowdiff.tools.compare` so that :mod:`flowdiff.tools.tuning` uses it
without importing the comparison that imports tuning.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import hashlib
import math
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers as _solvers

from ..api.adaptive import RK_CONTROLLER, to_zero_in_log_sigma
from ..api.sampling import generate
from ..engine._checks import check_has_values
from ..engine.fingerprint import flow_fingerprint, in_precision, precision_fingerprints
from ..engine.flow import ProbabilityFlow, check_from_noise
from ..engine.loop import solve_flow
from ..engine.options import Adaptive


@dataclass(frozen=True)
class Reference:
    """The float64 reference image ``x`` from noise started at ``sigma_start``, solved to ``sigma_end``.

    ``nfe`` and ``wall_time`` are the reference solve's own cost, ``error_nfe`` the cost of the second solve
    that checks it (the whole reference costs ``nfe + error_nfe``; files written before it was recorded, format
    ``flowdiff.Reference/2``, read it as 0). ``error`` estimates its
    RMS error from a second solve at 100× looser tolerances, assuming tolerance
    proportionality (global error ∝ tolerance, Hairer, Nørsett & Wanner, "Solving Ordinary
    Differential Equations I", §II.4): with e_tight = c·tol and e_loose = 100·c·tol,
    ‖x_loose − x_tight‖ ≈ 99·e_tight, so ``error`` = ‖x_loose − x_tight‖_RMS / 99.

    What it belongs to, checked by :func:`check_reference` wherever a reference is passed in (``compare(reference=)``):
    ``flow_keys``, the :func:`flowdiff.flow_fingerprint` of the flow it was solved from without conditioning,
    ``conditioning_keys``, the same with its ``model_kwargs`` (class labels repeated over the batch count as one
    label, as for tuned grids and learned solvers), each for the network as given and for a copy of it in every
    other floating precision (a run in float16 of the network the reference solved in float64 is measured against
    it), the conditioning's floating tensors likewise (float16 prompt embeddings beside a float16 network), and
    ``noise_keys``, digests of the noise's values and of them rounded to each lower precision. A file
    written before they were recorded (format ``flowdiff.Reference/3`` or older) and a reference built by hand
    hold none: :func:`check_reference` can check only their shape and says so in a warning. They are not part of
    a reference's value (``==`` compares the image and its solve).
    """

    x: Tensor
    sigma_start: float
    sigma_end: float
    solver: str
    rtol: float
    atol: float
    nfe: int
    wall_time: float
    error: float
    error_nfe: int = 0
    flow_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)
    conditioning_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)
    noise_keys: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def save(self, path: str | Path, key: str = "") -> Path:
        """Write this reference to a safetensors file, with ``key`` saying what it belongs to."""
        from safetensors.torch import save_file

        meta = {"format": _REFERENCE_FORMAT, "key": key, "sigma_start": self.sigma_start.hex(),
                "sigma_end": self.sigma_end.hex(), "solver": self.solver,
                "rtol": self.rtol.hex(), "atol": self.atol.hex(), "nfe": str(self.nfe),
                "wall_time": repr(self.wall_time), "error": repr(self.error),
                "error_nfe": str(self.error_nfe), "flow_keys": ",".join(self.flow_keys),
                "conditioning_keys": ",".join(self.conditioning_keys), "noise_keys": ",".join(self.noise_keys)}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"x": self.x.detach().to("cpu", torch.float64).contiguous()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path, key: str | None = None) -> Reference | None:
        """Read a reference written by :meth:`save`; ``None`` if ``key`` is given and differs from the file's."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") not in (_REFERENCE_FORMAT, *_OLDER_FORMATS):
                raise ValueError(f"{path} is not a flowdiff reference file (format {meta.get('format')!r})")
            if key is not None and meta.get("key") != key:
                return None
            x = fh.get_tensor("x")
        return cls(x, float.fromhex(meta["sigma_start"]), float.fromhex(meta["sigma_end"]), meta["solver"],
                   float.fromhex(meta["rtol"]),
                   float.fromhex(meta["atol"]), int(meta["nfe"]), float(meta["wall_time"]), float(meta["error"]),
                   int(meta.get("error_nfe", "0")), *(_keys(meta.get(name, "")) for name in _KEY_FIELDS))


def _keys(text: str) -> tuple[str, ...]:
    return tuple(text.split(",")) if text else ()


_KEY_FIELDS = ("flow_keys", "conditioning_keys", "noise_keys")
_REFERENCE_FORMAT = "flowdiff.Reference/4"
#: still read: ``/3`` recorded no keys (checked on its shape only), ``/2`` nor ``error_nfe`` (read as 0)
_OLDER_FORMATS = ("flowdiff.Reference/3", "flowdiff.Reference/2")
#: the floating precisions a run may use, in which a reference's flow and noise are also recorded
_PRECISIONS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

_CACHE: weakref.WeakKeyDictionary[ProbabilityFlow, dict[tuple, Reference]] = weakref.WeakKeyDictionary()


def clear_reference_cache() -> None:
    """Forget every cached reference."""
    _CACHE.clear()


def _float64_flow(flow: ProbabilityFlow) -> ProbabilityFlow:
    """The flow with its network in float64 when it is a torch module in another precision.

    A σ-native flow (closed-form models) and a non-module callable are used as given: they
    must accept float64 input themselves.
    """
    model = flow.model
    if flow.sigma_field is not None or not isinstance(model, torch.nn.Module):
        return flow
    params = [p for p in model.parameters() if p.is_floating_point()]
    if all(p.dtype == torch.float64 for p in params):
        return flow
    # a copy of the flow itself: a new ProbabilityFlow dropped the timesteps table (the reference then fed the model
    # t(σ) where the flow feeds the table's time) and a DiffusersFlow's own attributes
    return flow.with_model(copy.deepcopy(model).double())


def _noise_key(noise: Tensor) -> tuple:
    data = noise.detach().to("cpu", torch.float64).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=16).hexdigest(), tuple(noise.shape), str(noise.device)


def _values_key(x: Tensor) -> str:
    """A digest of the values and shape of ``x``, whatever its dtype or device (its values read as float64)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(str(tuple(x.shape)).encode())
    h.update(x.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def _noise_keys(noise: Tensor) -> tuple[str, ...]:
    """The digests the noise may be given with: its own values, and them rounded to each other precision."""
    return tuple(dict.fromkeys(_values_key(noise.detach().to(dtype)) for dtype in (noise.dtype, *_PRECISIONS)))


def _flow_keys(flow: ProbabilityFlow,
               model_kwargs: Mapping[str, Any] | None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fingerprints of ``flow`` alone and with ``model_kwargs``, for its network as given and cast to each
    precision (:func:`~flowdiff.engine.fingerprint.precision_fingerprints`, one tensor at a time: no copy of the
    network); ``()`` for what cannot be fingerprinted (a plain-function σ field, conditioning whose digest
    would change between runs)."""
    try:
        alone = precision_fingerprints(flow, None, _PRECISIONS)
    except TypeError:
        return (), ()
    if not model_kwargs:
        return alone, alone
    try:  # the conditioning's floating tensors in each precision too (prompt embeddings beside a float16 network)
        keys = [key for kwargs in _kwargs_in_precisions(model_kwargs)
                for key in precision_fingerprints(flow, kwargs, _PRECISIONS)]
    except TypeError:  # conditioning that cannot be digested the same way in every run
        return alone, ()
    return alone, tuple(dict.fromkeys(keys))


def _kwargs_in_precisions(model_kwargs: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """``model_kwargs`` as given, then with every floating tensor in it cast to each of the precisions (where it
    holds any): the same conditioning a run in another precision is given."""
    def floating(value: Any) -> bool:
        if isinstance(value, Tensor):
            return value.is_floating_point()
        if isinstance(value, Mapping):
            return any(floating(v) for v in value.values())
        return isinstance(value, (list, tuple)) and any(floating(v) for v in value)

    if not floating(model_kwargs):
        return [model_kwargs]
    return [model_kwargs, *(in_precision(dict(model_kwargs), dtype) for dtype in _PRECISIONS)]


#: What :func:`checked_reference` has checked, while its block runs: :func:`_held` of its arguments.
_CHECKED: contextvars.ContextVar[list[tuple[object, int | None]] | None] = contextvars.ContextVar(
    "checked_reference", default=None)


def _leaves(value: object) -> list[tuple[object, int | None]]:
    """``value``'s leaves through mappings (keys too), lists and tuples, each with its version counter where it is a
    tensor (a write in place counts it up): what must be the very same objects, unwritten, for a check to stand."""
    if isinstance(value, Tensor):
        return [(value, value._version)]
    if isinstance(value, Mapping):
        return [leaf for key, item in value.items() for leaf in [(key, None), *_leaves(item)]]
    if isinstance(value, (list, tuple)):
        return [leaf for item in value for leaf in _leaves(item)]
    return [(value, None)]


def _held(reference: object, flow: ProbabilityFlow, noise: Tensor,
          model_kwargs: object) -> list[tuple[object, int | None]]:
    """The objects a check of ``reference`` read, by identity and tensor version: the four arguments, the noise's
    and ``model_kwargs``' tensors, and the network's parameters and buffers (or the model object's attributes), so
    that noise refilled in place, a label replaced or weights trained inside the block are checked again."""
    field = getattr(flow, "sigma_field", None)
    owner = getattr(field, "__self__", None) if field is not None else getattr(flow, "model", None)
    if isinstance(owner, torch.nn.Module):
        weights: object = owner.state_dict(keep_vars=True)
    else:
        weights = dict(vars(owner)) if hasattr(owner, "__dict__") else None
    return _leaves((reference, flow, noise, model_kwargs, weights))


@contextlib.contextmanager
def checked_reference(reference: object, flow: ProbabilityFlow, noise: Tensor,
                      model_kwargs: Mapping[str, Any] | None = None) -> Iterator[Reference]:
    """:func:`check_reference` once, on entering; inside the block, a check of these very objects (the same
    reference, flow, noise and ``model_kwargs``, by identity, none of their tensors or the network's weights
    written in place since) returns at once. For a caller that runs :func:`flowdiff.compare` many times against one
    reference (:func:`flowdiff.runs.distributed.compare`, once per job): the check computes the flow's
    fingerprints, a pass over every weight."""
    checked = check_reference(reference, flow, noise, model_kwargs)
    token = _CHECKED.set(_held(reference, flow, noise, model_kwargs))
    try:
        yield checked
    finally:
        _CHECKED.reset(token)


def check_reference(reference: object, flow: ProbabilityFlow, noise: Tensor,
                    model_kwargs: Mapping[str, Any] | None = None) -> Reference:
    """``reference`` if it belongs to ``flow`` with ``model_kwargs`` and to ``noise``, else an error naming it.

    The one check of every ``reference=`` argument: ``TypeError`` for a non-:class:`Reference`, ``ValueError`` for
    another shape, other noise (its values differ, also rounded to the noise's precision), another flow (network,
    weights, schedule or prediction type) or other conditioning (``model_kwargs``: class labels missing, added or
    different), each saying what to do. What the reference does not record (a file of format
    ``flowdiff.Reference/3`` or older, a reference built by hand, a flow or conditioning that cannot be
    fingerprinted) is not checked, and a ``UserWarning`` says so.
    """
    if not isinstance(reference, Reference):
        raise TypeError(f"reference must be a flowdiff.Reference or None, got {type(reference).__name__}")
    held = _CHECKED.get()
    if held is not None:
        now = _held(reference, flow, noise, model_kwargs)
        if len(now) == len(held) and all((a is b or isinstance(a, str) and a == b) and u == v  # keys: equal text
                                         for (a, u), (b, v) in zip(now, held)):
            return reference  # checked on entering checked_reference's block, and nothing written since
    if tuple(reference.x.shape) != tuple(noise.shape):
        raise ValueError(f"reference has shape {tuple(reference.x.shape)}, the noise {tuple(noise.shape)}; "
                         "a reference belongs to one batch of noise")
    again = ("solve the reference for these with flowdiff.reference_solution(flow, noise, model_kwargs=...) (or "
             "leave reference= out: compare solves it)")
    never = ("it records nothing to check it against (a file written before flowdiff recorded it, format "
             "flowdiff.Reference/3 or older, or a Reference built by hand); solve it again with "
             "flowdiff.reference_solution (flowdiff compare --fresh-reference) to have it checked")
    unchecked: dict[str, str] = {}  # what cannot be checked: why
    if not reference.noise_keys:
        unchecked["the noise"] = never
    elif _values_key(noise) not in reference.noise_keys:
        raise ValueError(f"reference was solved from other noise than the noise given (same shape "
                         f"{tuple(noise.shape)}, other values, also rounded to {noise.dtype}): pass the noise it was "
                         f"solved from, or {again}")
    try:
        alone = flow_fingerprint(flow, None)
    except TypeError as err:
        unchecked["the flow"] = (f"the flow given cannot be fingerprinted ({err}); a wrapper around a model hides it: "
                                 "give the model's own flow to have it checked")
    else:
        if not reference.flow_keys:
            unchecked["the flow"] = never if not reference.noise_keys else (
                "its flow could not be fingerprinted when it was solved (see flowdiff.flow_fingerprint)")
        elif alone not in reference.flow_keys:
            raise ValueError(f"reference was solved with another flow (fingerprint {reference.flow_keys[0]}; the flow "
                             f"given has {alone}: another network, weights, schedule or prediction type): {again}")
        else:
            unchecked.update(_check_conditioning(reference, flow, model_kwargs, again))
    if unchecked:
        reasons = list(dict.fromkeys(unchecked.values()))
        warnings.warn(f"reference: {' and '.join(unchecked)} cannot be checked against what it was solved for, only "
                      f"its shape{'' if 'the noise' in unchecked else ' and noise'}: {'; '.join(reasons)}",
                      UserWarning, stacklevel=3)
    return reference


def _check_conditioning(reference: Reference, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None,
                        again: str) -> dict[str, str]:
    """Refuse other conditioning than the reference's; what cannot be checked, and why, if anything."""
    if not reference.conditioning_keys:
        return {"the conditioning (model_kwargs)": "its model_kwargs could not be fingerprinted when it was solved "
                                                   "(see flowdiff.flow_fingerprint)"}
    had = set(reference.conditioning_keys) != set(reference.flow_keys)
    try:
        given = flow_fingerprint(flow, model_kwargs)
    except TypeError as err:
        return {"the conditioning (model_kwargs)": f"the model_kwargs given cannot be fingerprinted ({err})"}
    if given in reference.conditioning_keys:
        return {}
    if not model_kwargs:
        what = "with model_kwargs (conditioning such as class labels), and none are given: pass them"
    elif not had:
        what = f"without model_kwargs, and model_kwargs {sorted(model_kwargs)} are given: leave them out"
    else:
        what = (f"with other model_kwargs than the {sorted(model_kwargs)} given (other values, such as other class "
                "labels): pass the ones it was solved with")
    raise ValueError(f"reference was solved {what}, or {again}")


_LOOSER = 100.0


def check_tolerance(name: str, value: object) -> float:
    """A reference tolerance as a float: any real number (int, float, NumPy scalar) in (0, 1e-3]; bools, NaN and
    numbers outside are refused naming ``name``."""
    if (isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating))
            or not (0 < value <= 1e-3)):
        raise ValueError(f"{name} must be a number in (0, 1e-3] (a reference is a tight solve), got {value!r}")
    return float(value)


def reference_solution(
    flow: ProbabilityFlow,
    noise: Tensor,
    *,
    sigma_start: float | None = None,
    sigma_end: float | None = None,
    solver: str = "dopri8",
    rtol: float = 1e-9,
    atol: float = 1e-9,
    model_kwargs: Mapping[str, Any] | None = None,
    cache: bool = True,
    progress: bool = False,
) -> Reference:
    """The high-accuracy image from ``noise`` (DDIM scale, x_T ~ N(0, I)), the limit the fixed grids converge to (on a
    flow-matching flow the exact solution from t = 1, where its FlowMatch samplers start; below).

    An adaptive float64 solve from σ_start (default: the schedule's σ_max; σ = ∞ where the noise is pure noise
    there, below) down to σ_end,
    then the step every fixed grid ends with, Euler from its last σ into σ = 0, which is the
    model's denoised image x̄ − σ_end·ε(x̄, σ_end). σ_end defaults to the schedule's smallest
    trained σ: a trained model knows no σ below it (its timestep is clamped to 0 there), the
    grids ``leading``, ``linear``, ``quadratic``, ``karras`` and ``logsnr`` end there and ``trailing`` approaches
    it as steps grow, so fixed-grid errors fall to 0 with NFE instead of settling on the error of
    that one fixed last step. ``sigma_end=0`` solves the ODE itself to σ = 0 (for closed-form
    models, exact down to 0).

    On a zero-terminal-SNR schedule (σ_max = ∞, :mod:`flowdiff.engine.terminal`) it starts as
    ``generate`` does: the boundary step out of pure noise, x̄ = x̂₀ + σ₁·noise (one evaluation, in
    ``nfe``), to the schedule's largest finite σ₁ (which every timestep grid's second σ is at or below), then
    the adaptive solve from σ₁; ``sigma_start`` stays ∞. An ``epsilon`` model (no x̂₀ at σ = ∞) is refused
    there before any evaluation; ``sigma_start=σ`` solves it from a finite σ.

    On a flow-matching schedule (rectified flow: SD3, Flux) the noise is the pure-noise sample x at t = 1
    (σ = ∞), where diffusers' FlowMatch samplers start, and a flow with the step out of it (a ``velocity``
    ``model(x_t, t)``, :func:`flowdiff.engine.flow.check_from_noise`) is solved from there by default: the exact
    solution for the noise, which those samplers converge to. It is the same boundary step, to
    σ₁ = :func:`last_finite_sigma` (:data:`FLOW_MATCHING_BOUNDARY_SIGMA`, far above the table's σ_max, so that
    the step's own error is below any tolerance), then the adaptive solve; ``sigma_start`` stays ∞. The fixed
    grids of ``generate`` start at σ_max, reading the noise as x̄ = noise·√(1+σ_max²), and differ from it by
    that start (``benchmarks/RESULTS.md``, engineer F8): ``sigma_start=flow.schedule.sigma_max`` is the solution
    they converge to. A flow without the step (a σ-native field, an ``epsilon`` model) has no t = 1: its default
    start stays σ_max, and ``sigma_start=math.inf`` is refused for it before any evaluation.

    The solve runs in τ = log σ (dx̄/dτ = σ·ε, steps relative in σ, where the image forms in
    the last few percent of the σ range) with the error measured in the image's scale
    (:func:`flowdiff.api.adaptive.image_norm`); with ``sigma_end=0`` it is
    ``generate(..., adaptive=Adaptive(rtol, atol))``. A torch network in another precision is copied to
    float64 for it. Cached per (flow, noise values, σ_start, σ_end, solver, tolerances)
    unless ``cache=False`` or ``model_kwargs`` are given (conditioning is not hashed); a network whose weights
    changed in place since is solved again.
    ``error`` is estimated from the same solve at 100× looser tolerances (see
    :class:`Reference`). ``progress=True`` shows a tqdm bar of the σ reached on stderr.

    A model that draws random numbers (dropout in training mode) gives the solve another field at
    every call: the adaptive steps shrink without end. Where the first accepted step drew from
    torch's generator, the model is evaluated twice more at the state it reached (counted in
    ``nfe``); outputs that differ beyond rounding are a ValueError naming the model, before
    the solve goes on.
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    if not isinstance(noise, Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point torch.Tensor, got {type(noise).__name__}")
    check_has_values(noise, "noise")
    flow.check_input(noise, "noise")
    rtol, atol = check_tolerance("rtol", rtol), check_tolerance("atol", atol)
    if not _solvers.get(solver).adaptive:
        raise ValueError(f"the reference needs an adaptive solver; got {solver!r}, adaptive solvers: "
                         f"{', '.join(_solvers.available(adaptive=True))}")
    s0 = default_sigma_start(flow) if sigma_start is None else float(sigma_start)
    from_infinity = s0 == math.inf and _noise_at_infinity(flow)
    if from_infinity:  # zero terminal SNR, flow matching's t = 1: generate's boundary step out of σ = ∞, then the solve
        check_reference_from_infinity(flow)
    elif not (math.isfinite(s0) and s0 > 0):
        raise ValueError(f"sigma_start must be a finite number > 0, math.inf on a zero-terminal-SNR or flow-matching "
                         f"schedule (where the noise is pure noise), or None (default: {default_sigma_start(flow):.6g} "
                         f"here), got {sigma_start!r} on {flow.schedule!r}")
    s_end = flow.schedule.sigma_min if sigma_end is None else float(sigma_end)
    if not (math.isfinite(s_end) and 0 <= s_end < s0):
        raise ValueError(f"sigma_end must lie in [0, sigma_start={s0:.6g}), got {sigma_end!r}")
    if from_infinity and not s_end < last_finite_sigma(flow.schedule):  # the solve goes on from there, downwards
        raise ValueError(f"sigma_end must lie in [0, {last_finite_sigma(flow.schedule):.6g}) on this schedule from "
                         "σ = ∞: the reference takes the boundary step out of σ = ∞ to "
                         f"{last_finite_sigma(flow.schedule):.6g}, and solves down from there; got {sigma_end!r}")
    use_cache = cache and model_kwargs is None
    key = (*_noise_key(noise), s0, s_end, solver, rtol, atol)
    if use_cache:
        hit = _CACHE.get(flow, {}).get(key)
        if hit is not None and _still_its_flow(hit, flow):
            return hit
    flow64 = _float64_flow(flow)
    noise64 = noise.detach().to(torch.float64)
    s_solve = last_finite_sigma(flow.schedule) if from_infinity else s0  # where the adaptive solve starts
    with torch.no_grad(), _SigmaBar(s_solve, progress) as bar:
        start = time.perf_counter()
        boundary = 0
        if from_infinity:  # Euler's limit out of pure noise, x̄ = x̂₀ + σ₁·noise (one evaluation), as generate takes it
            noise64, boundary = flow64.step_from_noise(noise64, s_solve, model_kwargs), 1
        bar.stage = "reference"
        draws = _RandomDraws(flow64, model_kwargs, noise64.device, bar.callback)
        try:
            tight, nfe = _solve_reference(flow64, noise64, s_solve, s_end, solver, rtol, atol, model_kwargs, draws)
        except _solvers.SolveError:
            if draws.refusal is not None:  # the loop located it at its step; it is the caller's model, not the solve
                raise draws.refusal from None
            raise
        nfe += draws.evaluations + boundary
        wall = time.perf_counter() - start
        bar.stage = "its error check"
        loose, error_nfe = _solve_reference(flow64, noise64, s_solve, s_end, solver, _LOOSER * rtol, _LOOSER * atol,
                                    model_kwargs, bar.callback)
    error = float((loose - tight).pow(2).mean().sqrt()) / (_LOOSER - 1)
    ref = Reference(tight, s0, s_end, solver, rtol, atol, nfe, wall, error, error_nfe,
                    *_flow_keys(flow, model_kwargs), _noise_keys(noise))
    if use_cache:
        _CACHE.setdefault(flow, {})[key] = ref
    return ref


#: Where a flow-matching reference from t = 1 (σ = ∞) lands with the boundary step out of pure noise. That step,
#: x̄₁ = x̂₀ + σ₁·noise, is Euler's: x̄(σ₁) differs from it by about D₁/(2σ₁) (D₁ = lim σ·(x̂₀(σ) − x̂₀(∞)), of the
#: data's variance), and the solve to the image shrinks that by about √var/σ₁, so the image is off by ≈ c/σ₁² with
#: c ≲ 1 for data of unit scale. At the table's σ_max = 2997 (shift 3) that was 1.1e-8 on a closed-form Gaussian
#: (9.8e-8 at shift 1, σ_max = 999), above a 1e-9 tolerance; at 1e6 it is below 1e-12, for 169 evaluations more than
#: from 2997 at 1e-9 (``benchmarks/RESULTS.md``, engineer F8). The model is fed
#: t = T·σ/(1+σ) = T − 0.001 there, between its last trained level and the t = T its FlowMatch samplers feed.
FLOW_MATCHING_BOUNDARY_SIGMA = 1e6


def last_finite_sigma(schedule: Any) -> float:  # noqa: ANN401 - a flowdiff Schedule
    """Where a reference from σ = ∞ goes on after the boundary step: a zero-terminal-SNR schedule's largest finite
    trained σ (its level below its last; every timestep grid's second σ is at or below it), a flow-matching
    schedule's :data:`FLOW_MATCHING_BOUNDARY_SIGMA` (or its σ_max, where that is larger): the exact solution from
    t = 1 is wanted there, not the limit of a grid (its grids start at σ_max). Other schedules: their σ_max."""
    sigmas = np.asarray(schedule.sigmas, dtype=np.float64)
    top = float(sigmas[np.isfinite(sigmas)].max())
    return max(top, FLOW_MATCHING_BOUNDARY_SIGMA) if _flow_matching(schedule) else top


def default_sigma_start(flow: ProbabilityFlow) -> float:
    """Where :func:`reference_solution` starts without ``sigma_start``: the schedule's σ_max (∞ on a zero-terminal-SNR
    schedule), or σ = ∞ (t = 1) on a flow-matching schedule whose flow has the step out of pure noise
    (:func:`flowdiff.engine.flow.check_from_noise`)."""
    if _flow_matching(flow.schedule):
        try:
            check_from_noise(flow)
        except ValueError:  # a σ-native field, an epsilon model: no t = 1
            return flow.schedule.sigma_max
        return math.inf
    return flow.schedule.sigma_max


def _flow_matching(schedule: Any) -> bool:  # noqa: ANN401 - a flowdiff Schedule
    return getattr(schedule, "kind", None) == "flow_matching"


def _noise_at_infinity(flow: ProbabilityFlow) -> bool:
    """Whether the noise can be read as pure noise at σ = ∞: zero terminal SNR, or flow matching's t = 1."""
    return flow.schedule.sigma_max == math.inf or _flow_matching(flow.schedule)


def check_reference_from_infinity(flow: ProbabilityFlow) -> None:
    """Refuse, before any evaluation, a reference from σ = ∞ (σ_max = ∞, or ``sigma_start=math.inf`` on a
    flow-matching schedule) for a flow with no step out of it (an ``epsilon`` model, a σ-native field): its message
    names the prediction type, where it starts and what is accepted."""
    try:
        check_from_noise(flow)
    except ValueError as err:
        reason = str(err).split("; ")[0].replace("where this grid starts", "where it starts")
        if flow.schedule.sigma_max < math.inf:  # flow matching, asked for sigma_start=math.inf
            raise ValueError(f"sigma_start=math.inf: the reference solution would start at flow matching's t = 1 "
                             f"(σ = ∞) with the boundary step out of pure noise, and {reason.split(', where')[0]}; "
                             "accepted from σ = ∞: "
                             "a model(x_t, t) with prediction_type 'velocity', 'v_prediction' or 'sample'. For this "
                             "flow leave sigma_start out: it starts at the schedule's σ_max, where generate's grids "
                             "start") from None
        raise ValueError(f"the reference solution starts at the schedule's σ_max = ∞ (zero terminal SNR) with the "
                         f"boundary step out of pure noise, as generate does, and {reason}; accepted from σ = ∞: a "
                         "model with prediction_type 'v_prediction' or 'sample'. For this model, solve from a finite "
                         "σ: reference_solution(flow, noise, sigma_start=σ) (e.g. σ = make_sigmas(flow.schedule, "
                         "'trailing', n)[1]) beside generate(flow, noise, grid=grid[1:]), or compare(flow, noise, "
                         "reference=that, grids=['leading'])") from None


def _still_its_flow(ref: Reference, flow: ProbabilityFlow) -> bool:
    """Whether a cached ``ref`` still belongs to ``flow``: a network whose weights were changed in place since (a
    training step) is another flow, which :func:`check_reference` would refuse the cached reference for."""
    if not ref.flow_keys:
        return True  # nothing recorded to tell
    try:
        return flow_fingerprint(flow, None) in ref.flow_keys
    except TypeError:
        return True


def _solve_reference(flow: ProbabilityFlow, noise: Tensor, s0: float, s_end: float, solver: str, rtol: float,
                     atol: float, model_kwargs: Mapping[str, Any] | None,
                     callback: Callable[[Any], None] | None) -> tuple[Tensor, int]:
    """The image at σ = 0 and the NFE spent: adaptive in τ = log σ to σ_end, then the Euler step into 0."""
    if s_end == 0.0:
        out = generate(flow, noise, solver=solver,
                       adaptive=Adaptive(rtol=rtol, atol=atol, sigma_start=s0),
                       model_kwargs=model_kwargs, callback=callback)
        return out.x, out.stats.nfe
    form, stepping = to_zero_in_log_sigma(s0, s_end, rtol, atol, RK_CONTROLLER)
    xbar0 = noise * math.sqrt(1.0 + s0 * s0)
    sol = solve_flow(flow.field(model_kwargs), form, stepping, _solvers.get(solver), sigma0=s0, xbar0=xbar0,
                     callback=callback)
    return sol.xbar, sol.stats.nfe


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """torch's CPU generator state, and ``device``'s where it is a CUDA device."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


class _RandomDraws:
    """The reference solve's callback: after its first accepted step, where the model drew from torch's generator
    (dropout in training mode, a noise layer), evaluates it twice at the state reached and refuses it if the two
    differ beyond rounding: an adaptive solve of a field that changes at every call shrinks its steps without end
    (R16: 6.5 min and 7.3 GB before it was killed). ``evaluations`` is what the check spent (0 or 2)."""

    def __init__(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None, device: torch.device,
                 then: Callable[[Any], None] | None) -> None:
        self.flow, self.model_kwargs, self.device, self.then = flow, model_kwargs, device, then
        self.start: tuple[Tensor, Tensor | None] | None = _rng_state(device)
        self.evaluations = 0
        self.refusal: ValueError | None = None

    def __call__(self, state: Any) -> None:
        if self.start is not None:
            now, start, self.start = _rng_state(self.device), self.start, None
            if not (torch.equal(now[0], start[0]) and (now[1] is None or torch.equal(now[1], start[1]))):
                self._check(state.xbar, state.sigma)
        if self.then is not None:
            self.then(state)

    def _check(self, xbar: Tensor, sigma: float) -> None:
        field = self.flow.field(self.model_kwargs)  # as the solve evaluates it (model_kwargs checked there)
        first, second = field(sigma, xbar), field(sigma, xbar)
        self.evaluations = 2
        size = float(first.abs().max())
        gap = float((second - first).abs().max())
        if not gap <= 1e3 * torch.finfo(first.dtype).eps * max(size, 1.0):
            model = self.flow.model
            self.refusal = ValueError(
                f"flow: its model ({type(model).__name__}) draws random numbers: two evaluations of one input at "
                f"σ={sigma:.6g} differ by {gap:.3g} (max|ε| = {size:.3g}), and an adaptive reference solve of a field "
                "that changes at every call shrinks its steps without end; put the model in eval mode (model.eval(), "
                "which turns dropout off) or pass a deterministic model")
            raise self.refusal


class _SigmaBar:
    """A tqdm bar of an adaptive solve's progress from σ_start to 0, measured in log(1 + σ)."""

    def __init__(self, sigma_start: float, enabled: bool) -> None:
        self.total = math.log1p(sigma_start)
        self.enabled = enabled
        self.stage = ""
        self.bar: Any = None
        self.callback = self._update if enabled else None

    def __enter__(self) -> _SigmaBar:
        if self.enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=1000, desc="reference", leave=False,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}")
        return self

    def _update(self, state: Any) -> None:
        done = 1.0 - math.log1p(state.sigma) / self.total
        self.bar.set_description_str(self.stage, refresh=False)
        self.bar.set_postfix_str(f"σ={state.sigma:.3g}, step {state.step + 1}", refresh=False)
        self.bar.update(round(1000 * done) - self.bar.n)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
