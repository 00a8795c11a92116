"""Why ``learn_encoder``'s fits are refused on the photo patches at 20 + 20: one solver, one weight, one start.

Each line is one ``flowdiff.learn_encoder`` fit from ``tune_roundtrip``'s grid (given as ``sigmas=``, so one
start, not the four of ``bench_roundtrip.py --learned``) on calibration patches ``patch_centres(n, seed=2)`` (the
benchmark's), printing the round trip (RMS) of the fit and of the plain encode on the fitted half and on the
held-out half, and how scipy's least squares ended (status, residual evaluations, Jacobians). Variations, one
at a time: the halves swapped (the odd-indexed patches fitted), more iterations, more calibration patches, and
``mixed``: the patches reordered so that each half holds both photos (``patch_centres`` alternates its two
photos, so the even/odd halves are otherwise one photo each; ``bench_roundtrip.both_photos_in_each_half``). If
the fit beats the plain encode on the fitted half and loses on the held-out one, it over-fits; if it does not beat
it on the fitted half either, the optimiser is what stops it. The evaluation patches (seed 1) are never used.

Usage: python benchmarks/roundtrip_refusals.py [--solver heun] [--nfe 20] [--weight 0.03]
       [--runs base swap iter120 cal128 cal256 mixed mixed128]
"""

from __future__ import annotations

import argparse
import time

import scipy.optimize
import torch

import flowdiff
from flowdiff.models.analytic import Mixture

ENDINGS = []  # how each least-squares call ended (scipy's OptimizeResult), appended by the wrapper below
_least_squares = scipy.optimize.least_squares


def _recording(*args, **kwargs):
    res = _least_squares(*args, **kwargs)
    ENDINGS.append(res)
    return res


scipy.optimize.least_squares = _recording  # learn_encoder imports it from scipy.optimize at each call


def one_fit(flow, calibration, solver: str, nfe: int, weight: float, iterations: int) -> str:
    tuned = flowdiff.tune_roundtrip(flow, calibration, solver=solver, nfe=nfe)
    ENDINGS.clear()
    started = time.perf_counter()
    learned = flowdiff.learn_encoder(flow, calibration, solver=solver, nfe=nfe, sigmas=tuned.sigmas,
                                     latent_weight=weight, iterations=iterations)
    (_, held, held_latent), = learned.weight_trials
    ends = "; ".join(f"status {e.status}, {e.nfev} residuals, {e.njev} Jacobians, cost {e.cost:.4g}"
                     for e in ENDINGS)
    return (f"fitted half: fit {learned.calibration_error:.4f} vs plain {learned.base_calibration_error:.4f} | "
            f"held-out half: fit {held:.4f} vs plain {learned.base_validation_error:.4f} (latent {held_latent:.3f} "
            f"vs {learned.base_latent_error:.3f}) | kept {learned.kept} | {ends} | "
            f"{time.perf_counter() - started:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--solver", default="heun")
    parser.add_argument("--nfe", type=int, default=20)
    parser.add_argument("--weight", type=float, default=0.03)
    parser.add_argument("--runs", nargs="+", default=["base", "swap", "iter120", "cal128"],
                        choices=["base", "swap", "iter120", "cal128", "cal256", "mixed", "mixed128"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    from _kdiffusion import patch_centres

    flow = Mixture(patch_centres(), 0.1, schedule=flowdiff.Schedule.linear()).flow()
    cal64 = patch_centres(64, seed=2)
    swapped = torch.stack((cal64[1::2], cal64[0::2]), dim=1).reshape(cal64.shape)  # the odd ones fitted
    from bench_roundtrip import both_photos_in_each_half

    setups = {"base": (cal64, 40), "swap": (swapped, 40), "iter120": (cal64, 120),
              "cal128": (patch_centres(128, seed=2), 40), "cal256": (patch_centres(256, seed=2), 40),
              "mixed": (both_photos_in_each_half(cal64), 40),
              "mixed128": (both_photos_in_each_half(patch_centres(128, seed=2)), 40)}
    for run in args.runs:
        images, iterations = setups[run]
        print(f"{args.solver} S = {args.nfe}, latent_weight {args.weight}, {run} ({images.shape[0]} patches, "
              f"{iterations} iterations): " + one_fit(flow, images, args.solver, args.nfe, args.weight, iterations),
              flush=True)


if __name__ == "__main__":
    main()
