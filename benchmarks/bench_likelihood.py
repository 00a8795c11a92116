"""Log-likelihood at the defaults against dimension: error and time of flowdiff and k-diffusion, one run.

The models are closed-form Gaussian mixtures (``flowdiff.models.analytic.Mixture``, bandwidth
0.1) on 100 of scikit-learn's digit images upsampled to D = 64 (8×8), 256 (16×16), 625 (25×25),
1024 (32×32) and 3072 (3×32×32, the digit in three channels scaled by 1, 0.8 and 0.6), DDPM
linear schedule (σ_max ≈ 157): the log-density at σ = 0 is a log-sum-exp, known exactly. Points are
drawn from each mixture (``--samples``, seeded). Side by side in one process, per dimension:

* flowdiff ``log_likelihood`` at its defaults (``estimator=Trace("auto")``: exact up to D = 256, Hutch++
  beyond; dopri5 at 1e-5; the check solve), with the prior stated as the mixture's per-pixel mean
  and variance (``data_mean``/``data_var``; the default VP prior is not this model's);
* k-diffusion's ``k_diffusion.sampling.log_likelihood`` at its defaults (torchdiffeq dopri5 at
  atol = rtol = 1e-5 in σ from the schedule's σ_min to σ_max, one Rademacher probe, prior
  N(0, σ_max²)). It integrates from σ_min, so its error is given both against the exact
  log p_{σ_min} of the same points (the value it estimates) and against log p_0.

Per dimension and library: max and mean |error| (nats per sample), flowdiff's mean error bar and
the fraction of samples within it, model evaluations (flowdiff: field evaluations of both solves
and the estimator's vector–Jacobian products; k-diffusion: denoiser calls, each with one VJP),
and wall time. ``--digits`` also measures the shipped model's bits/dim on its held-out split.

Usage: python benchmarks/bench_likelihood.py [--samples 4] [--dims 64,256,625,1024,3072]
       [--out benchmarks/results/likelihood.md] [--digits] [--digits-steps 20] [--digits-probes 2]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import torch
from _kdiffusion import CountingDenoiser, load_kdiffusion_sampling

import flowdiff
from flowdiff.models.analytic import Mixture
from flowdiff.tools.likelihood import AUTO_EXACT_MAX_DIM

SIDES = {64: (1, 8), 256: (1, 16), 625: (1, 25), 1024: (1, 32), 3072: (3, 32)}


def mixture(dim: int) -> Mixture:
    from sklearn.datasets import load_digits

    channels, side = SIDES[dim]
    images = torch.tensor(load_digits().images[:100] / 16.0 * 2 - 1).reshape(100, 1, 8, 8)
    up = torch.nn.functional.interpolate(images, size=(side, side), mode="bilinear", align_corners=False)
    if channels == 3:
        up = torch.cat([up, 0.8 * up, 0.6 * up], 1)
    return Mixture(up, bandwidth=0.1)


def run_flowdiff(mix: Mixture, x: torch.Tensor, exact: torch.Tensor) -> dict:
    prior = dict(data_mean=mix.centers.mean(0).reshape(mix.shape),
                 data_var=(mix.centers.var(0, unbiased=False) + mix.bandwidth**2).reshape(mix.shape))
    start = time.perf_counter()
    # the probes' generator only where the default draws probes (log_likelihood refuses one that would change nothing)
    stochastic = x[0].numel() > AUTO_EXACT_MAX_DIM
    seeded = {"generator": torch.Generator().manual_seed(1)} if stochastic else {}
    r = flowdiff.log_likelihood(mix.flow(), x, **seeded, **prior)
    wall = time.perf_counter() - start
    err = (r.log_prob - exact).abs()
    checks = [r.stats.extra[k] for k in ("check", "check_coarse") if k in r.stats.extra]  # the coarse one since S21
    return dict(lib="flowdiff", method=f"defaults ({r.divergence})", max_abs=float(err.max()),
                mean_abs=float(err.mean()), bar=float(r.error.mean()), covered=float((err <= r.error).double().mean()),
                nfe=" + ".join(str(n) for n in (r.stats.nfe, *(c.nfe for c in checks)))
                + f" / {r.stats.extra['vjps'] + sum(c.extra['vjps'] for c in checks)} VJPs", wall=wall)


def run_kdiffusion(mix: Mixture, x: torch.Tensor, exact: torch.Tensor) -> dict:
    K = load_kdiffusion_sampling()
    flow = mix.flow()
    s_min, s_max = flow.schedule.sigma_min, flow.schedule.sigma_max
    torch.manual_seed(1)   # k-diffusion draws its probe from the global generator
    model = CountingDenoiser(flow)
    start = time.perf_counter()
    ll, _ = K.log_likelihood(model, x, s_min, s_max)
    wall = time.perf_counter() - start
    err_min = (ll.double() - mix.log_prob(x, s_min)).abs()
    err = (ll.double() - exact).abs()
    return dict(lib="k-diffusion", method="defaults (1 probe)", max_abs=float(err.max()), mean_abs=float(err.mean()),
                max_abs_min=float(err_min.max()), bar=None, covered=None, nfe=f"{model.nfe} / {model.nfe} VJPs",
                wall=wall)


def table(rows: list[dict]) -> list[str]:
    lines = ["| D | library | estimator | max \\|err\\| | mean \\|err\\| | mean error bar | within bar | "
             "evaluations | wall (s) |", "|---:|---|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        mx = f"{r['max_abs']:.3f}" + (f" ({r['max_abs_min']:.3f} vs p_σmin)" if "max_abs_min" in r else "")
        bar = "–" if r["bar"] is None else f"{r['bar']:.3f}"
        cov = "–" if r["covered"] is None else f"{r['covered']:.0%}"
        lines.append(f"| {r['dim']} | {r['lib']} | {r['method']} | {mx} | {r['mean_abs']:.3f} | {bar} | {cov} | "
                     f"{r['nfe']} | {r['wall']:.1f} |")
    return lines


def digits(steps: int, probes: int) -> list[str]:
    """The shipped model's bits/dim on the held-out split (Hutchinson on all, exact on a few)."""
    flow = flowdiff.pretrained("digits")
    test = flowdiff.digits_data("test").images
    lines = [f"Shipped model `pretrained(\"digits\")`, {test.shape[0]} held-out digits (float32, rk4, {steps} steps "
             "uniform in log(σ + σ_min), σ from 0 to σ_max = 157):", "",
             "| estimator | images | dequantize | mean bits/dim | ± (over images) | mean probe std err (bits/dim) | "
             "NFE | wall (s) |", "|---|---:|---|---:|---:|---:|---:|---:|"]
    runs = [("exact", {}, test[:4], None), ("hutchinson", {"probes": probes}, test, None),
            ("hutchinson", {"probes": probes}, test, 17)]
    for divergence, options, images, levels in runs:
        start = time.perf_counter()
        r = flowdiff.log_likelihood(flow, images, solver="rk4", steps=steps,
                                    estimator=flowdiff.Trace(divergence, **options), dequantize=levels,
                                    generator=torch.Generator().manual_seed(0))
        wall = time.perf_counter() - start
        mean, err = r.mean_bits_per_dim()
        se = r.bits_per_dim_std_error
        label = divergence + "".join(f" {k}={v}" for k, v in options.items())
        deq = f"17 levels (+{r.offset_bits:.0f} bits)" if levels else "no (continuous)"
        lines.append(f"| {label} | {images.shape[0]} | {deq} | {mean:.4f} | {err:.4f} | "
                     f"{'–' if se is None else f'{float(se.mean()):.4f}'} | {r.stats.nfe} | {wall:.0f} |")
        print(f"  digits {label} dequantize={levels}: {mean:.4f} ± {err:.4f} bits/dim, {wall:.0f} s",
              file=sys.stderr, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--dims", default="64,256,625,1024,3072", help=f"comma-separated, of {sorted(SIDES)}")
    parser.add_argument("--out", default=None)
    parser.add_argument("--digits", action="store_true", help="also the shipped model's bits/dim (slow)")
    parser.add_argument("--digits-steps", type=int, default=20)
    parser.add_argument("--digits-probes", type=int, default=2)
    parser.add_argument("--no-mixture", action="store_true", help="skip the mixture comparison (with --digits)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.no_mixture:
        lines = ["# Likelihood of the shipped model (`bench_likelihood.py --digits --no-mixture`)", "",
                 *digits(args.digits_steps, args.digits_probes), "", f"Total {time.perf_counter() - start:.0f} s."]
        print("\n".join(lines))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    rows = []
    for dim in (int(d) for d in args.dims.split(",")):
        if dim not in SIDES:
            raise SystemExit(f"--dims: {dim} is not one of {sorted(SIDES)}")
        mix = mixture(dim)
        x = mix.sample(args.samples, torch.Generator().manual_seed(0))
        exact = mix.log_prob(x, 0.0)
        for run in (run_flowdiff, run_kdiffusion):
            row = dict(dim=dim, **run(mix, x, exact))
            print(f"  D={dim} {row['lib']}: max |err| {row['max_abs']:.3f}, {row['wall']:.1f} s", file=sys.stderr,
                  flush=True)
            rows.append(row)
    lines = [f"# Likelihood at the defaults against dimension (`python benchmarks/bench_likelihood.py --samples "
             f"{args.samples}{' --digits' if args.digits else ''}`)", "",
             f"Mixtures of 100 digit images (bandwidth 0.1), {args.samples} points drawn from each; float64; "
             f"{platform.machine()}, torch {torch.__version__}, one thread, {time.strftime('%Y-%m-%d')}. "
             "max/mean |err| against the exact log p_0 (k-diffusion: also against log p_σmin, what it estimates).",
             "",
             *table(rows)]
    if args.digits:
        lines += ["", *digits(args.digits_steps, args.digits_probes)]
    lines += ["", f"Total {time.perf_counter() - start:.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
