"""Small validators shared by the public entry points: a flag that is really a bool, images in the model's range.

Each names the argument, the value and what is accepted (see ../shared/STYLE.md, "Errors").
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

#: How far outside its data range an input may reach, in widths of the range, before it is reported: images
#: for a [−1, 1] model given in [0, 255] are caught, while
#: the overshoot of resampling or of a decoded image is not.
RANGE_SLACK = 1.0

#: Set inside :func:`data_range_checked`: this context's caller has checked the images these are parts of. A
#: context variable, not a warnings filter: a filter is process-wide, so it would also swallow another thread's
#: warning for its own images, and restoring the filter list on exit would drop filters other threads added.
_RANGE_CHECKED: contextvars.ContextVar[bool] = contextvars.ContextVar("flowdiff_range_checked", default=False)


def check_device(device: object, name: str = "device") -> torch.device:
    """``device`` as a torch.device, refused with a ValueError naming it when it is no device or does not exist on
    this machine (torch says "Torch not compiled with CUDA enabled" in an AssertionError, or names its internals)."""
    try:
        target = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:0')") from None
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {device!r}: CUDA is not available in this torch build or on this machine")
        if target.index is not None and target.index >= torch.cuda.device_count():
            raise ValueError(f"{name} {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif target.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{name} {device!r}: MPS is not available on this machine")
    return target


def check_has_values(x: Tensor, name: str) -> None:
    """Refuse a tensor on the ``meta`` device: it has a shape and no values, so the first check that reads one
    (NaN/inf) would fail inside torch ("Tensor.item() cannot be called on meta tensors")."""
    if x.is_meta:
        raise ValueError(f"{name} is on the device 'meta', which holds shapes but no values; give a tensor on the "
                         "CPU or a GPU")


def functorch_levels(x: Tensor) -> tuple[Tensor, bool]:
    """``(values, vmapped)``: the tensor under every ``torch.func`` level around ``x`` (under ``vmap``, the whole
    batch that the transform maps over) and whether one of those levels is a ``vmap``.

    Checks that read values on the host (NaN/inf) run on those values: once over the whole mapped batch, which
    ``vmap`` allows, where a Python branch on the mapped tensor is "data-dependent control flow" to it. Other
    transforms (``jvp``, ``grad``) wrap the same values without a batch."""
    from torch._C import _functorch  # torch.func's own wrappers: no public test for them

    vmapped = False
    while _functorch.is_functorch_wrapped_tensor(x):
        vmapped = vmapped or _functorch.is_batchedtensor(x)
        x = _functorch.get_unwrapped(x)
    return x, vmapped


def functorch_transforms() -> list[str]:
    """The torch.func transforms running around the caller, outermost first, by torch's names (``"Vmap"``, ``"Grad"``
    for every reverse mode: grad, vjp, jacrev; ``"Jvp"`` for forward mode: jvp, jacfwd); empty outside them."""
    from torch._C import _functorch  # torch.func's own interpreter stack: no public reader for it

    stack = getattr(_functorch, "get_interpreter_stack", None)
    if stack is None:  # an older torch: whether any transform runs, not which
        active = getattr(torch._C, "_are_functorch_transforms_active", None)
        return ["Grad"] if active is not None and active() else []
    return [interpreter.key().name for interpreter in stack() or ()]


def vmap_may_map_states(transforms: list[str]) -> bool:
    """Whether a ``torch.func.vmap`` among ``transforms`` (:func:`functorch_transforms`, outermost first) may map
    what a solve computes although none of its inputs is mapped: the model may close over mapped tensors (an
    ensemble's weights stacked by ``torch.func.stack_module_state``), and the states become mapped at its first
    evaluation. So is every vmap but one right around a forward-mode transform: ``vmap(f)``, ``vmap(grad(f))``
    (per-member gradients of an ensemble), ``grad(vmap(f))``, ``vmap(vmap(f))``. ``jacfwd`` (and ``hessian``,
    ``jacfwd(jacrev)``) is a vmap right around a ``jvp``, which maps the tangents alone, and no check reads them;
    ``jacrev`` runs its forward pass under ``grad`` alone (its vmap maps the cotangents of the backward pass)."""
    return any(kind == "Vmap" and transforms[i + 1:i + 2] != ["Jvp"] for i, kind in enumerate(transforms))


def refusing_mapped_output(eps: Callable[[float, Tensor], Tensor], refusal: str) -> Callable[[float, Tensor], Tensor]:
    """``eps(σ, x̄)`` that raises ``ValueError(refusal)`` at the first evaluation whose output is mapped by a
    ``torch.func.vmap``: for a solve under vmaps that each sit right around a jvp, which
    :func:`vmap_may_map_states` lets pass (``jacfwd``'s maps the tangents alone), where a user's
    ``vmap(lambda w: jvp(...))`` over an ensemble's stacked weights, closed over by the model, maps the states from
    the first evaluation on and what reads them on the host would stop inside torch (".item()" on a mapped tensor)."""
    def checked(sigma: float, xbar: Tensor) -> Tensor:
        out = eps(sigma, xbar)
        if functorch_levels(out)[1]:
            raise ValueError(refusal)
        return out
    return checked


def check_flags(**flags: object) -> None:
    """``TypeError`` for any flag that is not a bool: ``final_euler="False"`` would otherwise count as True."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


#: Seeds ``torch.Generator.manual_seed`` takes: 0 … 2⁶⁴ − 1.
MAX_SEED = 2**64 - 1


def check_seed(seed: object, name: str = "seed") -> int:
    """An int seed in 0 … 2⁶⁴ − 1 (torch's own error past it, "Overflow when unpacking long long", names nothing;
    it silently wraps negative seeds)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"{name} must be an int seed in [0, 2**64 - 1], got {type(seed).__name__} {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be an int seed in [0, 2**64 - 1], got {seed}")
    return int(seed)


def check_model_kwargs(model_kwargs: object) -> Mapping[str, Any] | None:
    """``model_kwargs`` is ``None`` or a mapping with string keys (the keyword arguments of the model)."""
    if model_kwargs is None:
        return None
    if not isinstance(model_kwargs, Mapping):
        raise TypeError(f"model_kwargs must be a mapping of keyword arguments to the model (or None), got "
                        f"{type(model_kwargs).__name__}")
    bad = [k for k in model_kwargs if not isinstance(k, str)]
    if bad:
        raise TypeError(f"model_kwargs keys must be argument names (str), got {bad!r}")
    return model_kwargs


def check_data_range(x: Tensor, name: str = "images", data_range: tuple[float, float] = (-1.0, 1.0)) -> None:
    """Warn (``UserWarning``) when ``x`` reaches beyond ``data_range`` by more than :data:`RANGE_SLACK` widths.

    A warning, not an error: latent-space models have no hard range, and an encode of values outside it is
    well defined; but images on the wrong scale (e.g. [0, 255] for a [−1, 1] model) encode to latents far from
    N(0, I) and decode to something else, so they should not pass unnoticed. One host sync.
    """
    lo, hi = (float(v) for v in data_range)
    if x.numel() == 0 or _RANGE_CHECKED.get():
        return
    xmin, xmax = (float(v) for v in torch.aminmax(x.detach().reshape(-1).to(torch.float64)))
    width = hi - lo
    if not (math.isfinite(xmin) and math.isfinite(xmax)):
        return  # non-finite values are reported by the state checks
    if xmin < lo - RANGE_SLACK * width or xmax > hi + RANGE_SLACK * width:
        warnings.warn(f"{name} span [{xmin:.4g}, {xmax:.4g}], far outside the model's data range [{lo:g}, {hi:g}]; "
                      f"rescale them (8-bit pixels v: v / 127.5 - 1)", UserWarning, stacklevel=3)


@contextlib.contextmanager
def data_range_checked() -> Iterator[None]:
    """Skip :func:`check_data_range` inside the block, for a function that checked its whole input once itself
    and then encodes parts of it many times (a grid or encoder fit): one call, one warning. Only this thread's
    (this context's) checks are skipped, and no other warning is touched: a part lies within the range of the
    whole already checked, so no warning it could raise is lost."""
    token = _RANGE_CHECKED.set(True)
    try:
        yield
    finally:
        _RANGE_CHECKED.reset(token)


def refuse_removed(function: str, removed: Mapping[str, Any], replacements: Mapping[str, str]) -> None:
    """A keyword ``function`` no longer takes (caught by its ``**removed``): a TypeError naming its replacement
    when ``replacements`` has one (flowdiff 0.x removes a second spelling instead of deprecating it)."""
    if not removed:
        return
    name = next(iter(removed))
    if name in replacements:
        raise TypeError(f"{function}() got an unexpected keyword argument {name!r}: removed in flowdiff 0.x; use "
                        f"{replacements[name]}")
    raise TypeError(f"{function}() got an unexpected keyword argument {name!r}")


def model_kwargs_rows(model_kwargs: Mapping[str, Any] | None, batch: int, rows: slice) -> dict[str, Any]:
    """The model keywords of the batch's ``rows`` (a slice): a tensor whose leading size is the batch is sliced to
    them; anything else (a scalar, a tensor of leading size 1 broadcast over the batch, a flag) is the same for every
    row. (The calibration halves of :func:`flowdiff.tune`, :func:`flowdiff.learn_solver`, :func:`flowdiff.learn_encoder`
    and :func:`flowdiff.tune_roundtrip` are the batch's even and odd rows; the likelihood's chunks are slices.)"""
    return {key: value[rows] if isinstance(value, Tensor) and value.ndim > 0 and value.shape[0] == batch else value
            for key, value in (check_model_kwargs(model_kwargs) or {}).items()}
