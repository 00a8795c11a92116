"""`deis` in a generation: its RMS image error, and whether it equals `lms(order=3)` bit for bit.

Run it on two trees to compare them, e.g. this one and the one before a change to solvers/:

    python benchmarks/deis_generation.py
    git archive <commit> | tar -x -C /tmp/before && PYTHONPATH=/tmp/before python benchmarks/deis_generation.py

The shipped digits model, 16 noises of ``torch.Generator().manual_seed(0)``, against a dopri8 float64 reference
(rtol = atol = 1e-5); `deis` at NFE 10, 20 and 50 on the logsnr, karras and trailing grids.
"""

import time

import torch

import flowdiff
import solvers


def main() -> None:
    torch.set_num_threads(1)
    flow = flowdiff.pretrained("digits")
    noise = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    start = time.time()
    ref = flowdiff.reference_solution(flow, noise, rtol=1e-5, atol=1e-5).x
    print(f"flowdiff from {flowdiff.__file__}")
    print("| grid | NFE 10 | NFE 20 | NFE 50 | equal to lms(order=3) |\n|---|---|---|---|---|")
    for grid in ("logsnr", "karras", "trailing"):
        errors, equal = [], True
        for nfe in (10, 20, 50):
            x = flowdiff.generate(flow, noise, solver="deis", nfe=nfe, grid=grid).x
            lms = flowdiff.generate(flow, noise, solver=solvers.get("lms", order=3), nfe=nfe, grid=grid).x
            errors.append(f"{float((x.double() - ref).pow(2).mean().sqrt()):.2e}")
            equal = equal and torch.equal(x, lms)
        print(f"| {grid} | {' | '.join(errors)} | {'yes' if equal else 'no'} |")
    print(f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
