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

The log-time weights are chosen step by step (``Adams(log_time_by_step=True)``): every step
whose nodes and ends lie away from t = 0 takes them, also in a solve that ends or starts at
t = 0, as every generation in σ does; only the step into 0 (and, out of 0, the steps whose
nodes still include 0) take the polynomial in t. Generic log-time Adams methods instead take the
polynomial in t for the whole of such a solve (:meth:`Adams.on_interval`), where DEIS would be
``lms`` of its order. Next to 0 the log-time polynomial spans O(1) in log t; on a field smooth
in t (not in log t) the fixed-grid order there, measured by slope fit on both directions and
across 0 (``tests/test_deis_log_weights.py``, ``benchmarks/deis_generation.py --orders-only``),
is 2 for order 3 and 4, as away from 0 (slopes 1.88-2.06 fitted over 64-512 steps; across 0 the slope from 32
to 64 steps is still about 1.6, reaching 1.95 by 512); for order 2 about 1.8 (its steps
near 0 add up to O(h² log(1/h))); 1 for order 1 (Euler).
"""

from __future__ import annotations

from ._multistep import Adams
from ._registry import register


def _deis(order: int = 3) -> Adams:
    return Adams("deis", order, log_time=True, log_time_by_step=True)


register("deis", _deis, "DEIS (Zhang & Chen 2023), log-ρ variant: Adams–Bashforth of order (default 3, option "
         "order=1..4) with the derivative extrapolated in log t on every step away from t = 0 (in t on a step "
         "into 0); 1 evaluation a step")
