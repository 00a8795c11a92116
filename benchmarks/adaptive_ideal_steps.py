"""Accepted steps against the ideal, a posteriori: how far adaptive ``unipc(order=3)``'s error estimate is from the
step's true local error, and so how much longer each step could have been, by σ region.

On a closed-form model (exact ε at every σ), for one seed and tolerance, every accepted step σ_k → σ_{k+1} of the
solve is compared with the exact flow from the same state: its true local error e = x̄_{k+1} − Φ(σ_k → σ_{k+1}) x̄_k
(Φ: dopri5 in log σ at rtol = atol = 1e-10) is measured in the solve's own norm (each sample's RMS of e_x /
(atol + rtol·|x_{k+1}|) in x = x̄/√(1+σ²), the worst sample deciding), giving r_true, beside the ratio r_est the
controller judged the step by (its estimate in the same norm, times the tail's corrector share where it applies).
A step's local error grows like h⁴ for this pair (order 3), so the longest step that would have kept the true local
error at the tolerance is about h·r_true^(−1/4): the "ideal" factor. Reported per σ region: accepted steps, the
evaluations spent there (accepted and rejected), and the medians (and range) of r_est, r_true, r_true/r_est and of
the ideal factor; and every step's row. A factor near 1 means the controller's steps were as long as the local error
allows and no better estimate can save evaluations there (only a different tolerance split between regions can);
a factor of 2 means half the steps would have done, for that region's local error.

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_ideal_steps.py [--model patches|mixture] [--seed 4] [--tol 1e-3]
       [--out FILE]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch
from _kdiffusion import mixture_flow, noise_shape, patch_flow, per_sample_error, reference, write_report
from adaptive_lone_sample import record_solve

import solvers

#: σ regions (upper bounds, descending): the first step's region, the middle, the tail above σ_min, the end
REGIONS = ((math.inf, 10.0), (10.0, 1.0), (1.0, 0.1), (0.1, 0.0))
#: the exponent that turns an error ratio into a step factor: local error ∝ h^(order + 1) for unipc(order=3)
ORDER = 3


def judged(tried: list[dict], s_max: float) -> list[tuple[float, float, float, bool]]:
    """(σ₀, σ₁, r_est as judged, accepted) of each step tried, in order; the starting step estimate's own norm calls
    (at ρ₀ = 1/σ_max itself) are left out, as ``adaptive_lone_sample_global.budget`` leaves them."""
    rho_acc, out = 1.0 / s_max, []
    for t in tried:
        if math.isclose(t["rho1"], 1.0 / s_max, rel_tol=1e-12):
            continue
        rho0 = t.get("rho0", rho_acc)
        r = float(t["per"].max()) * t["weight"]
        out.append((1.0 / rho0, 1.0 / t["rho1"], r, r <= 1.0))
        if r <= 1.0:
            rho_acc = t["rho1"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="patches", choices=("patches", "mixture"))
    parser.add_argument("--seed", type=int, default=4)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    flow = {"mixture": mixture_flow, "patches": patch_flow}[args.model]()
    noise = torch.randn(16, *noise_shape(args.model), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(args.seed))
    ref, _, _ = reference(flow, noise, cache_key=args.model)
    r, tried, recorded = record_solve(flow, noise, args.tol)
    eps = flow.field()
    s_max = flow.schedule.sigma_max
    tol = args.tol
    tries = judged(tried, s_max)
    estimates = {s1: r for _, s1, r, ok in tries if ok}

    def norm_of(e: torch.Tensor, xbar1: torch.Tensor, sigma1: float) -> float:
        a = 1.0 / math.sqrt(1.0 + sigma1**2)
        ratio = (e * a).abs() / ((xbar1 * a).abs() * tol + tol)
        return float(ratio.pow(2).reshape(ratio.shape[0], -1).mean(1).sqrt().max())

    states = [(s_max, noise * math.sqrt(1.0 + s_max**2))] + [(float(s), xbar) for s, _, xbar, _ in recorded]
    steps = []
    for (s0, x0), (s1, x1) in zip(states, states[1:]):
        if not 0 < s1 < s0:
            continue
        with torch.no_grad():
            exact = solvers.solve_adaptive(lambda t, y: eps(t, y), x0, s0, s1, "dopri5", rtol=1e-10, atol=1e-10,
                                           log_steps=True).y
        r_true = norm_of(x1 - exact, x1, s1)
        near = [v for k, v in estimates.items() if math.isclose(k, s1, rel_tol=1e-9)]
        r_est = near[0] if near else float("nan")
        steps.append((s0, s1, r_est, r_true, r_true ** (-1.0 / (ORDER + 1)) if r_true > 0 else float("inf")))
    final = per_sample_error(r.x, ref)
    lines = [f"`cd benchmarks; PYTHONPATH=.. python adaptive_ideal_steps.py --model {args.model} --seed {args.seed} "
             f"--tol {tol:g}` — {platform.machine()}, torch {torch.__version__}, 1 thread, float64. Adaptive "
             f"unipc(order=3), rtol = atol = {tol:g}: {r.stats.nfe} NFE ({r.stats.rejected} rejected), batch RMSE "
             f"{float(final.pow(2).mean().sqrt()):.2e}, worst sample {float(final.max()):.2e}; {len(steps)} accepted "
             "steps above σ = 0 compared with the exact flow from the same state.", "",
             "| σ region | accepted steps | rejected tries | r_est median (range) | r_true median (range) | "
             "r_true / r_est median (range) | ideal step factor r_true^(−1/4) median (range) |",
             "|---|---:|---:|---|---|---|---|"]

    def cell(v: list[float]) -> str:
        return "—" if not v else f"{np.median(v):.3g} ({min(v):.3g}–{max(v):.3g})"

    for hi, lo in REGIONS:
        inside = [s for s in steps if hi >= s[0] > lo]
        rejected = sum(1 for s0, _, _, ok in tries if not ok and hi >= s0 > lo)
        name = f"σ₀ ∈ ({lo:g}, {'σ_max' if hi == math.inf else f'{hi:g}'}]"
        lines.append(f"| {name} | {len(inside)} | {rejected} | {cell([s[2] for s in inside])} | "
                     f"{cell([s[3] for s in inside])} | {cell([s[3] / s[2] for s in inside if s[2] > 0])} | "
                     f"{cell([s[4] for s in inside])} |")
    lines += ["", "| σ₀ → σ₁ | r_est | r_true | ideal factor |", "|---|---:|---:|---:|"]
    lines += [f"| {s0:.4g} → {s1:.4g} | {re:.3g} | {rt:.3g} | {f:.3g} |" for s0, s1, re, rt, f in steps]
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
