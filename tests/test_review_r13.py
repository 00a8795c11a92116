"""Review R13 of this session's learned-solver changes (A2 cross-fitting, F2 pre-solve grid refusal, G2 --learned,
the teacher's error check in the fitting cost): each test failed on the main it reviewed."""

from pathlib import Path

import numpy as np
import pytest
import torch
from _closed_form import counting, mixture, noise

import flowdiff
import solvers
from flowdiff.tools.learned import learn_solver
from flowdiff.tools.report import family, frontier, frontier_plot

HAS_DIGITS = (Path(flowdiff.__file__).parent / "weights" / "digits.safetensors").is_file()


@pytest.fixture(scope="module")
def fitted():
    """A kept learned solver (shifts, grid and start moved) on the mixture at NFE 5, and its flow."""
    flow = mixture()
    learned = learn_solver(flow, noise(1, n=8), solver="unipc", nfe=5, learn=("shifts", "grid", "start"),
                           iterations=2)
    assert learned.kept  # the tests below need per-step values
    return flow, learned


@pytest.mark.parametrize("direction", ["generate", "encode"])
def test_a_learned_solver_with_adaptive_is_refused_before_the_solve_naming_adaptive(fitted, direction):
    """An adaptive solve chooses its own steps, which a learned solver has no values for: it ran the model and
    failed inside step 0 with a SolveError in solver time; now a ValueError naming adaptive= before any evaluation."""
    flow, learned = fitted
    counted, calls = counting(flow)
    run = flowdiff.generate if direction == "generate" else flowdiff.encode
    with pytest.raises(ValueError, match=r"adaptive=.*grid=learned\.sigmas") as err:
        run(counted, noise(2, n=2), solver=learned.as_solver(), adaptive=flowdiff.Adaptive())
    assert not isinstance(err.value, solvers.SolveError)
    assert calls == []
    # the base method is what the message offers, and it runs adaptively
    assert run(flow, noise(2, n=2), solver=learned.base(), adaptive=flowdiff.Adaptive()).stats.nfe > 0


def test_a_learned_row_is_a_frontier_line_of_its_own_not_a_named_grid(fitted, tmp_path):
    """compare's learned(<base>) row on the grid 'fitted' was counted in the frontier line 'flowdiff, named
    grids' (best_table and frontier.png credited the named grids with the learned solver's error)."""
    flow, learned = fitted
    result = flowdiff.compare(flow, noise(7, n=4), solvers=["euler", learned], grids=["logsnr"], nfe=[4, 5],
                              progress=False)
    (row,) = [r for r in result.runs if r.solver.startswith("learned(")]
    assert family(row) == "flowdiff, learned"
    lines = frontier(result)
    assert {b: r.grid for b, r in lines["flowdiff, named grids"].items()} == {4: "logsnr", 5: "logsnr"}
    assert lines["flowdiff, learned"] == {5: row}
    assert frontier_plot(result, tmp_path / "frontier.png").stat().st_size > 0


def test_generate_on_a_rounded_copy_of_the_fitted_grid_is_refused_with_grids_that_read_apart(fitted):
    """A float32 copy of learned.sigmas (torch.tensor(list) is float32) is refused, rightly, but the message
    showed both grids at 6 digits, identical: 'σ 74.4004 -> 21.9118 ... belong to [74.4004, 21.9118, ...]'."""
    flow, learned = fitted
    rounded = torch.tensor(learned.sigmas.tolist())  # float32
    assert not np.array_equal(rounded.double().numpy(), learned.sigmas)
    with pytest.raises(ValueError) as err:
        flowdiff.generate(flow, noise(2, n=2), solver=learned.as_solver(), grid=rounded)
    message = str(err.value)
    assert "rounded" in message
    assert repr(float(learned.sigmas[0])) in message and repr(float(rounded[0].double())) in message


def test_a_file_saved_before_cross_fitting_reads_as_fitted_on_the_even_half(fitted, tmp_path):
    """README: options["fitted_on"] is "all" or "even half". A /4 file written before A2 has no such key (and
    its calibration_error is the even half's): it loaded without one, and options["fitted_on"] raised KeyError."""
    import json

    flow, learned = fitted
    path = learned.save(tmp_path / "new.json")
    data = json.loads(path.read_text())
    del data["options"]["fitted_on"]
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = flowdiff.LearnedSolver.load(tmp_path / "old.json", flow)
    assert old.options["fitted_on"] == "even half"
    assert flowdiff.LearnedSolver.load(path, flow).options["fitted_on"] == "all"
    assert old.sigmas.tolist() == learned.sigmas.tolist() and old.shifts == learned.shifts


def _conditional_file(folder, batch, label):
    """A learned solver for the digits model conditioned on ``label``, fitted (as learn_solver records it) on a
    calibration batch of ``batch``: its fingerprint holds the label repeated ``batch`` times."""
    from flowdiff.engine.fingerprint import flow_fingerprint
    from flowdiff.engine.grids import make_sigmas

    flow = flowdiff.pretrained("digits")
    labels = {"class_labels": torch.full((batch,), label, dtype=torch.long)}
    learned = flowdiff.LearnedSolver(solver="unipc", solver_options={}, nfe=5,
                                     sigmas=make_sigmas(flow.schedule, "logsnr", 5), coefficients=(),
                                     fingerprint=flow_fingerprint(flow, labels), kept=True, learn=("shifts",),
                                     shifts=tuple(0.01 * (-1) ** i for i in range(5)),
                                     options={"calibration_batch": batch})
    return flow, learned.save(folder / "class3.json")


@pytest.mark.skipif(not HAS_DIGITS, reason="the shipped digits weights are not installed")
def test_a_class_conditional_learned_file_runs_at_another_batch_size_of_the_same_class(tmp_path, capsys):
    """sample --class-label N gives one label per sample, so the conditioning's fingerprint held the batch size: a
    file fitted on 8 samples of class 3 was refused as 'another model ... or conditioning' for --num 4 of class 3
    (and by compare at any other batch). The same class at another batch now runs; another class is still refused."""
    from _cli_runs import run_in

    flow, path = _conditional_file(tmp_path, 8, 3)
    code, out, err = run_in(capsys, ["sample", "--learned", path, "--class-label", 3, "--num", 4, "--out", "a.png"],
                            tmp_path)
    assert code == 0, err
    assert "5 NFE" in out
    code, out, err = run_in(capsys, ["sample", "--learned", path, "--class-label", 4, "--num", 4, "--out", "b.png"],
                            tmp_path)
    assert code != 0 and "--learned" in err and "fingerprint" in err
    three = {"class_labels": torch.full((4,), 3, dtype=torch.long)}
    flowdiff.LearnedSolver.load(path, flow, three)
    mixed = {"class_labels": torch.tensor([3, 3, 3, 4])}  # conditioning of its own per sample: not the fit's
    with pytest.raises(ValueError, match="fingerprint"):
        flowdiff.LearnedSolver.load(path, flow, mixed)


def test_a_learned_solver_whose_last_step_was_fitted_as_euler_refuses_final_euler_false():
    """learn_solver solves on grid=learned.sigmas, where a method that evaluates σ = 0 (Heun) takes its last step as
    Euler. Grid(sigmas=learned.sigmas, final_euler=False) passed the pre-solve check (the same steps) and ran the
    fitted values with Heun's last step: NFE 8 for a solver fitted at 7, without a word."""
    flow = mixture()
    learned = learn_solver(flow, noise(3, n=8), solver="heun", nfe=7, learn="shifts", iterations=2)
    assert learned.kept and learned.as_solver().evaluates_end
    x = noise(4, n=2)
    assert flowdiff.generate(flow, x, solver=learned.as_solver(), grid=learned.sigmas).stats.nfe == learned.nfe
    counted, calls = counting(flow)
    with pytest.raises(ValueError, match=r"final_euler=False.*fitted with the last step into σ = 0 taken as Euler"):
        flowdiff.generate(counted, x, solver=learned.as_solver(),
                          grid=flowdiff.Grid(sigmas=learned.sigmas, final_euler=False))
    assert calls == []
    # the base method takes final_euler=False as before
    base = flowdiff.generate(flow, x, solver=learned.base(), grid=flowdiff.Grid(sigmas=learned.sigmas,
                                                                                 final_euler=False))
    assert base.stats.nfe == learned.nfe + 1


@pytest.mark.parametrize("name", ["deis", "dpmpp_2m", "unipc", "lms"])
def test_zero_coefficients_are_the_base_method_bit_for_bit(name):
    """CorrectedAdams did not pass on_interval to its base: DEIS generating (an interval that touches t = 0) steps with
    polynomial weights in t, but DEIS under zero coefficients kept its log-time weights, 0.29 apart on the mixture.
    learn_solver's 'base' (the zero point, base_validation_error) was then another method than the base it returns."""
    from flowdiff.engine.grids import make_sigmas
    from flowdiff.tools.learned import _base_solver, _composed, _layout

    flow = mixture()
    base = _base_solver(name, {}, ("coefficients",))
    sigmas = make_sigmas(flow.schedule, "logsnr", 6)
    counts, _ = _layout(base, sigmas, 2, ("coefficients",), flow.schedule, 0.5)
    zero = _composed(base, sigmas, [[0.0] * n for n in counts], None)
    x = noise(5, n=3)
    assert torch.equal(flowdiff.generate(flow, x, solver=zero, grid=sigmas).x,
                       flowdiff.generate(flow, x, solver=base, grid=sigmas).x)


def test_a_learned_deis_records_the_base_methods_own_held_out_error():
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="deis", nfe=6, learn="coefficients", iterations=1)
    target = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x[1::2]
    own = flowdiff.generate(flow, cal[1::2], solver=learned.base(), grid=learned.base_grid()).x
    assert learned.base_validation_error == pytest.approx(float((own - target).pow(2).mean().sqrt()), rel=1e-12)
