"""The result of an encode: the DDIM-scale latent and what a decode needs to retrace it.

A :class:`Latent` is self-contained: ``decode(flow, latent)`` needs nothing beside it. Its
main tensor ``x`` is always DDIM's x_T (x̄/√(1+σ_max²)), so it can also be used as plain
noise; a reversible solver's extra state rides along in ``solver_state``. ``save``/``load``
write and read one safetensors file (tensors as tensors, the grid as float64, the rest as
JSON metadata).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from solvers import ReversibleState

_FORMAT = "flowdiff.Latent/1"


@dataclass
class Latent:
    """An encoding: the DDIM-scale latent ``x`` (x_T) and what a decode needs to retrace it.

    ``sigmas`` is the encode grid (increasing, starting at 0); ``solver`` and
    ``solver_options`` the method that made it (a registry name and its options);
    ``solver_state`` the extra state of a reversible solver (a
    :class:`solvers.ReversibleState` at σ_max, ``None`` for plain solvers, whose latent is
    ``x`` alone); ``inversion`` names how a plain latent was made (``"fixed_point"``) and
    ``final_euler`` whether the decode it was made for takes its last step as Euler.

    ``dtype`` is the dtype of the encoded images, which the decode feeds the model and
    returns (default: ``x.dtype``). A reversible solver keeps ``x`` and its state in float64
    for float32 (or lower) images, since its exact inverse amplifies the rounding of the
    state it starts from; ``x.to(latent.dtype)`` is the plain x_T at the images' precision.
    """

    x: Tensor
    sigmas: np.ndarray
    solver: str
    solver_options: dict[str, Any] = field(default_factory=dict)
    solver_state: Any = None
    inversion: str | None = None
    final_euler: bool | None = None
    dtype: torch.dtype | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor):
            raise TypeError(f"Latent.x must be a torch.Tensor, got {type(self.x).__name__}")
        if self.dtype is None:
            self.dtype = self.x.dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"Latent.dtype must be a floating-point torch.dtype (the images' dtype), "
                            f"got {self.dtype!r}")
        s = np.asarray(self.sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"Latent.sigmas must be 1-D with at least 2 values (an encode grid), got shape {s.shape}")
        if not np.all(np.isfinite(s)) or s[0] != 0.0 or np.any(np.diff(s) <= 0):
            raise ValueError("Latent.sigmas must be the encode grid: strictly increasing, finite, starting at 0")
        self.sigmas = s
        if not isinstance(self.solver, str) or not self.solver:
            raise TypeError(f"Latent.solver must be a registered solver name (str), got {self.solver!r}")
        if not isinstance(self.solver_options, dict):
            raise TypeError(f"Latent.solver_options must be a dict, got {type(self.solver_options).__name__}")
        st = self.solver_state
        if st is not None:
            if not isinstance(st, ReversibleState):
                raise TypeError("Latent.solver_state must be None or a solvers.ReversibleState, "
                                f"got {type(st).__name__}")
            if st.z.shape != self.x.shape or (st.k is not None and st.k.shape != self.x.shape):
                raise ValueError(f"Latent.solver_state tensors must have the latent's shape {tuple(self.x.shape)}")
            if not math.isclose(st.t, float(s[-1]), rel_tol=1e-12, abs_tol=0.0):
                raise ValueError(f"Latent.solver_state is at σ={st.t!r}, not at the grid's end σ_max={s[-1]!r}")

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def exact(self) -> bool:
        """True when decoding inverts the encode exactly (a reversible solver's state, or a fixed-point inversion)."""
        return self.solver_state is not None or self.inversion is not None

    def to(self, device: torch.device | str) -> Latent:
        """This latent with every tensor moved to ``device``."""
        st = self.solver_state
        if st is not None:
            st = ReversibleState(st.t, st.z.to(device), None if st.k is None else st.k.to(device))
        return Latent(self.x.to(device), self.sigmas.copy(), self.solver, dict(self.solver_options), st,
                      self.inversion, self.final_euler, self.dtype)

    def check_decode(self, *, solver: str | None = None, steps: int | None = None,
                     sigmas: np.ndarray | None = None, solver_options: dict[str, Any] | None = None) -> None:
        """Raise ValueError naming the mismatch if a decode asks for another solver, step count, grid or options."""
        own = "euler" if self.solver == "ddim_inverse" else self.solver
        if solver is not None and solver != own:
            raise ValueError(f"this latent was encoded with solver {self.solver!r} and decodes with {own!r}; "
                             f"got solver={solver!r} (pass latent.x to decode a plain tensor another way)")
        if steps is not None and steps != self.steps:
            raise ValueError(f"this latent was encoded with {self.steps} steps; got steps={steps}")
        if sigmas is not None:
            s = np.asarray(sigmas, dtype=np.float64)
            if not (np.array_equal(s, self.sigmas) or np.array_equal(s, self.sigmas[::-1])):
                raise ValueError(f"this latent was encoded on the grid σ = {_short(self.sigmas)}; got another grid "
                                 f"σ = {_short(s)}")
        if solver_options is not None and dict(solver_options) != self.solver_options:
            raise ValueError(f"this latent was encoded with solver_options={self.solver_options}; "
                             f"got {dict(solver_options)}")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write this latent to one safetensors file (read it back with :meth:`Latent.load`)."""
        from safetensors.torch import save_file

        tensors = {"x": self.x.detach().contiguous().cpu(),
                   "sigmas": torch.from_numpy(np.ascontiguousarray(self.sigmas))}
        meta: dict[str, Any] = {"format": _FORMAT, "solver": self.solver, "inversion": self.inversion,
                                "final_euler": self.final_euler, "dtype": str(self.dtype).removeprefix("torch.")}
        try:
            meta["solver_options"] = json.dumps(self.solver_options)
        except TypeError:
            raise TypeError(f"Latent.save: solver_options must be JSON-serialisable, got {self.solver_options!r}") \
                from None
        st = self.solver_state
        if st is not None:
            meta["state_t"] = st.t.hex()
            tensors["state.z"] = st.z.detach().contiguous().cpu()
            if st.k is not None:
                tensors["state.k"] = st.k.detach().contiguous().cpu()
        save_file(tensors, os.fspath(path), metadata={k: json.dumps(v) for k, v in meta.items()})

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> Latent:
        """Read a latent written by :meth:`save` (bit-exact: tensors, the float64 grid and σ_max as hex)."""
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device)) as fh:
            raw = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118  (safe_open has no __iter__)
        meta = {k: json.loads(v) for k, v in raw.items()}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a flowdiff latent file (format {meta.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        dtype = None
        if meta.get("dtype") is not None:
            dtype = getattr(torch, str(meta["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{os.fspath(path)!r}: unknown images dtype {meta['dtype']!r} in the metadata")
        state = None
        if "state.z" in tensors:
            state = ReversibleState(float.fromhex(meta["state_t"]), tensors["state.z"], tensors.get("state.k"))
        return cls(tensors["x"], tensors["sigmas"].cpu().double().numpy(), meta["solver"],
                   json.loads(meta["solver_options"]), state, meta.get("inversion"), meta.get("final_euler"), dtype)


def _short(s: np.ndarray) -> str:
    s = np.asarray(s, dtype=np.float64)
    fmt = ", ".join
    if s.size <= 6:
        return f"[{fmt(f'{v:.4g}' for v in s)}]"
    return f"[{fmt(f'{v:.4g}' for v in s[:3])}, …, {fmt(f'{v:.4g}' for v in s[-2:])}] ({s.size - 1} steps)"
