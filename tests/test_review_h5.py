"""R20's finds on the learned solver and ``flowdiff likelihood``: a file saved before ``robust=`` existed loads with
``options["robust"]`` read as None; ``robust=`` is refused where it could not act; the library's warnings are said
again in the flags' words also when the solve that followed them fails."""

import json

import numpy as np
import pytest
import torch
from _cli_runs import GREY8, run_in
from _closed_form import mixture, noise

import flowdiff
from flowdiff.cli import _likelihood
from flowdiff.runs.imageio import write_image
from flowdiff.tools.learned import LearnedSolver, learn_solver


def test_a_file_saved_before_robust_existed_loads_with_robust_none(tmp_path):
    flow = mixture()
    fit = learn_solver(flow, noise(1, n=4), solver="unipc", nfe=4, iterations=1)
    path = fit.save(tmp_path / "new.learned.json")
    data = json.loads(path.read_text())
    assert data["options"]["robust"] is None  # written by today's save
    del data["options"]["robust"]  # as a file written before robust= existed
    old = tmp_path / "old.learned.json"
    old.write_text(json.dumps(data))
    back = LearnedSolver.load(old, flow)
    assert back.options["robust"] is None and back.options == fit.options
    assert back.shifts == fit.shifts and np.array_equal(back.sigmas, fit.sigmas)
    # and today's file still loads as it was written (the format is unchanged both ways)
    assert LearnedSolver.load(path, flow).options == fit.options


def test_robust_is_refused_with_iterations_zero():
    with pytest.raises(ValueError, match=r"robust=2\.0 .*iterations=0 fits nothing"):
        learn_solver(mixture(), noise(1, n=4), solver="unipc", nfe=4, iterations=0, robust=2.0)


def test_robust_is_refused_where_there_is_nothing_to_fit():
    """A one-step grid has no interior σ for learn="grid" to move: no parameter, no objective for robust to shape."""
    flow = mixture()
    sigmas = np.array([flow.schedule.sigma_max, 0.0])
    plain = learn_solver(flow, noise(1, n=4), solver="euler", nfe=1, learn="grid", sigmas=sigmas, iterations=2)
    assert not plain.kept  # nothing fitted: the base method
    with pytest.raises(ValueError, match=r"robust=1\.0 .*learn=\('grid',\) has no parameter to fit"):
        learn_solver(flow, noise(1, n=4), solver="euler", nfe=1, learn="grid", sigmas=sigmas, iterations=2,
                     robust=1.0)


class _Still:
    """ε ≡ 0: x̄ stays where it starts, so every solver is exact; from x̄ = 0 to the last bit (the base residual is 0).
    It holds a tensor, so that the flow can be fingerprinted."""

    def __init__(self):
        self.tag = torch.zeros(1)

    def field(self, xbar, sigma, **kwargs):
        return torch.zeros_like(xbar)


def _still(flow):
    return flowdiff.ProbabilityFlow.from_sigma_field(_Still().field, flow.schedule)


def test_robust_is_refused_where_the_base_method_is_exact():
    flow, zeros = _still(mixture()), torch.zeros(4, 8, dtype=torch.float64)
    plain = learn_solver(flow, zeros, solver="unipc", nfe=4, iterations=1)
    assert plain.base_calibration_error == 0.0
    with pytest.raises(ValueError, match=r"robust=3\.0 .*median per-sample RMS error .* is 0"):
        learn_solver(flow, zeros, solver="unipc", nfe=4, iterations=1, robust=3.0)


def test_the_cli_says_the_librarys_warnings_also_when_the_solve_then_fails(tmp_path, capsys, monkeypatch):
    """Binary images read as 8-bit files lie on the 2-level lattice: log_likelihood warns (before the solve) that
    bits/dim is measured on the 256 levels; a model that then returns NaN fails the solve. The warning is said, in
    the flags' words, before the error."""
    for i in range(2):
        pixels = (np.arange(64).reshape(8, 8, 1) % (2 + i) == 0).astype(np.uint8) * 255
        write_image(tmp_path / f"b{i}.png", pixels, GREY8)
    real = _likelihood.log_likelihood

    def broken(flow, images, **kwargs):
        nan = flowdiff.ProbabilityFlow.from_sigma_field(lambda xbar, sigma, **kw: xbar * float("nan"), flow.schedule)
        return real(nan, images, **kwargs)

    monkeypatch.setattr(_likelihood, "log_likelihood", broken)
    argv = ["likelihood", "b0.png", "b1.png", "--model", "analytic-mixture", "--divergence", "hutchinson",
            "--probes", "2", "--solver", "rk4", "--steps", "4", "--seed", "5"]
    code, out, err = run_in(capsys, argv, tmp_path)
    assert code == 1, err
    lines = err.strip().splitlines()
    assert len(lines) == 2, err
    assert lines[0].startswith("flowdiff likelihood: warning: the files' 256 levels: every pixel of the images lies "
                               "on the coarser 2-level lattice"), err
    assert "give --dequantize 2 " in lines[0] and "dequantize=" not in lines[0], err
    assert lines[1].startswith("flowdiff likelihood: error: ") and "non-finite" in lines[1], err
    assert "Traceback" not in err and out == ""
