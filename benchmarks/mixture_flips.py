"""Which evaluation samples of the closed-form mixture land on another training image, and how sensitive they are.

The mixture (``_kdiffusion.mixture_flow``: 200 digit images, bandwidth 0.1) nearly memorises its centres: a sample
of the probability-flow ODE ends within ~0.1 (per-pixel RMS) of one training image, and a solver whose error
carries it across the boundary between two basins ends ~0.2–0.7 off. This script measures, on ``--batch``
evaluation samples (seed ``--seed``, the noise of ``bench_learned.py --batch``):

1. How many samples a fixed solver (``--solver`` on its default ``trailing`` grid, and on ``logsnr``) lands on
   another training image than the float64 reference's, per NFE, and their share of the squared error.
2. For the samples ``--solver`` misses at ``--nfe`` (at most ``--max-samples``):

   * the **decision σ** of the reference trajectory: the smallest σ at which the mixture's posterior over its
     components at x̄(σ) (x̄ | j ~ N(c_j, (h² + σ²) I)) still prefers another component than the one it lands on —
     below it the reference is committed (0 where it prefers that one all along);
   * the **lost step**: the first node σ_k of the solver's grid from which the exact continuation of the solver's
     own state (a tight solve to σ = 0) lands on the wrong image, the solver's error there (RMS of x = x̄/√(1+σ²)
     against the reference trajectory), and the **critical error**: the smallest multiple α of that error
     (bisection on x_ref(σ_k) + α·(x_k − x_ref(σ_k))) whose continuation flips;
   * the **noise margin**: the smallest per-pixel RMS change of the initial noise that flips the reference, along
     the gradient of the basin margin ‖x − c_B‖² − ‖x − c_A‖² (autograd through a 400-evaluation ``rk4`` solve;
     the distance confirmed by bisection with tight solves).

Tight solves are scipy's DOP853 in σ at rtol = atol = ``--tol`` on one sample at a time, checked against the
cached float64 reference of ``bench_frontier.evaluation_reference``.

Usage: python benchmarks/mixture_flips.py [--batch 1024] [--seed 0] [--solver unipc] [--nfe 20]
[--max-samples 8] [--out benchmarks/results/mixture_flips.md]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from _kdiffusion import mixture_centres, mixture_flow, per_sample_error
from _pooled import nearest
from bench_frontier import evaluation_reference
from scipy.integrate import solve_ivp

import flowdiff

BANDWIDTH = 0.1


def tight(field, xbar: np.ndarray, sigma_from: float, sigma_to: float, tol: float, dense: bool = False):
    """x̄ at ``sigma_to`` from x̄ = ``xbar`` (one sample, flattened) at ``sigma_from``: DOP853 on dx̄/dσ = ε(σ, x̄)."""
    shape = (1, 1, 8, 8)

    def rhs(sigma, y):
        with torch.no_grad():
            return field(float(sigma), torch.from_numpy(y).reshape(shape)).reshape(-1).numpy()

    sol = solve_ivp(rhs, (sigma_from, sigma_to), xbar, method="DOP853", rtol=tol, atol=tol, dense_output=dense)
    if not sol.success:
        raise RuntimeError(f"tight solve failed: {sol.message}")
    return sol if dense else sol.y[:, -1]


def landing(xbar0: np.ndarray, centres: torch.Tensor) -> int:
    return int(nearest(torch.from_numpy(xbar0).reshape(1, 1, 8, 8), centres)[0])


def posterior_decision(sol, sigma_max: float, centres: torch.Tensor, landed: int) -> float:
    """The smallest σ on the reference path where the posterior over components prefers another than ``landed``."""
    sigmas = np.geomspace(sigma_max, 1e-3, 600)
    flat = centres.reshape(centres.shape[0], -1).numpy()
    last = 0.0
    for sigma in sigmas:
        xbar = sol.sol(sigma)
        logits = -((xbar[None] - flat) ** 2).sum(1) / (2 * (BANDWIDTH**2 + sigma**2))
        if int(logits.argmax()) != landed:
            last = sigma
    return last


def noise_margin(flow, field, noise_i: torch.Tensor, centres: torch.Tensor, a: int, b: int, tol: float,
                 sigma_max: float) -> float:
    """The smallest per-pixel RMS change of the noise along the gradient of ‖x − c_b‖² − ‖x − c_a‖² that flips the
    reference's landing from ``a`` to another image (bisected with tight solves; the margin is step-like across the
    boundary, so its linear extrapolation says little and is not used)."""
    z = noise_i.clone().requires_grad_(True)
    x = flowdiff.generate(flow, z, solver="rk4", nfe=400, grid="logsnr").x
    margin = (x - centres[b]).pow(2).sum() - (x - centres[a]).pow(2).sum()
    (grad,) = torch.autograd.grad(margin, z)
    direction = -grad / grad.norm()
    linear = float(margin.detach()) / float(grad.norm())
    scale = math.sqrt(1 + sigma_max**2)

    def flips(step: float) -> bool:
        start = ((noise_i + step * direction) * scale).reshape(-1).numpy()
        return landing(tight(field, start, sigma_max, 0.0, tol), centres) != a

    hi = max(linear, 1e-8)
    while not flips(hi):
        hi *= 2
        if hi > 64:
            return math.nan
    lo = 0.0
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if flips(mid) else (mid, hi)
        if hi - lo < 1e-3 * hi:
            break
    return hi / 8  # |δ| over √64 pixels: per-pixel RMS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solver", default="unipc")
    parser.add_argument("--nfe", type=int, default=20, help="the budget whose missed samples are analysed")
    parser.add_argument("--counts", default="5,10,20,40,80,160", help="budgets of the landing counts")
    parser.add_argument("--max-samples", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-10)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    flow, centres = mixture_flow(), mixture_centres()
    field = flow.field()
    sigma_max = flow.schedule.sigma_max
    noise = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    ref = evaluation_reference(flow, noise, "mixture", 1e-8)
    target = nearest(ref.x, centres)
    lines = ["## Which mixture samples land on another training image (`mixture_flips.py`)", "",
             f"`python benchmarks/mixture_flips.py --batch {args.batch} --seed {args.seed} --solver {args.solver} "
             f"--nfe {args.nfe} --counts {args.counts} --max-samples {args.max_samples} --tol {args.tol:g}` — "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, float64.", "",
             f"### Samples landing on another training image than the reference's ({args.batch} samples)", "",
             "| grid | NFE | on another image | their share of the squared error | RMSE | RMSE without them |",
             "|---|---:|---:|---:|---:|---:|"]
    missed = None
    for grid in ("trailing", "logsnr"):
        for nfe in sorted({*map(int, args.counts.split(",")), args.nfe}):
            with torch.no_grad():
                x = flowdiff.generate(flow, noise, solver=args.solver, nfe=nfe, grid=grid).x
            err = per_sample_error(x, ref.x)
            off = nearest(x, centres) != target
            share = float(err[off].pow(2).sum() / err.pow(2).sum())
            lines.append(f"| {grid} | {nfe} | {int(off.sum())} | {share:.0%} | {float(err.pow(2).mean().sqrt()):.3e} "
                         f"| {float(err[~off].pow(2).mean().sqrt()):.3e} |")
            if grid == "trailing" and nfe == args.nfe:
                missed = off.nonzero().flatten().tolist()
    print("\n".join(lines), flush=True)

    # the solver's states at its own nodes, for every sample
    states: list[tuple[float, torch.Tensor]] = []
    with torch.no_grad():
        solve = flowdiff.generate(flow, noise, solver=args.solver, nfe=args.nfe,
                                  callback=lambda s: states.append((s.sigma, s.x.clone())))
    nodes = [(sigma_max, noise)] + states
    lines += ["", f"### The samples `{args.solver}` on `trailing` misses at NFE {args.nfe} "
              f"({len(missed)}; the first {min(len(missed), args.max_samples)} analysed)", "",
              "Decision σ: below it the posterior over components at the reference's x̄(σ) prefers the image it lands "
              "on. Lost at: the first node of the solver's grid from which the tight continuation of its own state "
              "lands elsewhere; error there: RMS of x = x̄/√(1+σ²) against the reference path; critical error: the "
              "smallest part of that error (same direction) whose continuation flips. Noise margin: the smallest "
              "per-pixel RMS change of the initial noise that flips the reference, along the gradient of the basin "
              "margin (bisected with tight solves): an upper bound of the smallest.", "",
              "| sample | per-sample error | reference lands on → solver on | decision σ | lost at σ | solver's error "
              "there | critical error there | noise margin |", "|---:|---:|---|---:|---:|---:|---:|---:|"]
    checks = []
    for i in missed[: args.max_samples]:
        start = (noise[i] * math.sqrt(1 + sigma_max**2)).reshape(-1).numpy()
        sol = tight(field, start, sigma_max, 0.0, args.tol, dense=True)
        a = landing(sol.y[:, -1], centres)
        checks.append(float(np.sqrt(np.mean((sol.y[:, -1] - ref.x[i].reshape(-1).numpy()) ** 2))))
        b = int(nearest(solve.x[i : i + 1], centres)[0])
        decision = posterior_decision(sol, sigma_max, centres, a)
        lost = None
        for sigma, x in nodes[1:]:
            if sigma <= 0:
                break
            scale = math.sqrt(1 + sigma**2)
            x_ref = sol.sol(sigma) / scale
            x_k = x[i].reshape(-1).numpy()
            if landing(tight(field, x_k * scale, sigma, 0.0, args.tol), centres) != a:
                lost = (sigma, x_ref, x_k, scale)
                break
        cell_lost = cell_err = cell_crit = "—"
        if lost is not None:
            sigma, x_ref, x_k, scale = lost
            gap = x_k - x_ref
            lo, hi = 0.0, 1.0
            for _ in range(20):
                mid = 0.5 * (lo + hi)
                end = tight(field, (x_ref + mid * gap) * scale, sigma, 0.0, args.tol)
                lo, hi = (lo, mid) if landing(end, centres) != a else (mid, hi)
            size = float(np.sqrt(np.mean(gap**2)))
            cell_lost, cell_err, cell_crit = f"{sigma:.3g}", f"{size:.2e}", f"{hi * size:.2e} ({hi:.2f}×)"
        margin = noise_margin(flow, field, noise[i : i + 1], centres, a, b, args.tol, sigma_max)
        row = (f"| {i} | {float(per_sample_error(solve.x[i:i + 1], ref.x[i:i + 1])[0]):.3f} | {a} → {b} | "
               f"{decision:.3g} | {cell_lost} | {cell_err} | {cell_crit} | {margin:.2e} |")
        lines.append(row)
        print(row, flush=True)
    lines += ["", f"The tight solves land within {max(checks, default=0):.1e} (RMS) of the cached reference on these "
              f"samples. Total wall time {time.perf_counter() - started:.0f} s.", ""]
    text = "\n".join(lines)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
