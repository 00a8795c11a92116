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

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_global.py [--model mixture|digits] [--tol 2e-3]
       [--seed 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from _kdiffusion import mixture_flow, per_sample_error, reference, trained_flow, write_report

import flowdiff
import solvers

LONE, CONTRAST = 8, 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tol", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--model", default="mixture", choices=("mixture", "digits"))
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    flow = mixture_flow() if args.model == "mixture" else trained_flow()
    noise = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    ref, _, _ = reference(flow, noise, cache_key=args.model)
    states = []
    with torch.no_grad():
        r = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                              adaptive=flowdiff.Adaptive(rtol=args.tol, atol=args.tol),
                              callback=lambda s: states.append((float(s.sigma), s.xbar.clone(), s.denoised.clone())))
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
               f"--seed {args.seed}")
    lines = [f"`{command}` — {platform.machine()}, torch {torch.__version__}, 1 thread, float64. Model {args.model}, "
             f"seed {args.seed}, adaptive unipc(order=3) at tol {args.tol:g}: {r.stats.nfe} NFE; final error sample "
             f"{LONE} {final[LONE]:.2e}, sample {CONTRAST} {final[CONTRAST]:.2e}, median {final.median():.2e}.", "",
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
