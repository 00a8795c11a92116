"""Can a global error view see the lone sample of seed 3? The error of adaptive ``unipc(order=3)``'s trajectory against
the exact one, state by state, and what the free online signals say about how it grows.

On the closed-form mixture (exact ε at every σ, so the exact trajectory and ∂D/∂x̄ are cheap) or the trained digits
model, seed 3, at one tolerance: every accepted state (σ_k, x̄_k) of the adaptive solve is compared with the exact
trajectory from the same noise at the same σ (mixture: dopri5 in log σ at rtol = atol = 1e-10; trained model: RK4 in
σ on all its trained σ's with 2 substeps an interval, as ``_kdiffusion.reference`` solves it; chained from state to
state), giving the trajectory's error δ_k = x̄_k − x̄(σ_k), measured in x = x̄/√(1+σ²) as each sample's RMS.
A perturbation obeys dδ/dσ = (I − J)·δ/σ with J = ∂D/∂x̄ (D = x̄ − σ·ε, the denoiser), so it grows toward σ = 0
wherever δ·Jδ > |δ|²; for each state the table gives, for the lone sample (8), a well-behaved one (0) and the
batch's median:

* ``|δ|`` — the trajectory's error in x (what a global error estimate has to estimate);
* ``J along δ`` — the Rayleigh quotient δ·Jδ/|δ|² at the exact state (central differences of D, not counted): > 1
  where the flow carries this error outward;
* ``q`` — the gain along the motion, ‖D_k − D_{k−1}‖ / ‖x̄_k − x̄_{k−1}‖ (free: from the accepted states, what the
  ``transport`` and ``global`` variants of ``adaptive_lone_sample_variants.py`` use as J).

Where the evaluations go (issue 26 item 3, engineer B2; also on the photo patches, ``--model patches``): every
step the controller tried is recorded (as ``adaptive_lone_sample.py`` records it) and the solve's evaluations are
split into the start (f at σ_max and the first step's probe), the first step's rejections, accepted and rejected
steps above σ = 1 and in the tail σ ≤ 1, beside the batch's trajectory error at σ ≈ 1 and at the end, and the same
split of k-diffusion's ``sample_dpm_adaptive`` (three evaluations a step tried) with ``--kd RTOL,ATOL,END``.

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_global.py [--model mixture|digits|patches]
       [--tol 2e-3] [--seed 3] [--kd 1e-3,7.8e-3,1] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from _kdiffusion import (
    CountingDenoiser,
    load_kdiffusion_sampling,
    mixture_flow,
    noise_shape,
    patch_flow,
    per_sample_error,
    reference,
    trained_flow,
    write_report,
)
from adaptive_lone_sample import record_solve

import solvers

LONE, CONTRAST = 8, 0


def budget(flow, tried: list[dict], states: list, nfe: int) -> list[str]:
    """Where a unipc solve's evaluations went: one per step tried, the rest at the start (f at σ_max and the first
    step's probe); by region (above σ = 1, the tail σ ≤ 1), accepted or rejected, and the first step's rejections."""
    s_max = flow.schedule.sigma_max
    rho_acc = 1.0 / s_max
    first_rejections = 0
    counts = {("above", True): 0, ("above", False): 0, ("tail", True): 0, ("tail", False): 0}
    rows = []
    # the starting step estimate (Hairer–Nørsett–Wanner) calls the norm three times at ρ₀ itself: not steps
    steps = [t for t in tried if not math.isclose(t["rho1"], rho_acc, rel_tol=1e-12)]
    for t in steps:
        rho0 = t.get("rho0", rho_acc)
        ok = float(t["per"].max()) * t["weight"] <= 1.0
        region = "tail" if 1.0 / rho0 <= 1.0 else "above"
        counts[(region, ok)] += 1
        if not ok and rho_acc == 1.0 / s_max:
            first_rejections += 1
        rows.append(f"{1 / rho0:.3g}→{1 / t['rho1']:.3g}{'' if ok else ' ✗'}")
        if ok:
            rho_acc = t["rho1"]
    start = nfe - len(steps)
    return [f"evaluations: {nfe} = start {start} (f at σ_max, the first step's probe) + first step's rejections "
            f"{first_rejections} + above σ = 1 accepted {counts[('above', True)]}, rejected "
            f"{counts[('above', False)] - first_rejections} + tail σ ≤ 1 accepted {counts[('tail', True)]}, rejected "
            f"{counts[('tail', False)]}; accepted states recorded {len(states)}.", "",
            "steps tried (σ₀→σ₁, ✗ rejected): " + ", ".join(rows), ""]


def kd_budget(flow, noise, ref, rtol: float, atol: float, end: float) -> list[str]:
    """k-diffusion's sample_dpm_adaptive at one setting (``end`` a multiple of σ_min, with its final denoise):
    its evaluations, accepted and rejected steps (three evaluations a step tried), and its error."""
    K = load_kdiffusion_sampling()
    lo, hi = flow.schedule.sigma_min, flow.schedule.sigma_max
    model = CountingDenoiser(flow)
    seen = []
    with torch.no_grad():
        x, info = K.sample_dpm_adaptive(model, noise * (1 + hi**2) ** 0.5, lo * end, hi, rtol=rtol, atol=atol,
                                        disable=True, return_info=True,
                                        callback=lambda d: seen.append((float(d["sigma"]), int(d["n_accept"]))))
        x = model(x, torch.full((x.shape[0],), lo * end, dtype=x.dtype))
    err = per_sample_error(x, ref)
    reached = [s for j, (s, n) in enumerate(seen) if n > (seen[j - 1][1] if j else 0)]  # after each accepted step
    tail = sum(1 for s in reached[:-1] if s <= 1.0)  # accepted steps that start at σ ≤ 1
    return [f"k-diffusion dpm_adaptive rtol {rtol:g}, atol {atol:g}, σ_end {lo * end:.3g} + denoise: {model.nfe} "
            f"NFE, {info['n_accept']} accepted and {info['n_reject']} rejected steps ({tail} of the accepted start at "
            f"σ ≤ 1), batch RMSE {float(err.pow(2).mean().sqrt()):.2e}, median sample "
            f"{float(err.median()):.2e}, worst {float(err.max()):.2e}; its accepted steps reach σ = "
            f"{', '.join(f'{s:.3g}' for s in reached)}.", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--model", default="mixture", choices=("mixture", "digits", "patches"))
    parser.add_argument("--kd", default=None, help="RTOL,ATOL,END: also split k-diffusion's evaluations at this "
                                                   "setting (END a multiple of σ_min)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    flow = {"mixture": mixture_flow, "digits": trained_flow, "patches": patch_flow}[args.model]()
    noise = torch.randn(16, *noise_shape(args.model), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(args.seed))
    ref, _, _ = reference(flow, noise, cache_key=args.model)
    r, tried, recorded = record_solve(flow, noise, args.tol)
    states = [(float(s), xbar, den) for s, _, xbar, den in recorded]
    final = per_sample_error(r.x, ref)
    eps = flow.field()
    s_max = flow.schedule.sigma_max

    def denoise(sigma: float, xbar: torch.Tensor) -> torch.Tensor:
        return xbar - sigma * eps(sigma, xbar)

    nodes = np.sort(np.asarray(flow.schedule.sigmas, dtype=np.float64))  # the trained σ's, ascending

    def exact_to(xbar: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
        """The exact trajectory from (s0, x̄) to σ = s1 < s0."""
        if flow.sigma_field is not None:
            return solvers.solve_adaptive(lambda t, y: eps(t, y), xbar, s0, s1, "dopri5", rtol=1e-10, atol=1e-10,
                                          log_steps=True).y
        inner = nodes[(nodes < s0) & (nodes > s1)][::-1]
        coarse = np.concatenate([[s0], inner, [s1]])
        fine = np.empty(2 * len(coarse) - 1)
        fine[0::2], fine[1::2] = coarse, 0.5 * (coarse[:-1] + coarse[1:])
        return solvers.integrate(lambda t, y: eps(t, y), xbar, "rk4", solvers.FixedGrid(list(fine))).y

    def rms(v: torch.Tensor) -> torch.Tensor:
        return v.reshape(v.shape[0], -1).pow(2).mean(1).sqrt()

    command = (f"cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_global.py --model {args.model} "
               f"--tol {args.tol:g} "
               f"--seed {args.seed}" + ("" if args.kd is None else f" --kd {args.kd}"))
    lines = [f"`{command}` — {platform.machine()}, torch {torch.__version__}, 1 thread, float64. Model {args.model}, "
             f"seed {args.seed}, adaptive unipc(order=3) at tol {args.tol:g}: {r.stats.nfe} NFE; final error sample "
             f"{LONE} {final[LONE]:.2e}, sample {CONTRAST} {final[CONTRAST]:.2e}, median {final.median():.2e}, batch "
             f"RMSE {float(final.pow(2).mean().sqrt()):.2e}, worst sample {float(final.max()):.2e} "
             f"({int(final.argmax())}).", "", *budget(flow, tried, states, r.stats.nfe),
             *([] if args.kd is None else kd_budget(flow, noise, ref, *map(float, args.kd.split(",")))),
             f"| σ_k | \\|δ\\| s{LONE} | s{CONTRAST} | median | J along δ s{LONE} | s{CONTRAST} | median | "
             f"q s{LONE} | s{CONTRAST} | median |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    exact, s_prev = noise * math.sqrt(1.0 + s_max**2), s_max
    prev = None
    for sigma, xbar, den in states:
        if not 0 < sigma < s_max:
            continue
        with torch.no_grad():
            exact = exact_to(exact, s_prev, sigma)
        s_prev = sigma
        delta = xbar - exact
        n = delta.shape[0]
        flat = delta.reshape(n, -1)
        h = 1e-4 * flat.norm(dim=1).clamp_min(1e-30).reshape(n, 1, 1, 1)
        unit = delta / flat.norm(dim=1).clamp_min(1e-300).reshape(n, 1, 1, 1)
        with torch.no_grad():
            jd = (denoise(sigma, exact + h * unit) - denoise(sigma, exact - h * unit)) / (2 * h)
        rayleigh = (jd * unit).reshape(n, -1).sum(1)
        err = rms(delta) / math.sqrt(1.0 + sigma**2)
        if prev is not None:
            q = rms(den - prev[2]) / rms(xbar - prev[1]).clamp_min(1e-300)
        else:
            q = torch.full((n,), float("nan"), dtype=torch.float64)
        prev = (sigma, xbar, den)
        cells = []
        for v in (err, rayleigh, q):
            cells += [f"{float(v[LONE]):.3g}", f"{float(v[CONTRAST]):.3g}", f"{float(v.median()):.3g}"]
        lines.append(f"| {sigma:.4g} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
