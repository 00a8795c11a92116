"""Fits that generalise (issue 26 item 1): ``learn_solver``'s default against the same fit with a robust (Huber,
per sample) fitted objective, ``robust=τ``, same calibration noise, judged on the evaluation noise.

For each model (``--models``: the digit mixture and/or the photo patches of ``bench_learned.py``), budget and solver:
``flowdiff.tune``'s grid on the calibration noise (``--cal-seed``; ``--max-evals`` candidate solves, as
``bench_learned.py``), then one ``learn_solver`` fit per entry of ``--variants`` from that grid
(``flowdiff.tools.learned._learn_both``: the half-fit and its refit): ``plain`` is today's default, ``robust=τ`` the
default with that Huber threshold (in multiples of the base method's median per-sample RMS error). Per fit: the
held-out half's RMS (the half-fit's, which decided), the variant kept, the evaluation RMSE of the returned solver (the
refit where one was kept), its change against ``plain`` with a 95 % paired bootstrap interval over the evaluation
samples, and the fitting cost (``fitting_nfe`` less the teacher's). Per budget and variant: the pick on the
calibration batch as ``bench_learned.py`` makes it (over the tuned grids and that variant's kept fits, each on its RMS
over the whole calibration batch), against the best peer (55 diffusers configurations and k-diffusion, chosen on the
evaluation noise itself, again in every bootstrap draw: ``_pooled.ratio``).

References come from (and go to) ``/tmp/flowdiff_bench_cache``, as ``bench_learned.py``'s.

Usage: cd benchmarks; PYTHONPATH=.. python learned_variance.py --models mixture --nfe 6,8,10
[--patch-nfe 6,8] [--variants plain,robust=2] [--cal-seed 1] [--no-peers] [--out results/x.md]
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
from learned_expressive import variant

import flowdiff
import solvers
from flowdiff.tools import learned as _learned

DEFAULT = LEARN["shifts+grid+start+scales+directions"]


def parse_variants(text: str) -> dict[str, dict]:
    """``"plain,robust=2"`` as ``{"plain": {}, "robust=2": {"robust": 2.0}}`` (learn_solver keywords)."""
    out = {}
    for item in text.split(","):
        if item == "plain":
            out[item] = {}
        elif item.startswith("robust="):
            out[item] = {"robust": float(item.split("=", 1)[1])}
        else:
            raise ValueError(f"--variants: unknown entry {item!r}; accepted: plain, robust=<τ>")
    return out


def fitted(flow, calibration, noise, ref, budget, name, options, sigmas, iterations, tol, extra) -> dict:
    started = time.perf_counter()
    half, refit = _learned._learn_both(flow, calibration, solver=name, solver_options=options, nfe=budget,
                                       sigmas=sigmas, reference_tol=tol, learn=DEFAULT, iterations=iterations,
                                       **extra)
    seconds = time.perf_counter() - started
    fit = refit or half
    with torch.no_grad():
        out = flowdiff.generate(flow, noise, solver=fit.as_solver(), grid=fit.sigmas)
    assert out.stats.nfe <= budget
    cal = fit.calibration_error if refit is not None else math.nan  # a fit not kept is the tuned grid
    return dict(kept=half.kept, variant=variant(half), held=half.validation_error, base_held=half.base_validation_error,
                per_sample=per_sample_error(out.x, ref), rmse=rmse(out.x, ref), cal=cal,
                cost=fit.fitting_nfe - fit.reference_nfe, solves=fit.solves, seconds=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture,patches")
    parser.add_argument("--nfe", default="6,8,10", help="the mixture's budgets")
    parser.add_argument("--patch-nfe", default="6,8", help="the patches' budgets")
    parser.add_argument("--solvers", default="unipc,ipndm")
    parser.add_argument("--patch-solvers", default="unipc,ipndm(order=3)")
    parser.add_argument("--variants", default="plain,robust=2")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--max-evals", type=int, default=60)
    parser.add_argument("--patch-max-evals", type=int, default=150)
    parser.add_argument("--no-peers", action="store_true", help="skip the peers (no ratio column)")
    parser.add_argument("--seed", type=int, default=0, help="evaluation noise seed")
    parser.add_argument("--cal-seed", type=int, default=None, help="the calibration seed (default: seed + 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    variants = parse_variants(args.variants)
    names = list(variants)
    cal_seed = args.seed + 1 if args.cal_seed is None else args.cal_seed
    K = None if args.no_peers else load_kdiffusion_sampling()
    lines = ["## The default against robust fitted objectives (`learned_variance.py`)", "",
             f"`python benchmarks/learned_variance.py --models {args.models} --nfe {args.nfe} --patch-nfe "
             f"{args.patch_nfe} --solvers '{args.solvers}' --patch-solvers '{args.patch_solvers}' --variants "
             f"{args.variants} --iterations {args.iterations} --batch {args.batch} --calibration {args.calibration} "
             f"--max-evals {args.max_evals} --patch-max-evals {args.patch_max_evals} --seed {args.seed} --cal-seed "
             f"{cal_seed}{' --no-peers' if args.no_peers else ''}` — {platform.processor() or platform.machine()}, "
             f"torch {torch.__version__}, 1 thread, float64.", ""]
    started = time.perf_counter()

    write = report_writer(args.out, lines)

    for key in args.models.split(","):
        flow, tol, specs, evals, noise, calibration, ref = model_batches(key, args, cal_seed)
        lines += [f"### {key}", "", "| NFE | solver | tuned grid | variant | held-out half (base) | kept | evaluation "
                  f"RMSE | against {names[0]} [95 %] | fitting NFE (solves) |",
                  "|---:|---|---:|---|---|---|---:|---:|---:|"]
        picks = ["", f"Picks on the calibration batch ({key}), against the best peer (chosen on the evaluation noise):",
                 "", "| NFE | variant | pick | RMSE | ratio [95 %] | best peer | RMSE |",
                 "|---:|---|---|---:|---:|---|---:|"]
        budgets = args.patch_nfe if key == "patches" else args.nfe
        for budget in (int(b) for b in budgets.split(",")):
            candidates = {v: [] for v in names}
            for label, name, options in specs:
                tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=budget,
                                      progress=False, max_evals=evals, reference_tol=tol)
                with torch.no_grad():
                    x = flowdiff.generate(flow, noise, solver=solvers.get(name, **options), grid=tuned.sigmas).x
                row = dict(label=f"`{label}` tuned grid", cal=tuned.calibration_error, rmse=rmse(x, ref),
                           per_sample=per_sample_error(x, ref))
                first = None
                for v in names:
                    candidates[v].append(row)
                    fit = fitted(flow, calibration, noise, ref, budget, name, options, tuned.sigmas, args.iterations,
                                 tol, variants[v])
                    if fit["kept"]:
                        candidates[v].append(dict(fit, label=f"`{label}` {v}"))
                    first = first or fit
                    change = ratio(fit["per_sample"], first["per_sample"].unsqueeze(0))
                    lines.append(f"| {budget} | `{label}` | {row['rmse']:.3e} | {v} | {fit['held']:.3e} "
                                 f"({fit['base_held']:.3e}) | {fit['variant']} | {fit['rmse']:.3e} | "
                                 f"{change.ratio:.3f} [{change.low:.3f}, {change.high:.3f}] | {fit['cost']} "
                                 f"({fit['solves']}) |")
                    print(lines[-1], f"[{fit['seconds']:.0f} s]", flush=True)
                    write()
            chosen = {v: min(candidates[v], key=lambda r: r["cal"] if math.isfinite(r["cal"]) else math.inf)
                      for v in names}
            if K is not None:
                peers = run_diffusers(flow, noise, ref, budget) + run_kdiffusion(K, flow, noise, ref, budget)
                peers = [r for r in peers if math.isfinite(r["rmse"])]
                errors = torch.stack([r["per_sample"] for r in peers])
            for v in names:
                pick = chosen[v]
                if K is not None:
                    got = ratio(pick["per_sample"], errors)
                    peer = peers[got.peer_index]
                    cells = [f"**{got.ratio:.2f}×** [{got.low:.2f}, {got.high:.2f}]",
                             f"{peer['lib']} {peer['solver']}{' on ' + peer['grid'] if peer['grid'] else ''}",
                             f"{got.peer:.3e}"]
                else:
                    cells = ["—", "—", "—"]
                picks.append(f"| {budget} | {v} | {pick['label']} | {pick['rmse']:.3e} | {' | '.join(cells)} |")
                print(picks[-1], flush=True)
        lines += picks + [""]
        write()
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    write()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
