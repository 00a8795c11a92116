"""The scripts in examples/ run on the shipped model (small settings) and write what a user would look at.

Each script runs as ``__main__`` in this process (``runpy``; the imports of torch and diffusers are
shared, which keeps this quick), with ``--out`` a temporary folder; then its table is read back and
checked for the property the script exists to show.
"""

from __future__ import annotations

import csv
import runpy
import sys
from pathlib import Path

import pytest

import flowdiff

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, monkeypatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(EXAMPLES / name), *args])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(EXAMPLES / name), run_name="__main__")
    assert exit_.value.code == 0, f"{name} exited with {exit_.value.code}"


def _table_rows(markdown: str) -> list[list[str]]:
    """The body rows of the markdown tables in ``markdown`` as lists of cells."""
    rows = []
    for line in markdown.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_every_example_is_tested():
    tested = {"compare_solvers.py", "reconstruction.py", "property_test_model.py", "diffusers_pipeline.py",
              "likelihood.py", "noise_optimisation.py"}
    assert {p.name for p in EXAMPLES.glob("*.py")} == tested


def test_compare_solvers(tmp_path, monkeypatch):
    run_example("compare_solvers.py", monkeypatch, "--solvers", "euler,dpmpp_2m", "--grids", "logsnr",
                "--nfe", "5,10", "--batch", "2", "--rtol", "1e-3", "--out", str(tmp_path))
    assert (tmp_path / "error_vs_nfe.png").stat().st_size > 1000
    runs = list(csv.DictReader((tmp_path / "compare.csv").open()))
    assert {(r["solver"], int(r["budget"])) for r in runs} == {(s, b) for s in ("euler", "dpmpp_2m") for b in (5, 10)}
    for solver in ("euler", "dpmpp_2m"):  # twice the evaluations, a smaller error
        error = {int(r["budget"]): float(r["rms_error"]) for r in runs if r["solver"] == solver}
        assert error[10] < error[5], (solver, error)
    assert "| dpmpp_2m | logsnr |" in (tmp_path / "compare.md").read_text()


def test_reconstruction_of_a_folder(tmp_path, monkeypatch):
    run_example("reconstruction.py", monkeypatch, "--steps", "5", "--out", str(tmp_path))
    assert len(list((tmp_path / "digits").glob("*.png"))) == 8  # the default input, written as a folder
    assert (tmp_path / "reconstruction.png").is_file()
    rows = {r[0]: r for r in _table_rows((tmp_path / "reconstruction.md").read_text())[1:]}
    assert rows["reversible_heun"][-1] == "yes"            # bit for bit, float32 images
    assert rows["euler"][-1] == "no" and float(rows["euler"][3]) > 1e-4   # DDIM inversion does not come back


def test_reconstruction_of_a_user_folder(tmp_path, monkeypatch):
    """A folder of other-sized RGB images is read, converted and resized to the model's 1×8×8."""
    from PIL import Image

    folder = tmp_path / "mine"
    folder.mkdir()
    for i in range(2):
        Image.new("RGB", (32, 24), (40 * i, 200, 90)).save(folder / f"img{i}.jpg")
    run_example("reconstruction.py", monkeypatch, "--images", str(folder), "--steps", "3",
                "--solvers", "reversible_heun", "--out", str(tmp_path / "out"))
    text = (tmp_path / "out" / "reconstruction.md").read_text()
    assert text.startswith("Round trips of 2 images")
    assert _table_rows(text)[1][-1] == "yes"


def test_property_tests_of_a_model(tmp_path, monkeypatch):
    run_example("property_test_model.py", monkeypatch, "--examples", "2", "--out", str(tmp_path))
    rows = _table_rows((tmp_path / "property_report.md").read_text())
    results = {r[0]: r[2] for r in rows if r[0].startswith("test_")}
    assert len(results) == 3 and set(results.values()) == {"passed"}, results
    measured = {r[0]: float(r[1]) for r in rows if not r[0].startswith(("test_", "property", "measured"))}
    assert measured["reversible_heun, float32: max abs error of decode(encode(x))"] == 0.0
    assert measured["reversible_heun, float64: max abs error of decode(encode(x))"] < 1e-10


def test_diffusers_pipeline_end_to_end(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    run_example("diffusers_pipeline.py", monkeypatch, "--batch", "1", "--steps", "5", "--out", str(tmp_path))
    assert (tmp_path / "tiny-ddim-pipeline" / "model_index.json").is_file()
    assert (tmp_path / "pipeline.png").is_file()
    rows = _table_rows((tmp_path / "pipeline.md").read_text())[1:]
    assert float(rows[0][3]) < 1e-5          # flowdiff's Euler is diffusers' DDIM loop (relative difference)
    assert float(rows[1][2]) == 0.0          # the reversible round trip is exact


@pytest.mark.skipif(not hasattr(flowdiff, "log_likelihood"),
                    reason="flowdiff.log_likelihood is not in this version yet (issue 16): "
                           "examples/likelihood.py needs it")
def test_likelihood_bits_per_dim(tmp_path, monkeypatch):
    run_example("likelihood.py", monkeypatch, "--batch", "1", "--steps", "4", "--probes", "1", "--out", str(tmp_path))
    rows = {r[0]: r for r in _table_rows((tmp_path / "likelihood.md").read_text())[1:]}
    digits, noise = float(rows["held-out digits"][1]), float(rows["uniform noise"][1])
    assert digits < noise                    # the model puts more density on digits than on noise


def test_noise_optimisation(tmp_path, monkeypatch):
    run_example("noise_optimisation.py", monkeypatch, "--batch", "2", "--steps", "4", "--iterations", "6",
                "--lr", "0.05", "--out", str(tmp_path))
    rows = _table_rows((tmp_path / "noise_optimisation.md").read_text())[1:]
    ddim, optimised = float(rows[0][1]), float(rows[1][1])
    assert optimised < ddim                  # the gradient steps improved on DDIM inversion's noise
    assert rows[1][2] == rows[1][3] == "4"   # checkpoint: the backward pass recomputes each of the 4 steps once
    assert (tmp_path / "noise_optimisation.png").is_file()
