"""Candidate fixes for the lone sample of seed 3 (``adaptive_lone_sample.py``), measured as
``bench_adaptive.py --quick`` measures flowdiff: fewest NFE of adaptive ``unipc(order=3)`` to batch RMSE ≤ 1e-3 and
≤ 1e-4 over its tolerance sweep.

Each variant is patched in at run time (nothing in the library changes; the patches are undone after each run):

* ``base`` — as shipped.
* ``share_from=S`` — the tail's corrector share (``flowdiff.api.adaptive.corrector_share``) only on steps that start at
  σ ≤ S (shipped: σ ≤ 1, ``SIGMA_TAIL``); the warp in u = 1/√(1+σ²) still from σ = 1.
* ``no_share`` — the warp kept, the estimate not weighted.
* ``gain=F`` — the share times each sample's measured gain of the denoiser along its trajectory,
  q = ‖D̄ₙ − D̄ₙ₋₁‖ / ‖(x̄ₙ₊₁ − x̄ₙ₋₁)/2‖ (D̄ the mean slope dy/dρ = D over a step, from the accepted states: no
  evaluation), clipped to [F, 1/share]: the share assumes ∂D/∂x̄ ≈ I; for a Gaussian q equals ∂D/∂x̄ exactly
  (dD = J·dx̄ along its trajectory), and a sample between two modes has q > 1.
* ``first_step=H`` — the first step given, in ρ = 1/σ (no probe evaluation).
* ``first_order1`` — Hairer–Nørsett–Wanner's starting step with the exponent of the first step's own order (1: one
  denoised value), not the method's.
* ``first_cap=C`` — the starting step estimate capped at C·ρ₀ (C = 1: the first step at most halves σ).

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_variants.py [--models mixture,digits] [--seeds 1,2,3]
       [--variants base,share_from=0.5,...]
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import time

import torch
from _kdiffusion import mixture_flow, reference, rmse, trained_flow
from bench_adaptive import QUICK_TOLS, TARGETS

import flowdiff
import flowdiff.api.adaptive as adaptive
import solvers
import solvers._integrate as integrate

DEFAULT_VARIANTS = ("base,share_from=0.7,share_from=0.5,share_from=0.35,no_share,gain=1,gain=0.5,gain=0.1,"
                    "first_step=0.01,first_step=0.02,first_order1,first_cap=1,first_cap=3")


def _gain_patch(floor: float):
    """``image_norm`` and ``corrector_share`` replaced by a pair that weighs each sample by its measured gain."""
    share, memory = adaptive.corrector_share, {}

    def image_norm(rtol, atol, to_x):
        memory.clear()

        def norm(error, y0, y1, t1):
            a = to_x(t1)
            ratio = (error * a).abs() / (y1.abs() * (rtol * a) + atol)
            per = ratio.pow(2).reshape(ratio.shape[0], -1).mean(1).sqrt()
            memory["last"] = (per, y0, y1)
            return per.max()
        return norm

    def corrector_share(rho_from):
        inner = share(rho_from)

        def weight(rho0, rho1):
            per, y0, y1 = memory["last"]
            states = memory.setdefault("states", {})
            states[rho0] = y0  # a step starts from an accepted state
            if rho0 < rho_from:
                return 1.0
            w = inner(rho0, rho1)
            before = [r for r in states if r < rho0]
            if not before:
                return w
            rp = max(before)
            yp = states[rp]
            n = y0.shape[0]
            slope_now, slope_before = (y1 - y0) / (rho1 - rho0), (y0 - yp) / (rho0 - rp)
            moved = (y1 / rho1 - yp / rp) / 2
            q = ((slope_now - slope_before).reshape(n, -1).norm(dim=1)
                 / moved.reshape(n, -1).norm(dim=1).clamp_min(1e-300))
            g = q.clamp(min=floor, max=1.0 / w)
            return float((per * g).max() * w / per.max().clamp_min(1e-300))
        return weight

    return image_norm, corrector_share


@contextlib.contextmanager
def patched(variant: str):
    saved = (adaptive.corrector_share, adaptive.image_norm, integrate._initial_step, integrate._ErrorRun._first)
    share, initial, first = saved[0], saved[2], saved[3]
    name, _, value = variant.partition("=")
    options = {}
    try:
        if name == "share_from":
            sigma = float(value)
            adaptive.corrector_share = lambda rho_from: share(max(rho_from, 1.0 / sigma))
        elif name == "no_share":
            adaptive.corrector_share = lambda rho_from: (lambda rho0, rho1: 1.0)
        elif name == "gain":
            adaptive.image_norm, adaptive.corrector_share = _gain_patch(float(value))
        elif name == "first_step":
            options["first_step"] = float(value)
        elif name == "first_order1":
            integrate._initial_step = lambda f, t0, y0, k0, d, order, norm, span: initial(f, t0, y0, k0, d, 1, norm,
                                                                                         span)
        elif name == "first_cap":
            cap = float(value)

            def capped(self, y, state):
                state = first(self, y, state)
                self.h = min(self.h, cap * abs(self.t))
                return state
            integrate._ErrorRun._first = capped
        elif name != "base":
            raise ValueError(f"unknown variant {variant!r}")
        yield options
    finally:
        (adaptive.corrector_share, adaptive.image_norm, integrate._initial_step, integrate._ErrorRun._first) = saved


def sweep(flow, noise, ref, variant):
    """(fewest NFE per target or None, the precision–work points) over ``QUICK_TOLS``, loose to tight."""
    best, points = dict.fromkeys(TARGETS), []
    with patched(variant) as options:
        for tol in QUICK_TOLS:
            with torch.no_grad():
                r = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                                      adaptive=flowdiff.Adaptive(rtol=tol, atol=tol, **options))
            e = rmse(r.x, ref)
            points.append(f"{tol:g}: {r.stats.nfe}, {e:.1e}")
            for t in TARGETS:
                if e <= t and (best[t] is None or r.stats.nfe < best[t]):
                    best[t] = r.stats.nfe
            if e <= min(TARGETS):
                break
    return best, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    lines = [f"`cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_variants.py --models {args.models} --seeds "
             f"{args.seeds} --variants {args.variants}` — {platform.machine()}, torch {torch.__version__}, 1 thread, "
             "float64; fewest NFE of adaptive unipc(order=3) to batch RMSE ≤ 1e-3 / ≤ 1e-4 over bench_adaptive's "
             "--quick tolerances.", "", "| model | seed | variant | 1e-3 | 1e-4 | tol: NFE, RMSE |",
             "|---|---:|---|---:|---:|---|"]
    for key in args.models.split(","):
        flow = mixture_flow() if key == "mixture" else trained_flow()
        for seed in (int(s) for s in args.seeds.split(",")):
            noise = torch.randn(16, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            ref, _, _ = reference(flow, noise, cache_key=key)
            for variant in args.variants.split(","):
                best, points = sweep(flow, noise, ref, variant)
                cells = " | ".join("not reached" if best[t] is None else str(best[t]) for t in TARGETS)
                lines.append(f"| {key} | {seed} | {variant} | {cells} | {'; '.join(points)} |")
                print(lines[-1], flush=True)
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text)
    print(text)


if __name__ == "__main__":
    main()
