"""Sample quality of the shipped digits model: ``python benchmarks/bench_models.py`` (a few minutes, one thread).

Generates ``--n`` samples per setting from seeded noise with the shipped model
(:func:`flowdiff.pretrained`) and scores them with :func:`flowdiff.tools.quality.sample_quality`,
next to the same figures for the held-out test digits (the reference a perfect model
would match). Writes

* ``benchmarks/results/models.md`` — the table, for the README's results section;
* ``flowdiff/weights/digits_quality.json`` — the same figures, which ``tests/test_pretrained.py``
  reproduces on fewer samples;
* ``docs/samples.png`` — unconditional samples and class-conditional rows 0–9.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import flowdiff
from flowdiff.models.guidance import classifier_free_guidance
from flowdiff.models.pretrained import digits_data, load_config, pretrained
from flowdiff.tools.quality import sample_quality

ROOT = Path(__file__).resolve().parents[1]

#: (name, solver, nfe, guidance scale or None for unconditional)
SETTINGS = [
    ("unconditional", "euler", 10, None),
    ("unconditional", "euler", 20, None),
    ("unconditional", "euler", 50, None),
    ("unconditional", "heun", 19, None),
    ("unconditional", "heun", 49, None),
    ("conditional", "heun", 19, 1.0),
    ("guided", "heun", 19, 2.0),
    ("guided", "heun", 19, 4.0),
]


def noise_and_labels(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The benchmark's inputs: N(0, I) noise from ``seed`` and labels cycling 0–9."""
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    return noise, torch.arange(n) % 10


def sample(flow: flowdiff.ProbabilityFlow, noise: torch.Tensor, labels: torch.Tensor, solver: str, nfe: int,
           scale: float | None) -> flowdiff.Result:
    """One benchmark setting: unconditional when ``scale`` is None, else guided with weight ``scale``."""
    if scale is None:
        return flowdiff.generate(flow, noise, solver=solver, nfe=nfe)
    return flowdiff.generate(classifier_free_guidance(flow, scale), noise, solver=solver, nfe=nfe,
                             model_kwargs={"class_labels": labels})


def _grid_png(uncond: torch.Tensor, cond: torch.Tensor, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def tile(x: torch.Tensor) -> torch.Tensor:  # (100, 1, 8, 8) -> (10*9, 10*9) with 1-pixel gaps
        x = torch.nn.functional.pad(x.clamp(-1, 1)[:, 0], (0, 1, 0, 1), value=-0.5)  # light grey gaps
        return x.reshape(10, 10, 9, 9).permute(0, 2, 1, 3).reshape(90, 90)[:-1, :-1]

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax, x, title in ((axes[0], uncond, "unconditional"), (axes[1], cond, "class-conditional, rows 0–9, w = 2")):
        ax.imshow(-tile(x).numpy(), cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.suptitle('flowdiff.pretrained("digits"): Heun, 19 model evaluations', fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    flow = pretrained("digits")
    test = digits_data("test")
    reference = sample_quality(test.images, test.labels)
    noise, labels = noise_and_labels(args.n, args.seed)
    rows = []
    for name, solver, nfe, scale in SETTINGS:
        start = time.perf_counter()
        with torch.no_grad():
            res = sample(flow, noise, labels, solver, nfe, scale)
        wall = time.perf_counter() - start
        q = sample_quality(res.x, None if scale is None else labels)
        rows.append({"setting": name, "solver": solver, "nfe": res.stats.nfe, "scale": scale, "n": args.n,
                     "seed": args.seed, "wall_seconds": round(wall, 2),
                     **{k: round(v, 4) for k, v in q.items() if k != "n"}})
        print(rows[-1], flush=True)

    config = load_config("digits")
    lines = [
        "## The shipped digits model",
        "",
        f"`flowdiff.pretrained(\"digits\")`: {config['training']['parameters']:,} parameters, trained by "
        f"`training/train_digits.py` in {config['training']['wall_seconds']:.0f} s "
        f"({config['training']['steps']} steps, batch {config['training']['batch']}, 1 thread on a shared 2-core "
        "machine). Quality of "
        f"{args.n} samples from seeded noise (seed {args.seed}; conditional rows use labels cycling 0–9), "
        "measured by `flowdiff.tools.quality.sample_quality`; the first row is the held-out test digits themselves.",
        "",
        "| samples | solver | NFE | w | confidence | digit score | accuracy | NN distance | NN ratio | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| held-out digits ({int(reference['n'])}) | – | – | – | {reference['confidence']:.3f} | "
        f"{reference['digit_score']:.2f} | {reference['accuracy']:.3f} | {reference['nn_distance']:.3f} | 1.000 | – |",
    ]
    for r in rows:
        acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "–"
        w = "–" if r["scale"] is None else f"{r['scale']:g}"
        lines.append(f"| {r['setting']} | {r['solver']} | {r['nfe']} | {w} | {r['confidence']:.3f} | "
                     f"{r['digit_score']:.2f} | {acc} | {r['nn_distance']:.3f} | {r['nn_ratio']:.3f} | "
                     f"{r['wall_seconds']:.1f} |")
    lines += ["", "Confidence: mean top class probability of a logistic-regression classifier fitted on the "
              "training split; digit score: the Inception Score with that classifier (10 at best); accuracy: "
              "classifier agrees with the requested class; NN distance: mean Euclidean distance (pixels in "
              "[−1, 1]) to the nearest training image, NN ratio: that over the held-out digits' "
              f"({reference['nn_distance']:.3f}). Command: `python benchmarks/bench_models.py --n {args.n}`.", ""]
    text = "\n".join(lines)
    print(text)
    if args.no_write:
        return
    (ROOT / "benchmarks" / "results" / "models.md").write_text(text)
    record = {"command": f"python benchmarks/bench_models.py --n {args.n} --seed {args.seed}",
              "reference_test_split": {k: round(v, 4) for k, v in reference.items()}, "settings": rows}
    (ROOT / "flowdiff" / "weights" / "digits_quality.json").write_text(json.dumps(record, indent=2) + "\n")
    with torch.no_grad():
        grid_noise, grid_labels = noise_and_labels(100, args.seed + 1)
        uncond = sample(flow, grid_noise, grid_labels, "heun", 19, None).x
        cond = sample(flow, grid_noise, torch.arange(100) // 10, "heun", 19, 2.0).x
    _grid_png(uncond, cond, ROOT / "docs" / "samples.png")


if __name__ == "__main__":
    main()
