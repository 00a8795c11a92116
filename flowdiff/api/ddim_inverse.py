"""diffusers' DDIMInverseScheduler (and prompt-to-prompt's null-text inversion) as an encode method.

In DDIM's variables x̄ = x/α(σ) (any schedule x = α·x₀ + s·ε, σ = s/α) the proper Euler encode evaluates ε at
the current state and the current noise level: x̄_{n+1} = x̄_n + (σ_{n+1} − σ_n)·ε(x̄_n, σ_n). DDIMInverse
evaluates the model on the current sample x_n = α(σ_n)·x̄_n but with the *target* timestep t(σ_{n+1}) (DDIM,
Song et al., "Denoising Diffusion Implicit Models", 2021, run upward with the ε of the less noisy point, as
diffusers runs it), and takes the same Euler step in x̄ with that ε. Both are first order in the step; they
differ by O(h) per step in where ε is sampled, and neither decodes back exactly with DDIM.
``encode(..., solver="ddim_inverse")`` reproduces diffusers to float rounding so that results obtained with it
can be compared like for like.

diffusers turns the prediction into ε at the *source* level σ_n, where the sample is, so the step
is Euler from σ_n with the model fed the *target* timestep t(σ_{n+1}) there: :meth:`DDIMInverse.flow_for`
gives ``encode`` that flow (the flow's ``timesteps`` option), for every prediction type (a
``v_prediction`` or ``sample`` prediction converted at σ_{n+1} instead is 0.3 relative off on
SD 2.1-like configs). :func:`flowdiff.models.pipelines.encode_like` adds DDIMInverseScheduler's own
grid and timesteps (configs that start at σ_min).

diffusers defines the method on VP schedules only; the definition above holds in x̄ on every schedule, and
flowdiff uses it on variance-exploding and flow-matching schedules too. A model fed the sample x_n with the time
of σ_{n+1} reads it as the state x_n/α(σ_{n+1}) in x̄, so a σ-native field (an ε model given in σ) is evaluated at
(x̄_n·α(σ_n)/α(σ_{n+1}), σ_{n+1}): the ratio is √(1+σ_{n+1}²)/√(1+σ_n²) on VP, 1 on VE and
(1+σ_{n+1})/(1+σ_n) on flow matching, and both spellings of one model give one latent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from solvers import Solver, StepResult

from ..engine.flow import ProbabilityFlow
from ..engine.plugins import Plugin, register_plugin


class DDIMInverse(Solver):
    """One DDIMInverse step: Euler from σ_n, on the flow that :meth:`flow_for` gives for the grid."""

    name = "ddim_inverse"
    order = 1

    def step(self, f: Any, t0: float, t1: float, y0: Tensor, state: Any) -> StepResult:
        return StepResult(y0.add(f(t0, y0), alpha=t1 - t0), None)

    @staticmethod
    def flow_for(flow: ProbabilityFlow, sigmas: Sequence[float]) -> ProbabilityFlow:
        """The flow this method's steps run on across the increasing grid ``sigmas``: the model fed, at
        each σ_n, the timestep of σ_{n+1} (from the flow's own ``timesteps`` where it has them) with its input
        α(σ_n)·x̄_n unchanged; a σ-native field evaluated where that model reads its input, at
        (x̄_n·α(σ_n)/α(σ_{n+1}), σ_{n+1}) with α the schedule's (:meth:`flowdiff.Schedule.alpha`)."""
        pairs = list(zip(sigmas[:-1], sigmas[1:]))
        if flow.sigma_field is None:
            t_of = flow.field_timestep
            return flow.with_timesteps({float(s0): t_of(float(s1)) for s0, s1 in pairs})
        alpha = flow.schedule.alpha
        eps = flow.sigma_field
        # σ_n -> (σ_{n+1}, α(σ_n)/α(σ_{n+1})), in float64 on the host once per solve
        lag = {float(s0): (float(s1), alpha(float(s0)) / alpha(float(s1))) for s0, s1 in pairs}

        def lagged(xbar: Tensor, sigma: float, **model_kwargs: Any) -> Tensor:
            s1, ratio = lag.get(sigma, (sigma, 1.0))
            return eps(xbar * ratio, s1, **model_kwargs)

        return ProbabilityFlow.from_sigma_field(lagged, flow.schedule)


def _make(options: dict[str, Any]) -> DDIMInverse:
    if options:
        raise TypeError(f"solver 'ddim_inverse' takes no options, got {sorted(options)}")
    return DDIMInverse()


register_plugin(Plugin("ddim_inverse", "encode", "solver", "diffusers' DDIMInverseScheduler: Euler with the model's "
                       "timestep at the step's end; its latents decode with Euler (DDIM)", make=_make,
                       decodes_with="euler"))
