"""Held-out digits written as 8-bit PNG files: the inputs of the folder-run and file-hazard tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import flowdiff


def write_digits(folder: Path, names, start: int = 0) -> None:
    images = flowdiff.digits_data("test").images[start:start + len(names)]
    for name, image in zip(names, images):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = ((image[0].numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(path)
