"""Image files in and out of the command line, at their depth: a batch in the model's data range [−1, 1].

Reading refuses what would need a silent conversion: a channel count the model does not take, another size
(flowdiff does not resample). Writing keeps each input's format (:mod:`flowdiff.runs.imageio`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..engine._checks import check_data_range
from ..runs.imageio import MODES, ImageFormat, from_data, read_image, to_data, write_image
from ._errors import CommandError, one_line


def load_images(paths: Sequence[str], shape: tuple[int, int, int]) -> tuple[Tensor, list[ImageFormat]]:
    """Image files → a float64 batch (N, C, H, W) in [−1, 1] and each file's format, checked against the model's
    (C, H, W)."""
    channels, height, width = shape
    if channels not in MODES:
        raise CommandError(f"this model takes {channels}-channel images; image files carry 1 (L), 2 (LA), 3 (RGB) "
                           "or 4 (RGBA) channels")
    batch, formats = [], []
    for name in paths:
        try:
            pixels, fmt = read_image(name)
        except (OSError, ValueError) as err:
            raise CommandError(str(err)) from None
        if fmt.channels != channels:
            raise CommandError(f"image {name!r} is {fmt} ({fmt.channels} channel{'s' * (fmt.channels > 1)}); this "
                               f"model takes {channels}-channel images ({MODES[channels]}): convert the file "
                               "yourself, flowdiff does not drop or invent channels")
        if pixels.shape[:2] != (height, width):
            raise CommandError(f"image {name!r} is {pixels.shape[1]}×{pixels.shape[0]} pixels; this model takes "
                               f"{width}×{height}: resize it yourself, flowdiff does not resample")
        x = to_data(pixels, fmt)
        bad = int((~torch.isfinite(x)).sum())
        if bad:  # only a float TIFF can hold them; the solve would stop on them, naming no file
            raise CommandError(f"image {name!r} holds {bad} NaN or infinite pixel value{'s' * (bad > 1)} ({fmt}); "
                               "the model takes finite pixels: fill or drop them first")
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            try:
                check_data_range(x, f"image {name!r}")
            except UserWarning as warning:
                raise CommandError(str(warning)) from None
        batch.append(x)
        formats.append(fmt)
    return torch.stack(batch), formats


def read_images(paths: Sequence[str], shape: tuple[int, int, int]) -> Tensor:
    """Image files → a float64 batch (N, C, H, W) in [−1, 1] (see :func:`load_images`)."""
    return load_images(paths, shape)[0]


def default_format(channels: int) -> ImageFormat:
    """8 bits in the mode of ``channels``: what images with no recorded format (samples) are written as."""
    return ImageFormat(MODES[channels], 8)


def _to_uint8(images: Tensor) -> Tensor:
    """(N, C, H, W) in [−1, 1] → uint8 (N, H, W, C), clipped."""
    x = ((images.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def save_grid(images: Tensor, path: str | Path, *, scale: int = 1) -> Path:
    """Write a batch (N, C, H, W) in [−1, 1] as one 8-bit image grid of ⌈√N⌉ columns, each pixel ``scale``×``scale``,
    atomically."""
    x = _to_uint8(images)
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    grid = torch.zeros(rows * (h + pad) + pad, cols * (w + pad) + pad, c, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    return write_image(path, grid.numpy(), default_format(c), scale=scale)


def save_images(images: Tensor, directory: str | Path, names: Sequence[str], *, scale: int = 1) -> list[Path]:
    """Write each image of the batch as its own 8-bit PNG in ``directory`` (made if missing)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_images(images, [directory / name for name in names], None, scale=scale)


def as_written(images: Tensor, formats: Sequence[ImageFormat]) -> Tensor:
    """A batch (N, C, H, W) in [−1, 1] as its image files hold it: each image rounded to its format's depth and
    clipped to its range (:func:`~flowdiff.runs.imageio.from_data`), back in the data range, float64 on the CPU.
    What a reader of the written files gets, so that errors are reported on that and not on the decoder's output."""
    return torch.stack([to_data(from_data(images[i], fmt), fmt) for i, fmt in enumerate(formats)])


def write_images(images: Tensor, paths: Sequence[Path], formats: Sequence[ImageFormat] | None, *,
                 scale: int = 1) -> list[Path]:
    """Write image i of the batch to ``paths[i]`` in ``formats[i]`` (default: 8 bits), each atomically."""
    out = []
    for i, path in enumerate(paths):
        fmt = formats[i] if formats is not None else default_format(images.shape[1])
        try:
            out.append(write_image(path, from_data(images[i], fmt), fmt, scale=scale))
        except (OSError, ValueError) as err:  # both name the file and what failed (a full disk, a suffix, …)
            raise CommandError(one_line(err)) from None
    return out
