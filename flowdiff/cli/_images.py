"""Image files in and out of the command line: PNG batches in the model's data range [−1, 1]."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from ._errors import CommandError


def read_images(paths: Sequence[str], shape: tuple[int, int, int]) -> Tensor:
    """Image files → a float64 batch (N, C, H, W) in [−1, 1], resized to the model's H × W."""
    from PIL import Image, UnidentifiedImageError

    channels, height, width = shape
    if channels not in (1, 3):
        raise CommandError(f"this model takes {channels}-channel images; image files carry 1 (L) or 3 (RGB)")
    batch = []
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise CommandError(f"image {name!r}: no such file")
        try:
            with Image.open(path) as img:
                img = img.convert("L" if channels == 1 else "RGB")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BILINEAR)
                data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        except UnidentifiedImageError:
            raise CommandError(f"image {name!r}: not an image file PIL can read") from None
        batch.append(data.reshape(height, width, channels).permute(2, 0, 1).to(torch.float64))
    return torch.stack(batch) / 127.5 - 1.0


def _to_uint8(images: Tensor) -> Tensor:
    """(N, C, H, W) in [−1, 1] → uint8 (N, H, W, C), clipped."""
    x = ((images.detach().to("cpu", torch.float64).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def save_grid(images: Tensor, path: str | Path, *, scale: int = 1) -> Path:
    """Write a batch (N, C, H, W) in [−1, 1] as one PNG grid of ⌈√N⌉ columns, each pixel ``scale``×``scale``."""
    from PIL import Image

    x = _to_uint8(images)
    n, h, w, c = x.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 1
    grid = torch.zeros(rows * (h + pad) + pad, cols * (w + pad) + pad, c, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = x[i]
    img = Image.fromarray(grid.squeeze(-1).numpy() if c == 1 else grid.numpy())
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def save_images(images: Tensor, directory: str | Path, names: Sequence[str], *, scale: int = 1) -> list[Path]:
    """Write each image of the batch as its own PNG in ``directory``."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for img_data, name in zip(_to_uint8(images), names):
        arr = img_data.squeeze(-1).numpy() if img_data.shape[-1] == 1 else img_data.numpy()
        img = Image.fromarray(arr)
        if scale > 1:
            img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
        path = directory / name
        img.save(path)
        out.append(path)
    return out

