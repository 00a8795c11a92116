"""How much a kernel-density benchmark model memorises, per bandwidth: the digit mixture against the photo patches.

For each model's centres (``mixture_centres``: 200 digits, 8 × 8; ``patch_centres``: 200 grey photo patches,
16 × 16) and each bandwidth h: the spread of the centres (per-pixel RMS distance of each to its nearest other
centre, and each centre's own pixel standard deviation), then 2,000 samples of the model (a centre drawn uniformly,
plus h · N(0, I), seed 1): the share whose own component holds posterior weight > 0.99 at σ = 0 (the sample
belongs to one remembered centre), the share lying nearer another centre than their own, and the mean effective
number of components 1 / Σ wᵢ². A model with 100 % and 0 % is a set of isolated points (pure memorisation); one
with many components per sample is nearly one blob.

Usage: python benchmarks/patch_bandwidth.py [--bandwidths 0.02,0.05,0.1,0.2,0.3] [--samples 2000]
"""

from __future__ import annotations

import argparse

import torch
from _kdiffusion import mixture_centres, patch_centres


def spread(centres: torch.Tensor) -> str:
    v = centres.reshape(centres.shape[0], -1)
    d = torch.cdist(v, v)
    d.fill_diagonal_(float("inf"))
    nn = d.min(1).values / v.shape[1] ** 0.5
    std = v.std(1)
    return (f"{v.shape[1]} dims, values in [{float(v.min()):.2f}, {float(v.max()):.2f}]; nearest other centre "
            f"(RMS per pixel) min / median / max {float(nn.min()):.3f} / {float(nn.median()):.3f} / "
            f"{float(nn.max()):.3f}; a centre's pixel std, median {float(std.median()):.3f}")


def memorisation(centres: torch.Tensor, bandwidth: float, samples: int, seed: int = 1) -> tuple[float, float, float]:
    """(share with its own component's weight > 0.99, share nearer another centre, mean effective components)."""
    v = centres.reshape(centres.shape[0], -1)
    generator = torch.Generator().manual_seed(seed)
    own = torch.randint(0, v.shape[0], (samples,), generator=generator)
    x = v[own] + bandwidth * torch.randn(samples, v.shape[1], generator=generator, dtype=torch.float64)
    d2 = torch.cdist(x, v) ** 2
    weight = torch.softmax(-d2 / (2 * bandwidth**2), dim=1)
    remembered = float((weight.gather(1, own[:, None]).squeeze(1) > 0.99).double().mean())
    elsewhere = float((d2.argmin(1) != own).double().mean())
    return remembered, elsewhere, float((1 / weight.pow(2).sum(1)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bandwidths", default="0.02,0.05,0.1,0.2,0.3")
    parser.add_argument("--samples", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    models = {"digit mixture (mixture_centres)": mixture_centres(), "photo patches (patch_centres)": patch_centres()}
    lines = [f"`python benchmarks/patch_bandwidth.py --bandwidths {args.bandwidths} --samples {args.samples}`", ""]
    lines += [f"- {name}: {spread(c)}" for name, c in models.items()]
    lines += ["", "| model | bandwidth | own component > 0.99 | nearer another centre | effective components |",
              "|---|---:|---:|---:|---:|"]
    for name, centres in models.items():
        for bw in (float(b) for b in args.bandwidths.split(",")):
            remembered, elsewhere, effective = memorisation(centres, bw, args.samples)
            lines.append(f"| {name} | {bw:g} | {remembered:.1%} | {elsewhere:.1%} | {effective:.2f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
