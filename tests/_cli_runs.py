"""Helpers for tests that run the ``flowdiff`` command line in-process from a folder of their own."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

import flowdiff
from flowdiff.cli import main
from flowdiff.runs.imageio import ImageFormat, write_image

GREY8 = ImageFormat("L", 8)


def run_in(capsys, argv, cwd):
    """``flowdiff argv`` run in the folder ``cwd``: (exit status, stdout, stderr)."""
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main([str(a) for a in argv])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    """The one line a refusal printed, after checking that it is one line and no traceback."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def write_digits(folder: Path, n: int) -> list[Path]:
    """The first ``n`` held-out digits as 8-bit grey PNG files ``d0.png``, ``d1.png``, … in ``folder``."""
    images = flowdiff.digits_data("test").images[:n]
    paths = []
    for i, x in enumerate(images):
        pixels = np.round((x.double().numpy().transpose(1, 2, 0) + 1) / 2 * 255).astype(np.uint8)
        paths.append(folder / f"d{i}.png")
        write_image(paths[-1], pixels, GREY8)
    return paths
