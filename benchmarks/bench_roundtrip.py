"""Round trips decode(encode(x)) of flowdiff's encoders side by side with diffusers' inverse schedulers.

For S = 10, 20, 50 evaluations per direction, on the shipped digits model
(``flowdiff.pretrained("digits")``, held-out test digits, float64) and on a closed-form
Gaussian mixture (bandwidth 0.3 around training digits, exact ε), this measures the
per-pixel MSE of the round trip against the images themselves for

* flowdiff: every solver given (default: Euler/DDIM, Heun, the multistep methods, Heun3) ×
  grids (trailing, leading, karras, logsnr), ``encode(..., grid=Grid(g, nfe=S))`` then
  ``decode(latent)`` (:func:`flowdiff.compare` with ``task="roundtrip"``);
* diffusers: ``DDIMInverseScheduler`` + ``DDIMScheduler`` and
  ``DPMSolverMultistepInverseScheduler`` + ``DPMSolverMultistepScheduler`` (DPM-Solver++,
  orders 1–3), timestep spacings leading, trailing, linspace, driven on the same model: the
  flow's ε-network called at the scheduler's timesteps on the VP-scaled state. The schedule
  is DDPM's linear one, T = 1000, for both models.

Targets (issue 12): flowdiff's best non-exact round trip ≤ 0.25× diffusers' best at equal
encode + decode NFE, and every multistep solver's round trip ≤ Euler's (on its best grid)
at equal NFE. Both ratios are printed as measured.

Usage: python benchmarks/bench_roundtrip.py [--n 2] [--steps 10 20 50] [--all]
       [--out benchmarks/results/roundtrip.md]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import flowdiff
import solvers
from flowdiff.engine.formulations import encode_refusal
from flowdiff.models.analytic import Mixture

GRIDS = ("trailing", "leading", "karras", "logsnr")
SOLVERS = ("euler", "heun", "heun3", "lms", "abm", "dpmpp_2m", "dpmpp_3m", "unipc")
SPACINGS = ("leading", "trailing", "linspace")


def diffusers_roundtrip(model, images: torch.Tensor, steps: int, kind: str, order: int, spacing: str) -> float:
    """MSE of diffusers' inverse scheduler + scheduler round trip with ``model(x_t, t) -> ε``."""
    from diffusers import (
        DDIMInverseScheduler,
        DDIMScheduler,
        DPMSolverMultistepInverseScheduler,
        DPMSolverMultistepScheduler,
    )

    cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
               timestep_spacing=spacing)
    if kind == "ddim":
        inv, fwd = DDIMInverseScheduler(**cfg), DDIMScheduler(**cfg)
    else:
        opts = dict(solver_order=order, algorithm_type="dpmsolver++")
        inv, fwd = DPMSolverMultistepInverseScheduler(**cfg, **opts), DPMSolverMultistepScheduler(**cfg, **opts)
    x = images.clone()
    with torch.no_grad():
        inv.set_timesteps(steps)
        for t in inv.timesteps:
            x = inv.step(model(x, t.expand(x.shape[0]).to(x.dtype)), t, x).prev_sample
        fwd.set_timesteps(steps)
        for t in fwd.timesteps:
            x = fwd.step(model(x, t.expand(x.shape[0]).to(x.dtype)), t, x).prev_sample
    return float((x - images).pow(2).mean())


def run_model(name: str, flow, model, images, steps_list, solver_names) -> tuple[str, dict]:
    lines = [f"### {name}", "",
             "Per-pixel MSE of decode(encode(x)) against x; NFE = evaluations per direction (encode + decode = 2S).",
             ""]
    summary = {}
    comp = flowdiff.compare(flow, task="roundtrip", images=images, solvers=solver_names, grids=GRIDS,
                            nfe=steps_list)
    header = "| method | " + " | ".join(f"S = {s}" for s in steps_list) + " |"
    lines += [header, "|---|" + "---:|" * len(steps_list)]
    cell = {(r.solver, r.grid, r.budget): r for r in comp.runs}
    for solver in solver_names:
        for grid in GRIDS:
            vals = []
            for s in steps_list:
                r = cell.get((solver, grid, s))
                vals.append("—" if r is None else f"{r.rms_error ** 2:.2e}"
                            + (f" ({r.encode_nfe}+{r.decode_nfe})" if r.nfe != 2 * s else ""))
            lines.append(f"| flowdiff {solver} / {grid} | " + " | ".join(vals) + " |")
    peers: dict[tuple[str, int], float] = {}
    for kind, orders in (("ddim", (1,)), ("dpm++", (1, 2, 3))):
        for order in orders:
            for spacing in SPACINGS:
                label = "DDIMInverse+DDIM" if kind == "ddim" else f"DPMSolverMultistepInverse(order {order})+DPM"
                vals = []
                for s in steps_list:
                    try:
                        mse = diffusers_roundtrip(model, images, s, kind, order, spacing)
                    except Exception as err:  # noqa: BLE001  (a configuration diffusers refuses is reported)
                        vals.append(f"error: {type(err).__name__}")
                        continue
                    peers[(f"{label} / {spacing}", s)] = mse
                    vals.append(f"{mse:.2e}")
                lines.append(f"| diffusers {label} / {spacing} | " + " | ".join(vals) + " |")
    lines.append("")
    for s in steps_list:
        ours = [r for r in comp.runs if r.budget == s and r.nfe <= 2 * s and r.solver != "reversible_heun"]
        best = min(ours, key=lambda r: r.rms_error)
        peer_best = min(((k, v) for k, v in peers.items() if k[1] == s), key=lambda kv: kv[1])
        ratio = best.rms_error ** 2 / peer_best[1]
        euler = {r.grid: r.rms_error ** 2 for r in ours if r.solver == "euler"}
        worse = [f"{r.solver}/{r.grid} {r.rms_error ** 2 / euler[r.grid]:.2f}×" for r in ours
                 if solvers.get(r.solver).multistep and r.grid in euler and r.rms_error ** 2 > euler[r.grid]]
        summary[s] = (best, peer_best, ratio)
        lines.append(f"- S = {s}: flowdiff best {best.solver}/{best.grid} MSE {best.rms_error ** 2:.2e}; diffusers "
                     f"best {peer_best[0][0]} {peer_best[1]:.2e}; ratio **{ratio:.3f}** (target ≤ 0.25). "
                     "Multistep runs worse than Euler's on the same grid: "
                     + (", ".join(worse) if worse else "none"))
    lines.append("")
    return "\n".join(lines), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=2, help="held-out digits (default 2)")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50])
    parser.add_argument("--all", action="store_true", help="every registered solver that encodes")
    parser.add_argument("--out", default="benchmarks/results/roundtrip.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    names = ([n for n in solvers.available() if encode_refusal(n) is None and n != "reversible"] if args.all
             else list(SOLVERS))
    start = time.perf_counter()
    flow = flowdiff.pretrained("digits")
    flow.model.double()
    images = flowdiff.digits_data("test").images[: args.n].double()
    train = flowdiff.digits_data("train").images[:64].double()
    mixture = Mixture(train, 0.3, schedule=flowdiff.Schedule.linear())
    parts = [f"# Round trips: flowdiff encoders vs diffusers' inverse schedulers\n\n"
             f"`python benchmarks/bench_roundtrip.py --n {args.n} --steps {' '.join(map(str, args.steps))}"
             f"{' --all' if args.all else ''}` on {platform.processor() or platform.machine()}, torch "
             f"{torch.__version__}, one thread, float64.\n"]
    for label, fl, model in (("shipped digits model (held-out digits)", flow, flow.model),
                             ("closed-form Gaussian mixture (64 training digits, bandwidth 0.3)", mixture.flow(),
                              mixture)):
        text, _ = run_model(label, fl, model, images, args.steps, names)
        parts.append(text)
        print(text, flush=True)
    parts.append(f"Total wall time {time.perf_counter() - start:.0f} s.\n")
    with open(args.out, "w") as fh:
        fh.write("\n".join(parts))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
