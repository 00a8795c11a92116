"""The ``flowdiff`` command refuses bad input with one line and the right status, and never destroys a file.

Exit status 2: the arguments are wrong (argparse's errors, outputs that collide or would overwrite an input);
1: a run-time failure (a missing or damaged file, an output that exists, a model that does not fit). Every case
runs in-process through ``main`` (fast) and, with ``--slow``, as the real command line in a subprocess; a few
representative cases always run in a subprocess.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_runs import run_in as run_main

from flowdiff.runs.imageio import ImageFormat, read_image, write_image

ROOT = Path(__file__).resolve().parents[1]
MIX = ["--model", "analytic-mixture"]


def run_subprocess(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("FLOWDIFF_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "flowdiff.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(params=["main", pytest.param("subprocess", marks=pytest.mark.slow)])
def cli(request, capsys):
    if request.param == "main":
        return lambda argv, cwd: run_main(capsys, argv, cwd)
    return run_subprocess


def assert_failed(code, err, expected, *fragments):
    assert code == expected, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


@pytest.fixture
def work(tmp_path):
    """A folder with 8×8 digits as 8- and 16-bit grey PNGs (two with one name in two folders), a colour PNG, a
    16×16 PNG, a damaged PNG, a latents file of the mixture model and files in the way of outputs."""
    from flowdiff.models.pretrained import digits_data

    x = digits_data("test").images[:3]
    grey8, grey16 = ImageFormat("L", 8), ImageFormat("L", 16)
    from flowdiff.runs.imageio import from_data

    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    write_image(tmp_path / "a" / "x.png", from_data(x[0], grey8), grey8)
    write_image(tmp_path / "b" / "x.png", from_data(x[1], grey8), grey8)
    rng = np.random.default_rng(0)
    write_image(tmp_path / "deep.png", rng.integers(0, 65536, (8, 8, 1)).astype(np.uint16), grey16)
    write_image(tmp_path / "rgb.png", rng.integers(0, 256, (8, 8, 3)).astype(np.uint8), ImageFormat("RGB", 8))
    write_image(tmp_path / "big.png", rng.integers(0, 256, (16, 16, 1)).astype(np.uint8), grey8)
    (tmp_path / "broken.png").write_bytes((tmp_path / "big.png").read_bytes()[:50])
    (tmp_path / "notes.txt").write_text("not a folder")
    (tmp_path / "existing.png").write_bytes(b"precious")
    (tmp_path / "lat.safetensors").write_bytes(b"\0" * 7)
    (tmp_path / "C").mkdir()
    (tmp_path / "C" / "reference.safetensors").write_bytes(b"someone else's file")
    return tmp_path


# (argv, exit status, fragments the one-line message must contain); paths are relative to the work folder
BAD = [
    # usage errors found by the parser
    (["sample", *MIX, "--nfe", "5,,10"], 2, ["--nfe", "5,,10"]),
    (["compare", *MIX, "--nfe", "5,,10"], 2, ["--nfe", "empty entry"]),
    (["compare", *MIX, "--nfe", ","], 2, ["--nfe"]),
    (["sample", *MIX, "--seed", "2**70"], 2, ["--seed", "2**70"]),
    (["sample", *MIX, "--seed", str(2**70)], 2, ["--seed", str(2**70)]),
    (["sample", *MIX, "--seed", "-1"], 2, ["--seed"]),
    (["sample", *MIX, "--scale", "1000"], 2, ["--scale", "1000"]),
    (["sample", *MIX, "--steps", "0"], 2, ["--steps"]),
    (["sample", *MIX, "--num", "two"], 2, ["--num", "two"]),
    (["compare", *MIX, "--rtol", "0"], 2, ["--rtol"]),
    (["compare", *MIX, "--rtol", "abc"], 2, ["--rtol", "abc"]),
    (["compare", *MIX, "--grid", "trailing,,karras"], 2, ["--grid"]),
    (["sample", *MIX, "--device", "toaster"], 2, ["--device", "toaster"]),
    (["decode", "lat.safetensors", *MIX, "--dtype", "float8"], 2, ["--dtype", "float8"]),
    # usage errors found when the outputs are planned, before any model runs
    (["roundtrip", "a/x.png", "a/x.png", *MIX, "--out", "D"], 2, ["x.png", "both"]),
    (["roundtrip", "a/x.png", *MIX, "--out", "a"], 2, ["a/x.png", "input"]),
    (["encode", "a/x.png", *MIX, "--out", "a/x.png"], 2, ["--out", "a/x.png"]),
    (["roundtrip", "a/x.png", *MIX, "--latents", "a/x.png"], 2, ["--latents", "a/x.png"]),
    # run-time failures: files
    (["encode", "missing.png", *MIX], 1, ["missing.png", "no such file"]),
    (["encode", "broken.png", *MIX], 1, ["broken.png"]),
    (["encode", "notes.txt", *MIX], 1, ["notes.txt"]),
    (["encode", "rgb.png", *MIX], 1, ["rgb.png", "3 channels", "1-channel"]),
    (["encode", "big.png", *MIX], 1, ["big.png", "16×16", "8×8"]),
    (["decode", "lat.safetensors", *MIX], 1, ["lat.safetensors"]),
    (["decode", "a/x.png", *MIX], 1, ["a/x.png"]),
    (["decode", "missing.safetensors", *MIX], 1, ["missing.safetensors"]),
    # run-time failures: outputs that exist or cannot be written
    (["sample", *MIX, "--out", "existing.png"], 1, ["existing.png", "--overwrite"]),
    (["sample", *MIX, "--out", "notes.txt/s.png"], 1, ["notes.txt"]),
    (["sample", *MIX, "--out", "s.txt"], 1, ["s.txt", ".png"]),
    (["sample", *MIX, "--out", "a"], 1, ["'a'", "folder"]),
    (["encode", "a/x.png", *MIX, "--out", "notes.txt/l.safetensors"], 1, ["notes.txt"]),
    (["roundtrip", "a/x.png", *MIX, "--out", "notes.txt"], 1, ["notes.txt", "folder"]),
    (["compare", *MIX, "--out", "notes.txt"], 1, ["notes.txt"]),
    (["sample", "--model", "no/such/dir"], 1, ["no/such/dir"]),
    (["sample", "--model", ""], 1, ["--model ''"]),
    (["compare", *MIX, "--out", "C", "--no-progress"], 1, ["reference.safetensors", "--overwrite"]),
]


@pytest.mark.parametrize(("argv", "code", "fragments"), BAD, ids=[" ".join(c[0]) for c in BAD])
def test_bad_input_is_one_line_with_the_right_status_and_nothing_written(cli, work, argv, code, fragments):
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    got, out, err = cli(argv, work)
    assert_failed(got, err, code, *fragments)
    after = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    assert after == before  # no input changed, no output half-written, nothing created


def test_the_real_command_line_fails_cleanly_for_each_kind(work):
    """Representative cases as a subprocess: a parser error (2), a planning error (2), a file error (1)."""
    for argv, code, fragments in (BAD[0], BAD[14], BAD[21]):
        got, out, err = run_subprocess(argv, work)
        assert_failed(got, err, code, *fragments)


def test_outputs_keep_the_inputs_relative_paths_and_depth(cli, work):
    """Two inputs named x.png in two folders make two outputs; a 16-bit input comes back as 16 bits, exactly (the
    reversible solver with its float64 state inverts to the last bit of float32 images)."""
    code, out, err = cli(["roundtrip", "a/x.png", "b/x.png", "deep.png", *MIX, "--solver", "reversible_heun",
                          "--steps", "6", "--out", "D", "--latents", "l.safetensors"], work)
    assert code == 0, err
    written = sorted(p.relative_to(work / "D").as_posix() for p in (work / "D").rglob("*.png"))
    assert written == ["a/x.png", "b/x.png", "deep.png"]
    for name in written:
        original, fmt = read_image(work / name)
        back, back_fmt = read_image(work / "D" / name)
        assert back_fmt == fmt and np.array_equal(back, original), name
    assert read_image(work / "D" / "deep.png")[1].bits == 16
    # decode writes the same names, at the same depth, from the latents file alone
    code, out, err = cli(["decode", "l.safetensors", *MIX, "--out", "E"], work)
    assert code == 0, err
    for name in written:
        assert np.array_equal(read_image(work / "E" / name)[0], read_image(work / name)[0]), name
    # a second decode into the same folder would overwrite: refused, then allowed with --overwrite
    code, out, err = cli(["decode", "l.safetensors", *MIX, "--out", "E"], work)
    assert_failed(code, err, 1, "--overwrite")
    code, out, err = cli(["decode", "l.safetensors", *MIX, "--out", "E", "--overwrite"], work)
    assert code == 0, err


def test_decoding_with_another_model_or_precision_is_refused_unless_asked(cli, work):
    code, out, err = cli(["encode", "a/x.png", *MIX, "--solver", "reversible_heun", "--steps", "4",
                          "--out", "l.safetensors"], work)
    assert code == 0, err
    code, out, err = cli(["decode", "l.safetensors", "--model", "digits", "--out", "D"], work)
    assert_failed(code, err, 1, "l.safetensors", "analytic-mixture", "--ignore-fingerprint")
    assert not (work / "D").exists() or not any((work / "D").rglob("*.png"))
    code, out, err = cli(["decode", "l.safetensors", *MIX, "--dtype", "float16", "--out", "D"], work)
    assert_failed(code, err, 1, "l.safetensors", "--dtype float16")
    code, out, err = cli(["decode", "l.safetensors", "--model", "digits", "--out", "D", "--ignore-fingerprint"],
                         work)
    assert code == 0, err
    assert (work / "D" / "x.png").is_file()


def test_images_far_outside_the_data_range_are_refused_by_the_command(cli, work):
    path = work / "hot.tif"
    write_image(path, np.full((8, 8, 1), 200.0, dtype=np.float32), ImageFormat("L", 32, "float"))
    code, out, err = cli(["encode", "hot.tif", *MIX], work)
    assert_failed(code, err, 1, "hot.tif", "data range")


def test_a_float_tiff_round_trips_at_float_depth(cli, work):
    path = work / "f.tif"
    pixels = np.random.default_rng(3).uniform(0, 1, (8, 8, 1)).astype(np.float32)
    write_image(path, pixels, ImageFormat("L", 32, "float"))
    code, out, err = cli(["roundtrip", "f.tif", *MIX, "--solver", "reversible_heun", "--steps", "4",
                          "--dtype", "float64", "--out", "D"], work)
    assert code == 0, err
    back, fmt = read_image(work / "D" / "f.tif")
    assert fmt == ImageFormat("L", 32, "float")
    assert np.abs(back - pixels).max() <= 4 * np.finfo(np.float32).eps  # float64 round trip, stored in float32
    assert torch.finfo(torch.float32).eps > 0
