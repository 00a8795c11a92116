"""The table of generate-only and encode-only methods, so that no entry point special-cases a name.

Two kinds of plug-in:

* a **step method** chosen by ``solver=`` that exists for one direction only (``ddim_inverse``:
  diffusers' DDIMInverseScheduler, an encoder whose latents decode with Euler);
* a **procedure** chosen by an option object (the η process for generation,
  :class:`flowdiff.Stochastic`; fixed-point inversion for encoding, :class:`flowdiff.Inversion`),
  which runs a whole solve its own way on the one loop.

Implementations register themselves when their module is imported (:mod:`flowdiff.api.sampling`
imports them all); this module imports nothing of flowdiff (only :mod:`solvers`, below it), so anything may look
things up here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import solvers as _solvers

DIRECTIONS = ("generate", "encode")


@dataclass(frozen=True)
class Plugin:
    """One direction-specific method: ``name``, its ``direction``, its ``kind`` (``"solver"`` or
    ``"procedure"``), a one-line ``summary``; a solver plug-in has ``make(options) -> Solver``
    and the solver its latents decode with (``decodes_with``), a procedure ``run(request, x, spec)``."""

    name: str
    direction: str
    kind: str
    summary: str
    make: Callable[[dict[str, Any]], Any] | None = None
    decodes_with: str | None = None
    run: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ValueError(f"plug-in {self.name!r}: direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.kind == "solver" and (self.make is None or self.decodes_with is None):
            raise ValueError(f"plug-in {self.name!r}: a solver plug-in needs make= and decodes_with=")
        if self.kind == "procedure" and self.run is None:
            raise ValueError(f"plug-in {self.name!r}: a procedure needs run=")
        if self.kind not in ("solver", "procedure"):
            raise ValueError(f"plug-in {self.name!r}: kind must be 'solver' or 'procedure', got {self.kind!r}")


_PLUGINS: dict[str, Plugin] = {}


def register_plugin(plugin: Plugin) -> None:
    """Add a plug-in (an error if its name is taken)."""
    if plugin.name in _PLUGINS:
        raise ValueError(f"a plug-in named {plugin.name!r} is already registered")
    _PLUGINS[plugin.name] = plugin


def plugins(kind: str | None = None, direction: str | None = None) -> dict[str, Plugin]:
    """The registered plug-ins, by name, filtered by kind and direction."""
    return {n: p for n, p in sorted(_PLUGINS.items())
            if (kind is None or p.kind == kind) and (direction is None or p.direction == direction)}


def solver_plugin(name: object) -> Plugin | None:
    """The solver plug-in registered as ``name``, or None (a registered solver of :mod:`solvers`, or unknown)."""
    p = _PLUGINS.get(name) if isinstance(name, str) else None
    return p if p is not None and p.kind == "solver" else None


def article(direction: str) -> str:
    """``direction`` with its indefinite article: "a generate", "an encode"."""
    return ("an " if direction[:1] in "aeiou" else "a ") + direction


def registered_only(name: object, argument: str, who: str, accepted: tuple[str, ...] = (), advice: str = "",
                    registered: tuple[str, ...] | None = None) -> None:
    """Refuse a solver plug-in ``name`` given as ``argument`` to an entry point that runs the registered ODE solvers
    only (a tuning, a fit, a comparison; ``who`` ends "not one of the registered ODE solvers ...", e.g. "that tune
    runs"): a generate-only or encode-only method is known by name to ``generate``/``encode``, so "unknown solver"
    would name the wrong thing. ``accepted`` lists what ``who`` takes
    besides the registered solvers (``compare``'s round trip: ``ddim_inverse``), ``registered`` the registered solvers
    it takes where it refuses some (default: every one); ``advice`` ends the message. Nothing happens for any other
    name (a registered solver, or an unknown name, which ``solvers.get`` refuses)."""
    p = solver_plugin(name)
    if p is None or name in accepted:
        return
    names = ", ".join([*(_solvers.available() if registered is None else registered), *accepted])
    raise ValueError(f"{argument} {name!r} is {article(p.direction)}-only method ({p.summary}), not one of the "
                     f"registered ODE solvers {who}; accepted: {names}{advice}")


def procedure(name: str, direction: str) -> Plugin:
    """The procedure ``name`` for ``direction``; an error naming the accepted ones otherwise."""
    p = _PLUGINS.get(name)
    if p is None or p.kind != "procedure" or p.direction != direction:
        accepted = ", ".join(repr(n) for n in plugins("procedure", direction)) or "none"
        raise ValueError(f"unknown {direction} procedure {name!r}; accepted: {accepted}")
    return p


def decodes_with(solver_name: str) -> str:
    """The solver that decodes a latent encoded by ``solver_name`` (itself unless a plug-in says otherwise)."""
    p = solver_plugin(solver_name)
    return solver_name if p is None else p.decodes_with  # type: ignore[return-value]
