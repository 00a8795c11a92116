"""Does a calibration batch with more weight on near-boundary samples land more of the mixture's samples?

On the closed-form mixture (``_kdiffusion.mixture_flow``) a few per cent of the samples land on another training image
than the reference's at NFE 8–10 and set the RMSE (``mixture_flips.py``, ``bench_learned.py``). Here the calibration
batch is the first 1,024 samples of seed 1 (the batch of ``bench_learned.py --calibration 1024``) plus, ``w`` times
each, the samples of that seed's next 3,072 that ``unipc`` on its ``trailing`` grid sends to another image at the
budget (near-boundary samples, found without any evaluation noise); each copy stays in its half (even indices are
fitted, odd held out), so ``tune``'s and ``learn_solver``'s held-out halves stay held out. For each weight, solver
and budget: ``flowdiff.tune`` (dp+search, 60 candidate solves) then ``flowdiff.learn_solver`` (shifts and grid) on
that grid, both measured on a **held-out batch** (seed 5, 1,024 samples) — not the evaluation noise (seed 0) of
``bench_learned.py``, so what is learned here does not choose anything measured there.

Usage: python benchmarks/mixture_weighting.py [--nfe 10,8] [--solvers ipndm,unipc] [--weights 0,1,2]
[--out benchmarks/results/mixture_weighting.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch
from _kdiffusion import mixture_centres, mixture_flow, per_sample_error
from _pooled import nearest
from bench_frontier import evaluation_reference

import flowdiff
import solvers

CALIBRATION_SEED, HELD_OUT_SEED = 1, 5


def batch(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def weighted(cal: torch.Tensor, extra: torch.Tensor, w: int) -> tuple[torch.Tensor, int]:
    """``cal`` with ``w`` copies of each of ``extra``, every copy of a sample in the same half (even / odd index),
    and how many of ``extra`` it holds: the halves are interleaved pairwise, so of an odd number the last is left
    out."""
    a, b = extra[0::2], extra[1::2]
    m = min(len(a), len(b))
    fit = torch.cat([cal[0::2]] + [a[:m]] * w)
    held = torch.cat([cal[1::2]] + [b[:m]] * w)
    out = torch.empty(2 * len(fit), *cal.shape[1:], dtype=cal.dtype)
    out[0::2], out[1::2] = fit, held
    return out, 2 * m


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", default="10,8")
    parser.add_argument("--solvers", default="ipndm,unipc")
    parser.add_argument("--weights", default="0,1,2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    flow, centres = mixture_flow(), mixture_centres()
    held = batch(HELD_OUT_SEED, 1024)
    held_ref = evaluation_reference(flow, held, "mixture-held", 1e-8).x
    held_target = nearest(held_ref, centres)
    pool = batch(CALIBRATION_SEED, 4096)
    pool_ref = evaluation_reference(flow, pool, "mixture-pool", 1e-8).x
    cal = pool[:1024]

    def measure(solver, sigmas) -> str:
        with torch.no_grad():
            x = flowdiff.generate(flow, held, solver=solver, grid=sigmas).x
        err = per_sample_error(x, held_ref)
        off = nearest(x, centres) != held_target
        return (f"{float(err.pow(2).mean().sqrt()):.3e} | {int(off.sum())} | "
                f"{float(err[~off].pow(2).mean().sqrt()):.2e}")

    lines = ["## Near-boundary calibration samples weighted more (`mixture_weighting.py`)", "",
             f"`python benchmarks/mixture_weighting.py --nfe {args.nfe} --solvers {args.solvers} --weights "
             f"{args.weights}` — {platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
             "float64. Held-out batch: seed 5, 1,024 samples; RMSE, how many land on another training image, and the "
             "RMSE of the others.", "",
             "| NFE | near-boundary samples added, of those found (in 3,072) | solver | weight | calibration batch | "
             "tuned: RMSE | elsewhere | RMSE of the rest | learned shifts+grid: RMSE | elsewhere | RMSE of the rest |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for nfe in map(int, args.nfe.split(",")):
        with torch.no_grad():
            x = flowdiff.generate(flow, pool, solver="unipc", nfe=nfe, grid="trailing").x
        hard = nearest(x, centres) != nearest(pool_ref, centres)
        hard[:1024] = False
        extra = pool[hard]
        for solver in args.solvers.split(","):
            for w in map(int, args.weights.split(",")):
                noise, used = weighted(cal, extra, w)
                tuned = flowdiff.tune(flow, noise, solver=solver, nfe=nfe, progress=False, max_evals=60,
                                      reference_tol=1e-8)
                learned = flowdiff.learn_solver(flow, noise, solver=solver, nfe=nfe, sigmas=tuned.sigmas,
                                                reference_tol=1e-8)
                fit = measure(learned.as_solver(), learned.sigmas) if learned.kept else "rejected | | "
                lines.append(f"| {nfe} | {used} of {len(extra)} | {solver} | {w} | {len(noise)} | "
                             f"{measure(solvers.get(solver), tuned.sigmas)} | {fit} |")
                print(lines[-1], flush=True)
    lines += ["", f"Total wall time {time.perf_counter() - started:.0f} s.", ""]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
