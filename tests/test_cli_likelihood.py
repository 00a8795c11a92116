"""``flowdiff likelihood`` in a subprocess: the printed figures are log_likelihood's, errors are one line."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import flowdiff
from flowdiff.cli import load_model, read_images, save_images

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--model", "analytic-mixture", "--divergence", "hutchinson", "--probes", "2", "--solver", "rk4",
       "--steps", "3", "--seed", "5"]   # 8-bit files: dequantized to 256 levels by default


def flowdiff_cli(*argv):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-m", "flowdiff.cli", "likelihood", *map(str, argv)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=ROOT)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory):
    directory = tmp_path_factory.mktemp("likelihood")
    paths = save_images(flowdiff.digits_data("test").images[:2], directory, ["d0.png", "d1.png"])
    return directory, [str(p) for p in paths]


def test_cli_prints_the_per_image_and_mean_bits_per_dim_of_log_likelihood(pngs, capsys):
    directory, paths = pngs
    out = flowdiff_cli(*paths, *RUN)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.startswith("d")]
    assert [r[0] for r in rows] == ["d0.png", "d1.png"]
    printed = torch.tensor([float(r[2]) for r in rows], dtype=torch.float64)
    # the same computation in-process
    torch.set_num_threads(1)
    loaded = load_model("analytic-mixture", dtype=torch.float32)
    images = read_images(paths, loaded.shape).float()
    r = flowdiff.log_likelihood(loaded.flow, images, estimator=flowdiff.Trace("hutchinson", probes=2), solver="rk4",
                                steps=3, dequantize=256, dequantization="uniform",
                                generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(printed, r.bits_per_dim, atol=2e-5, rtol=0)
    mean = float(re.search(r"mean bits/dim: ([-0-9.]+) ± ([0-9.]+)", out.stdout).group(1))
    assert mean == pytest.approx(float(r.bits_per_dim.mean()), abs=2e-5)
    assert "uniform dequantization to 256 levels" in out.stdout and "offset 6.9944 bits" in out.stdout
    assert re.search(r"NFE \d+ \(field evaluations\) and \d+ vector-Jacobian products", out.stdout)
    # the error bar printed is the probes' and the check solve's together
    printed_error = torch.tensor([float(r[4]) for r in rows], dtype=torch.float64)
    torch.testing.assert_close(printed_error, r.bits_per_dim_error, atol=2e-5, rtol=0)
    # truncated-normal noise, and the continuous density's bits/dim on request (in-process)
    from flowdiff.cli import main

    for how, offset in [("truncated_normal", "offset 6.9944 bits"), ("none", "continuous density")]:
        capsys.readouterr()
        assert main(["likelihood", *paths, *RUN, "--dequantization", how]) == 0
        text = capsys.readouterr().out
        assert offset in text and (how == "none" or f"{how} dequantization" in text), text
        bpd = torch.tensor([float(line.split()[2]) for line in text.splitlines() if line.startswith("d")])
        kw = {} if how == "none" else {"dequantize": 256, "dequantization": how}
        ref = flowdiff.log_likelihood(loaded.flow, images, estimator=flowdiff.Trace("hutchinson", probes=2),
                                      solver="rk4", steps=3, generator=torch.Generator().manual_seed(5), **kw)
        torch.testing.assert_close(bpd, ref.bits_per_dim.float(), atol=2e-5, rtol=0)
    # --data DIR reads the same files (in-process)
    capsys.readouterr()
    assert main(["likelihood", "--data", str(directory), *RUN]) == 0
    assert capsys.readouterr().out.splitlines()[1:4] == out.stdout.splitlines()[1:4]


def test_cli_errors_are_one_line(pngs, tmp_path, capsys):
    from flowdiff.cli import main

    _, paths = pngs
    for argv, code, text in [(["--data", tmp_path / "none"], 1, "no such directory"),
                             (["--data", tmp_path], 1, "no image files"),
                             ([paths[0], "--model", "analytic-mixture", "--probes", "3"], 1,
                              "--divergence auto takes at D=64 <= 256"),
                             ([paths[0], "--model", "analytic-mixture", "--solver", "nope"], 1, "unknown"),
                             ([paths[0], "--model", "analytic-mixture", "--solver", "rk4"], 1, "give --steps N"),
                             ([paths[0], "--model", "analytic-mixture", "--solver", "rk4", "--steps", "3",
                               "--rtol", "1e-3"], 1, "--rtol/--atol set an adaptive solve"),
                             ([paths[0], "--data", tmp_path], 2, "not allowed"),
                             ([], 2, "required")]:
        assert main(["likelihood", *map(str, argv)]) == code, argv
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and text in lines[0] and "Traceback" not in err, (argv, err)
