"""Checks at the entry of the solve functions (and of the loop that replaces them): what ``y0`` and flags may be.

Each error names the argument, the value and what is accepted. A loop calls :func:`check_state` once on the
start state, :func:`check_flags` once on its boolean options, and may call :func:`check_derivative` on the
first evaluation of the vector field (one comparison of dtypes and shapes, no host sync).
"""

from __future__ import annotations

from torch import Tensor

_REAL = "float64, float32, float16 or bfloat16"


def check_state(y: object, name: str = "y0") -> Tensor:
    """``y`` is a real floating-point tensor: an integer or complex start state would be silently promoted or fail
    deep inside a step (torch's "alpha must not be a floating point number")."""
    if not isinstance(y, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
    if not y.is_floating_point():
        raise TypeError(f"{name} must be a real floating-point tensor ({_REAL}), got {y.dtype}; convert it first, "
                        f"e.g. {name}.double()")
    return y


def check_flags(**flags: object) -> None:
    """Each flag is a bool: a string such as ``"False"`` would count as True."""
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")


def check_derivative(k: object, y: Tensor, t: float, time_name: str = "t") -> Tensor:
    """The vector field's value ``k = f(t, y)`` is a tensor of ``y``'s shape and dtype (not complex, not another
    precision); a ``TypeError``/``ValueError`` that names the time otherwise."""
    if not isinstance(k, Tensor):
        raise TypeError(f"the vector field returned {type(k).__name__} at {time_name}={t:.6g}; it must return a "
                        "torch.Tensor")
    if k.dtype != y.dtype:
        kind = "complex" if k.is_complex() else str(k.dtype)
        raise TypeError(f"the vector field returned a {kind} tensor at {time_name}={t:.6g} for a {y.dtype} state; it "
                        f"must return the state's dtype ({y.dtype})")
    if k.shape != y.shape:
        raise ValueError(f"the vector field returned shape {tuple(k.shape)} at {time_name}={t:.6g} for a state of "
                         f"shape {tuple(y.shape)}")
    return k
