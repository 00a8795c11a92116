"""Flow-matching peers: flowdiff's tuned pick against the diffusers schedulers an SD3/Flux user runs.

A closed-form rectified-flow model: the data is a Gaussian mixture (``flowdiff.models.analytic.Mixture``, 16
random centres in 64 dimensions, bandwidth 0.3), the schedule SD3's (``FlowMatchingSchedule(1000, shift=3)``),
and the model is its exact velocity v = E[ε − x₀ | x_t] as a ``model(x, t)`` (T·t fed, x = x̄/(1+σ)), computed
in float64 from the mixture's exact ε: v = (1+σ)·(ε(x̄, σ) − x), and at t = 1 (pure noise) x − E[x₀].
Every row is measured against one float64 reference from the same evaluation noise
(:func:`flowdiff.reference_solution`, dopri8, rtol = atol = 1e-10, from t = 1 (σ = ∞, pure noise) since engineer F8;
from the schedule's σ_max before), in one process:

* flowdiff, tuned pick: ``flowdiff.tune`` of each solver in ``TUNED`` on calibration noise (seed + 1); at each
  NFE the solver whose tuned grid did best on the calibration noise, measured on the evaluation noise;
* flowdiff, named grids: every solver in ``NAMED`` on trailing, karras and logsnr, the best chosen on the
  evaluation noise itself (which favours it);
* diffusers: ``flowdiff.tools.peers.default_samplers(["diffusers"], flow)`` — on this flow the flow-matching set
  (FlowMatch Euler on its own, Karras, exponential and beta σ, FlowMatch Heun, DPM++ 2M and UniPC on flow σ) —
  each through its own loop, the best chosen on the evaluation noise itself;
* the "start gap": FlowMatch Euler/Heun start at t = 1 (σ = ∞) from x = noise and DPM++/UniPC at their own first
  σ from x = noise (x = x̄/(1+σ)), as their users run them, and the reference where its line says (flowdiff's named
  and tuned grids start at σ_max from x̄ = noise·√(1+σ_max²)); the error of FlowMatch Heun at 1000 steps and UniPC at
  300 bounds what a start other than the reference's costs them.

Usage: python benchmarks/bench_flowmatch_peers.py [--batch 32] [--calibration 32] [--budgets 5,10,20]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

import flowdiff
import solvers
from flowdiff.models.analytic import Mixture
from flowdiff.tools import peers

TUNED = [("unipc", {"order": 2}), ("dpmpp_3m", {}), ("ipndm", {"order": 3})]
NAMED = [("euler", {}), ("heun", {}), ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {}), ("ipndm", {})]
GRIDS = ("trailing", "karras", "logsnr")


class MixtureVelocity:
    """The exact rectified-flow velocity of a :class:`Mixture` as ``model(x, t)``, t = T·(σ/(1+σ)), float64."""

    def __init__(self, mixture: Mixture, T: int) -> None:
        self.mixture, self.T = mixture, T
        self.mean = (mixture.log_weights.exp()[:, None] * mixture.centers).sum(0)

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tau = float(t.reshape(-1)[0]) / self.T
        xd = x.double()
        if tau >= 1.0:  # pure noise: x = ε, E[x₀] the data mean
            v = xd - self.mean.reshape(1, *x.shape[1:])
        else:
            sigma = tau / (1.0 - tau)
            v = (self.mixture.eps(xd * (1.0 + sigma), sigma) - xd) * (1.0 + sigma)
        return v.to(x.dtype)


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).pow(2).mean().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=32)
    parser.add_argument("--budgets", default="5,10,20")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    budgets = [int(b) for b in args.budgets.split(",")]
    torch.manual_seed(1234)
    schedule = flowdiff.FlowMatchingSchedule(1000, 3.0)
    mixture = Mixture(torch.randn(16, 1, 8, 8, dtype=torch.float64), 0.3, schedule=schedule)
    flow = flowdiff.ProbabilityFlow(MixtureVelocity(mixture, 1000), schedule, prediction_type="velocity")
    noise = torch.randn(args.batch, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(args.seed))
    calibration = torch.randn(args.calibration, 1, 8, 8, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(args.seed + 1))
    start = time.perf_counter()
    ref = flowdiff.reference_solution(flow, noise, rtol=1e-10, atol=1e-10)
    print(f"reference: {ref.solver}, {ref.nfe} NFE, estimated RMS error {ref.error:.1e}, "
          f"{time.perf_counter() - start:.1f} s")

    samplers = peers.default_samplers(["diffusers"], flow)
    left_out = [s for s in samplers if s.left_out]
    print(f"diffusers {peers.version('diffusers')}: {len(samplers) - len(left_out)} samplers, left out: "
          + ("; ".join(f"{s.name} {s.grid}: {s.left_out}" for s in left_out) or "none"))
    for name, budget in (("FlowMatch Heun", 1999), ("UniPC flow", 300)):  # UniPC's timesteps repeat past ~300
        sampler = next(s for s in samplers if s.name == name)
        gap = rmse(peers.run(sampler, flow, noise, budget).x, ref.x)
        print(f"start gap: {name} at NFE {budget} (its own start, x = noise) vs the reference (from "
              f"σ={ref.sigma_start:g}): RMSE {gap:.1e}")

    rows = []
    for budget in budgets:
        tuned = []
        for solver, options in TUNED:
            t0 = time.perf_counter()
            grid = flowdiff.tune(flow, calibration, solver=solver, nfe=budget, solver_options=options, progress=False)
            out = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options), grid=grid.sigmas)
            tuned.append((grid.calibration_error, f"{solver}{options or ''} / tuned", rmse(out.x, ref.x),
                          out.stats.nfe, time.perf_counter() - t0))
        cal, pick, err, nfe, secs = min(tuned)
        named = []
        for solver, options in NAMED:
            for g in GRIDS:
                try:
                    out = flowdiff.generate(flow, noise, solver=solvers.get(solver, **options),
                                            grid=flowdiff.Grid(g, nfe=budget))
                except ValueError:
                    continue
                named.append((rmse(out.x, ref.x), f"{solver} / {g}", out.stats.nfe))
        peer_rows = []
        for s in samplers:
            if peers.fits(s, budget) is None:
                out = peers.run(s, flow, noise, budget)
                peer_rows.append((rmse(out.x, ref.x), f"{s.name} / {s.grid}", out.nfe))
        rows.append((budget, (pick, err, nfe, cal), min(named), sorted(peer_rows)))
        print(f"NFE {budget}: tuned pick {pick} {err:.2e} (NFE {nfe}; calibration {cal:.2e}; tuning "
              f"{sum(t[4] for t in tuned):.0f} s); best named {min(named)[1]} {min(named)[0]:.2e}; best peer "
              f"{peer_rows and min(peer_rows)[1]} {min(peer_rows)[0]:.2e}")
        for e, name, n in sorted(peer_rows):
            print(f"    diffusers {name}: {e:.2e} (NFE {n})")

    print()
    print(f"Machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"batch {args.batch}, calibration {args.calibration}, seed {args.seed}")
    print("| NFE | flowdiff tuned pick (chosen on calibration) | RMSE | best flowdiff named grid | RMSE | "
          "best diffusers flow-matching peer | RMSE | ratio peer/tuned |")
    print("|---:|---|---:|---|---:|---|---:|---:|")
    for budget, (pick, err, _nfe, _), (nerr, nname, _), peer_rows in rows:
        perr, pname, _ = peer_rows[0]
        print(f"| {budget} | {pick} | {err:.2e} | {nname} | {nerr:.2e} | {pname} | {perr:.2e} | "
              f"{perr / err if err > 0 else math.inf:.1f} |")


if __name__ == "__main__":
    main()
