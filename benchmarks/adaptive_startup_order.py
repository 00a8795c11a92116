"""Adaptive ``unipc(order=3)`` with ``StepController(startup_order=True)`` against the shipped controller (issue 26
item 3, engineer K3).

The shipped controller shrinks a rejected step by ``0.9·r^(-1/4)``, the exponent of the method's full order; the first
step's estimate has one denoised value behind it and grows like h², not h⁴ (on the photo patches the ratio fell
1.76 → 1.21 for a step 0.78× as long, and the step was rejected 2–3 times). With ``startup_order`` each step's
exponent is that of its own estimate (1/2, 1/3, then 1/4). Both are run as ``bench_adaptive.py --quick`` runs flowdiff's
one-knob sweep (rtol = atol = tol over its 13 tolerances, loose to tight, stopping at the first run that meets the
tightest target), on the same noise and references:

* ``--models mixture,patches --seeds …`` (default): fewest NFE at each target, and the rejected steps summed over every
  run of each sweep;
* ``--tols a,b,…``: every tolerance given, no stop (NFE and RMSE per run: the trained model's scatter);
* ``--heldout``: ``adaptive_heldout.py`` (each side's setting chosen on seeds 1–3, run on 4–6) with ``startup_order``
  in flowdiff's multistep controller, i.e. in both of its sweeps (the k-diffusion side is unchanged);
* ``--bench ARGS``: ``bench_adaptive.py ARGS`` (e.g. ``--quick --models digits --seed 3 --targets 1e-3``) likewise;
* ``--trace MODEL,SEED,TOL``: the first steps tried by one solve of each controller — σ₀ → σ₁, the step h in ρ = 1/σ,
  the error ratio r (the image norm times the step's weight; accepted when ≤ 1) and, between two tries of one step,
  the growth exponent log(r₁/r₂)/log(h₁/h₂) the controller would need to know.

Usage: cd benchmarks; PYTHONPATH=.. python adaptive_startup_order.py [--models mixture,patches] [--seeds 0,1,2,3]
       [--targets 1e-3,1e-4] [--tols …] [--controllers shipped,startup_order,pi,pi+startup_order] [--out FILE]
       PYTHONPATH=.. python adaptive_startup_order.py --heldout [adaptive_heldout.py's arguments]
       PYTHONPATH=.. python adaptive_startup_order.py --bench [bench_adaptive.py's arguments]
       PYTHONPATH=.. python adaptive_startup_order.py --trace patches,0,5e-3 [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import platform
import sys
import time

import torch
from _kdiffusion import mixture_flow, noise_shape, patch_flow, reference, rmse, trained_flow, write_report
from bench_adaptive import QUICK_TOLS

import flowdiff
import flowdiff.api.adaptive as adaptive
import solvers

#: ``pi``: Hairer's PI controller (exponents 0.7/k on the newest ratio, 0.4/k on the previous one; Gustafsson's
#: form), for comparison, with and without the field.
CONTROLLERS = {"shipped": adaptive.MULTISTEP_CONTROLLER,
               "startup_order": dataclasses.replace(adaptive.MULTISTEP_CONTROLLER, startup_order=True),
               "pi": dataclasses.replace(adaptive.MULTISTEP_CONTROLLER, icoeff=0.7, pcoeff=0.4),
               "pi+startup_order": dataclasses.replace(adaptive.MULTISTEP_CONTROLLER, icoeff=0.7, pcoeff=0.4,
                                                       startup_order=True)}


@contextlib.contextmanager
def startup_order_by_default():
    """flowdiff's default multistep controller with ``startup_order=True`` (what ``Adaptive(controller=...)`` gives one
    solve), for the scripts that build their own ``Adaptive``; put back afterwards."""
    saved = adaptive.MULTISTEP_CONTROLLER
    adaptive.MULTISTEP_CONTROLLER = CONTROLLERS["startup_order"]
    try:
        yield
    finally:
        adaptive.MULTISTEP_CONTROLLER = saved


def sweep(flow, noise, ref, controller, tols, targets, stop=True) -> tuple[dict, int, list[tuple]]:
    """(fewest NFE per target or None, rejected steps over the runs, (tol, NFE, rejected, RMSE) of each run)."""
    best, rejected, runs = dict.fromkeys(targets), 0, []
    for tol in tols:
        with torch.no_grad():
            r = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                                  adaptive=flowdiff.Adaptive(rtol=tol, atol=tol, controller=controller))
        e = rmse(r.x, ref)
        rejected += r.stats.rejected
        runs.append((tol, r.stats.nfe, r.stats.rejected, e))
        for t in targets:
            if e <= t and (best[t] is None or r.stats.nfe < best[t]):
                best[t] = r.stats.nfe
        if stop and e <= min(targets):
            break
    return best, rejected, runs


def trace(key: str, seed: int, tol: float, controller, steps: int = 8) -> list[str]:
    """The first ``steps`` steps tried by one solve: rows of σ₀, σ₁, h, r, accepted, and the measured exponent."""
    import solvers._integrate as integrate

    flow = {"mixture": mixture_flow, "patches": patch_flow, "digits": trained_flow}[key]()
    noise = torch.randn(16, *noise_shape(key), dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    judge, tried = integrate._ErrorRun.judge, []

    def recording(self, result, y0, t1):
        t = self.t
        ratio = float(self.norm(result.error, y0, result.y, t1))
        if self.spec.step_weight is not None:
            ratio *= self.spec.step_weight(t, t1)
        accepted = judge(self, result, y0, t1)
        tried.append((t, t1, self.h_used, ratio, accepted))
        return accepted

    integrate._ErrorRun.judge = recording
    try:
        with torch.no_grad():
            r = flowdiff.generate(flow, noise, solver=solvers.get("unipc", order=3),
                                  adaptive=flowdiff.Adaptive(rtol=tol, atol=tol, controller=controller))
    finally:
        integrate._ErrorRun.judge = judge
    rows = [f"NFE {r.stats.nfe}, rejected {r.stats.rejected}", "", "| σ₀ → σ₁ | h (in ρ) | r | | exponent |",
            "|---|---:|---:|---|---:|"]
    for i, (t0, t1, h, ratio, accepted) in enumerate(tried[:steps]):
        grow = ""
        if i and tried[i - 1][0] == t0 and not tried[i - 1][4]:  # a retry of the step before
            grow = f"{math.log(tried[i - 1][3] / ratio) / math.log(tried[i - 1][2] / h):.2f}"
        rows.append(f"| {1 / t0:.4g} → {1 / t1:.4g} | {h:.4g} | {ratio:.3g} | {'ok' if accepted else '✗'} | {grow} |")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--heldout", "--bench"):
        import adaptive_heldout
        import bench_adaptive

        script = {"--heldout": adaptive_heldout, "--bench": bench_adaptive}[sys.argv[1]]
        given = sys.argv[1:]
        sys.argv = [script.__file__, *sys.argv[2:]]
        with startup_order_by_default():
            script.main()
        if "--out" in given:  # say in the report which controller made it
            out = given[given.index("--out") + 1]
            with open(out) as fh:
                text = fh.read()
            with open(out, "w") as fh:
                fh.write("With `StepController(startup_order=True)` as flowdiff's multistep controller: `cd "
                         f"benchmarks; PYTHONPATH=.. python adaptive_startup_order.py {' '.join(given)}`, which ran:"
                         f"\n\n{text}")
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--trace":
        key, seed, tol = sys.argv[2].split(",")
        lines = [f"`cd benchmarks; PYTHONPATH=.. python adaptive_startup_order.py --trace {sys.argv[2]}` — adaptive "
                 f"unipc(order=3), tol {tol}, {key} seed {seed}, float64, batch 16: the first steps tried.", ""]
        for name, controller in CONTROLLERS.items():
            lines += [f"**{name}**: ", *trace(key, int(seed), float(tol), controller), ""]
        write_report(lines, sys.argv[4] if sys.argv[3:4] == ["--out"] else None)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="mixture,patches")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--targets", default="1e-3,1e-4")
    parser.add_argument("--tols", default=None, help="comma-separated tolerances, each run (no stop)")
    parser.add_argument("--controllers", default="shipped,startup_order", help=f"of {', '.join(CONTROLLERS)}")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    targets = tuple(sorted((float(t) for t in args.targets.split(",")), reverse=True))
    tols = QUICK_TOLS if args.tols is None else sorted((float(t) for t in args.tols.split(",")), reverse=True)
    torch.set_num_threads(1)
    started = time.perf_counter()
    unknown = set(args.controllers.split(",")) - set(CONTROLLERS)
    if unknown:
        parser.error(f"--controllers: unknown {sorted(unknown)}; accepted: {', '.join(CONTROLLERS)}")
    given = ("" if args.tols is None else f" --tols {args.tols}") + (
        "" if args.controllers == "shipped,startup_order" else f" --controllers {args.controllers}")
    lines = [f"`cd benchmarks; PYTHONPATH=.. python adaptive_startup_order.py --models {args.models} --seeds "
             f"{args.seeds} --targets {args.targets}{given}` — {platform.machine()}, torch {torch.__version__}, 1 "
             "thread, float64, batch 16; adaptive unipc(order=3), rtol = atol = tol over "
             + ("bench_adaptive's --quick tolerances (loose to tight, stopping at the first run that meets the "
                "tightest target)" if args.tols is None else "the tolerances given (every one run)")
             + ". Rejected: steps rejected, summed over the runs of the sweep.", "",
             "| model | seed | controller | " + " | ".join(f"fewest NFE, RMSE ≤ {t:g}" for t in targets)
             + " | rejected | tol: NFE, rejected, RMSE |", "|---|---:|---|" + "---:|" * (len(targets) + 1) + "---|"]
    for key in args.models.split(","):
        flow = {"mixture": mixture_flow, "patches": patch_flow, "digits": trained_flow}[key]()
        for seed in (int(s) for s in args.seeds.split(",")):
            noise = torch.randn(16, *noise_shape(key), dtype=torch.float64,
                                generator=torch.Generator().manual_seed(seed))
            ref = reference(flow, noise, cache_key=key)[0]
            for name in args.controllers.split(","):
                controller = CONTROLLERS[name]
                best, rejected, runs = sweep(flow, noise, ref, controller, tols, targets, stop=args.tols is None)
                points = [f"{tol:g}: {nfe}, {rej}, {e:.1e}" for tol, nfe, rej, e in runs]
                cells = " | ".join("not reached" if best[t] is None else str(best[t]) for t in targets)
                lines.append(f"| {key} | {seed} | {name} | {cells} | {rejected} | {'; '.join(points)} |")
                print(lines[-1], flush=True)
    lines += ["", f"({time.perf_counter() - started:.0f} s)"]
    write_report(lines, args.out)


if __name__ == "__main__":
    main()
