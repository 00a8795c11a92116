"""Per-step overhead of flowdiff's Euler (DDIM) loop against diffusers' DDIMScheduler loop.

A nearly free model (ε = 0.1·x), 500 steps, a 1×3×32×32 state, one thread; the three loops
run side by side in one process, interleaved, best of several repeats:
  bare      — ``x = x + c_i * model(x)``, the floor any sampler loop pays (the issue's yardstick);
  bare, tensor coefficients — the same with each c_i a 0-dim tensor: a Python float is wrapped into a
              new tensor on every multiplication, which on a state this small costs about as much as the
              multiplication itself, so this is the floor of a loop written with that in mind;
  diffusers — ``scheduler.step(model(x, t), t, x)`` over DDIMScheduler's timesteps;
  flowdiff  — ``flowdiff.generate(flow, noise, solver="euler", steps=500)``.

With ``--baseline DIR`` (another version's source tree, e.g. ``git archive REV | tar -x -C DIR``) that
version's ``flowdiff``/``solvers`` are imported as well and its loop runs interleaved with this one in the
same process, as "flowdiff (baseline)": on a busy machine, separate runs cannot resolve a microsecond.

Usage: python benchmarks/bench_overhead.py [--repeats 7] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path
from types import ModuleType

import torch
from diffusers import DDIMScheduler

import flowdiff
import solvers

STEPS = 500


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return x * 0.1


def bare_loop(noise: torch.Tensor, coeffs: list[float]) -> torch.Tensor:
    x = noise
    for c in coeffs:
        x = x + c * model(x, None)
    return x


def bare_tensor_loop(noise: torch.Tensor, coeffs: list[torch.Tensor]) -> torch.Tensor:
    x = noise
    for c in coeffs:
        x = x + c * model(x, None)
    return x


def diffusers_loop(sched: DDIMScheduler, noise: torch.Tensor) -> torch.Tensor:
    x = noise
    for t in sched.timesteps:
        x = sched.step(model(x, t), t, x).prev_sample
    return x


def import_baseline(root: str) -> tuple[ModuleType, ModuleType]:
    """``flowdiff`` and ``solvers`` of the source tree ``root``, beside the ones already imported.

    The current packages' entries are taken out of ``sys.modules`` while the baseline imports (so that its
    ``import solvers`` finds its own), then put back; the baseline's modules keep their own references."""
    ours = {k: v for k, v in sys.modules.items() if k.split(".")[0] in ("flowdiff", "solvers")}
    for name in ours:
        del sys.modules[name]
    sys.path.insert(0, root)
    try:
        import flowdiff as baseline

        baseline_solvers = sys.modules["solvers"]
    finally:
        sys.path.remove(root)
        for name in [k for k in sys.modules if k.split(".")[0] in ("flowdiff", "solvers")]:
            del sys.modules[name]
        sys.modules.update(ours)
    for module in (baseline, baseline_solvers):
        if not Path(module.__file__).resolve().is_relative_to(Path(root).resolve()):
            raise SystemExit(f"--baseline {root!r}: {module.__name__} came from {module.__file__}")
    return baseline, baseline_solvers


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--baseline", metavar="DIR", help="another version's source tree to time alongside")
    args = parser.parse_args()
    torch.set_num_threads(1)
    noise = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False,
                          set_alpha_to_one=True, timestep_spacing="trailing")
    sched.set_timesteps(STEPS)
    flow = flowdiff.ProbabilityFlow(model, sched.alphas_cumprod)
    coeffs = [0.001] * STEPS
    tensor_coeffs = [torch.tensor(c) for c in coeffs]

    runs = {
        "bare": lambda: bare_loop(noise, coeffs),
        "bare, tensor coefficients": lambda: bare_tensor_loop(noise, tensor_coeffs),
        "diffusers": lambda: diffusers_loop(sched, noise),
        "flowdiff": lambda: flowdiff.generate(flow, noise, solver="euler", steps=STEPS),
        "flowdiff (check_finite=False)": lambda: flowdiff.generate(flow, noise, solver="euler", steps=STEPS,
                                                                   checks=flowdiff.Checks(finite=False)),
    }
    if args.baseline:
        base, base_solvers = import_baseline(args.baseline)
        base_flow = base.ProbabilityFlow(model, sched.alphas_cumprod)
        # a baseline from before the ten-keyword surface says it as check_finite=False
        unchecked = {"checks": base.Checks(finite=False)} if hasattr(base, "Checks") else {"check_finite": False}
        runs["flowdiff (baseline)"] = lambda: base.generate(base_flow, noise, solver="euler", steps=STEPS)
        runs["flowdiff (baseline, check_finite=False)"] = lambda: base.generate(base_flow, noise, solver="euler",
                                                                                steps=STEPS, **unchecked)
        # the two halves apart: the flow's field alone (its calls at the grid's σ), and the solver loop alone
        sigmas = [float(s) for s in flowdiff.make_sigmas(flow.schedule, "trailing", STEPS)]
        for label, field in (("", flow.field()), (" (baseline)", base_flow.field())):
            runs[f"field alone{label}"] = (lambda f: lambda: [f(s, noise) for s in sigmas[:-1]])(field)
        identity = lambda t, y: y  # noqa: E731
        runs["solvers loop alone, f = y"] = lambda: solvers.solve(identity, noise, sigmas, "euler")
        runs["solvers loop alone, f = y (baseline)"] = lambda: base_solvers.solve(identity, noise, sigmas, "euler")
    for fn in runs.values():  # warm-up
        fn()
    times = {name: float("inf") for name in runs}
    for _ in range(args.repeats):  # interleave so that machine noise hits every loop alike
        for name, fn in runs.items():
            times[name] = min(times[name], best_time(fn, 1))
    ref = diffusers_loop(sched, noise)
    same = (flowdiff.generate(flow, noise, solver="euler", steps=STEPS).x - ref).abs().max() / ref.abs().max()
    print(f"# per-step overhead, {STEPS} steps, state 1x3x32x32, 1 thread, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}")
    print(f"# flowdiff vs diffusers result: max abs difference {float(same):.2e} relative to max |x| (float32)")
    print("| loop | total (ms) | per step (µs) | × bare | × diffusers |")
    print("|---|---|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {t * 1e3:.1f} | {t / STEPS * 1e6:.1f} | {t / times['bare']:.2f} | "
              f"{t / times['diffusers']:.3f} |")


if __name__ == "__main__":
    main()
