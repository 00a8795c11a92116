"""The result of an encode: the DDIM-scale latent and what a decode needs to retrace it.

A :class:`Latent` is self-contained: ``decode(flow, latent)`` needs nothing beside it. Its
main tensor ``x`` is always DDIM's x_T (x̄/√(1+σ_max²)), so it can also be used as plain
noise; a reversible solver's extra state rides along in ``solver_state``, with the record of the
solver and options that made it. ``save``/``load`` write and read one safetensors file (tensors
as tensors, the grid as float64, the rest as JSON metadata), atomically.

A latent knows where it comes from: ``fingerprint`` is :func:`flowdiff.flow_fingerprint` of
the flow and conditioning that encoded it, and ``dtype`` the images' dtype. A decode with
another model, schedule or conditioning would return images off by whatever the models differ
by, with no error; :meth:`Latent.check_model` refuses it (``decode(..., checks=Checks(model=False))``
for those who mean it).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

import solvers
from solvers import ReversibleState

from ._checks import check_device
from ._files import atomic_write, check_folder, regular_file
from .fingerprint import accepted_fingerprints, flow_fingerprint
from .flow import ProbabilityFlow
from .plugins import decodes_with

_FORMAT = "flowdiff.Latent/1"


@dataclass
class Latent:
    """An encoding: the DDIM-scale latent ``x`` (x_T) and what a decode needs to retrace it.

    ``sigmas`` is the encode grid (increasing, starting at 0); ``solver`` and
    ``solver_options`` the method that made it (a registry name and its options);
    ``solver_state`` the extra state of a reversible solver (a
    :class:`solvers.ReversibleState` at σ_max, ``None`` for plain solvers, whose latent is
    ``x`` alone); its ``made_by`` (kept by :meth:`save`, :meth:`load` and :meth:`to`; ``None``
    in files written before it was kept) must be what ``solver`` and ``solver_options`` make,
    and the decode's solve refuses the state if they make another; ``inversion`` names how a
    plain latent was made (``"fixed_point"``) and ``final_euler`` whether the decode it was
    made for takes its last step as Euler.

    ``dtype`` is the dtype of the encoded images, which the decode feeds the model and
    returns (default: ``x.dtype``). A reversible solver keeps ``x`` and its state in float64
    for float32 (or lower) images, since its exact inverse amplifies the rounding of the
    state it starts from; ``x.to(latent.dtype)`` is the plain x_T at the images' precision.

    ``fingerprint`` is the digest of the flow and ``model_kwargs`` that encoded it (``None``:
    unknown, not checked); ``info`` free JSON-serialisable notes kept in the file (the
    ``flowdiff`` command keeps the images' names and formats there).

    ``decode_shifts`` (one per decode step, from σ_max down; ``None``: none) makes the decode
    evaluate each step at t + δ·(t₁ − t₀) (:class:`solvers.Shifted`), as a learned encoder's
    latents require (:class:`flowdiff.LearnedEncoder`, fitted with its decode).
    """

    x: Tensor
    sigmas: np.ndarray
    solver: str
    solver_options: dict[str, Any] = field(default_factory=dict)
    solver_state: Any = None
    inversion: str | None = None
    final_euler: bool | None = None
    dtype: torch.dtype | None = None
    fingerprint: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    decode_shifts: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor):
            raise TypeError(f"Latent.x must be a torch.Tensor, got {type(self.x).__name__}")
        if not self.x.is_floating_point():
            raise TypeError(f"Latent.x must be a floating-point tensor, got {self.x.dtype}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise TypeError(f"Latent.fingerprint must be a str (flowdiff.flow_fingerprint) or None, "
                            f"got {type(self.fingerprint).__name__}")
        if not isinstance(self.info, dict):
            raise TypeError(f"Latent.info must be a dict, got {type(self.info).__name__}")
        if self.inversion is not None and not isinstance(self.inversion, str):
            raise TypeError(f"Latent.inversion must be a str or None, got {self.inversion!r}")
        if self.final_euler is not None and not isinstance(self.final_euler, bool):
            raise TypeError(f"Latent.final_euler must be True, False or None, got {self.final_euler!r}")
        if self.dtype is None:
            self.dtype = self.x.dtype
        if not isinstance(self.dtype, torch.dtype) or not self.dtype.is_floating_point:
            raise TypeError(f"Latent.dtype must be a floating-point torch.dtype (the images' dtype), "
                            f"got {self.dtype!r}")
        s = np.asarray(self.sigmas, dtype=np.float64)
        if s.ndim != 1 or s.size < 2:
            raise ValueError(f"Latent.sigmas must be 1-D with at least 2 values (an encode grid), got shape {s.shape}")
        if not np.all(np.isfinite(s)) or s[0] < 0.0 or np.any(np.diff(s) <= 0):
            # it starts at 0, or at the first trained level for DDIMInverse configs with set_alpha_to_one=False
            raise ValueError("Latent.sigmas must be the encode grid: strictly increasing, finite, starting at σ >= 0")
        self.sigmas = s
        if self.decode_shifts is not None:
            shifts = self.decode_shifts
            if isinstance(shifts, np.ndarray) and shifts.ndim == 1 and shifts.dtype.kind == "f":
                shifts = shifts.tolist()
            if not isinstance(shifts, (tuple, list)):
                raise TypeError(f"Latent.decode_shifts must be a tuple, list or 1-D float array of {s.size - 1} "
                                f"numbers (one per decode step) or None, got {type(shifts).__name__}")
            if (len(shifts) != s.size - 1
                    or not all(isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d)
                               for d in shifts)):
                raise ValueError(f"Latent.decode_shifts must be {s.size - 1} finite numbers (one per decode step) "
                                 f"or None, got {shifts!r:.200}")
            if self.solver_state is not None:
                raise ValueError("Latent.decode_shifts with a reversible solver's state: its exact inverse decode "
                                 "takes no shifts")
            self.decode_shifts = tuple(float(d) for d in shifts)
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
            _check_made_by(st.made_by, self.solver, self.solver_options)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def exact(self) -> bool:
        """True when decoding inverts the encode exactly (a reversible solver's state, or a fixed-point inversion)."""
        return self.solver_state is not None or self.inversion is not None

    def to(self, device: torch.device | str) -> Latent:
        """This latent with every tensor moved to ``device`` (a device only: the state keeps the precision its decode
        needs, float64 for an exact latent; the images' dtype is :attr:`dtype`)."""
        if isinstance(device, torch.dtype):
            raise TypeError(f"Latent.to(device) moves a latent to another device; got the dtype {device}: a latent's "
                            "state keeps the precision its decode needs (float64 for an exact one), and the images' "
                            "dtype the decode returns is Latent.dtype")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"Latent.to: {device!r} is not a torch device (e.g. 'cpu', 'cuda', 'cuda:1')") from None
        st = self.solver_state
        if st is not None:  # the tensors moved; its time and maker (made_by) kept
            st = st._replace(z=st.z.to(device), k=None if st.k is None else st.k.to(device))
        return Latent(self.x.to(device), self.sigmas.copy(), self.solver, dict(self.solver_options), st,
                      self.inversion, self.final_euler, self.dtype, self.fingerprint, dict(self.info),
                      self.decode_shifts)

    def set_origin(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> Latent:
        """Record the fingerprint of the flow and conditioning that made this latent (left ``None`` for a model that
        cannot be fingerprinted, such as a plain-function σ field); returns ``self``."""
        try:
            self.fingerprint = flow_fingerprint(flow, model_kwargs)
        except TypeError:
            self.fingerprint = None
        return self

    def check_model(self, flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> None:
        """Raise ``ValueError`` if ``flow`` and ``model_kwargs`` are not the model, schedule and conditioning this
        latent was encoded with (their :func:`flowdiff.flow_fingerprint` differs from :attr:`fingerprint`).

        A latent without a fingerprint (an older file, or a model that cannot be fingerprinted) is not checked.
        """
        if self.fingerprint is None:
            return
        try:
            accepted = accepted_fingerprints(flow, model_kwargs)  # a file from before the repeated-sample rule too
        except TypeError as err:
            raise ValueError(f"this latent was encoded with the model fingerprinted {self.fingerprint}, and this "
                             f"flow cannot be fingerprinted to check it ({err}); pass "
                             "checks=flowdiff.Checks(model=False) to decode anyway") from None
        if self.fingerprint not in accepted:
            raise ValueError(f"this latent was encoded with another model, schedule or conditioning: its fingerprint "
                             f"is {self.fingerprint}, this flow and model_kwargs give {accepted[0]}; decode with the "
                             "encoding model and model_kwargs, or pass checks=flowdiff.Checks(model=False) to decode "
                             "anyway")

    def check_decode(self, *, solver: str | None = None, steps: int | None = None,
                     sigmas: np.ndarray | None = None, solver_options: dict[str, Any] | None = None) -> None:
        """Raise ValueError naming the mismatch if a decode asks for another solver, step count, grid or options."""
        own = decodes_with(self.solver)
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
        """Write this latent to one safetensors file (read it back with :meth:`Latent.load`), atomically: the file is
        written next to ``path`` and renamed onto it, so a failure leaves an earlier file untouched."""
        from safetensors.torch import save

        path = _check_path(path)
        check_folder(path, "latent file")
        tensors = {"x": self.x.detach().contiguous().cpu(),
                   "sigmas": torch.from_numpy(np.ascontiguousarray(self.sigmas))}
        meta: dict[str, Any] = {"format": _FORMAT, "solver": self.solver, "inversion": self.inversion,
                                "final_euler": self.final_euler, "dtype": str(self.dtype).removeprefix("torch."),
                                "fingerprint": self.fingerprint,
                                "decode_shifts": None if self.decode_shifts is None
                                else [d.hex() for d in self.decode_shifts]}
        for name in ("solver_options", "info"):
            try:
                meta[name] = json.dumps(getattr(self, name), allow_nan=False)
            except (TypeError, ValueError):
                raise TypeError(f"Latent.save: {name} must be JSON-serialisable, got {getattr(self, name)!r}") \
                    from None
        st = self.solver_state
        if st is not None:
            meta["state_t"] = st.t.hex()
            tensors["state.z"] = st.z.detach().contiguous().cpu()
            if st.k is not None:
                tensors["state.k"] = st.k.detach().contiguous().cpu()
            if st.made_by is not None:  # the solver and options that made it: a decode by another is refused
                meta["state_made_by"] = st.made_by
        meta["state"] = sorted(k for k in tensors if k.startswith("state."))  # what a load must find again
        data = _in_key_order(save(tensors, metadata={k: json.dumps(v) for k, v in meta.items()}))
        atomic_write(path, data, "latent file")

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, device: torch.device | str = "cpu") -> Latent:
        """Read a latent written by :meth:`save` (bit-exact: tensors, the float64 grid and σ_max as hex).

        Every way a file can be wrong (missing, empty, truncated, not safetensors, not a latent, an entry missing,
        bad metadata) is a ``ValueError`` (``FileNotFoundError`` when missing) naming the file and what is wrong;
        an unavailable ``device`` is a ``ValueError`` naming it.
        """
        from safetensors.torch import load as load_bytes

        path = _check_path(path)
        name = os.fspath(path)
        try:
            target = check_device(device)
        except ValueError as err:
            raise ValueError(f"latent file {name!r}: cannot load onto {err}") from None
        regular_file(path, "latent file")  # missing, or a FIFO/device/folder: named, never waited on
        data = path.read_bytes()
        if not data:
            raise ValueError(f"latent file {name!r}: the file is empty")
        try:
            tensors = load_bytes(data)
            raw = _safetensors_metadata(data)
        except Exception as err:  # safetensors' own error type, or a header that is not JSON
            raise ValueError(f"latent file {name!r}: not a safetensors file, or truncated "
                             f"({' '.join(str(err).split()) or type(err).__name__})") from None
        meta: dict[str, Any] = {}
        for key, value in raw.items():
            try:
                meta[key] = json.loads(value)
            except (TypeError, ValueError):
                raise ValueError(f"latent file {name!r}: metadata entry {key!r} is not JSON: {value!r:.80}") from None
        if meta.get("format") != _FORMAT:
            raise ValueError(f"latent file {name!r} is not a flowdiff latent file (format {meta.get('format')!r}, "
                             f"expected {_FORMAT!r})")
        for key in ("x", "sigmas"):
            if key not in tensors:
                raise ValueError(f"latent file {name!r}: the tensor {key!r} is missing")
        for key in ("solver", "solver_options"):
            if key not in meta:
                raise ValueError(f"latent file {name!r}: the metadata entry {key!r} is missing")
        dtype = None
        if meta.get("dtype") is not None:
            dtype = getattr(torch, str(meta["dtype"]), None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"latent file {name!r}: unknown images dtype {meta['dtype']!r} in the metadata")
        try:
            options = json.loads(meta["solver_options"]) if isinstance(meta["solver_options"], str) else None
            info = json.loads(meta["info"]) if isinstance(meta.get("info"), str) else meta.get("info", {})
        except ValueError:
            options, info = None, None
        if not isinstance(options, dict):
            raise ValueError(f"latent file {name!r}: metadata solver_options is not a JSON object: "
                             f"{meta['solver_options']!r:.80}")
        if not isinstance(info, dict):
            raise ValueError(f"latent file {name!r}: metadata info is not a JSON object: {meta.get('info')!r:.80}")
        needed = meta["state"] if isinstance(meta.get("state"), list) else _state_keys(meta["solver"], options)
        for key in needed:
            if key not in tensors:
                raise ValueError(f"latent file {name!r}: the tensor {key!r} is missing; solver {meta['solver']!r} "
                                 "needs it to decode this latent exactly, and decoding without it would give other "
                                 "images without a word. Re-encode the images, or use the file as it was written")
        made_by = meta.get("state_made_by")  # absent from files written before it was kept: no record, as then
        if "state_made_by" in meta and not isinstance(made_by, str):
            raise ValueError(f"latent file {name!r}: metadata entry 'state_made_by' must be a string, the solver and "
                             "options that made the reversible state (e.g. \"reversible(base='euler', "
                             f"coupling=0.999)\"), got {made_by!r:.80}")
        if made_by is not None and "state.z" not in tensors:
            raise ValueError(f"latent file {name!r}: metadata entry 'state_made_by' ({made_by!r:.80}) records the "
                             "maker of a reversible state, but the file holds no state (no tensor 'state.z')")
        state = None
        if "state.z" in tensors:
            try:
                t = float.fromhex(meta["state_t"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"latent file {name!r}: the reversible state's time state_t is missing or not a "
                                 f"hex float: {meta.get('state_t')!r}") from None
            state = ReversibleState(t, tensors["state.z"].to(target), _get(tensors, "state.k", target), made_by)
        shifts = meta.get("decode_shifts")
        if shifts is not None:
            try:
                shifts = tuple(float.fromhex(d) for d in shifts)
            except (TypeError, ValueError):
                raise ValueError(f"latent file {name!r}: decode_shifts is not a list of hex floats: "
                                 f"{meta.get('decode_shifts')!r:.80}") from None
        sigmas = tensors["sigmas"]
        if not sigmas.is_floating_point() or sigmas.ndim != 1:
            raise ValueError(f"latent file {name!r}: sigmas must be a 1-D float tensor, got {sigmas.dtype} of shape "
                             f"{tuple(sigmas.shape)}")
        try:
            return cls(tensors["x"].to(target), sigmas.double().numpy(), meta["solver"], options, state,
                       meta.get("inversion"), meta.get("final_euler"), dtype, meta.get("fingerprint"), info, shifts)
        except (TypeError, ValueError) as err:
            raise type(err)(f"latent file {name!r}: {err}") from None


def _state_keys(solver: object, options: dict[str, Any]) -> list[str]:
    """The state tensors a latent of ``solver`` carries (files written before ``save`` listed them): a reversible
    solver's second variable ``state.z``, and ``state.k`` when its carried state holds one (asked of the solver)."""
    try:
        obj = solvers.get(str(solver), **options)
    except (TypeError, ValueError, KeyError):
        return []  # a plug-in's name, or options of another version: nothing to ask
    if not obj.reversible:
        return []
    probe = obj.init(lambda t, y: torch.zeros_like(y), 0.0, torch.zeros(1, dtype=torch.float64))
    return ["state.z"] + (["state.k"] if getattr(probe, "k", None) is not None else [])


def _check_made_by(made_by: object, solver: str, options: dict[str, Any]) -> None:
    """A reversible state's record of its maker (``made_by``; ``None``: no record, as in files written before it was
    kept) agrees with the latent's ``solver`` and ``options``: the decode builds its solver from those and undoes
    the encode with it, so a state made by another (a file whose options were edited by hand) would decode to other
    images. The decode's solve refuses it too; here it is refused where the latent is built or loaded."""
    if made_by is None:
        return
    if not isinstance(made_by, str):
        raise TypeError(f"Latent.solver_state.made_by must be a str (the state_maker of the solver that made the "
                        f"state) or None, got {made_by!r}")
    try:
        own = solvers.get(solver, **options).state_maker
    except (TypeError, ValueError, KeyError) as err:
        raise ValueError(f"Latent.solver_state.made_by (a file's metadata entry 'state_made_by') is {made_by!r}, but "
                         f"solver={solver!r} with solver_options={options} builds no solver to decode it with "
                         f"({err})") from None
    if made_by != own:
        raise ValueError(f"Latent.solver_state.made_by (a file's metadata entry 'state_made_by') is {made_by!r}, but "
                         f"solver={solver!r} with solver_options={options} makes {own!r}: the state was made by "
                         "another solver or options, and its exact decode undoes only those (with these it would "
                         "give other images); keep the solver and solver_options that made it, or encode again")


def _get(tensors: dict[str, Tensor], key: str, device: torch.device) -> Tensor | None:
    value = tensors.get(key)
    return None if value is None else value.to(device)


def _check_path(path: object) -> Path:
    if isinstance(path, bool) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    return Path(path)


def _in_key_order(data: bytes) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` keys in sorted order. safetensors keeps the metadata in
    a hash map whose order changes from one save to the next, so two identical runs wrote latent files that differed
    in their header's bytes. The header is re-written only where it reads back to the same JSON in the same length
    (the padding safetensors adds is kept); the tensors' bytes are not touched."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__")
    if not isinstance(meta, dict):
        return data
    ordered = {"__metadata__": dict(sorted(meta.items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size or json.loads(text) != header:
        return data
    return data[:8] + text.ljust(size) + data[8 + size:]


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (the tensors were read by safetensors itself)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise ValueError("__metadata__ is not an object")
    return meta


def _short(s: np.ndarray) -> str:
    s = np.asarray(s, dtype=np.float64)
    fmt = ", ".join
    if s.size <= 6:
        return f"[{fmt(f'{v:.4g}' for v in s)}]"
    return f"[{fmt(f'{v:.4g}' for v in s[:3])}, …, {fmt(f'{v:.4g}' for v in s[-2:])}] ({s.size - 1} steps)"
