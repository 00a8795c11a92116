"""A digest of what defines a flow, so that files made with one model can refuse another.

The reference kept by ``flowdiff compare``, tuned grids and latent files all record it: the
network's weights (or a closed-form model's tensors), the schedule, the prediction type and,
where given, the conditioning passed as ``model_kwargs``.

Conditioning is digested per sample along each tensor's first axis, except that a tensor whose samples are all
equal (a class label repeated over the batch, one prompt's embeddings) is digested as one sample repeated, and so
is a 0-d tensor (a scalar label, broadcast to every sample): the same conditioning at any batch size has one
fingerprint, so a grid tuned or a solver fitted on 8 samples of class 3
serves 4 samples of class 3. Conditioning that differs between samples (labels 0..7) keeps its batch, and is
another conditioning than any one label repeated. Files written before this rule digested every tensor sample by
sample (:func:`accepted_fingerprints` still knows that digest at the batch it was made for).
"""

from __future__ import annotations

import dis
import enum
import functools
import hashlib
import types
import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import check_model_kwargs, functorch_levels
from .flow import ProbabilityFlow
from .schedules import Schedule


def _flat_bytes(value: Tensor) -> np.ndarray:
    """The tensor's bytes, flat. Under a torch.func transform (an encode inside ``grad``, ``jvp``, ``jacfwd``) a tensor
    the model closes over may be the transform's wrapper, which has no storage: its values are read under every level
    (the primal; under ``vmap``, the whole mapped batch), as a network's weights are read there."""
    with torch._C._DisableFuncTorch():
        plain = functorch_levels(value)[0].detach()
        if plain.is_nested:  # a torch.nested tensor: its components' bytes, one after another (their shapes: _shape)
            return np.concatenate([_flat_bytes(part) for part in plain.unbind()] or [np.zeros(0, np.uint8)])
        if plain.layout != torch.strided:  # sparse (COO, CSR, ...): its indices and values, never made dense
            coo = plain.to_sparse().coalesce()
            return np.concatenate([_flat_bytes(coo.indices()), _flat_bytes(coo.values())])
        # a conjugate or negated view (``z.conj()``) is read as the values it stands for: its bits cannot be viewed
        return plain.to("cpu").resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8).numpy()


def _shape(value: Tensor) -> tuple:
    """The tensor's shape; a torch.nested tensor's (which has no one shape) is its components' shapes."""
    return ("nested", *(tuple(part.shape) for part in value.unbind())) if value.is_nested else tuple(value.shape)


def _bytes(value: Tensor) -> np.ndarray:
    """The tensor's bytes, one row per sample along its first axis (a 0-d tensor is one row)."""
    return _flat_bytes(value).reshape(value.shape[0] if value.dim() else 1, -1)


def _update(h: Any, value: object, *, repeated: bool = False) -> None:
    """Feed ``value`` to ``h``; with ``repeated``, a tensor whose samples (along its first axis) are bit for bit
    equal is fed as its first sample, marked repeated, so its batch size leaves no trace, and a 0-d tensor (one
    value for every sample, as a scalar class label is broadcast) is fed as that sample repeated."""
    rows = _bytes(value) if (repeated and isinstance(value, Tensor) and value.layout == torch.strided
                             and not value.is_nested and (value.dim() == 0 or value.shape[0])) else None
    if rows is not None and bool((rows == rows[:1]).all()):
        h.update(str((value.dtype, "repeated", tuple(value.shape[1:]))).encode())
        h.update(rows[0].tobytes())
    elif isinstance(value, Tensor):
        h.update(str((value.dtype, _shape(value))).encode())
        h.update(_flat_bytes(value))  # its buffer, not a copy of it (a large tensor is hashed at every encode)
    elif isinstance(value, Mapping):
        for key in sorted(value, key=str):
            h.update(str(key).encode())
            _update(h, value[key], repeated=repeated)
    elif isinstance(value, (list, tuple)):
        h.update(f"{type(value).__name__}{len(value)}".encode())
        for item in value:
            _update(h, item, repeated=repeated)
    else:
        h.update(repr(value).encode())


#: tensor -> (what it is now, the digest of its values): a large tensor a plain function or a model object holds is
#: hashed once, not at every encode and decode; the key changes whenever it is replaced or modified in place
#: (by the tensor's id, with a weak reference to it: a WeakKeyDictionary would compare tensors with ``==``)
_TENSOR_DIGESTS: dict[int, tuple[weakref.ref, tuple, bytes]] = {}


def _tensor(h: Any, value: Tensor) -> None:
    """Feed a tensor a plain function or a model object holds: its dtype, shape and the digest of its values, kept
    while the tensor is unchanged (a tensor under a torch.func transform, a sparse or an inference tensor: not kept)."""
    h.update(str((value.dtype, _shape(value))).encode())
    try:
        key = (value.data_ptr(), value._version, value.stride(), value.storage_offset(), str(value.device),
               value.is_conj(), value.is_neg()) if value.layout == torch.strided and not value.is_nested else None
    except RuntimeError:  # no storage to point at (a transform's wrapper), or no version counter (inference mode)
        key = None
    hit = _TENSOR_DIGESTS.get(id(value)) if key is not None else None
    if hit is not None and hit[0]() is value and hit[1] == key:
        h.update(hit[2])
        return
    digest = hashlib.blake2b(_flat_bytes(value), digest_size=16).digest()
    if key is not None:
        ident = id(value)
        _TENSOR_DIGESTS[ident] = (weakref.ref(value, lambda _, ident=ident: _TENSOR_DIGESTS.pop(ident, None)), key,
                                  digest)
    h.update(digest)


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
_MODULE_DIGESTS: weakref.WeakKeyDictionary[torch.nn.Module, dict[torch.dtype | None, tuple[tuple, bytes]]] = \
    weakref.WeakKeyDictionary()


def _module_digest(module: torch.nn.Module, cast: torch.dtype | None = None) -> bytes:
    """The digest of the module's state; with ``cast``, of its floating tensors cast to it as ``module.to(cast)``
    casts them, one tensor at a time (no copy of the network). Read with torch.func's transforms set aside: under
    them (``encode`` inside ``grad``, ``jvp``, ``jacfwd``) ``state_dict``'s ``detach`` returns wrapped tensors
    without storage, whose ``data_ptr`` raises."""
    with torch._C._DisableFuncTorch():  # torch's own random-state readers step outside the transforms the same way
        return _plain_module_digest(module, cast)


def _plain_module_digest(module: torch.nn.Module, cast: torch.dtype | None) -> bytes:
    items = sorted(module.state_dict().items())
    key = (cast, *((name, v.data_ptr(), v._version, v.dtype, tuple(v.shape), str(v.device))
                   if isinstance(v, Tensor) else (name, repr(v)) for name, v in items))
    digests = _MODULE_DIGESTS.setdefault(module, {})
    hit = digests.get(cast)
    if hit is not None and hit[0] == key:
        return hit[1]
    h = hashlib.blake2b(digest_size=16)
    for name, value in items:
        h.update(name.encode())
        if cast is not None and isinstance(value, Tensor) and value.is_floating_point():
            value = value.detach().to(cast)
        _update(h, value)
    digest = h.digest()
    digests[cast] = (key, digest)
    return digest


def _attributes(h: Any, owner: object, calls: set[str]) -> None:
    """Feed what an object given as the model holds as attributes: its tensors and numbers, and what else it holds
    publicly (a network, another model object, an array) read as a plain function's objects are (:func:`_read`);
    not what a call of the methods ``calls`` assigns on ``self`` (:func:`_state`: a call counter, a cache), which
    changes with every solve."""
    state, reads = _state(type(owner), calls)
    seen: set[Any] = {id(owner), *(("call", name) for name in reads)}
    for name, value in sorted((k, v) for k, v in vars(owner).items() if k not in state):
        if isinstance(value, Tensor):
            h.update(name.encode())
            _tensor(h, value)
        elif isinstance(value, (int, float, str)):
            h.update(name.encode())
            _update(h, value)
        elif not _left_out(name, value):
            h.update(f"|.{name}".encode())
            _read(h, value, seen, 1)


def _code(h: Any, code: types.CodeType) -> None:
    """Feed a function's compiled body: its bytecode, the names it reads and its constants (nested functions' code
    the same way). No file name or line number: the same function defined in another script, or moved, is the same
    model. Bytecode belongs to one Python version: under another the digest differs (a file is fitted again)."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _code(h, const)
        elif isinstance(const, frozenset):  # its repr's order follows string hashing, which changes between runs
            h.update(repr(sorted(map(repr, const))).encode())
        else:
            h.update(repr(const).encode())


def _nested(code: types.CodeType) -> list[types.CodeType]:
    """``code`` and the code of the functions (lambdas, comprehensions) defined in it, at any depth."""
    return [code, *(inner for const in code.co_consts if isinstance(const, types.CodeType) for inner in _nested(const))]


def _operands(code: types.CodeType, *opnames: str) -> set[str]:
    """The names the instructions ``opnames`` of ``code`` (nested functions' included) name."""
    return {ins.argval for part in _nested(code) for ins in dis.get_instructions(part) if ins.opname in opnames}


def _global_names(code: types.CodeType) -> set[str]:
    """The globals a function's body loads. Not ``co_names``, which also lists the attributes it reads:
    ``unet(x, t).sample`` would read a notebook's global ``sample`` (a generate's result)."""
    return _operands(code, "LOAD_GLOBAL", "LOAD_NAME")


def _written(code: types.CodeType) -> set[str]:
    """The globals and closure cells a function's body assigns: its own state (a call counter), not the model's,
    and changed by every call."""
    return _operands(code, "STORE_GLOBAL", "DELETE_GLOBAL", "STORE_DEREF", "DELETE_DEREF")


def _function(h: Any, fn: types.FunctionType | functools.partial, seen: set[Any], depth: int = 0) -> None:
    """Feed what a plain function computes with: its code, defaults, the values its closure holds and the globals its
    body names (a network, tensors, another function, an object's tensors: :func:`_read`), so that two plain
    functions used as models (``ProbabilityFlow(eps_a, schedule)``, ``ProbabilityFlow(eps_b, schedule)``) have
    different fingerprints, and one function has the same one in every run."""
    if id(fn) in seen:
        h.update(b"|again")
        return
    seen.add(id(fn))
    if isinstance(fn, functools.partial):
        h.update(b"|partial")
        _read(h, fn.func, seen, depth)
        _read(h, fn.args, seen, depth)
        _read(h, tuple(sorted(fn.keywords.items())), seen, depth)
        return
    code = fn.__code__
    h.update(b"|function")
    _code(h, code)
    _read(h, fn.__defaults__ or (), seen, depth)
    _read(h, tuple(sorted((fn.__kwdefaults__ or {}).items())), seen, depth)
    written = _written(code)
    # the attributes it assigns on the objects it reads (``stats.calls += 1``) are its state, not the model's: left
    # out of every object read after this (marked in ``seen`` as ("attribute", name))
    seen.update(("attribute", name) for name in _stores(code, None))
    # the methods it may call on the objects it reads (``model.eps(x, t)``): what they assign on ``self`` is left out
    seen.update(("call", name) for name in _names(code))
    for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
        h.update(f"|cell {name}".encode())
        if name in written:
            continue
        try:
            _read(h, cell.cell_contents, seen, depth)
        except ValueError:  # a cell not filled yet
            h.update(b"|empty")
    names = fn.__globals__
    for name in sorted(_global_names(code) - written):
        if name in names:
            h.update(f"|global {name}".encode())
            _read(h, names[name], seen, depth)


def _stores(code: types.CodeType, target: str | None) -> set[str]:
    """The attribute names ``code`` (nested functions' included) assigns or deletes: on any object (``target`` None),
    or on its local ``target`` alone (a method's ``self``: ``self.calls += 1``, ``self.last = x``; not ``new.model =
    model`` on a copy it returns). A store whose object the bytecode does not show plainly counts, whatever it is on."""
    names: set[str] = set()
    ins = list(dis.get_instructions(code))
    for i, op in enumerate(ins):
        if op.opname not in ("STORE_ATTR", "DELETE_ATTR"):
            continue
        owner = None  # the local the attribute is stored on, where the bytecode shows it
        if i and ins[i - 1].opname.startswith("LOAD_FAST"):  # obj.a = v (3.13: LOAD_FAST_LOAD_FAST v, obj)
            argval = ins[i - 1].argval
            owner = argval[-1] if isinstance(argval, tuple) else argval
        elif i and ins[i - 1].opname == "SWAP":  # obj.a += v: LOAD_FAST obj, COPY 1, LOAD_ATTR a, ..., SWAP 2
            for j in range(i - 2, 1, -1):
                if ins[j].opname == "LOAD_ATTR" and ins[j - 1].opname == "COPY" and ins[j].argval == op.argval:
                    if ins[j - 2].opname.startswith("LOAD_FAST") and not isinstance(ins[j - 2].argval, tuple):
                        owner = ins[j - 2].argval
                    break
        if target is None or owner is None or owner == target:
            names.add(op.argval)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _stores(const, None if target is None else "")
    return names


#: type -> {method or property name: (the attributes it assigns on ``self``, the names its code reads)}
_METHODS: weakref.WeakKeyDictionary[type, dict[str, tuple[frozenset[str], frozenset[str]]]] = \
    weakref.WeakKeyDictionary()


def _methods(cls: type) -> dict[str, tuple[frozenset[str], frozenset[str]]]:
    hit = _METHODS.get(cls)
    if hit is None:
        hit = {}
        for klass in cls.__mro__:  # a name's definitions in every class: an override may call the base's by super()
            for name, member in vars(klass).items():
                fns = ((member.fget, member.fset, member.fdel) if isinstance(member, property)
                       else () if isinstance(member, (staticmethod, classmethod)) else (member,))
                for fn in fns:
                    if isinstance(fn, types.FunctionType) and fn.__code__.co_argcount:
                        stores, reads = hit.get(name, (frozenset(), frozenset()))
                        hit[name] = (stores | _stores(fn.__code__, fn.__code__.co_varnames[0]),
                                     reads | _names(fn.__code__))
        _METHODS[cls] = hit
    return hit


def _names(code: types.CodeType) -> frozenset[str]:
    """The names ``code`` (nested functions' included) reads: globals and attributes alike."""
    return frozenset(name for part in _nested(code) for name in part.co_names)


def _state(cls: type, calls: set[str]) -> tuple[frozenset[str], frozenset[str]]:
    """The attributes a call assigns on an object of ``cls`` (a call counter, a cache its first call fills, a random
    generator's): what the methods named in ``calls`` (``__call__``, the method given as the model, the attributes a
    plain function reads on it) assign on ``self``, and the methods they read on ``self`` in turn. A fingerprint taken
    before a solve must not read them; what other methods assign (a setter, ``to``) is the model's. With them, the
    names those methods read (the methods they may call on the objects the object holds)."""
    methods = _methods(cls)
    todo, done, names, read = [name for name in calls if name in methods], set(), set(), set()
    while todo:
        name = todo.pop()
        if name not in done:
            done.add(name)
            stores, reads = methods[name]
            names |= stores
            read |= reads
            todo += [other for other in reads if other in methods]
    return frozenset(names), frozenset(read)


def _left_out(name: object, value: object) -> bool:
    """Whether an object's attribute is left out of its digest, whatever its class: a private one, None, a list, dict
    or set, where objects keep the caches and logs an evaluation makes or fills (a flow's ``_timesteps_of``)."""
    return str(name).startswith("_") or value is None or isinstance(value, (list, set, Mapping))


def _fields(value: object) -> dict[Any, Any]:
    """An object's attributes: its ``__dict__`` and the slots it has set (a slotted dataclass has no ``__dict__``)."""
    fields = dict(getattr(value, "__dict__", None) or {})
    for klass in type(value).__mro__:
        slots = vars(klass).get("__slots__", ())
        for name in (slots,) if isinstance(slots, str) else slots:
            if name not in ("__dict__", "__weakref__") and hasattr(value, name):
                fields[name] = getattr(value, name)
    return fields


#: how many objects deep :func:`_read` follows attributes from a plain function (a closure's flow, its model's
#: object, that object's schedule); deeper objects are read as their type alone
_DEPTH = 3


def _read(h: Any, value: object, seen: set[Any], depth: int = 0) -> None:
    """Feed a value a plain function reads: tensors, networks and numbers by value, functions and bound methods by
    what they read, tuples item by item, other objects by their public attributes read the same way (:data:`_DEPTH`
    objects deep; not those that are None, lists, dicts or sets, nor those a function read assigns or the methods it
    may call on the object assign on ``self``: an object's caches and counters, made or changed by an evaluation,
    :func:`_state`); a module or a class by its name only, and a list, dict or set by its type alone: mutable, it is
    where a function logs its calls or caches, which is no part of the model."""
    if isinstance(value, Tensor):
        _tensor(h, value)
    elif isinstance(value, torch.nn.Module):
        h.update(_module_digest(value))
    elif isinstance(value, np.ndarray):
        h.update(f"|ndarray {value.dtype} {value.shape}".encode())
        h.update(np.ascontiguousarray(value).tobytes() if value.dtype != object else repr(value).encode())
    elif isinstance(value, _STABLE):
        h.update(repr(value).encode())
    elif isinstance(value, (types.FunctionType, functools.partial)):
        _function(h, value, seen, depth)
    elif isinstance(value, types.MethodType):
        h.update(f"|method {value.__func__.__qualname__}".encode())
        seen.add(("call", value.__func__.__name__))
        _read(h, value.__self__, seen, depth)
    elif isinstance(value, enum.Enum):  # its name and value are private attributes: read by its class and name
        h.update(f"|enum {type(value).__qualname__}.{value.name}".encode())
    elif isinstance(value, (types.ModuleType, type, types.BuiltinFunctionType)):
        h.update(f"|{type(value).__name__} {getattr(value, '__qualname__', getattr(value, '__name__', ''))}".encode())
    elif id(value) in seen:
        h.update(b"|again")
    elif isinstance(value, tuple):
        seen.add(id(value))
        h.update(f"|tuple{len(value)}".encode())
        for item in value:
            _read(h, item, seen, depth)
    elif isinstance(value, (list, set, Mapping)):  # mutable: a log the function appends to, a cache it fills
        h.update(f"|{type(value).__name__}".encode())
    else:
        seen.add(id(value))
        h.update(f"|{type(value).__name__}".encode())
        fields = _fields(value)
        if depth < _DEPTH and fields:
            state, reads = _state(type(value), {"__call__"} | {item[1] for item in seen
                                                                if isinstance(item, tuple) and item[0] == "call"})
            seen.update(("call", name) for name in reads)
            for name, item in sorted(fields.items(), key=lambda kv: str(kv[0])):
                if _left_out(name, item) or name in state or ("attribute", name) in seen:
                    continue
                h.update(f"|.{name}".encode())
                _read(h, item, seen, depth + 1)


def _owner(flow: ProbabilityFlow) -> tuple[object, str | None]:
    """What holds the model's tensors — the model itself, or the object of a bound method given as the model or as
    a σ field — and that method's qualified name (None for no bound method)."""
    owner = getattr(flow.sigma_field, "__self__", None) if flow.sigma_field is not None else flow.model
    bound = flow.sigma_field if flow.sigma_field is not None else flow.model
    if isinstance(bound, types.MethodType):  # a bound method: its object holds the tensors
        return bound.__self__, bound.__func__.__qualname__
    return owner, None


def _digest(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None, *, repeated: bool,
            cast: torch.dtype | None = None, functions: bool = True) -> str:
    """The fingerprint; ``functions=False`` digests a plain function as the model as nothing of its own (its schedule
    and prediction type alone), as flowdiff did before it read them (:func:`plain_function_before`)."""
    if not isinstance(flow, ProbabilityFlow):
        raise TypeError(f"flow must be a flowdiff.ProbabilityFlow, got {type(flow).__name__}")
    h = hashlib.blake2b(digest_size=16)
    owner, method = _owner(flow)
    if method is not None:  # which of the object's methods: two methods of one object are two models
        h.update(f"|method {method}".encode())
    calls = {"__call__"} if method is None else {"__call__", method.rpartition(".")[2]}
    if isinstance(owner, torch.nn.Module):
        h.update(_module_digest(owner, cast))
    elif isinstance(owner, (types.FunctionType, functools.partial)) and functions:  # a plain function as the model
        _function(h, owner, set())
    elif owner is not None and hasattr(owner, "__dict__"):
        _attributes(h, owner, calls)
    else:
        raise TypeError(f"cannot fingerprint a model of type {type(flow.model).__name__}: it is neither a "
                        "torch.nn.Module nor an object holding its tensors as attributes")
    h.update(flow.schedule.alphas_cumprod.tobytes())
    if type(flow.schedule) is not Schedule:
        # what else feeds the model (VE's time="sigma" or "log_sigma", flow matching's T and shift): a table of levels
        # alone does not say which time the network was fed
        h.update(f"|{type(flow.schedule).__name__}".encode())
        for name, value in sorted(vars(flow.schedule).items()):
            if not name.startswith("_") and isinstance(value, (bool, int, float, str)):
                h.update(f"|{name}={value!r}".encode())
    h.update(f"{type(owner).__name__}|{flow.prediction_type}".encode())
    if check_model_kwargs(model_kwargs):
        for key, value in dict(model_kwargs).items():
            _check_stable(value, f"model_kwargs[{key!r}]")
        h.update(b"|kwargs")
        _update(h, dict(model_kwargs), repeated=repeated)
    return h.hexdigest()


def flow_fingerprint(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> str:
    """A 32-hex-digit digest of ``flow`` (weights, schedule, prediction type) and of ``model_kwargs``.

    A ``model_kwargs`` tensor whose samples (along its first axis) are all equal counts as one sample repeated:
    a class label repeated over 8 samples, over 4, or given as a 0-d tensor has one fingerprint; labels that
    differ between samples are digested sample by sample. ``model_kwargs=None`` (or empty) digests the flow alone.

    The model is read as a ``torch.nn.Module``'s state, or as what an object holds as attributes — tensors and numbers,
    and public networks, objects and arrays read as a plain function's are, below — (the object of a bound method, given
    as the model or as a σ field, with that method's name: two methods of one object are two models), without what a
    call of it assigns on the object (a counter, a cache). The schedule is read as its table of levels and, for a
    schedule other than the plain table (``VESchedule``, ``FlowMatchingSchedule``, a subclass), its type and its public
    scalar fields (VE's ``time``, flow matching's T and shift), which say what else the network is fed. A plain function
    (or ``functools.partial``) given as the model is read as its code (bytecode, constants, the names it looks up; not
    its name, file or line), its defaults, the values its closure holds and the globals its body names — tensors,
    networks, numbers, tuples, other functions and bound methods, objects by their public attributes read the same way
    (a few objects deep); a list, dict or set as its type alone, and a global or cell the function assigns (a call
    counter) not at all — so two plain-function models of one schedule have different fingerprints, and a grid tuned or
    a solver fitted on one is refused for the other. Bytecode belongs to one Python version: a file made for a plain
    function under another is refused (fit it again). A σ field that is a plain function
    (:meth:`ProbabilityFlow.from_sigma_field`) is not read: it raises ``TypeError``.
    """
    return _digest(flow, model_kwargs, repeated=True)


def plain_function_before(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """For a flow whose model is a plain function: the fingerprints files recorded for it before flowdiff read the
    function (its schedule and prediction type alone, every plain function of that schedule alike), which cannot
    tell which function a file was made for; ``()`` for any other model."""
    if flow.sigma_field is not None or not isinstance(flow.model, (types.FunctionType, functools.partial)):
        return ()
    keys = [_digest(flow, model_kwargs, repeated=True, functions=False)]
    if check_model_kwargs(model_kwargs):
        keys.append(_digest(flow, model_kwargs, repeated=False, functions=False))
    return tuple(dict.fromkeys(keys))


#: the precisions :func:`fitted_precision` tries a network in
PRECISIONS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def in_precision(value: Any, dtype: torch.dtype) -> Any:  # noqa: ANN401 - conditioning of any structure
    """``value`` (``model_kwargs``, or a value in them) with every floating tensor in it, in mappings, lists and
    tuples, cast to ``dtype``: the conditioning a run in that precision is given (prompt embeddings beside the
    network). Anything else is kept as it is (class labels, numbers, ``None``)."""
    if isinstance(value, Tensor):
        return value.detach().to(dtype) if value.is_floating_point() else value
    if isinstance(value, Mapping):
        return {k: in_precision(v, dtype) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(in_precision(v, dtype) for v in value)
    return value


def fitted_precision(fingerprint: str, flow: ProbabilityFlow,
                     model_kwargs: Mapping[str, Any] | None = None) -> tuple[torch.dtype, torch.dtype] | None:
    """Where ``fingerprint`` (a file's) is that of ``flow``'s network cast to another floating precision (the same
    model loaded with another ``--dtype``), with ``model_kwargs`` as given or with their floating tensors in that
    precision too (prompt embeddings made by the text encoder in the run's dtype): (the precision it matches, the
    network's own); else None. A model that is not a ``torch.nn.Module`` has no other precision. For the message of a
    refusal, which would otherwise blame another model, schedule or conditioning."""
    owner = _owner(flow)[0]
    if not isinstance(owner, torch.nn.Module):
        return None
    own = next((t.dtype for t in owner.state_dict().values() if isinstance(t, Tensor) and t.is_floating_point()),
               None)
    for dtype in PRECISIONS:
        if dtype == own:
            continue
        for kwargs in (model_kwargs, in_precision(model_kwargs, dtype)):
            if _digest(flow, kwargs, repeated=True, cast=dtype) == fingerprint:
                return dtype, own
    return None


def accepted_fingerprints(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The fingerprints a file made for ``flow`` with exactly ``model_kwargs`` may record: :func:`flow_fingerprint`
    first, then, where it differs, the digest files written before the repeated-sample rule recorded (every
    ``model_kwargs`` tensor sample by sample, its batch size included). An older file made with one label
    repeated over another batch size matches neither: it was digested with that batch, and is fitted again."""
    now = _digest(flow, model_kwargs, repeated=True)
    before = _digest(flow, model_kwargs, repeated=False) if check_model_kwargs(model_kwargs) else now
    return (now,) if before == now else (now, before)


def precision_fingerprints(flow: ProbabilityFlow, model_kwargs: Mapping[str, Any] | None = None,
                           dtypes: tuple[torch.dtype, ...] = ()) -> tuple[str, ...]:
    """:func:`flow_fingerprint` of ``flow`` as given, then of its network cast to each of ``dtypes`` (as
    ``model.to(dtype)`` casts it: the floating parameters and buffers), read one tensor at a time without copying
    the network; distinct values, in that order. A model that is not a ``torch.nn.Module`` has its own only.
    What records a flow solved in one precision (a reference) matches the same network run in another."""
    keys = [_digest(flow, model_kwargs, repeated=True)]
    if isinstance(_owner(flow)[0], torch.nn.Module):
        keys += [_digest(flow, model_kwargs, repeated=True, cast=dtype) for dtype in dtypes]
    return tuple(dict.fromkeys(keys))
