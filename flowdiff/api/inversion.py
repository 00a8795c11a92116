"""Exact encoding by reversible solvers: encode in the VP variables, decode by the exact inverse steps.

Encoding with an explicit solver and decoding with the same solver is not the identity: each
direction makes its own O(h^p) error (the DDIM paper's Table 2 measures it). Two ways to make
``decode(encode(x)) == x`` up to floating-point rounding:

* **Reversible solvers** (:mod:`solvers` ``reversible_heun``, ``reversible``): the encode
  carries the solver's second variable in ``Latent.solver_state``, and :func:`decode_reversible`
  runs the exact algebraic inverse of every encode step (:func:`solvers.unsolve`). No
  iteration, no tolerance; the decode costs one (reversible Heun) or two (wrapped Euler)
  evaluations a step.

  They are integrated in the VP-scaled state x = x̄/√(1+σ²) with time τ = log(1 + σ)
  (:class:`flowdiff.engine.formulations.VP`), not in (σ, x̄). The variables describe the same ODE,
  but the rounding of the algebraic inverse is not the same: x̄ grows to σ_max·|noise| (157
  for DDPM's linear schedule, 2·10⁴ for the cosine one), and a reversible method's inverse
  multiplies the rounding of its second variable by about h·L (step times the field's
  Lipschitz constant at the step's low end), which for coarse σ steps is of order σ_max.
  Measured on a closed-form mixture: 10⁻³ max error in float32 and 10⁻⁷ in float64 (cosine)
  in (σ, x̄); in (τ, x), where |x| = O(1), the field is nearly zero at large σ and steps are
  relative, the round trip is at rounding level for every schedule, grid and step count
  (≈10⁻¹⁵ in float64, ≈10⁻⁶ in float32).

* **Fixed-point inversion** of any explicit solver (:mod:`flowdiff.api.fixed_point`): a plain
  latent that the standard decode turns back into the image.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from solvers import FixedGrid, ReversibleState, Solver

from ..engine.flow import to_model_scale
from ..engine.formulations import formulation_for
from ..engine.grids import reversed_grid
from ..engine.latent import Latent
from ..engine.loop import solve_flow
from ..engine.options import Request, compute_dtype
from ..engine.results import Result

#: reversible Heun's grid for float32 (and lower) images integrated in float64: states are multiples of 2⁻⁴⁰ (below
#: float32's resolution by 2¹⁶ at |x| = 1, exact for |x| < 2¹³), so the decode recomputes bit-identical model inputs
EXACT_QUANTUM = 2.0**-40


def decode_reversible(request: Request, latent: Latent, *, adjoint: str = "autograd",
                      params: tuple[Tensor, ...] = ()) -> Result:
    """Decode a reversible solver's latent by running the encode's exact inverse steps.

    The inverse runs in the VP variables the encode used (:class:`~flowdiff.engine.formulations.VP`)
    and starts from the latent's x_T itself, with the second variable from
    ``latent.solver_state``: it is the inverse mode of the one loop along the encode grid, so
    ``final_euler`` does not apply — every step is the inverse of the encode step it undoes.
    """
    solver: Solver = request.solver
    if not solver.reversible:
        raise TypeError(f"decode_reversible needs a reversible solver, got {solver.name!r}")
    state = latent.solver_state
    if not isinstance(state, ReversibleState):
        raise ValueError(f"this latent carries no reversible solver state (solver {latent.solver!r}); "
                         "decode it with flowdiff.decode")
    enc = np.asarray(latent.sigmas, dtype=np.float64)
    x = latent.x
    cast = {"dtype": compute_dtype(x), "device": x.device}
    y0 = x.to(**cast)
    # its tensors in the decode's dtype and device; its time and maker (made_by) as the latent recorded them
    state = state._replace(z=state.z.to(**cast), k=None if state.k is None else state.k.to(**cast))
    model_dtype = latent.dtype if latent.dtype != cast["dtype"] else None
    form = formulation_for(solver, "decode")  # the encode's variables (VP for a reversible solver)
    times = form.times(enc.tolist())
    stepping = FixedGrid(times, inverse=True)
    # the solver's own check of the state the solve is given (its maker, time, shape, dtype), refused before any
    # evaluation under the name the caller knows: a state made by another configuration (latent.solver_options
    # changed since the encode) would be undone with the wrong inverse and give other images without a word
    solver.check_carried(form.state_in(state), times[-1], y0, name="latent.solver_state")
    sol = solve_flow(request.flow.field(request.model_kwargs, model_dtype), form, stepping, solver,
                     sigma0=float(enc[-1]), y0=y0, state=state, callback=request.callback,
                     check_finite=request.check_finite, bound=request.bound,
                     adjoint=adjoint, params=params)
    return Result(to_model_scale(request.flow, sol.xbar, float(enc[0])).to(latent.dtype), sol.stats,
                  reversed_grid(enc), solver.name)

