"""diffusers' scheduler loops against flowdiff's routes, every configuration of the equivalence suite.

    python benchmarks/bench_scheduler_suite.py [--out benchmarks/results/scheduler_suite.md]

For each case of ``flowdiff.tools.scheduler_suite.CASES`` (the table ``tests/test_scheduler_equivalence.py``
asserts): diffusers' own loop and flowdiff's route (``sample_like`` / ``encode_like``) on the same fixed
random network and noise, in float32 and in float64, side by side in one run. Written: the route, the
largest difference relative to the largest value of diffusers' result, both sides' model evaluations,
and for refused configurations flowdiff's message. The float64 column is on the same ᾱ table for DDIM
and DDIMInverse; Euler, Heun, LMS, DPM-Solver and flow matching compute their step in float32 whatever
the sample's dtype, so their float64 column shows float32 rounding. A few seconds on one core.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from flowdiff.tools.scheduler_suite import CASES, _config_text, route, run_case


def measure() -> tuple[list[str], dict[str, int]]:
    rows = ["| scheduler | config | steps | flowdiff | rel. diff float32 | rel. diff float64 "
            "| NFE flowdiff / diffusers |",
            "|---|---|---:|---|---:|---:|---|"]
    counts = {"equal": 0, "refused": 0, "different": 0}
    for case in CASES:
        cells = []
        nfe_cell = "—"
        outcome = None
        for dtype in (torch.float32, torch.float64):
            try:
                got, ref, nfe, calls = run_case(case, dtype)
            except ValueError:
                cells.append("refused")
                outcome = "refused"
                continue
            rel = float((got - ref).abs().max() / ref.abs().max())
            cells.append(f"{rel:.1e}")
            nfe_cell = f"{nfe} / {calls}"
            if dtype == torch.float32:
                outcome = "equal" if rel <= 1e-5 else "different"
        counts[outcome] += 1
        rows.append(f"| {case.cls.removesuffix('Scheduler')} | {_config_text(case)} | {case.steps} | {route(case)} | "
                    f"{cells[0]} | {cells[1]} | {nfe_cell} |")
    return rows, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scheduler_suite.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows, counts = measure()
    seconds = time.perf_counter() - start
    text = ["# diffusers' scheduler loops against flowdiff's routes", "",
            "`python benchmarks/bench_scheduler_suite.py` — every case of `flowdiff.tools.scheduler_suite.CASES`; "
            "relative difference = max |flowdiff − diffusers| / max |diffusers|, same network and noise; NFE: model "
            "evaluations (flowdiff leaves out diffusers' zero-length σ_min → σ_min steps).", "",
            f"{counts['equal']} equal (≤ 1e-5 in float32), {counts['refused']} refused by name, "
            f"{counts['different']} different; {len(CASES)} configurations in {seconds:.1f} s.", "", *rows, ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text[:6]))


if __name__ == "__main__":
    main()
