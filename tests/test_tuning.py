"""Tuned time grids: valid grids within the budget for every solver, reproducible, better on held-out noise."""

import json
import math

import numpy as np
import pytest
import torch
from _closed_form import QUICK
from _closed_form import mixture as _mixture
from _closed_form import noise as _noise
from _closed_form import rmse as _rmse

import flowdiff
import solvers
from flowdiff.models.analytic import Gaussian

FLOW = _mixture()


@pytest.mark.parametrize("name", solvers.available())
def test_tuned_grid_is_a_generation_grid_within_the_budget(name):
    nfe = solvers.nfe_for_steps(name, 3, eval_end=False) + 1  # room for 3 steps, not 4 (for most)
    steps = solvers.steps_for_nfe(name, nfe, eval_end=False)
    tuned = flowdiff.tune(FLOW, _noise(1), solver=name, nfe=nfe, **QUICK)
    s = tuned.sigmas
    assert s[0] == FLOW.schedule.sigma_max and s[-1] == 0.0
    assert np.all(np.diff(s) < 0), s
    assert len(s) == steps + 1
    assert s[-2] >= FLOW.schedule.sigma_min * (1 - 1e-12)
    calls = []
    gauss_eps = FLOW.sigma_field

    def counted(xbar, sigma):
        calls.append(sigma)
        return gauss_eps(xbar, sigma)

    counting = flowdiff.ProbabilityFlow.from_sigma_field(counted, FLOW.schedule)
    out = flowdiff.generate(counting, _noise(2), solver=name, grid=s)
    assert out.stats.nfe == len(calls) <= nfe
    assert tuned.evaluations <= 2 * QUICK["max_evals"] + 2  # candidates (capped), their validation, the final
    assert tuned.tuning_nfe >= tuned.reference_nfe > 0 and tuned.tuning_seconds > 0


def test_tuning_is_reproducible_for_a_seed():
    opts = dict(QUICK, max_evals=40, restarts=1)
    a = flowdiff.tune_grid(FLOW, _noise(1), solver="ipndm", nfe=5, seed=7, **opts)
    b = flowdiff.tune_grid(FLOW, _noise(1), solver="ipndm", nfe=5, seed=7, **opts)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("solver,options", [("dpmpp_2m", {}), ("ipndm", {"order": 3}), ("euler", {})])
def test_tuned_grid_beats_the_default_grids_on_held_out_noise(solver, options):
    flow = _mixture(seed=5, bandwidth=0.5)
    calibration, held_out = _noise(11, n=64), _noise(12, n=64)
    nfe = 5
    tuned = flowdiff.tune(flow, calibration, solver=solver, nfe=nfe, solver_options=options, progress=False,
                          max_evals=150)
    tuned_err = _rmse(flow, held_out, solver=solvers.get(solver, **options), grid=tuned.sigmas)
    defaults = {g: _rmse(flow, held_out, solver=solvers.get(solver, **options), nfe=nfe, grid=g)
                for g in ("trailing", "karras", "logsnr")}
    assert tuned_err < 0.8 * min(defaults.values()), (tuned_err, defaults)
    assert tuned.calibration_error <= tuned.initial_error


def test_save_load_round_trip_and_refuse_another_model(tmp_path):
    tuned = flowdiff.tune(FLOW, _noise(1), solver="dpmpp_3m", nfe=4, **QUICK)
    path = tuned.save(tmp_path / "grid.json")
    back = flowdiff.TunedGrid.load(path, FLOW)
    assert np.array_equal(back.sigmas, tuned.sigmas)  # exact: σ are stored as float hex
    assert (back.solver, back.nfe, back.fingerprint, back.solver_options) == ("dpmpp_3m", 4, tuned.fingerprint, {})
    assert back.options == json.loads(json.dumps(tuned.options))
    other = Gaussian(torch.zeros(8, dtype=torch.float64), 0.5).flow()
    with pytest.raises(ValueError) as err:
        flowdiff.TunedGrid.load(path, other)
    assert tuned.fingerprint in str(err.value) and flowdiff.flow_fingerprint(other) in str(err.value)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a flowdiff tuned grid"):
        flowdiff.TunedGrid.load(tmp_path / "bad.json", FLOW)


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match="unknown option"):
        flowdiff.tune_grid(FLOW, _noise(1), solver="euler", nfe=4, max_eval=3)
    with pytest.raises(ValueError, match="below the cost of one step"):
        flowdiff.tune_grid(FLOW, _noise(1), solver="rk4", nfe=0, progress=False)
    with pytest.raises(ValueError, match="init"):
        flowdiff.tune_grid(FLOW, _noise(1), solver="euler", nfe=4, init="nope", progress=False)
    with pytest.raises(ValueError, match="max_evals"):
        flowdiff.tune_grid(FLOW, _noise(1), solver="euler", nfe=4, max_evals=0, progress=False)


def test_compare_tunes_on_calibration_noise_and_measures_on_other_noise():
    noise = _noise(21)
    result = flowdiff.compare(FLOW, noise, solvers=["ipndm"], grids=["tuned", "logsnr"], nfe=[4, 6],
                              tune_options=QUICK)
    tuned_runs = [r for r in result.runs if r.grid == "tuned"]
    assert [r.budget for r in tuned_runs] == [4, 6] and all(r.nfe <= r.budget for r in tuned_runs)
    for r in tuned_runs:
        made = result.provided[("ipndm", "tuned", r.budget)]
        assert made.options["calibration_batch"] == noise.shape[0]
        assert math.isfinite(made.calibration_error)
    with pytest.raises(ValueError, match="calibration_noise is the noise"):
        flowdiff.compare(FLOW, noise, solvers=["ipndm"], grids=["tuned"], nfe=4, calibration_noise=noise.clone(),
                         tune_options=QUICK)


def test_free_start_may_start_below_sigma_max_and_stays_a_valid_grid():
    tuned = flowdiff.tune(FLOW, _noise(1), solver="dpmpp_2m", nfe=5, free_start=True,
                          init=["logsnr", "leading"], **dict(QUICK, max_evals=40))
    s = tuned.sigmas
    assert s[0] <= FLOW.schedule.sigma_max and s[-1] == 0.0 and np.all(np.diff(s) < 0) and len(s) == 6
    out = flowdiff.generate(FLOW, _noise(2), solver="dpmpp_2m", grid=s)
    assert out.stats.nfe == 5


def test_command_line_compare_accepts_the_tuned_grid(capsys, tmp_path):
    from flowdiff.cli import main

    code = main(["compare", "--model", "analytic-mixture", "--batch", "4", "--nfe", "4", "--solver", "ipndm",
                 "--grid", "tuned,logsnr", "--calibration-seed", "5", "--rtol", "1e-5", "--no-progress",
                 "--layout", "wide", "--out", str(tmp_path / "cmp")])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "| ipndm | tuned |" in out and "tuned grid of ipndm at NFE 4: tuning cost" in out


def test_pooled_selection_keeps_the_grid_best_on_the_whole_calibration_batch():
    # The search path does not depend on the final choice: of its grids, "pooled" keeps the one with the
    # smallest error on the whole batch, so it can be no worse there than the validation choice.
    opts = dict(QUICK, max_evals=40)
    by_validation = flowdiff.tune(FLOW, _noise(1, n=16), solver="ipndm", nfe=5, **opts)
    pooled = flowdiff.tune(FLOW, _noise(1, n=16), solver="ipndm", nfe=5, select="pooled", **opts)
    assert pooled.calibration_error <= by_validation.calibration_error
    assert pooled.evaluations == by_validation.evaluations
    with pytest.raises(ValueError, match="select"):
        flowdiff.tune(FLOW, _noise(1), solver="ipndm", nfe=5, select="best", **QUICK)
