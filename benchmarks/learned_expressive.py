"""A more expressive learned kind for ``learn_solver`` (issue 26 item 1): the default against the default with the
previous steps' directions (``learn="trajectory"``, PAS's trajectory basis) added, same calibration noise.

For each model (``--models``: the digit mixture and/or the photo patches of ``bench_learned.py``), budget and solver:
``flowdiff.tune``'s grid on the calibration noise (seed + 1; ``--max-evals`` candidate solves, as
``bench_learned.py``), then two ``learn_solver`` fits from that grid (``flowdiff.tools.learned._learn_both``, which
returns the half-fit and its refit): the default kinds, and the default kinds with ``"trajectory"``. Per fit: the
held-out half's error (the half-fit's, which chose the variant), the variant kept, the evaluation RMSE of the
returned solver (the refit where one was kept) and the fitting cost (``fitting_nfe`` less the teacher's, and the
candidate solves), and, from the half-fit's ``options["variants"]``, the trajectory variant's RMS on the fitted and on
the held-out half against the variant before it (the scales and directions fitted jointly), whichever was kept.
Per budget: the pick on the calibration batch as ``bench_learned.py`` makes it (each candidate's
RMS over the whole calibration batch: a tuned grid's from ``tune``, a kept fit's refit's own), over the tuned grids
and the default fits (today) and over those and the trajectory fits (with the new kind a candidate too), each
against the best peer (55 diffusers configurations and k-diffusion, chosen on the evaluation noise itself, again
in every bootstrap draw: ``_pooled.ratio``).

``--depth`` and ``--bound`` set ``flowdiff.tools.learned.TRAJECTORY_DEPTH`` / ``TRAJECTORY_BOUND`` for this run
(how many previous directions a step reaches back, the largest |c|), to compare settings before one is shipped.

References come from (and go to) ``/tmp/flowdiff_bench_cache``, as ``bench_learned.py``'s.

Usage: cd benchmarks; PYTHONPATH=.. python learned_expressive.py --models mixture --nfe 6,8,10
[--solvers unipc,ipndm] [--patch-solvers 'unipc,ipndm(order=3)'] [--batch 1024] [--calibration 1024]
[--depth 1] [--bound 1.0] [--no-peers] [--out results/x.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings

import torch
from _kdiffusion import load_kdiffusion_sampling, per_sample_error, rmse
from _learned_batches import model_batches, report_writer
from _pooled import ratio
from bench_frontier import run_diffusers
from bench_learned import LEARN
from bench_lownfe import run_kdiffusion

import flowdiff
import solvers
from flowdiff.tools import learned as _learned

DEFAULT = LEARN["shifts+grid+start+scales+directions"]
WITH_TRAJECTORY = (*DEFAULT, "trajectory")


def variant(fit) -> str:
    """Which of the learned kinds on top of shifts, grid and start the held-out half kept."""
    if not fit.kept:
        return "not kept"
    kept = [name for name, values in (("scales", fit.scales), ("directions", fit.directions),
                                      ("trajectory", [c for cs in fit.trajectory for c in cs])) if any(values)]
    return " + ".join(kept) if kept else "neither"


def moved(variants: dict, which: int) -> str:
    """The trajectory variant's RMS on the fitted (``which`` 0) or held-out (1) half against the directions
    variant's, from ``options["variants"]``."""
    old, new = variants["directions"][which], variants["trajectory"][which]
    return f"{old:.3e} → {new:.3e} ({100 * (new / old - 1):+.1f} %)"


def fitted(flow, calibration, noise, ref, budget, name, options, sigmas, learn, iterations, tol) -> dict:
    started = time.perf_counter()
    half, refit = _learned._learn_both(flow, calibration, solver=name, solver_options=options, nfe=budget,
                                       sigmas=sigmas, reference_tol=tol, learn=learn, iterations=iterations)
    seconds = time.perf_counter() - started
    fit = refit or half
    with torch.no_grad():
        out = flowdiff.generate(flow, noise, solver=fit.as_solver(), grid=fit.sigmas)
    assert out.stats.nfe <= budget
    # on the calibration batch: a kept fit's refit has its own whole-batch error; one not kept is the tuned grid
    cal = fit.calibration_error if refit is not None else math.nan
    return dict(kept=half.kept, variant=variant(half), held=half.validation_error, base_held=half.base_validation_error,
                per_sample=per_sample_error(out.x, ref), rmse=rmse(out.x, ref), cal=cal,
                cost=fit.fitting_nfe - fit.reference_nfe, solves=fit.solves, seconds=seconds,
                trajectory=fit.trajectory, variants=half.options["variants"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture,patches")
    parser.add_argument("--nfe", default="6,8,10", help="the mixture's budgets")
    parser.add_argument("--patch-nfe", default="6,8", help="the patches' budgets")
    parser.add_argument("--solvers", default="unipc,ipndm")
    parser.add_argument("--patch-solvers", default="unipc,ipndm(order=3)")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--max-evals", type=int, default=60)
    parser.add_argument("--patch-max-evals", type=int, default=150)
    parser.add_argument("--depth", type=int, default=_learned.TRAJECTORY_DEPTH)
    parser.add_argument("--bound", type=float, default=_learned.TRAJECTORY_BOUND)
    parser.add_argument("--no-peers", action="store_true", help="skip the peers (no ratio column)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation noise seed; calibration seed + 1")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    _learned.TRAJECTORY_DEPTH, _learned.TRAJECTORY_BOUND = args.depth, args.bound
    K = None if args.no_peers else load_kdiffusion_sampling()
    lines = ["## The default against a fit with the trajectory kind (`learned_expressive.py`)", "",
             f"`python benchmarks/learned_expressive.py --models {args.models} --nfe {args.nfe} --patch-nfe "
             f"{args.patch_nfe} --solvers '{args.solvers}' --patch-solvers '{args.patch_solvers}' --iterations "
             f"{args.iterations} --batch {args.batch} --calibration {args.calibration} --max-evals {args.max_evals} "
             f"--patch-max-evals {args.patch_max_evals} --depth {args.depth} --bound "
             f"{args.bound:g} --seed {args.seed}{' --no-peers' if args.no_peers else ''}` — "
             f"{platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, 1 thread, float64.", ""]
    started = time.perf_counter()

    write = report_writer(args.out, lines)

    for key in args.models.split(","):
        flow, tol, specs, evals, noise, calibration, ref = model_batches(key, args, args.seed + 1)
        lines += [f"### {key}", "", "| NFE | solver | tuned grid | default: held-out half (base) | kept | evaluation "
                  "RMSE | fitting NFE (solves) | + trajectory: held-out half | kept | evaluation RMSE | fitting NFE "
                  "(solves) | change | trajectory variant against the one before it: fitted half | held-out "
                  "half |", "|---:|---|---:|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        picks = ["", f"Picks on the calibration batch ({key}), against the best peer (chosen on the evaluation noise):",
                 "", "| NFE | pick today | RMSE | ratio [95 %] | pick with the trajectory kind | RMSE | ratio [95 %] | "
                 "best peer | RMSE |", "|---:|---|---:|---:|---|---:|---:|---|---:|"]
        budgets = args.patch_nfe if key == "patches" else args.nfe
        for budget in (int(b) for b in budgets.split(",")):
            today, added = [], []
            for label, name, options in specs:
                tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=budget,
                                      progress=False, max_evals=evals, reference_tol=tol)
                with torch.no_grad():
                    x = flowdiff.generate(flow, noise, solver=solvers.get(name, **options), grid=tuned.sigmas).x
                row = dict(label=f"`{label}` tuned grid", cal=tuned.calibration_error, rmse=rmse(x, ref),
                           per_sample=per_sample_error(x, ref))
                today.append(row)
                added.append(row)
                fits = []
                for learn in (DEFAULT, WITH_TRAJECTORY):
                    fit = fitted(flow, calibration, noise, ref, budget, name, options, tuned.sigmas, learn,
                                 args.iterations, tol)
                    fits.append(fit)
                    if fit["kept"]:
                        entry = dict(fit, label=f"`{label}` {'+ trajectory' if 'trajectory' in learn else 'default'}")
                        (added if "trajectory" in learn else today).append(entry)
                        if "trajectory" not in learn:
                            added.append(entry)
                a, b = fits
                lines.append(f"| {budget} | `{label}` | {row['rmse']:.3e} | {a['held']:.3e} ({a['base_held']:.3e}) | "
                             f"{a['variant']} | {a['rmse']:.3e} | {a['cost']} ({a['solves']}) | {b['held']:.3e} | "
                             f"{b['variant']} | {b['rmse']:.3e} | {b['cost']} ({b['solves']}) | "
                             f"{100 * (b['rmse'] / a['rmse'] - 1):+.1f} % | {moved(b['variants'], 0)} | "
                             f"{moved(b['variants'], 1)} |")
                print(lines[-1], f"[{a['seconds']:.0f} + {b['seconds']:.0f} s]; trajectory {b['trajectory']}",
                      flush=True)
                write()
            pick, new_pick = min(today, key=lambda r: r["cal"]), min(added, key=lambda r: r["cal"])
            if K is not None:
                peers = run_diffusers(flow, noise, ref, budget) + run_kdiffusion(K, flow, noise, ref, budget)
                peers = [r for r in peers if math.isfinite(r["rmse"])]
                errors = torch.stack([r["per_sample"] for r in peers])
                old, new = ratio(pick["per_sample"], errors), ratio(new_pick["per_sample"], errors)
                peer = peers[old.peer_index]
                cells = [f"**{old.ratio:.2f}×** [{old.low:.2f}, {old.high:.2f}]",
                         f"**{new.ratio:.2f}×** [{new.low:.2f}, {new.high:.2f}]",
                         f"{peer['lib']} {peer['solver']}{' on ' + peer['grid'] if peer['grid'] else ''}",
                         f"{old.peer:.3e}"]
            else:
                cells = ["—", "—", "—", "—"]
            picks.append(f"| {budget} | {pick['label']} | {pick['rmse']:.3e} | {cells[0]} | {new_pick['label']} | "
                         f"{new_pick['rmse']:.3e} | {cells[1]} | {cells[2]} | {cells[3]} |")
            print(picks[-1], flush=True)
        lines += picks + [""]
        write()
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    write()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
