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

A global error view (issue 26 item 3, engineer X): each step's estimate weighed by how its error reaches the image,
predicted by a linear transport of the local error from the step's end σ₁ to σ = 0 along the trajectory:

* ``transport=F`` — on the tail's steps (σ ≤ 1) each sample's estimate is weighed by the share times A = √(1+σ₁²)·a(q),
  clipped to [F, 1/share]: q is the sample's gain (as in ``gain=``), taken as its ∂D/∂x̄; a perturbation δx̄ obeys
  dδx̄/dσ = (I − J)·δx̄/σ, which for a locally Gaussian sample (J = s²/(s²+σ²) with s fixed, so s² = qσ²/(1 − q))
  carries δx̄ at σ₁ to s/√(s²+σ₁²)·δx̄ = √q·δx̄ at σ = 0, and an error in x = x̄/√(1+σ²) to √(1+σ₁²)·√q times
  itself; where q ≥ 1 the flow expands (no Gaussian fits) and a(q) = q is a chosen stand-in (a constant J = q over
  one e-fold of σ would carry it by e^(q−1)).
* ``amp_first=K`` — the first step's estimate weighed by K: its error is carried to the image by a factor that
  no quantity at σ_max shows (on the mixture's seed 3 the lone sample's reaches the image ×10–13, the median's about
  ×0.5; the lone sample's is amplified at σ ≈ 0.55–1.1, ``adaptive_lone_sample_global.py``), so the global view's
  worst case over the batch is applied to it.
* ``global=G`` — the transport run along the solve for each sample: E ← T·E + w·e over accepted steps (e the
  sample's estimate, w the step's weight, T the transport of an x-error over the step, (σ₁/σ₀)^(1−q)·√(1+σ₀²)/
  √(1+σ₁²), exact for constant J along the step), beside the plain sum S ← S + w·e; every later step's estimate of
  that sample is weighed by max(1, E/S)^G, the amplification of its own past errors so far (tightening only).
* ``first_shrink=K`` — the starting step estimate divided by K (a shorter first step without the rejections a
  weight K costs).
* ``probe_node`` — the starting step estimate's probe evaluation, D at ρ₀ + h₀ on the Euler line (ρ₀ = 1/σ_max,
  h₀ = 0.01·d₀/d₁ in Hairer–Nørsett–Wanner's estimate), kept as a second node of the first step's history: where
  ∂D/∂x̄ ≪ 1 (σ ≫ the data's scale) D there is D on the trajectory, so the first step — whose error the measured
  trajectory carries nearly unchanged to σ ≈ 1.6 (``adaptive_lone_sample_global.py``) — is of second order at no cost.
* ``limit_from=K`` — a generation may finish by the denoised values' limit (``flowdiff.api.adaptive.limit_is_known``)
  from σ ≤ K·σ_min on (shipped: σ ≤ σ_min): on the photo patches the tail's last two accepted steps go from about
  2.5·σ_min to below σ_min (seed 0, tol 5e-3: σ 0.025 → 0.0125 → 0.0055, ``adaptive_lone_sample_global.py --model
  patches``), where the trajectory's error no longer changes much; the check itself (the two- and three-point limits
  agree to the tolerance) still decides where to stop (engineer B2).
* ``first_reject_k=K`` — a rejected first step is retried with the controller's exponent 1/K (shipped: 1/(order + 1)
  = 1/4 for ``unipc(order=3)``), the later steps as shipped: the first step has one denoised value behind it, and
  on the photo patches it is rejected 2–3 times, the step shrinking by 0.62–0.87 each time
  (``adaptive_lone_sample_global.py --model patches``) (engineer B2).
* ``above=W`` — each step that starts above the tail (σ₀ > 1, ``SIGMA_TAIL``) judged by W times its estimate (the
  tail's steps as shipped): measured against the exact flow from the same state, the pair's estimate there is 3–16×
  the step's true local error (medians), against 2.5–4× in σ ∈ (0.1, 1] and 1× below (``adaptive_ideal_steps.py``), so
  W < 1 moves the tolerance's share toward the tail and W > 1 away from it (engineer K4).
* ``batch_rms`` — the image norm's RMS taken over the whole batch instead of each sample's, the worst deciding
  (k-diffusion's norm is over the batch too): looser for a batch whose worst sample's estimate stands out (engineer K4).
* ``retry_fit`` — a step rejected again at the same start is retried at the size the two tries' own growth calls
  for: the exponent q = log(r₂/r₁)/log(h₂/h₁) of the estimate between them (clipped to [1, order + 1]), the new
  step h₂·(safety/r₂)^(1/q). On the photo patches a rejected step's retry is often rejected again, shrunk by only
  0.85–0.9 (``adaptive_lone_sample_global.py``: seed 6 at tol 1e-3 has three such pairs): the estimate there does not
  grow like h⁴ (engineer K4; the first step's own case is ``StepController(startup_order=True)``).
* ``a+b`` — two variants at once (e.g. ``amp_first=4+transport=0.5``).

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_variants.py [--models mixture,digits] [--seeds 1,2,3]
       [--variants base,share_from=0.5,...] [--tols 3e-4,2.85e-4,...]
"""

from __future__ import annotations

import argparse
import contextlib
import math
import platform
import time

import torch
from _kdiffusion import mixture_flow, noise_shape, patch_flow, reference, rmse, trained_flow, write_report
from bench_adaptive import QUICK_TOLS, TARGETS

import flowdiff
import flowdiff.api.adaptive as adaptive
import solvers
import solvers._integrate as integrate

DEFAULT_VARIANTS = ("base,share_from=0.7,share_from=0.5,share_from=0.35,no_share,gain=1,gain=0.5,gain=0.1,"
                    "first_step=0.01,first_step=0.02,first_order1,first_cap=1,first_cap=3")


def _gain(states: dict, rho0: float, rho1: float, y0, y1):
    """Each sample's gain q (``gain=``'s) for the step ρ₀ → ρ₁ from the accepted state before ρ₀, or None."""
    before = [r for r in states if r < rho0]
    if not before:
        return None
    rp = max(before)
    yp, n = states[rp], y0.shape[0]
    slope_now, slope_before = (y1 - y0) / (rho1 - rho0), (y0 - yp) / (rho0 - rp)
    moved = (y1 / rho1 - yp / rp) / 2
    return ((slope_now - slope_before).reshape(n, -1).norm(dim=1)
            / moved.reshape(n, -1).norm(dim=1).clamp_min(1e-300))


def _per_sample_norm(memory: dict):
    """``image_norm`` that also records each sample's value (and the step's states) in ``memory["last"]``."""

    def image_norm(rtol, atol, to_x):
        def norm(error, y0, y1, t1):
            a = to_x(t1)
            ratio = (error * a).abs() / (y1.abs() * (rtol * a) + atol)
            per = ratio.pow(2).reshape(ratio.shape[0], -1).mean(1).sqrt()
            memory["last"] = (per, y0, y1)
            return per.max()
        return norm

    return image_norm


def _gain_patch(floor: float):
    """``image_norm`` and ``corrector_share`` replaced by a pair that weighs each sample by its measured gain."""
    share, memory = adaptive.corrector_share, {}

    def corrector_share(rho_from):
        inner, states = share(rho_from), {}

        def weight(rho0, rho1):
            per, y0, y1 = memory["last"]
            states[rho0] = y0  # a step starts from an accepted state
            if rho0 < rho_from:
                return 1.0
            w = inner(rho0, rho1)
            q = _gain(states, rho0, rho1, y0, y1)
            if q is None:
                return w
            g = q.clamp(min=floor, max=1.0 / w)
            return float((per * g).max() * w / per.max().clamp_min(1e-300))
        return weight

    return _per_sample_norm(memory), corrector_share


def _global_patch(kind: str, value: float):
    """``corrector_share`` (and ``image_norm``) for the global-error variants ``transport``, ``amp_first``, ``global``
    (the module docstring); each wraps the ``corrector_share`` in force, so that variants compose."""
    share, memory = adaptive.corrector_share, {}

    def corrector_share(rho_from):
        inner, states, start, acc, pending = share(rho_from), {}, [], {}, {}

        def weight(rho0, rho1):
            w = inner(rho0, rho1)
            if kind == "amp_first":
                if not start:  # the first call of a solve is its first step
                    start.append(rho0)
                return w * value if rho0 == start[0] else w
            per, y0, y1 = memory["last"]
            states[rho0] = y0
            q = _gain(states, rho0, rho1, y0, y1)
            top = per.max().clamp_min(1e-300)
            if kind == "transport":
                if rho0 < rho_from or q is None:
                    return w
                a = torch.where(q < 1, q.sqrt(), q) * math.sqrt(1.0 + 1.0 / rho1**2)
                return float((per * a.clamp(min=value, max=1.0 / w)).max() * w / top)
            # global: the transported sum of the sample's weighted estimates against their plain sum
            if rho0 in pending:  # the step that ended at ρ₀ was accepted
                acc["E"], acc["S"] = pending[rho0]
            pending.clear()
            factor = torch.ones_like(per)
            if "E" in acc and q is not None:
                carry = (rho0 / rho1) ** (1.0 - q) * math.sqrt((1.0 + rho0**-2) / (1.0 + rho1**-2))
                moved = acc["E"] * carry
                factor = (moved / acc["S"].clamp_min(1e-300)).clamp(min=1.0) ** value
            else:
                moved = acc.get("E", torch.zeros_like(per))
            pending[rho1] = (moved + per * w, acc.get("S", torch.zeros_like(per)) + per * w)
            return float((per * factor).max() * w / top)
        return weight

    return _per_sample_norm(memory), corrector_share


@contextlib.contextmanager
def patched(variant: str):
    saved = (adaptive.corrector_share, adaptive.image_norm, integrate._initial_step, integrate._ErrorRun._first,
             adaptive.limit_is_known, integrate._ErrorRun.judge)
    share, initial, first, known = saved[0], saved[2], saved[3], saved[4]
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
        elif name == "first_shrink":
            shrink = float(value)
            integrate._initial_step = lambda *a: initial(*a) / shrink
        elif name == "probe_node":
            stash = {}

            def probing(f, t0, y0, k0, d, order, norm, span):
                def keep(t, y):
                    stash["probe"] = (t, f(t, y))
                    return stash["probe"][1]
                return initial(keep, t0, y0, k0, d, order, norm, span)

            def first_with_probe(self, y, state):
                stash.clear()
                state = first(self, y, state)
                if "probe" in stash and isinstance(state, solvers.Derivative):
                    from solvers._multistep import History
                    state = History.of(state.t, state.k, (stash["probe"],))
                return state
            integrate._initial_step, integrate._ErrorRun._first = probing, first_with_probe
        elif name == "limit_from":
            times = float(value)
            # rho_from is ρ(σ_min) = 1/σ_min (or 1/σ_start below it): from ρ(K·σ_min) = rho_from/K instead
            adaptive.limit_is_known = lambda rtol, atol, rho_from: known(rtol, atol, rho_from / times)
        elif name == "first_reject_k":
            k_first, judge = int(value), saved[5]

            def judge_first(self, result, y0, t1):
                if self.t != self.spec.t0:  # an accepted step has been taken: as shipped
                    return judge(self, result, y0, t1)
                k, self.k = self.k, k_first
                try:
                    accepted = judge(self, result, y0, t1)
                finally:
                    self.k = k
                if accepted:  # the next step's size as shipped (the ratio judged, weighted as judged)
                    weight = 1.0 if self.spec.step_weight is None else self.spec.step_weight(self.spec.t0, t1)
                    ratio = float(self.norm(result.error, y0, result.y, t1)) * weight
                    factor = self.controller.factor(ratio, 1.0, self.k)
                    self.h = min(max(self.h_used * factor, self.controller.min_step), self.controller.max_step)
                return accepted
            integrate._ErrorRun.judge = judge_first
        elif name == "above":
            w_above = float(value)

            def above_share(rho_from):
                inner = share(rho_from)
                return lambda rho0, rho1: inner(rho0, rho1) if rho0 >= rho_from else w_above
            adaptive.corrector_share = above_share
        elif name == "batch_rms":
            def batch_norm(rtol, atol, to_x):
                def norm(error, y0, y1, t1):
                    a = to_x(t1)
                    return ((error * a).abs() / (y1.abs() * (rtol * a) + atol)).pow(2).mean().sqrt()
                return norm
            adaptive.image_norm = batch_norm
        elif name == "retry_fit":
            judge, last = saved[5], {}

            def judge_fit(self, result, y0, t1):
                t = self.t
                accepted = judge(self, result, y0, t1)
                if accepted:
                    last.clear()
                    return accepted
                weight = 1.0 if self.spec.step_weight is None else self.spec.step_weight(t, t1)
                ratio = float(self.norm(result.error, y0, result.y, t1)) * weight
                before = last.get("try")
                if before is not None and before[0] == t and before[1] > self.h_used and ratio > 0:
                    q = math.log(before[2] / ratio) / math.log(before[1] / self.h_used)
                    q = min(max(q, 1.0), float(self.k))
                    factor = min(self.controller.safety * ratio ** (-1.0 / q), 1.0)
                    factor = max(factor, self.controller.factor_min)
                    self.h = min(max(self.h_used * factor, self.controller.min_step), self.controller.max_step)
                last["try"] = (t, self.h_used, ratio)
                return accepted
            integrate._ErrorRun.judge = judge_fit
        elif name in ("transport", "amp_first", "global"):
            adaptive.image_norm, adaptive.corrector_share = _global_patch(name, float(value))
        elif name != "base":
            raise ValueError(f"unknown variant {variant!r}")
        yield options
    finally:
        (adaptive.corrector_share, adaptive.image_norm, integrate._initial_step, integrate._ErrorRun._first,
         adaptive.limit_is_known, integrate._ErrorRun.judge) = saved


def sweep(flow, noise, ref, variant, tols=QUICK_TOLS, targets=TARGETS):
    """(fewest NFE per target or None, the precision–work points) over ``tols`` (``QUICK_TOLS``), loose to tight,
    stopping at the first run that meets the tightest of ``targets``."""
    best, points = dict.fromkeys(targets), []
    with contextlib.ExitStack() as stack:
        options = {}
        for part in variant.split("+"):
            options.update(stack.enter_context(patched(part)))
        for tol in tols:
            with torch.no_grad():
                r = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                                      adaptive=flowdiff.Adaptive(rtol=tol, atol=tol, **options))
            e = rmse(r.x, ref)
            points.append(f"{tol:g}: {r.stats.nfe}, {e:.1e}")
            for t in targets:
                if e <= t and (best[t] is None or r.stats.nfe < best[t]):
                    best[t] = r.stats.nfe
            if e <= min(targets):
                break
    return best, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--tols", default=None, help="comma-separated tolerances (default: bench_adaptive's --quick)")
    parser.add_argument("--targets", default=",".join(f"{t:g}" for t in TARGETS),
                        help="RMSE targets; each sweep stops at the tightest (1e-3 alone for the trained model)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    targets = tuple(sorted((float(t) for t in args.targets.split(",")), reverse=True))
    tols = QUICK_TOLS if args.tols is None else sorted((float(t) for t in args.tols.split(",")), reverse=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    given = "" if args.tols is None else f" --tols {args.tols}"
    swept = "bench_adaptive's --quick tolerances" if args.tols is None else "the tolerances given"
    lines = [f"`cd benchmarks; PYTHONPATH=.. python adaptive_lone_sample_variants.py --models {args.models} --seeds "
             f"{args.seeds} --variants {args.variants}{given}"
             f"{'' if targets == TARGETS else f' --targets {args.targets}'}` — {platform.machine()}, "
             f"torch {torch.__version__}, "
             f"1 thread, float64; fewest NFE of adaptive unipc(order=3) to batch RMSE "
             f"{' / '.join(f'≤ {t:g}' for t in targets)} over {swept}.",
             "", "| model | seed | variant | 1e-3 | 1e-4 | tol: NFE, RMSE |", "|---|---:|---|---:|---:|---|"]
    for key in args.models.split(","):
        flow = {"mixture": mixture_flow, "patches": patch_flow, "digits": trained_flow}[key]()
        for seed in (int(s) for s in args.seeds.split(",")):
            gen = torch.Generator().manual_seed(seed)
            noise = torch.randn(16, *noise_shape(key), dtype=torch.float64, generator=gen)
            ref, _, _ = reference(flow, noise, cache_key=key)
            for variant in args.variants.split(","):
                best, points = sweep(flow, noise, ref, variant, tols, targets)
                cells = " | ".join("not run" if t not in best else "not reached" if best[t] is None else str(best[t])
                                   for t in TARGETS)
                lines.append(f"| {key} | {seed} | {variant} | {cells} | {'; '.join(points)} |")
                print(lines[-1], flush=True)
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
