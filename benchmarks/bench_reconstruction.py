"""Reconstruction error of encode → decode, in the form of the DDIM paper's Table 2.

Song et al., "Denoising Diffusion Implicit Models" (ICLR 2021), Table 2, reports the
per-dimension MSE (pixels in [0, 1]) of encoding CIFAR-10 test images to x_T with DDIM and
decoding them back, for S = 10 … 1000 steps (0.014 at S = 10, 0.0009 at S = 100). This script
measures the same on flowdiff's shipped digits model (``flowdiff.pretrained("digits")``) with
held-out test digits (``flowdiff.digits_data("test")``, never seen in training), for:

* ``euler`` — encode and decode with Euler (DDIM both ways, the paper's setting);
* ``ddim_inverse`` — diffusers' DDIMInverseScheduler encode, DDIM decode;
* ``heun`` — Heun both ways (the decode's last step into σ = 0 is Euler, flowdiff's default);
* ``reversible_heun``, ``reversible[euler]``, ``reversible[heun]`` — algebraically reversible
  solvers (McCallum–Foster coupling λ = 0.999), decoded by their exact inverse;
* ``fixed_point[euler]``, ``fixed_point[heun]`` — fixed-point inversion (Newton–Krylov,
  ``on_failure="keep"``), decoded by the plain solver (``fixed_point[euler]`` decodes with
  plain DDIM); the cell also says how many samples reached the tolerance.

``--guidance W`` repeats the table with the class-conditional model under classifier-free
guidance at scale W (labels of the test images). Every figure is measured here; NFE counts
model evaluations per direction (a guided evaluation is one, costing two network calls).

``--growth`` instead measures how the reversible solvers' rounding error grows with S in
float32 and float64 on a closed-form Gaussian mixture over 256 training digits (exact ε, so
only rounding is left), for the same held-out digits.

Usage: python benchmarks/bench_reconstruction.py [--n 32] [--steps 10 20 50 100 200 500 1000]
       [--dtype float64 float32] [--guidance 3.0] [--out benchmarks/results/reconstruction.md]
"""

from __future__ import annotations

import argparse
import platform
import time
import warnings

import torch

import flowdiff
import solvers
from flowdiff.tools import metrics

METHODS = {
    "euler": dict(solver="euler"),
    "ddim_inverse": dict(solver="ddim_inverse"),
    "heun": dict(solver="heun"),
    "reversible_heun": dict(solver="reversible_heun"),
    "reversible[euler]": dict(solver=solvers.get("reversible", base="euler")),
    "reversible[heun]": dict(solver=solvers.get("reversible", base="heun")),
    "fixed_point[euler]": dict(solver=flowdiff.Inversion("fixed_point", {"on_failure": "keep"}, solver="euler")),
    "fixed_point[heun]": dict(solver=flowdiff.Inversion("fixed_point", {"on_failure": "keep"}, solver="heun")),
}
#: the costliest methods are tabulated up to this many steps (CPU time); "–" beyond
MAX_STEPS = {"reversible[heun]": 200, "fixed_point[euler]": 200, "fixed_point[heun]": 100}
#: and with guidance (two network calls an evaluation)
MAX_GUIDED_STEPS = {"fixed_point[euler]": 50, "fixed_point[heun]": 20}


def run_cell(flow, images, steps, method, model_kwargs):
    kwargs = dict(METHODS[method])
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():  # fixed point with on_failure="keep": the unconverged are counted below
            warnings.simplefilter("ignore", RuntimeWarning)
            enc = flowdiff.encode(flow, images, steps=steps, model_kwargs=model_kwargs, **kwargs)
    except solvers.SolveError as err:
        return {"error": f"no convergence at step {err.step}"}
    dec = flowdiff.decode(flow, enc.latent, model_kwargs=model_kwargs)
    wall = time.perf_counter() - start
    r = metrics.reconstruction(images, dec.x, encode_stats=enc.stats, decode_stats=dec.stats)
    cell = {"mse": r.mse, "max_abs": r.max_abs, "psnr": r.psnr, "nfe_enc": r.nfe_encode, "nfe_dec": r.nfe_decode,
            "wall": wall}
    if "unconverged" in enc.stats.extra:  # fixed point: how many samples reached tol, and their error
        bad = set(enc.stats.extra["unconverged"])
        good = [i for i in range(images.shape[0]) if i not in bad]
        cell["exact"] = f"{len(good)}/{images.shape[0]}"
        if good:
            cell["exact_max"] = float(metrics.max_abs_error(images[good], dec.x[good]))
    return cell


def table(results, steps_list, methods, title):
    lines = [f"#### {title}", "", "Per-dimension MSE on [0, 1] (max abs error in brackets); NFE encode + decode; "
             "for fixed point, the samples that reached tol (their max abs error in brackets).", "",
             "| method | " + " | ".join(f"S = {s}" for s in steps_list) + " |",
             "|---|" + "---|" * len(steps_list)]
    for m in methods:
        cells = []
        for s in steps_list:
            c = results.get((m, s))
            if c is None:
                cells.append("–")
            elif "error" in c:
                cells.append(c["error"])
            else:
                text = f"{c['mse']:.2e} [{c['max_abs']:.1e}]<br>{c['nfe_enc']}+{c['nfe_dec']}"
                if "exact" in c:
                    text += f"<br>{c['exact']} at tol" + (f" [{c['exact_max']:.0e}]" if "exact_max" in c else "")
                cells.append(text)
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def growth(n: int, steps_list: list[int]) -> str:
    """Max abs round-trip error ([0, 1] scale) of each reversible solver against S, float64 and float32."""
    from flowdiff.models.analytic import Mixture

    train = flowdiff.digits_data("train").images[:256]
    model = Mixture(train, 0.2)
    flow = model.flow()
    images = flowdiff.digits_data("test").images[:n]
    names = ["reversible_heun", "reversible[euler]", "reversible[heun]"]
    lines = ["#### Rounding error against step count (closed-form mixture over 256 training digits, bandwidth 0.2)",
             "", "Max abs error on [0, 1] of decode(encode(x)), trailing grid; float32 ulp of 1 is 1.2e-7. float32: "
             "float32 images and model input, float64 reversible state (flowdiff's default).", "",
             "| method | dtype | " + " | ".join(f"S = {s}" for s in steps_list) + " |",
             "|---|---|" + "---|" * len(steps_list)]
    for name in names:
        for dtype in (torch.float64, torch.float32):
            x = images.to(dtype)
            cells = []
            for s in steps_list:
                enc = flowdiff.encode(flow, x, steps=s, **METHODS[name])
                dec = flowdiff.decode(flow, enc.latent)
                cells.append(f"{float(metrics.max_abs_error(x, dec.x)):.1e}")
            lines.append(f"| {name} | {str(dtype).removeprefix('torch.')} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=32, help="held-out test digits to encode")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100, 200, 500, 1000])
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"], choices=["float64", "float32"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--guidance", type=float, nargs="*", default=[3.0],
                        help="classifier-free guidance scales to tabulate besides the unguided model")
    parser.add_argument("--guided-steps", type=int, nargs="+", default=[10, 20, 50, 100],
                        help="step counts of the guided tables (each guided evaluation costs two network calls)")
    parser.add_argument("--growth", action="store_true", help="rounding growth of the reversible solvers instead")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.growth:
        text = growth(args.n, args.steps)
        print(text)
        if args.out:
            with open(args.out, "w") as fh:
                fh.write(text + "\n")
        return

    data = flowdiff.digits_data("test")
    images, labels = data.images[: args.n], data.labels[: args.n]
    settings = [("unguided", None, None, args.steps, MAX_STEPS)]
    for w in args.guidance:
        settings.append((f"classifier-free guidance w = {w:g}", w, {"class_labels": labels}, args.guided_steps,
                         {**MAX_STEPS, **MAX_GUIDED_STEPS}))
    out = ["## Exact encoding: reconstruction (the DDIM paper's Table 2 on the digits model)", "",
           f"`python benchmarks/bench_reconstruction.py --n {args.n} --steps {' '.join(map(str, args.steps))} "
           f"--dtype {' '.join(args.dtype)} --guidance {' '.join(f'{w:g}' for w in args.guidance)} "
           f"--guided-steps {' '.join(map(str, args.guided_steps))}` — "
           f"{args.n} held-out test digits (8×8, never seen in training), trailing grid, "
           f"torch {torch.__version__} on {platform.processor() or platform.machine()}, 1 thread.", ""]
    for title, scale, model_kwargs, steps_list, max_steps in settings:
        for dtype_name in args.dtype:
            dtype = getattr(torch, dtype_name)
            flow = flowdiff.pretrained("digits")
            flow.model.to(dtype)  # float64 throughout, or float32 throughout
            if scale is not None:
                flow = flowdiff.classifier_free_guidance(flow, scale)
            x = images.to(dtype)
            results = {}
            t0 = time.perf_counter()
            for m in args.methods:
                for s in steps_list:
                    if s > max_steps.get(m, s):
                        continue
                    results[(m, s)] = run_cell(flow, x, s, m, model_kwargs)
                    c = results[(m, s)]
                    print(f"{title} {dtype_name} {m} S={s}: " + (c["error"] if "error" in c else
                          f"mse {c['mse']:.3e} max {c['max_abs']:.2e} nfe {c['nfe_enc']}+{c['nfe_dec']} "
                          f"{c.get('exact', '')} {c['wall']:.1f}s"), flush=True)
            what = ("images, network and state" if dtype_name == "float64" else
                    "images and network; the reversible solvers keep a float64 state")
            out.append(table(results, steps_list, args.methods,
                             f"{title}, {dtype_name} {what}, {time.perf_counter() - t0:.0f} s"))
            out.append("")
    text = "\n".join(out)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
