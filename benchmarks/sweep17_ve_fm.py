"""New-user sweep 17: tuned grids, learned solvers and round trips on a variance-exploding and a flow-matching model.

    python benchmarks/sweep17_ve_fm.py [--parts learned,orders,roundtrip] [--eval 256]

Closed-form models (8 dimensions): N(μ, Σ) data and a 6-point kernel mixture (bandwidth 0.4), each on
``VESchedule()`` (ε model, ``model(x_t, t)``) and on ``FlowMatchingSchedule(shift=3)`` (SD3-style velocity model,
with its step out of pure noise at t = 1). Float64, one intra-op thread.

* ``learned``: ``learn_solver`` with its default kinds (``iterations=4``) on 32 calibration samples, two calibration
  seeds, solvers unipc, ipndm, euler and dpmpp_3m at NFE 4 and 6; each fit's and its base method's RMS error on
  ``--eval`` new samples against ``reference_solution`` (what the fit is judged on). Counts kept fits whose new-noise
  error is above the base method's.
* ``orders``: fixed-grid generation error against the reference from σ_max (``sigma_start=sigma_max``, rtol = atol =
  1e-10) at 20, 40, 80 and 160 NFE: the slope of each doubling, for the grids and solvers where it departs from the
  method's order.
* ``roundtrip``: decode(encode(x)) of Gaussian samples at 10 … 160 steps on logsnr, and the latent of each multistep
  encode at 6 steps against Euler's.
* ``adaptive``: ``generate(adaptive=Adaptive(rtol=tol, atol=tol))`` of 16 Gaussian samples, its RMS error against the
  reference from σ_max (rtol = atol = 1e-11) divided by tol, for tol 1e-2 … 1e-6 (the README's claim for the VP
  Gaussian test model: within tol/100 … 4·tol for unipc, abm, dopri5, dopri8, adaptive_heun; bosh3 up to 20·tol).

About a minute and a half on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch

import flowdiff
from flowdiff.models.analytic import Gaussian, Mixture

DIM = 8
MEAN = torch.linspace(-0.6, 0.6, DIM, dtype=torch.float64)
VAR = torch.linspace(0.05, 0.5, DIM, dtype=torch.float64)
CENTERS = torch.randn(6, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
FM = flowdiff.FlowMatchingSchedule(shift=3.0)
VE = flowdiff.VESchedule()


class Velocity:
    """The rectified-flow velocity v = (1+σ)·ε̂ − x̄ of a closed-form model on ``FM`` as ``model(x, t)``; at t = 1
    (pure noise) x − E[x₀]."""

    def __init__(self, closed_form, mean: torch.Tensor) -> None:
        self.closed_form, self.mean = closed_form, mean

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = float(t.reshape(-1)[0]) / FM.train_steps
        if tau >= 1.0:
            return x - self.mean.to(x)
        sigma = tau / (1.0 - tau)
        xbar = x.double() * (1.0 + sigma)
        return ((1.0 + sigma) * self.closed_form.eps(xbar, sigma) - xbar).to(x.dtype)


def flows() -> dict[str, flowdiff.ProbabilityFlow]:
    return {
        "VE Gaussian": flowdiff.ProbabilityFlow(Gaussian(MEAN, VAR, VE), VE),
        "VE mixture": flowdiff.ProbabilityFlow(Mixture(CENTERS, 0.4, schedule=VE), VE),
        "FM Gaussian": flowdiff.ProbabilityFlow(Velocity(Gaussian(MEAN, VAR, FM), MEAN), FM,
                                                prediction_type="velocity"),
        "FM mixture": flowdiff.ProbabilityFlow(Velocity(Mixture(CENTERS, 0.4, schedule=FM), CENTERS.mean(0)), FM,
                                               prediction_type="velocity"),
    }


def _noise(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, DIM, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def learned(n_eval: int) -> None:
    print("| model | solver | NFE | cal. seed | kept | held-out half: fit / base | new noise: fit / base |")
    print("|---|---|---:|---:|---|---|---|")
    worse = total = 0
    for name, flow in flows().items():
        new = _noise(n_eval, 99)
        ref = flowdiff.reference_solution(flow, new).x
        for solver in ("unipc", "ipndm", "euler", "dpmpp_3m"):
            for nfe in (4, 6):
                for seed in (1, 2):
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")  # a fit not kept says so; the row says it too
                        fit = flowdiff.learn_solver(flow, _noise(32, seed), solver=solver, nfe=nfe, iterations=4)
                    a = _rms(flowdiff.generate(flow, new, solver=fit.as_solver(), grid=fit.sigmas).x - ref)
                    b = _rms(flowdiff.generate(flow, new, solver=solver, grid=fit.base_grid()).x - ref)
                    total += fit.kept
                    worse += fit.kept and a > b
                    print(f"| {name} | {solver} | {nfe} | {seed} | {fit.kept} | {fit.validation_error:.3e} / "
                          f"{fit.base_validation_error:.3e} | {a:.3e} / {b:.3e} |", flush=True)
    print(f"\nkept fits above their base method on the new noise: {worse} of {total}")


def orders() -> None:
    budgets = (20, 40, 80, 160)
    print("| model | solver | grid | " + " | ".join(f"NFE {n}" for n in budgets) + " | slopes |")
    print("|---|---|---|" + "---:|" * len(budgets) + "---|")
    picked = {"VE Gaussian": [("deis", "logsnr"), ("dpmpp_2m", "logsnr")],
              "FM Gaussian": [("deis", "logsnr"), ("dpmpp_2m", "trailing"), ("dpmpp_3m", "trailing"),
                              ("rk4", "trailing"), ("rk4", "logsnr"), ("dpmpp_3m", "logsnr")]}
    vp = flowdiff.Schedule.linear()
    cases = {**{k: v for k, v in flows().items() if k in picked},
             "VP Gaussian": flowdiff.ProbabilityFlow(Gaussian(MEAN, VAR, vp), vp)}
    picked["VP Gaussian"] = [("deis", "logsnr"), ("dpmpp_3m", "trailing")]
    noise = _noise(8, 2)
    for name, flow in cases.items():
        ref = flowdiff.reference_solution(flow, noise, sigma_start=flow.schedule.sigma_max, rtol=1e-10, atol=1e-10).x
        for solver, grid in picked[name]:
            errs = []
            for n in budgets:
                kw = {"steps": n // 4} if solver == "rk4" else {"nfe": n}
                errs.append(_rms(flowdiff.generate(flow, noise, solver=solver, grid=grid, **kw).x - ref))
            slopes = ", ".join(f"{math.log2(a / b):.2f}" for a, b in zip(errs, errs[1:]))
            print(f"| {name} | {solver} | {grid} | " + " | ".join(f"{e:.2e}" for e in errs) + f" | {slopes} |")
    print("\n(rk4 at NFE/4 steps)")


def roundtrip() -> None:
    steps = (10, 20, 40, 80, 160)
    print("| model | solver | " + " | ".join(f"{n} steps" for n in steps) + " |")
    print("|---|---|" + "---:|" * len(steps))
    images = MEAN + VAR.sqrt() * _noise(4, 5)
    for name, flow in flows().items():
        if "Gaussian" not in name:
            continue
        for solver in ("dpmpp_2m", "dpmpp_3m", "unipc"):
            errs = [_rms(flowdiff.decode(flow, flowdiff.encode(flow, images, solver=solver, steps=n,
                                                               grid="logsnr").latent).x - images) for n in steps]
            print(f"| {name} | {solver} | " + " | ".join(f"{e:.2e}" for e in errs) + " |")
    print("\nlatent at 6 steps (logsnr) against euler's, max |difference|:")
    for name, flow in flows().items():
        if "Gaussian" not in name:
            continue
        euler = flowdiff.encode(flow, images, solver="euler", steps=6, grid="logsnr").latent.x
        gaps = {s: float((flowdiff.encode(flow, images, solver=s, steps=6, grid="logsnr").latent.x - euler).abs().max())
                for s in ("dpmpp_2m", "dpmpp_3m", "unipc", "lms")}
        print(f"- {name}: " + ", ".join(f"{s} {g:.2e}" for s, g in gaps.items()))


def adaptive() -> None:
    tols = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
    print("| model | solver | " + " | ".join(f"tol {t:g}: error/tol (NFE)" for t in tols)
          + " | largest | largest against the ODE to σ = 0 |")
    print("|---|---|" + "---|" * len(tols) + "---:|---:|")
    vp = flowdiff.Schedule.linear()
    cases = {**{k: v for k, v in flows().items() if "Gaussian" in k},
             "VP Gaussian": flowdiff.ProbabilityFlow(Gaussian(MEAN, VAR, vp), vp)}
    noise = _noise(16, 2)
    gaps = {}
    for name, flow in cases.items():
        start = flow.schedule.sigma_max  # where generate's adaptive solve starts
        ref, to_zero = (flowdiff.reference_solution(flow, noise, sigma_start=start, sigma_end=end, rtol=1e-11,
                                                    atol=1e-11).x for end in (None, 0.0))
        gaps[name] = (_rms(ref - to_zero), flow.schedule.sigma_min)
        for solver in ("unipc", "abm", "dopri5", "dopri8", "adaptive_heun", "bosh3"):
            ratios, exact, cells = [], [], []
            for tol in tols:
                out = flowdiff.generate(flow, noise, solver=solver, adaptive=flowdiff.Adaptive(rtol=tol, atol=tol))
                ratios.append(_rms(out.x - ref) / tol)
                exact.append(_rms(out.x - to_zero) / tol)
                cells.append(f"{ratios[-1]:.2f} ({out.stats.nfe})")
            print(f"| {name} | {solver} | " + " | ".join(cells) + f" | {max(ratios):.2f} | {max(exact):.2f} |",
                  flush=True)
    print("\nthe reference (to σ_min, then the Euler step into 0) against the ODE solved to σ = 0 (tol 1e-11):")
    for name, (gap, sigma_min) in gaps.items():
        print(f"- {name}: RMS {gap:.2e} (σ_min = {sigma_min:.3g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="learned,orders,roundtrip,adaptive")
    parser.add_argument("--eval", type=int, default=256, help="new noise samples for the learned fits (default 256)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    parts = args.parts.split(",")
    unknown = set(parts) - {"learned", "orders", "roundtrip", "adaptive"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; accepted: learned, orders, roundtrip, adaptive")
    for part in parts:
        print(f"\n## {part}\n")
        {"learned": lambda: learned(args.eval), "orders": orders, "roundtrip": roundtrip, "adaptive": adaptive}[part]()


if __name__ == "__main__":
    main()
