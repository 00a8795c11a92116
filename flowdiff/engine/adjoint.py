"""Gradients through a fixed-grid solve: plain autograd, checkpointed steps, or reversible steps.

``adjoint=`` (diffrax's name) says how ``generate``/``encode``/``decode`` are differentiated:

* ``"autograd"`` — autograd records every model evaluation of every step: the exact gradient
  of the discrete solve, memory linear in the steps (the network's activations, every step).
* ``"checkpoint"`` — the forward pass keeps only the state at each step boundary (the solver's
  state ``y`` and its carried state, e.g. a multistep history); the backward pass recomputes
  one step at a time under autograd and takes its vector–Jacobian product. Any fixed-grid
  solver; memory is the boundary states (no activations), one step's activations at a time.
* ``"reversible"`` — an algebraically reversible solver (``reversible_heun``, ``reversible``)
  keeps nothing per step: the backward pass rebuilds each step's start from its end by the
  solver's exact inverse (:meth:`solvers.Solver.unstep`), then takes that step's
  vector–Jacobian product (McCallum and Foster, "Efficient, Accurate and Stable Gradients for
  Neural ODEs", 2024; Kidger et al., "Efficient and Accurate Gradients for Neural SDEs", 2021).
  Memory is flat in the number of steps. A step without an inverse (the Euler step into σ = 0
  of ``final_euler``) keeps its start: a fixed number of states per solve. Reversible Heun's
  inverse of step i evaluates the model exactly where the recomputation of step i − 1 does, so
  that evaluation is kept with its graph and replayed: its backward pass makes as many model
  evaluations as its forward (the wrapper's inverse costs two base evaluations a step more).

Adaptive solves, the stochastic η process and fixed-point inversion are refused (they take
``"autograd"``). A model that draws random numbers (dropout in training mode) draws the same ones in
``"checkpoint"``'s recomputation: the CPU generator's state, and the CUDA device's, are kept at each step
boundary where the forward pass drew any, and restored for that step (the caller's states are left as they
were); ``"reversible"``, whose inverse steps evaluate the model elsewhere, refuses such a model. Buffers a
model updates in place in training mode (BatchNorm's running statistics) are updated by the forward pass
alone, as under ``"autograd"``: the backward pass puts back each module's buffers after its recomputations
and inverse steps. A model
whose output reads a buffer it changes as it runs (an eval-mode call counter, an EMA, a cache) gets under
``"checkpoint"`` each recomputed step run with the buffers that step saw: the buffers' version counters and
identities are compared at each step boundary (no copy, no sync), and only where a step changed one are the
changed buffers copied there (:class:`_BufferWatch`); ``"reversible"``, whose inverse steps evaluate the model at
points and in an order the forward pass did not, refuses by buffer name a model that changed any buffer during the
solve (whether its output reads them cannot be probed at one point: it may read them at some σ only); BatchNorm's
running statistics in training mode, updated but not read, are left to it. The
backward pass is once differentiable: a backward pass that would build a graph (``create_graph=True``,
for a second derivative) is refused with a ValueError.

All three give the gradient of the *discrete* solve (not the continuous adjoint ODE of
``torchdiffeq.odeint_adjoint``): equal to autograd's to rounding. With the quantised reversible
Heun (states on a grid of 2⁻⁴⁰, what ``encode`` uses in float64) the rebuilt states equal the
forward's bit for bit, so ``"reversible"`` and ``"checkpoint"`` return the same bits; the
rounding to the grid is differentiated as the identity (straight through).

The solve is one :class:`torch.autograd.Function` whose inputs are the start state, the
solver's given carried state, and every tensor the model depends on that requires a gradient
(:func:`differentiable_inputs`: the parameters and tensor attributes of an ``nn.Module`` model,
of a bound method's object, and the tensors in ``model_kwargs``). A tensor the backward pass
meets that is none of these would lose its gradient: the backward pass refuses it, naming it.
The backward pass's model evaluations are counted in ``stats.extra["nfe_backward"]`` (``stats.nfe``
counts the forward's); it makes no host sync per step.

The node's outputs are the end state, the end's carried state, and the states a :class:`flowdiff.Save`
keeps (``save_at`` of :func:`integrate_adjoint`): a loss on several times of the solve is differentiated
as torchdiffeq's adjoint and diffrax's ``SaveAt(ts=...)`` with a checkpointed or backsolve adjoint do it,
by adding each saved state's gradient into the running adjoint when the backward sweep comes back to
that step boundary, before it continues to earlier steps. That costs no model evaluation and holds
nothing for the backward pass beyond what it held before (the saved states themselves are the caller's).
``Save(denoised=True)``'s x̂₀ is read off the carried state (a multistep history, an FSAL derivative) or
off the next step's first evaluation at the saved state: the carried state there and that evaluation
are outputs too, and the evaluation's gradient enters in the recomputation of the step that made it.
The states a ``callback`` sees are a side effect computed inside the forward pass without a graph; a
differentiated solve with a callback warns (:data:`NO_RECORD_GRADIENT`) rather than let a loss on them
lose that part of its gradient unseen (under ``"autograd"`` they are differentiated).
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

import solvers
from solvers import FixedGrid, ReversibleHeun, Solution, Solver, Stepping

from ._checks import functorch_transforms

ADJOINTS = ("autograd", "checkpoint", "reversible")

#: The key of the backward pass's model evaluations in ``stats.extra``.
NFE_BACKWARD = "nfe_backward"
#: How the warning that a differentiated solve's callback states carry no gradient begins.
NO_RECORD_GRADIENT = "adjoint: the states passed to callback= carry no gradient"


def check_adjoint(adjoint: object, solver: Solver) -> str:
    """Validate ``adjoint=`` for ``solver`` (a fixed-grid solve); returns the name."""
    if not isinstance(adjoint, str):
        raise TypeError(f"adjoint must be one of {', '.join(map(repr, ADJOINTS))}, got {type(adjoint).__name__}")
    if adjoint not in ADJOINTS:
        raise ValueError(f"adjoint must be one of {', '.join(map(repr, ADJOINTS))}, got {adjoint!r}")
    if adjoint == "reversible" and not solver.reversible:
        names = ", ".join(solvers.available(reversible=True))
        raise ValueError(f"adjoint='reversible' rebuilds each step from the next by the solver's exact inverse and "
                         f"needs a reversible solver ({names}); got solver {solver.name!r} (adjoint='checkpoint' "
                         "works with any fixed-grid solver)")
    if adjoint != "autograd" and getattr(solver, "uses_initial_state", False):
        raise ValueError(f"adjoint={adjoint!r} recomputes each step apart from its solve, but solver {solver.name!r} "
                         "reads the solve's initial state in every step (learned x_T or previous steps' directions), "
                         "a path to the noise's gradient that step-by-step recomputation cannot follow: use "
                         "adjoint='autograd'")
    return adjoint


def refuse_adjoint(adjoint: object, what: str) -> None:
    """Refuse ``adjoint`` other than ``"autograd"`` for a solve that is not a plain fixed-grid solve (``what``)."""
    if adjoint == "autograd":
        return
    if not isinstance(adjoint, str) or adjoint not in ADJOINTS:
        check_adjoint(adjoint, solvers.get("euler"))  # the type/name error
    raise ValueError(f"adjoint={adjoint!r} differentiates a fixed-grid solve step by step; {what} takes "
                     "adjoint='autograd' (plain autograd through its steps)")


def differentiable_inputs(model: object, model_kwargs: Mapping[str, Any] | None = None) -> tuple[Tensor, ...]:
    """Every tensor requiring a gradient that ``model`` (or its bound object) holds, and those in ``model_kwargs``.

    For an ``nn.Module``: its parameters, buffers and plain tensor attributes (e.g. a guidance
    scale given as a tensor) of every submodule; for a bound method, the same of its object;
    for another object, its tensor attributes. ``model_kwargs`` values are searched through
    mappings, lists and tuples.
    """
    found: list[Tensor] = []
    seen: set[int] = set()

    def add(value: object) -> None:
        if isinstance(value, Tensor):
            if value.requires_grad and id(value) not in seen:
                seen.add(id(value))
                found.append(value)
        elif isinstance(value, Mapping):
            for v in value.values():
                add(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                add(v)

    def attributes(obj: object) -> None:
        if isinstance(obj, nn.Module):
            for module in obj.modules():
                for v in (*module._parameters.values(), *module._buffers.values(), *vars(module).values()):
                    if isinstance(v, Tensor):
                        add(v)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            for v in vars(obj).values():
                if isinstance(v, Tensor):
                    add(v)

    attributes(getattr(model, "__self__", model))
    add(dict(model_kwargs or {}))
    return tuple(found)


# -- carried states as lists of tensors ---------------------------------------------------------

def _flatten(obj: Any) -> tuple[list[Tensor], Callable[[Iterator[Tensor]], Any]]:
    """The tensors of a solver's carried state (tuples, NamedTuples with instance attributes such as
    :class:`solvers.History`'s ``past``, lists, dicts) and a function rebuilding it from new tensors."""
    if isinstance(obj, Tensor):
        return [obj], lambda it: next(it)
    # the rebuilds hold the state's type and keys, not the state: its tensors may be the solve node's outputs, and
    # the node keeps rebuilds (a loop through autograd's graph that would never be freed)
    if isinstance(obj, (tuple, list)):
        parts = [_flatten(v) for v in obj]
        extra = dict(vars(obj)) if isinstance(obj, tuple) and hasattr(obj, "__dict__") else {}
        extra_parts = {k: _flatten(v) for k, v in extra.items()}
        leaves = [t for p in parts for t in p[0]] + [t for p in extra_parts.values() for t in p[0]]
        rebuilds = [p[1] for p in parts]
        extra_rebuilds = {k: p[1] for k, p in extra_parts.items()}
        kind, named = type(obj), hasattr(obj, "_fields")

        def rebuild(it: Iterator[Tensor]) -> Any:
            items = [r(it) for r in rebuilds]
            if issubclass(kind, list):
                return items
            new = kind._make(items) if named else kind(items)
            for k, r in extra_rebuilds.items():
                setattr(new, k, r(it))
            return new

        return leaves, rebuild
    if isinstance(obj, dict):
        keys = list(obj)
        parts = [_flatten(obj[k]) for k in keys]
        rebuilds = [p[1] for p in parts]
        return [t for p in parts for t in p[0]], lambda it: {k: r(it) for k, r in zip(keys, rebuilds)}
    return [], lambda it: obj


def _leaves_like(leaves: Sequence[Tensor]) -> list[Tensor]:
    return [t.detach().requires_grad_(t.is_floating_point() or t.is_complex()) for t in leaves]


class Saved(NamedTuple):
    """The end of a step that ``save_at`` picked, as outputs of the solve's node: the time ``t``, the state ``y``,
    and with ``save_state`` the solver's carried state there and ``f(t, y)`` where the next step evaluated it first
    (else None)."""

    t: float
    y: Tensor
    state: Any = None
    f: Tensor | None = None


# -- the plan of a fixed-grid solve -------------------------------------------------------------

@dataclass
class _Plan:
    """One differentiated solve: the field, the solver, the steps in the order taken, what to keep."""

    f: Callable[[float, Tensor], Tensor]
    solver: Solver
    stepping: FixedGrid
    mode: str
    params: tuple[Tensor, ...]
    integrate_options: dict[str, Any]
    steps: list[tuple[float, float, Solver]] = field(default_factory=list)
    stepped: Solver | None = None
    inverse: bool = False
    state_rebuild: Callable[[Iterator[Tensor]], Any] | None = None
    n_state: int = 0
    save_at: Callable[[solvers.StepInfo], bool] | None = None
    save_state: bool = False
    solution: Solution | None = None
    saved: dict[int, Saved] = field(default_factory=dict)
    #: the random number generators' states at the start of each step, where the model drew from them (dropout in
    #: training mode): the backward pass redraws the same numbers in its recomputation. None when it drew none.
    rng: list[tuple[Tensor, Tensor | None]] | None = None
    #: the model's buffers at the start of each step, where a step of the forward pass changed any that its output may
    #: read (a call counter, an EMA, a cache): the backward pass puts them back before recomputing the step. None when
    #: no step changed one (BatchNorm's running statistics in training mode are not read, and not kept).
    buffers: list[dict[int, _BufferValues]] | None = None

    def __post_init__(self) -> None:
        ts = self.stepping.times()
        n = len(ts) - 1
        self.inverse = bool(self.stepping.inverse)
        visit = ts[::-1] if self.inverse else ts
        methods = dict(self.stepping.methods)
        # the method the loop steps with: a solver may change on its solve's interval (log-time weights only away
        # from t = 0, Adams.on_interval), and the recomputed steps must be the steps taken
        interval = self.stepping.interval()
        self.stepped = self.solver.on_interval(*interval) if interval is not None else self.solver
        self.steps = [(visit[i], visit[i + 1], methods.get(n - 1 - i if self.inverse else i, self.stepped))
                      for i in range(n)]

    def forward_step(self, f: Callable, i: int, y: Tensor, state: Any) -> tuple[Tensor, Any]:
        t0, t1, method = self.steps[i]
        if self.inverse:  # an inverse run: each step undoes the forward step t1 -> t0
            return method.unstep(f, t1, t0, y, state)
        result = method.step(f, t0, t1, y, state)
        return result.y, result.state

    def invertible(self, i: int) -> bool:
        return self.steps[i][2].reversible

    def inverse_step(self, f: Callable, i: int, y: Tensor, state: Any) -> tuple[Tensor, Any]:
        t0, t1, method = self.steps[i]
        if self.inverse:
            result = method.step(f, t1, t0, y, state)
            return result.y, result.state
        return method.unstep(f, t0, t1, y, state)

    def replays(self, i: int) -> bool:
        """Whether rebuilding the start of step ``i`` evaluates f where recomputing step ``i − 1`` does (see
        :meth:`_SolveFunction.backward`): reversible Heun forwards, both steps its own."""
        return (not self.inverse and i > 0 and isinstance(self.steps[i][2], ReversibleHeun)
                and isinstance(self.steps[i - 1][2], ReversibleHeun))

    def keeps(self, i: int) -> bool:
        """Whether the forward pass stores the start of step ``i`` (> 0; step 0's start is the input)."""
        return self.mode == "checkpoint" or not self.invertible(i)


class _SolveFunction(torch.autograd.Function):
    """The solve as one autograd node: inputs (y₀, the given carried state's tensors, params); outputs
    (y_N, the end state's tensors, then for each step ``save_at`` picks: its end y, and with ``save_state`` the
    carried state's tensors there and f at it where the next step evaluates it first)."""

    @staticmethod
    def forward(ctx: Any, plan: _Plan, y0: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        state0 = plan.state_rebuild(iter(inputs[:plan.n_state])) if plan.state_rebuild is not None else None
        kept: dict[int, tuple[Tensor, list[Tensor], Callable]] = {}
        saved_at: dict[int, tuple[float, Tensor, Any]] = {}  # the ends of the steps save_at picks, by step index
        taps: dict[int, Tensor] = {}  # f(t, y) at a saved end (t, y), where the next step evaluates it there
        pending: list[tuple[int, float, Tensor]] = []  # the saved end awaiting that evaluation
        user_callback = plan.integrate_options.pop("callback", None)
        n = len(plan.steps)

        def tapping(t: float, y: Tensor) -> Tensor:
            k = plan.f(t, y)
            if pending and t == pending[0][1] and y is pending[0][2]:  # the state itself, as Saver.tap finds it
                taps[pending.pop()[0]] = k
            return k

        def keep(info: solvers.StepInfo) -> None:
            if not drew and not _same_rng(rng[-1], _rng_state(y0.device)):  # the step's evaluations drew
                drew.append(info.step)
            pending.clear()
            i = info.step + 1  # the start of step i is the end of step i - 1
            if i < n and plan.keeps(i):
                leaves, rebuild = _flatten(info.state)
                kept[i] = (info.y, leaves, rebuild)
            if user_callback is not None:
                user_callback(info)
            if plan.save_at is not None and plan.save_at(info):
                saved_at[info.step] = (info.t1, info.y, info.state if plan.save_state else None)
                if plan.save_state:
                    pending[:] = [(info.step, info.t1, info.y)]
            rng.append(_rng_state(y0.device))  # the start of the next step, after anything the callback drew
            watch.boundary()  # the buffers there, after anything the callback changed

        rng = [_rng_state(y0.device)]  # before the solver's init, which the recomputation of step 0 repeats
        drew: list[int] = []  # the first step whose evaluations drew random numbers (not the callback's draws)
        with _BufferWatch() as watch:
            sol = solvers.integrate(tapping, y0, plan.solver, plan.stepping, state=state0, callback=keep,
                                    **plan.integrate_options)
        if drew:
            if plan.mode == "reversible":
                raise ValueError("adjoint='reversible': the model drew random numbers during the solve (dropout or "
                                 "another random layer in training mode), which the solver's inverse steps, evaluating "
                                 "the model again elsewhere, cannot draw again: the rebuilt states and the gradient "
                                 "would be wrong. Put the model in eval mode, or use adjoint='checkpoint' (which "
                                 "redraws them step by step) or 'autograd'")
            plan.rng = rng
        if watch.changed and plan.mode == "checkpoint":
            plan.buffers = watch.starts
        elif watch.changed:  # whether the output reads them cannot be probed at one point: a model may read them
            # at some σ only (an expert switched on t), so a probe at the end passed one whose gradient was 61% off
            raise ValueError(f"adjoint='reversible': the model changed its buffers {watch.names()} during the solve "
                             "(a call counter, an average or a cache it updates as it runs), but the solver's inverse "
                             "steps evaluate the model at points and in an order the forward pass did not, so they "
                             "cannot see the values it saw there: where its output reads them the rebuilt states and "
                             "the gradient would be wrong. Use adjoint='checkpoint' (which gives each recomputed step "
                             "the buffers it had) or 'autograd'")
        # forward-only: the caller's save_at holds its records, which hold this node's outputs, and the node holds
        # the plan: kept, that loop through autograd's graph is never collected (the saved states leak)
        plan.save_at = None
        sol.stats.extra.setdefault(NFE_BACKWARD, 0)
        plan.solution = sol
        end_leaves, end_rebuild = _flatten(sol.state)
        seen = {id(t) for t in (y0, *inputs)}  # an output that is an input, or another output, is a copy of it
        outputs: list[Tensor] = []

        def output(tensors: Sequence[Tensor]) -> list[Tensor]:
            for t in tensors:
                outputs.append(t.clone() if id(t) in seen else t)
                seen.add(id(t))
            return outputs[len(outputs) - len(tensors):]

        output([sol.y, *end_leaves])
        ctx.n_outputs = len(outputs)
        ctx.saved_layout = []  # (step, number of the state's tensors, whether f there is an output)
        for step, (t1, y, state) in saved_at.items():
            leaves, rebuild = _flatten(state)
            k = taps.get(step)
            y_out, *rest = output([y, *leaves, *([] if k is None else [k])])
            state_out = rebuild(iter(rest[:len(leaves)]))
            plan.saved[step] = Saved(t1, y_out, state_out, rest[len(leaves)] if k is not None else None)
            ctx.saved_layout.append((step, len(leaves), k is not None))
        ctx.tap_times = {step + 1: saved_at[step][0] for step in taps}
        ctx.plan = plan
        ctx.stats = sol.stats  # the caller's statistics, where the backward pass adds its evaluations
        ctx.set_materialize_grads(False)  # a saved state without a loss on it adds nothing (None, not zeros)
        ctx.end_rebuild = end_rebuild
        ctx.kept_index = sorted(kept)
        ctx.kept_rebuild = [kept[i][2] for i in ctx.kept_index]
        ctx.kept_sizes = [len(kept[i][1]) for i in ctx.kept_index]
        tensors = [y0, *inputs[:plan.n_state]]
        for i in ctx.kept_index:
            tensors += [kept[i][0], *kept[i][1]]
        if plan.mode == "reversible":  # the end, from which the steps are rebuilt backwards
            tensors += outputs[:ctx.n_outputs]
        ctx.save_for_backward(*tensors)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        # Autograd runs a backward pass in grad mode exactly when it builds a graph of it (create_graph=True: a
        # second derivative). once_differentiable alone does not refuse that: its error node hangs off detached
        # copies of the incoming gradients, so torch.autograd.grad(g, x) finds x unreached ("not used in the
        # graph", or None with allow_unused=True: a second derivative silently zero).
        if torch.is_grad_enabled():
            raise ValueError(f"adjoint={ctx.plan.mode!r}: the gradient of a solve differentiated step by step is "
                             "not itself differentiable (create_graph=True, a second derivative or a Hessian); "
                             "use adjoint='autograd', or create_graph=False")
        # its recomputations and inverse steps leave BatchNorm's statistics as they were, and the buffers each step
        # was given back (a counter, an EMA) as they were at its start
        with _buffers_kept(ctx.plan.buffers), _buffers_restored():
            return _SolveFunction._backward(ctx, *grads)

    @staticmethod
    @once_differentiable
    def _backward(ctx: Any, *grads: Tensor) -> tuple[Tensor | None, ...]:
        plan: _Plan = ctx.plan
        saved = list(ctx.saved_tensors)
        y0, state0_leaves = saved[0], saved[1:1 + plan.n_state]
        pos = 1 + plan.n_state
        kept: dict[int, tuple[Tensor, Any]] = {}
        for i, rebuild, size in zip(ctx.kept_index, ctx.kept_rebuild, ctx.kept_sizes):
            kept[i] = (saved[pos], rebuild, saved[pos + 1:pos + 1 + size])
            pos += 1 + size
        params = plan.params
        counter = [0]
        f = plan.f

        def field_counted(t: float, y: Tensor) -> Tensor:
            counter[0] += 1
            return f(t, y)

        # Reversible Heun's inverse of step i evaluates f exactly where step i − 1 does, at (t_i, z_i): that
        # evaluation is kept with its graph and replayed by the recomputation of step i − 1 (one evaluation a
        # step saved; one evaluation's activations held at a time).
        replayed: dict[float, tuple[Tensor, Tensor]] = {}

        def field_kept(t: float, y: Tensor) -> Tensor:
            counter[0] += 1
            with torch.enable_grad():
                leaf = y.detach().requires_grad_(True)
                k = f(t, leaf)
            replayed[t] = (leaf, k)
            return k.detach()

        def field_replay(t: float, y: Tensor) -> Tensor:
            hit = replayed.pop(t, None)
            return field_counted(t, y) if hit is None else _Replay.apply(hit, y, *params)

        # the adjoint of the current step's outputs: y and the carried state's tensors (None: no loss on it)
        adj: list[Tensor | None] = list(grads[:ctx.n_outputs])
        # a loss on the end of step i (a saved state: y and its carried state) enters the adjoint where the sweep
        # reaches that boundary; one on f(t, y) there, through the next step's evaluation at it (where it recomputes)
        into: dict[int, list[Tensor | None]] = {}
        into_f: dict[int, Tensor] = {}
        at = ctx.n_outputs
        for step, size, has_f in ctx.saved_layout:
            into[step] = list(grads[at:at + 1 + size])
            if has_f and grads[at + 1 + size] is not None:
                into_f[step + 1] = grads[at + 1 + size]
            at += 1 + size + has_f
        out_rebuild = ctx.end_rebuild
        if plan.mode == "reversible":
            ends = saved[pos:pos + ctx.n_outputs]
            y_cur, state_cur = ends[0], out_rebuild(iter(ends[1:]))
        adj_params: list[Tensor | None] = [None] * len(params)
        for i in range(len(plan.steps) - 1, -1, -1):
            for j, g in enumerate(into.get(i, ())):
                if g is not None:
                    adj[j] = g if adj[j] is None else adj[j] + g
            # the start of step i: the input, a kept state, or rebuilt from the step's end by the exact inverse
            if i == 0:
                y_in = y0
                leaves_in = list(state0_leaves)
                rebuild_in = plan.state_rebuild
            elif i in kept:
                y_in, rebuild_in, leaves_in = kept[i][0], kept[i][1], list(kept[i][2])
            else:
                with torch.no_grad():
                    y_in, state_in = plan.inverse_step(field_kept if plan.replays(i) else field_counted, i,
                                                       y_cur, state_cur)
                leaves_in, rebuild_in = _flatten(state_in)
            if plan.buffers is not None:  # the buffers the step saw in the forward pass (checkpoint: no inverse)
                for values in plan.buffers[i].values():
                    values.put_back()
            with torch.enable_grad(), _rng_replayed(None if plan.rng is None else plan.rng[i], y_in.device):
                y_var = y_in.detach().requires_grad_(True)
                vars_in = _leaves_like(leaves_in)
                if rebuild_in is None:  # step 0 of a solve that starts without a state: the init is part of it
                    state = plan.stepped.init(field_counted, plan.steps[0][0], y_var)
                else:
                    state = rebuild_in(iter(vars_in))
                tapped: list[Tensor] = []
                step_field = field_replay if i not in into_f else _tap(field_replay, ctx.tap_times[i], y_var, tapped)
                y_out, state_out = plan.forward_step(step_field, i, y_var, state)
                outs = [y_out, *_flatten(state_out)[0]]
                if len(outs) != len(adj):
                    raise RuntimeError(f"adjoint: step {i} recomputed {len(outs)} tensors where the solve "
                                       f"produced {len(adj)}; the solver's carried state is not reproducible")
                pairs = [(o, a) for o, a in zip(outs, adj) if o.requires_grad and a is not None]
                if i in into_f:  # the saved state's f(t, y), evaluated by this step as in the forward pass
                    if not tapped or not tapped[0].requires_grad:
                        raise RuntimeError(f"adjoint: step {i} did not evaluate f at its start as the forward pass "
                                           "did; the solver's evaluations are not reproducible")
                    pairs.append((tapped[0], into_f[i]))
                wrt = [y_var, *vars_in, *params]
                if pairs:  # every step a loss reaches: a model may use a tensor at some σ only (or the loss be on
                    # saved states only, leaving the last steps without an adjoint to check with)
                    _refuse_hidden_leaves([o for o, _ in pairs], wrt)
                live = [j for j, v in enumerate(wrt) if v.requires_grad]  # e.g. not an integer state tensor
                got: list[Tensor | None] = [None] * len(wrt)
                if pairs and live:
                    found = torch.autograd.grad([o for o, _ in pairs], [wrt[j] for j in live], [a for _, a in pairs],
                                                allow_unused=True)
                    for j, g in zip(live, found):
                        got[j] = g
            adj = [torch.zeros_like(y_in) if got[0] is None else got[0]]
            adj += [torch.zeros_like(v) if g is None else g for v, g in zip(vars_in, got[1:1 + len(vars_in)])]
            for j, g in enumerate(got[1 + len(vars_in):]):
                if g is not None:
                    adj_params[j] = g if adj_params[j] is None else adj_params[j] + g
            replayed.pop(plan.steps[i][1], None)  # the evaluation kept for this step's recomputation, if unused
            if plan.mode == "reversible" and i > 0:
                y_cur, state_cur = y_in, (rebuild_in(iter(leaves_in)) if rebuild_in is not None else None)
        ctx.stats.extra[NFE_BACKWARD] = ctx.stats.extra.get(NFE_BACKWARD, 0) + counter[0]
        grad_state0 = adj[1:1 + plan.n_state] if plan.state_rebuild is not None else []
        return (None, adj[0], *grad_state0, *adj_params)


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The CPU generator's state, and ``device``'s where it is a CUDA device (host-side copies: no sync)."""
    return torch.get_rng_state(), (torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def _same_rng(a: tuple[Tensor, Tensor | None], b: tuple[Tensor, Tensor | None]) -> bool:
    return torch.equal(a[0], b[0]) and (a[1] is None or torch.equal(a[1], b[1]))


class _Owner:
    """Which module calls a global forward hook sees belong to the block the calling thread runs (a differentiated
    solve): any made in that thread; and, in any thread, those of the submodules of a module that thread ran (a model
    that runs its own layers in threads it starts, or in a pool) and of the replicas ``nn.DataParallel`` runs in a
    thread started meanwhile. Another thread's solve (a server's next request) runs its own model, not a submodule of
    ours, and keeps its buffers: taken, they were put back under it and our steps' values replayed there (a gradient
    41% off, silently). A model shared by differentiated solves running at once in several threads is counted as each
    one's (its calls cannot be told apart): give each thread its own copy where the model changes its buffers."""

    def __init__(self) -> None:
        self.holder = threading.get_ident()
        self.others = {t.ident for t in threading.enumerate()} - {self.holder}
        self.owned: set[int] = set()  # ids of the submodules of the modules run in the holder's thread

    def __call__(self, module: nn.Module) -> bool:
        thread = threading.get_ident()
        if thread == self.holder:
            if id(module) not in self.owned:  # its submodules are ours wherever they run (once per module)
                self.owned.update(id(m) for m in module.modules())
            return True
        return id(module) in self.owned or (thread not in self.others and getattr(module, "_is_replica", False))


@contextlib.contextmanager
def _buffers_restored() -> Iterator[None]:
    """Run the block with the buffers of every module evaluated in it put back, after it, to their values when the
    module's forward first ran there. A model in training mode updates buffers in place at each evaluation
    (BatchNorm's running mean and variance and its batch count); the forward pass evaluated it once per evaluation of
    the solve, as autograd's does, and the backward pass's recomputations and inverse steps, which autograd does
    not make, would update them again. (Its output does not depend on them in training mode: batch statistics.)
    Every module is seen, the model's or one a closure calls, by a global forward pre-hook held for the block, in
    the thread that runs the block, or in another as a submodule of one run there or a replica ``nn.DataParallel``
    runs (:class:`_Owner`); modules that other threads run meanwhile are theirs, left alone."""
    kept: dict[int, tuple[torch.nn.Module, dict[str, Tensor | None], list[tuple[Tensor, Tensor]]]] = {}
    ours = _Owner()  # the hook is global: another thread's modules are not ours

    def snapshot(module: torch.nn.Module, _args: Any) -> None:
        # the tensors themselves and a copy of their values: a model may update a buffer in place (BatchNorm) or
        # assign it another tensor (a cache that grows), which is put back
        if ours(module) and id(module) not in kept:
            kept[id(module)] = (module, dict(module._buffers),
                                [(b, b.clone()) for b in module._buffers.values() if b is not None])

    handle = torch.nn.modules.module.register_module_forward_pre_hook(snapshot)
    try:
        yield
    finally:
        handle.remove()
        with torch.no_grad():
            for module, buffers, values in kept.values():
                module._buffers.clear()
                module._buffers.update(buffers)
                for tensor, value in values:
                    tensor.copy_(value)


class _BufferValues(NamedTuple):
    """A module's buffers at one time: the tensors by name (a model may assign a buffer anew) and copies of their
    values (it may update one in place)."""

    module: nn.Module
    tensors: dict[str, Tensor | None]
    values: list[tuple[Tensor, Tensor]]

    @staticmethod
    def of(module: nn.Module) -> _BufferValues:
        return _BufferValues(module, dict(module._buffers),
                             [(b, b.detach().clone()) for b in module._buffers.values() if b is not None])

    def put_back(self) -> None:
        with torch.no_grad():
            self.module._buffers.clear()
            self.module._buffers.update(self.tensors)
            for tensor, value in self.values:
                tensor.copy_(value)


def _signature(module: nn.Module) -> tuple:
    """Which tensors a module's buffers are and their in-place version counters: equal before and after a step
    exactly when the step neither assigned nor modified one (no copy, no sync)."""
    return tuple((name, id(b), None if b is None or b.is_inference() else b._version)
                 for name, b in module._buffers.items())


def _reads_none(module: nn.Module) -> bool:
    """A module whose output reads none of the buffers it updates: batch and instance normalisation in training mode
    (the running statistics are updated from the batch, not read)."""
    return module.training and isinstance(module, nn.modules.batchnorm._NormBase)


class _BufferWatch:
    """Held around the forward pass's solve: which modules the model runs (a global forward pre-hook, those
    :class:`_Owner` says, as :func:`_buffers_restored`), and, at each step boundary, whether a step changed one of their
    buffers (:func:`_signature`). ``starts[i]`` is every watched module's buffers at the start of step i, copied only
    where a step changed them: a model whose buffers do not change costs one copy of them during the forward pass,
    nothing kept after it (``changed`` is False)."""

    def __init__(self) -> None:
        self.signatures: dict[int, tuple] = {}
        self.current: dict[int, _BufferValues] = {}
        self.starts: list[dict[int, _BufferValues]] = [self.current]
        self.changed: list[_BufferValues] = []
        self._ours = _Owner()

    def __enter__(self) -> _BufferWatch:
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._see)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()
        if not self.changed:
            self.current.clear()  # the copies are needed only where a step changed a buffer

    def _see(self, module: nn.Module, _args: Any) -> None:
        # a module without buffers yet is watched too: one may register a buffer as it runs (a cache made lazily)
        if not self._ours(module) or id(module) in self.signatures or _reads_none(module):
            return
        self.signatures[id(module)] = _signature(module)
        values = _BufferValues.of(module)  # as at every boundary so far: nothing ran the module before
        for start in {id(s): s for s in self.starts}.values():
            start[id(module)] = values

    def boundary(self) -> None:
        """The end of a step (the start of the next): keep the buffers the step changed."""
        moved = [key for key, values in self.current.items() if _signature(values.module) != self.signatures[key]]
        if moved:
            self.current = dict(self.current)
            for key in moved:
                module = self.current[key].module
                self.current[key] = _BufferValues.of(module)
                self.signatures[key] = _signature(module)
                self.changed.append(self.current[key])
        self.starts.append(self.current)

    def names(self) -> str:
        """The changed buffers, by module class and name."""
        seen = {(type(v.module).__name__, name) for v in self.changed for name in v.tensors}
        return ", ".join(f"{cls}.{name}" for cls, name in sorted(seen))


@contextlib.contextmanager
def _buffers_kept(starts: list[dict[int, _BufferValues]] | None) -> Iterator[None]:
    """Run the block (the backward pass, which puts back each step's buffers) with the modules in ``starts`` given
    their buffers as at its start after it; nothing when ``starts`` is None."""
    if starts is None:
        yield
        return
    now = [_BufferValues.of(v.module) for v in starts[-1].values()]
    try:
        yield
    finally:
        for values in now:
            values.put_back()


@contextlib.contextmanager
def _rng_replayed(state: tuple[Tensor, Tensor | None] | None, device: torch.device) -> Iterator[None]:
    """Run the block with the generators in ``state`` (what a step of the forward pass drew from), the caller's
    states restored after it (as :func:`torch.utils.checkpoint.checkpoint` does for one segment); nothing when
    ``state`` is None."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=[device] if state[1] is not None else []):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


def _tap(f: Callable[[float, Tensor], Tensor], t_at: float, y_at: Tensor, into: list[Tensor]
         ) -> Callable[[float, Tensor], Tensor]:
    """``f``, its first value at time ``t_at`` and the tensor ``y_at`` itself appended to ``into``."""

    def tapped(t: float, y: Tensor) -> Tensor:
        k = f(t, y)
        if not into and t == t_at and y is y_at:
            into.append(k)
        return k

    return tapped


class _Replay(torch.autograd.Function):
    """A kept evaluation ``k = f(t, leaf)`` standing in for ``f(t, y)`` at the same point (to rounding): its value,
    and in the backward pass the vector–Jacobian product through the kept graph (w.r.t. y and the params)."""

    @staticmethod
    def forward(ctx: Any, hit: tuple[Tensor, Tensor], y: Tensor, *params: Tensor) -> Tensor:
        ctx.hit, ctx.params = hit, params
        return hit[1].detach().clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        leaf, k = ctx.hit
        return (None, *torch.autograd.grad(k, [leaf, *ctx.params], grad, allow_unused=True))


def _refuse_hidden_leaves(outputs: list[Tensor], inputs: list[Tensor]) -> None:
    """Refuse a graph that reaches a tensor requiring grad that is not an input of the solve's node:
    its gradient would be lost silently."""
    known = {id(t) for t in inputs}
    stops = {t.grad_fn for t in inputs if t.grad_fn is not None}
    hidden: list[Tensor] = []
    seen: set = set()
    stack = [o.grad_fn for o in outputs if o.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node is None or node in seen or node in stops:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if variable is not None and id(variable) not in known:
            hidden.append(variable)
        stack.extend(nxt for nxt, _ in node.next_functions)
    if hidden:
        shapes = ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in hidden[:5])
        raise ValueError(f"adjoint: the model uses {len(hidden)} tensor(s) requiring grad that the solve cannot see "
                         f"({shapes}{', ...' if len(hidden) > 5 else ''}): its gradient would be lost. Make them "
                         "parameters or attributes of the model (an nn.Module, or the object of a bound method), "
                         "pass them in model_kwargs, or use adjoint='autograd'")


@dataclass
class AdjointSolution(Solution):
    """A differentiated solve's :class:`solvers.Solution`, and the ends of the steps ``save_at`` picked (by step
    index), each an output of the solve's node: a loss on them is differentiated like a loss on the end."""

    saved: dict[int, Saved] = field(default_factory=dict)


def differentiated(y0: Tensor, state: Any, params: Sequence[Tensor]) -> bool:
    """Whether a solve from ``y0`` and ``state`` of a field depending on ``params`` is differentiated (grad mode on,
    and something requires a gradient); otherwise :func:`integrate_adjoint` is the plain solve."""
    leaves = _flatten(state)[0] if state is not None else []
    return torch.is_grad_enabled() and any(t.requires_grad for t in (y0, *leaves, *params))


def integrate_adjoint(f: Callable[[float, Tensor], Tensor], y0: Tensor, solver: Solver, stepping: Stepping, *,
                      adjoint: str, params: tuple[Tensor, ...], state: Any = None,
                      save_at: Callable[[solvers.StepInfo], bool] | None = None, save_state: bool = False,
                      **integrate_options: Any) -> AdjointSolution:
    """:func:`solvers.integrate` over a fixed grid, differentiated by ``adjoint`` (``"checkpoint"`` or
    ``"reversible"``) with respect to ``y0``, the tensors of ``state`` and ``params``.

    ``params`` are the tensors requiring grad that ``f`` depends on besides ``y0`` and ``state``.
    ``save_at(info)``, asked after each step (after ``callback``), says whether that step's end ``y`` is kept as
    an output of the solve (``AdjointSolution.saved``, by step index, a :class:`Saved`); with ``save_state`` its
    carried state and the next step's first evaluation ``f(t, y)`` there too (what a denoised image is read
    off). A loss on them is differentiated: each one's gradient is added to the adjoint when the backward sweep
    reaches its step boundary (the evaluation's, through the recomputation of the step that made it). The states
    a ``callback`` sees carry no gradient. Without any input that requires a gradient (or with grad mode off)
    this is plain :func:`solvers.integrate`, and ``saved`` is empty.
    """
    if not isinstance(stepping, FixedGrid):
        raise ValueError(f"adjoint={adjoint!r} needs a fixed grid (solvers.FixedGrid), got {type(stepping).__name__}")
    state_leaves, state_rebuild = _flatten(state) if state is not None else ([], None)
    if not differentiated(y0, state, params):
        sol = solvers.integrate(f, y0, solver, stepping, state=state, **integrate_options)
        return AdjointSolution(sol.y, sol.stats, sol.state, sol.ts)
    transforms = functorch_transforms()
    if "Grad" in transforms:
        raise ValueError(f"adjoint={adjoint!r} cannot run under a torch.func transform of reverse mode (grad, vjp, "
                         "jacrev, hessian): its backward pass is its own autograd.Function, which torch.func does not "
                         "trace; use adjoint='autograd' under torch.func, or torch.autograd.grad / loss.backward() "
                         f"with adjoint={adjoint!r}")
    if transforms:  # vmap or jvp alone, around a solve that something requiring grad (a module's parameters) reaches
        names = " and ".join(dict.fromkeys(f"torch.func.{name.lower()}" for name in transforms))
        raise ValueError(f"adjoint={adjoint!r} cannot run under {names} while the solve is differentiated (grad mode "
                         "on and a tensor it depends on requires grad, as a model's parameters do): its backward pass "
                         f"is its own autograd.Function, which {names} cannot run; under torch.no_grad() the solve is "
                         f"the plain one, which {names} runs with any adjoint, or use adjoint='autograd'")
    plan = _Plan(f, solver, stepping, adjoint, tuple(params), dict(integrate_options),
                 state_rebuild=state_rebuild, n_state=len(state_leaves), save_at=save_at, save_state=save_state)
    outputs = _SolveFunction.apply(plan, y0, *state_leaves, *params)
    # the caller's, not the node's: the forward's solution holds the node's outputs (its end state), which hold the
    # node, which holds the plan; kept there, that loop through autograd's graph would never be freed
    sol, plan.solution = plan.solution, None
    saved, plan.saved = plan.saved, {}  # the node keeps no reference to them: they are the caller's
    end_leaves, end_rebuild = _flatten(sol.state)
    end_state = end_rebuild(iter(outputs[1:1 + len(end_leaves)]))
    return AdjointSolution(outputs[0], sol.stats, end_state, sol.ts, saved)


def warn_unrecorded(adjoint: str) -> None:
    """Warn (:data:`NO_RECORD_GRADIENT`) that a differentiated solve's ``callback`` states carry no gradient."""
    warnings.warn(f"{NO_RECORD_GRADIENT} with adjoint={adjoint!r}: a callback is a side effect of the solve's one "
                  "autograd node (the end's gradient is unaffected). A loss on them would lose their part of its "
                  "gradient; keep them with save=flowdiff.Save(...) (whose states are differentiated), or use "
                  "adjoint='autograd'", UserWarning, stacklevel=_caller_level())


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside flowdiff and solvers: the user's call."""
    package = __name__.split(".")[0]
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in (package, "solvers"):
        level, frame = level + 1, frame.f_back
    return level


def adjoint_for(adjoint: object, solver: Solver, model: object, model_kwargs: Mapping[str, Any] | None
                ) -> dict[str, Any]:
    """The ``adjoint``/``params`` keywords of :func:`flowdiff.engine.loop.solve_grid` for a fixed-grid solve of
    ``model`` with ``solver``: validated, and the tensors to differentiate collected (none for ``"autograd"``)."""
    name = check_adjoint(adjoint, solver)
    params = () if name == "autograd" else differentiable_inputs(model, model_kwargs)
    return {"adjoint": name, "params": params}
