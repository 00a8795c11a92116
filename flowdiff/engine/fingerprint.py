"""A digest of what defines a flow, so that files made with one model can refuse another.

The reference kept by ``flowdiff compare``, tuned grids and latent files all record it: the
network's weights (or a closed-form model's tensors), the schedule, the prediction type and,
where given, the conditioning passed as ``model_kwargs``.
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_model_kwargs
from .flow import ProbabilityFlow


def _update(h: Any, value: object) -> None:
    if isinstance(value, Tensor):
        h.update(str((value.dtype, tuple(value.shape))).encode())
        h.update(value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _update(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _update(h, item)
    else:
        h.update(repr(value).encode())


#: values whose digest is their repr, the same in every run (numpy scalars print as ``np.float32(2.0)``)
_STABLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, np.generic)


def _check_stable(value: object, name: str) -> None:
    """Refuse a ``model_kwargs`` value whose digest would change between runs: any other object's repr is its
    address (``<Foo object at 0x7f…>``), so a tuned grid or learned solver saved with it never loads again."""
    if isinstance(value, Tensor) or isinstance(value, _STABLE):
        return
    if isinstance(value, Mapping):
        for key in value:
            _check_stable(value[key], f"{name}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_stable(item, f"{name}[{i}]")
    else:
        raise TypeError(f"{name} is a {type(value).__name__}, which flow_fingerprint cannot digest the same way in "
                        "every run (its repr names its address); model_kwargs to fingerprint may hold tensors, "
                        "numbers, strings, bools, None, dtypes, devices, and lists, tuples and dicts of those")


#: module -> (what its tensors are now, the digest of their values): hashing a large network's weights costs
#: seconds, and encode and decode both ask; the key changes whenever a tensor is replaced or modified in place
_MODULE_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[tuple, bytes]] = weakref.WeakKeyDictionary()


def _module_digest(module: torch.nn.Module) -> bytes:
    items = sorted(module.state_dict().items())
    key = tuple((name, v.data_ptr(), v._version, v.dtype, tuple(v.shape), str(v.device)) if isinstance(v, Tensor)
                else (name, repr(v)) for name, v in items)
    hit = _MODULE_DIGESTS.get(module)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.blake2b(digest_size=16)
    for name, value in items:
        h.update(name.encode())
        _update(h, value)
    digest = h.digest()
    _MODULE_DIGESTS[module] = (key, digest)
    return digest


def flow_fingerprint(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> str:
    """A 32-hex-digit digest of ``flow`` (weights, schedule, prediction type) and of ``model_kwargs``.

    Raises ``TypeError`` for a model whose parameters cannot be read (a plain function that is
    neither a ``torch.nn.Module`` nor an object holding its tensors as attributes).
    """
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    h = hashlib.blake2b(digest_size=16)
    owner = getattr(flow.sigma_field, "__self__", None) if flow.sigma_field is not None else flow.model
    if isinstance(owner, torch.nn.Module):
        h.update(_module_digest(owner))
    elif owner is not None and hasattr(owner, "__dict__"):
        for name, value in sorted((k, v) for k, v in vars(owner).items() if isinstance(v, (Tensor, int, float, str))):
            h.update(name.encode())
            _update(h, value)
    else:
        raise TypeError(f"cannot fingerprint a model of type {type(flow.model).__name__}: it is neither a "
                        "torch.nn.Module nor an object holding its tensors as attributes")
    h.update(flow.schedule.alphas_cumprod.tobytes())
    h.update(f"{type(owner).__name__}|{flow.prediction_type}".encode())
    if check_model_kwargs(model_kwargs):
        for key, value in dict(model_kwargs).items():
            _check_stable(value, f"model_kwargs[{key!r}]")
        h.update(b"|kwargs")
        _update(h, dict(model_kwargs))
    return h.hexdigest()
