"""``--learned FILE`` on the command line: a learned solver saved from Python (``LearnedSolver.save``) generates with
``flowdiff sample`` and joins ``flowdiff compare``'s table, each equal to the Python API on the same noise (the PNG
byte for byte, the CSV row value for value); a file for another model, a missing or malformed file, options that
contradict it and the commands that encode are refused in one line naming ``--learned`` and the file.

The learned solvers are made as ``learn_solver`` returns them (kept, with small per-step shifts on a named grid,
fingerprinted for the shipped digits model) rather than fitted: a fit is hundreds of solves, and what is tested here
is the file's way through the command line, which does not depend on the values a fit finds.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from _cli_runs import one_line, run_in

import flowdiff
from flowdiff.cli import save_grid
from flowdiff.engine.fingerprint import flow_fingerprint
from flowdiff.engine.grids import make_sigmas

HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()
pytestmark = pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")


def _learned(flow, nfe, base="unipc", size=0.03, grid="logsnr"):
    sigmas = make_sigmas(flow.schedule, grid, nfe)
    return flowdiff.LearnedSolver(solver=base, solver_options={}, nfe=nfe, sigmas=sigmas, coefficients=(),
                                  fingerprint=flow_fingerprint(flow), kept=True, learn=("shifts",),
                                  shifts=tuple(size * (-1) ** i for i in range(nfe)))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The digits flow (float32, as ``flowdiff sample`` loads it) and learned solvers saved in a folder."""
    torch.set_num_threads(1)  # as the command sets it for the built-in models: the same arithmetic
    flow = flowdiff.pretrained("digits")
    folder = tmp_path_factory.mktemp("learned")
    made = {"unipc5": _learned(flow, 5), "dpm3": _learned(flow, 3, base="dpmpp_2m", size=0.0),
            "good5": _learned(flow, 5, size=0.0, grid="trailing"), "unipc5b": _learned(flow, 5, size=0.01)}
    paths = {name: learned.save(folder / f"{name}.json") for name, learned in made.items()}
    return flow, made, paths, folder


def _noise(seed, n, dtype=torch.float32):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def test_sample_with_a_learned_file_writes_the_python_api_grid_byte_for_byte(files, capsys, tmp_path):
    flow, made, paths, _ = files
    code, out, err = run_in(capsys, ["sample", "--learned", paths["unipc5"], "--seed", 3, "--num", 4, "--scale", 2,
                                     "--out", "cli.png"], tmp_path)
    assert code == 0, err
    assert "5 NFE, 5 steps" in out and str(paths["unipc5"]) in out
    learned = flowdiff.LearnedSolver.load(paths["unipc5"], flow)
    python = flowdiff.generate(flow, _noise(3, 4), solver=learned.as_solver(), grid=learned.sigmas)
    assert python.stats.nfe == learned.nfe
    save_grid(python.x, tmp_path / "python.png", scale=2)
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "python.png").read_bytes()
    base = flowdiff.generate(flow, _noise(3, 4), solver=learned.base(), grid=learned.sigmas)  # the shifts matter
    save_grid(base.x, tmp_path / "base.png", scale=2)
    assert (tmp_path / "base.png").read_bytes() != (tmp_path / "cli.png").read_bytes()


def _rows(text):
    """The CSV's rows without the wall time (the one column that differs between two runs)."""
    return [{k: v for k, v in row.items() if k != "wall_time"} for row in csv.DictReader(io.StringIO(text))]


def test_compare_with_learned_files_gives_the_python_table_and_reproduces_a_learned_best_row(files, capsys,
                                                                                           tmp_path):
    flow, made, paths, _ = files
    argv = ["compare", "--solver", "euler", "--grid", "trailing", "--nfe", "3,5", "--batch", 2, "--seed", 1,
            "--learned", paths["good5"], "--learned", paths["dpm3"], "--no-progress", "--out", "report"]
    code, out, err = run_in(capsys, argv, tmp_path)
    assert code == 0, err
    reference = flowdiff.reference_solution(flow, _noise(1, 2, torch.float64), rtol=1e-5, atol=1e-5)
    python = flowdiff.compare(flow, _noise(1, 2), solvers=["euler", made["good5"], made["dpm3"]], grids=["trailing"],
                              nfe=[3, 5], reference=reference)
    assert [r.solver for r in python.runs] == ["euler", "euler", "learned(unipc)", "learned(dpmpp_2m)"]
    assert _rows((tmp_path / "report" / "compare.csv").read_text()) == _rows(python.to_csv())
    best = python.best(5)
    assert best.solver == "learned(unipc)"  # unipc beats euler on their grid: the best row
    line = next(line for line in out.splitlines() if line.startswith("reproduce the best flowdiff row at NFE 5"))
    command = line.split(": ", 1)[1].split()
    assert command[:4] == ["flowdiff", "sample", "--learned", str(paths["good5"])]
    code, _, err = run_in(capsys, [*command[1:], "--scale", 2, "--out", "again.png"], tmp_path)  # the row, again
    assert code == 0, err
    sample = flowdiff.generate(flow, _noise(1, 2), solver=made["good5"].as_solver(), grid=made["good5"].sigmas)
    save_grid(sample.x, tmp_path / "python.png", scale=2)
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "python.png").read_bytes()


@pytest.mark.parametrize(("argv", "status", "says"), [
    (["sample", "--learned", "{unipc5}", "--solver", "heun"], 2,
     r"--solver heun beside --learned '.*unipc5\.json': the learned solver runs its own solver .* leave it out"),
    (["sample", "--learned", "{unipc5}", "--grid", "karras", "--nfe", "5"], 2,
     r"--grid karras, --nfe 5 beside --learned '.*unipc5\.json'.*leave them out"),
    (["sample", "--learned", "{unipc5}", "--steps", "5"], 2, r"--steps 5 beside --learned"),
    (["sample", "--learned", "{unipc5}", "--learned", "{unipc5b}"], 2,
     r"--learned given 2 times \('.*unipc5\.json', '.*unipc5b\.json'\): sample generates with one learned solver"),
    (["sample", "--learned", "{missing}"], 1, r"^flowdiff sample: error: --learned '.*missing\.json': no such file$"),
    (["sample", "--learned", "{missing}", "--model", "{missing}"], 1, r"--learned '.*missing\.json': no such file"),
    (["compare", "--learned", "{missing}", "--model", "{missing}"], 1, r"--learned '.*missing\.json': no such file"),
    (["sample", "--learned", "{folder}"], 1, r"--learned '.*': .*a folder, not a regular file"),
    (["sample", "--learned", "{malformed}"], 1, r"--learned '.*malformed\.json': .*malformed\.json is not a flowdiff "
                                                r"learned solver"),
    (["sample", "--learned", "{unipc5}", "--dtype", "float64"], 1,
     r"--learned '.*unipc5\.json': this learned solver was fitted on the flow with fingerprint \w+; the flow given "
     r"has fingerprint"),
    (["sample", "--learned", "{unipc5}", "--model", "analytic-mixture"], 1,
     r"--learned '.*unipc5\.json': this learned solver was fitted on the flow with fingerprint"),
    (["compare", "--learned", "{unipc5}", "--nfe", "3,4"], 2,
     r"--learned '.*unipc5\.json' was fitted at NFE 5 and runs only there; --nfe 3,4 does not list it: add 5"),
    (["compare", "--learned", "{unipc5}", "--learned", "{unipc5b}", "--nfe", "5"], 2,
     r"--learned '.*unipc5\.json' and --learned '.*unipc5b\.json' are both learned\(unipc\) at NFE 5"),
    (["compare", "--learned", "{unipc5}", "--task", "roundtrip"], 2,
     r"--learned '.*unipc5\.json' beside --task roundtrip: a learned solver is fitted for generation only"),
    (["encode", "--learned", "{unipc5}", "x.png"], 2,
     r"argument --learned: '.*unipc5\.json': a learned solver is fitted for generation only .* encode takes --solver"),
    (["roundtrip", "--learned", "{unipc5}", "x.png"], 2,
     r"argument --learned: '.*unipc5\.json': a learned solver is fitted for generation only .* roundtrip takes"),
])
def test_each_refusal_is_one_line_naming_learned_and_the_file_and_writes_nothing(files, capsys, tmp_path, argv,
                                                                                 status, says):
    _, _, paths, folder = files
    (tmp_path / "malformed.json").write_text('{"format": "something else"}\n')
    names = {**{k: str(v) for k, v in paths.items()}, "missing": str(tmp_path / "missing.json"),
             "folder": str(folder), "malformed": str(tmp_path / "malformed.json")}
    argv = [a.format(**names) for a in argv]
    out = "out.png" if argv[0] == "sample" else "out"
    code, _, err = run_in(capsys, [*argv, "--out", out], tmp_path)
    assert code == status
    assert re.search(says, one_line(err)), err
    assert not (tmp_path / out).exists()


def test_sample_with_a_rejected_fit_says_it_runs_the_base_method(files, capsys, tmp_path):
    """A file whose fit the held-out half rejected (``kept=False``: ``as_solver()`` is the base method) was announced
    as running "on its fitted grid", as a kept one is (S14): the line now says the base method runs."""
    flow, _, _, folder = files
    rejected = dataclasses.replace(_learned(flow, 5, size=0.0, grid="trailing"), kept=False)
    path = rejected.save(folder / "rejected.json")
    code, out, err = run_in(capsys, ["sample", "--learned", path, "--seed", 3, "--num", 2, "--out", "r.png"], tmp_path)
    assert code == 0, err
    assert "fitted grid" not in out and "base method unipc" in out and "not kept" in out
    code, out, err = run_in(capsys, ["sample", "--learned", str(folder / "good5.json"), "--seed", 3, "--num", 2,
                                     "--out", "k.png"], tmp_path)
    assert code == 0, err
    assert "on its fitted grid" in out and "base method" not in out
