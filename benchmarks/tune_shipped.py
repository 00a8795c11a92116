"""Tune the grids flowdiff ships for ``pretrained("digits")``: one per default solver × default budget.

``flowdiff compare`` (``make demo``) shows these as its ``tuned`` grid next to the named ones
without tuning anything: :func:`flowdiff.stored_grid` finds them by the model's fingerprint,
solver, options and budget. They are tuned here, once, on calibration noise drawn with
``flowdiff.tools.compare.CALIBRATION_SEED`` (the demo measures on seed 0: other noise), in the demo's
precision (float32) against a float64 reference, by ``flowdiff.tune(method="dp+search")``: the
best of the GITS-style DP grids and the named grids starts a short direct search (see
:mod:`flowdiff.tools.tuning`).

Usage: python benchmarks/tune_shipped.py [--batch 16] [--max-evals 40] [--out flowdiff/weights/digits.tuned.json]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import flowdiff
from flowdiff.tools.compare import CALIBRATION_SEED, DEFAULT_NFE, default_solvers
from flowdiff.tools.tuning import STORED_DIR


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16, help="calibration batch (default 16, the demo's batch)")
    parser.add_argument("--max-evals", type=int, default=40, help="candidate solves per grid (default 40)")
    parser.add_argument("--max-evals-from-50", type=int, default=12,
                        help="candidate solves per grid at NFE >= 50, where grids matter least (default 12: the "
                             "named and DP starts and a short search)")
    parser.add_argument("--nfe", default=",".join(map(str, DEFAULT_NFE)))
    parser.add_argument("--solvers", default=",".join(default_solvers()))
    parser.add_argument("--out", default=str(STORED_DIR / "digits.tuned.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    flow = flowdiff.pretrained("digits")  # float32, as `flowdiff compare` runs it
    noise = torch.randn(args.batch, 1, 8, 8, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    grids = []
    started = time.perf_counter()
    for solver in args.solvers.split(","):
        for budget in (int(b) for b in args.nfe.split(",")):
            method = "dp+search"
            tuned = flowdiff.tune(flow, noise, solver=solver, nfe=budget, method=method, reference_tol=1e-6,
                                  max_evals=args.max_evals if budget < 50 else args.max_evals_from_50, progress=False)
            grids.append(tuned)
            print(f"{solver} NFE {budget}: {method}, calibration RMSE {tuned.calibration_error:.3e} (start "
                  f"{tuned.initial_grid} {tuned.initial_error:.3e}), {tuned.tuning_nfe} NFE, "
                  f"{tuned.tuning_seconds:.1f} s  [{time.perf_counter() - started:.0f} s]", flush=True)
    path = flowdiff.save_grids(grids, Path(args.out))
    print(f"wrote {len(grids)} grids to {path}")


if __name__ == "__main__":
    main()
