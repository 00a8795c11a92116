"""Does ``log_likelihood``'s error bar cover the known log-density at its stated level? Coverage over many points.

The data are closed-form (``flowdiff.models.analytic``), so log p_0 is known exactly:

* a Gaussian N(μ, Σ) with a full, seeded covariance (D = ``--dim``; a full Σ so that Rademacher probes do not
  give the trace exactly), the prior stated as its mean and per-pixel variance;
* a Gaussian mixture (a kernel density over ``--centres`` seeded points, bandwidth 0.3) in the same D, the prior
  stated as its moments (what remains of the prior's mismatch is ~1e-6 nats here, far below the bars).

Each row is one ``log_likelihood`` call on ``--points`` points drawn from the model: every point has its own
probes (they are drawn per sample), so one call gives ``--points`` independent trials of the estimator, sharing
one adaptive solve (dopri5 at the default tolerances, with the check solve). For each estimator setting the
table gives the fraction of points whose error |log_prob − log p| lies within 1 and 2 reported error bars
(``error`` = √(std_error² + solve_error²)), the rates a normal error would give (68.3%, 95.4%), the rates of
Student's t with probes − 1 degrees of freedom (what the standard error of a mean of a few probes follows),
the median bar and the median |error| / bar. No peer is run: k-diffusion's ``log_likelihood`` reports no
error bar.

Two more tables, on the kernel density that ``flowdiff likelihood --model analytic-mixture`` uses (the 1437
training digits, bandwidth 0.1, the shipped model's schedule), at ``--grid-points`` held-out digits:

* the solve's bar on a fixed grid: rk4 at N steps, whose check solve takes N/2 steps; the error against the exact
  log p and the bar (the estimator is exact, so the bar is the solve's alone), beside the default adaptive solve;
* the dequantization draw: one 8-bit-lattice held-out digit dequantized (uniform, 256 levels) with ``--draws``
  seeds at the defaults; the spread of its bits/dim over the draws beside the bar each draw reports.

With ``--fixed-grid-only``, the fixed-grid tables alone: the kernel density's, and fixed grids (rk4, heun) on the
first table's models, where the exact trace leaves the solve's bar alone: how often it covers, misses while
finite, or is ``inf`` (the third check solve found the grids outside their asymptotic regime).

Usage: python benchmarks/likelihood_coverage.py [--points 400] [--dim 8] [--seed 0] [--grid-points 3] [--draws 6]
       [--fixed-grid-only]
"""

from __future__ import annotations

import argparse
import math
import platform
import time
import warnings

import torch

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture

SETTINGS = [
    ("exact", {}),
    ("hutchinson", {"probes": 2}),
    ("hutchinson", {"probes": 4}),
    ("hutchinson", {"probes": 8}),
    ("hutchinson", {"probes": 16}),
    ("hutchinson", {"probes": 16, "probes_from": "gaussian"}),
    ("hutch++", {"probes": 4, "sketch": 2}),
    ("hutch++", {"probes": 8, "sketch": 2}),
]


def student_t_within(k: float, dof: int) -> float:
    """P(|T| <= k) for Student's t with ``dof`` degrees of freedom (numerical integration of its density)."""
    log_c = math.lgamma((dof + 1) / 2) - math.lgamma(dof / 2) - 0.5 * math.log(dof * math.pi)
    n = 20000
    h = k / n
    total = 0.0
    for i in range(n + 1):
        t = i * h
        w = 1 if i in (0, n) else (4 if i % 2 else 2)
        total += w * math.exp(log_c - (dof + 1) / 2 * math.log1p(t * t / dof))
    return 2 * total * h / 3


def models(dim: int, centres: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(dim, dim, generator=gen, dtype=torch.float64) / math.sqrt(dim)
    cov = 0.05 * torch.eye(dim, dtype=torch.float64) + 0.3 * a @ a.T
    mean = 0.3 * torch.randn(dim, generator=gen, dtype=torch.float64)
    gauss = Gaussian(mean, cov)
    yield "Gaussian (full Σ)", gauss, {"data_mean": mean, "data_var": cov.diagonal()}
    pts = 0.6 * torch.rand(centres, dim, generator=gen, dtype=torch.float64) - 0.3
    mix = Mixture(pts, bandwidth=0.3)
    yield "mixture", mix, {"data_mean": pts.mean(0), "data_var": pts.var(0, correction=0) + 0.3**2}


def kernel_density() -> tuple[Mixture, dict]:
    """The CLI's ``analytic-mixture`` model, built here with its exact ``log_prob``, and its moment-matched prior."""
    from flowdiff.cli._models import MIXTURE_BANDWIDTH, _digits_schedule

    train = flowdiff.digits_data("train").images.double()
    mix = Mixture(train, bandwidth=MIXTURE_BANDWIDTH, schedule=_digits_schedule())
    return mix, {"data_mean": train.mean(0), "data_var": train.var(0, correction=0) + MIXTURE_BANDWIDTH**2}


def _check_nfe(r) -> str:
    """The check solves' evaluations: the N/2-step (or 10× tolerance) solve's, and the N/4-step one's where run."""
    quarter = r.stats.extra.get("check_quarter")
    return f"{r.stats.extra['check'].nfe}" + (f"+{quarter.nfe}" if quarter is not None else "")


def _quiet_likelihood(*args, **kwargs):
    """``log_likelihood`` with its warnings kept (an unbounded fixed-grid bar warns); the table says what they say."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        return flowdiff.log_likelihood(*args, **kwargs)


def fixed_grid_rows(points: int) -> None:
    mix, prior = kernel_density()
    x = flowdiff.digits_data("test").images[:points].double()
    exact = mix.log_prob(x, 0.0)
    print(f"\n## The solve's bar on a fixed grid: the CLI's analytic-mixture (D = 64), {points} held-out digits, "
          "exact trace\n")
    print("| solve | max abs(error) (nats) | bars (nats) | within the bar | of them with bar inf | NFE (solve+checks) "
          "| s |")
    print("|---|---|---|---|---|---|---|")
    for steps in (16, 32, 64, 128, None):
        start = time.perf_counter()
        r = _quiet_likelihood(mix.flow(), x, solver="rk4" if steps else "dopri5", steps=steps, **prior)
        wall = time.perf_counter() - start
        err = (r.log_prob - exact).abs()
        label = f"rk4, {steps} steps" if steps else "dopri5 at the defaults (check: 10× tol)"
        print(f"| {label} | {float(err.max()):.3g} | {', '.join(f'{v:.3g}' for v in r.error.tolist())} | "
              f"{int((err <= r.error).sum())} of {points} | {int(torch.isinf(r.error).sum())} | "
              f"{r.stats.nfe}+{_check_nfe(r)} | {wall:.1f} |", flush=True)


def fixed_grid_coverage(points: int, dim: int, centres: int, seed: int) -> None:
    """Fixed grids on the first table's models (exact trace, so the bar is the solve's alone): how often the bar
    covers, how often it is a finite bar that fails to, and how often it is inf (no bound claimed)."""
    print(f"\n## The solve's bar on a fixed grid: the first table's models (D = {dim}), {points} points, exact trace\n")
    print("| model | solve | finite bar, covers | finite bar, misses | bar inf | median abs(error) (nats) "
          "| median finite bar | NFE (solve+checks) | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, prior in models(dim, centres, seed):
        x = model.sample(points, torch.Generator().manual_seed(seed + 1))
        exact = model.log_prob(x, 0.0)
        for solver, steps in (("rk4", 4), ("rk4", 8), ("rk4", 16), ("rk4", 32), ("rk4", 64), ("heun", 8), ("heun", 32),
                              ("heun", 128)):
            start = time.perf_counter()
            r = _quiet_likelihood(model.flow(), x, solver=solver, steps=steps, estimator=flowdiff.Trace("exact"),
                                  **prior)
            wall = time.perf_counter() - start
            err = (r.log_prob - exact).abs()
            inf = torch.isinf(r.error)
            within = err <= r.error
            finite = r.error[~inf]
            print(f"| {name} | {solver}, {steps} steps | {100 * float((within & ~inf).double().mean()):.1f}% | "
                  f"{100 * float((~within & ~inf).double().mean()):.1f}% | {100 * float(inf.double().mean()):.1f}% | "
                  f"{float(err.median()):.2e} | {float(finite.median()) if finite.numel() else float('nan'):.2e} | "
                  f"{r.stats.nfe}+{_check_nfe(r)} | {wall:.1f} |", flush=True)


def dequantization_rows(draws: int) -> None:
    mix, prior = kernel_density()
    x = flowdiff.digits_data("test").images[:1].double()
    y = ((x + 1) * 127.5).round() / 127.5 - 1   # on the 8-bit lattice, as a PNG holds it
    start = time.perf_counter()
    r = flowdiff.log_likelihood(mix.flow(), y.repeat(draws, 1, 1, 1), dequantize=256, generator=0, **prior)
    wall = time.perf_counter() - start
    print(f"\n## One digit's bits/dim over {draws} dequantization draws (uniform, 256 levels, defaults, "
          f"{wall:.0f} s)\n")
    print(f"bits/dim over the draws: mean {float(r.bits_per_dim.mean()):.4f}, standard deviation "
          f"{float(r.bits_per_dim.std()):.4f}; the bar each draw reports (probes and solve): median "
          f"{float(r.bits_per_dim_error.median()):.4f}, largest {float(r.bits_per_dim_error.max()):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=400)
    parser.add_argument("--dim", type=int, default=8)
    parser.add_argument("--centres", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid-points", type=int, default=3)
    parser.add_argument("--draws", type=int, default=6)
    parser.add_argument("--fixed-grid-only", action="store_true",
                        help="only the two fixed-grid tables (the solve's bar on rk4/heun grids)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.fixed_grid_only:
        print(f"# likelihood fixed-grid error bars: seed {args.seed}; torch {torch.__version__}, "
              f"{platform.processor() or platform.machine()}")
        fixed_grid_coverage(args.points, args.dim, args.centres, args.seed)
        fixed_grid_rows(args.grid_points)
        return
    print(f"# likelihood error-bar coverage: D = {args.dim}, {args.points} points per row, seed {args.seed}; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}\n")
    print("| model | estimator | within 1 bar | within 2 bars | t(probes−1) rates | median bar (nats) "
          "| median abs(error)/bar | NFE | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, model, prior in models(args.dim, args.centres, args.seed):
        x = model.sample(args.points, torch.Generator().manual_seed(args.seed + 1))
        exact = model.log_prob(x, 0.0)
        for method, options in SETTINGS:
            start = time.perf_counter()
            r = flowdiff.log_likelihood(model.flow(), x, estimator=flowdiff.Trace(method, **options),
                                        generator=args.seed + 2, **prior)
            wall = time.perf_counter() - start
            ratio = (r.log_prob - exact).abs() / r.error
            one, two = float((ratio <= 1).double().mean()), float((ratio <= 2).double().mean())
            probes = options.get("probes")
            expected = ("normal 68.3%, 95.4%" if probes is None else
                        f"{100 * student_t_within(1, probes - 1):.1f}%, {100 * student_t_within(2, probes - 1):.1f}%")
            label = method + "".join(f", {k}={v}" for k, v in options.items())
            print(f"| {name} | {label} | {100 * one:.1f}% | {100 * two:.1f}% | {expected} | "
                  f"{float(r.error.median()):.2e} | {float(ratio.median()):.2f} | "
                  f"{r.stats.nfe}+{r.stats.extra['check'].nfe} | {wall:.1f} |", flush=True)
    fixed_grid_coverage(args.points, args.dim, args.centres, args.seed)
    fixed_grid_rows(args.grid_points)
    dequantization_rows(args.draws)


if __name__ == "__main__":
    main()
