"""diffusers' scheduler loops against flowdiff's routes, every configuration of the equivalence suite.

    python benchmarks/bench_scheduler_suite.py [--out benchmarks/results/scheduler_suite.md] [--draws 60] [--seed 0]

For each case of ``flowdiff.tools.scheduler_suite.CASES`` (the table ``tests/test_scheduler_equivalence.py``
asserts): diffusers' own loop and flowdiff's route (``sample_like`` / ``encode_like``) on the same fixed
random network and noise, in float32 and in float64, side by side in one run. Written: the route, the
largest difference relative to the largest value of diffusers' result, both sides' model evaluations,
and for refused configurations flowdiff's message. The float64 column is on the same ᾱ table for DDIM
and DDIMInverse; Euler, Heun, LMS, DPM-Solver and flow matching compute their step in float32 whatever
the sample's dtype, so their float64 column shows float32 rounding. A few seconds on one core.

Then the configuration space (``scheduler_suite.CONFIG_SPACE``): ``--draws`` random configurations per routed
class (``draw_case`` with ``random.Random(seed)``, as the property test draws them), each checked by
``check_drawn`` (and ``check_round_trip`` for DDIMInverse): how many diffusers' loop equals, how many flowdiff
refuses by name, how many both refuse (diffusers' own loop fails), and any that break the rule. About two
minutes on one core for 60 draws a class.
"""

from __future__ import annotations

import argparse
import collections
import random
import time
import warnings
from pathlib import Path

import torch

from flowdiff.tools.scheduler_suite import (
    CASES,
    CONFIG_SPACE,
    OUTCOMES,
    _config_text,
    check_drawn,
    check_round_trip,
    draw_case,
    route,
    run_case,
)


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


def measure_space(draws: int, seed: int) -> tuple[list[str], list[str]]:
    """Per class: the outcomes of ``draws`` random configurations; the rule's violations, one line each."""
    rng = random.Random(seed)
    rows = ["| scheduler | drawn | equal | refused by name | both refuse | rule broken |",
            "|---|---:|---:|---:|---:|---:|"]
    broken: list[str] = []
    total = collections.Counter()
    for cls in CONFIG_SPACE:
        counts = collections.Counter()
        for _ in range(draws):
            case, dtype = draw_case(cls, rng.choice)
            try:
                outcome = check_drawn(case, dtype)
                if cls == "DDIMInverseScheduler" and outcome == "equal":
                    check_round_trip(case, dtype)
            except AssertionError as e:
                outcome = "broken"
                broken.append(str(e).splitlines()[0][:700])
            counts[outcome] += 1
        total.update(counts)
        rows.append(f"| {cls.removesuffix('Scheduler')} | {draws} | "
                    + " | ".join(str(counts[k]) for k in (*OUTCOMES, "broken")) + " |")
    rows.append(f"| all | {draws * len(CONFIG_SPACE)} | " + " | ".join(str(total[k]) for k in (*OUTCOMES, "broken"))
                + " |")
    return rows, broken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scheduler_suite.md"))
    parser.add_argument("--draws", type=int, default=60, help="random configurations per class (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # diffusers' deprecation and numpy copy warnings, thousands of them
    start = time.perf_counter()
    rows, counts = measure()
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    space, broken = measure_space(args.draws, args.seed) if args.draws else ([], [])
    space_seconds = time.perf_counter() - start
    text = ["# diffusers' scheduler loops against flowdiff's routes", "",
            "`python benchmarks/bench_scheduler_suite.py` — every case of `flowdiff.tools.scheduler_suite.CASES`; "
            "relative difference = max |flowdiff − diffusers| / max |diffusers|, same network and noise; NFE: model "
            "evaluations (flowdiff leaves out diffusers' zero-length σ_min → σ_min steps).", "",
            f"{counts['equal']} equal (≤ 1e-5 in float32), {counts['refused']} refused by name, "
            f"{counts['different']} different; {len(CASES)} configurations in {seconds:.1f} s.", "", *rows, ""]
    if space:
        text += ["## The configuration space", "",
                 f"`--draws {args.draws} --seed {args.seed}`: random configurations of each routed class "
                 "(`scheduler_suite.draw_case`), each checked by `check_drawn` (DDIMInverse also by "
                 f"`check_round_trip`), in {space_seconds:.1f} s.", "", *space, "",
                 *(["Broken:", "", *(f"- {line}" for line in broken), ""] if broken else [])]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text), encoding="utf-8")
    print("\n".join(text[:6] + space + broken))


if __name__ == "__main__":
    main()
