"""Fixed-NFE accuracy: flowdiff's solvers and grids against k-diffusion's deterministic samplers.

For each model (a closed-form Gaussian mixture on digit images, and the shipped trained
``digits`` model when its weights are present), one batch of noise, and NFE budgets 10 and
20: the RMS error of the image against a tight float64 reference (dopri8 in log(σ + c),
rtol = atol = 1e-10), side by side in one process, every model call counted.

k-diffusion: euler, heun, lms, dpmpp_2m on its karras, exponential and the model's own
(DiscreteSchedule.get_sigmas) grids, and dpm_fast (its own log-SNR steps; it stops at σ_min,
so it is also tried with one evaluation less plus a final denoise), each with at most the
budget's evaluations. flowdiff: its one-evaluation-per-step solvers (and heun) on its grids
with ``nfe=`` the budget.

Usage: python benchmarks/bench_lownfe.py [--batch 16] [--out benchmarks/results/lownfe.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch
from _kdiffusion import (
    CountingDenoiser,
    load_kdiffusion_sampling,
    mixture_flow,
    model_grid,
    per_sample_error,
    reference,
    rmse,
    trained_flow,
    write_report,
)

import flowdiff
import solvers

BUDGETS = (10, 20)
FLOWDIFF_SOLVERS = [("euler", {}), ("heun", {}), ("lms", {}), ("ipndm", {}), ("ipndm", {"order": 3}),
                    ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 1}), ("unipc", {"order": 2}),
                    ("unipc", {"order": 3})]
FLOWDIFF_GRIDS = [("trailing", {}), ("karras", {}), ("logsnr", {}), ("logsnr", {"power": 0.7})]
KD_GRIDS = ("karras", "exponential", "model")


def kd_grid(K, flow, name: str, n: int) -> torch.Tensor:
    lo, hi = flow.schedule.sigma_min, flow.schedule.sigma_max
    if name == "karras":
        return K.get_sigmas_karras(n, lo, hi).double()
    if name == "exponential":
        return K.get_sigmas_exponential(n, lo, hi).double()
    return model_grid(flow, n)


def run_kdiffusion(K, flow, noise: torch.Tensor, ref: torch.Tensor, budget: int) -> list[dict]:
    rows = []
    hi = flow.schedule.sigma_max
    x0 = noise * math.sqrt(1 + hi**2)  # k-diffusion's x at σ_max is flowdiff's x̄
    samplers = {"euler": (K.sample_euler, budget), "heun": (K.sample_heun, (budget + 1) // 2),
                "lms": (K.sample_lms, budget), "dpmpp_2m": (K.sample_dpmpp_2m, budget)}
    for name, (fn, steps) in samplers.items():
        for grid in KD_GRIDS:
            model = CountingDenoiser(flow)
            start = time.perf_counter()
            with torch.no_grad():
                x = fn(model, x0.clone(), kd_grid(K, flow, grid, steps), disable=True)
            rows.append(dict(lib="k-diffusion", solver=name, grid=grid, nfe=model.nfe, rmse=rmse(x, ref),
                             wall=time.perf_counter() - start, per_sample=per_sample_error(x, ref), x=x))
    lo = flow.schedule.sigma_min
    for denoise in (False, True):
        model = CountingDenoiser(flow)
        start = time.perf_counter()
        with torch.no_grad():
            x = K.sample_dpm_fast(model, x0.clone(), lo, hi, budget - int(denoise), disable=True)
            if denoise:
                x = model(x, torch.full((x.shape[0],), lo, dtype=x.dtype))
        rows.append(dict(lib="k-diffusion", solver="dpm_fast" + ("+denoise" if denoise else ""), grid="own",
                         nfe=model.nfe, rmse=rmse(x, ref), wall=time.perf_counter() - start,
                         per_sample=per_sample_error(x, ref), x=x))
    return rows


def run_flowdiff(flow, noise: torch.Tensor, ref: torch.Tensor, budget: int) -> list[dict]:
    rows = []
    for solver, options in FLOWDIFF_SOLVERS:
        for grid, grid_options in FLOWDIFF_GRIDS:
            start = time.perf_counter()
            with torch.no_grad():
                r = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options), nfe=budget,
                                      grid=flowdiff.Grid(grid, options=grid_options or {}))
            label = solver + ("" if not options else "(" + ",".join(f"{k}={v}" for k, v in options.items()) + ")")
            grid_label = grid + ("" if not grid_options else f"(power={grid_options['power']})")
            rows.append(dict(lib="flowdiff", solver=label, grid=grid_label, nfe=r.stats.nfe, rmse=rmse(r.x, ref),
                             wall=time.perf_counter() - start))
    return rows


def table(rows: list[dict]) -> list[str]:
    out = ["| library | solver | grid | NFE | RMSE | wall (s) |", "|---|---|---|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["rmse"]):
        out.append(f"| {r['lib']} | {r['solver']} | {r['grid']} | {r['nfe']} | {r['rmse']:.3e} | {r['wall']:.3f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the markdown section here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    K = load_kdiffusion_sampling()
    models = [("closed-form mixture (200 digit images, bandwidth 0.1)", mixture_flow(), "mixture")]
    trained = trained_flow()
    if trained is not None:
        models.append(("shipped trained model pretrained('digits')", trained, "digits"))
    lines = ["## Low-NFE solvers against k-diffusion (fixed NFE)", "",
             f"`python benchmarks/bench_lownfe.py --batch {args.batch} --seed {args.seed}` — "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, float64. "
             "RMSE of the image (σ = 0) against a float64 reference (closed-form model: dopri8 at rtol = atol = "
             "1e-10; trained model: RK4 with 2 substeps between each pair of its 1000 trained σ's, where its field "
             "is smooth); all model calls counted.", ""]
    if trained is None:
        lines += ["*The shipped trained model's weights were not present when this ran: mixture only.*", ""]
    for title, flow, key in models:
        gen = torch.Generator().manual_seed(args.seed)
        noise = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64, generator=gen)
        ref, ref_err, ref_nfe = reference(flow, noise, cache_key=key)
        check = f"Reference: {ref_nfe} NFE; its self-check (RMS change against the 100× looser, or 2× coarser, solve)"
        lines += [f"### {title}", "", f"{check}: {ref_err:.1e}.", ""]
        summary = ["| NFE | best flowdiff | RMSE | best k-diffusion | RMSE | ratio |", "|---:|---|---:|---|---:|---:|"]
        details = []
        for budget in BUDGETS:
            kd = run_kdiffusion(K, flow, noise, ref, budget)
            fd = run_flowdiff(flow, noise, ref, budget)
            assert all(r["nfe"] <= budget for r in kd + fd), "a run exceeded its budget"
            bf, bk = min(fd, key=lambda r: r["rmse"]), min(kd, key=lambda r: r["rmse"])
            summary.append(f"| {budget} | {bf['solver']} on {bf['grid']} | {bf['rmse']:.3e} | {bk['solver']} on "
                           f"{bk['grid']} | {bk['rmse']:.3e} | {bk['rmse'] / bf['rmse']:.2f}× |")
            details += [f"<details><summary>all runs at NFE {budget}</summary>", "", *table(kd + fd), "",
                        "</details>", ""]
            print(f"{title} NFE {budget}: flowdiff {bf['solver']}/{bf['grid']} {bf['rmse']:.3e}  "
                  f"k-diffusion {bk['solver']}/{bk['grid']} {bk['rmse']:.3e}", flush=True)
        lines += summary + [""] + details
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
