"""GITS-style DP grids and stored tuned grids: exact DP, valid grids for every solver, better on held-out noise."""

import itertools
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
from flowdiff.tools import grid_dp

FLOW = _mixture()
#: QUICK without the search's options, which method="dp" refuses (it runs no search).
DP_QUICK = {k: v for k, v in QUICK.items() if k not in ("max_evals", "restarts")}


def test_dp_path_is_the_least_cost_path_of_exactly_that_many_steps():
    rng = np.random.default_rng(0)
    n = 7
    cost = np.triu(rng.uniform(0.1, 2.0, (n, n)), 1)
    cost[np.tril_indices(n)] = np.inf
    for steps in range(1, n):
        path = grid_dp.dp_path(cost, steps)
        assert path[0] == 0 and path[-1] == n - 1 and len(path) == steps + 1 and np.all(np.diff(path) > 0)
        best = min(sum(cost[a, b] for a, b in zip((0, *inner), (*inner, n - 1)))
                   for inner in itertools.combinations(range(1, n - 1), steps - 1))
        assert math.isclose(sum(cost[a, b] for a, b in zip(path[:-1], path[1:])), best, rel_tol=1e-12)
    with pytest.raises(ValueError, match="steps"):
        grid_dp.dp_path(cost, n)


def test_teacher_follows_the_reference_and_euler_cost_is_its_local_error():
    noise = _noise(1)
    cand = grid_dp.candidate_sigmas(FLOW.schedule.sigma_max, FLOW.schedule.sigma_min, 24)
    teacher = grid_dp.teacher_trajectory(FLOW, noise, cand)
    ref = flowdiff.reference_solution(FLOW, noise, rtol=1e-9, atol=1e-9)  # to σ_min, then the Euler step, as here
    assert float((teacher.xbar[-1] - ref.x).abs().max()) < 1e-5
    assert grid_dp.teacher_trajectory(FLOW, noise.clone(), cand) is teacher  # cached for the same noise values
    cost = grid_dp.local_error_costs(teacher, order=1)
    i, j = 3, 9  # one Euler step σ_i → σ_j from the teacher's state
    field = FLOW.field()
    euler = teacher.xbar[i] + (cand[j] - cand[i]) * field(float(cand[i]), teacher.xbar[i])
    assert math.isclose(cost[i, j], float((euler - teacher.xbar[j]).pow(2).mean().sqrt()), rel_tol=1e-9)
    assert np.all(np.isinf(cost[np.tril_indices(len(cand))]))
    # a second-order rule's local error is the smaller one on short steps
    cost2 = grid_dp.local_error_costs(teacher, order=2)
    short = [(k, k + 1) for k in range(len(cand) - 2)]
    assert sum(cost2[a, b] for a, b in short) < sum(cost[a, b] for a, b in short)


@pytest.mark.parametrize("name", [n for n in solvers.available()])
@pytest.mark.parametrize("method", ["dp", "dp+search"])
def test_dp_grid_is_a_generation_grid_within_the_budget(name, method):
    nfe = solvers.nfe_for_steps(name, 3, eval_end=False) + 1
    steps = solvers.steps_for_nfe(name, nfe, eval_end=False)
    quick = DP_QUICK if method == "dp" else QUICK
    tuned = flowdiff.tune(FLOW, _noise(1), solver=name, nfe=nfe, method=method, candidates=16, **quick)
    s = tuned.sigmas
    assert s[0] == FLOW.schedule.sigma_max and s[-1] == 0.0 and np.all(np.diff(s) < 0) and len(s) == steps + 1
    calls = []

    def counted(xbar, sigma):
        calls.append(sigma)
        return FLOW.sigma_field(xbar, sigma)

    out = flowdiff.generate(flowdiff.ProbabilityFlow.from_sigma_field(counted, FLOW.schedule), _noise(2), solver=name,
                            grid=s)
    assert out.stats.nfe == len(calls) <= nfe
    assert tuned.method == method and tuned.teacher_nfe > 0
    assert tuned.tuning_nfe >= tuned.reference_nfe + tuned.teacher_nfe
    if method == "dp":
        assert tuned.initial_grid.startswith("dp order") and tuned.evaluations <= 2 * 2 + 2


def test_dp_tuning_is_reproducible_for_a_seed():
    opts = dict(QUICK, max_evals=30, restarts=1, method="dp+search")
    a = flowdiff.tune_grid(FLOW, _noise(1), solver="unipc", nfe=5, seed=3, **opts)
    b = flowdiff.tune_grid(FLOW, _noise(1), solver="unipc", nfe=5, seed=3, **opts)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("solver,options", [("ipndm", {"order": 3}), ("dpmpp_2m", {}), ("euler", {})])
@pytest.mark.parametrize("method", ["dp", "dp+search"])
def test_dp_grid_beats_the_default_grids_on_held_out_noise(solver, options, method):
    flow = _mixture(seed=5, bandwidth=0.5)
    calibration, held_out = _noise(11, n=64), _noise(12, n=64)
    nfe = 5
    search = {} if method == "dp" else {"max_evals": 100}  # the search's budget: dp runs no search
    tuned = flowdiff.tune(flow, calibration, solver=solver, nfe=nfe, solver_options=options, progress=False,
                          method=method, **search)
    tuned_err = _rmse(flow, held_out, solver=solvers.get(solver, **options), grid=tuned.sigmas)
    defaults = {g: _rmse(flow, held_out, solver=solvers.get(solver, **options), nfe=nfe, grid=g)
                for g in ("trailing", "karras", "logsnr")}
    assert tuned_err < 0.8 * min(defaults.values()), (tuned_err, defaults)


def test_dp_options_are_checked():
    with pytest.raises(ValueError, match="method"):
        flowdiff.tune(FLOW, _noise(1), solver="euler", nfe=4, method="gits", progress=False)
    with pytest.raises(ValueError, match="candidates"):
        flowdiff.tune(FLOW, _noise(1), solver="euler", nfe=4, method="dp", candidates=1, progress=False)
    with pytest.raises(ValueError, match="dp_orders"):
        flowdiff.tune(FLOW, _noise(1), solver="euler", nfe=4, method="dp", dp_orders=(3,), progress=False)
    with pytest.raises(ValueError, match="candidate σ"):
        flowdiff.tune(FLOW, _noise(1), solver="euler", nfe=20, method="dp", candidates=8, progress=False)
    with pytest.raises(ValueError, match="candidates configure the DP, which method='search' does not run"):
        flowdiff.tune(FLOW, _noise(1), solver="euler", nfe=4, method="search", candidates=32, progress=False)


def test_stored_grids_round_trip_and_are_found_only_for_their_model(tmp_path):
    a = flowdiff.tune(FLOW, _noise(1), solver="euler", nfe=4, method="dp", **DP_QUICK)
    b = flowdiff.tune(FLOW, _noise(1), solver="ipndm", nfe=5, method="dp", **DP_QUICK)
    path = flowdiff.save_grids([a, b], tmp_path / "m.tuned.json")
    back = flowdiff.load_grids(path)
    assert [np.array_equal(x.sigmas, y.sigmas) for x, y in zip(back, [a, b])] == [True, True]
    assert json.loads(json.dumps(b.options)) == back[1].options
    found = flowdiff.stored_grid(FLOW, "ipndm", 5, directory=tmp_path)
    assert found is not None and np.array_equal(found.sigmas, b.sigmas) and found.source == str(path)
    assert flowdiff.stored_grid(FLOW, "ipndm", 6, directory=tmp_path) is None
    assert flowdiff.stored_grid(FLOW, "ipndm", 5, {"order": 3}, directory=tmp_path) is None
    other = Gaussian(torch.zeros(8, dtype=torch.float64), 0.5).flow()
    assert flowdiff.stored_grid(other, "ipndm", 5, directory=tmp_path) is None
    (tmp_path / "bad.tuned.json").write_text('{"format": "x"}')
    with pytest.raises(ValueError, match="not a flowdiff tuned-grids file"):
        flowdiff.load_grids(tmp_path / "bad.tuned.json")


def test_compare_uses_stored_grids_by_default_and_tunes_afresh_on_given_calibration(tmp_path, monkeypatch):
    import flowdiff.tools.tuning as tuning
    from flowdiff.tools.compare import default_grids

    made = flowdiff.tune(FLOW, _noise(1), solver="ipndm", nfe=4, method="dp", **DP_QUICK)
    flowdiff.save_grids([made], tmp_path / "m.tuned.json")
    monkeypatch.setattr(tuning, "STORED_DIR", tmp_path)
    noise = _noise(21)
    assert "tuned" in default_grids(FLOW, ["ipndm"], [4])
    assert "tuned" not in default_grids(FLOW, ["ipndm"], [4, 6])
    result = flowdiff.compare(FLOW, noise, solvers=["ipndm"], nfe=[4])
    used = result.provided[("ipndm", "tuned", 4)]
    assert used.source and np.array_equal(used.sigmas, made.sigmas)
    run = next(r for r in result.runs if r.grid == "tuned")
    x = flowdiff.generate(FLOW, noise, solver="ipndm", grid=made.sigmas).x
    assert math.isclose(run.rms_error, float((x - result.reference.x).pow(2).mean().sqrt()), rel_tol=1e-9)
    fresh = flowdiff.compare(FLOW, noise, solvers=["ipndm"], nfe=[4], grids=["tuned"], calibration_noise=_noise(5),
                             tune_options=QUICK)
    assert fresh.provided[("ipndm", "tuned", 4)].source == ""
    asked = flowdiff.compare(FLOW, noise, solvers=["ipndm"], nfe=[4], grids=["tuned"], tune_options=QUICK)
    assert asked.provided[("ipndm", "tuned", 4)].source == ""  # tuning options ask for a grid tuned that way


def test_shipped_grids_cover_the_default_comparison_of_the_shipped_model():
    from flowdiff.tools.compare import DEFAULT_NFE, default_grids, default_solvers

    flow = flowdiff.pretrained("digits")
    assert "tuned" in default_grids(flow, default_solvers(), DEFAULT_NFE)
    for solver in default_solvers():
        for nfe in DEFAULT_NFE:
            grid = flowdiff.stored_grid(flow, solver, nfe)
            s = grid.sigmas
            assert s[0] == flow.schedule.sigma_max and s[-1] == 0.0 and np.all(np.diff(s) < 0)
            assert len(s) - 1 == solvers.steps_for_nfe(solver, nfe, eval_end=False)
            assert grid.options["calibration_batch"] >= 8 and grid.calibration_error <= grid.initial_error


def test_default_command_line_compare_shows_the_shipped_grid_or_says_there_is_none(capsys, tmp_path):
    from flowdiff.cli import main

    common = ["--batch", "2", "--nfe", "10", "--solver", "unipc", "--rtol", "1e-4", "--no-progress", "--layout",
              "wide"]
    assert main(["compare", "--model", "digits", *common, "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "| unipc | tuned |" in out and "tuned grids: 1 shipped ones from" in out and "digits.tuned.json" in out
    assert main(["compare", "--model", "analytic-mixture", *common, "--out", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "| unipc | tuned |" not in out and "no shipped tuned grids cover this model" in out
