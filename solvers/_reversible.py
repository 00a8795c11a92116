"""Algebraically reversible solvers: each step has an exact inverse computed without solving anything.

Two methods carry a second state variable ``z`` beside ``y`` (:class:`ReversibleState`), so
that the step map (y_n, z_n) → (y_{n+1}, z_{n+1}) can be undone in closed form:

* **Reversible Heun** (Kidger, Foster, Li and Lyons, "Efficient and Accurate Gradients for
  Neural SDEs", NeurIPS 2021), the ODE case, with ``k_n = f(t_n, z_n)`` carried::

      z_{n+1} = 2 y_n − z_n + h k_n
      k_{n+1} = f(t_{n+1}, z_{n+1})                      (the one new evaluation)
      y_{n+1} = y_n + h/2 (k_n + k_{n+1})

  Second order, one evaluation a step. Its inverse is the same step taken with −h.

* **The reversible wrapper** of an explicit one-step method with increment
  Ψ_h(t, y) = (its step from y over h) − y (McCallum and Foster, "Efficient, Accurate and
  Stable Gradients for Neural ODEs", 2024)::

      y_{n+1} = λ y_n + (1 − λ) z_n + Ψ_h(t_n, z_n)
      z_{n+1} = z_n − Ψ_{−h}(t_{n+1}, y_{n+1})

  with inverse  z_n = z_{n+1} + Ψ_{−h}(t_{n+1}, y_{n+1}),
  y_n = (y_{n+1} − (1 − λ) z_n − Ψ_h(t_n, z_n)) / λ. It keeps the base method's order; the
  coupling λ ∈ (0, 1] damps the difference y − z by λ per step forwards, which is what makes
  it stable where reversible Heun (whose y − z flips sign every step) is only neutrally so.
  Backwards that difference grows by 1/λ per step, so λ close to 1 (default 0.999) keeps
  the inverse well conditioned. Cost: twice the base method's evaluations per step.

In floating point the inverse reproduces the forward states to rounding, not bit for bit:
each recomputed quantity is rounded again. Reversible Heun can be made bit-exact with
``quantum=q`` (a power of two): the states live on the grid qℤ and every increment h·k is
rounded to 2qℤ, so that each update is an exact floating-point addition and the inverse
subtracts exactly what was added (the fixed-point trick of exactly reversible networks,
MacKay et al., "Reversible Recurrent Neural Networks", NeurIPS 2018)::

      z_{n+1} = 2 y_n − z_n + Q(h k_n)
      y_{n+1} = y_n + Q(h k_n)/2 + Q(h k_{n+1})/2        ⇒   z_n = 2 y_{n+1} − z_{n+1} − Q(h k_{n+1})

The inverse then recomputes k_n from bit-identical z_n, so a round trip returns the
quantised start y₀ to the last bit. The cost is an O(q) perturbation a step; the values must
stay below 2⁵³·q in float64 (2²⁴·q in float32) for the additions to be exact.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from ._base import Solver, StepResult, VectorField, check_carried_tensor
from ._registry import get, register


class ReversibleState(NamedTuple):
    """The carried state of a reversible solver at time ``t``.

    ``z`` is the second variable (ŷ of reversible Heun, z of the reversible wrapper);
    ``k`` is ``f(t, z)`` when the method carries it (reversible Heun) and ``None`` otherwise.
    ``made_by`` records the solver and options that made it (:attr:`Solver.state_maker`:
    ``"reversible(base='euler', coupling=0.999)"``, ``"reversible_heun"``), so that another
    configuration refuses to continue or undo it; ``None`` (a state rebuilt from its saved
    tensors) is checked by its time, shape and dtype alone. Tensors, a float and a string, so
    that it can be saved beside the main state.
    """

    t: float
    z: Tensor
    k: Tensor | None = None
    made_by: str | None = None


def _check_state(solver: Solver, state: Any, t: float, y: Tensor, *, needs_k: bool,
                 name: str = "state") -> ReversibleState:
    """The carried state a reversible ``solver`` continues or undoes from ``(t, y)``: a :class:`ReversibleState` it
    made (or one that records no maker), at ``t``, its tensors of ``y``'s shape and dtype. Checked at the solve's
    ``state=`` (:meth:`Solver.check_carried`, naming ``name``) and at every step."""
    if state is None:
        raise TypeError(f"{name} must be the solvers.ReversibleState solver {solver.name!r} made, got None")
    Solver.check_carried(solver, state, t, y, name=name)
    if not needs_k and state.k is not None:
        raise ValueError(f"{name} holds a derivative ({name}.k), which solver {solver.name!r} does not carry: it "
                         "comes from another solver (reversible_heun carries f(t, z)); undo a solve with the solver "
                         "that made it")
    if state.t != t:
        raise ValueError(f"{name} is at t={state.t!r}, but solver {solver.name!r} steps from t={t!r}: the state "
                         "belongs to another grid")
    for part in ("z", "k") if needs_k else ("z",):
        check_carried_tensor(getattr(state, part), y, f"{name}.{part}")
    return state


class _StraightThrough(torch.autograd.Function):
    """round(x·a)·q, differentiated as if the rounding were not there: d/dx = a·q."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, a: float, q: float) -> Tensor:
        ctx.scale = a * q
        return torch.round(x * a).mul_(q)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad * ctx.scale, None, None


def _quantise(x: Tensor, a: float, q: float) -> Tensor:
    """round(x·a)·q (a grid of q when a = 1/q, q a power of two). Under autograd the rounding is the identity
    (straight through): the gradient is that of the unquantised step, which the O(q) rounding only perturbs;
    rounding's own derivative, zero almost everywhere, would make every gradient through the solve vanish."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _StraightThrough.apply(x, a, q)
    return torch.round(x * a).mul_(q)


class ReversibleHeun(Solver):
    """Reversible Heun (Kidger et al. 2021): 2nd order, one new evaluation per step, exact inverse.

    ``quantum`` (a power of two, or None): keep the states on the grid quantum·ℤ so that the
    inverse is exact to the last bit (see the module docstring). Gradients see the rounding as
    the identity (straight through), i.e. the derivative of the unquantised step.
    """

    name = "reversible_heun"
    order = 2
    reversible = True
    evaluates_end = True
    state_type = ReversibleState

    def __init__(self, quantum: float | None = None) -> None:
        if quantum is not None:
            if isinstance(quantum, bool) or not isinstance(quantum, (int, float)) or not quantum > 0 \
                    or not math.isfinite(quantum) or math.frexp(quantum)[0] != 0.5:
                raise ValueError(f"quantum must be a power of two (e.g. 2**-40) or None, got {quantum!r}")
            quantum = float(quantum)
        self.quantum = quantum

    def maker_options(self) -> str:
        return "" if self.quantum is None else f"(quantum={self.quantum!r})"

    def check_carried(self, state: Any, t0: float, y0: Tensor, t1: float | None = None, *,
                      name: str = "state") -> None:
        if state is not None:
            _check_state(self, state, t0, y0, needs_k=True, name=name)

    def _grid(self, y: Tensor) -> Tensor:
        q = self.quantum
        return y if q is None else _quantise(y, 1.0 / q, q)

    def _increment(self, k: Tensor, h: float) -> Tensor:
        """h·k, on the grid 2·quantum·ℤ when quantised (so that half of it stays on the grid)."""
        if self.quantum is None:
            return k * h
        q2 = 2.0 * self.quantum
        return _quantise(k, h / q2, q2)

    def init(self, f: VectorField, t0: float, y0: Tensor) -> ReversibleState:
        """z₀ = y₀ (on the grid when quantised) and k₀ = f(t₀, z₀): one evaluation before the first step."""
        z0 = self._grid(y0)
        if self.quantum is not None:
            _check_quantum(self.quantum, y0, z0)
        return ReversibleState(t0, z0, f(t0, z0), self.state_maker)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        if state is None:
            state = self.init(f, t0, y0)
        s = _check_state(self, state, t0, y0, needs_k=True)
        h = t1 - t0
        y0, z0 = self._grid(y0), self._grid(s.z)
        inc0 = self._increment(s.k, h)
        z1 = y0.mul(2.0).sub_(z0).add_(inc0)
        k1 = f(t1, z1)
        if self.quantum is None:
            y1 = y0.add(s.k + k1, alpha=0.5 * h)
        else:
            y1 = y0.add(inc0, alpha=0.5).add_(self._increment(k1, h), alpha=0.5)
        return StepResult(y1, ReversibleState(t1, z1, k1, self.state_maker))

    def unstep(self, f: VectorField, t0: float, t1: float, y1: Tensor, state1: Any) -> tuple[Tensor, ReversibleState]:
        """(y₁, z₁, k₁) at t₁ → (y₀, z₀, k₀) at t₀: z₀ = 2y₁ − z₁ − h k₁, k₀ = f(t₀, z₀), y₀ = y₁ − h/2 (k₀ + k₁)."""
        s = _check_state(self, state1, t1, y1, needs_k=True)
        h = t1 - t0
        y1, z1 = self._grid(y1), self._grid(s.z)
        inc1 = self._increment(s.k, h)
        z0 = y1.mul(2.0).sub_(z1).sub_(inc1)
        k0 = f(t0, z0)
        if self.quantum is None:
            y0 = y1.sub(k0 + s.k, alpha=0.5 * h)
        else:
            y0 = y1.sub(self._increment(k0, h), alpha=0.5).sub_(inc1, alpha=0.5)
        return y0, ReversibleState(t0, z0, k0, self.state_maker)

    def __repr__(self) -> str:
        return f"ReversibleHeun(quantum={self.quantum!r}, order=2)" if self.quantum else super().__repr__()


#: The largest rounding of the start state, relative to its largest value, that still counts as exact: a quarter
#: of a 16-bit quantisation step (2⁻¹⁶ of the range), so 16-bit data comes back to the same integers. Finer
#: rounding is the user's choice (float32 states cannot hold much finer grids); 0.5 on images in [−1, 1] is not.
QUANTUM_ROUNDING = 2.0**-18


def _check_quantum(q: float, y0: Tensor, z0: Tensor) -> None:
    """Refuse a quantum the round trip cannot be exact with (one host sync, at the start of a solve).

    Too coarse: rounding y₀ to qℤ moves it by more than :data:`QUANTUM_ROUNDING` of its largest value; the
    inverse then returns the rounded start, not y₀ (quantum=0.5 moves images in [−1, 1] by up to 0.25). A
    quantum finer than the dtype resolves is harmless: the states then round as they would unquantised.
    """
    scale = float(y0.detach().abs().max()) if y0.numel() else 0.0
    moved = float((z0 - y0).detach().abs().max()) if y0.numel() else 0.0
    if moved > QUANTUM_ROUNDING * scale:
        finest = 2.0 ** math.floor(math.log2(QUANTUM_ROUNDING * scale)) if scale > 0 else q
        raise ValueError(f"reversible_heun: quantum={q!r} is too coarse to be exact for this start: rounding y0 "
                         f"(values up to {scale:.4g}) to multiples of it moves it by up to {moved:.4g}, and the "
                         f"inverse returns the rounded start; use quantum <= {finest!r} (e.g. 2**-40), or None")


class Reversible(Solver):
    """McCallum–Foster reversible wrapper of an explicit one-step ``base`` method with coupling λ."""

    name = "reversible"
    reversible = True
    evaluates_end = True
    state_type = ReversibleState

    def __init__(self, base: str | Solver = "euler", coupling: float = 0.999) -> None:
        base_solver = get(base)
        if base_solver.reversible or base_solver.multistep:
            raise ValueError(f"base must be an explicit one-step solver (not reversible, not multistep), "
                             f"got {base_solver.name!r}")
        if isinstance(coupling, bool) or not isinstance(coupling, (int, float)) or not math.isfinite(coupling):
            raise TypeError(f"coupling must be a real number in (0, 1], got {coupling!r}")
        if not 0.0 < coupling <= 1.0:
            raise ValueError(f"coupling must lie in (0, 1] (λ; McCallum and Foster use values near 1, e.g. 0.999), "
                             f"got {coupling!r}")
        self.base = base_solver
        self.coupling = float(coupling)
        self.order = base_solver.order  # type: ignore[misc]

    def maker_options(self) -> str:
        """The base method and the coupling: a state of one λ continued or undone with another is not this solve's."""
        return f"(base={self.base.state_maker!r}, coupling={self.coupling!r})"

    def check_carried(self, state: Any, t0: float, y0: Tensor, t1: float | None = None, *,
                      name: str = "state") -> None:
        if state is not None:
            _check_state(self, state, t0, y0, needs_k=False, name=name)

    def _increment(self, f: VectorField, t0: float, t1: float, y: Tensor) -> Tensor:
        """Ψ_h(t₀, y): the base method's step from y minus y (no carried state: always recomputed)."""
        return self.base.step(f, t0, t1, y, None).y - y

    def init(self, f: VectorField, t0: float, y0: Tensor) -> ReversibleState:
        """z₀ = y₀ (no evaluation)."""
        return ReversibleState(t0, y0, None, self.state_maker)

    def step(self, f: VectorField, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        if state is None:
            state = self.init(f, t0, y0)
        s = _check_state(self, state, t0, y0, needs_k=False)
        lam = self.coupling
        y1 = (y0 * lam).add_(s.z, alpha=1.0 - lam).add_(self._increment(f, t0, t1, s.z))
        z1 = s.z - self._increment(f, t1, t0, y1)
        return StepResult(y1, ReversibleState(t1, z1, None, self.state_maker))

    def unstep(self, f: VectorField, t0: float, t1: float, y1: Tensor, state1: Any) -> tuple[Tensor, ReversibleState]:
        """z₀ = z₁ + Ψ_{−h}(t₁, y₁);  y₀ = (y₁ − (1 − λ) z₀ − Ψ_h(t₀, z₀)) / λ."""
        s = _check_state(self, state1, t1, y1, needs_k=False)
        lam = self.coupling
        z0 = s.z + self._increment(f, t1, t0, y1)
        y0 = (y1 - self._increment(f, t0, t1, z0)).sub_(z0, alpha=1.0 - lam)
        if lam != 1.0:
            y0 = y0.div_(lam)
        return y0, ReversibleState(t0, z0, None, self.state_maker)

    def __repr__(self) -> str:
        return f"Reversible(base={self.base.name!r}, coupling={self.coupling}, order={self.order})"


register("reversible_heun", ReversibleHeun,
         "reversible Heun (Kidger et al. 2021): 2nd order, 1 evaluation a step, exact algebraic inverse")
register("reversible", Reversible,
         "McCallum–Foster reversible wrapper of an explicit method (options base=, coupling=λ): "
         "the base's order, 2× its evaluations, exact algebraic inverse")
