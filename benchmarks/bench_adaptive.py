"""Adaptive solves: fewest model evaluations to reach RMSE ≤ 1e-3 and ≤ 1e-4, flowdiff against k-diffusion.

For each model (a closed-form Gaussian mixture on digit images, and the shipped trained
``digits`` model when its weights are present) and one batch of noise: every adaptive method
of flowdiff's registry is swept over tolerances (rtol = atol = tol), and k-diffusion's
``sample_dpm_adaptive`` (DPM-Solver-23, its default order 3) over a grid of rtol × atol, ending
at the schedule's σ_min or σ_min/10, each with and without a final denoise into σ = 0 (one
more evaluation). Every model call is counted. The error is the RMS difference of the image
(σ = 0) to a dopri8 float64 reference at rtol = atol = 1e-10.

Reported: for each target (RMSE ≤ 1e-3 and ≤ 1e-4) the fewest NFE of each method (and the settings
that gave it), the ratio of flowdiff's best to k-diffusion's best, and the precision–work points
(error against NFE) of every run; ``--plot`` writes a log-log PNG. Each sweep runs from loose to
tight tolerances and stops once a run meets the tightest target (tighter runs cost more and cannot
be the fewest); k-diffusion's sweeps over rtol stop the same way, for each atol and end σ.

``--quick`` sweeps only ``unipc(order=3)`` over tolerances from 2e-2 to 2e-5 and k-diffusion over rtol
from 5e-3 to 2e-5 with atol 7.8e-3, 1e-3 or 1e-4 (about 3 minutes a seed on one CPU thread with the
references cached). ``--seed`` may be given several times: one table per seed, in one run.

The sides are searched alike too (unless ``--no-equal``): besides the one-knob sweep, ``unipc(order=3)`` is swept
over as many configurations as k-diffusion's quick sweep (7 rtols × 3 atols × 2 end σ's, each read with and without
the final denoise: 84) in the documented fields of ``flowdiff.Adaptive``: 7 rtols × atol/rtol ∈ {0.1, 1, 10} ×
``sigma_end`` ∈ {σ_min/10 (the default), σ_min} × ``first_step`` ∈ {the default estimate, 0.02 in ρ = 1/σ}
(:func:`equal_sweep`), each column loose to tight with the same stop. Both flowdiff figures are reported, each side's
best being its fewest NFE at the target on the evaluated noise. ``--targets 1e-3`` sets the targets (the sweeps stop
at the tightest), for the trained model, whose 1e-4 sweeps are slow.

Usage: python benchmarks/bench_adaptive.py [--batch 16] [--seed 0 ...] [--quick] [--out benchmarks/results/adaptive.md]
       [--plot benchmarks/results/adaptive.png] [--models mixture,patches,digits] [--targets 1e-3,1e-4] [--no-equal]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch
from _kdiffusion import (
    CountingDenoiser,
    load_kdiffusion_sampling,
    mixture_flow,
    noise_shape,
    patch_flow,
    reference,
    rmse,
    trained_flow,
)

import flowdiff
import solvers

TARGETS = (1e-3, 1e-4)
TOLS = [5e-2, 3e-2, 2e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5, 3e-5, 2e-5, 1e-5, 5e-6]
FLOWDIFF = [("unipc", {"order": 2}), ("unipc", {"order": 3}), ("abm", {}), ("dopri5", {}), ("bosh3", {}),
            ("dopri8", {})]
KD_RTOLS = [0.1, 0.05, 0.02, 0.01, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 5e-5, 2e-5, 1e-5]
KD_ATOLS = [0.0078, 1e-3, 1e-4]
QUICK_TOLS = [2e-2, 1e-2, 5e-3, 3e-3, 2e-3, 1e-3, 5e-4, 3e-4, 2e-4, 1e-4, 5e-5, 3e-5, 2e-5]
QUICK_FLOWDIFF = [("unipc", {"order": 3})]
QUICK_KD_RTOLS = [5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 1e-4, 2e-5]
QUICK_KD_ATOLS = [0.0078, 1e-3, 1e-4]
#: flowdiff's sweep of k-diffusion's size (``--quick``: 7 rtols × 3 atols × 2 end σ's × 2 = 84 configurations each
#: side): rtol × atol/rtol × sigma_end/σ_min × first_step (None: the default estimate; 0.02 in ρ = 1/σ).
EQUAL_RTOLS = [1e-2, 5e-3, 2e-3, 1e-3, 5e-4, 2e-4, 5e-5]
EQUAL_ATOL_PER_RTOL = [0.1, 1.0, 10.0]
EQUAL_END_PER_SIGMA_MIN = [0.1, 1.0]
EQUAL_FIRST_STEPS = [None, 0.02]


def one_knob_sweep(tols=QUICK_TOLS) -> list[list[tuple[str, dict]]]:
    """flowdiff's one-knob sweep: one column, rtol = atol = tol over ``tols`` (loose to tight)."""
    return [[(f"tol={t:g}", dict(rtol=t, atol=t)) for t in sorted(tols, reverse=True)]]


def equal_sweep(sigma_min: float, rtols=EQUAL_RTOLS, atol_per_rtol=EQUAL_ATOL_PER_RTOL,
                end_per_sigma_min=EQUAL_END_PER_SIGMA_MIN, first_steps=EQUAL_FIRST_STEPS
                ) -> list[list[tuple[str, dict]]]:
    """flowdiff's sweep of k-diffusion's size, over the documented fields of :class:`flowdiff.Adaptive`.

    One column per (atol/rtol, sigma_end/σ_min, first_step), each a list of (setting, ``Adaptive`` keywords) over
    ``rtols`` from loose to tight, as k-diffusion's sweep has one column per (atol, end σ) over its rtols. A
    ``first_step`` of None is the default (Hairer–Nørsett–Wanner's estimate, one probe evaluation); a number is the
    first step in the solve's time ρ = 1/σ (no probe).
    """
    columns = []
    for ratio in atol_per_rtol:
        for end in end_per_sigma_min:
            for first in first_steps:
                column = []
                for rtol in sorted(rtols, reverse=True):
                    options = dict(rtol=rtol, atol=rtol * ratio, sigma_end=sigma_min * end)
                    if first is not None:
                        options["first_step"] = first
                    setting = (f"rtol={rtol:g}, atol={ratio:g}·rtol, σ_end={end:g}·σ_min, first step "
                               + ("HNW" if first is None else f"{first:g} in ρ"))
                    column.append((setting, options))
                columns.append(column)
    return columns


def run_flowdiff(flow, noise, ref, methods=FLOWDIFF, columns=None, targets=TARGETS, label_suffix="") -> list[dict]:
    """Each method over each column of settings (``one_knob_sweep()`` by default), every column loose to tight
    until a run meets the tightest target (tighter runs cost more and cannot be the fewest)."""
    rows = []
    columns = one_knob_sweep(TOLS) if columns is None else columns
    for solver, options in methods:
        label = solver + ("" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")
        label += label_suffix
        for column in columns:
            for setting, knobs in column:
                start = time.perf_counter()
                with torch.no_grad():
                    r = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options),
                                          adaptive=flowdiff.Adaptive(**knobs))
                print(f"  flowdiff {label} {setting}: {r.stats.nfe} NFE", file=sys.stderr, flush=True)
                rows.append(dict(lib="flowdiff", method=label, setting=setting, nfe=r.stats.nfe,
                                 rmse=rmse(r.x, ref), rejected=r.stats.rejected, wall=time.perf_counter() - start))
                if rows[-1]["rmse"] <= min(targets):
                    break
    return rows


def run_kdiffusion(K, flow, noise, ref, rtols=KD_RTOLS, atols=KD_ATOLS, targets=TARGETS) -> list[dict]:
    rows = []
    lo, hi = flow.schedule.sigma_min, flow.schedule.sigma_max
    x0 = noise * (1 + hi**2) ** 0.5
    for end in (lo, lo / 10):
        for atol in atols:
            for rtol in rtols:  # loose to tight, until the tightest target is met (with or without the denoise)
                model = CountingDenoiser(flow)
                start = time.perf_counter()
                with torch.no_grad():
                    x, info = K.sample_dpm_adaptive(model, x0.clone(), end, hi, rtol=rtol, atol=atol, disable=True,
                                                    return_info=True)
                wall = time.perf_counter() - start
                base = f"rtol={rtol:g}, atol={atol:g}, σ_end={end:.3g}"
                print(f"  k-diffusion {base}: {model.nfe} NFE, {wall:.2f} s", file=sys.stderr, flush=True)
                rows.append(dict(lib="k-diffusion", method="dpm_adaptive", setting=base, nfe=model.nfe,
                                 rmse=rmse(x, ref), rejected=info["n_reject"], wall=wall))
                with torch.no_grad():
                    xd = model(x, torch.full((x.shape[0],), end, dtype=x.dtype))
                rows.append(dict(lib="k-diffusion", method="dpm_adaptive+denoise", setting=base, nfe=model.nfe,
                                 rmse=rmse(xd, ref), rejected=info["n_reject"], wall=wall))
                if min(rows[-1]["rmse"], rows[-2]["rmse"]) <= min(targets):
                    break
    return rows


def fewest(rows: list[dict], target: float) -> dict | None:
    ok = [r for r in rows if r["rmse"] <= target]
    return min(ok, key=lambda r: (r["nfe"], r["rmse"])) if ok else None


def _best(summary: list[tuple], lib: str, target: float, method_ends: str | None = None) -> tuple | None:
    """(NFE, method, run) of the library's fewest evaluations at ``target``, or None when not reached; with
    ``method_ends``, over the methods whose label ends so (and without, over the others)."""
    hits = [(best["nfe"], method, best) for lib_, method, best in summary if lib_ == lib
            and (method_ends is None or method.endswith(method_ends))
            for best in [best.get(target)] if best is not None]
    return min(hits, key=lambda h: h[0]) if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, action="append", help="noise seed (repeatable; default 0)")
    parser.add_argument("--quick", action="store_true", help="fewer methods and settings (about 3 minutes a seed)")
    parser.add_argument("--out", default=None, help="write the markdown section here")
    parser.add_argument("--plot", default=None, help="write a log-log precision-work PNG here (the first seed)")
    parser.add_argument("--models", default="mixture,digits", help="of mixture, patches, digits")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS),
                        help="RMSE targets, comma-separated; every sweep stops at the tightest (e.g. 1e-3 alone for "
                             "the trained model, whose 1e-4 sweeps take long)")
    parser.add_argument("--no-equal", action="store_true",
                        help="skip flowdiff's sweep of k-diffusion's size (unipc(order=3) over rtol × atol/rtol × "
                             "sigma_end × first_step)")
    args = parser.parse_args()
    seeds = args.seed or [0]
    try:
        targets = tuple(sorted((float(t) for t in args.targets.split(",")), reverse=True))
    except ValueError:
        parser.error(f"--targets: expected numbers separated by commas, got {args.targets!r}")
    if not targets or not all(0 < t < 1 for t in targets):
        parser.error(f"--targets: each target must lie in (0, 1), got {args.targets!r}")
    fd_methods, tols = (QUICK_FLOWDIFF, QUICK_TOLS) if args.quick else (FLOWDIFF, TOLS)
    kd_rtols, kd_atols = (QUICK_KD_RTOLS, QUICK_KD_ATOLS) if args.quick else (KD_RTOLS, KD_ATOLS)
    torch.set_num_threads(1)
    K = load_kdiffusion_sampling()
    wanted = args.models.split(",")
    if set(wanted) - {"mixture", "patches", "digits"}:
        parser.error(f"--models: unknown {sorted(set(wanted) - {'mixture', 'patches', 'digits'})}; accepted: "
                     "mixture, patches, digits")
    models = [("closed-form mixture (200 digit images, bandwidth 0.1)", mixture_flow(), "mixture")]
    models = models if "mixture" in wanted else []
    if "patches" in wanted:
        models.append(("closed-form kernel density over 200 grey 16×16 photo patches (bandwidth 0.1)", patch_flow(),
                       "patches"))
    trained = trained_flow() if "digits" in wanted else None
    if trained is not None:
        models.append(("shipped trained model pretrained('digits')", trained, "digits"))
    quick = " --quick" if args.quick else ""
    seed_args = " ".join(f"--seed {s}" for s in seeds)
    said = " and ".join(f"{t:g}" for t in targets)
    extra = (" --no-equal" if args.no_equal else "") + (f" --targets {args.targets}" if targets != TARGETS else "")
    equal = ("" if args.no_equal else
             " flowdiff's sweep of the same size (\"equal\"): `unipc(order=3)` over rtol ∈ "
             f"{{{', '.join(f'{t:g}' for t in EQUAL_RTOLS)}}} × atol/rtol ∈ "
             f"{{{', '.join(f'{t:g}' for t in EQUAL_ATOL_PER_RTOL)}}} × sigma_end/σ_min ∈ "
             f"{{{', '.join(f'{t:g}' for t in EQUAL_END_PER_SIGMA_MIN)}}} × first_step ∈ {{the default estimate, "
             f"{', '.join(f'{t:g}' for t in EQUAL_FIRST_STEPS if t is not None)} in ρ = 1/σ}}; each side's best is "
             "its fewest NFE at the target on this noise.")
    lines = [f"## Adaptive solves: fewest evaluations to RMSE ≤ {said}", "",
             f"`python benchmarks/bench_adaptive.py --batch {args.batch} {seed_args}{quick} --models {args.models}"
             f"{extra}` — "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, float64. "
             "RMSE of the image against a float64 reference (closed-form model: dopri8 at rtol = atol = 1e-10; "
             "trained model: RK4 with 2 substeps between each pair of its 1000 trained σ's, where its field is "
             "smooth); all model calls counted. flowdiff: rtol = atol = tol swept over "
             f"{', '.join(f'{t:g}' for t in tols)}. k-diffusion `sample_dpm_adaptive`: rtol ∈ "
             f"{{{', '.join(f'{t:g}' for t in kd_rtols)}}} × atol ∈ {{{', '.join(f'{t:g}' for t in kd_atols)}}}, "
             "ending at σ_min or σ_min/10, with or without a final denoise (+1 NFE). Each sweep runs loose to "
             f"tight and stops at the first run with RMSE ≤ {min(targets):g}.{equal}", "",
             "| seed | model | target | flowdiff one-knob (best) | NFE | flowdiff equal sweep (best) | NFE | "
             "k-diffusion (best) | NFE | ratio one-knob | ratio equal |",
             "|---:|---|---:|---|---:|---|---:|---|---:|---:|---:|"]
    ratio_at = len(lines)
    if trained is None and "digits" in wanted:
        lines += ["*The shipped trained model's weights were not present when this ran: mixture only.*", ""]
    curves = {}
    ratios = []
    for seed in seeds:
        for title, flow, key in models:
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(args.batch, *noise_shape(key), dtype=torch.float64, generator=gen)
            ref, ref_err, ref_nfe = reference(flow, noise, cache_key=key)
            fd = run_flowdiff(flow, noise, ref, fd_methods, one_knob_sweep(tols), targets)
            if not args.no_equal:
                fd += run_flowdiff(flow, noise, ref, QUICK_FLOWDIFF, equal_sweep(flow.schedule.sigma_min), targets,
                                   label_suffix=" equal sweep")
            kd = run_kdiffusion(K, flow, noise, ref, kd_rtols, kd_atols, targets)
            check = (f"Reference: {ref_nfe} NFE; its self-check (RMS change against the 100× looser, or 2× coarser, "
                     "solve)")
            lines += [f"### {title}, seed {seed}", "", f"{check}: {ref_err:.1e}.", "",
                      "| method | " + " | ".join(f"fewest NFE, RMSE ≤ {t:g} | RMSE there | setting" for t in targets)
                      + " |", "|---" + "|---:|---:|---" * len(targets) + "|"]
            methods = {}
            for r in fd + kd:
                methods.setdefault((r["lib"], r["method"]), []).append(r)
            summary = [(lib, method, {t: fewest(rows, t) for t in targets}) for (lib, method), rows in methods.items()]
            for lib, method, best in sorted(summary, key=lambda s: min([b["nfe"] for b in s[2].values() if b]
                                                                      or [10**9])):
                cells = [f"{b['nfe']} | {b['rmse']:.2e} | {b['setting']}" if b else "not reached | |"
                         for b in best.values()]
                lines.append(f"| {lib} {method} | " + " | ".join(cells) + " |")
            for t in targets:
                one = [(lib, m, b) for lib, m, b in summary if not m.endswith(" equal sweep")]
                bf, bk = _best(one, "flowdiff", t), _best(summary, "k-diffusion", t)
                be = None if args.no_equal else _best(summary, "flowdiff", t, " equal sweep")
                ratio = [f"{b[0] / bk[0]:.2f}" if b and bk else "—" for b in (bf, be)]
                shown = [f"{b[1]}, {b[2]['setting']} | {b[0]}" if b else "not reached | —" for b in (bf, be, bk)]
                if args.no_equal:
                    shown[1], ratio[1] = "not run | —", "—"
                ratios.append(f"| {seed} | {key} | {t:g} | {shown[0]} | {shown[1]} | {shown[2]} | {ratio[0]} | "
                              f"{ratio[1]} |")
                print(f"seed {seed} {key} RMSE ≤ {t:g}: flowdiff one-knob {shown[0]}, equal sweep {shown[1]}, "
                      f"k-diffusion {shown[2]}, ratios {ratio[0]} / {ratio[1]}", flush=True)
            lines += ["", "<details><summary>precision–work points (every run)</summary>", "",
                      "| library | method | setting | NFE | rejected | RMSE | wall (s) |",
                      "|---|---|---|---:|---:|---:|---:|"]
            for r in fd + kd:
                lines.append(f"| {r['lib']} | {r['method']} | {r['setting']} | {r['nfe']} | {r['rejected']} | "
                             f"{r['rmse']:.2e} | {r['wall']:.3f} |")
            lines += ["", "</details>", ""]
            if seed == seeds[0]:
                curves[title] = methods
    lines[ratio_at:ratio_at] = ratios + [""]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 4.8), squeeze=False)
        for ax, (title, methods) in zip(axes[0], curves.items()):
            for (lib, method), rows in methods.items():
                rows = sorted(rows, key=lambda r: r["nfe"])
                ax.loglog([r["nfe"] for r in rows], [r["rmse"] for r in rows], "o-" if lib == "flowdiff" else "x:",
                          ms=3, lw=1, label=f"{lib} {method}")
            for t in targets:
                ax.axhline(t, color="grey", lw=0.8)
            ax.set_xlabel("NFE")
            ax.set_ylabel("RMSE of the image")
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=110)
    print(text)


if __name__ == "__main__":
    main()
