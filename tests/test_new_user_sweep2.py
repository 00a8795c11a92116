"""The second new-user sweep: what the first left, and what varying each command's flags found next.

Each test here failed before its fix: an option silently ignored, a file written under a name that says another
kind, an error naming a Python keyword where the user typed a flag, a model output silently converted.
"""

import os
from pathlib import Path

import numpy as np
import pytest

import flowdiff
from flowdiff.cli import main
from flowdiff.runs.imageio import ImageFormat, write_image

GREY8 = ImageFormat("L", 8)


def run(capsys, argv, cwd):
    old = os.getcwd()
    os.chdir(cwd)
    try:
        code = main([str(a) for a in argv])
    finally:
        os.chdir(old)
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err):
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def write_digits(folder: Path, n: int) -> list[Path]:
    images = flowdiff.digits_data("test").images[:n]
    paths = []
    for i, x in enumerate(images):
        pixels = np.round((x.double().numpy().transpose(1, 2, 0) + 1) / 2 * 255).astype(np.uint8)
        paths.append(folder / f"d{i}.png")
        write_image(paths[-1], pixels, GREY8)
    return paths


# -- likelihood --dequantization none --dequantize K -----------------------------------------------------

def test_likelihood_refuses_dequantize_levels_without_dequantization(tmp_path, capsys):
    """--dequantization none adds no noise: --dequantize 256 beside it was silently ignored."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", png, "--dequantization", "none", "--dequantize", "256",
                                  "--steps", "2"], tmp_path)
    assert code != 0 and out == ""
    line = one_line(err)
    assert "--dequantize 256" in line and "--dequantization none" in line


def test_likelihood_without_dequantize_still_dequantizes_to_256_levels(tmp_path, capsys):
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, ["likelihood", png, "--steps", "2"], tmp_path)
    assert code == 0, err
    assert "dequantization to 256 levels" in out


# -- encode --out x.png ------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["encode", "--out", "x.png"], ["roundtrip", "--latents", "x.PNG"]])
def test_latents_output_with_an_image_name_is_refused(tmp_path, capsys, argv):
    """`encode --out x.png` wrote a safetensors file under a .png name (no viewer opens it; decode reads it)."""
    (png,) = write_digits(tmp_path, 1)
    code, out, err = run(capsys, [argv[0], png, *argv[1:], "--steps", "2"], tmp_path)
    assert code == 2 and out == ""
    line = one_line(err)
    assert f"{argv[1]} '{argv[2]}'" in line and ".safetensors" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d0.png"]
