"""One registry of solvers by name; unknown names and options are errors that list the valid ones."""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from ._base import Solver


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., Solver]
    summary: str


_REGISTRY: dict[str, _Entry] = {}


def register(name: str, factory: Callable[..., Solver], summary: str = "") -> None:
    """Register ``factory(**options) -> Solver`` under ``name`` (an error if the name is taken)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        raise ValueError(f"register: a solver named {name!r} is already registered")
    if not callable(factory) or isinstance(factory, Solver):
        raise TypeError(f"register: factory must be a callable that builds the solver (factory(**options) -> "
                        f"solvers.Solver; for a ready instance, lambda: instance), got {type(factory).__name__}")
    if not isinstance(summary, str):
        raise TypeError(f"register: summary must be a str, got {type(summary).__name__}")
    _REGISTRY[name] = _Entry(factory, summary)


def _build(name: str, entry: _Entry, options: dict[str, object]) -> Solver:
    """``entry.factory(**options)``, which must be a :class:`Solver` named ``name`` (so that ``get(solver.name,
    **options_of(solver))`` rebuilds it)."""
    solver = entry.factory(**options)
    if not isinstance(solver, Solver):
        raise TypeError(f"the factory registered as {name!r} returned {type(solver).__name__}, not a solvers.Solver")
    if solver.name != name:
        raise TypeError(f"the factory registered as {name!r} built a solver named {solver.name!r}; a registered "
                        "solver carries its registered name (get(solver.name) must find it again)")
    return solver


def available(*, adaptive: bool | None = None, reversible: bool | None = None,
              multistep: bool | None = None) -> list[str]:
    """Registered solver names, sorted; filter by capability with the keyword flags."""
    for flag, value in (("adaptive", adaptive), ("reversible", reversible), ("multistep", multistep)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"available: {flag} must be True, False or None, got {value!r} ({type(value).__name__})")
    names = []
    for name in sorted(_REGISTRY):
        if adaptive is None and reversible is None and multistep is None:
            names.append(name)
            continue
        solver = _build(name, _REGISTRY[name], {})
        if adaptive is not None and solver.adaptive != adaptive:
            continue
        if reversible is not None and solver.reversible != reversible:
            continue
        if multistep is not None and solver.multistep != multistep:
            continue
        names.append(name)
    return names


def describe() -> dict[str, str]:
    """Name → one-line summary of every registered solver."""
    return {name: _REGISTRY[name].summary for name in sorted(_REGISTRY)}


@functools.cache
def _options_of(factory: Callable[..., Solver]) -> tuple[bool, tuple[str, ...]]:
    """Whether ``factory`` takes any keyword, and the option names it takes (read once per factory)."""
    params = inspect.signature(factory).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    named = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return accepts_any, tuple(p for p, spec in params.items() if spec.kind in named)


def get(name: str | Solver, **options: object) -> Solver:
    """The solver registered as ``name``, built with ``options``; a Solver instance passes through."""
    if isinstance(name, Solver):
        if options:
            raise TypeError(f"solver options {sorted(options)} given with a solver instance; "
                            "configure the instance instead")
        return name
    if not isinstance(name, str):
        raise TypeError(f"solver must be a registered name (str) or a solvers.Solver, got {type(name).__name__}")
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown solver {name!r}; available: {', '.join(sorted(_REGISTRY))}") from None
    if not options:
        return _remember(_build(name, entry, {}), {})
    accepts_any, valid = _options_of(entry.factory)
    unknown = sorted(set(options) - set(valid))
    if unknown and not accepts_any:
        raise TypeError(f"solver {name!r} got unknown option(s) {unknown}; "
                        f"it accepts: {', '.join(valid) if valid else 'no options'}")
    return _remember(_build(name, entry, options), options)


#: id(instance) → the options :func:`get` built it with, while the instance lives.
_BUILT: dict[int, dict[str, object]] = {}


def _remember(solver: Solver, options: dict[str, object]) -> Solver:
    _BUILT[id(solver)] = dict(options)
    weakref.finalize(solver, _BUILT.pop, id(solver), None)
    return solver


def options_of(solver: Solver) -> dict[str, object] | None:
    """The options :func:`get` built ``solver`` with (``get(solver.name, **options_of(solver))`` rebuilds it).

    ``None`` for an instance that :func:`get` did not build from a name (constructed directly):
    its configuration is not a set of registry options. Used to record how a latent was made."""
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a solvers.Solver, got {type(solver).__name__}")
    options = _BUILT.get(id(solver))
    return None if options is None else dict(options)
