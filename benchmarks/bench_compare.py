"""Cost and accuracy of flowdiff.compare's reference solve on the shipped digits model.

For each tolerance: the NFE and wall time of the tight solve, its estimated error (from the 100× looser
check solve, by tolerance proportionality) and its measured RMS distance to the tightest solve.

    python benchmarks/bench_compare.py [--batch 16] [--tols 1e-3,1e-4,1e-5,1e-6,1e-7]

``--demo`` runs ``make demo``'s comparison instead (``flowdiff compare --peers diffusers,k-diffusion`` on
the shipped model, the reference solved afresh), times it, and prints its best-per-budget table: flowdiff
against diffusers and k-diffusion in one run.

    python benchmarks/bench_compare.py --demo [--out /tmp/flowdiff-demo]
"""

import argparse
import platform
import resource
import time
from pathlib import Path

import torch

from flowdiff import reference_solution
from flowdiff.models import pretrained


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tols", default="1e-3,1e-4,1e-5,1e-6,1e-7")
    parser.add_argument("--demo", action="store_true", help="time make demo's comparison and print its summary")
    parser.add_argument("--out", default="/tmp/flowdiff-demo", help="the demo's report folder (with --demo)")
    args = parser.parse_args()
    if args.demo:
        demo(Path(args.out))
        return
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


def demo(out: Path) -> None:
    """``make demo``'s ``flowdiff compare --peers diffusers,k-diffusion``, timed, its reference solved afresh."""
    from flowdiff.cli import main

    argv = ["compare", "--peers", "diffusers,k-diffusion", "--out", str(out), "--overwrite", "--fresh-reference",
            "--no-progress"]
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    code = main(argv)
    wall, cpu1 = time.perf_counter() - wall0, resource.getrusage(resource.RUSAGE_SELF)
    if code != 0:
        raise SystemExit(code)
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    report = (out / "compare.md").read_text()
    best = report[report.index("## Best per budget"):report.index("## The frontier")].split("\n", 2)[2].strip()
    facts = [line for line in report.splitlines() if line.startswith(("- **reference**", "- **versions**"))]
    print(f"`flowdiff {' '.join(argv[:3])}` (make demo) — {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} torch thread(s): {wall:.0f} s wall, {cpu:.0f} s CPU, reference included.\n")
    print("\n".join(facts) + "\n")
    print(best)


if __name__ == "__main__":
    main()
