"""Held-out transfer of the adaptive comparison: is a miss on new noise the chosen setting's fault, and does choosing
with a margin transfer better? Every split of the seeds into development and held-out halves, each side alike.

``adaptive_heldout.py`` chooses each side's setting on seeds 1–3 (meets the target on each, fewest NFE on the worst)
and runs it on seeds 4–6: one split, three held-out seeds, so a single lone sample decides a cell. Here every setting
of each side's ``bench_adaptive.py --quick`` sweep (flowdiff's one knob, flowdiff's equal-size sweep, k-diffusion's 84
configurations) is run once on each of the seeds, and the choice is made on **every** split of them into a
development half and a held-out half (20 splits of 6 seeds), with the rule of ``adaptive_heldout.py`` generalised by
a **margin** m: a setting qualifies when its RMSE is ≤ target/m on every development seed (m = 1 is
``adaptive_heldout.py``'s rule). The same rule and margin are applied to each side. Reported per (model, target, side,
margin), over the splits' held-out (split, seed) pairs: the share that meets the target, the mean NFE, and the ratio of
flowdiff's mean NFE to k-diffusion's at the same margin. Also: the one split first half → second half
(``adaptive_heldout.py``'s, which it reproduces); each side's fewest NFE seed by seed and the one setting that meets the
target on every seed (a calibration on all of them); and, for the one knob, each seed's error against tol (how far the
tolerance → error ratio moves from seed to seed).

``--startup-order`` runs flowdiff with ``StepController(startup_order=True)``, ``--variant`` with one of
``adaptive_lone_sample_variants.py``'s run-time patches (those that set no ``Adaptive`` field). The rows of each
(model, seed, controller) are kept as JSON under ``--cache`` (default /tmp/flowdiff_bench_cache), so a second run with
other margins only reads them.

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_calibration.py [--models patches,mixture] [--seeds 1,2,3,4,5,6]
       [--margins 1,1.5,2,3] [--targets 1e-3,1e-4] [--startup-order] [--variant V] [--cache DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import time

import torch
from _kdiffusion import load_kdiffusion_sampling, mixture_flow, patch_flow, write_report
from adaptive_heldout import SIDES, noise_ref, side_of
from adaptive_lone_sample_variants import patched
from adaptive_startup_order import startup_order_by_default
from bench_adaptive import (
    QUICK_FLOWDIFF,
    QUICK_KD_ATOLS,
    QUICK_KD_RTOLS,
    QUICK_TOLS,
    TARGETS,
    equal_sweep,
    one_knob_sweep,
    run_flowdiff,
    run_kdiffusion,
)


def all_rows(K, flow, key: str, seed: int, cache: str | None, startup_order: bool = False,
             variant: str = "base") -> list[dict]:
    """Every setting of every side on ``seed``'s noise, without early stops (cached as JSON when ``cache`` is set);
    with ``startup_order``, flowdiff's multistep controller has ``StepController(startup_order=True)``, and
    ``variant`` is one of ``adaptive_lone_sample_variants.py``'s run-time patches (those that set no ``Adaptive``
    field) applied to flowdiff's runs (k-diffusion's rows are the same either way)."""
    tag = ("_startup_order" if startup_order else "") + ("" if variant == "base" else f"_{variant}")
    path = None if cache is None else os.path.join(cache, f"k4_adaptive_rows_{key}_{seed}{tag}.json")
    if path is not None and os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    noise, ref = noise_ref(flow, key, seed)
    with startup_order_by_default() if startup_order else contextlib.nullcontext(), patched(variant) as options:
        if options:
            raise ValueError(f"variant {variant!r} sets Adaptive fields {sorted(options)}, which the sweeps set "
                             "themselves; accepted: the variants that patch the library only")
        rows = (run_flowdiff(flow, noise, ref, QUICK_FLOWDIFF, one_knob_sweep(QUICK_TOLS), targets=(0.0,))
                + run_flowdiff(flow, noise, ref, QUICK_FLOWDIFF, equal_sweep(flow.schedule.sigma_min), targets=(0.0,),
                               label_suffix=" equal sweep"))
    rows += run_kdiffusion(K, flow, noise, ref, QUICK_KD_RTOLS, QUICK_KD_ATOLS, targets=(0.0,))
    rows = [{k: r[k] for k in ("lib", "method", "setting", "nfe", "rmse", "rejected")} for r in rows]
    if path is not None:
        os.makedirs(cache, exist_ok=True)
        with open(path, "w") as fh:
            json.dump(rows, fh)
    return rows


def table_of(rows_by_seed: dict[int, list[dict]], side: str) -> dict[tuple[str, str], dict[int, dict]]:
    """{(method, setting): {seed: row}} for one side."""
    table: dict[tuple[str, str], dict[int, dict]] = {}
    for seed, rows in rows_by_seed.items():
        for r in rows:
            if side_of(r) == side:
                table.setdefault((r["method"], r["setting"]), {})[seed] = r
    return table


def choose(table: dict[tuple[str, str], dict[int, dict]], dev: list[int], bound: float) -> tuple[str, str] | None:
    """The setting with RMSE ≤ ``bound`` on every seed of ``dev`` and the fewest NFE on the worst of them (then in
    all; then the setting's name, so that ties are broken the same way every run), or None."""
    fits = [(max(by[s]["nfe"] for s in dev), sum(by[s]["nfe"] for s in dev), key) for key, by in table.items()
            if all(s in by and by[s]["rmse"] <= bound for s in dev)]
    return min(fits)[2] if fits else None


def transfer(table, seeds: list[int], target: float, margin: float) -> dict:
    """Over every split of ``seeds`` into a development half and a held-out half: each split's chosen setting on its
    held-out seeds. Returns the held-out (NFE, RMSE) pairs, the splits with no qualifying setting and the splits."""
    half = len(seeds) // 2
    pairs, unmet, splits = [], 0, 0
    for dev in itertools.combinations(seeds, half):
        splits += 1
        pick = choose(table, list(dev), target / margin)
        if pick is None:
            unmet += 1
            continue
        pairs += [(table[pick][s]["nfe"], table[pick][s]["rmse"]) for s in seeds if s not in dev]
    return dict(pairs=pairs, unmet=unmet, splits=splits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="patches,mixture")
    parser.add_argument("--seeds", default="1,2,3,4,5,6")
    parser.add_argument("--margins", default="1,1.5,2,3")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS))
    parser.add_argument("--startup-order", action="store_true",
                        help="flowdiff's multistep controller with StepController(startup_order=True) (the opt-in)")
    parser.add_argument("--variant", default="base",
                        help="one of adaptive_lone_sample_variants.py's run-time patches for flowdiff's runs")
    parser.add_argument("--cache", default="/tmp/flowdiff_bench_cache")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    margins = [float(m) for m in args.margins.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        parser.error(f"--seeds: at least two distinct seeds, got {args.seeds!r}")
    if not all(m >= 1 for m in margins):
        parser.error(f"--margins: each margin must be ≥ 1 (a setting must meet target/margin), got {args.margins!r}")
    torch.set_num_threads(1)
    started = time.perf_counter()
    K = load_kdiffusion_sampling()
    n_splits = len(list(itertools.combinations(seeds, len(seeds) // 2)))
    lines = [f"`cd benchmarks; PYTHONPATH=.. python adaptive_calibration.py --models {args.models} "
             f"--seeds {args.seeds} --margins {args.margins} --targets {args.targets}"
             f"{' --startup-order' if args.startup_order else ''}"
             f"{'' if args.variant == 'base' else f' --variant {args.variant}'}` — {platform.machine()}, "
             f"torch {torch.__version__}, "
             f"1 thread, float64, batch 16. Every setting of each side's `bench_adaptive.py --quick` sweep run once on "
             f"each seed; on each of the {n_splits} splits into {len(seeds) // 2} development and "
             f"{len(seeds) - len(seeds) // 2} held-out seeds each side chooses the setting with RMSE ≤ target/margin "
             "on every development seed and the fewest NFE on the worst; its held-out runs are pooled over the "
             "splits.", "",
             "| model | target | margin | side | held-out runs meeting the target | mean held-out NFE | "
             "splits with no qualifying setting | mean NFE / k-diffusion's |",
             "|---|---:|---:|---|---:|---:|---:|---:|"]
    alone = ["", "Each side on each seed alone (its fewest NFE there, chosen on that seed: the optimistic figure), and "
             "the one setting that meets the target on every seed with the fewest NFE on the worst (a calibration on "
             "all of them): its NFE on each seed.", "",
             "| model | target | side | fewest NFE, seed by seed | one setting for every seed | "
             "its NFE, seed by seed |",
             "|---|---:|---|---|---|---|"]
    first = ["", f"The one split {seeds[:len(seeds) // 2]} → {seeds[len(seeds) // 2:]} (`adaptive_heldout.py`'s), "
             "margin 1: the setting chosen and its NFE on each held-out seed (✗: the target missed there).", "",
             "| model | target | side | setting chosen | held-out NFE | ratio to k-diffusion |",
             "|---|---:|---|---|---|---|"]
    spread = ["", "One knob (rtol = atol = tol): each seed's RMSE / tol.", "",
              "| model | tol | " + " | ".join(f"seed {s}" for s in seeds) + " | max / min |",
              "|---|---:|" + "---:|" * len(seeds) + "---:|"]
    for key in args.models.split(","):
        flow = {"mixture": mixture_flow, "patches": patch_flow}[key]()
        rows = {s: all_rows(K, flow, key, s, args.cache, args.startup_order, args.variant) for s in seeds}
        tables = {side: table_of(rows, side) for side in SIDES}
        for target in targets:
            for margin in margins:
                got = {side: transfer(tables[side], seeds, target, margin) for side in SIDES}
                means = {side: (sum(n for n, _ in g["pairs"]) / len(g["pairs"]) if g["pairs"] else None)
                         for side, g in got.items()}
                for side, g in got.items():
                    met = sum(e <= target for _, e in g["pairs"])
                    ratio = ("—" if side == "k-diffusion" or means[side] is None or means["k-diffusion"] is None
                             else f"{means[side] / means['k-diffusion']:.2f}")
                    mean = "—" if means[side] is None else f"{means[side]:.1f}"
                    lines.append(f"| {key} | {target:g} | {margin:g} | {side} | {met} / {len(g['pairs'])} | {mean} | "
                                 f"{g['unmet']} / {g['splits']} | {ratio} |")
                    print(lines[-1], flush=True)
            dev, held = seeds[:len(seeds) // 2], seeds[len(seeds) // 2:]
            picks = {side: choose(tables[side], dev, target) for side in SIDES}
            for side, pick in picks.items():
                if pick is None:
                    first.append(f"| {key} | {target:g} | {side} | none qualifies | | |")
                    continue
                got = [tables[side][pick][s] for s in held]
                kd = picks["k-diffusion"]
                ratio = ("—" if side == "k-diffusion" or kd is None else
                         " / ".join(f"{g['nfe'] / tables['k-diffusion'][kd][s]['nfe']:.2f}" for g, s in zip(got, held)))
                first.append(f"| {key} | {target:g} | {side} | {pick[1]} | "
                             + " / ".join(f"{g['nfe']}" + ("" if g["rmse"] <= target else " ✗") for g in got)
                             + f" | {ratio} |")
            for side in SIDES:
                best = [min([r["nfe"] for r in rows[s] if side_of(r) == side and r["rmse"] <= target] or [None])
                        for s in seeds]
                pick = choose(tables[side], seeds, target)
                on_all = "—" if pick is None else " / ".join(str(tables[side][pick][s]["nfe"]) for s in seeds)
                alone.append(f"| {key} | {target:g} | {side} | {' / '.join(map(str, best))} | "
                             f"{'none' if pick is None else pick[1]} | {on_all} |")
        for method, setting in sorted(tables["flowdiff one knob"], key=lambda k: -float(k[1].split("=")[1])):
            by = tables["flowdiff one knob"][(method, setting)]
            tol = float(setting.split("=")[1])
            ratios = [by[s]["rmse"] / tol for s in seeds]
            spread.append(f"| {key} | {tol:g} | " + " | ".join(f"{r:.2f}" for r in ratios)
                          + f" | {max(ratios) / min(ratios):.1f} |")
    lines += first + alone + spread + ["", f"({time.perf_counter() - started:.0f} s)"]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
