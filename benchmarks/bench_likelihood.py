"""Log-likelihood through the probability-flow ODE: error against an exact log-density, flowdiff vs k-diffusion.

The model is a closed-form Gaussian mixture (``flowdiff.models.analytic.Mixture``, bandwidth 0.1) on
200 of scikit-learn's digit images upsampled to 16×16 (D = 256) in [−1, 1], DDPM linear
schedule (σ_max ≈ 157): its log-density at σ = 0 is a log-sum-exp, known exactly. Points are
drawn from the mixture itself (``--samples``, seeded). Side by side in one process:

* flowdiff ``log_likelihood`` with ``divergence="exact"``, ``"hutchinson"`` and ``"hutch++"``
  (dopri5 in log(σ + c), tolerances swept; the prior N(mean, (var + σ_max²)I) with the
  mixture's per-pixel mean and variance);
* k-diffusion's ``k_diffusion.sampling.log_likelihood`` (torchdiffeq dopri5 in σ from the
  schedule's σ_min to σ_max, one Rademacher probe through a vector–Jacobian product, prior
  N(0, σ_max²)), tolerances swept. It integrates from σ_min, so its error is measured against the
  exact log p_{σ_min} of the same points (the target it estimates; against log p_0 it would be off
  by another ~1.3 nats here).

Per setting: mean and max |error| (nats per sample), the mean of z² = (error / std error)² and the
fraction of samples with |error| ≤ 2 std errors (stochastic estimators with ≥ 2 probes), model
evaluations (every JVP/VJP counted), and wall time. ``--digits`` also measures the shipped model's
bits/dim on its held-out split (slow on a CPU; see benchmarks/results/likelihood.md).

Usage: python benchmarks/bench_likelihood.py [--samples 16] [--out benchmarks/results/likelihood.md]
       [--digits] [--digits-steps 20] [--digits-probes 2]
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

FLOWDIFF = [
    ("exact", {}, [1e-3, 1e-4, 1e-5]),
    ("hutchinson", {"probes": 1}, [1e-3, 1e-4]),
    ("hutchinson", {"probes": 16}, [1e-4]),
    ("hutch++", {"probes": 2, "sketch": 2}, [1e-3]),
    ("hutch++", {"probes": 4, "sketch": 4}, [1e-2, 1e-3]),
    ("hutch++", {"probes": 4, "sketch": 8}, [1e-3]),
    ("hutch++", {"probes": 8, "sketch": 8}, [1e-3, 1e-4]),
    ("hutch++", {"probes": 8, "sketch": 16}, [1e-4]),
]
KD_TOLS = [1e-3, 1e-4, 1e-5]


def mixture() -> Mixture:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images[:200] / 16.0 * 2 - 1).reshape(200, 1, 8, 8)
    up = torch.nn.functional.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    return Mixture(up, bandwidth=0.1)


def summarize(err: torch.Tensor, se: torch.Tensor | None) -> dict:
    row = dict(mean_abs=float(err.abs().mean()), max_abs=float(err.abs().max()), rms=float(err.pow(2).mean().sqrt()))
    if se is not None:
        z = err / se
        row.update(z2=float(z.pow(2).mean()), cover2=float((z.abs() <= 2).double().mean()),
                   se=float(se.mean()))
    return row


def run_flowdiff(mix: Mixture, x: torch.Tensor, exact: torch.Tensor) -> list[dict]:
    flow = mix.flow()
    prior = dict(data_mean=mix.centers.mean(0).reshape(mix.shape),
                 data_var=(mix.centers.var(0, unbiased=False) + mix.bandwidth**2).reshape(mix.shape))
    rows = []
    for divergence, options, tols in FLOWDIFF:
        label = divergence + "".join(f" {k}={v}" for k, v in options.items())
        for tol in tols:
            start = time.perf_counter()
            r = flowdiff.log_likelihood(flow, x, divergence=divergence, rtol=tol, atol=tol,
                                        generator=torch.Generator().manual_seed(1), **prior, **options)
            wall = time.perf_counter() - start
            row = dict(lib="flowdiff", method=label, tol=tol, nfe=r.stats.nfe, wall=wall,
                       **summarize(r.log_prob - exact, r.std_error))
            print(f"  flowdiff {label} tol={tol:g}: mean |err| {row['mean_abs']:.3f}, {r.stats.nfe} NFE, "
                  f"{wall:.1f} s", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def run_kdiffusion(mix: Mixture, x: torch.Tensor) -> list[dict]:
    K = load_kdiffusion_sampling()
    flow = mix.flow()
    s_min, s_max = flow.schedule.sigma_min, flow.schedule.sigma_max
    exact_min = mix.log_prob(x, s_min)
    rows = []
    for tol in KD_TOLS:
        torch.manual_seed(1)   # k-diffusion draws its probe from the global generator
        model = CountingDenoiser(flow)
        start = time.perf_counter()
        ll, _ = K.log_likelihood(model, x, s_min, s_max, atol=tol, rtol=tol)
        wall = time.perf_counter() - start
        row = dict(lib="k-diffusion", method="log_likelihood (1 probe)", tol=tol, nfe=model.nfe, wall=wall,
                   **summarize(ll.double() - exact_min, None))
        print(f"  k-diffusion tol={tol:g}: mean |err| {row['mean_abs']:.3f}, {model.nfe} NFE, {wall:.1f} s",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| library | estimator | tol | NFE | wall (s) | mean \\|err\\| | max \\|err\\| | mean std err | mean z² | "
             "\\|err\\| ≤ 2 se |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        extra = (f"{r['se']:.3f} | {r['z2']:.2f} | {r['cover2']:.0%}" if "z2" in r else "– | – | –")
        lines.append(f"| {r['lib']} | {r['method']} | {r['tol']:g} | {r['nfe']} | {r['wall']:.1f} | "
                     f"{r['mean_abs']:.3f} | {r['max_abs']:.3f} | {extra} |")
    return lines


def equal_time(rows: list[dict], factor: float = 1.0) -> list[str]:
    """For each k-diffusion run: flowdiff's most accurate run that took at most ``factor`` × as long."""
    out = []
    ours = [r for r in rows if r["lib"] == "flowdiff"]
    for kd in (r for r in rows if r["lib"] == "k-diffusion"):
        within = [r for r in ours if r["wall"] <= factor * kd["wall"]]
        if not within:
            out.append(f"- k-diffusion tol {kd['tol']:g} ({kd['wall']:.1f} s, mean |err| {kd['mean_abs']:.3f}): no "
                       f"flowdiff run within {factor:g}× its time")
            continue
        best = min(within, key=lambda r: r["mean_abs"])
        out.append(f"- k-diffusion tol {kd['tol']:g}: {kd['wall']:.1f} s, mean |err| {kd['mean_abs']:.3f} nats; "
                   f"flowdiff {best['method']} tol {best['tol']:g}: {best['wall']:.1f} s, mean |err| "
                   f"{best['mean_abs']:.3f} — **{best['mean_abs'] / kd['mean_abs']:.2f}×**")
    return out


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
        r = flowdiff.log_likelihood(flow, images, solver="rk4", steps=steps, divergence=divergence,
                                    dequantize=levels, generator=torch.Generator().manual_seed(0), **options)
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
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--out", default=None)
    parser.add_argument("--digits", action="store_true", help="also the shipped model's bits/dim (slow)")
    parser.add_argument("--digits-steps", type=int, default=20)
    parser.add_argument("--digits-probes", type=int, default=2)
    parser.add_argument("--no-mixture", action="store_true", help="skip the mixture comparison (with --digits)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mix = mixture()
    x = mix.sample(args.samples, torch.Generator().manual_seed(0))
    exact = mix.log_prob(x, 0.0)
    start = time.perf_counter()
    if args.no_mixture:
        lines = ["# Likelihood of the shipped model (`bench_likelihood.py --digits --no-mixture`)", "",
                 *digits(args.digits_steps, args.digits_probes), "", f"Total {time.perf_counter() - start:.0f} s."]
        print("\n".join(lines))
        if args.out:
            Path(args.out).write_text("\n".join(lines) + "\n")
        return
    rows = run_flowdiff(mix, x, exact) + run_kdiffusion(mix, x)
    lines = [f"# Likelihood: error against the exact log-density (`python benchmarks/bench_likelihood.py "
             f"--samples {args.samples}{' --digits' if args.digits else ''}`)", "",
             f"Mixture of {mix.centers.shape[0]} digit images upsampled to 16×16 (D = {mix.dim}), bandwidth "
             f"{mix.bandwidth}, {args.samples} points drawn from it; float64; exact log p_0 from "
             f"{float(exact.min()):.1f} to {float(exact.max()):.1f} nats (mean {float(exact.mean()):.1f}). "
             f"{platform.machine()}, torch {torch.__version__}, one thread, {time.strftime('%Y-%m-%d')}.", "",
             *table(rows), "", "At equal wall time (flowdiff's most accurate run no slower than each k-diffusion run):",
             "", *equal_time(rows), "", "Within twice the wall time:", "", *equal_time(rows, 2.0), "",
             "Within three times the wall time:", "", *equal_time(rows, 3.0)]
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
