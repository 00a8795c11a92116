"""Which of flowdiff's equal-size sweep settings wins where: fewest NFE per column of the sweep, read from
``bench_adaptive.py`` reports.

A column of the equal-size sweep (``bench_adaptive.equal_sweep``) is one (atol/rtol, sigma_end, first_step) over the
rtols; for each column, each report's model and seed, and each target, the fewest NFE of a run in that column whose
RMSE met the target ("—": none did). A setting that would make a better default has to win in every column of the
table it is compared with (the default column is atol = 1·rtol, σ_end = 0.1·σ_min, first step HNW).

Usage: cd benchmarks; python adaptive_sweep_columns.py results/adaptive_b2_mixture.md [more reports ...]
"""

from __future__ import annotations

import argparse
import re

ROW = "| flowdiff | unipc(order=3) equal sweep |"


def columns(paths: list[str]) -> tuple[list[tuple], dict[str, dict[tuple, int]]]:
    """(the (model, seed, target) keys in order, {column: {key: fewest NFE}}) from the reports' precision–work rows;
    the targets are each report's own (its first line)."""
    best: dict[str, dict[tuple, int]] = {}
    keys: list[tuple] = []
    for path in paths:
        model = seed = None
        with open(path) as fh:
            first = fh.readline()
            said = re.match(r"## Adaptive solves: fewest evaluations to RMSE ≤ (.*)$", first.strip())
            if said is None:
                raise ValueError(f"{path}: not a bench_adaptive.py report (its first line is {first.strip()!r})")
            targets = [float(t) for t in said.group(1).split(" and ")]
            for line in fh:
                head = re.match(r"### (.*), seed (\d+)$", line.strip())
                if head:
                    title, seed = head.group(1), int(head.group(2))
                    model = ("patches" if "patches" in title else "digits (trained)" if "trained" in title
                             else "mixture")
                    continue
                if not line.startswith(ROW):
                    continue
                cells = [c.strip() for c in line.split("|")]
                setting, nfe, error = cells[3], int(cells[4]), float(cells[6])
                column = re.sub(r"^rtol=[^,]*, ", "", setting)
                best.setdefault(column, {})
                for t in targets:
                    key = (model, seed, t)
                    if key not in keys:
                        keys.append(key)
                    if error <= t:
                        best[column][key] = min(best[column].get(key, nfe), nfe)
    return keys, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", nargs="+")
    args = parser.parse_args()
    keys, best = columns(args.reports)
    print("| column | " + " | ".join(f"{m} s{s} {t:g}" for m, s, t in keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for column, cells in best.items():
        print(f"| {column} | " + " | ".join(str(cells.get(k, "—")) for k in keys) + " |")


if __name__ == "__main__":
    main()
