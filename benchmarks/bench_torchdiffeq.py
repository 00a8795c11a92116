"""flowdiff's adaptive solves beside torchdiffeq's ``odeint`` on one probability-flow ODE whose answer is exact.

The model is closed-form (``flowdiff.models.analytic.Gaussian``: data N(μ, C) in 64 dimensions, C with eigenvalues
from 0.01 to 1, the linear schedule), so its flow is exact down to σ = 0 and the exact image of each noise is known:
``Gaussian.solution(x̄(σ_max), σ_max, 0)``. Both sides start from the same x̄ = noise·√(1+σ_max²) and solve to σ = 0:

* flowdiff: ``flowdiff.generate(flow, noise, solver=..., adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))``, its
  tolerance on the image's scale, its own choice of time variable, its model calls counted by its driver;
* torchdiffeq: ``odeint(f, x̄, [σ_max, 0], method=..., rtol=tol, atol=tol)`` on flowdiff's field f(σ, x̄) = ε
  (``flow.field()``), as a user writes dx̄/dσ = ε, its tolerance on x̄ (whose scale grows with σ); the calls of f are
  counted here.

Each row: the NFE spent and the RMS error of the image against the exact one, float64, one batch of noise.

Usage: python benchmarks/bench_torchdiffeq.py [--batch 16] [--seed 0] [--tols 1e-2,1e-3,1e-4,1e-5]
"""

from __future__ import annotations

import argparse
import math
import platform

import torch
from torchdiffeq import odeint

import flowdiff
from flowdiff.engine.schedules import Schedule
from flowdiff.models.analytic import Gaussian

METHODS = ("dopri5", "bosh3", "adaptive_heun")


class _Counted:
    """flowdiff's field as torchdiffeq's ``f(t, y)``, t = σ, counting its calls."""

    def __init__(self, field) -> None:  # noqa: ANN001 - flow.field()'s callable
        self.field = field
        self.calls = 0

    def __call__(self, sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.field(float(sigma), x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tols", default="1e-2,1e-3,1e-4,1e-5")
    args = parser.parse_args()
    tols = [float(t) for t in args.tols.split(",")]

    gen = torch.Generator().manual_seed(args.seed)
    dim = 64
    basis, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    evals = torch.logspace(-2, 0, dim, dtype=torch.float64)
    model = Gaussian(0.3 * torch.randn(dim, generator=gen, dtype=torch.float64), basis @ torch.diag(evals) @ basis.T,
                     Schedule.linear())
    flow = model.flow()
    noise = torch.randn(args.batch, dim, generator=gen, dtype=torch.float64)
    sigma_max = flow.schedule.sigma_max
    xbar = noise * math.sqrt(1.0 + sigma_max**2)
    exact = model.solution(xbar, sigma_max, 0.0)
    field = flow.field()

    def rms(x: torch.Tensor) -> float:
        return float((x - exact).pow(2).mean().sqrt())

    print(f"Gaussian in {dim} dimensions (eigenvalues 0.01-1), linear schedule, sigma_max={sigma_max:.4g}, "
          f"batch {args.batch}, seed {args.seed}, float64; torch {torch.__version__}, {platform.processor() or '?'}")
    print("| method | tol | flowdiff NFE | flowdiff RMS error | torchdiffeq NFE | torchdiffeq RMS error |")
    print("|---|---:|---:|---:|---:|---:|")
    for method in METHODS:
        for tol in tols:
            ours = flowdiff.generate(flow, noise, solver=method, adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
            f = _Counted(field)
            theirs = odeint(f, xbar, torch.tensor([sigma_max, 0.0], dtype=torch.float64), method=method,
                            rtol=tol, atol=tol)[-1]
            print(f"| {method} | {tol:g} | {ours.stats.nfe} | {rms(ours.x):.2e} | {f.calls} | {rms(theirs):.2e} |")


if __name__ == "__main__":
    main()
