"""Sweep 18 (S21): does ``log_likelihood``'s exact-trace error bar cover the exact log-density one image at a time,
on VE (``VESchedule()``, σ_max = 80), flow-matching (``FlowMatchingSchedule(shift=3)``, σ_max = 2997) and VP
(``Schedule.linear()``) closed-form models?

Models (D = 8, seeded): a kernel density of 6 points in [−1, 1]⁸ (``--bandwidth``) and a Gaussian with a full
covariance, each with the prior stated as its mean and per-pixel variance. Each point is its own
``log_likelihood`` call (batch 1, the exact trace, the default adaptive solve and its checks), as a user scoring one
image does; a batch shares its steps, set by its worst image, which hides what one image sees. The table gives the
fraction of points within 1 and 2 bars, the median and largest |error| / bar, the median bar, the field
evaluations per image of the solve and its check solves, and the largest mismatch of the moment-matched prior
(log N(x̄(σ_max); m, (v + σ_max²)I) against the exact log p_σmax at the solve's end), which no bar covers.

Usage: python benchmarks/sweep18_likelihood_bars.py [--points 120] [--bandwidth 0.15] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture

SCHEDULES = {"ve": flowdiff.VESchedule(), "fm": flowdiff.FlowMatchingSchedule(shift=3.0),
             "vp": flowdiff.Schedule.linear()}


def models(schedule, bandwidth: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    centers = 2 * torch.rand(6, 8, dtype=torch.float64, generator=g) - 1
    mix = Mixture(centers, bandwidth, schedule=schedule)
    yield "mixture", mix, {"data_mean": centers.mean(0), "data_var": centers.var(0, unbiased=False) + bandwidth ** 2}, g
    a = torch.randn(8, 8, dtype=torch.float64, generator=g) * 0.2
    cov = a @ a.T + 0.05 * torch.eye(8, dtype=torch.float64)
    mean = 0.5 * torch.rand(8, dtype=torch.float64, generator=g) - 0.25
    yield "gaussian", Gaussian(mean, cov, schedule), {"data_mean": mean, "data_var": cov.diagonal()}, g


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=120)
    parser.add_argument("--bandwidth", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print("| schedule | model | within 1 bar | within 2 bars | median err/bar | max err/bar | median bar (nats) "
          "| NFE solve / check / coarse check | max prior error (nats) | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, schedule in SCHEDULES.items():
        for kind, model, prior, g in models(schedule, args.bandwidth, args.seed):
            x = model.sample(args.points, g)
            exact = model.log_prob(x, 0.0)
            start = time.perf_counter()
            errors, bars, nfe, prior_errors = [], [], [0, 0, 0], []
            sigma_max = float(schedule.sigma_max)
            for i in range(args.points):
                r = flowdiff.log_likelihood(model.flow(), x[i:i + 1], **prior)
                errors.append(float((r.log_prob - exact[i]).abs()))
                bars.append(float(r.error))
                # the prior's own mismatch: log N(x̄(σ_max); m, (v + σ_max²)I) against the exact log p_σmax there
                xbar_max = r.latent * (1 + sigma_max ** 2) ** 0.5
                prior_errors.append(float((r.prior - model.log_prob(xbar_max, sigma_max)).abs()))
                extra = r.stats.extra
                nfe[0] += r.stats.nfe
                nfe[1] += extra["check"].nfe
                nfe[2] += extra["check_coarse"].nfe if "check_coarse" in extra else 0
            e, b = torch.tensor(errors), torch.tensor(bars)
            print(f"| {name} | {kind} | {(e <= b).double().mean():.3f} | {(e <= 2 * b).double().mean():.3f} "
                  f"| {(e / b).median():.3f} | {(e / b).max():.2f} | {b.median():.2e} "
                  f"| {' / '.join(f'{v / args.points:.0f}' for v in nfe)} | {max(prior_errors):.1e} "
                  f"| {time.perf_counter() - start:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
