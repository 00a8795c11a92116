"""Why issue 26 item 1 misses on the photo patches at NFE 20 and NFE 8: a diagnosis, not a benchmark entry.

The photo-patch density (``_kdiffusion.patch_flow``: 200 grey 16×16 patches, bandwidth 0.1) on the noise of
``bench_learned.py --models patches --batch 1024 --calibration 1024 --seed 0`` (evaluation seed 0, calibration
seed 1; float64 references at tolerance 1e-8 from ``/tmp/flowdiff_bench_cache``).

``--part nfe20``: the tuned ``dpmpp_3m`` grid that ``bench_learned.py`` picked at NFE 20 (its σ are copied from
``results/learned_patches_eval1024_cal1024_evals150_directions_nfe20.md``, ``GRID20``), the flowdiff solvers of
that run on named grids, and k-diffusion's samplers (``bench_lownfe.run_kdiffusion``; the best peer of that run
was k-diffusion ``dpmpp_2m`` on the model's grid), on both batches:

* per candidate: RMSE, how many samples land on another patch than the reference's (a basin flip) and their share
  of the squared error, how many samples are more than 10× the median error off, the RMSE without the flips;
* on the calibration batch, the even (fitted) and odd (held-out) halves apart, as ``learn_solver`` splits it;
* the overlap of the pick's and the best peer's flips, the samples every candidate flips, and the per-sample
  oracle (each sample's smallest error over flowdiff's candidates) against the best peer;
* the flips of ``dpmpp_3m`` / ``unipc`` on the log-SNR grid at larger budgets (are they a property of NFE 20?).

``--part nfe8``: ``flowdiff.tune`` then ``flowdiff.learn_solver`` at NFE 8 (or ``--nfe``; ``--max-evals 150``, 8
iterations, as ``bench_learned.py`` ran them) for each of ``--solvers``, once with the scales label (shifts, grid,
start, scales) and once with the full default; per-sample errors on the held-out (odd) half of the calibration
batch and on the evaluation noise; the relative gains 1 − RMSE(to) / RMSE(from) between the tuned grid, the scales
fit and the full default, each with a paired bootstrap over the held-out samples (``--resamples``), and what a
keep rule "gain > z · bootstrap SD" would have decided.

Usage: python benchmarks/patches_misses.py --part nfe20|nfe8 [--solvers 'unipc,ipndm(order=3)'] [--out FILE]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings
from pathlib import Path

import torch
from _kdiffusion import load_kdiffusion_sampling, noise_shape, patch_centres, patch_flow, per_sample_error
from _pooled import nearest
from bench_frontier import evaluation_reference
from bench_learned import calibration_reference, solver_specs
from bench_lownfe import run_kdiffusion

import flowdiff
import solvers

#: the NFE 20 pick of engineer M's run (``dpmpp_3m`` on its tuned grid), as printed in its result file
GRID20 = (157.4, 68.93, 37.45, 21.63, 12.96, 7.966, 4.992, 3.177, 2.048, 1.335, 0.8784, 0.5829, 0.3897, 0.2623,
          0.1776, 0.1209, 0.08277, 0.03895, 0.0269, 0.01866, 0.0)
SCALES = ("shifts", "grid", "start", "scales")
FULL = ("shifts", "grid", "start", "scales", "directions")


def batches(seed: int, batch: int, cal_batch: int):
    flow = patch_flow()
    noise = torch.randn(batch, *noise_shape("patches"), dtype=torch.float64,
                        generator=torch.Generator().manual_seed(seed))
    calibration = torch.randn(cal_batch, *noise_shape("patches"), dtype=torch.float64,
                              generator=torch.Generator().manual_seed(seed + 1))
    ref = evaluation_reference(flow, noise, "patches", 1e-8).x
    cal_ref = evaluation_reference(flow, calibration, "patches-cal", 1e-8).x
    return flow, noise, calibration, ref, cal_ref


def rms(err: torch.Tensor) -> float:
    return float(err.pow(2).mean().sqrt())


def flip_stats(err: torch.Tensor, off: torch.Tensor) -> str:
    """``n flips (share of squared error) | n > 10× median | fewest samples holding half the squared error | RMSE |
    RMSE without flips``."""
    share = float(err[off].pow(2).sum() / err.pow(2).sum())
    far = int((err > 10 * err.median()).sum())
    sq = err.pow(2).sort(descending=True).values
    half = int((sq.cumsum(0) < 0.5 * sq.sum()).sum()) + 1
    return f"{int(off.sum())} ({share:.0%}) | {far} | {half} | {rms(err):.3e} | {rms(err[~off]):.3e}"


def part_nfe20(args, lines: list[str]) -> None:
    flow, noise, calibration, ref, cal_ref = batches(args.seed, args.batch, args.calibration)
    centres = patch_centres()
    K = load_kdiffusion_sampling()
    target = {"evaluation": nearest(ref, centres), "calibration": nearest(cal_ref, centres)}
    refs = {"evaluation": ref, "calibration": cal_ref}
    inputs = {"evaluation": noise, "calibration": calibration}
    rows: dict[str, dict[str, dict]] = {"evaluation": {}, "calibration": {}}
    for which in rows:
        grid = torch.tensor(GRID20, dtype=torch.float64)
        cands = [("dpmpp_3m tuned grid (the pick)", "dpmpp_3m", {}, grid)]
        for label, name, options in solver_specs("unipc,ipndm(order=3),dpmpp_3m"):
            for g in ("logsnr", "karras", "trailing"):
                cands.append((f"{label} {g}", name, options, g))
        for label, name, options, g in cands:
            kw = dict(nfe=20, grid=g) if isinstance(g, str) else dict(grid=g.numpy())
            with torch.no_grad():
                x = flowdiff.generate(flow, inputs[which], solver=solvers.get(name, **options), **kw).x
            rows[which][label] = dict(err=per_sample_error(x, refs[which]),
                                      off=nearest(x, centres) != target[which], lib="flowdiff")
        for r in run_kdiffusion(K, flow, inputs[which], refs[which], 20):
            rows[which][f"k-diffusion {r['solver']} {r['grid']}"] = dict(
                err=r["per_sample"], off=nearest(r["x"], centres) != target[which], lib="k-diffusion")
    pick = "dpmpp_3m tuned grid (the pick)"
    ev = rows["evaluation"]
    peer = min((k for k in ev if ev[k]["lib"] == "k-diffusion"), key=lambda k: rms(ev[k]["err"]))
    peer_rmse = rms(ev[peer]["err"])
    lines += ["### NFE 20: basin flips on the evaluation noise (1,024 samples)", "",
              f"Best k-diffusion configuration on the evaluation noise: **{peer}**, RMSE {peer_rmse:.3e}.", "",
              "| candidate | flips (share of squared error) | > 10× median | half the error in | RMSE | "
              "RMSE without its flips | / peer |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for k, r in sorted(ev.items(), key=lambda kv: rms(kv[1]["err"])):
        lines.append(f"| {k} | {flip_stats(r['err'], r['off'])} | {rms(r['err']) / peer_rmse:.2f}× |")
    cal = rows["calibration"]
    lines += ["", "### NFE 20: the calibration batch's halves (even = fitted by `learn_solver`, odd = held out)", "",
              "| candidate | half | flips (share) | > 10× median | half the error in | RMSE | RMSE without its flips |",
              "|---|---|---:|---:|---:|---:|---:|"]
    cal_peer = min((k for k in cal if cal[k]["lib"] == "k-diffusion"), key=lambda k: rms(cal[k]["err"]))
    for k in (pick, cal_peer):
        for half, sl in (("even (fit)", slice(0, None, 2)), ("odd (held out)", slice(1, None, 2))):
            lines.append(f"| {k} | {half} | {flip_stats(cal[k]['err'][sl], cal[k]['off'][sl])} |")
    lines += ["", "### NFE 20: who flips which sample", ""]
    for which in ("evaluation", "calibration"):
        rs = rows[which]
        p_off, q_off = rs[pick]["off"], rs[peer if which == "evaluation" else cal_peer]["off"]
        ours = [k for k in rs if rs[k]["lib"] == "flowdiff"]
        every_ours = torch.stack([rs[k]["off"] for k in ours]).all(0)
        every = torch.stack([r["off"] for r in rs.values()]).all(0)
        any_ = torch.stack([r["off"] for r in rs.values()]).any(0)
        oracle = torch.stack([rs[k]["err"] for k in ours]).min(0).values
        oracle_all = torch.stack([r["err"] for r in rs.values()]).min(0).values
        q_err = rs[peer if which == "evaluation" else cal_peer]["err"]
        lines.append(
            f"- {which}: the pick flips {int(p_off.sum())}, the best peer {int(q_off.sum())}, both "
            f"{int((p_off & q_off).sum())}; every flowdiff candidate ({len(ours)}) flips {int(every_ours.sum())}, "
            f"every candidate and peer ({len(rs)}) {int(every.sum())}, at least one {int(any_.sum())}. "
            f"Per-sample oracle over flowdiff's {len(ours)} candidates: RMSE {rms(oracle):.3e} "
            f"({rms(oracle) / rms(q_err):.2f}× the best peer; {int((oracle > 10 * oracle.median()).sum())} samples "
            f"> 10× its median); over all {len(rs)}: {rms(oracle_all):.3e}. The pick's RMSE on the samples neither "
            f"it nor the peer flips {rms(rs[pick]['err'][~(p_off | q_off)]):.3e} vs the peer's "
            f"{rms(q_err[~(p_off | q_off)]):.3e}; on the samples both flip {rms(rs[pick]['err'][p_off & q_off]):.3e}"
            f" vs {rms(q_err[p_off & q_off]):.3e}.")
        if which == "evaluation":
            # what the pick would reach against the peer if its own flips were the peer's and no more
            swap = rs[pick]["err"].clone()
            swap[p_off & ~q_off] = 0.0
            lines.append(f"  The pick with its flips that the peer does not make set to 0 error: "
                         f"{rms(swap) / rms(q_err):.2f}× the peer; the pick without any flip (its flips at 0 error): "
                         f"{rms(torch.where(p_off, torch.zeros_like(swap), rs[pick]['err'])) / rms(q_err):.2f}×.")
    lines += ["", "### Flips on the evaluation noise at larger budgets (log-SNR grid)", "",
              "| solver | NFE | flips (share) | > 10× median | half the error in | RMSE | RMSE without its flips |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("dpmpp_3m", "unipc"):
        for nfe in (20, 40, 80, 160):
            with torch.no_grad():
                x = flowdiff.generate(flow, noise, solver=name, nfe=nfe, grid="logsnr").x
            err = per_sample_error(x, ref)
            lines.append(f"| {name} | {nfe} | {flip_stats(err, nearest(x, centres) != target['evaluation'])} |")


def bootstrap_gain(a: torch.Tensor, b: torch.Tensor, resamples: int, seed: int) -> tuple[float, float, float, float]:
    """1 − RMSE(b)/RMSE(a) on the samples, its bootstrap SD and 95 % interval (paired resamples of the samples)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, a.numel(), (resamples, a.numel()), generator=g)
    gains = 1 - b[idx].pow(2).mean(1).sqrt() / a[idx].pow(2).mean(1).sqrt()
    lo, hi = torch.quantile(gains, torch.tensor([0.025, 0.975], dtype=gains.dtype)).tolist()
    return 1 - rms(b) / rms(a), float(gains.std()), lo, hi


def part_nfe8(args, lines: list[str]) -> None:
    flow, noise, calibration, ref, cal_ref = batches(args.seed, args.batch, args.calibration)
    calibration_reference(flow, calibration, "patches", 1e-8)
    held_ref = cal_ref[1::2]
    lines += [f"### NFE {args.nfe}: the full default against the scales label, per sample", "",
              "| solver | fit | kept | held-out RMSE (recomputed) | reported by `learn_solver` | evaluation RMSE |",
              "|---|---|---|---:|---:|---:|"]
    gains = []
    for label, name, options in solver_specs(args.solvers):
        started = time.perf_counter()
        tuned = flowdiff.tune(flow, calibration, solver=name, solver_options=options, nfe=args.nfe, progress=False,
                              max_evals=args.max_evals, reference_tol=1e-8)
        errs = {}
        with torch.no_grad():
            base = solvers.get(name, **options)
            xh = flowdiff.generate(flow, calibration[1::2], solver=base, grid=tuned.sigmas).x
            xe = flowdiff.generate(flow, noise, solver=base, grid=tuned.sigmas).x
        errs["tuned grid"] = (per_sample_error(xh, held_ref), per_sample_error(xe, ref))
        lines.append(f"| {label} | tuned grid | — | {rms(errs['tuned grid'][0]):.3e} | — | "
                     f"{rms(errs['tuned grid'][1]):.3e} |")
        for fit, learn in (("scales", SCALES), ("full default", FULL)):
            learned = flowdiff.learn_solver(flow, calibration, solver=name, solver_options=options, nfe=args.nfe,
                                            sigmas=tuned.sigmas, reference_tol=1e-8, learn=learn,
                                            iterations=args.iterations)
            with torch.no_grad():
                xh = flowdiff.generate(flow, calibration[1::2], solver=learned.as_solver(), grid=learned.sigmas).x
                xe = flowdiff.generate(flow, noise, solver=learned.as_solver(), grid=learned.sigmas).x
            errs[fit] = (per_sample_error(xh, held_ref), per_sample_error(xe, ref))
            lines.append(f"| {label} | {fit} | {learned.kept} | {rms(errs[fit][0]):.3e} | "
                         f"{learned.validation_error:.3e} | {rms(errs[fit][1]):.3e} |")
        for a, b in (("scales", "full default"), ("tuned grid", "scales"), ("tuned grid", "full default")):
            held = bootstrap_gain(errs[a][0], errs[b][0], args.resamples, args.seed)
            ev = 1 - rms(errs[b][1]) / rms(errs[a][1])
            gains.append((label, a, b, held, ev))
        print(f"{label}: {time.perf_counter() - started:.0f} s", flush=True)
    lines += ["", f"Gain 1 − RMSE(to) / RMSE(from) on the held-out half (512 samples), its paired bootstrap SD and "
              f"95 % interval ({args.resamples} resamples), the gain on the evaluation noise, and what the rule "
              "\"keep only if gain > z · SD\" decides for z = 1, 2:", "",
              "| solver | from → to | held-out gain | bootstrap SD | 95 % interval | gain / SD | evaluation gain | "
              "z = 1 | z = 2 |", "|---|---|---:|---:|---|---:|---:|---|---|"]
    for label, a, b, (gain, sd, lo, hi), ev in gains:
        lines.append(f"| {label} | {a} → {b} | {gain:+.1%} | {sd:.1%} | [{lo:+.1%}, {hi:+.1%}] | {gain / sd:.2f} | "
                     f"{ev:+.1%} | {'keep' if gain > sd else 'refuse'} | {'keep' if gain > 2 * sd else 'refuse'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", required=True, choices=("nfe20", "nfe8"))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--solvers", default="unipc,ipndm(order=3)")
    parser.add_argument("--nfe", type=int, default=8, help="the budget of --part nfe8 (named for the budget it "
                        "was written for; others are measured the same way)")
    parser.add_argument("--max-evals", type=int, default=150)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    lines = [f"`python benchmarks/patches_misses.py --part {args.part} --batch {args.batch} --calibration "
             f"{args.calibration} --seed {args.seed} --solvers '{args.solvers}' --max-evals {args.max_evals} "
             f"--nfe {args.nfe} --iterations {args.iterations} --resamples {args.resamples}` — "
             f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, float64.", ""]
    (part_nfe20 if args.part == "nfe20" else part_nfe8)(args, lines)
    lines += ["", f"Wall time {time.perf_counter() - started:.0f} s."]
    text = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
