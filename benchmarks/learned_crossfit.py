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

``--two-fold`` adds the 2-fold variant, ``learn_solver(folds=2)`` itself (through
``flowdiff.tools.learned._learn_folds``, which returns each fold's half-fit and refit beside the averaged solver, so
that one fit gives every column): the same fit with the halves swapped (fitted on the odd half, judged on the even
one, refitted on all), on the same teacher, and the kept folds' refits averaged (the grid's σ geometrically, the rest
arithmetically, the shifts then clipped to the averaged grid's intervals; a fold not kept drops out, none kept leaves
the tuned grid). The average of the two half-fits is ``learned._averaged`` of them, for comparison.

References come from (and go to) ``/tmp/flowdiff_bench_cache``, as ``bench_learned.py``'s.

Usage: cd benchmarks; PYTHONPATH=.. python learned_crossfit.py --models mixture --nfe 5,6,8,10
[--solvers unipc,ipndm] [--batch 1024] [--calibration 1024] [--max-evals 60] [--seed 0] [--out results/x.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings

import torch
from _kdiffusion import per_sample_error, rmse
from _learned_batches import model_batches, report_writer
from _pooled import ratio
from bench_learned import LEARN

import flowdiff
import solvers
from flowdiff.tools.learned import _averaged, _learn_folds, _reference


def whole(half_or_refit, part_error: float) -> float:
    """A fit's RMS over the whole calibration batch from its two halves (equal sizes) or from the refit's own."""
    return math.sqrt((half_or_refit.calibration_error ** 2 + part_error ** 2) / 2)


def cell(flow, key, calibration, noise, ref, budget, spec, learn, iterations, max_evals, tol,
         two_fold=False) -> dict:
    label, name, options = spec
    tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=budget, progress=False,
                          max_evals=max_evals, reference_tol=tol)
    started = time.perf_counter()
    folds = _learn_folds(flow, calibration, solver=name, solver_options=options, nfe=budget, sigmas=tuned.sigmas,
                         reference_tol=tol, learn=learn, iterations=iterations, folds=2 if two_fold else 1)
    seconds = time.perf_counter() - started
    (half, refit), *other_fold = folds.fits

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
    if two_fold:  # learn_solver(folds=2): the halves swapped (fitted on the odd half, judged on the even one)
        (other, other_refit), = other_fold
        result = folds.result
        row["other_kept"] = other.kept
        row["other_ps"] = evaluated(other)
        row["solves_2fold"] = result.solves  # both folds, their refits and the average's own solve
        row["fitting_nfe"] = (refit or half).fitting_nfe, result.fitting_nfe
        row["held_2fold"], row["base_held_2fold"] = result.validation_error, result.base_validation_error
        kept_halves = [f for f in (half, other) if f.kept]
        mean = _averaged(kept_halves, flow.schedule) if kept_halves else None
        if mean is not None:  # the half-fits averaged, for comparison, on its whole-batch error
            cal_ref = _reference(flow, calibration, None, tol)[0]  # the cached calibration reference
            with torch.no_grad():
                out = flowdiff.generate(flow, calibration, solver=mean.as_solver(), grid=mean.sigmas).x
            row["avg_half_cal"] = rmse(out, cal_ref)
        row["avg_half_ps"] = evaluated(mean) if mean is not None else per_sample_error(tuned_x, ref)
        row["avg_half_cal"] = row.get("avg_half_cal", tuned.calibration_error)
        row["avg_refit_ps"] = evaluated(result) if result.kept else per_sample_error(tuned_x, ref)
        # the pick's figure: the average's own error on the whole calibration batch (learn_solver's
        # calibration_error), the tuned grid's where no fold was kept
        row["avg_refit_cal"] = result.calibration_error if result.kept else tuned.calibration_error
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

    write = report_writer(args.out, lines)

    for key in args.models.split(","):
        flow, tol, specs, evals, noise, calibration, ref = model_batches(key, args, cal_seed)
        lines += [f"### {key}", "", "| NFE | solver | tuned grid | held-out half (half-fit vs base) | kept | "
                  "half-fit | refit on all | refit / half-fit [95 %] | candidate solves (half-fit → with refit) |",
                  "|---:|---|---:|---|---|---:|---:|---:|---:|"]
        picks = ["", f"Picks on the calibration batch ({key}):", "",
                 "| NFE | pick with half-fits | evaluation RMSE | pick with refits | evaluation RMSE | change |",
                 "|---:|---|---:|---|---:|---:|"]
        folds = ["", f"2-fold ({key}): evaluation RMSE of the even-half fit (today's half-fit) and its refit, the "
                 "odd-half fit (judged on the even half), the average of the two half-fits and of the two refits "
                 "(kept folds only; `learn_solver(folds=2)`'s result), that against the refit with a 95 % paired "
                 "bootstrap over the evaluation samples, folds=2's held-out figure (both folds' held-out halves "
                 "pooled) against the base method's, and the cost.", "",
                 "| NFE | solver | even half | its refit (folds=1) | odd half | average of the half-fits | "
                 "average of the refits (folds=2) | folds=2 / folds=1 [95 %] | folds=2 held out vs base | "
                 "candidate solves: half → refit → folds=2 | fitting NFE: folds=1 → folds=2 |",
                 "|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
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
                    gain = ratio(row["avg_refit_ps"], row["refit_ps"].unsqueeze(0))
                    folds.append(f"| {budget} | `{row['solver']}` | {row['half']:.3e}"
                                 f"{'' if row['kept'] else ' (not kept)'} | {row['refit']:.3e} | "
                                 f"{row['other']:.3e}{'' if row['other_kept'] else ' (not kept)'} | "
                                 f"{row['avg_half']:.3e} | {row['avg_refit']:.3e} | {gain.ratio:.3f} [{gain.low:.3f}, "
                                 f"{gain.high:.3f}] | {row['held_2fold']:.3e} vs {row['base_held_2fold']:.3e} | "
                                 f"{row['half_solves']} → {row['solves']} → {row['solves_2fold']} | "
                                 f"{row['fitting_nfe'][0]} → {row['fitting_nfe'][1]} |")
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
