"""The ``flowdiff`` command, in-process through ``main([...])``, plus one run of the installed console script."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import flowdiff
import solvers
from flowdiff.cli import build_parser, main, read_images, save_images

MIX = ["--model", "analytic-mixture"]
HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()



def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, expected_code=1):
    assert code == expected_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def digit_pngs(tmp_path_factory):
    """Four held-out digits written as 8×8 grey PNGs."""
    from flowdiff.models.pretrained import digits_data

    directory = tmp_path_factory.mktemp("digits")
    images = digits_data("test").images[:4]
    paths = save_images(images, directory, [f"d{i}.png" for i in range(4)])
    return [str(p) for p in paths], images


def test_help_documents_every_command_and_option(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0
    for command in ("compare", "sample", "encode", "decode", "roundtrip"):
        assert command in out
    for command in ("compare", "sample", "encode", "roundtrip"):
        code, out, _ = run(capsys, command, "--help")
        assert code == 0
        for option in ("--model", "--solver", "--nfe", "--grid", "--device", "--dtype"):
            assert option in out, (command, option)
        assert ("--seed" in out) == (command in ("compare", "sample")), command  # the commands that draw noise
    for command in ("sample", "encode", "roundtrip"):
        assert "--steps" in run(capsys, command, "--help")[1]
    code, out, _ = run(capsys, "decode", "--help")
    assert code == 0 and "--model" in out and "--out" in out


def test_no_command_prints_help_and_fails(capsys):
    code, out, _ = run(capsys)
    assert code == 2 and "compare" in out


def test_compare_prints_the_table_and_writes_markdown_csv_and_plot(capsys, tmp_path):
    out_dir = tmp_path / "cmp"
    code, out, err = run(capsys, "compare", *MIX, "--batch", 2, "--nfe", "3,6", "--solver", "euler,heun",
                         "--grid", "trailing,logsnr", "--rtol", "1e-5", "--out", out_dir)
    assert code == 0, err
    assert "compare" in err and "run" in err  # tqdm's progress bar, on stderr
    assert "| solver | NFE 3 | NFE 6 |" in out  # printed: the best grid per solver (--layout best)
    assert "best at NFE 3:" in out and "best at NFE 6:" in out
    rows = list(csv.DictReader((out_dir / "compare.csv").open()))
    assert {(r["solver"], r["grid"], r["budget"]) for r in rows} == \
        {(s, g, b) for s in ("euler", "heun") for g in ("trailing", "logsnr") for b in ("3", "6")}
    assert all(int(r["nfe"]) == int(r["budget"]) for r in rows if r["solver"] == "euler")
    assert "| solver | grid | NFE 3 | NFE 6 |" in (out_dir / "compare.md").read_text()
    with Image.open(out_dir / "compare.png") as img:
        assert img.format == "PNG"
    # a second run reuses the reference kept on disk and reproduces the errors; another seed does not reuse it
    code, again, err = run(capsys, "compare", *MIX, "--batch", 2, "--nfe", "3,6", "--solver", "euler,heun",
                           "--grid", "trailing,logsnr", "--rtol", "1e-5", "--out", out_dir, "--no-progress",
                           "--overwrite")
    assert code == 0, err
    assert "kept in" in again.splitlines()[0]
    assert list(csv.DictReader((out_dir / "compare.csv").open()))[0]["rms_error"] == rows[0]["rms_error"]
    code, other, err = run(capsys, "compare", *MIX, "--batch", 2, "--nfe", "3", "--solver", "euler", "--grid",
                           "trailing", "--rtol", "1e-5", "--out", out_dir, "--no-progress", "--seed", 1,
                           "--overwrite")
    assert code == 0, err
    assert "kept in" not in other


def test_sample_writes_a_png_grid_with_the_asked_budget(capsys, tmp_path):
    path = tmp_path / "s.png"
    code, out, err = run(capsys, "sample", *MIX, "--num", 5, "--nfe", 7, "--solver", "heun", "--grid", "karras",
                         "--scale", 2, "--out", path)
    assert code == 0, err
    assert "7 NFE" in out
    with Image.open(path) as img:
        # 5 images: a 3 × 2 grid of 8×8 tiles with 1-pixel gutters, magnified twice
        assert img.size == (2 * (3 * 9 + 1), 2 * (2 * 9 + 1))


def test_sample_is_reproducible_by_seed_and_changes_with_it(capsys, tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for path, seed in zip(paths, (1, 1, 2)):
        assert run(capsys, "sample", *MIX, "--num", 2, "--steps", 4, "--seed", seed, "--out", path)[0] == 0
    data = [path.read_bytes() for path in paths]
    assert data[0] == data[1] != data[2]


def test_encode_then_decode_through_files_matches_the_library(capsys, tmp_path, digit_pngs):
    pngs, _ = digit_pngs
    latents = tmp_path / "lat.safetensors"
    code, out, err = run(capsys, "encode", *pngs, *MIX, "--steps", 12, "--solver", "heun", "--out", latents,
                         "--dtype", "float64")
    assert code == 0, err and latents.is_file()
    code, out, err = run(capsys, "decode", latents, *MIX, "--out", tmp_path / "dec", "--dtype", "float64")
    assert code == 0, err
    decoded = sorted((tmp_path / "dec").glob("*.png"))
    assert len(decoded) == 4
    # the same encode/decode through the library, from the same (quantised) images
    from flowdiff.cli import load_model

    loaded = load_model("analytic-mixture", dtype=torch.float64)
    images = read_images(pngs, loaded.shape)
    enc = flowdiff.encode(loaded.flow, images, solver="heun", steps=12)
    dec = flowdiff.decode(loaded.flow, enc.latent)
    expected = ((dec.x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    got = read_images([str(p) for p in decoded], loaded.shape)
    assert torch.equal(((got + 1) * 127.5).round().to(torch.uint8), expected)


def test_roundtrip_prints_metrics_that_shrink_with_more_steps(capsys, digit_pngs, tmp_path):
    pngs, _ = digit_pngs
    errors = []
    for steps in (5, 40):
        code, out, err = run(capsys, "roundtrip", *pngs, *MIX, "--steps", steps, "--solver", "heun", "--dtype",
                             "float64", "--latents", tmp_path / f"{steps}.safetensors", "--out",
                             tmp_path / f"rec{steps}")
        assert code == 0, err
        metrics = dict(line.strip().split(": ") for line in out.splitlines() if line.startswith("  "))
        assert set(metrics) == {"mse", "max_abs_error", "psnr_db"}
        errors.append(float(metrics["mse"]))
    assert errors[1] < errors[0]
    assert (tmp_path / "40.safetensors").is_file() and len(list((tmp_path / "rec40").glob("*.png"))) == 4


def test_exact_round_trips_from_the_command_line(capsys, digit_pngs, tmp_path):
    """float32 reversible latents written and read back through files decode to the last bits; a fixed-point latent
    decodes with the plain solver."""
    pngs, _ = digit_pngs
    latents = tmp_path / "rev.safetensors"
    code, out, err = run(capsys, "roundtrip", *pngs, *MIX, "--steps", 10, "--solver", "reversible_heun",
                         "--latents", latents)
    assert code == 0, err
    metrics = dict(line.strip().split(": ") for line in out.splitlines() if line.startswith("  "))
    assert float(metrics["max_abs_error"]) <= 16 * torch.finfo(torch.float32).eps
    assert flowdiff.Latent.load(latents).x.dtype == torch.float64  # the exact state, not rounded to float32
    code, out, err = run(capsys, "decode", latents, *MIX, "--out", tmp_path / "dec")
    assert code == 0, err
    from flowdiff.cli import load_model

    loaded = load_model("analytic-mixture", dtype=torch.float32)
    images = read_images(pngs, loaded.shape)
    got = read_images([str(p) for p in sorted((tmp_path / "dec").glob("*.png"))], loaded.shape)
    assert torch.equal(got, images)  # the same 8-bit PNGs back
    code, out, err = run(capsys, "roundtrip", *pngs, *MIX, "--steps", 10, "--fixed-point", "--dtype", "float64")
    assert code == 0, err
    metrics = dict(line.strip().split(": ") for line in out.splitlines() if line.startswith("  "))
    assert float(metrics["max_abs_error"]) <= 1e-10  # each step to 32 ulps, the decode amplifies the rest


@pytest.mark.parametrize(("argv", "code", "fragment"), [
    (["sample", "--model", "/no/such/dir"], 1, "no such directory"),
    (["sample", *MIX, "--solver", "nope"], 2, "unknown solver 'nope'"),
    (["sample", *MIX, "--grid", "wiggly"], 2, "unknown grid 'wiggly'"),
    (["sample", *MIX, "--nfe", "0"], 2, "positive integer"),
    (["sample", *MIX, "--nfe", "4", "--steps", "4"], 2, "not allowed with argument"),
    (["sample", *MIX, "--dtype", "float8"], 2, "invalid choice"),
    (["sample", *MIX, "--device", "toaster"], 2, "--device"),
    (["compare", *MIX, "--nfe", "10,x"], 2, "positive integer"),
    (["compare", *MIX, "--solver", "euler,nope"], 2, "unknown solver 'nope'"),
    (["compare", *MIX, "--rtol", "2"], 2, "--rtol"),
    (["encode", "/no/such.png", *MIX], 1, "no such file"),
    (["decode", "/no/such.safetensors", *MIX], 1, "no such file"),
    (["frobnicate"], 2, "invalid choice"),
])
def test_bad_arguments_fail_with_one_line(capsys, argv, code, fragment):
    got, _, err = run(capsys, *argv)
    line = assert_one_line_error(got, err, code)
    assert fragment in line


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_asking_for_cuda_without_it_fails_with_one_line(capsys):
    got, _, err = run(capsys, "sample", *MIX, "--device", "cuda")
    assert "CUDA is not available" in assert_one_line_error(got, err)


def test_unreadable_inputs_fail_with_one_line(capsys, tmp_path, digit_pngs):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    got, _, err = run(capsys, "encode", text, *MIX)
    assert "not an image" in assert_one_line_error(got, err)
    got, _, err = run(capsys, "decode", text, *MIX)
    assert_one_line_error(got, err)
    model_file = tmp_path / "model.bin"
    model_file.write_bytes(b"\0")
    got, _, err = run(capsys, "sample", "--model", model_file)
    assert "is a file" in assert_one_line_error(got, err)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    got, _, err = run(capsys, "sample", "--model", empty_dir)
    assert_one_line_error(got, err)


def test_a_diffusers_model_directory_samples_like_the_library(capsys, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                                 block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    pipe = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(clip_sample=False)).save_pretrained(pipe)
    path = tmp_path / "s.png"
    code, out, err = run(capsys, "sample", "--model", pipe, "--num", 3, "--steps", 4, "--grid", "leading",
                         "--seed", 5, "--scale", 1, "--out", path)
    assert code == 0, err
    from flowdiff.cli._images import _to_uint8

    flow = flowdiff.from_diffusers(pipe)
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64).float()
    x = flowdiff.generate(flow, noise, solver="euler", steps=4, grid="leading").x
    with Image.open(path) as img:
        grid = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).reshape(img.height, img.width)
    expected = _to_uint8(x)[..., 0]
    for i in range(3):
        r, k = divmod(i, 2)
        assert torch.equal(grid[1 + 9 * r:9 + 9 * r, 1 + 9 * k:9 + 9 * k], expected[i])


def test_solver_choices_follow_the_registry():
    parser = build_parser()
    args = parser.parse_args(["compare", "--solver", ",".join(solvers.available())])
    assert args.solver == solvers.available()


@pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not in this checkout")
def test_the_default_model_is_the_shipped_digits_model(capsys, tmp_path):
    code, out, err = run(capsys, "sample", "--num", 2, "--nfe", 4, "--out", tmp_path / "s.png")
    assert code == 0, err
    code, out, err = run(capsys, "compare", "--batch", 2, "--nfe", 4, "--solver", "euler", "--grid", "trailing",
                         "--rtol", "1e-3", "--out", tmp_path, "--no-progress")
    assert code == 0, err
    assert out.startswith("model digits")
    # the runs' precision does not change the reference: it is kept and reused
    code, out, err = run(capsys, "compare", "--batch", 2, "--nfe", 4, "--solver", "euler", "--grid", "trailing",
                         "--rtol", "1e-3", "--out", tmp_path, "--no-progress", "--dtype", "float64",
                         "--overwrite")
    assert code == 0, err
    assert "kept in" in out.splitlines()[0]


def test_console_script_runs_and_fails_cleanly(tmp_path):
    exe = shutil.which("flowdiff", path=str(Path(sys.executable).parent)) or shutil.which("flowdiff")
    if exe is None:
        pytest.skip("the flowdiff console script is not installed (pip install -e .)")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the built-in models are tiny: one thread is fastest
    env.pop("FLOWDIFF_DEBUG", None)
    ok = subprocess.run([exe, "sample", *MIX, "--num", "2", "--nfe", "3", "--out", str(tmp_path / "s.png")],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "s.png").is_file()
    bad = subprocess.run([exe, "sample", "--model", str(tmp_path / "missing")], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1
    assert len(bad.stderr.strip().splitlines()) == 1 and "Traceback" not in bad.stderr
