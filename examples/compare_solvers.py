"""Which solver for a budget of N model evaluations? Compare solvers at fixed NFE on one batch of noise.

Every solver × grid × budget generates from the same seeded noise; each image is measured against a
tight float64 adaptive reference solve of the same ODE (Dormand–Prince 8(7)), so the table is the
discretisation error alone, in the image's [−1, 1] scale. Writes the wide table (``compare.md``),
every run (``compare.csv``) and the log-log plot of error against NFE (``error_vs_nfe.png``).

    python examples/compare_solvers.py                                   # the shipped digits model
    python examples/compare_solvers.py --solvers euler,unipc --nfe 5,10,20 --out results/

Use your own model with ``--model DIR`` (a local diffusers ``save_pretrained`` directory).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch

import flowdiff


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", help="'digits' (shipped) or a diffusers model directory")
    parser.add_argument("--solvers", default="euler,heun,dpmpp_2m,unipc", help="comma-separated solver names")
    parser.add_argument("--grids", default="trailing,logsnr", help="comma-separated grid names")
    parser.add_argument("--nfe", default="10,20", help="comma-separated NFE budgets")
    parser.add_argument("--batch", type=int, default=8, help="noise samples (default: 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-4,
                        help="tolerance of the reference (default 1e-4; 1e-5 or tighter for published figures)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("FLOWDIFF_OUT", "out")),
                        help="output folder (default: $FLOWDIFF_OUT or ./out)")
    args = parser.parse_args(argv)
    if args.batch < 1 or args.seed < 0:  # torch wraps a negative seed round silently
        parser.error(f"--batch must be at least 1 and --seed at least 0, got --batch {args.batch} and --seed "
                     f"{args.seed}")
    if args.model != "digits" and not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r}: no such folder (give 'digits' or a diffusers model directory)")
    try:
        budgets = [int(n) for n in args.nfe.split(",")]
    except ValueError:
        parser.error(f"--nfe must be comma-separated whole numbers, got {args.nfe!r}")

    flow = flowdiff.pretrained("digits") if args.model == "digits" else flowdiff.from_diffusers(args.model)
    shape = (1, 8, 8) if args.model == "digits" else tuple(flow.model.sample_shape)
    noise = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(args.seed))
    table = flowdiff.compare(flow, noise, solvers=args.solvers.split(","), grids=args.grids.split(","),
                             nfe=budgets, rtol=args.rtol, atol=args.rtol)

    args.out.mkdir(parents=True, exist_ok=True)
    markdown = table.to_markdown()
    (args.out / "compare.md").write_text(markdown, encoding="utf-8")
    (args.out / "compare.csv").write_text(table.to_csv(), encoding="utf-8")
    table.plot(args.out / "error_vs_nfe.png", title=f"{args.model}: RMS error against the reference")
    print(markdown)
    print(f"reference: {table.reference.nfe} NFE, its own error ≈ {table.reference.error:.1e}")
    for budget in table.budgets:
        best = table.best(budget)
        print(f"best at NFE {budget}: {best.solver} on {best.grid} "
              f"(RMS error {best.rms_error:.2e}, NFE used {best.nfe})")
    print(f"wrote {args.out / 'compare.md'}, compare.csv and error_vs_nfe.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
