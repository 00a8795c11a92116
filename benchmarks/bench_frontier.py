"""The low-NFE frontier: flowdiff's tuned grids against diffusers' best schedulers and k-diffusion.

For each model (a closed-form Gaussian mixture on 200 digit images, and the shipped trained
``digits`` model), NFE 4, 5, 6, 8, 10 and 20: the RMS error of the image against a float64
reference from the same noise (:func:`flowdiff.reference_solution`, dopri8; the mixture solved
to σ = 0, the trained model to its smallest trained σ and then its denoised image), side by
side in one process, every model call counted.

* flowdiff, tuned: ``flowdiff.tune`` for each solver of ``TUNED`` on *calibration* noise (seed
  ``--seed + 1``), then measured on the evaluation noise (seed ``--seed``). flowdiff's entry at
  each NFE is the solver whose tuned grid did best **on the calibration noise** — nothing of the
  evaluation noise is used to choose it. The tuning cost (NFE and seconds, reference included)
  is reported.
* flowdiff, untuned: every solver of ``UNTUNED`` on its named grids, best chosen on the
  evaluation noise (for comparison).
* diffusers: every configuration of :func:`flowdiff.tools.peers.diffusers_configs` (DDIM without
  ``clip_sample``, DPM++ 2M and 3M, DEIS and UniPC bh1/bh2 of orders 2 and 3, each with its
  timestep spacings and σ options), run by :func:`flowdiff.tools.peers.run` through the
  scheduler's own loop with ``num_inference_steps`` = NFE (one evaluation a step) — the runner
  ``flowdiff compare --peers diffusers`` uses. Best chosen on the evaluation noise itself, which
  favours it.
* k-diffusion: ``benchmarks/bench_lownfe.py``'s samplers and grids, best chosen on the
  evaluation noise.

Usage: python benchmarks/bench_frontier.py [--batch 64] [--digits-batch 8] [--method dp+search]
[--models mixture,digits] [--out benchmarks/results/frontier.md]
"""

from __future__ import annotations

import argparse
import hashlib
import math
import platform
import time
from pathlib import Path

import torch
from _kdiffusion import mixture_flow, noise_shape, patch_flow, per_sample_error, rmse, trained_flow
from bench_lownfe import run_kdiffusion

import flowdiff
import solvers
from flowdiff.tools import peers
from flowdiff.tools.compare import Reference

BUDGETS = (4, 5, 6, 8, 10, 20)
#: solvers whose grids are tuned, per model (the trained model is slow on one CPU thread: fewer)
TUNED = {"mixture": [("ipndm", {"order": 3}), ("dpmpp_3m", {}), ("unipc", {"order": 2}), ("deis", {})],
         "digits": [("ipndm", {"order": 3}), ("unipc", {"order": 2})]}
TUNED["patches"] = TUNED["mixture"]
UNTUNED = [("euler", {}), ("lms", {}), ("ipndm", {"order": 3}), ("ipndm", {}), ("deis", {}), ("deis", {"order": 2}),
           ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 1}), ("unipc", {"order": 2})]
UNTUNED_GRIDS = [("trailing", {}), ("karras", {}), ("logsnr", {}), ("logsnr", {"power": 0.7})]


def label(solver: str, options: dict) -> str:
    return solver + ("" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")


# ---------------------------------------------------------------------------------------------- diffusers


def run_diffusers(flow, noise: torch.Tensor, ref: torch.Tensor, budget: int) -> list[dict]:
    """Every configuration of :func:`flowdiff.tools.peers.diffusers_configs`, through the scheduler's own loop."""
    rows = []
    for sampler in peers.diffusers_configs():
        label = f"{sampler.name} {sampler.grid}"
        try:
            run = peers.run(sampler, flow, noise, budget)
        except (ValueError, ImportError) as err:  # an option this version or schedule does not take
            rows.append(dict(lib="diffusers", solver=label, grid="", nfe=0, rmse=math.inf, wall=0.0, note=str(err)))
            continue
        if not bool(torch.isfinite(run.x).all()):
            rows.append(dict(lib="diffusers", solver=label, grid="", nfe=run.nfe, rmse=math.inf, wall=run.wall_time))
            continue
        rows.append(dict(lib="diffusers", solver=label, grid="", nfe=run.nfe, rmse=rmse(run.x, ref),
                         wall=run.wall_time, per_sample=per_sample_error(run.x, ref), x=run.x))
    return rows


# ---------------------------------------------------------------------------------------------- flowdiff


def run_untuned(flow, noise, ref, budget: int) -> list[dict]:
    rows = []
    for solver, options in UNTUNED:
        for grid, grid_options in UNTUNED_GRIDS:
            start = time.perf_counter()
            with torch.no_grad():
                r = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options), nfe=budget,
                                      grid=flowdiff.Grid(grid, options=grid_options or {}))
            rows.append(dict(lib="flowdiff", solver=label(solver, options),
                             grid=grid + (f"(power={grid_options['power']})" if grid_options else ""),
                             nfe=r.stats.nfe, rmse=rmse(r.x, ref), wall=time.perf_counter() - start))
    return rows


def run_tuned(flow, calibration, noise, ref, budget: int, key: str, max_evals: int | None,
              select: str, method: str = "dp+search") -> list[dict]:
    rows = []
    for solver, options in TUNED[key]:
        tuned = flowdiff.tune(flow, calibration, solver=solver, nfe=budget, solver_options=options,
                              progress=False, reference_tol=1e-6, select=select, method=method,
                              **({} if method == "dp" else {"max_evals": max_evals}))  # dp runs no search
        with torch.no_grad():
            r = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options), grid=tuned.sigmas)
        rows.append(dict(lib="flowdiff", solver=label(solver, options), grid="tuned", nfe=r.stats.nfe,
                         rmse=rmse(r.x, ref), cal=tuned.calibration_error, start=tuned.initial_grid,
                         start_cal=tuned.initial_error, cost_nfe=tuned.tuning_nfe, cost_s=tuned.tuning_seconds,
                         ref_nfe=tuned.reference_nfe, sigmas=tuned.sigmas))
    return rows


def evaluation_reference(flow, noise: torch.Tensor, key: str, tol: float) -> Reference:
    """A float64 reference kept on disk (keyed by model, noise and tolerance) across runs."""
    digest = flowdiff.flow_fingerprint(flow)[:12] + "-" + hashlib.sha256(noise.numpy().tobytes()).hexdigest()[:12]
    path = Path("/tmp/flowdiff_bench_cache") / f"frontier-{key}-{digest}-{tol:g}.safetensors"
    tag = f"{key}|{tol!r}|{tuple(noise.shape)}"
    if path.exists():
        ref = Reference.load(path, tag)
        if ref is not None:
            return ref
    ref = flowdiff.reference_solution(flow, noise, rtol=tol, atol=tol, cache=False,
                                      sigma_end=0.0 if flow.sigma_field is not None else None)
    ref.save(path, tag)
    return ref


# ---------------------------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), dpi=120, squeeze=False)
    for ax, (title, per_budget) in zip(axes[0], results.items()):
        budgets = sorted(per_budget)
        for key, style, name in [("tuned", "o-", "flowdiff, tuned grid (held-out noise)"),
                                 ("untuned", "s--", "flowdiff, named grids (best on eval. noise)"),
                                 ("diffusers", "^-", "diffusers, best config (on eval. noise)"),
                                 ("kdiff", "v-", "k-diffusion, best (on eval. noise)")]:
            ys = [per_budget[b][key]["rmse"] for b in budgets]
            ax.plot(budgets, ys, style, label=name, markersize=4)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("model evaluations (NFE)")
        ax.set_ylabel("RMSE vs float64 reference")
        ax.set_title(title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(rows: list[dict]) -> list[str]:
    out = ["| library | solver | grid | NFE | RMSE |", "|---|---|---|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["rmse"]):
        out.append(f"| {r['lib']} | {r['solver']} | {r['grid']} | {r['nfe']} | {r['rmse']:.3e} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="evaluation batch of the mixture (default 128)")
    parser.add_argument("--digits-batch", type=int, default=8, help="evaluation batch of the trained model")
    parser.add_argument("--calibration", type=int, default=128, help="calibration batch of the mixture")
    parser.add_argument("--digits-calibration", type=int, default=8, help="calibration batch of the trained model")
    parser.add_argument("--max-evals", type=int, default=150,
                        help="cap on candidate solves per tuned grid of the mixture (default 150)")
    parser.add_argument("--digits-max-evals", type=int, default=60,
                        help="cap on candidate solves per tuned grid of the trained model (default 60)")
    parser.add_argument("--select", choices=("validation", "pooled"), default="validation",
                        help="which improving grid flowdiff.tune keeps (default validation, the library default)")
    parser.add_argument("--method", choices=("search", "dp", "dp+search"), default="dp+search",
                        help="flowdiff.tune's method (default dp+search: the DP grid among the search's starts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--nfe", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--models", default="mixture,digits", help="of mixture, patches, digits")
    parser.add_argument("--out", default=None, help="write the markdown here (and the plot next to it, .png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = [int(b) for b in args.nfe.split(",")]
    K = peers.load_kdiffusion()
    models = []
    wanted = args.models.split(",")
    if set(wanted) - {"mixture", "patches", "digits"}:
        parser.error(f"--models: unknown {sorted(set(wanted) - {'mixture', 'patches', 'digits'})}; accepted: "
                     "mixture, patches, digits")
    if "mixture" in wanted:
        models.append(("closed-form mixture (200 digit images, bandwidth 0.1)", mixture_flow(), "mixture",
                       args.batch, args.calibration, args.max_evals))
    if "patches" in wanted:  # the mixture's settings, on 200 grey 16×16 photo patches
        models.append(("closed-form kernel density over 200 grey 16×16 photo patches (bandwidth 0.1)", patch_flow(),
                       "patches", args.batch, args.calibration, args.max_evals))
    trained = trained_flow() if "digits" in wanted else None
    if trained is not None:
        models.append(("shipped trained model pretrained('digits')", trained, "digits", args.digits_batch,
                       args.digits_calibration, args.digits_max_evals))
    started = time.perf_counter()
    lines = ["## The low-NFE frontier: tuned grids against diffusers and k-diffusion", "",
             f"`python benchmarks/bench_frontier.py --batch {args.batch} --digits-batch {args.digits_batch} "
             f"--calibration {args.calibration} --digits-calibration {args.digits_calibration} "
             f"--max-evals {args.max_evals} --digits-max-evals {args.digits_max_evals} --select {args.select} "
             f"--method {args.method} --models {args.models} "
             f"--seed {args.seed}` — "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, float64. "
             "RMSE of the image against a float64 dopri8 reference (rtol = atol = 1e-8 for the mixture, 1e-7 for the "
             "trained model) from the same noise. "
             "flowdiff's tuned grids are tuned on calibration noise (seed + 1) and measured on the evaluation "
             "noise (seed); flowdiff's tuned entry is the solver whose tuned grid did best on the calibration "
             "noise. The peers' best configuration is chosen on the evaluation noise itself.", ""]
    results = {}
    for title, flow, key, batch, cal_batch, max_evals in models:
        noise = torch.randn(batch, *noise_shape(key), dtype=torch.float64,
                            generator=torch.Generator().manual_seed(args.seed))
        calibration = torch.randn(cal_batch, *noise_shape(key), dtype=torch.float64,
                                  generator=torch.Generator().manual_seed(args.seed + 1))
        ref = evaluation_reference(flow, noise, key, 1e-7 if key == "digits" else 1e-8)
        lines += [f"### {title}", "", f"Evaluation batch {batch}, calibration batch {cal_batch}. Reference: "
                  f"{ref.nfe} NFE, estimated error {ref.error:.1e}.", "",
                  "| NFE | flowdiff tuned (chosen on calibration) | RMSE | tuning cost | best diffusers | RMSE | "
                  "best k-diffusion | RMSE | best flowdiff named grid | RMSE | tuned / best peer |",
                  "|---:|---|---:|---:|---|---:|---|---:|---|---:|---:|"]
        details, per_budget = [], {}
        for budget in budgets:
            tuned = run_tuned(flow, calibration, noise, ref.x, budget, key, max_evals, args.select, args.method)
            untuned = run_untuned(flow, noise, ref.x, budget)
            dif = run_diffusers(flow, noise, ref.x, budget)
            kd = run_kdiffusion(K, flow, noise, ref.x, budget)
            for r in kd:
                r["lib"] = "k-diffusion"
            ok = [r for r in dif if math.isfinite(r["rmse"])]
            assert all(r["nfe"] <= budget for r in tuned + untuned + ok + kd), "a run exceeded its budget"
            pick = min(tuned, key=lambda r: r["cal"])
            best = {"tuned": pick, "untuned": min(untuned, key=lambda r: r["rmse"]),
                    "diffusers": min(ok, key=lambda r: r["rmse"]), "kdiff": min(kd, key=lambda r: r["rmse"])}
            per_budget[budget] = best
            peer = min(best["diffusers"]["rmse"], best["kdiff"]["rmse"])
            cost_nfe = sum(r["cost_nfe"] - r["ref_nfe"] for r in tuned) + tuned[0]["ref_nfe"]
            cost_s = sum(r["cost_s"] for r in tuned)
            lines.append(
                f"| {budget} | {pick['solver']} | {pick['rmse']:.3e} | {cost_nfe} NFE, {cost_s:.0f} s "
                f"({len(tuned)} solvers) | {best['diffusers']['solver']} | {best['diffusers']['rmse']:.3e} | "
                f"{best['kdiff']['solver']} on {best['kdiff']['grid']} | {best['kdiff']['rmse']:.3e} | "
                f"{best['untuned']['solver']} on {best['untuned']['grid']} | {best['untuned']['rmse']:.3e} | "
                f"{pick['rmse'] / peer:.2f}× |")
            tuned_lines = ["| solver | RMSE (evaluation) | RMSE (calibration) | start grid | its RMSE (calibration) "
                           "| tuning NFE | s | σ |", "|---|---:|---:|---|---:|---:|---:|---|"]
            for r in tuned:
                tuned_lines.append(f"| {r['solver']} | {r['rmse']:.3e} | {r['cal']:.3e} | {r['start']} | "
                                   f"{r['start_cal']:.3e} | {r['cost_nfe']} | {r['cost_s']:.1f} | "
                                   + ", ".join(f"{s:.3g}" for s in r["sigmas"]) + " |")
            details += [f"<details><summary>NFE {budget}: tuned grids, and every run</summary>", "", *tuned_lines,
                        "", *table(tuned + untuned + ok + kd), "", "</details>", ""]
            print(f"{key} NFE {budget}: tuned {pick['solver']} {pick['rmse']:.3e}  diffusers "
                  f"{best['diffusers']['solver']} {best['diffusers']['rmse']:.3e}  k-diffusion "
                  f"{best['kdiff']['solver']}/{best['kdiff']['grid']} {best['kdiff']['rmse']:.3e}  "
                  f"[{time.perf_counter() - started:.0f} s]", flush=True)
        results[title] = per_budget
        lines += [""] + details
    lines.append(f"Total wall time {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        plot(results, out.with_suffix(".png"))
    print(text)


if __name__ == "__main__":
    main()
