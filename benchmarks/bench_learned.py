"""Learned low-NFE solvers against tuned grids, diffusers' best scheduler and k-diffusion; round trips 10 + 10.

Frontier (NFE 4–20): for each model (the closed-form mixture of ``bench_frontier.py``, 200 digit images at
bandwidth 0.1, and the shipped trained ``digits`` model), float64, the RMS image error against a float64
reference from the same noise:

* flowdiff, tuned grid: ``flowdiff.tune`` (dp+search) for each solver of ``--solvers`` (``--digits-solvers`` for the
  trained model; options in brackets, e.g. ``ipndm(order=3)``, passed as ``solver_options``) on calibration noise
  (``--cal-seed``, by default seed + 1), measured on the evaluation noise (seed); the entry is the solver best on
  the calibration noise.
* flowdiff, learned: ``flowdiff.learn_solver`` on the same calibration noise, started from that tuned grid,
  once for each of ``LEARN`` (evaluation shifts and the grid — the default —, shifts alone, shifts and the
  Adams coefficients, the coefficients alone; ``--learn``, and ``--digits-learn`` for the trained model, whose
  solves cost more: shifts and grid, coefficients), each kept only where the held-out half of the calibration
  batch agrees (and then refitted on the whole batch), measured on the evaluation noise; the entry is the
  candidate (learned or tuned-only, any solver) best on the whole calibration batch. Nothing of the evaluation
  noise is used to choose it. A second table gives every fit's error on the held-out half (the half-fit's,
  before the refit), which is what chose ``learn_solver``'s default.
* diffusers (55 scheduler configurations) and k-diffusion: ``bench_frontier.py``'s runners, best chosen on the
  evaluation noise itself, which favours them.

A second table (``pooled_row``, statistics in ``_pooled.py``) says how sure each ratio is: a bootstrap interval
over the evaluation samples, how many samples are far off (on the mixture: land on another training image than
the reference's) for flowdiff's pick and the best peer, and, as extra columns, the ratio with those samples capped
or left out. On the mixture a large ``--batch`` is cheap (the reference of 1,024 samples costs ~770 NFE, 4 s) and
needed: a few per cent of the samples land on another training image and set the RMSE. ``torch.randn`` fills a
batch in order, so ``--batch 1024`` holds the 128 samples of ``--batch 128`` (same seed) as its first.

Round trips: the per-pixel MSE of decode(encode(x)) at 10 + 10 evaluations for flowdiff's multistep and Euler
encoders on the named grids, and on grids tuned for the round trip (``flowdiff.tune_roundtrip`` on 4 training
digits, not the images measured), against diffusers' inverse schedulers (``bench_roundtrip.py``'s runner), on
held-out test digits (shipped model) and on the mixture of ``bench_roundtrip.py`` (64 training digits,
bandwidth 0.3).

The report is written to ``--out`` after every budget, so a run that is stopped keeps what it measured. Per budget
it also gives the spread of the learned / peer ratio over the evaluation samples (a bootstrap that chooses the
peers' best again on each resample, ``_pooled.ratio``), the picks' grids, and the candidate that the held-out
half alone would pick (on the trained model the 8-sample evaluation batch once used was far from the 64-sample one).

Usage: python benchmarks/bench_learned.py [--models mixture,digits] [--nfe 4,5,6,8,10,20] [--digits-nfe 5,10]
[--solvers unipc,dpmpp_3m,ipndm] [--digits-solvers 'unipc,dpmpp_3m,ipndm(order=3),unipc(order=3)']
[--learn ...] [--digits-learn shifts+grid,coefficients] [--iterations 8] [--parts frontier,roundtrips]
[--seed 0] [--cal-seed SEED] [--out benchmarks/results/learned.md]

Both float64 references (the evaluation batch's and the calibration batch's) are kept on disk under
``/tmp/flowdiff_bench_cache`` and solved only when missing: on the trained model they are most of a short run.
"""

from __future__ import annotations

import argparse
import ast
import math
import platform
import re
import time
import warnings
from pathlib import Path

import torch
from _kdiffusion import (
    load_kdiffusion_sampling,
    mixture_centres,
    mixture_flow,
    noise_shape,
    patch_centres,
    patch_flow,
    per_sample_error,
    rmse,
    trained_flow,
)
from _pooled import CAP, capped_ratio, nearest, ratio, ratio_without
from bench_frontier import evaluation_reference, run_diffusers
from bench_lownfe import run_kdiffusion
from bench_roundtrip import diffusers_roundtrip

import flowdiff
import solvers
from flowdiff.models.analytic import Mixture
from flowdiff.tools import reference as _reference

SOLVERS = "unipc,dpmpp_3m,ipndm"
#: the trained model's candidates: ``unipc`` (order 2 by default) and ``dpmpp_3m`` as before, with ``ipndm(order=3)``
#: (its tuned grid measured 0.49× the best peer at NFE 20 in ``bench_frontier.py``) and ``unipc(order=3)`` (the best
#: named-grid solver at NFE 20 in ``bench_lownfe.py``)
DIGITS_SOLVERS = "unipc,dpmpp_3m,ipndm(order=3),unipc(order=3)"
#: what ``learn_solver`` fits, each tried on every solver's tuned grid (coefficients: Adams methods only)
LEARN = {"shifts+grid": ("shifts", "grid"), "shifts": ("shifts",), "shifts+coefficients": ("shifts", "coefficients"),
         "coefficients": ("coefficients",), "shifts+grid+coefficients": ("shifts", "grid", "coefficients"),
         "shifts+grid+start": ("shifts", "grid", "start"), "grid+start": ("grid", "start"),
         "shifts+grid+start+scales": ("shifts", "grid", "start", "scales"),
         "shifts+grid+start+scales+directions": ("shifts", "grid", "start", "scales", "directions"),
         "shifts+grid+start+scales+directions+trajectory": ("shifts", "grid", "start", "scales", "directions",
                                                            "trajectory")}
#: the mixture's fits by default (the three-kind fit is tried on the trained model only: ``--learn`` adds it)
MIXTURE_LEARN = "shifts+grid,shifts,shifts+coefficients,coefficients"
ROUNDTRIP_SOLVERS = ("euler", "lms", "dpmpp_2m", "dpmpp_3m", "unipc", "abm")
ROUNDTRIP_GRIDS = ("trailing", "leading", "karras", "logsnr")
#: solvers whose grid is tuned on the round-trip error of calibration images (``flowdiff.tune_roundtrip``)
TUNED_ROUNDTRIP = ("dpmpp_2m", "dpmpp_3m", "unipc")


def solver_specs(text: str) -> list[tuple[str, str, dict]]:
    """``"unipc,ipndm(order=3)"`` as ``[(label, name, options), ...]``: a registered name, optionally with keyword
    options in brackets (Python literals), passed on as ``solver_options``."""
    specs = []
    for item in re.findall(r"[^,()]+(?:\([^)]*\))?", text):
        item = item.strip()
        match = re.fullmatch(r"(\w+)(?:\((.*)\))?", item)
        if match is None:
            raise ValueError(f"solver {item!r}: expected a name or name(key=value, ...)")
        name, inner = match.groups()
        options = {}
        for pair in filter(None, (p.strip() for p in (inner or "").split(","))):
            key, sep, value = pair.partition("=")
            if not sep:
                raise ValueError(f"solver {item!r}: option {pair!r} is not key=value")
            options[key.strip()] = ast.literal_eval(value.strip())
        solvers.get(name, **options)  # unknown names and options fail here, before any solve
        specs.append((item, name, options))
    return specs


def learn_kinds(text: str) -> dict[str, tuple[str, ...]]:
    """``"shifts+grid,coefficients"`` as the matching entries of ``LEARN``."""
    labels = text.split(",")
    unknown = [k for k in labels if k not in LEARN]
    if unknown:
        raise ValueError(f"--learn: unknown fit(s) {unknown}; accepted: {', '.join(LEARN)}")
    return {k: LEARN[k] for k in labels}


def flowdiff_candidates(flow, calibration, noise, ref, budget, max_evals, tol, specs, learns,
                        iterations, robust=None, folds=1) -> list[dict]:
    """Per solver: its tuned grid, then ``learn_solver`` on that grid for each of ``learns`` (coefficients only for
    the Adams methods); every row with its error on the evaluation noise and, for the fits, on both halves of
    the calibration batch."""
    rows = []
    for solver, name, options in specs:
        tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=budget, progress=False,
                              max_evals=max_evals, reference_tol=tol)
        with torch.no_grad():
            x_tuned = flowdiff.generate(flow, noise, solver=solvers.get(name, **options), grid=tuned.sigmas)
        assert x_tuned.stats.nfe <= budget
        rows.append(dict(solver=solver, kind="tuned grid", learn="", rmse=rmse(x_tuned.x, ref),
                         cal=tuned.calibration_error, nfe=x_tuned.stats.nfe, cost=tuned.tuning_nfe,
                         per_sample=per_sample_error(x_tuned.x, ref), x=x_tuned.x, sigmas=tuned.sigmas))
        adams = isinstance(solvers.get(name, **options), solvers.Adams)
        for label, learn in learns.items():
            if "coefficients" in learn and not adams:
                continue
            learned = flowdiff.learn_solver(flow, calibration, solver=name, solver_options=options, nfe=budget,
                                            sigmas=tuned.sigmas, reference_tol=tol, learn=learn,
                                            iterations=iterations, robust=robust, folds=folds)
            with torch.no_grad():
                x_learned = flowdiff.generate(flow, noise, solver=learned.as_solver(), grid=learned.sigmas)
            assert x_learned.stats.nfe <= budget
            # on the calibration batch: the learned solver's error over all of it vs the tuned grid's (a kept fit is
            # refitted on all of it: its own figure; a half-fit's is over both halves, of equal sizes)
            learned_cal = (learned.calibration_error if learned.options.get("fitted_on") == "all" else
                           math.sqrt((learned.calibration_error ** 2 + learned.validation_error ** 2) / 2))
            rows.append(dict(solver=solver, kind=f"learned {label}" + ("" if learned.kept else " (rejected)"),
                             learn=label, kept=learned.kept, rmse=rmse(x_learned.x, ref),
                             cal=learned_cal if learned.kept else tuned.calibration_error, nfe=x_learned.stats.nfe,
                             cost=learned.fitting_nfe - learned.reference_nfe, solves=learned.solves,
                             base_cal=learned.base_calibration_error, fit_cal=learned.calibration_error,
                             val=learned.validation_error, base_val=learned.base_validation_error,
                             shifts=learned.shifts, seconds=learned.fitting_seconds, sigmas=learned.sigmas,
                             per_sample=per_sample_error(x_learned.x, ref), x=x_learned.x))
    return rows


def calibration_reference(flow, calibration, key: str, tol: float) -> None:
    """The calibration batch's float64 reference from the disk cache of ``evaluation_reference`` (solved and stored
    there on the first run), handed to flowdiff's in-process reference cache under the key ``tune`` and
    ``learn_solver`` look up: on the trained model 64 samples cost 2,811 NFE and about 270 s, which every run
    would otherwise pay again. A batch whose first samples are a smaller cached batch (the same seed) is not
    reused: the key is the whole batch."""
    ref = evaluation_reference(flow, calibration, f"{key}-cal", tol)
    key = (*_reference._noise_key(calibration), ref.sigma_start, ref.sigma_end, ref.solver, ref.rtol, ref.atol)
    _reference._CACHE.setdefault(flow, {})[key] = ref


def pooled_row(budget: int, ours: list[dict], peers: list[dict], ref: torch.Tensor, centres) -> str:
    """One row of the table of the evaluation batch's statistics (``_pooled``): the learned and the tuned-only pick
    (chosen on calibration) against the best peer (chosen on the evaluation noise, again in every bootstrap draw),
    how many samples set the RMSE, the ratio with them capped or left out, the pick the held-out half alone would
    make, and the best flowdiff candidate on the evaluation noise (chosen on it, as the peers are: for scale).
    ``centres``: the mixture's training images, to count the samples that land on another one than ``ref``'s."""
    errors = torch.stack([r["per_sample"] for r in peers])
    pick = min(ours, key=lambda r: r["cal"])
    tuned_pick = min((r for r in ours if r["kind"] == "tuned grid"), key=lambda r: r["cal"])
    learned, tuned = ratio(pick["per_sample"], errors), ratio(tuned_pick["per_sample"], errors)
    peer = peers[learned.peer_index]
    far = f"{int((pick['per_sample'] > CAP).sum())} / {int((peer['per_sample'] > CAP).sum())}"
    if centres is not None:
        target = nearest(ref, centres)
        ours_off, peer_off = nearest(pick["x"], centres) != target, nearest(peer["x"], centres) != target
        fewest = min(int((nearest(r["x"], centres) != target).sum()) for r in peers)
        which = ours_off.nonzero().flatten().tolist()
        elsewhere = (f"{len(which)} / {int(peer_off.sum())} (fewest of any peer {fewest})"
                     + (f"; pick's: {', '.join(map(str, which))}" if len(which) <= 8 else ""))
        without = f"{ratio_without(pick['per_sample'], errors, ~(ours_off | peer_off)):.2f}×"
    else:
        elsewhere = without = "—"
    # the held-out half alone: a tuned grid's error there is its fits' base, a kept fit's its own
    held = {}
    for r in ours:
        if "val" in r:
            held.setdefault((r["solver"], "tuned grid"), r["base_val"])
            if r["kept"]:
                held[(r["solver"], r["kind"])] = r["val"]
    held_pick = min(held, key=held.get) if held else None
    held_cell = "—"
    if held_pick is not None:
        row = next(r for r in ours if (r["solver"], r["kind"]) == held_pick)
        held_cell = f"{row['solver']}, {row['kind']}: {row['rmse'] / learned.peer:.2f}×"
    oracle = min(ours, key=lambda r: r["rmse"])
    return (f"| {budget} | {pick['solver']}, {pick['kind']} | {pick['rmse']:.3e} | {peer['lib']} {peer['solver']}"
            f"{' on ' + peer['grid'] if peer['grid'] else ''} | {learned.peer:.3e} | **{learned.cell()}** | "
            f"{tuned.cell()} | {far} | {elsewhere} | {capped_ratio(pick['per_sample'], errors):.2f}× | {without} | "
            f"{held_cell} | {oracle['solver']}, {oracle['kind']}: {oracle['rmse'] / learned.peer:.2f}× |")


def frontier(K, title, flow, key, batch, cal_batch, budgets, max_evals, seed, tol, specs, learns, iterations,
             written=lambda lines: None, centres=None, robust=None, folds=1, cal_seed=None) -> list[str]:
    """One model's frontier table; the calibration noise is drawn from ``cal_seed`` (``None``: ``seed + 1``)."""
    noise = torch.randn(batch, *noise_shape(key), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    calibration = torch.randn(cal_batch, *noise_shape(key), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed + 1 if cal_seed is None else cal_seed))
    ref = evaluation_reference(flow, noise, key, tol)
    calibration_reference(flow, calibration, key, tol)
    lines = [f"### {title}", "", f"Evaluation batch {batch}, calibration batch {cal_batch}, reference tolerance "
             f"{tol:g} ({ref.nfe} NFE).", "",
             "| NFE | flowdiff learned (chosen on calibration) | RMSE | tuned grid only (chosen on calibration) | "
             "RMSE | best diffusers | RMSE | best k-diffusion | RMSE | learned / best peer | tuned / best peer | "
             "fitting cost of the pick (NFE, candidate solves) |",
             "|---:|---|---:|---|---:|---|---:|---|---:|---:|---:|---:|"]
    # folds=2's held-out figure pools both folds' held-out halves (each sample judged by the half-fit that did not
    # see it): the whole calibration batch, not one half
    held_name = "held-out half" if folds == 1 else "held-out halves of both folds"
    held = ["", ("Held-out half of the calibration batch (what `kept` is decided on)" if folds == 1 else
                 "Both folds' held-out halves of the calibration batch, pooled (every sample judged by the half-fit "
                 "that did not see it; each fold's `kept` is decided on its own half)") +
            ": RMSE of the base method on the tuned grid, and of each fit (* kept); the last column is the best on "
            "the evaluation noise.", "",
            "| NFE | solver | base (tuned grid) | " + " | ".join(learns) + " | on the evaluation noise |",
            "|---:|---|---:|" + "---:|" * len(learns) + "---|"]
    details = []
    pooled = ["", f"The {batch} evaluation samples: each ratio with a 95 % bootstrap interval (2,000 resamples of the "
              "samples, the best peer chosen again on each); how many samples are more than "
              f"{CAP:g} off (per-sample RMS) and how many land on another training image than the reference's "
              "(mixture), for flowdiff's pick and the best peer (and the fewest of any peer configuration; the "
              "pick's sample indices when few); the ratio with every per-sample error capped at "
              f"{CAP:g}, and without the samples that either lands on another image (extra columns: the ratio "
              f"is the first); the candidate the {held_name} alone picks; the best flowdiff candidate chosen on "
              "the evaluation noise itself, as the peers' is (for scale, not an entry).", "",
              "| NFE | flowdiff learned (chosen on calibration) | RMSE | best peer (chosen on evaluation) | RMSE | "
              "learned / peer [95 %] | tuned only / peer [95 %] | samples > "
              f"{CAP:g} off: pick / peer | on another image: pick / peer | ratio, errors capped at {CAP:g} | "
              f"ratio without those samples | picked on the {held_name}: ratio | best flowdiff on evaluation "
              "noise: ratio |",
              "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]

    grids = ["", "Grids (σ) of the picks:", ""]

    def report() -> list[str]:
        return lines + pooled + grids + held + [
            "", "Every flowdiff candidate on the evaluation noise (and the learned fits' halves):", "", *details, ""]

    for budget in budgets:
        started = time.perf_counter()
        ours = flowdiff_candidates(flow, calibration, noise, ref.x, budget, max_evals, tol, specs, learns,
                                   iterations, robust, folds)
        dif = [r for r in run_diffusers(flow, noise, ref.x, budget) if math.isfinite(r["rmse"])]
        kd = run_kdiffusion(K, flow, noise, ref.x, budget)
        assert all(r["nfe"] <= budget for r in dif + kd)
        pooled.append(pooled_row(budget, ours, dif + kd, ref.x, centres))
        pick = min(ours, key=lambda r: r["cal"])
        tuned_pick = min((r for r in ours if r["kind"] == "tuned grid"), key=lambda r: r["cal"])
        best_dif, best_kd = min(dif, key=lambda r: r["rmse"]), min(kd, key=lambda r: r["rmse"])
        peer = min(best_dif["rmse"], best_kd["rmse"])
        cost = f"{pick['cost']}, {pick['solves']}" if "solves" in pick else "0 (tuning only)"
        lines.append(f"| {budget} | {pick['solver']}, {pick['kind']} | {pick['rmse']:.3e} | {tuned_pick['solver']} | "
                     f"{tuned_pick['rmse']:.3e} | {best_dif['solver']} | {best_dif['rmse']:.3e} | "
                     f"{best_kd['solver']} on {best_kd['grid']} | {best_kd['rmse']:.3e} | {pick['rmse'] / peer:.2f}× | "
                     f"{tuned_pick['rmse'] / peer:.2f}× | {cost} |")
        grids += [f"- NFE {budget}, {r['solver']} {r['kind']}: " + ", ".join(f"{s:.4g}" for s in r["sigmas"]) +
                  (f"; shifts {', '.join(f'{d:.3f}' for d in r['shifts'])}" if r.get("shifts") else "")
                  for r in ((pick, tuned_pick) if pick is not tuned_pick else (pick,))]
        for solver, _, _ in specs:
            fits = {r["learn"]: r for r in ours if r["solver"] == solver and r["learn"]}
            if not fits:
                continue
            base_val = next(iter(fits.values()))["base_val"]
            cells = [f"{fits[k]['val']:.3e}{'*' if fits[k]['kept'] else ''}" if k in fits else "—" for k in learns]
            best = min((r for r in ours if r["solver"] == solver), key=lambda r: r["rmse"])
            held.append(f"| {budget} | {solver} | {base_val:.3e} | " + " | ".join(cells) +
                        f" | {best['kind']} {best['rmse']:.3e} |")
        details += [f"- NFE {budget}: " + "; ".join(
            f"{r['solver']} {r['kind']} {r['rmse']:.3e}" + (
                f" (fitted {r['fit_cal']:.3e} vs base {r['base_cal']:.3e}, {held_name} {r['val']:.3e} vs "
                f"{r['base_val']:.3e}; {r['cost']} NFE in {r['solves']} solves, {r['seconds']:.1f} s; shifts "
                f"{', '.join(f'{d:.2f}' for d in r['shifts'])})" if "base_cal" in r else "") for r in ours)]
        print(f"{key} NFE {budget}: learned pick {pick['solver']} {pick['kind']} {pick['rmse']:.3e}, tuned "
              f"{tuned_pick['rmse']:.3e}, peer {peer:.3e} [{time.perf_counter() - started:.0f} s]", flush=True)
        written(report())
    return report()


def roundtrips(title, flow, images, calibration, nfe) -> list[str]:
    model = EpsNetwork(flow)
    rows = []
    for solver in TUNED_ROUNDTRIP:
        tuned = flowdiff.tune_roundtrip(flow, calibration, solver=solver, nfe=nfe)
        with torch.no_grad():
            enc = flowdiff.encode(flow, images, solver=solver, grid=tuned.sigmas)
            dec = flowdiff.decode(flow, enc.latent)
        rows.append((float((dec.x - images).pow(2).mean()), f"{solver} / round-trip grid (from {tuned.initial_grid}, "
                     f"{tuned.tuning_nfe} NFE to tune)", f"{enc.stats.nfe}+{dec.stats.nfe}"))
    for solver in ROUNDTRIP_SOLVERS:
        for grid in ROUNDTRIP_GRIDS:
            with torch.no_grad():
                enc = flowdiff.encode(flow, images, solver=solver, nfe=nfe, grid=grid)
                dec = flowdiff.decode(flow, enc.latent)
            rows.append((float((dec.x - images).pow(2).mean()), f"{solver} / {grid}",
                         f"{enc.stats.nfe}+{dec.stats.nfe}"))
    peers = []
    for kind, orders in (("ddim", (1,)), ("dpm++", (1, 2, 3))):
        for order in orders:
            for spacing in ("leading", "trailing", "linspace"):
                name = "DDIMInverse+DDIM" if kind == "ddim" else f"DPMSolverMultistepInverse(order {order})+DPM"
                try:
                    peers.append((diffusers_roundtrip(model, images, nfe, kind, order, spacing),
                                  f"{name} / {spacing}"))
                except ValueError:  # a spacing this inverse scheduler refuses (DDIMInverse: linspace)
                    continue
    best, peer = min(rows), min(peers)
    lines = [f"### Round trips {nfe} + {nfe}: {title}", "",
             f"flowdiff best **{best[1]}** MSE {best[0]:.2e} ({best[2]} NFE); diffusers best {peer[1]} "
             f"{peer[0]:.2e}; ratio **{best[0] / peer[0]:.2f}×**.", "",
             "| flowdiff encoder / grid | MSE | NFE |", "|---|---:|---:|"]
    lines += [f"| {name} | {mse:.2e} | {n} |" for mse, name, n in sorted(rows)]
    return lines + [""]


class EpsNetwork:
    """The flow's ε as diffusers' ``model(x_t, t)`` for a batch of timesteps (all equal)."""

    def __init__(self, flow) -> None:
        self.eps, self.schedule = flow.field(), flow.schedule

    def __call__(self, x_t, t):
        sigma = float(self.schedule.sigma_at(float(t.reshape(-1)[0])))
        return self.eps(sigma, x_t * math.sqrt(1.0 + sigma * sigma))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture,digits", help="of mixture, patches, digits")
    parser.add_argument("--nfe", default="4,5,6,8,10,20")
    parser.add_argument("--digits-nfe", default="5,10", help="budgets of the trained model (slower)")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--calibration", type=int, default=256)
    parser.add_argument("--solvers", default=SOLVERS, help="flowdiff solvers tuned and fitted (mixture); options "
                        "in brackets, e.g. ipndm(order=3)")
    parser.add_argument("--digits-solvers", default=DIGITS_SOLVERS, help="the same for the trained model")
    parser.add_argument("--learn", default=MIXTURE_LEARN, help="the fits tried on every tuned grid (mixture)")
    parser.add_argument("--digits-learn", default="shifts+grid,coefficients",
                        help="the same for the trained model (fewer: its solves cost 20–100× the mixture's)")
    parser.add_argument("--digits-batch", type=int, default=8)
    parser.add_argument("--digits-calibration", type=int, default=16)
    parser.add_argument("--max-evals", type=int, default=60, help="candidate solves per tuned grid")
    parser.add_argument("--iterations", type=int, default=8, help="least-squares iterations of every learn_solver "
                        "fit (its iterations=)")
    parser.add_argument("--robust", type=float, default=None, help="every learn_solver fit's robust= (the Huber "
                        "threshold per sample, in the base method's median errors; default: plain least squares)")
    parser.add_argument("--folds", type=int, default=1, choices=(1, 2), help="every learn_solver fit's folds= (2: "
                        "the kept refits of both halves' fits averaged; default: one fold)")
    parser.add_argument("--roundtrip-images", type=int, default=2)
    parser.add_argument("--parts", default="frontier,roundtrips", help="frontier, roundtrips or both")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation noise's seed")
    parser.add_argument("--cal-seed", type=int, default=None, help="the calibration noise's seed (default: --seed + 1; "
                        "another calibration batch against the same evaluation noise and peers)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.cal_seed == args.seed:
        parser.error(f"--cal-seed {args.cal_seed} equals --seed: the calibration noise would be the evaluation noise; "
                     "accepted: any other seed")
    if args.cal_seed is not None and "frontier" not in args.parts.split(","):
        parser.error(f"--cal-seed {args.cal_seed} seeds the frontier's calibration noise, and --parts {args.parts} has "
                     "no frontier (the round trips calibrate on fixed training digits): add frontier to --parts, or "
                     "leave --cal-seed out")
    specs, digits_specs = solver_specs(args.solvers), solver_specs(args.digits_solvers)
    learns, digits_learns = learn_kinds(args.learn), learn_kinds(args.digits_learn)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    K = load_kdiffusion_sampling()
    started = time.perf_counter()
    wanted = args.models.split(",")
    if set(wanted) - {"mixture", "patches", "digits"}:
        parser.error(f"--models: unknown {sorted(set(wanted) - {'mixture', 'patches', 'digits'})}; accepted: "
                     "mixture, patches, digits")
    lines = ["## Learned low-NFE solvers and round trips (`bench_learned.py`)", "",
             f"`python benchmarks/bench_learned.py --models {args.models} --nfe {args.nfe} --digits-nfe "
             f"{args.digits_nfe} --batch {args.batch} --calibration {args.calibration} --digits-batch "
             f"{args.digits_batch} --digits-calibration {args.digits_calibration} --max-evals {args.max_evals} "
             f"--solvers '{args.solvers}' --digits-solvers '{args.digits_solvers}' --learn {args.learn} "
             f"--digits-learn {args.digits_learn} --iterations {args.iterations} "
             f"{'' if args.robust is None else f'--robust {args.robust:g} '}"
             f"{'' if args.folds == 1 else f'--folds {args.folds} '}"
             f"--seed {args.seed} {'' if args.cal_seed is None else f'--cal-seed {args.cal_seed} '}"
             f"--parts {args.parts}` — {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, 1 thread, float64.", ""]
    parts = args.parts.split(",")

    def write(done: list[str]) -> None:
        """The report so far (after every budget: a long run that is stopped keeps what it measured)."""
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(done) + "\n")

    if "mixture" in wanted and "frontier" in parts:
        lines += frontier(K, "closed-form mixture (200 digit images, bandwidth 0.1)", mixture_flow(), "mixture",
                          args.batch, args.calibration, [int(b) for b in args.nfe.split(",")], args.max_evals,
                          args.seed, 1e-8, specs, learns, args.iterations, lambda part: write(lines + part),
                          centres=mixture_centres(), robust=args.robust, folds=args.folds,
                          cal_seed=args.cal_seed)
    if "patches" in wanted and "frontier" in parts:  # the mixture's settings, on 200 grey 16×16 photo patches
        lines += frontier(K, "closed-form kernel density over 200 grey 16×16 photo patches (bandwidth 0.1)",
                          patch_flow(), "patches", args.batch, args.calibration, [int(b) for b in args.nfe.split(",")],
                          args.max_evals, args.seed, 1e-8, specs, learns, args.iterations,
                          lambda part: write(lines + part), centres=patch_centres(), robust=args.robust,
                          folds=args.folds, cal_seed=args.cal_seed)
    trained = trained_flow() if "digits" in wanted else None
    if trained is not None and "frontier" in parts:
        lines += frontier(K, "shipped trained model pretrained('digits')", trained, "digits", args.digits_batch,
                          args.digits_calibration, [int(b) for b in args.digits_nfe.split(",")], args.max_evals,
                          args.seed, 1e-6, digits_specs, digits_learns, args.iterations,
                          lambda part: write(lines + part), robust=args.robust, folds=args.folds,
                          cal_seed=args.cal_seed)
    if trained is not None and "roundtrips" in parts:
        images = flowdiff.digits_data("test").images[: args.roundtrip_images].double()
        calibration = flowdiff.digits_data("train").images[100:104].double()
        lines += roundtrips("shipped digits model, held-out test digits", trained, images, calibration, 10)
    if "mixture" in wanted and "roundtrips" in parts:
        train = flowdiff.digits_data("train").images[:64].double()
        mix = Mixture(train, 0.3, schedule=flowdiff.Schedule.linear()).flow()
        images = flowdiff.digits_data("test").images[: args.roundtrip_images].double()
        calibration = flowdiff.digits_data("train").images[100:104].double()  # not among the mixture's centres
        lines += roundtrips("mixture of 64 training digits (bandwidth 0.3), held-out test digits", mix, images,
                            calibration, 10)
    if "patches" in wanted and "roundtrips" in parts:  # held-out patches: other corners (seed 1), calibration seed 2
        lines += roundtrips("photo-patch density (200 patches, bandwidth 0.1), held-out patches", patch_flow(),
                            patch_centres(args.roundtrip_images, seed=1), patch_centres(4, seed=2), 10)
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    write(lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
