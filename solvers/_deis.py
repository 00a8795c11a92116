"""DEIS: the exponential integrator with the derivative extrapolated as a polynomial in log time.

Zhang & Chen, "Fast Sampling of Diffusion Models with Exponential Integrator" (ICLR 2023):
once the linear part of the diffusion ODE is integrated exactly, what remains is the integral
of the noise prediction ε over the step, and DEIS approximates ε by the polynomial through
its last few values — in their "log ρ" variant a polynomial in log ρ, where ρ is the noise
level of the scaled state. In the scaled state the remaining ODE is ``dy/dt = f(t, y)`` with
``f`` = ε and t = ρ, so the method is the Adams step

    y₁ = y₀ + Σ_j k_j ∫_{t₀}^{t₁} ℓ_j(log t) dt,

with ℓ_j the Lagrange basis in log t through the last ``order`` derivatives k_j (exact weights
by quadrature, :func:`solvers.adams_weights`). The classic Adams–Bashforth (``lms``) is the same
with the polynomial in t; the log-time polynomial follows an ε that varies on the scale of
log t, as a diffusion model's does on grids uniform in log σ. Where log t is undefined (a step
into t = 0) the step's polynomial is taken in t. One evaluation a step; the first steps use
the history they have, so a fixed-grid solve converges at order 2.
"""

from __future__ import annotations

from ._multistep import Adams
from ._registry import register


def _deis(order: int = 3) -> Adams:
    return Adams("deis", order, log_time=True)


register("deis", _deis, "DEIS (Zhang & Chen 2023), log-ρ variant: Adams–Bashforth of order (default 3, option "
         "order=1..4) with the derivative extrapolated in log t; 1 evaluation a step")
