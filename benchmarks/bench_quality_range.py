"""The darkest pixel of the shipped model's samples at NFE 2–10: the margin of sample_quality's [0, 1] check.

``flowdiff.sample_quality`` refuses images with no value below ``QUALITY_BACKGROUND_MARGIN`` (−0.5): a digit's
background is −1 in the model's range [−1, 1], and images in [0, 1] have none below 0. This runs every fixed-grid
solver on every named grid at NFE 2–10 (the budgets where samples overshoot most) and reports, per run, the
darkest value of the whole set and of its palest image (the largest per-image minimum): the check needs the
first below the margin; the second says how far that holds image by image.

    python benchmarks/bench_quality_range.py [--n 64] [--seeds 2] [--out benchmarks/results/quality_range.md]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import flowdiff
from flowdiff.tools.quality import QUALITY_BACKGROUND_MARGIN

SOLVERS = ("euler", "heun", "midpoint", "rk4", "lms", "ipndm", "abm", "deis", "dpmpp_2m", "dpmpp_3m", "unipc")
GRIDS = ("trailing", "leading", "linear", "quadratic", "karras", "logsnr")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="samples per run")
    parser.add_argument("--seeds", type=int, default=2, help="noise seeds per run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    flow = flowdiff.pretrained("digits")
    start = time.perf_counter()
    rows, runs, set_mins, palest = [], 0, [], []
    worst = None
    for seed in range(args.seeds):
        noise = torch.randn(args.n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        for solver in SOLVERS:
            for grid in GRIDS:
                for nfe in range(2, 11):
                    try:
                        x = flowdiff.generate(flow, noise, solver=solver, grid=grid, nfe=nfe).x
                    except ValueError:
                        continue  # a budget below the solver's cost of one step on this grid
                    runs += 1
                    per_image = x.reshape(args.n, -1).min(1).values
                    set_mins.append(float(x.min()))
                    palest.append(float(per_image.max()))
                    if worst is None or palest[-1] > worst[0]:
                        worst = (palest[-1], solver, grid, nfe, seed, float(x.min()), float(x.max()))
    test = flowdiff.digits_data("test").images
    wall = time.perf_counter() - start
    margin = QUALITY_BACKGROUND_MARGIN
    rows.append(f"| runs (solver × grid × NFE 2–10 × seed, {args.n} samples each) | {runs} |")
    rows.append(f"| darkest value of a run's set: largest over runs | {max(set_mins):.3f} |")
    rows.append(f"| runs whose set has no value below {margin} (would be refused) | "
                f"{sum(m >= margin for m in set_mins)} |")
    rows.append(f"| palest image's darkest pixel: largest over runs | {worst[0]:.3f} ({worst[1]}, {worst[2]}, NFE "
                f"{worst[3]}, seed {worst[4]}; that set spans [{worst[5]:.3g}, {worst[6]:.3g}]) |")
    rows.append(f"| runs with an image whose darkest pixel is ≥ {margin} | {sum(p >= margin for p in palest)} |")
    rows.append(f"| runs whose set reaches below −2.5 (overshoot) | "
                f"{sum(1 for m in set_mins if m < -2.5)} |")
    rows.append(f"| held-out digits (364): palest image's darkest pixel | "
                f"{float(test.reshape(len(test), -1).min(1).values.max()):.3f} |")
    text = ("| quantity | value |\n|---|---|\n" + "\n".join(rows) + "\n\n"
            f"Wall time {wall:.0f} s (one thread).\n")
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
