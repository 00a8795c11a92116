"""`deis` in a generation: its RMS image error with its log-σ weights on every step away from σ = 0 (now) and under
b74a095's rule (the polynomial in σ on the whole of a solve that touches σ = 0: `lms(order=3)`'s weights), side by
side in one run; and whether the shipped tuned `deis` grids reproduce the error they were tuned to.

    python benchmarks/deis_generation.py [--orders-only]

Part 1: the shipped digits model, 16 noises of ``torch.Generator().manual_seed(0)``, against a dopri8 float64
reference (rtol = atol = 1e-5); NFE 10, 20 and 50 on the logsnr, karras and trailing grids and on the shipped tuned
grid (``flowdiff.stored_grid``). b74a095's rule is ``solvers.Adams("deis", 3, log_time=True)``, which the loop turns
into polynomial weights in σ on a grid that ends at 0 (``Adams.on_interval``); the last column says whether `deis`
equals `lms(order=3)` bit for bit (it did on every grid from b74a095 on).

Part 2: each shipped `deis` grid on the noise it was tuned on (16 of ``CALIBRATION_SEED``, float32, reference at
rtol = atol = 1e-6, as ``flowdiff.tune`` measured it): the stored ``calibration_error`` beside this tree's `deis` and
b74a095's rule on the same grid. The grid was tuned for the method that reproduces its stored error.

Part 3 (seconds; alone with ``--orders-only``): the fixed-grid order of `deis` (order 1-4) on intervals that start
at, end at or cross t = 0, by a slope fit over 64-1024 steps on dy/dt = r·cos(t)·y (smooth in t, not in log t;
closed-form solution), beside b74a095's rule.
"""

import argparse
import math
import time

import numpy as np
import torch

import flowdiff
import solvers
from flowdiff.tools.compare import CALIBRATION_SEED


def _rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).pow(2).mean().sqrt())


def orders() -> None:
    rates = torch.tensor([1.0, -0.7, 1.6], dtype=torch.float64)

    def f(t: float, y: torch.Tensor) -> torch.Tensor:
        return rates * y * math.cos(t)

    def exact(t: float) -> torch.Tensor:
        return torch.exp(rates * math.sin(t))

    ns = [64, 128, 256, 512, 1024]

    def slope(solver: solvers.Solver, t0: float, t1: float) -> float:
        errs = [float((solvers.solve(f, exact(t0), np.linspace(t0, t1, n + 1), solver).y - exact(t1)).abs().max())
                for n in ns]
        return float(-np.polyfit(np.log(ns), np.log(errs), 1)[0])

    intervals = [(0.0, 1.0), (1.0, 0.0), (-1.0, 1.0), (1.0, -1.0), (1.0, 2.0)]
    print("\nFixed-grid order by slope fit (n = 64..1024): deis now / b74a095's rule\n")
    print("| order | " + " | ".join(f"[{a:g}, {b:g}]" for a, b in intervals) + " |\n|---" + "|---" * len(intervals)
          + "|")
    for order in (1, 2, 3, 4):
        old = solvers.Adams("deis", order, log_time=True)
        cells = [f"{slope(solvers.get('deis', order=order), a, b):.2f} / {slope(old, a, b):.2f}" for a, b in intervals]
        print(f"| {order} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders-only", action="store_true", help="only part 3 (the orders; seconds)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.time()
    if args.orders_only:
        orders()
        return
    flow = flowdiff.pretrained("digits")
    interval_rule = solvers.Adams("deis", 3, log_time=True)  # b74a095's: log weights off on a solve touching 0
    lms = solvers.get("lms", order=3)
    print(f"flowdiff from {flowdiff.__file__}")

    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    ref = flowdiff.reference_solution(flow, noise, rtol=1e-5, atol=1e-5).x
    print("\nRMS error, seed 0: deis now / b74a095's rule\n")
    print("| grid | NFE 10 | NFE 20 | NFE 50 | deis equal to lms(order=3) |\n|---|---|---|---|---|")
    for grid in ("logsnr", "karras", "trailing", "tuned"):
        cells, equal = [], True
        for nfe in (10, 20, 50):
            # a named grid takes the budget; the tuned grid's σ fix it
            grid_kw = {"grid": flowdiff.stored_grid(flow, "deis", nfe).sigmas} if grid == "tuned" else {
                "grid": grid, "nfe": nfe}
            x = flowdiff.generate(flow, noise, solver="deis", **grid_kw).x
            old = flowdiff.generate(flow, noise, solver=interval_rule, **grid_kw).x
            in_t = flowdiff.generate(flow, noise, solver=lms, **grid_kw).x
            cells.append(f"{_rms(x, ref):.2e} / {_rms(old, ref):.2e}")
            equal = equal and torch.equal(x, in_t)
        print(f"| {grid} | {' | '.join(cells)} | {'yes' if equal else 'no'} |")

    calibration = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(CALIBRATION_SEED))
    target = flowdiff.reference_solution(flow, calibration, rtol=1e-6, atol=1e-6,
                                         sigma_end=0.0 if flow.sigma_field is not None else None).x.double()
    print("\nThe shipped deis grids on their calibration noise (RMS error)\n")
    print("| NFE | stored calibration_error | deis now | b74a095's rule |\n|---|---|---|---|")
    for nfe in (10, 20, 50):
        tuned = flowdiff.stored_grid(flow, "deis", nfe)
        x = flowdiff.generate(flow, calibration, solver="deis", grid=tuned.sigmas).x
        old = flowdiff.generate(flow, calibration, solver=interval_rule, grid=tuned.sigmas).x
        print(f"| {nfe} | {tuned.calibration_error:.4e} | {_rms(x, target):.4e} | {_rms(old, target):.4e} |")
    orders()
    print(f"\n{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
