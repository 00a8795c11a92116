"""A diffusers pipeline end to end: save it, load it with flowdiff, check DDIM against diffusers, then go further.

With no ``--pipeline``, builds a tiny random ``UNet2DModel`` (3×16×16) with a ``DDIMScheduler`` and
saves it with ``save_pretrained`` (what a trained pipeline on disk looks like), then:

1. ``flowdiff.from_diffusers(directory)`` loads it offline (the scheduler config defines the schedule);
2. ``generate(solver="euler", grid="leading")`` is diffusers' ``DDIMPipeline`` loop (deterministic DDIM
   is explicit Euler on the probability-flow ODE, Song et al. 2021): same noise, same images;
3. the same model at 10 evaluations with DPM-Solver++(2M) (Lu et al. 2022), and an exact round trip
   with reversible Heun (Kidger et al. 2021).

Writes ``pipeline.md`` (the table) and ``pipeline.png`` (rows: diffusers' DDIM, flowdiff's DDIM,
flowdiff's DPM-Solver++ at 10 NFE; a random network's images are noise-like, a trained one's are not).

    python examples/diffusers_pipeline.py
    python examples/diffusers_pipeline.py --pipeline path/to/your-ddpm-pipeline --steps 50
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import flowdiff


def build_tiny_pipeline(directory: Path, seed: int = 0) -> Path:
    """Save a tiny random UNet2DModel + DDIMScheduler as a DDIMPipeline under ``directory`` (no network)."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(sample_size=16, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    scheduler = diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False)
    diffusers.DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(directory)
    return directory


def diffusers_ddim(directory: Path, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """diffusers' own DDIM loop (η = 0) from ``noise``, in [−1, 1] (the pipeline's image before its /2 + 0.5)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(directory)
    unet = pipe.unet.eval()
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(steps)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.step(unet(x, t).sample, t, x, eta=0.0).prev_sample
    return x


def to_png(rows: list[torch.Tensor], path: Path, scale: int = 4) -> None:
    padded = [torch.nn.functional.pad(row.clamp(-1, 1), (1, 1, 1, 1), value=0.0) for row in rows]
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in padded], dim=-2)
    pixels = ((grid.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", type=Path,
                        help="a local diffusers pipeline directory (default: build a tiny one)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("FLOWDIFF_OUT", "out")),
                        help="output folder (default: $FLOWDIFF_OUT or ./out)")
    args = parser.parse_args(argv)
    for name, low in (("steps", 1), ("batch", 1), ("seed", 0)):  # torch wraps a negative seed round silently
        if getattr(args, name) < low:
            parser.error(f"--{name} must be at least {low}, got {getattr(args, name)}")
    if args.pipeline is not None and not args.pipeline.is_dir():
        parser.error(f"--pipeline {str(args.pipeline)!r}: no such folder (give a diffusers pipeline directory, or "
                     "leave it out to build a tiny one)")
    args.out.mkdir(parents=True, exist_ok=True)
    directory = args.pipeline or build_tiny_pipeline(args.out / "tiny-ddim-pipeline", args.seed)

    flow = flowdiff.from_diffusers(directory)
    noise = torch.randn(args.batch, *flow.model.sample_shape, generator=torch.Generator().manual_seed(args.seed))
    theirs = diffusers_ddim(directory, noise, args.steps)
    ddim = flowdiff.generate(flow, noise, solver="euler", steps=args.steps, grid="leading")
    fast = flowdiff.generate(flow, noise, solver="dpmpp_2m", nfe=10, grid="logsnr")
    enc = flowdiff.encode(flow, ddim.x, solver="reversible_heun", steps=10)
    back = flowdiff.decode(flow, enc.latent)

    scale = float(theirs.abs().max())
    lines = [f"{directory}: {flow.prediction_type} model, sample shape {tuple(flow.model.sample_shape)}, "
             f"{args.batch} samples from seed {args.seed}", "",
             "| run | NFE | max abs difference | relative to max abs of the images |", "|---|---:|---:|---:|",
             f"| flowdiff `generate(solver='euler', grid='leading')` against diffusers' DDIMScheduler loop "
             f"(η = 0, {args.steps} steps) | {ddim.stats.nfe} | {(ddim.x - theirs).abs().max():.2e} | "
             f"{(ddim.x - theirs).abs().max() / scale:.1e} |",
             f"| flowdiff `reversible_heun` encode + decode of those images (round trip) | "
             f"{enc.stats.nfe} + {back.stats.nfe} | {(back.x - ddim.x).abs().max():.2e} | "
             f"{(back.x - ddim.x).abs().max() / scale:.1e} |",
             f"| flowdiff `generate(solver='dpmpp_2m', nfe=10, grid='logsnr')` (another method; in the picture) | "
             f"{fast.stats.nfe} | — | — |"]
    table = "\n".join(lines) + "\n"
    (args.out / "pipeline.md").write_text(table, encoding="utf-8")
    to_png([theirs, ddim.x, fast.x], args.out / "pipeline.png")
    print(table)
    print(f"wrote {args.out / 'pipeline.md'} and pipeline.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
