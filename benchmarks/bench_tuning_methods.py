"""What each tuning method and option buys on the closed-form mixture (the exploratory runs behind RESULTS.md).

``methods``: for NFE budgets and four solvers, ``flowdiff.tune`` with each ``--methods`` entry on a
calibration batch (seed 1) and its RMSE on the evaluation batch (seed 0, 128 samples) against the
float64 reference — e.g. ``python benchmarks/bench_tuning_methods.py methods --nfe 6,8 --calibration 128
--max-evals 150 --methods search,dp,dp+search`` (calibration size, start grid, seconds printed too), or
with ``--extra "{'free_start': True}"`` for other tune options.

``samples``: the per-sample errors of unipc(2) on logsnr at NFE 20 and 50 on the evaluation batch
(which samples set the RMSE).
"""

from __future__ import annotations

import argparse
import ast
import time

import torch
from _kdiffusion import mixture_flow, rmse

import flowdiff
import solvers

SOLVERS = [("unipc", {"order": 2}), ("ipndm", {"order": 3}), ("dpmpp_3m", {}), ("deis", {})]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("methods", "samples"))
    parser.add_argument("--nfe", default="6,8")
    parser.add_argument("--calibration", type=int, default=128)
    parser.add_argument("--max-evals", type=int, default=150)
    parser.add_argument("--methods", default="search,dp,dp+search")
    parser.add_argument("--extra", default="{}", help="more tune options, as a Python dict literal")
    args = parser.parse_args()
    torch.set_num_threads(1)
    flow = mixture_flow()
    noise = torch.randn(128, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, rtol=1e-8, atol=1e-8)
    if args.what == "samples":
        for nfe in (20, 50):
            out = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=2), nfe=nfe, grid="logsnr")
            err = (out.x - ref.x).reshape(noise.shape[0], -1).pow(2).mean(1).sqrt().sort(descending=True)
            print(f"NFE {nfe}: RMSE {float(err.values.pow(2).mean().sqrt()):.3e}, largest per-sample errors "
                  f"{[round(float(v), 3) for v in err.values[:5]]} (samples {err.indices[:3].tolist()}), "
                  f"RMSE without the worst {float(err.values[1:].pow(2).mean().sqrt()):.3e}")
        return
    extra = ast.literal_eval(args.extra)
    calibration = torch.randn(args.calibration, 1, 8, 8, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
    for nfe in (int(b) for b in args.nfe.split(",")):
        for solver, options in SOLVERS:
            named = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options), nfe=nfe, grid="logsnr")
            print(f"NFE {nfe} {solver}{options or ''} on logsnr: evaluation {rmse(named.x, ref.x):.3e}")
            for method in args.methods.split(","):
                start = time.perf_counter()
                tuned = flowdiff.tune(flow, calibration, solver=solver, nfe=nfe, solver_options=options,
                                      progress=False, reference_tol=1e-6, method=method, **extra,
                                      **({} if method == "dp" else {"max_evals": args.max_evals}))  # dp: no search
                out = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options), grid=tuned.sigmas)
                print(f"NFE {nfe} {solver}{options or ''} {method}: calibration {tuned.calibration_error:.3e}, "
                      f"evaluation {rmse(out.x, ref.x):.3e} (start {tuned.initial_grid}, "
                      f"{time.perf_counter() - start:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
