"""Reconstruction test of a folder of images: encode each image to x_T, decode it back, measure the error.

DDIM inversion (Euler both ways) does not come back exactly: each direction makes its own
discretisation error (the DDIM paper, Song et al. 2021, Table 2). A reversible solver — reversible
Heun (Kidger et al. 2021) — has an algebraic inverse step, so its decode retraces the encode to
floating-point rounding. This script runs both (and Heun) on your images and writes the table
(``reconstruction.md``: NFE per direction, MSE, max error, PSNR on the [0, 1] scale) and a picture
(``reconstruction.png``: the originals in the first row, each method's decode below, then the
error ×10).

    python examples/reconstruction.py                      # 8 held-out digits, written to out/digits/
    python examples/reconstruction.py --images my_pngs/ --model path/to/diffusers-model --steps 50

Images are read with Pillow, converted to the model's channels and resized to its sample size.
For a whole dataset (every image under a folder, over several processes, resumable) use the command
``flowdiff roundtrip --data DIR --out OUT`` (README, "A folder of images").
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import flowdiff

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def read_folder(folder: Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[str]]:
    """The images of ``folder`` (sorted by name) as a float32 batch in [−1, 1] of shape (N, *shape)."""
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in SUFFIXES)
    if not paths:
        raise ValueError(f"--images {str(folder)!r}: no image files ({', '.join(sorted(SUFFIXES))}) in it")
    channels, height, width = shape
    if channels not in (1, 3):
        raise ValueError(f"the model takes {channels} channels; this script reads 1 (grey) or 3 (RGB)")
    batch = []
    for path in paths:
        image = Image.open(path).convert("L" if channels == 1 else "RGB").resize((width, height), Image.BICUBIC)
        pixels = np.asarray(image, dtype=np.float32).reshape(height, width, channels)
        batch.append(torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1.0)
    return torch.stack(batch), [p.name for p in paths]


def write_digits(folder: Path, n: int) -> None:
    """``n`` held-out digits of the shipped model's data set as 8×8 grey PNGs (the default input)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(flowdiff.digits_data("test").images[:n]):
        pixels = ((image[0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(folder / f"digit{i:02d}.png")


def picture(rows: list[torch.Tensor], path: Path, scale: int) -> None:
    """Rows of images in [−1, 1] as one PNG grid, each pixel ``scale``× (nearest) so small images stay visible."""
    padded = [torch.nn.functional.pad(row.clamp(-1, 1), (1, 1, 1, 1), value=0.0) for row in rows]  # grey frames
    grid = torch.cat([torch.cat(list(row), dim=-1) for row in padded], dim=-2)  # (C, rows·(H+2), N·(W+2))
    pixels = ((grid.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().astype(np.uint8)
    image = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
    image.resize((image.width * scale, image.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="folder of images (default: held-out digits written to OUT/digits)")
    parser.add_argument("--model", default="digits", help="'digits' (shipped) or a diffusers model directory")
    parser.add_argument("--steps", type=int, default=10, help="steps per direction (default: 10)")
    parser.add_argument("--solvers", default="euler,heun,reversible_heun", help="comma-separated solver names")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("FLOWDIFF_OUT", "out")),
                        help="output folder (default: $FLOWDIFF_OUT or ./out)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.model != "digits" and not Path(args.model).is_dir():
        parser.error(f"--model {args.model!r}: no such folder (give 'digits' or a diffusers model directory)")
    if args.images is not None and not args.images.is_dir():
        parser.error(f"--images {str(args.images)!r}: no such folder (give a folder of image files)")

    flow = flowdiff.pretrained("digits") if args.model == "digits" else flowdiff.from_diffusers(args.model)
    shape = (1, 8, 8) if args.model == "digits" else tuple(flow.model.sample_shape)
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.images
    if folder is None:
        folder = args.out / "digits"
        write_digits(folder, 8)
    images, names = read_folder(folder, shape)

    lines = [f"Round trips of {len(names)} images from {folder} ({args.model}, {args.steps} steps each way)", "",
             "| solver | NFE encode | NFE decode | MSE | max error | PSNR (dB) | bit-exact |",
             "|---|---:|---:|---:|---:|---:|---|"]
    rows = [images]
    for solver in args.solvers.split(","):
        enc = flowdiff.encode(flow, images, solver=solver, steps=args.steps)
        dec = flowdiff.decode(flow, enc.latent)   # the latent records the grid and solver
        r = flowdiff.reconstruction(images, dec.x, encode_stats=enc.stats, decode_stats=dec.stats)
        exact = "yes" if torch.equal(dec.x, images) else "no"
        lines.append(f"| {solver} | {r.nfe_encode} | {r.nfe_decode} | {r.mse:.2e} | {r.max_abs:.2e} | "
                     f"{r.psnr:.1f} | {exact} |")
        rows.append(dec.x)
    rows += [(10 * (row - images)).clamp(-1, 1) for row in rows[1:]]
    table = "\n".join(lines) + "\n"
    (args.out / "reconstruction.md").write_text(table, encoding="utf-8")
    picture(rows, args.out / "reconstruction.png", scale=max(1, 64 // shape[-1]))
    print(table)
    print(f"wrote {args.out / 'reconstruction.md'} and reconstruction.png (rows: originals, "
          f"{', '.join(args.solvers.split(','))}, then their errors ×10)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
