"""Cross-fitting in ``learn_solver``: the half-fit (fitted on the even half of the calibration noise, the odd half
choosing the variant and whether anything is kept) against the same variant refitted on all the calibration noise
from there, both measured on the evaluation noise, which neither saw.

For each model (``--models``: the digit mixture and/or the photo patches of ``bench_learned.py``), budget and solver:
``flowdiff.tune``'s grid on the calibration noise (seed + 1; ``--max-evals`` candidate solves, as
``bench_learned.py``), then one ``learn_solver`` fit (``flowdiff.tools.learned._learn_both``: one fit gives both the
half-fit and its refit) with ``--learn`` (the default's kinds) and ``--iterations`` from that grid. Per fit: the
held-out half's error (the half-fit's: the only held-out figure), the evaluation RMSE of the half-fit and of the
refit, the refit's change with a 95 % paired bootstrap interval over the evaluation samples, and the candidate
solves. Per budget: the pick across solvers (and their tuned grids) on the calibration batch, as ``bench_learned.py``
makes it: with the half-fit, each candidate's RMS over the whole batch (fitted and held-out halves); with the refit,
its RMS over the whole batch, on which it was fitted.

``--two-fold`` adds the 2-fold variant: the same fit with the halves swapped (fitted on the odd half, judged on
the even one), then the two folds' parameters averaged (shifts, scales and directions arithmetically, the grid's σ
geometrically, the shifts then clipped to the averaged grid's intervals; a fold that was not kept drops out, none
kept leaves the tuned grid), both for the two half-fits and for the two refits.

References come from (and go to) ``/tmp/flowdiff_bench_cache``, as ``bench_learned.py``'s.

Usage: cd benchmarks; PYTHONPATH=.. python learned_crossfit.py --models mixture --nfe 5,6,8,10
[--solvers unipc,ipndm] [--batch 1024] [--calibration 1024] [--max-evals 60] [--seed 0] [--out results/x.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import time
import warnings
from pathlib import Path

import torch
from _kdiffusion import mixture_flow, noise_shape, patch_flow, per_sample_error, rmse
from _pooled import ratio
from bench_frontier import evaluation_reference
from bench_learned import LEARN, calibration_reference, solver_specs

import flowdiff
import solvers
from flowdiff.tools.learned import _learn_both, _reference, shift_intervals

MODELS = {"mixture": (mixture_flow, 1e-8), "patches": (patch_flow, 1e-8)}


def whole(half_or_refit, part_error: float) -> float:
    """A fit's RMS over the whole calibration batch from its two halves (equal sizes) or from the refit's own."""
    return math.sqrt((half_or_refit.calibration_error ** 2 + part_error ** 2) / 2)


def averaged(flow, fits):
    """The kept ``fits`` (same solver, budget and starting grid) averaged: shifts, scales and directions
    arithmetically, each σ of the grid geometrically (σ = 0 stays), the shifts clipped to the averaged grid's
    intervals; ``None`` when none was kept."""
    kept = [f for f in fits if f.kept]
    if not kept:
        return None
    first = kept[0]
    sigmas = first.sigmas.copy()
    for i, s in enumerate(first.sigmas):
        if s > 0:
            sigmas[i] = math.exp(sum(math.log(f.sigmas[i]) for f in kept) / len(kept))
    mean = {kind: tuple(sum(vals) / len(kept) for vals in zip(*(getattr(f, kind) for f in kept)))
            for kind in ("shifts", "scales", "directions")}
    if mean["shifts"]:
        bounds = shift_intervals(first.base(), sigmas, flow.schedule, first.options["shift_bound"])
        mean["shifts"] = tuple(min(max(d, lo), hi) for d, (lo, hi) in zip(mean["shifts"], bounds))
    return dataclasses.replace(first, sigmas=sigmas, **mean)


def cell(flow, key, calibration, noise, ref, budget, spec, learn, iterations, max_evals, tol,
         two_fold=False) -> dict:
    label, name, options = spec
    tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=budget, progress=False,
                          max_evals=max_evals, reference_tol=tol)
    started = time.perf_counter()
    half, refit = _learn_both(flow, calibration, solver=name, solver_options=options, nfe=budget,
                              sigmas=tuned.sigmas, reference_tol=tol, learn=learn, iterations=iterations)
    seconds = time.perf_counter() - started

    def evaluated(fit):
        with torch.no_grad():
            out = flowdiff.generate(flow, noise, solver=fit.as_solver(), grid=fit.sigmas)
        assert out.stats.nfe <= budget
        return per_sample_error(out.x, ref)

    with torch.no_grad():
        tuned_x = flowdiff.generate(flow, noise, solver=solvers.get(name, **options), grid=tuned.sigmas).x
    row = dict(solver=label, tuned=rmse(tuned_x, ref), tuned_cal=tuned.calibration_error, kept=half.kept,
               variant=("scales and directions" if any(half.directions) else "scales" if any(half.scales)
                        else "neither") if half.kept else "not kept",
               held=half.validation_error, base_held=half.base_validation_error, half_solves=half.solves,
               solves=(refit or half).solves, seconds=seconds, half_fit=half.calibration_error)
    row["half_ps"] = evaluated(half)
    row["half"] = float(row["half_ps"].pow(2).mean().sqrt())
    # the pick's calibration figure: the tuned grid's when the fit is not kept, as bench_learned.py
    row["half_cal"] = whole(half, half.validation_error) if half.kept else tuned.calibration_error
    if refit is None:
        row.update(refit_ps=row["half_ps"], refit=row["half"], refit_cal=row["half_cal"], refit_fit=math.nan)
    else:
        row["refit_ps"] = evaluated(refit)
        row["refit"] = float(row["refit_ps"].pow(2).mean().sqrt())
        row["refit_cal"] = row["refit_fit"] = refit.calibration_error
        # the refit's error on all the calibration noise is no worse than the half-fit's there (its start)
        assert refit.calibration_error <= whole(half, half.validation_error) * (1 + 1e-9)
    if two_fold:  # the halves swapped: fitted on the odd half, judged on the even one
        swapped = torch.empty_like(calibration)
        swapped[0::2], swapped[1::2] = calibration[1::2], calibration[0::2]
        other, other_refit = _learn_both(flow, swapped, solver=name, solver_options=options, nfe=budget,
                                         sigmas=tuned.sigmas, reference_tol=tol, learn=learn, iterations=iterations)
        row["other_kept"] = other.kept
        row["other_ps"] = evaluated(other)
        row["solves_2fold"] = row["solves"] + (other_refit or other).solves
        cal_ref = _reference(flow, calibration, None, tol)[0]  # the cached calibration reference
        for label, fits in (("avg_half", (half, other)), ("avg_refit", (refit or half, other_refit or other))):
            mean = averaged(flow, fits)
            row[label + "_ps"] = evaluated(mean) if mean is not None else per_sample_error(tuned_x, ref)
            if mean is not None:  # its error on the whole calibration batch, for the pick
                with torch.no_grad():
                    out = flowdiff.generate(flow, calibration, solver=mean.as_solver(), grid=mean.sigmas).x
                row[label + "_cal"] = rmse(out, cal_ref)
            else:
                row[label + "_cal"] = tuned.calibration_error
        for label in ("other", "avg_half", "avg_refit"):
            row[label] = float(row[label + "_ps"].pow(2).mean().sqrt())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture,patches")
    parser.add_argument("--nfe", default="5,6,8,10", help="budgets (the same for every model named)")
    parser.add_argument("--solvers", default="unipc,ipndm")
    parser.add_argument("--patch-solvers", default="unipc,ipndm(order=3)")
    parser.add_argument("--learn", default="shifts+grid+start+scales+directions")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--max-evals", type=int, default=60)
    parser.add_argument("--patch-max-evals", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0, help="evaluation noise seed; calibration seed + 1")
    parser.add_argument("--cal-seed", type=int, default=None, help="the calibration seed (default: seed + 1)")
    parser.add_argument("--two-fold", action="store_true", help="add the 2-fold variant (twice the fits)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    learn = LEARN[args.learn]
    cal_seed = args.seed + 1 if args.cal_seed is None else args.cal_seed
    lines = ["## Cross-fitting: the half-fit against its refit on all the calibration noise "
             "(`learned_crossfit.py`)", "",
             f"`python benchmarks/learned_crossfit.py --models {args.models} --nfe {args.nfe} --solvers "
             f"'{args.solvers}' --patch-solvers '{args.patch_solvers}' --learn {args.learn} --iterations "
             f"{args.iterations} --batch {args.batch} --calibration {args.calibration} --max-evals {args.max_evals} "
             f"--patch-max-evals {args.patch_max_evals} --seed {args.seed} --cal-seed {cal_seed}"
             f"{' --two-fold' if args.two_fold else ''}` — "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, float64.", ""]
    started = time.perf_counter()

    def write() -> None:
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")

    for key in args.models.split(","):
        make, tol = MODELS[key]
        flow = make()
        specs = solver_specs(args.patch_solvers if key == "patches" else args.solvers)
        evals = args.patch_max_evals if key == "patches" else args.max_evals
        noise = torch.randn(args.batch, *noise_shape(key), dtype=torch.float64,
                            generator=torch.Generator().manual_seed(args.seed))
        calibration = torch.randn(args.calibration, *noise_shape(key), dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(cal_seed))
        ref = evaluation_reference(flow, noise, key, tol).x
        calibration_reference(flow, calibration, key, tol)
        lines += [f"### {key}", "", "| NFE | solver | tuned grid | held-out half (half-fit vs base) | kept | "
                  "half-fit | refit on all | refit / half-fit [95 %] | candidate solves (half-fit → with refit) |",
                  "|---:|---|---:|---|---|---:|---:|---:|---:|"]
        picks = ["", f"Picks on the calibration batch ({key}):", "",
                 "| NFE | pick with half-fits | evaluation RMSE | pick with refits | evaluation RMSE | change |",
                 "|---:|---|---:|---|---:|---:|"]
        folds = ["", f"2-fold ({key}): evaluation RMSE of the even-half fit (today's half-fit) and its refit, the "
                 "odd-half fit (judged on the even half), the average of the two half-fits and of the two refits "
                 "(kept folds only).", "",
                 "| NFE | solver | even half | its refit (shipped) | odd half | average of the half-fits | "
                 "average of the refits | candidate solves: half → refit → both folds with refits |",
                 "|---:|---|---:|---:|---:|---:|---:|---:|"]
        folds_picks = ["", f"Picks on the calibration batch ({key}), refits against the 2-fold average of the refits:",
                       "", "| NFE | pick with refits | evaluation RMSE | pick with 2-fold averages | evaluation RMSE | "
                       "change |", "|---:|---|---:|---|---:|---:|"]
        for budget in (int(b) for b in args.nfe.split(",")):
            rows = []
            for spec in specs:
                row = cell(flow, key, calibration, noise, ref, budget, spec, learn, args.iterations, evals, tol,
                           args.two_fold)
                rows.append(row)
                change = ratio(row["refit_ps"], row["half_ps"].unsqueeze(0))
                lines.append(f"| {budget} | `{row['solver']}` | {row['tuned']:.3e} | {row['held']:.3e} vs "
                             f"{row['base_held']:.3e} | {row['variant']} | {row['half']:.3e} | {row['refit']:.3e} | "
                             f"{change.ratio:.3f} [{change.low:.3f}, {change.high:.3f}] | {row['half_solves']} → "
                             f"{row['solves']} |")
                print(lines[-1], f"[{row['seconds']:.0f} s]", flush=True)
                if args.two_fold:
                    folds.append(f"| {budget} | `{row['solver']}` | {row['half']:.3e} | {row['refit']:.3e} | "
                                 f"{row['other']:.3e}{'' if row['other_kept'] else ' (not kept)'} | "
                                 f"{row['avg_half']:.3e} | {row['avg_refit']:.3e} | {row['half_solves']} → "
                                 f"{row['solves']} → {row['solves_2fold']} |")
                    print(folds[-1], flush=True)
                write()
            # a tuned grid alone is a candidate too (bench_learned.py's rows), on its calibration error
            cands = [(r["tuned_cal"], r["tuned"], f"`{r['solver']}` tuned grid") for r in rows]
            half_pick = min(cands + [(r["half_cal"], r["half"], f"`{r['solver']}` fit") for r in rows if r["kept"]])
            refit_pick = min(cands + [(r["refit_cal"], r["refit"], f"`{r['solver']}` fit") for r in rows
                                      if r["kept"]])
            picks.append(f"| {budget} | {half_pick[2]} | {half_pick[1]:.3e} | {refit_pick[2]} | {refit_pick[1]:.3e} | "
                         f"{100 * (refit_pick[1] / half_pick[1] - 1):+.1f} % |")
            if args.two_fold:  # the average of the two folds' refits, on its whole-batch error
                fold_pick = min(cands + [(r["avg_refit_cal"], r["avg_refit"], f"`{r['solver']}` 2-fold average")
                                         for r in rows if r["kept"] or r["other_kept"]])
                folds_picks.append(f"| {budget} | {refit_pick[2]} | {refit_pick[1]:.3e} | {fold_pick[2]} | "
                                   f"{fold_pick[1]:.3e} | {100 * (fold_pick[1] / refit_pick[1] - 1):+.1f} % |")
        lines += picks + (folds + folds_picks if args.two_fold else []) + [""]
        write()
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    write()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
