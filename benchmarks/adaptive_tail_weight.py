"""What the tail's corrector share (``flowdiff.api.adaptive.corrector_share``) costs in accuracy per tolerance.

Adaptive ``unipc`` generations of 256 noises on closed-form Gaussian mixtures (4 modes in 8 dimensions, bandwidths
0.4 / 0.1 / 0.05) at rtol = atol = tol, as flowdiff runs them and with the weight replaced by 1 (the tail's warp
kept), against a float64 reference at 1e-10: the batch RMSE over tol, the worst sample's RMS error over tol, and the
NFE; and the Gaussian test model's largest RMS error / tol (the README's stated range). The weight assumes
∂D/∂x̄ ≈ I; between two modes ∂D/∂x̄ = Cov[x₀ | x̄]/σ² is larger.

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_tail_weight.py
"""

from __future__ import annotations

import math
import platform
import time

import torch

import flowdiff
import flowdiff.api.adaptive as adaptive
from flowdiff.models.analytic import Gaussian, Mixture

TOLS = (1e-2, 1e-3, 1e-4, 1e-5)


def main() -> None:
    torch.set_num_threads(1)
    started = time.perf_counter()
    share = adaptive.corrector_share
    header = " | ".join(f"tol {t:g}: RMSE/tol, worst/tol, NFE" for t in TOLS)
    lines = [f"| bandwidth | corrector share | {header} |", "|---:|---|" + "---:|" * len(TOLS)]
    for bandwidth, seed in ((0.4, 3), (0.1, 3), (0.05, 4)):
        centres = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        flow = Mixture(centres, bandwidth=bandwidth).flow()
        noise = torch.randn(256, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
        ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, rtol=1e-10, atol=1e-10).x
        for label, weight in (("√(1 − ρ₀/ρ₁) (as shipped)", share), ("1 (not weighted)", None)):
            adaptive.corrector_share = share if weight is not None else (lambda rho_from: (lambda r0, r1: 1.0))
            cells = []
            for tol in TOLS:
                r = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
                per = (r.x - ref).pow(2).mean(1).sqrt()
                cells.append(f"{float(per.pow(2).mean().sqrt()) / tol:.2f}, {float(per.max()) / tol:.1f}, "
                             f"{r.stats.nfe}")
            lines.append(f"| {bandwidth:g} | {label} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    gauss_tols = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    lines += ["", "The Gaussian test model of tests/test_adaptive.py (its draw, seed 0, and seeds 1-5; 4 noises each): "
              "the largest RMS error / tol over the six draws.", "",
              "| corrector share | " + " | ".join(f"tol {t:g}" for t in gauss_tols) + " |",
              "|---|" + "---:|" * len(gauss_tols)]
    for label, weight in (("√(1 − ρ₀/ρ₁) (as shipped)", share), ("1 (not weighted)", None)):
        adaptive.corrector_share = share if weight is not None else (lambda rho_from: (lambda r0, r1: 1.0))
        worst = [0.0] * len(gauss_tols)
        for seed in range(6):
            g = torch.Generator().manual_seed(seed)
            mean = torch.randn(32, dtype=torch.float64, generator=g) * 0.5
            var = torch.rand(32, dtype=torch.float64, generator=g) * 0.3 + 0.02
            gauss = Gaussian(mean, var)
            noise = torch.randn(4, 32, dtype=torch.float64, generator=g)
            flow = gauss.flow()
            s_max = flow.schedule.sigma_max
            exact = gauss.solution(noise * math.sqrt(1 + s_max**2), s_max, 0.0)
            for i, tol in enumerate(gauss_tols):
                r = flowdiff.generate(flow, noise, solver="unipc", adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
                worst[i] = max(worst[i], float((r.x - exact).pow(2).mean().sqrt()) / tol)
        lines.append(f"| {label} | " + " | ".join(f"{w:.2f}" for w in worst) + " |")
    adaptive.corrector_share = share
    machine = platform.processor() or platform.machine()
    print(f"\n`cd benchmarks; PYTHONPATH=.. python adaptive_tail_weight.py` — {machine}, torch {torch.__version__}, "
          f"1 thread, float64; {time.perf_counter() - started:.0f} s.\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
