"""Cost and accuracy of flowdiff.compare's reference solve on the shipped digits model.

For each tolerance: the NFE and wall time of the tight solve, its estimated error (from the 100× looser
check solve, by tolerance proportionality) and its measured RMS distance to the tightest solve.

    python benchmarks/bench_compare.py [--batch 16] [--tols 1e-3,1e-4,1e-5,1e-6,1e-7]

The solver tables themselves come from the command line: ``flowdiff compare`` (see
benchmarks/results/compare.md).
"""

import argparse

import torch

from flowdiff import reference_solution
from flowdiff.models import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tols", default="1e-3,1e-4,1e-5,1e-6,1e-7")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tols = sorted((float(t) for t in args.tols.split(",")), reverse=True)
    flow = pretrained("digits")
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(args.batch, 1, 8, 8, generator=gen, dtype=torch.float64).float()
    refs = {tol: reference_solution(flow, noise, rtol=tol, atol=tol, cache=False) for tol in tols}
    best = refs[tols[-1]].x
    print(f"| tol | NFE | wall s | estimated error | RMS distance to the tol {tols[-1]:g} reference |")
    print("|---:|---:|---:|---:|---:|")
    for tol, ref in refs.items():
        dist = float((ref.x - best).pow(2).mean().sqrt())
        print(f"| {tol:g} | {ref.nfe} | {ref.wall_time:.1f} | {ref.error:.1e} | "
              f"{'—' if tol == tols[-1] else f'{dist:.1e}'} |")


if __name__ == "__main__":
    main()
