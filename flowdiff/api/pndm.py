"""diffusers' PNDMScheduler with ``skip_prk_steps`` (Stable Diffusion 1.x's own scheduler) as a generate method.

PNDM's pseudo linear multistep (Liu et al., "Pseudo Numerical Methods for Diffusion Models on
Manifolds", ICLR 2022), as diffusers runs it without its Runge–Kutta warm-up: the first step by
Heun's trapezoidal rule (its end evaluation is used once and not kept), then iPNDM's
Adams–Bashforth with equal-step coefficients over the derivatives at the grid points, up to order
4 — one evaluation a step, two on the first. A loop of one step is DDIM's step, one evaluation: diffusers'
``set_timesteps(1)`` lists the one timestep once, so its PLMS loop never reaches the Heun start's second
evaluation (:attr:`PNDM.final_method`, the last step: the Adams–Bashforth step over the history, which with
none is Euler). Its transfer ``_get_prev_sample`` is DDIM's step,
i.e. Euler on dx̄/dσ = ε, so on the scheduler's grid and timesteps
(:func:`flowdiff.models.pipelines.scheduler_plan`) this is diffusers' loop to float rounding.

A generate-only plug-in, not a registered ODE solver: self-started its order depends on the grid
(3 on uniform grids, where the Heun start is third order, 2 on smooth non-uniform ones, where the
equal-step coefficients ignore the step ratios), and its encode would extrapolate over growing steps
(``ipndm`` is refused there for the same reason). ``Grid(final_euler=False)`` is refused beside it: its
last step is never Euler to begin with (see :attr:`PNDM.final_euler_refused`).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from solvers import IPNDM, Derivative, History, StepResult

from ..engine.plugins import Plugin, register_plugin


class PNDM(IPNDM):
    """PLMS with a Heun first step (see the module docstring)."""

    #: Why :func:`flowdiff.generate` refuses ``Grid(final_euler=False)`` beside it: that flag turns the last step
    #: of a method that evaluates the model at σ = 0 from Euler into the method's own step, and PNDM's last step
    #: is its own already, whatever the flag says.
    final_euler_refused = ("pndm ends as diffusers' PNDMScheduler does, with its Adams–Bashforth step over the "
                           "derivatives already evaluated (with one step in all, DDIM's step from the one "
                           "evaluation), never an Euler step put in its place")

    def __init__(self) -> None:
        super().__init__(4)
        self.name = "pndm"  # type: ignore[misc]
        #: The last step (the driver's per-step method there): iPNDM's Adams–Bashforth over the history, as every
        #: step after the first; where the last step is also the first (one step in all), the history is empty and
        #: that step is Euler (DDIM's), one evaluation, as diffusers' loop of one step takes, not the Heun start.
        self.final_method = IPNDM(4)
        self.final_method.name = "pndm"  # type: ignore[misc]

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        if isinstance(state, History):
            return super().step(f, t0, t1, y0, state)
        k0 = state.k if isinstance(state, Derivative) and state.t == t0 else f(t0, y0)
        h = t1 - t0
        k1 = f(t1, y0.add(k0, alpha=h))
        return StepResult(y0.add(k0.add(k1), alpha=0.5 * h), History.of(t0, k0, ()), None)


def _make(options: dict[str, Any]) -> PNDM:
    if options:
        raise TypeError(f"solver 'pndm' takes no options, got {sorted(options)}")
    return PNDM()


register_plugin(Plugin("pndm", "generate", "solver", "diffusers' PNDMScheduler(skip_prk_steps=True): a Heun first "
                       "step, then iPNDM's equal-step Adams–Bashforth (order 4); 1 evaluation a step, 2 on the first "
                       "(one step in all is DDIM's, 1 evaluation, as diffusers' loop)",
                       make=_make, decodes_with="euler"))
