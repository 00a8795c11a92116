"""The DDIM paper's Table 1 on flowdiff's models: η ∈ {0, 0.2, 0.5, 1, σ̂} × S ∈ {10, 20, 50, 100} steps.

Song et al., "Denoising Diffusion Implicit Models" (ICLR 2021), Table 1, reports FID of the
generalized process for each η and step count. FID needs Inception weights, which are not
available here; this script measures instead:

* ``--model digits`` — the shipped class-free digits model (``flowdiff.pretrained("digits")``),
  scored by :func:`flowdiff.tools.quality.sample_quality` (a pixel logistic-regression classifier's
  Inception-Score analogue ``digit_score``, higher is better, and ``nn_ratio``, the samples'
  nearest-training-image distance over that of held-out digits, 1 is ideal), and by a
  Fréchet distance in pixel space to the held-out test digits (FID's formula, pixels in
  place of Inception features; lower is better).
* ``--model mixture`` — a closed-form Gaussian mixture over the training digits (bandwidth
  ``--bandwidth``, exact ε, no network error), scored by the energy distance (Székely &
  Rizzo) between the samples and as many fresh samples of the true mixture; 0 means equal in
  law. The line "reference" is two independent true sample sets: the sampling-noise floor.
  Also the mean distance of a sample to its nearest component centre over the same for true
  samples (≈ bandwidth·√64 for those): above 1, noise left in the samples; below 1, samples
  pulled onto the centres.

Every cell starts from the same x_T and draws its step noise from the same seed, so cells
differ only in η and S (flowdiff draws the same z sequence for every η > 0). The grid is the
DDIM paper's "linear" τ (timesteps ⌊i·T/S⌋, ending at t = 0) unless ``--grid`` says otherwise.

Usage: python benchmarks/bench_eta.py --model mixture [--n 2000] [--steps 10 20 50 100] [--grid linear]
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import numpy as np
import torch

import flowdiff
from flowdiff.api.stochastic import SIGMA_HAT
from flowdiff.models.analytic import Mixture

ETAS: tuple[float | str, ...] = (0.0, 0.2, 0.5, 1.0, SIGMA_HAT)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """2·E‖X−Y‖ − E‖X−X'‖ − E‖Y−Y'‖ (within-set means exclude the zero diagonal)."""
    x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
    xy = torch.cdist(x, y).mean()
    xx = torch.cdist(x, x).sum() / (x.shape[0] * (x.shape[0] - 1))
    yy = torch.cdist(y, y).sum() / (y.shape[0] * (y.shape[0] - 1))
    return float(2 * xy - xx - yy)


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖μx − μy‖² + tr(Σx + Σy − 2(Σx Σy)^{1/2}), FID's formula on the raw pixels."""
    x, y = x.reshape(x.shape[0], -1).double().numpy(), y.reshape(y.shape[0], -1).double().numpy()
    mx, my = x.mean(0), y.mean(0)
    cx, cy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    # tr((Σx Σy)^{1/2}) = Σ √λ of the symmetric PSD matrix Σx^{1/2} Σy Σx^{1/2}
    w, v = np.linalg.eigh(cx)
    root = (v * np.sqrt(np.maximum(w, 0))) @ v.T
    lam = np.linalg.eigvalsh(root @ cy @ root)
    return float(((mx - my) ** 2).sum() + np.trace(cx) + np.trace(cy) - 2 * np.sqrt(np.maximum(lam, 0)).sum())


def eta_label(eta: float | str) -> str:
    return "σ̂" if eta == SIGMA_HAT else f"η = {eta:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mixture", "digits"), default="mixture")
    parser.add_argument("--n", type=int, default=2000, help="samples per cell")
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    parser.add_argument("--grid", default="linear")
    parser.add_argument("--bandwidth", type=float, default=0.2, help="mixture component std (pixels in [-1, 1])")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from flowdiff.models.pretrained import digits_data

    train = digits_data("train").images.double()
    if args.model == "mixture":
        mix = Mixture(train, args.bandwidth)
        flow = mix.flow()
        shape = train.shape[1:]
        ref = mix.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 1))
        floor = energy_distance(mix.sample(args.n, generator=torch.Generator().manual_seed(args.seed + 2)), ref)
        centers = train.reshape(train.shape[0], -1)
        nn_true = float(torch.cdist(ref.reshape(args.n, -1), centers).min(1).values.mean())

        def score(x: torch.Tensor) -> dict[str, float]:
            nn = float(torch.cdist(x.reshape(x.shape[0], -1).double(), centers).min(1).values.mean())
            return {"energy": energy_distance(x, ref), "nn_ratio": nn / nn_true}

        columns = [("energy", "energy distance ↓", "{:.4f}"),
                   ("nn_ratio", "nearest-component distance over the true samples' (1 ideal)", "{:.3f}")]
    else:
        from flowdiff.models.pretrained import pretrained
        from flowdiff.tools.quality import sample_quality

        flow = pretrained("digits")
        shape = train.shape[1:]
        test = digits_data("test").images.double()
        floor_q = sample_quality(test.float())
        floor = frechet_distance(test, train)

        def score(x: torch.Tensor) -> dict[str, float]:
            q = sample_quality(x.float())
            fd = frechet_distance(x.clamp(-1, 1), test)
            return {"digit_score": q["digit_score"], "nn_ratio": q["nn_ratio"], "fd": fd}

        columns = [("digit_score", "digit score ↑", "{:.2f}"), ("nn_ratio", "NN ratio (1 ideal)", "{:.2f}"),
                   ("fd", "pixel Fréchet ↓", "{:.2f}")]

    noise = torch.randn(args.n, *shape, generator=torch.Generator().manual_seed(args.seed), dtype=torch.float32
                        if args.model == "digits" else torch.float64)
    results: dict[tuple[str, int], dict[str, float]] = {}
    start = time.perf_counter()
    for eta in ETAS:
        for steps in args.steps:
            t0 = time.perf_counter()
            with torch.no_grad():
                out = flowdiff.generate(flow, noise, steps=steps, grid=args.grid,
                                        solver=flowdiff.Stochastic(eta, generator=args.seed + 100))
            assert out.stats.nfe == steps
            results[(eta_label(eta), steps)] = score(out.x)
            print(f"# {eta_label(eta)} S={steps}: {results[(eta_label(eta), steps)]} ({time.perf_counter() - t0:.1f}s)",
                  flush=True)

    head = "| | " + " | ".join(f"S = {s}" for s in args.steps) + " |"
    rule = "|---|" + "---:|" * len(args.steps)
    print(f"\n### {args.model}, grid {args.grid!r}, {args.n} samples per cell, seed {args.seed}\n")
    for key, title, fmt in columns:
        print(f"{title}\n\n{head}\n{rule}")
        for eta in ETAS:
            row = [fmt.format(results[(eta_label(eta), s)][key]) for s in args.steps]
            print(f"| {eta_label(eta)} | " + " | ".join(row) + " |")
        print()
    if args.model == "mixture":
        print(f"reference (two independent true sample sets of {args.n}): energy distance {floor:.4f}")
    else:
        print(f"reference (held-out test digits): digit score {floor_q['digit_score']:.2f}, NN ratio "
              f"{floor_q['nn_ratio']:.2f}; pixel Fréchet training split vs test {floor:.2f}")
    print(f"\n{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread, "
          f"total {time.perf_counter() - start:.0f}s; NFE per sample = S (one evaluation per step)")
    if math.isnan(sum(v for r in results.values() for v in r.values())):
        raise SystemExit("a score is NaN")


if __name__ == "__main__":
    main()
