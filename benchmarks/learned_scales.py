"""Scratch experiment (issue 26 item 1): a learned per-step output scale, and a PAS-style x_T term, on top of
``learn_solver``'s best fit.

For each solver and budget: ``flowdiff.tune`` on the calibration noise (seed 1, as ``bench_learned.py``), then
``flowdiff.learn_solver`` with its default (shifts, grid, start) from that tuned grid, then, with that fit frozen,
one more parameter per evaluating step, fitted on the even half of the same calibration noise by the same
bounded least squares (``learned._fit``), and judged on the odd half:

* ``scale`` — the model's ε scaled by 1 + s_i in step i (Ning et al.'s epsilon scaling, one s per step): in
  data-prediction terms D' = (1 + s_i)·D − s_i·x̄. In the solver's own variables this is the field scaled about
  the field of a zero model (the anchor a(t, y): 0 in σ, x̄ in the data variables):
  f' = a + (1 + s_i)·(f − a). s_i = 0 is the fit as it was, bit for bit (the step is not wrapped).
* ``scale+xT`` — the same, plus the part of the initial state x_T orthogonal to this step's direction
  d = f − a, at the length of d, with a second weight w_i per step: f' = a + (1 + s_i)·d + w_i·|d|·û,
  û = (x_T − ⟨x_T, d⟩/|d|²·d)/|…| per sample. This is the two-dimensional core of PAS (Wang et al., "Diffusion
  Sampling Correction via Approximately 10 Parameters", ICML 2025: the direction corrected within the span of
  its own trajectory's leading directions, x_T among them, with coefficients shared across samples).
* ``scale+y`` — the same with the current state y in place of x_T (it lies in the same span: x_T plus the past
  steps), which a solver wrapper can see without carrying the initial state through the solve.

``--joint`` (engineer V) compares ways of fitting the scales and the x_T directions (``learn="scales"`` and
``"directions"``) on top of one ``flowdiff.learn_solver`` fit of shifts+grid+start from the tuned grid: one after the
other (the route ``learn_solver`` took before), jointly from zero, jointly from the scales alone, and jointly from the
sequential fit (the route it takes now), each judged on the held-out half as ``learn_solver`` judges (see
``joint_row``). Its ``sequential`` column reproduces engineer U's ``--directions`` figures (``RESULTS.md``), which
this script measured before that mode was replaced by this one.

The references come from the benchmark cache (``/tmp/flowdiff_bench_cache``, ``bench_learned.calibration_reference``).

Usage: python benchmarks/learned_scales.py --model digits --nfe 4,5,6 --solvers 'unipc,unipc(order=3)'
--calibration 64 [--variants scale,scale+xT] [--bound 0.5] [--joint] [--out benchmarks/results/learned_scales_digits.md]
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _kdiffusion import mixture_flow, trained_flow
from bench_learned import calibration_reference, solver_specs

import flowdiff
import solvers as _solvers
from flowdiff.engine.formulations import formulation_for
from flowdiff.tools import learned as _learned


class Scaled(_solvers.Solver):
    """``base`` with its field scaled per step about an anchor, optionally plus an x_T term (scratch wrapper)."""

    def __init__(self, base, scales: dict, anchor, weights: dict | None = None, use_state: bool = False) -> None:
        self.base, self.scales, self.anchor, self.weights = base, scales, anchor, weights or {}
        self.use_state = use_state
        self.name = f"{base.name}+scaled"
        for attr in ("order", "adaptive", "multistep", "evaluates_end", "steps_order", "fixed_grid_order",
                     "error_order"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))
        final = getattr(base, "final_method", None)
        self.final_method = None if final is None else self._wrap(final)
        if hasattr(base, "limited"):
            self.limited = lambda *a, **k: self._wrap(self.base.limited(*a, **k))
        self.y_T = [None]  # the solve's initial state, shared with the wrapped lower-order / final methods

    def _wrap(self, other):
        if other is self.base:
            return self
        out = Scaled(other, self.scales, self.anchor, self.weights, self.use_state)
        out.y_T = self.y_T
        return out

    def on_interval(self, t0, t1):
        return self._wrap(self.base.on_interval(t0, t1))

    def init(self, f, t0, y0):
        self.y_T[0] = y0
        return self.base.init(f, t0, y0)

    def step_cost(self, t0, state):
        return self.base.step_cost(t0, state)

    def step(self, f, t0, t1, y0, state):
        s, w = self.scales[(t0, t1)], self.weights.get((t0, t1), 0.0)
        if s == 0.0 and w == 0.0:
            return self.base.step(f, t0, t1, y0, state)
        y_T = self.y_T[0]

        def scaled(t, y):
            a = self.anchor(t, y)
            d = f(t, y) - a
            out = a + (1.0 + s) * d
            if w != 0.0:
                dims = tuple(range(1, d.dim()))
                dn = d.pow(2).sum(dims, keepdim=True)
                z = y if self.use_state else y_T
                u = z - (z * d).sum(dims, keepdim=True) / dn * d
                out = out + w * dn.sqrt() / u.pow(2).sum(dims, keepdim=True).sqrt() * u
            return out

        return self.base.step(scaled, t0, t1, y0, state)


def fitted_solver(fit: flowdiff.LearnedSolver, v: np.ndarray, steps: list, variant: str, anchor):
    """The learned fit with ``v`` (scales, then x_T weights) added inside its shifts."""
    n = len(steps)
    scales = {k: float(v[i]) for i, k in enumerate(steps)}
    weights = {k: float(v[n + i]) for i, k in enumerate(steps)} if variant != "scale" else None
    solver = Scaled(fit.base(), scales, anchor, weights, use_state=variant == "scale+y")
    if fit.kept and fit.shifts:
        solver = _solvers.Shifted(solver, dict(zip(steps, fit.shifts)), name=solver.name)
    return solver


def one(flow, calibration, target, name, options, nfe, tol, variants, bound, iterations) -> dict:
    started = time.perf_counter()
    tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=nfe, progress=False,
                          max_evals=60, reference_tol=tol)
    fit = flowdiff.learn_solver(flow, calibration, solver=name, solver_options=options, nfe=nfe,
                                sigmas=tuned.sigmas, reference_tol=tol)
    base_fit = fit.as_solver()
    form = formulation_for(fit.base(), "generate")
    zero_field = form.field(lambda sigma, xbar: torch.zeros_like(xbar))
    times = form.times(fit.sigmas)
    steps = list(zip(times[:-1], times[1:]))
    evaluating = [bool(s) for s in _learned._evaluated(fit.base(), list(map(float, fit.sigmas)), flow.schedule)]
    halves = {"fit": (calibration[0::2], target[0::2]), "held": (calibration[1::2], target[1::2])}

    def images(solver, part):
        with torch.no_grad():
            res = flowdiff.generate(flow, part, solver=solver, grid=fit.sigmas)
        assert res.stats.nfe <= nfe, res.stats.nfe
        return res.x.to(torch.float64)

    row = dict(solver=name + (f"({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""),
               nfe=nfe, kept=fit.kept, tuned_held=fit.base_validation_error, fit_held=fit.validation_error)
    x0 = images(base_fit, halves["held"][0])
    row["fit_held_check"] = _learned._rms(x0, halves["held"][1])
    for variant in variants:
        width = len(steps) * (1 if variant == "scale" else 2)
        free = np.array([evaluating[i % len(steps)] for i in range(width)])
        lower, upper = np.where(free, -bound, 0.0), np.where(free, bound, 0.0)
        zero = np.zeros(width)
        # s = 0 is the fit bit for bit
        same = torch.equal(images(fitted_solver(fit, zero, steps, variant, zero_field), halves["held"][0]), x0)

        def residual(v, part=halves["fit"], variant=variant):
            r = (images(fitted_solver(fit, v, steps, variant, zero_field), part[0]) - part[1]).reshape(-1).numpy()
            return r if np.all(np.isfinite(r)) else np.full_like(r, 1e6)

        r0 = residual(zero)
        objective = _learned._Objective(residual, r0, np.zeros(width))
        v = _learned._fit(objective, zero, lower, upper, free, iterations)
        r = residual(v)
        held = _learned._rms(images(fitted_solver(fit, v, steps, variant, zero_field), halves["held"][0]),
                             halves["held"][1])
        row[variant] = dict(fit_before=float(np.sqrt(np.mean(r0 * r0))), fit_after=float(np.sqrt(np.mean(r * r))),
                            held_after=held, params=[round(float(x), 4) for x in v], bit_equal=same)
    row["seconds"] = time.perf_counter() - started
    return row


def joint_row(flow, calibration, target, name, options, nfe, tol, iterations) -> dict:
    """One cell of ``--joint``: from one shifts+grid+start fit (``learn_solver``), the output scales and x_T directions
    fitted on its even half three ways, each judged on the odd half as ``learn_solver`` judges what it keeps:

    * ``sequential`` — the scales alone, then the directions alone on top (``learn_solver``'s default); the held-out
      half drops the directions, then the scales too, where that is no worse;
    * ``joint`` — both vectors in one bounded least-squares fit from zero; the held-out half picks the lowest of
      the joint fit, the scales alone (fitted alone, as the sequential route's first fit) and neither (on a tie,
      the simpler);
    * ``joint from scales`` — the same joint fit started from the scales-alone fit, judged the same way;
    * ``sequential, then joint`` — the same joint fit started from the sequential fit, judged the same way.

    The sequential route's decision is the same pick among its fit, the scales alone and neither.
    """
    started = time.perf_counter()
    tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=nfe, progress=False,
                          max_evals=60, reference_tol=tol)
    fit = flowdiff.learn_solver(flow, calibration, solver=name, solver_options=options, nfe=nfe,
                                sigmas=tuned.sigmas, reference_tol=tol, learn=("shifts", "grid", "start"))
    base = fit.base()
    n = len(fit.sigmas) - 1
    acting = np.array(_learned._scaled_steps(base, fit.sigmas, flow.schedule))
    kmask = np.concatenate([acting, np.zeros(n, bool)])
    wmask = np.concatenate([np.zeros(n, bool), acting])
    lower = np.concatenate([np.where(acting, -_learned.SCALE_BOUND, 0.0), np.where(acting, -_learned.DIRECTION_BOUND,
                                                                                     0.0)])
    upper = -lower
    zero = np.zeros(2 * n)
    shifts = fit.shifts or None
    solves = [0]

    def images(v, part):
        solver = _learned._composed(base, fit.sigmas, None, shifts, tuple(map(float, v[:n])),
                                    tuple(map(float, v[n:])))
        with torch.no_grad():
            res = flowdiff.generate(flow, part, solver=solver, grid=fit.sigmas)
        assert res.stats.nfe <= nfe, res.stats.nfe
        return res.x.to(torch.float64)

    def residual(v):
        solves[0] += 1
        r = (images(v, calibration[0::2]) - target[0::2]).reshape(-1).numpy()
        return r if np.all(np.isfinite(r)) else np.full_like(r, 1e6)

    held_cache = {}

    def held(v):
        key = v.tobytes()
        if key not in held_cache:
            held_cache[key] = _learned._rms(images(v, calibration[1::2]), target[1::2])
        return held_cache[key]

    def fitted(start, free):
        """A fit from ``start`` with its own objective (its own solve count)."""
        before = solves[0]
        objective = _learned._Objective(residual, residual(zero), np.zeros(2 * n))
        v = _learned._fit(objective, start, lower, upper, free, iterations)
        return v, solves[0] - before, float(np.sqrt(objective.cost(v) / target[0::2].numel()))

    none_held = held(zero)
    assert math.isclose(none_held, fit.validation_error, rel_tol=1e-9) or not fit.kept, (none_held, fit)
    vk, cost_k, fit_k = fitted(zero, kmask)
    vkw, cost_w, fit_seq = fitted(vk, wmask)
    # sequential, as learn_solver decides: directions dropped where no worse, then the scales too
    seq, seq_val = vkw, held(vkw)
    for dropped in (wmask, wmask | kmask):
        if np.any(seq[dropped] != 0.0):
            without = np.where(dropped, 0.0, seq)
            if held(without) <= seq_val:
                seq, seq_val = without, held(without)
    row = dict(solver=name + (f"({', '.join(f'{k}={v}' for k, v in options.items())})" if options else ""),
               nfe=nfe, kept=fit.kept, tuned_held=fit.base_validation_error, none=none_held, scales=held(vk),
               sequential=dict(held=seq_val, as_fitted=held(vkw), fit=fit_seq, solves=cost_k + cost_w,
                                              params=vkw, chosen=seq))
    for label, start, before in (("joint", zero, cost_k), ("joint from scales", vk, cost_k),
                                 ("sequential, then joint", vkw, cost_k + cost_w)):
        vj, cost_j, fit_j = fitted(start, kmask | wmask)
        # the held-out half picks among the joint fit, the scales alone and neither (the simpler on a tie)
        candidates = [(none_held, 0, zero), (held(vk), 1, vk), (held(vj), 2, vj)]
        best = min(candidates, key=lambda c: (c[0], c[1]))
        row[label] = dict(held=best[0], as_fitted=held(vj), fit=fit_j, solves=before + cost_j,
                          params=vj, chosen=best[2])
    row["seconds"] = time.perf_counter() - started
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="digits", choices=("digits", "mixture"))
    parser.add_argument("--nfe", default="4,5,6")
    parser.add_argument("--solvers", default="unipc,unipc(order=3)")
    parser.add_argument("--calibration", type=int, default=64)
    parser.add_argument("--variants", default="scale,scale+xT")
    parser.add_argument("--bound", type=float, default=0.5)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--out", default=None)
    parser.add_argument("--joint", action="store_true",
                        help="scales and directions fitted jointly against one after the other")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    flow = trained_flow() if args.model == "digits" else mixture_flow()
    tol = 1e-6 if args.model == "digits" else 1e-8
    calibration = torch.randn(args.calibration, 1, 8, 8, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(1))
    calibration_reference(flow, calibration, args.model, tol)
    target = _learned._reference(flow, calibration, None, tol)[0]
    if args.joint:
        variants = ("sequential", "joint", "joint from scales", "sequential, then joint")
        lines = [f"`python benchmarks/learned_scales.py --model {args.model} --nfe {args.nfe} --solvers "
                 f"'{args.solvers}' --calibration {args.calibration} --iterations {args.iterations} --joint`", "",
                 "Held-out half RMSE (after the held-out decisions, and the final one against the tuned grid); "
                 "in brackets as fitted, before any decision; candidate solves of the scale/direction fits.", "",
                 "| NFE | solver | tuned grid | shifts+grid+start | + scales alone | "
                 + " | ".join(f"{v} (as fitted) | solves" for v in variants) + " | joint vs sequential |",
                 "|---:|---|---:|---:|---:|" + "---:|---:|" * len(variants) + "---:|"]
        details = []
        for nfe in map(int, args.nfe.split(",")):
            for label, name, options in solver_specs(args.solvers):
                r = joint_row(flow, calibration, target, name, options, nfe, tol, args.iterations)

                def final(x, r=r):  # learn_solver's last decision: kept only if below the tuned grid
                    return x if x < r["tuned_held"] else r["tuned_held"]

                cells = [f"{final(r[v]['held']):.3e} ({r[v]['as_fitted']:.3e}) | {r[v]['solves']}" for v in variants]
                change = 100 * (final(r["joint"]["held"]) / final(r["sequential"]["held"]) - 1)
                lines.append(f"| {nfe} | {label}{'' if r['kept'] else ' (fit not kept)'} | {r['tuned_held']:.3e} | "
                             f"{final(r['none']):.3e} | {final(r['scales']):.3e} | " + " | ".join(cells)
                             + f" | {change:+.1f} % |")
                for v in variants:
                    details.append(f"- NFE {nfe} {label} {v}: fitted half RMS {r[v]['fit']:.3e}; fitted "
                                   f"{[round(float(x), 4) for x in r[v]['params']]}; kept "
                                   f"{[round(float(x), 4) for x in r[v]['chosen']]}")
                print(lines[-1], f"[{r['seconds']:.0f} s]", flush=True)
                if args.out:
                    Path(args.out).write_text("\n".join(lines + ["", "Scales, then directions, per step:", ""]
                                                         + details) + "\n")
        return
    variants = args.variants.split(",")
    lines = [f"`python benchmarks/learned_scales.py --model {args.model} --nfe {args.nfe} --solvers '{args.solvers}' "
             f"--calibration {args.calibration} --variants {args.variants} --bound {args.bound} --iterations "
             f"{args.iterations}`", "",
             "| NFE | solver | tuned grid (held-out) | shifts+grid+start (held-out) | "
             + " | ".join(f"+{v}: fit half before → after | +{v}: held-out | +{v}: held-out change" for v in variants)
             + " |", "|---:|---|---:|---:|" + "---:|---:|---:|" * len(variants)]
    details = []
    for nfe in map(int, args.nfe.split(",")):
        for label, name, options in solver_specs(args.solvers):
            row = one(flow, calibration, target, name, options, nfe, tol, variants, args.bound, args.iterations)
            assert math.isclose(row["fit_held_check"], row["fit_held"], rel_tol=1e-9), row
            cells = []
            for v in variants:
                r = row[v]
                cells.append(f"{r['fit_before']:.3e} → {r['fit_after']:.3e} | {r['held_after']:.3e} | "
                             f"{100 * (r['held_after'] / row['fit_held'] - 1):+.1f} %")
                details.append(f"- NFE {nfe} {label} +{v}: parameters {r['params']}; zero = the fit bit for bit: "
                               f"{r['bit_equal']}")
            lines.append(f"| {nfe} | {label}{'' if row['kept'] else ' (fit not kept)'} | {row['tuned_held']:.3e} | "
                         f"{row['fit_held']:.3e} | " + " | ".join(cells) + " |")
            print(lines[-1], f"[{row['seconds']:.0f} s]", flush=True)
            if args.out:
                Path(args.out).write_text("\n".join(lines + [""] + details) + "\n")
    print("\n".join(lines + [""] + details))


if __name__ == "__main__":
    main()
