"""flowdiff's and diffusers' float32 results against their own float64 ones, on diffusers' scheduler routes.

R20's find: DPMSolverMultistepScheduler on the cosine schedule (σ_max ≈ 2e4) with v-prediction. Prints, per
config, each side's float32-vs-float64 relative difference (max |a − b| / max |b|) and, for the first config,
the data variables' field D (the denoised image) step by step, float32 against float64. Then ``solver_order=1``
(DPM-Solver++(1)) on four grids, planned as ``dpmpp_2m`` with ``order=1`` (the data variables) beside the same
loop run as Euler in σ (``sample_like(..., solver="euler")``, the plan before), each against its own float64.

    PYTHONPATH=$PWD python benchmarks/float32_gap.py
"""

from __future__ import annotations

import warnings

import torch

from flowdiff.engine import formulations
from flowdiff.engine.options import Checks
from flowdiff.tools import scheduler_suite as S

COSINE_V = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
CASES = (
    ("DPMSolverMultistepScheduler", {**COSINE_V, "use_exponential_sigmas": True}, 5),
    ("DPMSolverMultistepScheduler", {**COSINE_V, "use_exponential_sigmas": True}, 3),
    ("DPMSolverMultistepScheduler", {**COSINE_V, "use_karras_sigmas": True}, 3),
    ("DPMSolverMultistepScheduler", COSINE_V, 8),
    ("DPMSolverMultistepScheduler", {**COSINE_V, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 5),
    ("DPMSolverMultistepScheduler", {**COSINE_V, "solver_order": 1, "use_exponential_sigmas": True}, 5),
    ("DPMSolverMultistepScheduler", {**COSINE_V, "prediction_type": "epsilon", "use_exponential_sigmas": True}, 5),
    ("EulerDiscreteScheduler", {**COSINE_V, "use_exponential_sigmas": True}, 5),
)


def _steps_of_first() -> None:
    cls, options, steps = CASES[0]
    case = S.drawn_case(cls, options, steps)
    seen: dict[torch.dtype, list] = {}
    plain = formulations.data_field

    def logged(eps, sigma_of=None):  # noqa: ANN001, ANN202 - a tap on the field the solve builds
        f = plain(eps, sigma_of)

        def g(rho, y):  # noqa: ANN001, ANN202
            out = f(rho, y)
            seen.setdefault(y.dtype, []).append((rho, out.clone()))
            return out
        return g

    formulations.data_field = logged
    try:
        for dtype in (torch.float32, torch.float64):
            S.run_case(case, dtype, checks=Checks(growth=None))
    finally:
        formulations.data_field = plain
    print(f"\n{cls}({S._config_text(case)}), steps={steps}: D per evaluation, float32 vs float64")
    print("| σ | rel. difference of D |\n|---|---|")
    for (rho, d32), (_, d64) in zip(seen[torch.float32], seen[torch.float64]):
        print(f"| {1 / rho:.4g} | {S._rel(d32, d64):.2e} |")


ORDER_1 = (
    ({"use_exponential_sigmas": True}, 5),
    ({"use_karras_sigmas": True}, 3),
    ({}, 8),
    ({"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}, 5),
)


def _order_1() -> None:
    print("\nDPMSolverMultistepScheduler(solver_order=1), cosine v-prediction: float32 vs float64 of each route")
    print("| grid | steps | dpmpp_2m(order=1) (the plan) | euler in σ (the plan before) | diffusers |")
    print("|---|---|---|---|---|")
    for options, steps in ORDER_1:
        case = S.drawn_case("DPMSolverMultistepScheduler", {**COSINE_V, "solver_order": 1, **options}, steps)
        gaps = []
        for solver in (None, "euler"):
            kw = {} if solver is None else {"solver": solver}
            g32, r32, _, _ = S.run_case(case, torch.float32, checks=Checks(growth=None), **kw)
            g64, r64, _, _ = S.run_case(case, torch.float64, checks=Checks(growth=None), **kw)
            gaps.append(S._rel(g32, g64))
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items()) or "defaults"
        print(f"| {shown} | {steps} | {gaps[0]:.2e} | {gaps[1]:.2e} | {S._rel(r32, r64):.2e} |")


def main() -> None:
    warnings.filterwarnings("ignore")
    print("| scheduler | config | steps | flowdiff f32 vs f64 | diffusers f32 vs f64 | flowdiff vs diffusers f32 |")
    print("|---|---|---|---|---|---|")
    for cls, options, steps in CASES:
        case = S.drawn_case(cls, options, steps)
        g32, r32, _, _ = S.run_case(case, torch.float32, checks=Checks(growth=None))
        g64, r64, _, _ = S.run_case(case, torch.float64, checks=Checks(growth=None))
        print(f"| {cls.removesuffix('Scheduler')} | {S._config_text(case)} | {steps} | {S._rel(g32, g64):.2e} | "
              f"{S._rel(r32, r64):.2e} | {S._rel(g32, r32):.2e} |")
    _steps_of_first()
    _order_1()


if __name__ == "__main__":
    main()
