"""The Runge–Kutta methods of the registry.

Textbook tableaus (Euler, midpoint, Heun, Ralston, Kutta's third order, classic RK4 and
the 3/8 rule) are written here; the embedded pairs are taken from torchdiffeq's own
tableaus so that ``dopri5`` here is torchdiffeq's ``dopri5``: an adaptive solve of the same
problem at the same tolerances evaluates ``f`` at the same times, as long as no accepted step is
shrunk (torchdiffeq's controller never shrinks an accepted step; this one may, by its safety
factor); ``bosh3`` likewise.

``adaptive_heun`` and ``fehlberg2`` are not first-same-as-last: their last stage is evaluated at
an intermediate state (the Euler predictor; the first-order solution), not at the step's result,
so each step here evaluates ``f`` at its own start. torchdiffeq's solvers of those names reuse
that last stage as the next step's first derivative instead (one evaluation a step fewer, a
derivative taken O(h²) off the state); NFE and results differ from theirs accordingly.
"""

from __future__ import annotations

from functools import partial

from torchdiffeq._impl.adaptive_heun import _ADAPTIVE_HEUN_TABLEAU
from torchdiffeq._impl.bosh3 import _BOGACKI_SHAMPINE_TABLEAU
from torchdiffeq._impl.dopri5 import _DORMAND_PRINCE_SHAMPINE_TABLEAU
from torchdiffeq._impl.dopri8 import _DOPRI8_TABLEAU
from torchdiffeq._impl.fehlberg2 import _FEHLBERG2_TABLEAU

from ._registry import register
from ._rk import ExplicitRK
from ._tableau import ButcherTableau as BT

EULER = BT(c=(0.0,), a=(), b=(1.0,))
MIDPOINT = BT(c=(0.0, 0.5), a=((0.5,),), b=(0.0, 1.0))
HEUN = BT(c=(0.0, 1.0), a=((1.0,),), b=(0.5, 0.5))
RALSTON = BT(c=(0.0, 2 / 3), a=((2 / 3,),), b=(0.25, 0.75))
HEUN3 = BT(c=(0.0, 1 / 3, 2 / 3), a=((1 / 3,), (0.0, 2 / 3)), b=(0.25, 0.0, 0.75))
RK4 = BT(c=(0.0, 0.5, 0.5, 1.0), a=((0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), b=(1 / 6, 1 / 3, 1 / 3, 1 / 6))
RK38 = BT(c=(0.0, 1 / 3, 2 / 3, 1.0), a=((1 / 3,), (-1 / 3, 1.0), (1.0, -1.0, 1.0)), b=(1 / 8, 3 / 8, 3 / 8, 1 / 8))

#: name -> (tableau, order, summary)
_FIXED = {
    "euler": (EULER, 1, "explicit Euler (DDIM exactly, on the probability-flow ODE)"),
    "midpoint": (MIDPOINT, 2, "explicit midpoint, 2 evaluations a step"),
    "heun": (HEUN, 2, "Heun's method (trapezoidal RK2), 2 evaluations a step"),
    "ralston": (RALSTON, 2, "Ralston's RK2 (minimum error bound), 2 evaluations a step"),
    "heun3": (HEUN3, 3, "Heun's third-order method, 3 evaluations a step"),
    "rk4": (RK4, 4, "classic fourth-order Runge–Kutta, 4 evaluations a step"),
    "rk38": (RK38, 4, "Kutta's 3/8 rule (torchdiffeq's fixed-grid 'rk4'), 4 evaluations a step"),
}

#: name -> (torchdiffeq tableau, order, error order, summary)
_EMBEDDED = {
    "adaptive_heun": (_ADAPTIVE_HEUN_TABLEAU, 2, 1, "Heun–Euler pair (torchdiffeq's adaptive_heun tableau), 2 "
                      "evaluations a step"),
    "fehlberg2": (_FEHLBERG2_TABLEAU, 2, 1, "Runge–Kutta–Fehlberg 1(2) pair (torchdiffeq's fehlberg2 tableau), 3 "
                  "evaluations a step"),
    "bosh3": (_BOGACKI_SHAMPINE_TABLEAU, 3, 2, "Bogacki–Shampine 3(2) pair, FSAL (torchdiffeq's bosh3)"),
    "dopri5": (_DORMAND_PRINCE_SHAMPINE_TABLEAU, 5, 4, "Dormand–Prince 5(4) pair, FSAL (torchdiffeq's dopri5)"),
    "dopri8": (_DOPRI8_TABLEAU, 8, 7, "Dormand–Prince 8(7) pair (torchdiffeq's dopri8)"),
}


def _make(name: str, tableau: BT, order: int, error_order: int | None = None) -> ExplicitRK:
    return ExplicitRK(name, tableau, order, error_order=error_order)


for _name, (_tab, _order, _summary) in _FIXED.items():
    register(_name, partial(_make, _name, _tab, _order, None), _summary)  # every argument bound: no options

for _name, (_tdtab, _order, _err_order, _summary) in _EMBEDDED.items():
    register(_name, partial(_make, _name, BT.from_torchdiffeq(_tdtab), _order, _err_order),
             _summary + "; adaptive or fixed-grid")
