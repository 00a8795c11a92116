"""Learned low-NFE solvers (order kept, held-out decision, files tied to their model) and multistep encodes at
their order with exact NFE in both directions."""

import json
import math

import numpy as np
import pytest
import torch
from _closed_form import counting, mixture, noise

import flowdiff
import solvers
from flowdiff.engine.formulations import Data
from flowdiff.engine.loop import solve_grid
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.learned import LearnedSolver, _learn_both, learn_solver
from flowdiff.tools.reference import clear_reference_cache


def _gaussian():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(16, dtype=torch.float64, generator=g) * 0.5
    var = torch.rand(16, dtype=torch.float64, generator=g) * 0.5 + 0.05
    return Gaussian(mean, var), g


def _rms(x, ref):
    return float((x - ref).pow(2).mean().sqrt())


@pytest.mark.parametrize("name,options", [("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {"order": 2})])
def test_corrections_at_the_bound_keep_the_base_order_on_the_gaussian(name, options):
    """Whatever a fit returns lies in [−bound, bound]; coefficients at ±bound on every step keep the base's
    order (slope fit against the Gaussian's exact solution between σ = 20 and 0.5, in the data
    variables), and the slope of the base itself."""
    gauss, g = _gaussian()
    eps = gauss.flow().field()
    x20 = torch.randn(3, 16, dtype=torch.float64, generator=g) * math.sqrt(1 + 20.0**2)
    exact = gauss.solution(x20, 20.0, 0.5)
    base = solvers.get(name, **options)
    bound = 4.0
    errs, base_errs, ns = [], [], [32, 64, 128, 256]
    for n in ns:
        sig = np.exp(np.linspace(math.log(20.0), math.log(0.5), n + 1)).tolist()
        ts = Data().times(sig)
        probe = solvers.CorrectedAdams(base, {(1.0, 0.0): (0.0, 0.0)})
        table = {(ts[i], ts[i + 1]): tuple(bound * (-1) ** m for m in range(probe.available_terms(i + 1)))
                 for i in range(n)}
        corrected = solvers.CorrectedAdams(base, table)
        errs.append(float((solve_grid(eps, Data(), sig, corrected, xbar0=x20).xbar - exact).abs().max()))
        base_errs.append(float((solve_grid(eps, Data(), sig, base, xbar0=x20).xbar - exact).abs().max()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    base_slope = -np.polyfit(np.log(ns), np.log(base_errs), 1)[0]
    assert slope > base.order - 0.35, (name, slope, errs)  # on log-σ grids the self-started base reaches it too
    assert slope > base_slope - 0.5, (name, slope, base_slope)
    assert errs != base_errs  # the corrections did act


def test_fit_lowers_the_calibration_error_spends_exactly_the_budget_and_is_kept_only_if_held_out_agrees():
    flow = mixture()
    cal = noise(1, n=16)
    learned = learn_solver(flow, cal, solver="dpmpp_3m", nfe=6, learn="coefficients")
    assert learned.calibration_error < learned.base_calibration_error
    assert learned.kept == (learned.validation_error < learned.base_validation_error)
    assert learned.fitting_nfe > learned.reference_nfe > 0 and learned.solves > 0
    # the held-out errors are those of the two solvers on the odd half, measured again here
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x[1::2]
    base_x = flowdiff.generate(flow, cal[1::2], solver="dpmpp_3m", grid=learned.sigmas).x
    assert _rms(base_x, ref) == pytest.approx(learned.base_validation_error, rel=1e-9)
    # exact NFE: one evaluation a step, as its base
    counted, calls = counting(flow)
    out = flowdiff.generate(counted, cal, solver=learned.as_solver(), grid=learned.sigmas)
    assert out.stats.nfe == len(calls) == 6


def test_a_bad_fit_is_rejected_on_held_out_noise():
    flow = mixture()
    learned = learn_solver(flow, noise(1, n=8), solver="dpmpp_2m", nfe=6, iterations=2, learn="coefficients")
    bad = LearnedSolver(**{**learned.__dict__, "kept": True,
                           "coefficients": tuple(tuple(4.0 for _ in c) for c in learned.coefficients)})
    assert any(c for cs in bad.coefficients for c in cs)
    judged = bad.validated(flow, noise(2, n=8))
    assert not judged.kept
    assert judged.base_validation_error < _rms(
        flowdiff.generate(flow, noise(2, n=8), solver=bad.as_solver(), grid=bad.sigmas).x,
        flowdiff.reference_solution(flow, noise(2, n=8), sigma_end=0.0, rtol=1e-7, atol=1e-7).x)
    assert all(c == 0.0 for cs in judged.coefficients for c in cs)
    assert judged.as_solver().name == "dpmpp_2m"  # the base method itself


def test_ridge_pulls_the_coefficients_towards_the_base_method():
    flow = mixture()
    cal = noise(1, n=8)

    def norm(learned):
        return math.sqrt(sum(c * c for cs in learned.coefficients for c in cs))

    free = learn_solver(flow, cal, solver="dpmpp_3m", nfe=6, iterations=3, learn="coefficients")
    pulled = learn_solver(flow, cal, solver="dpmpp_3m", nfe=6, iterations=3, ridge=10.0, learn="coefficients")
    forced = [LearnedSolver(**{**x.__dict__, "kept": True}) for x in (free, pulled)]
    assert 0 < norm(pulled) < norm(free) or (not pulled.kept and norm(pulled) == 0 < norm(free))
    assert forced[1].calibration_error >= forced[0].calibration_error - 1e-12


def test_save_load_round_trip_and_refusal_for_another_model(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="unipc", nfe=6, iterations=2, learn="coefficients")
    path = learned.save(tmp_path / "digits.learned.json")
    back = LearnedSolver.load(path, flow)
    assert np.array_equal(back.sigmas, learned.sigmas) and back.coefficients == learned.coefficients
    assert (back.kept, back.fitting_nfe, back.source) == (learned.kept, learned.fitting_nfe, str(path))
    a = flowdiff.generate(flow, cal, solver=learned.as_solver(), grid=learned.sigmas).x
    b = flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="fingerprint"):
        LearnedSolver.load(path, mixture(seed=4))
    (tmp_path / "bad.json").write_text('{"format": "flowdiff.TunedGrid/1"}')
    with pytest.raises(ValueError, match="not a flowdiff learned solver"):
        LearnedSolver.load(tmp_path / "bad.json", flow)


def test_learned_coefficients_belong_to_their_grid_and_direction():
    flow = mixture()
    learned = learn_solver(flow, noise(1, n=8), solver="dpmpp_3m", nfe=8, iterations=1, learn="coefficients")
    corrected = learned.base() if not learned.kept else learned.as_solver()
    if not learned.kept:  # build the corrected solver anyway: the refusal is the solver's
        corrected = LearnedSolver(**{**learned.__dict__, "kept": True}).as_solver()
    with pytest.raises(ValueError, match="no coefficients for the step"):
        flowdiff.generate(flow, noise(2, n=2), solver=corrected, steps=8, grid="trailing")
    with pytest.raises(ValueError, match="no coefficients for the step"):
        flowdiff.encode(flow, noise(2, n=2).clamp(-1, 1), solver=corrected, grid=learned.sigmas)


def test_bad_arguments_name_what_is_accepted():
    flow = mixture()
    with pytest.raises(ValueError, match="variable-step Adams method .* accepted: .*unipc"):
        learn_solver(flow, noise(1, n=4), solver="heun", nfe=6, learn="coefficients")
    with pytest.raises(ValueError, match="at least 2 samples"):
        learn_solver(flow, noise(1, n=1), solver="unipc", nfe=6)
    with pytest.raises(ValueError, match="terms must be an int in 1..3, got 0"):
        learn_solver(flow, noise(1, n=4), solver="unipc", nfe=6, terms=0)
    with pytest.raises(ValueError, match="ridge must be a finite number >= 0"):
        learn_solver(flow, noise(1, n=4), solver="unipc", nfe=6, ridge=-0.5)
    with pytest.raises(ValueError, match="bound must be a positive finite number"):
        learn_solver(flow, noise(1, n=4), solver="unipc", nfe=6, bound=-1.0)
    with pytest.raises(TypeError, match="coefficients must be keyed by steps"):
        solvers.CorrectedAdams(solvers.get("unipc"), {1.0: (0.5,)})


# -- learned evaluation times (shifts, LD3-style) ------------------------------------------------------------


@pytest.mark.parametrize("name", ["unipc", "heun"])
def test_shifts_lower_the_fitted_error_spend_the_base_nfe_and_are_kept_only_if_held_out_agrees(name):
    flow = mixture()
    cal = noise(1, n=16)
    half, refit = _learn_both(flow, cal, solver=name, nfe=6, learn="shifts")
    learned = half if refit is None else refit  # what learn_solver returns
    assert learned.learn == ("shifts",) and learned.coefficients == () and learned.base_sigmas is None
    assert len(learned.shifts) == len(learned.sigmas) - 1
    assert learned.calibration_error < learned.base_calibration_error
    assert learned.kept == (learned.validation_error < learned.base_validation_error)
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x[1::2]
    base_x = flowdiff.generate(flow, cal[1::2], solver=name, grid=learned.sigmas).x
    assert _rms(base_x, ref) == pytest.approx(learned.base_validation_error, rel=1e-9)
    forced = LearnedSolver(**{**learned.__dict__, "kept": True})
    # the held-out half decided on the half-fit's own error there (the refit's is not held out)
    held_x = flowdiff.generate(flow, cal[1::2], solver=LearnedSolver(**{**half.__dict__, "kept": True}).as_solver(),
                               grid=half.sigmas).x
    if learned.kept:
        assert _rms(held_x, ref) == pytest.approx(learned.validation_error, rel=1e-9)
        assert learned.validation_error < learned.base_validation_error
    else:
        assert _rms(held_x, ref) >= learned.base_validation_error
    # exact NFE: the base method's, each evaluation counted once; the fit's cost is the teacher plus its solves
    counted, calls = counting(flow)
    out = flowdiff.generate(counted, cal, solver=forced.as_solver(), grid=learned.sigmas)
    base_nfe = flowdiff.generate(flow, cal, solver=name, grid=learned.sigmas).stats.nfe
    assert out.stats.nfe == len(calls) == base_nfe <= 6
    assert learned.fitting_nfe == learned.reference_nfe + learned.solves * base_nfe


def test_bad_shifts_are_rejected_on_held_out_noise_and_leave_the_base_method():
    flow = mixture()
    learned = learn_solver(flow, noise(1, n=8), solver="unipc", nfe=6, iterations=1, learn="shifts")
    bad = LearnedSolver(**{**learned.__dict__, "kept": True, "shifts": tuple(0.5 for _ in learned.shifts)})
    other = noise(2, n=8)
    ref = flowdiff.reference_solution(flow, other, sigma_end=0.0, rtol=1e-7, atol=1e-7).x
    assert _rms(flowdiff.generate(flow, other, solver=bad.as_solver(), grid=bad.sigmas).x, ref) > _rms(
        flowdiff.generate(flow, other, solver="unipc", grid=bad.sigmas).x, ref)
    judged = bad.validated(flow, other)
    assert not judged.kept and set(judged.shifts) == {0.0}
    assert judged.as_solver().name == "unipc"


@pytest.mark.parametrize("name", ["euler", "heun", "lms", "ipndm", "dpmpp_3m", "unipc"])
def test_zero_shifts_are_the_base_method_bit_for_bit_through_generate(name):
    flow = mixture()
    x = noise(4, n=4)
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 5)
    zero = LearnedSolver(name, {}, 10, sig, (), flowdiff.flow_fingerprint(flow), True, shifts=(0.0,) * 5,
                         learn=("shifts",))
    a = flowdiff.generate(flow, x, solver=name, grid=sig)
    b = flowdiff.generate(flow, x, solver=zero.as_solver(), grid=sig)
    assert torch.equal(a.x, b.x) and a.stats.nfe == b.stats.nfe


@pytest.mark.parametrize("name", ["heun", "unipc", "dpmpp_2m"])
def test_shifts_at_their_bounds_keep_every_evaluation_between_zero_and_sigma_max(name):
    from flowdiff.tools.learned import _layout

    flow = mixture()
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    _, intervals = _layout(solvers.get(name), sig, 2, ("shifts",), flow.schedule, 5.0)
    assert intervals[0][0] == 0.0  # the first step out of σ_max cannot evaluate above it
    for pick in (0, 1):
        shifts = tuple(iv[pick] for iv in intervals)
        counted, calls = counting(flow)
        learned = LearnedSolver(name, {}, 10, sig, (), flowdiff.flow_fingerprint(flow), True, shifts=shifts,
                                learn=("shifts",))
        flowdiff.generate(counted, noise(4, n=2), solver=learned.as_solver(), grid=sig)
        assert calls and all(0.0 <= s <= flow.schedule.sigma_max for s in calls), (pick, calls)
    assert any(iv[1] > 0 for iv in intervals) and any(iv[0] < 0 for iv in intervals)  # both ways were tried


def test_shifts_and_coefficients_together_save_load_bit_for_bit_and_old_files_still_load(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="dpmpp_3m", nfe=6, iterations=2, learn=("coefficients", "shifts"))
    assert learned.learn == ("shifts", "coefficients") and learned.calibration_error < learned.base_calibration_error
    forced = LearnedSolver(**{**learned.__dict__, "kept": True})
    path = forced.save(tmp_path / "both.learned.json")
    back = LearnedSolver.load(path, flow)
    assert back.shifts == forced.shifts and back.coefficients == forced.coefficients and back.learn == forced.learn
    a = flowdiff.generate(flow, cal, solver=forced.as_solver(), grid=forced.sigmas).x
    assert torch.equal(a, flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x)
    assert not torch.equal(a, flowdiff.generate(flow, cal, solver="dpmpp_3m", grid=forced.sigmas).x)
    with pytest.raises(ValueError, match="fingerprint"):
        LearnedSolver.load(path, mixture(seed=4))
    # a file of format 1 (coefficients only, written before shifts) loads as coefficients alone
    data = json.loads(path.read_text())
    del data["shifts"], data["learn"], data["base_sigmas"], data["scales"], data["directions"], data["trajectory"]
    data["format"] = "flowdiff.LearnedSolver/1"
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LearnedSolver.load(tmp_path / "old.json", flow)
    assert old.learn == ("coefficients",) and old.shifts == () and old.coefficients == forced.coefficients
    only_coefficients = LearnedSolver(**{**forced.__dict__, "learn": ("coefficients",), "shifts": ()})
    assert torch.equal(flowdiff.generate(flow, cal, solver=old.as_solver(), grid=old.sigmas).x,
                       flowdiff.generate(flow, cal, solver=only_coefficients.as_solver(), grid=old.sigmas).x)
    data["shifts"] = []
    (tmp_path / "bad1.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="malformed learned solver .*holds no shifts"):
        LearnedSolver.load(tmp_path / "bad1.json", flow)
    (tmp_path / "future.json").write_text(json.dumps({**data, "format": "flowdiff.LearnedSolver/6"}))
    with pytest.raises(ValueError, match="LearnedSolver/6.*expected 'flowdiff.LearnedSolver/5'"):
        LearnedSolver.load(tmp_path / "future.json", flow)


def test_shifts_and_grid_together_keep_the_step_count_and_fall_back_to_the_start_grid(tmp_path):
    flow = mixture()
    cal = noise(1, n=16)
    learned = learn_solver(flow, cal, solver="dpmpp_3m", nfe=6, learn=("shifts", "grid"))
    assert learned.learn == ("shifts", "grid")
    start = learned.base_grid()
    assert np.array_equal(start, flowdiff.make_sigmas(flow.schedule, "logsnr", 6))  # no stored grid: logsnr
    assert learned.calibration_error < learned.base_calibration_error
    forced = LearnedSolver(**{**learned.__dict__, "kept": True})
    if not learned.kept:  # a rejected fit leaves the start grid; refit to see the fitted one
        forced = learn_solver(flow, cal, solver="dpmpp_3m", nfe=6, iterations=3, learn=("shifts", "grid"))
        forced = LearnedSolver(**{**forced.__dict__, "kept": True})
    grid = forced.sigmas
    assert len(grid) == len(start) and grid[0] == start[0] and grid[-1] == start[-1] == 0.0
    assert np.all(np.diff(grid) < 0) and not np.array_equal(grid, start)
    counted, calls = counting(flow)
    out = flowdiff.generate(counted, cal, solver=forced.as_solver(), grid=grid)
    assert out.stats.nfe == len(calls) == flowdiff.generate(flow, cal, solver="dpmpp_3m", grid=start).stats.nfe
    assert all(0.0 <= s <= flow.schedule.sigma_max for s in calls)  # the moved grid's own shift bounds held
    back = LearnedSolver.load(forced.save(tmp_path / "grid.learned.json"), flow)
    assert np.array_equal(back.sigmas, grid) and np.array_equal(back.base_sigmas, start)
    assert torch.equal(flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x, out.x)
    # judged on noise where it loses, it is the base method on the start grid
    rejected = forced._decided(1.0, 0.5)
    assert not rejected.kept and np.array_equal(rejected.sigmas, start) and rejected.as_solver().name == "dpmpp_3m"


def test_the_default_fits_shifts_grid_start_scales_and_directions_and_spends_the_budget_from_its_learned_start():
    flow = mixture()
    cal = noise(1, n=16)
    learned = learn_solver(flow, cal, solver="unipc", nfe=5)
    assert learned.learn == ("shifts", "grid", "start", "scales", "directions")
    grid = learned.sigmas
    assert grid[1] < grid[0] <= flow.schedule.sigma_max and np.all(np.diff(grid) < 0)
    counted, calls = counting(flow)
    out = flowdiff.generate(counted, cal, solver=learned.as_solver(), grid=grid)
    assert out.stats.nfe == len(calls) <= 5
    assert all(0.0 <= s <= flow.schedule.sigma_max for s in calls)


def test_bad_learn_arguments_name_what_is_accepted():
    flow = mixture()
    x = noise(1, n=4)
    with pytest.raises(ValueError, match=r"learn must name each of 'shifts', 'coefficients', 'grid', 'start', "
                                         r"'scales', 'directions', 'trajectory' at most once, got 'steps'"):
        learn_solver(flow, x, solver="unipc", nfe=6, learn="steps")
    with pytest.raises(ValueError, match="at most once"):
        learn_solver(flow, x, solver="unipc", nfe=6, learn=("shifts", "shifts"))
    with pytest.raises(TypeError, match="learn must be one of"):
        learn_solver(flow, x, solver="unipc", nfe=6, learn=())
    with pytest.raises(ValueError, match="shift_bound must be a positive finite number .*got 0"):
        learn_solver(flow, x, solver="unipc", nfe=6, shift_bound=0)
    with pytest.raises(ValueError, match="solver 'reversible_heun' is reversible"):
        learn_solver(flow, x, solver="reversible_heun", nfe=6)
    with pytest.raises(ValueError, match=r"accepted: .*unipc.* \(any solver that is not reversible with learn"):
        learn_solver(flow, x, solver="heun", nfe=6, learn=("shifts", "coefficients"))
    with pytest.raises(ValueError, match=r"bound must be a positive finite number \(the largest \|coefficient\|\)"):
        learn_solver(flow, x, solver="unipc", nfe=6, bound=-1)
    with pytest.raises(ValueError, match=r"shift_bound must .*\(the largest \|shift\|\)"):
        learn_solver(flow, x, solver="unipc", nfe=6, shift_bound=math.inf)


# -- a learned first σ (the start, below σ_max) ------------------------------------------------------------------


def test_a_learned_start_lowers_the_error_keeps_the_nfe_and_is_judged_against_the_teacher_from_sigma_max():
    """At 3 evaluations Euler from σ_max wastes its first step on σ where the mixture's state barely moves; taking
    the noise as the state at a lower σ frees it. The teacher still starts at σ_max: the held-out errors are those
    of the learned grid's solve against the reference from σ_max, measured again here."""
    flow = mixture()
    cal = noise(1, n=16)
    half, learned = _learn_both(flow, cal, solver="euler", nfe=3, learn="start")
    start = learned.base_grid()
    assert learned.learn == ("start",) and start[0] == flow.schedule.sigma_max
    assert learned.kept and learned.validation_error < learned.base_validation_error  # held out agrees
    assert learned.calibration_error < learned.base_calibration_error
    grid = learned.sigmas
    assert start[1] < grid[0] < start[0] and np.array_equal(grid[1:], start[1:])  # only the first σ moved, down
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7)
    assert ref.sigma_start == flow.schedule.sigma_max
    held = flowdiff.generate(flow, cal[1::2], solver="euler", grid=half.sigmas).x  # the half-fit's, held out
    assert _rms(held, ref.x[1::2]) == pytest.approx(learned.validation_error, rel=1e-9)
    base = flowdiff.generate(flow, cal[1::2], solver="euler", grid=start).x
    assert _rms(base, ref.x[1::2]) == pytest.approx(learned.base_validation_error, rel=1e-9)
    # the solve starts from the noise as the state at the learned σ: its first evaluation is there, at x̄ = x√(1+σ²)
    seen = []

    def first(xbar, sigma):
        seen.append((sigma, xbar.clone()))
        return flow.sigma_field(xbar, sigma)

    counted = flowdiff.ProbabilityFlow.from_sigma_field(first, flow.schedule)
    out = flowdiff.generate(counted, cal, solver=learned.as_solver(), grid=grid)
    assert seen[0][0] == grid[0] and torch.equal(seen[0][1], cal * math.sqrt(1 + grid[0] ** 2))
    assert out.stats.nfe == len(seen) == 3 and all(s <= grid[0] for s, _ in seen)
    # with the grid: the start is fitted after the interior, so the fitted half is no worse than the grid's alone
    both = learn_solver(flow, cal, solver="euler", nfe=3, learn=("grid", "start"), iterations=4)
    alone = learn_solver(flow, cal, solver="euler", nfe=3, learn="grid", iterations=4)
    assert both.calibration_error <= alone.calibration_error < alone.base_calibration_error
    fitted = LearnedSolver(**{**both.__dict__, "kept": True}).sigmas
    assert fitted[1] < fitted[0] <= flow.schedule.sigma_max and np.all(np.diff(fitted) < 0)


def test_a_bad_start_is_rejected_on_held_out_noise_and_leaves_the_start_grid():
    flow = mixture()
    given = np.array([flow.schedule.sigma_max, 1.5, 0.5, 0.1, 0.01, 0.0])
    learned = learn_solver(flow, noise(1, n=8), solver="unipc", nfe=5, sigmas=given, iterations=1, learn="start")
    start = learned.base_grid()
    assert np.array_equal(start, given)
    low = start.copy()
    low[0] = start[1] * 1.01  # the noise taken as the state at σ = 1.5, where the data's own scale is not small
    bad = LearnedSolver(**{**learned.__dict__, "kept": True, "sigmas": low})
    other = noise(2, n=8)
    ref = flowdiff.reference_solution(flow, other, sigma_end=0.0, rtol=1e-7, atol=1e-7).x
    assert _rms(flowdiff.generate(flow, other, solver=bad.as_solver(), grid=low).x, ref) > _rms(
        flowdiff.generate(flow, other, solver="unipc", grid=start).x, ref)
    judged = bad.validated(flow, other)
    assert not judged.kept and np.array_equal(judged.sigmas, start) and judged.as_solver().name == "unipc"


def test_shifts_grid_and_start_save_load_bit_for_bit_and_keep_every_evaluation_in_range(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="dpmpp_3m", nfe=5, iterations=2, learn=("start", "shifts", "grid"))
    assert learned.learn == ("shifts", "grid", "start")
    forced = LearnedSolver(**{**learned.__dict__, "kept": True})
    back = LearnedSolver.load(forced.save(tmp_path / "start.learned.json"), flow)
    assert back.learn == forced.learn and back.shifts == forced.shifts
    assert np.array_equal(back.sigmas, forced.sigmas) and np.array_equal(back.base_sigmas, forced.base_sigmas)
    counted, calls = counting(flow)
    a = flowdiff.generate(counted, cal, solver=forced.as_solver(), grid=forced.sigmas)
    assert torch.equal(a.x, flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x)
    base_nfe = flowdiff.generate(flow, cal, solver="dpmpp_3m", grid=forced.base_sigmas).stats.nfe
    assert a.stats.nfe == len(calls) == base_nfe
    assert all(0.0 <= s <= flow.schedule.sigma_max for s in calls)
    # a file whose base grid is missing or of another length would judge the base method on the learned start
    data = json.loads((tmp_path / "start.learned.json").read_text())
    for base_sigmas in (None, data["base_sigmas"][1:]):
        (tmp_path / "bad.json").write_text(json.dumps({**data, "base_sigmas": base_sigmas}))
        with pytest.raises(ValueError, match=r"bad.json: malformed learned solver \(learn=\['shifts', 'grid', "
                                             r"'start'\] needs base_sigmas as long as sigmas"):
            LearnedSolver.load(tmp_path / "bad.json", flow)
    (tmp_path / "bad.json").write_text(json.dumps({**data, "learn": ["shifts"]}))
    with pytest.raises(ValueError, match=r"malformed learned solver \(learn=\['shifts'\] needs base_sigmas null"):
        LearnedSolver.load(tmp_path / "bad.json", flow)


def test_a_start_needs_a_second_sigma_above_zero():
    flow, calls = counting(mixture())
    one_step = np.array([flow.schedule.sigma_max, 0.0])
    with pytest.raises(ValueError, match=r"learn=\('start',\) moves the first σ within \(σ_1, σ_max\], but sigmas= "
                                         r"\(1 step\(s\), σ_1 = 0.0\) has no σ_1 > 0 below it"):
        learn_solver(flow, noise(1, n=4), solver="euler", nfe=1, sigmas=one_step, learn="start")
    # the 1-step grid chosen for nfe=1 is not the caller's: the message says how to get another
    with pytest.raises(ValueError, match=r"but the logsnr grid \(1 step\(s\), σ_1 = 0.0\) has no σ_1 > 0 below it: "
                                         r"give a grid of at least 2 steps \(sigmas=, or an nfe above 1\)$"):
        learn_solver(flow, noise(1, n=4), solver="euler", nfe=1, learn="start")
    assert calls == []


def test_a_start_is_refused_for_a_grid_that_starts_above_sigma_max():
    """(σ_1, σ_max] is empty when σ_1 is σ_max (this was a bare ZeroDivisionError), and a σ_1 moved up by "grid"
    could pass σ_max and put the start below it: a starting grid above σ_max is refused before any evaluation."""
    flow, calls = counting(mixture())
    top = flow.schedule.sigma_max
    for above in ([top * 1.5, top, 1.0, 0.0], [top * 1.5, top * 0.9, 1.0, 0.0]):
        for learn in ("start", ("grid", "start")):
            with pytest.raises(ValueError, match=r"moves the first σ within \(σ_1, σ_max\], but sigmas= starts at "
                                                 rf"σ = {above[0]!r}, above the schedule's σ_max = {top!r}"):
                learn_solver(flow, noise(1, n=4), solver="euler", nfe=3, sigmas=np.array(above), learn=learn)
    assert calls == []


def test_a_start_stays_above_a_sigma_1_next_to_sigma_max():
    """With σ_1 one float below σ_max the start's log-σ span rounds away: the start stays above σ_1 and
    at most σ_max instead of landing on σ_1 (which made the fit's own solve refuse an unordered grid)."""
    flow = mixture()
    top = flow.schedule.sigma_max
    given = np.array([top, math.nextafter(top, 0.0), 1.0, 0.0])
    learned = learn_solver(flow, noise(1, n=4), solver="euler", nfe=3, sigmas=given, learn="start", iterations=1)
    for grid in (learned.sigmas, learned.base_grid()):
        assert given[1] < grid[0] <= top and np.array_equal(grid[1:], given[1:])


def test_a_zero_terminal_snr_flow_is_refused_naming_the_flow_before_any_model_evaluation():
    """The teacher starts at σ_max: with σ_max = ∞ the refusal names learn_solver's flow, not another function's
    options (the logsnr grid's grid_options=, the reference's sigma_start=), whatever sigmas= says."""
    schedule = flowdiff.Schedule.from_betas(np.linspace(1e-4, 0.02, 1000), rescale_zero_snr=True)
    assert schedule.sigma_max == math.inf
    data = Gaussian(torch.zeros(4, dtype=torch.float64), 0.5, schedule)
    flow, calls = counting(data.flow())
    for given in (None, np.array([50.0, 2.0, 0.5, 0.0])):
        for learn in ("start", "shifts"):
            with pytest.raises(ValueError, match=r"flow's schedule has σ_max = inf \(zero terminal SNR\): learn_solver "
                                                 r".*accepted: a flow whose schedule has a finite σ_max"):
                learn_solver(flow, noise(1, n=4, dim=4), solver="euler", nfe=3, sigmas=given, learn=learn)
    assert calls == []


def test_a_grid_over_the_budget_is_refused_naming_sigmas_before_any_model_evaluation():
    flow, calls = counting(mixture())
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 8)
    with pytest.raises(ValueError,
                       match=r"sigmas= \(8 steps\) costs 1[56] evaluations with solver 'heun', over nfe=6: give"):
        learn_solver(flow, noise(1, n=4), solver="heun", nfe=6, sigmas=sig)
    assert calls == []


# -- encoding at the solver's order, with steps=N and nfe=N costing N both ways --------------------------

MULTISTEP_ENCODERS = ["lms", "abm", "dpmpp_2m", "dpmpp_3m", "unipc"]


@pytest.mark.parametrize("name", MULTISTEP_ENCODERS)
def test_multistep_encode_and_decode_converge_at_the_fixed_grid_order(name):
    """Encode (0 → σ_max) against the exact latent, and decode from the exact latent (σ_max → 0) against the
    exact image, on grids that refine every step (σ_i = σ_max (1 − i/N)^7)."""
    g = Gaussian(torch.linspace(-0.5, 0.5, 4), 0.3**2)
    flow = g.flow()
    smax = flow.schedule.sigma_max
    x = g.sample(3, generator=torch.Generator().manual_seed(0))
    latent = g.solution(x, 0.0, smax) / math.sqrt(1 + smax**2)
    solver = solvers.get(name)
    order = getattr(solver, "fixed_grid_order", solver.order)
    enc_errs, dec_errs = [], []
    for n in (16, 32, 64):
        sig = smax * (1.0 - np.arange(n + 1) / n) ** 7
        enc = flowdiff.encode(flow, x, solver=name, grid=sig)
        enc_errs.append(float((enc.x - latent).abs().max()))
        dec = flowdiff.decode(flow, flowdiff.Latent(latent, sig[::-1].copy(), name, {}))
        dec_errs.append(float((dec.x - x).abs().max()))
    assert math.log2(enc_errs[-2] / enc_errs[-1]) > order - 0.3, (name, enc_errs)
    assert math.log2(dec_errs[-2] / dec_errs[-1]) > min(order, 2) - 0.3, (name, dec_errs)


@pytest.mark.parametrize("name", MULTISTEP_ENCODERS)
@pytest.mark.parametrize("n", [4, 10])
def test_steps_and_nfe_say_what_a_multistep_encode_and_decode_cost(name, n):
    gauss, g = _gaussian()
    flow, calls = counting(gauss.flow())
    images = gauss.sample(2, generator=g)
    for kw in ({"steps": n}, {"nfe": n}):
        calls.clear()
        enc = flowdiff.encode(flow, images, solver=name, grid="logsnr", **kw)
        assert enc.stats.nfe == len(calls) == n, (name, kw, enc.stats.nfe, len(calls))
        assert len(enc.sigmas) == n + 1
        calls.clear()
        dec = flowdiff.decode(flow, enc.latent)
        assert dec.stats.nfe == len(calls) == n, (name, kw, dec.stats.nfe, len(calls))


# -- grids tuned for the round trip -----------------------------------------------------------------------


def test_roundtrip_grid_beats_its_start_on_other_images_and_spends_the_budget():
    g = Gaussian(torch.linspace(-0.5, 0.5, 16), 0.1)
    flow = g.flow()
    cal = g.sample(8, generator=torch.Generator().manual_seed(0))
    other = g.sample(8, generator=torch.Generator().manual_seed(1))
    tuned = flowdiff.tune_roundtrip(flow, cal, solver="unipc", nfe=8, max_evals=30)
    assert tuned.method == "roundtrip" and tuned.sigmas[0] == flow.schedule.sigma_max and tuned.sigmas[-1] == 0
    assert np.all(np.diff(tuned.sigmas) < 0)
    assert tuned.evaluations > 3 and tuned.tuning_nfe == 16 * tuned.evaluations  # 8 + 8 per candidate

    def roundtrip(sigmas):
        enc = flowdiff.encode(flow, other, solver="unipc", grid=sigmas)
        dec = flowdiff.decode(flow, enc.latent)
        assert enc.stats.nfe == dec.stats.nfe == 8
        return _rms(dec.x, other)

    start = flowdiff.make_sigmas(flow.schedule, tuned.initial_grid, 8)
    assert roundtrip(tuned.sigmas) < roundtrip(start)


def test_roundtrip_tuning_refuses_what_it_cannot_tune():
    g = Gaussian(torch.linspace(-0.5, 0.5, 4), 0.1)
    flow = g.flow()
    x = g.sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="solver 'ipndm' cannot encode"):
        flowdiff.tune_roundtrip(flow, x, solver="ipndm", nfe=8)
    with pytest.raises(ValueError, match="reversible"):
        flowdiff.tune_roundtrip(flow, x, solver="reversible_heun", nfe=8)
    with pytest.raises(ValueError, match="at least 2 samples"):
        flowdiff.tune_roundtrip(flow, x[:1], solver="unipc", nfe=8)
    with pytest.raises(ValueError, match="max_evals must be an int >= 1"):
        flowdiff.tune_roundtrip(flow, x, solver="unipc", nfe=8, max_evals=0)


# -- learned output scales (the field's magnitude per step) -------------------------------------------------------


def _linear_field(t, y):
    return -2.0 * y + torch.sin(torch.as_tensor(t, dtype=y.dtype)) * torch.ones_like(y)


@pytest.mark.parametrize("name", ["euler", "heun", "ipndm", "unipc", "dpmpp_2m"])
def test_a_scaled_solver_is_its_base_on_the_scaled_field_and_zero_is_the_base_bit_for_bit(name):
    """solvers.Scaled with one s on every step is the base method solving a + (1 + s)(f − a) (the same floating-point
    operations: equal bit for bit), and s = 0 is the base itself."""
    y0 = torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3)
    ts = [0.0, 0.3, 0.5, 0.9, 1.2, 1.3]
    steps = list(zip(ts[:-1], ts[1:]))
    base = solvers.get(name)

    def anchor(t, y):
        return 0.5 * y

    def scaled_field(t, y):
        a = anchor(t, y)
        return a + 1.25 * (_linear_field(t, y) - a)

    got = solvers.solve(_linear_field, y0, ts, solvers.Scaled(base, {s: 0.25 for s in steps}, anchor=anchor))
    want = solvers.solve(scaled_field, y0, ts, base)
    assert torch.equal(got.y, want.y) and got.stats.nfe == want.stats.nfe
    plain = solvers.solve(_linear_field, y0, ts, solvers.Scaled(base, {s: 0.5 for s in steps}))
    assert torch.equal(plain.y, solvers.solve(lambda t, y: 1.5 * _linear_field(t, y), y0, ts, base).y)
    zero = solvers.solve(_linear_field, y0, ts, solvers.Scaled(base, {s: 0.0 for s in steps}, anchor=anchor))
    assert torch.equal(zero.y, solvers.solve(_linear_field, y0, ts, base).y)


def test_a_scaled_solver_refuses_what_it_cannot_scale():
    steps = {(0.0, 1.0): 0.1}
    with pytest.raises(ValueError, match=r"no scale for the step 1.0 -> 2.0: its scales belong to the grid"):
        solvers.solve(_linear_field, torch.ones(2, dtype=torch.float64), [0.0, 1.0, 2.0],
                      solvers.Scaled(solvers.get("euler"), steps))
    with pytest.raises(ValueError, match=r"the scale of the step \(0.0, 1.0\) must be a finite number, got nan"):
        solvers.Scaled(solvers.get("euler"), {(0.0, 1.0): math.nan})
    with pytest.raises(TypeError, match="scales must be keyed by steps"):
        solvers.Scaled(solvers.get("euler"), {0.0: 0.1})
    with pytest.raises(ValueError, match="solver 'reversible_heun' is reversible"):
        solvers.Scaled(solvers.get("reversible_heun"), {})
    with pytest.raises(TypeError, match="neither Scaled nor Shifted"):
        solvers.Scaled(solvers.Shifted(solvers.get("euler"), steps), {})
    with pytest.raises(TypeError, match="anchor must be None or a callable"):
        solvers.Scaled(solvers.get("euler"), steps, anchor=1.0)


@pytest.mark.parametrize("name", ["euler", "ipndm", "lms", "unipc"])
def test_learned_scales_are_epsilon_scaling_per_step(name):
    """A scale s on every step of a generation is the model's ε scaled by 1 + s (epsilon scaling, Ning et al.),
    in the σ variables and in the data variables alike (D_s = (1 + s)·D − s·x̄), at the base method's NFE; zero
    scales are the base method bit for bit."""
    flow = mixture()
    x = noise(4, n=4)
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 5)
    fp = flowdiff.flow_fingerprint(flow)
    field = flow.sigma_field
    louder = flowdiff.ProbabilityFlow.from_sigma_field(lambda xbar, sigma: 1.2 * field(xbar, sigma), flow.schedule)
    scaled = LearnedSolver(name, {}, 10, sig, (), fp, True, scales=(0.2,) * 5, learn=("scales",))
    counted, calls = counting(flow)
    got = flowdiff.generate(counted, x, solver=scaled.as_solver(), grid=sig)
    want = flowdiff.generate(louder, x, solver=name, grid=sig)
    torch.testing.assert_close(got.x, want.x, rtol=1e-12, atol=1e-12)
    assert got.stats.nfe == want.stats.nfe == len(calls)
    assert not torch.allclose(got.x, flowdiff.generate(flow, x, solver=name, grid=sig).x)
    zero = LearnedSolver(name, {}, 10, sig, (), fp, True, scales=(0.0,) * 5, learn=("scales",))
    assert torch.equal(flowdiff.generate(flow, x, solver=zero.as_solver(), grid=sig).x,
                       flowdiff.generate(flow, x, solver=name, grid=sig).x)


def test_a_scale_is_fitted_only_where_it_acts():
    """A step the entry point gives a method of its own takes no scale (Heun's final Euler step into σ = 0; the data
    variables' limit into σ = 0, which evaluates nothing after UniPC's corrector and evaluates the model itself
    after DPM-Solver++(3M)); learn_solver fixes it at zero."""
    from flowdiff.tools.learned import _scaled_steps

    flow = mixture()
    sig = flowdiff.make_sigmas(flow.schedule, "logsnr", 4)
    assert _scaled_steps(solvers.get("heun"), sig, flow.schedule) == [True, True, True, False]
    assert _scaled_steps(solvers.get("unipc"), sig, flow.schedule) == [True, True, True, False]
    assert _scaled_steps(solvers.get("dpmpp_3m"), sig, flow.schedule) == [True, True, True, False]
    assert _scaled_steps(solvers.get("ipndm"), sig, flow.schedule) == [True] * 4
    learned = learn_solver(flow, noise(1, n=8), solver="heun", nfe=7, iterations=1, learn="scales", sigmas=sig)
    assert learned.scales[-1] == 0.0


def test_learned_scales_lower_the_error_against_the_teacher_on_other_noise_at_the_base_nfe():
    flow = mixture()
    cal = noise(1, n=32)
    learned = learn_solver(flow, cal, solver="unipc", nfe=4, learn="scales")
    assert learned.learn == ("scales",) and learned.shifts == () and learned.base_sigmas is None
    assert len(learned.scales) == len(learned.sigmas) - 1
    assert all(abs(s) <= 0.5 for s in learned.scales) and any(learned.scales)
    assert learned.calibration_error < learned.base_calibration_error
    assert learned.kept and learned.validation_error < learned.base_validation_error
    # on noise the fit never saw, against the teacher solved here
    other = noise(7, n=32)
    ref = flowdiff.reference_solution(flow, other, sigma_end=0.0, rtol=1e-9, atol=1e-9).x
    counted, calls = counting(flow)
    out = flowdiff.generate(counted, other, solver=learned.as_solver(), grid=learned.sigmas)
    base = flowdiff.generate(flow, other, solver="unipc", grid=learned.sigmas)
    assert _rms(out.x, ref) < _rms(base.x, ref)
    assert out.stats.nfe == len(calls) == base.stats.nfe <= 4
    assert learned.fitting_nfe == learned.reference_nfe + learned.solves * base.stats.nfe


def test_scales_on_top_of_shifts_grid_and_start_are_fitted_last_and_rejected_on_bad_held_out_noise():
    flow = mixture()
    cal = noise(1, n=16)
    unscaled = learn_solver(flow, cal, solver="unipc", nfe=5, learn=("shifts", "grid", "start"))
    both = learn_solver(flow, cal, solver="unipc", nfe=5, learn=("shifts", "grid", "start", "scales"))
    assert both.learn == ("shifts", "grid", "start", "scales")
    # the other kinds are fitted as without scales; the scales then only lower the fitted half's error
    assert np.array_equal(both.sigmas, unscaled.sigmas) and both.shifts == unscaled.shifts
    assert both.calibration_error <= unscaled.calibration_error
    # and stay only where the held-out half prefers them to the same fit without them
    assert both.validation_error <= unscaled.validation_error
    assert any(both.scales) == (both.validation_error < unscaled.validation_error)
    bad = LearnedSolver(**{**both.__dict__, "kept": True, "scales": tuple(0.5 for _ in both.scales)})
    other = noise(2, n=8)
    judged = bad.validated(flow, other)
    assert not judged.kept and set(judged.scales) == {0.0} and set(judged.shifts) == {0.0}
    assert judged.as_solver().name == "unipc" and np.array_equal(judged.sigmas, both.base_grid())


def _saved_and_loaded(forced, flow, cal, path):
    """``forced`` saved to ``path`` (format 4) and loaded back, and its samples of ``cal``, which the loaded solver
    reproduces bit for bit."""
    path = forced.save(path)
    assert json.loads(path.read_text())["format"] == "flowdiff.LearnedSolver/5"
    back = LearnedSolver.load(path, flow)
    a = flowdiff.generate(flow, cal, solver=forced.as_solver(), grid=forced.sigmas).x
    assert torch.equal(a, flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x)
    return back, a



def test_scales_save_load_bit_for_bit_and_format_2_files_still_load(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="ipndm", nfe=5, iterations=2, learn=("shifts", "scales"))
    forced = LearnedSolver(**{**learned.__dict__, "kept": True})
    assert any(forced.scales) and any(forced.shifts)
    back, a = _saved_and_loaded(forced, flow, cal, tmp_path / "scaled.learned.json")
    assert back.scales == forced.scales and back.shifts == forced.shifts and back.learn == forced.learn
    shifted_only = LearnedSolver(**{**forced.__dict__, "scales": (), "learn": ("shifts",)})
    assert not torch.equal(a, flowdiff.generate(flow, cal, solver=shifted_only.as_solver(), grid=forced.sigmas).x)
    # a format-2 file (written before scales) loads as it was; one that holds scales is refused
    data = json.loads(shifted_only.save(tmp_path / "shifts.json").read_text())
    del data["scales"], data["directions"], data["trajectory"]
    data["format"] = "flowdiff.LearnedSolver/2"
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LearnedSolver.load(tmp_path / "old.json", flow)
    assert old.scales == () and old.shifts == forced.shifts
    assert torch.equal(flowdiff.generate(flow, cal, solver=old.as_solver(), grid=old.sigmas).x,
                       flowdiff.generate(flow, cal, solver=shifted_only.as_solver(), grid=old.sigmas).x)
    (tmp_path / "bad2.json").write_text(json.dumps({**data, "scales": []}))
    with pytest.raises(ValueError, match="malformed learned solver .*LearnedSolver/2.* holds no scales"):
        LearnedSolver.load(tmp_path / "bad2.json", flow)


# -- learned x_T directions (PAS's second direction per step) ------------------------------------------------------


def _directed_euler_by_hand(y0, ts, scales, weights, anchor):
    """Euler on _linear_field with f' = a + (1 + s)·d + w·|d|·û, û the unit part of y0 (the solve's start)
    perpendicular to d = f − a, written out sample by sample."""
    y = y0.clone()
    for (t0, t1), s, w in zip(zip(ts[:-1], ts[1:]), scales, weights):
        rows = []
        for z, yi in zip(y0, y):
            a = anchor(t0, yi)
            d = _linear_field(t0, yi) - a
            u = z - (z @ d) / (d @ d) * d
            rows.append(yi + (t1 - t0) * (a + (1 + s) * d + w * d.norm() / u.norm() * u))
        y = torch.stack(rows)
    return y


def test_a_directed_step_is_the_hand_computed_pas_step_and_zero_weights_are_the_base_bit_for_bit():
    """solvers.Scaled with directions: each step of Euler moves along a + (1 + s)·d + w·|d|·û, û taken from the
    solve's initial state (not the current one) perpendicular to d; w = 0 with s = 0 is Euler bit for bit, w = 0
    with s ≠ 0 the scales alone bit for bit; the NFE is the base's."""
    y0 = torch.tensor([[1.0, -0.5, 0.25], [0.3, 0.8, -1.1]], dtype=torch.float64)
    ts = [0.2, 0.3, 0.5, 0.9]  # off t = 0, where d = −2.5·y0 lies along the start and the term is zero
    steps = list(zip(ts[:-1], ts[1:]))
    base = solvers.get("euler")

    def anchor(t, y):
        return 0.5 * y

    scales, weights = [0.1, -0.2, 0.0], [0.3, -0.25, 0.4]
    directed = solvers.Scaled(base, dict(zip(steps, scales)), anchor=anchor, directions=dict(zip(steps, weights)))
    got = solvers.solve(_linear_field, y0, ts, directed)
    torch.testing.assert_close(got.y, _directed_euler_by_hand(y0, ts, scales, weights, anchor), rtol=1e-13,
                               atol=1e-13)
    assert got.stats.nfe == solvers.solve(_linear_field, y0, ts, base).stats.nfe == 3
    for name in ("euler", "heun", "unipc"):
        plain = solvers.get(name)
        zero = solvers.Scaled(plain, {s: 0.0 for s in steps}, anchor=anchor, directions={s: 0.0 for s in steps})
        assert torch.equal(solvers.solve(_linear_field, y0, ts, zero).y, solvers.solve(_linear_field, y0, ts, plain).y)
        only = solvers.Scaled(plain, dict(zip(steps, scales)), anchor=anchor, directions={s: 0.0 for s in steps})
        assert torch.equal(solvers.solve(_linear_field, y0, ts, only).y,
                           solvers.solve(_linear_field, y0, ts, solvers.Scaled(plain, dict(zip(steps, scales)),
                                                                               anchor=anchor)).y)
    # where the start lies along d, or d vanishes, the term is zero (not NaN)
    along = solvers.Scaled(base, {steps[0]: 0.0}, directions={steps[0]: 0.5})
    flat = solvers.solve(lambda t, y: 2.0 * y, y0, ts[:2], along)
    assert torch.equal(flat.y, solvers.solve(lambda t, y: 2.0 * y, y0, ts[:2], base).y)
    still = solvers.solve(lambda t, y: torch.zeros_like(y), y0, ts[:2], along)
    assert torch.equal(still.y, y0)


def test_a_directed_solver_refuses_what_it_cannot_take():
    euler = solvers.get("euler")
    with pytest.raises(TypeError, match="directions must be None or a dict of step"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, directions=[0.1])
    with pytest.raises(ValueError, match=r"the direction weight of the step \(0.0, 1.0\) must be a finite number, "
                                         "got inf"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, directions={(0.0, 1.0): math.inf})
    with pytest.raises(ValueError, match=r"directions has weights for steps without a scale \[\(1.0, 2.0\)\]"):
        solvers.Scaled(euler, {(0.0, 1.0): 0.0}, directions={(1.0, 2.0): 0.1})
    fresh = solvers.Scaled(euler, {(0.0, 1.0): 0.0}, directions={(0.0, 1.0): 0.1})
    with pytest.raises(ValueError, match="has a direction weight for the step 0.0 -> 1.0 but no initial state"):
        fresh.step(_linear_field, 0.0, 1.0, torch.ones(1, 2, dtype=torch.float64), None)


def test_learned_directions_lower_the_error_against_the_teacher_on_other_noise_at_the_base_nfe():
    """On the closed-form mixture, directions fitted on top of the scales, then jointly with them, lower the error
    against the teacher on noise the fit never saw, at the base method's NFE; a step the formulation gives its own
    method (UniPC's last, into σ = 0) takes none."""
    flow = mixture()
    cal = noise(1, n=32)
    scaled = learn_solver(flow, cal, solver="unipc", nfe=4, learn="scales")
    half, both = _learn_both(flow, cal, solver="unipc", nfe=4, learn=("scales", "directions"))
    assert both.learn == ("scales", "directions") and scaled.kept
    assert len(both.directions) == len(both.sigmas) - 1 and both.directions[-1] == 0.0
    assert all(abs(w) <= 0.5 for w in both.directions) and any(both.directions)
    assert all(abs(s) <= 0.5 for s in both.scales) and both.scales[-1] == 0.0
    # the scales were fitted again together with the directions (one after the other, they stayed as fitted alone)
    assert both.scales != scaled.scales
    assert both.calibration_error < scaled.calibration_error
    assert both.kept and both.validation_error < scaled.validation_error
    # the held-out half chose the joint fit over the scales alone and neither, by its own (half-fit's) error there
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x[1::2]
    held_x = flowdiff.generate(flow, cal[1::2], solver=half.as_solver(), grid=half.sigmas).x
    assert _rms(held_x, ref) == pytest.approx(both.validation_error, rel=1e-9)
    assert both.validation_error < min(scaled.validation_error, scaled.base_validation_error)
    other = noise(7, n=32)
    ref = flowdiff.reference_solution(flow, other, sigma_end=0.0, rtol=1e-9, atol=1e-9).x
    counted, calls = counting(flow)
    out = flowdiff.generate(counted, other, solver=both.as_solver(), grid=both.sigmas)
    alone = flowdiff.generate(flow, other, solver=scaled.as_solver(), grid=scaled.sigmas)
    assert _rms(out.x, ref) < _rms(alone.x, ref)
    assert out.stats.nfe == len(calls) == alone.stats.nfe <= 4
    # the directions alone, without scales, are a learned kind of their own
    only = learn_solver(flow, cal, solver="unipc", nfe=4, learn="directions", iterations=2)
    assert only.scales == () and len(only.directions) == len(only.sigmas) - 1


def test_directions_stay_only_where_the_held_out_half_prefers_them():
    flow = mixture()
    cal = noise(1, n=16)
    scaled = learn_solver(flow, cal, solver="ipndm", nfe=5, learn=("shifts", "scales"))
    both = learn_solver(flow, cal, solver="ipndm", nfe=5, learn=("shifts", "scales", "directions"))
    assert both.shifts == scaled.shifts and both.calibration_error <= scaled.calibration_error
    assert both.validation_error <= scaled.validation_error
    assert any(both.directions) == (both.validation_error < scaled.validation_error)
    bad = LearnedSolver(**{**both.__dict__, "kept": True, "directions": tuple(0.5 for _ in both.directions)})
    judged = bad.validated(flow, noise(2, n=8))
    assert not judged.kept and set(judged.directions) == {0.0} and set(judged.scales) == {0.0}
    assert judged.as_solver().name == "ipndm"


def test_directions_save_load_bit_for_bit_and_format_3_files_still_load(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="ipndm", nfe=5, iterations=2, learn=("scales", "directions"))
    forced = LearnedSolver(**{**learned.__dict__, "kept": True,
                              "directions": tuple(0.1 * (i + 1) for i in range(len(learned.directions)))})
    back, a = _saved_and_loaded(forced, flow, cal, tmp_path / "directed.learned.json")
    assert back.directions == forced.directions and back.scales == forced.scales and back.learn == forced.learn
    scales_only = LearnedSolver(**{**forced.__dict__, "directions": (), "learn": ("scales",)})
    assert not torch.equal(a, flowdiff.generate(flow, cal, solver=scales_only.as_solver(), grid=forced.sigmas).x)
    # a format-3 file (written before directions) loads as it was; one that holds directions is refused
    data = json.loads(scales_only.save(tmp_path / "scales.json").read_text())
    del data["directions"], data["trajectory"]
    data["format"] = "flowdiff.LearnedSolver/3"
    (tmp_path / "old.json").write_text(json.dumps(data))
    old = LearnedSolver.load(tmp_path / "old.json", flow)
    assert old.directions == () and old.scales == forced.scales
    assert torch.equal(flowdiff.generate(flow, cal, solver=old.as_solver(), grid=old.sigmas).x,
                       flowdiff.generate(flow, cal, solver=scales_only.as_solver(), grid=old.sigmas).x)
    (tmp_path / "bad3.json").write_text(json.dumps({**data, "directions": []}))
    with pytest.raises(ValueError, match="malformed learned solver .*LearnedSolver/3.* holds no directions"):
        LearnedSolver.load(tmp_path / "bad3.json", flow)


# -- cross-fitting: the chosen variant refitted on all the calibration noise ---------------------------------------


class _Counted:
    """A flow's field that records the σ of every model evaluation and can be fingerprinted (learn_solver records
    the flow's fingerprint; ``counting``'s plain function cannot be)."""

    def __init__(self, flow):
        self.inner, self.calls, self.tag = flow.sigma_field, [], torch.zeros(1)

    def field(self, xbar, sigma, **kwargs):
        self.calls.append(sigma)
        return self.inner(xbar, sigma, **kwargs)


def _counted(flow):
    counted = _Counted(flow)
    return flowdiff.ProbabilityFlow.from_sigma_field(counted.field, flow.schedule), counted.calls


def _teacher(flow, cal):
    """The teacher learn_solver asks for, solved (and cached) now: the calls counted after it are the fit's own
    (``reference_nfe`` counts both the teacher's solve and the looser solve reference_solution checks it with)."""
    flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7)
    del _counted_calls(flow)[:]


def _counted_calls(flow):
    return flow.sigma_field.__self__.calls


def _half_fit(fit):
    """A half-fit as the solver it would be (``_learn_both``'s first result)."""
    return fit.as_solver(), fit.sigmas


def test_a_kept_fit_is_refitted_on_all_the_noise_from_the_half_fit_and_keeps_the_half_fits_held_out_error():
    flow = mixture()
    cal = noise(1, n=16)
    half, refit = _learn_both(flow, cal, solver="unipc", nfe=5)
    learned = learn_solver(flow, cal, solver="unipc", nfe=5)
    assert half.kept and refit is not None and learned.kept
    # learn_solver returns the refit, not the half-fit
    assert learned.shifts == refit.shifts and learned.scales == refit.scales and np.array_equal(learned.sigmas,
                                                                                                refit.sigmas)
    assert (learned.shifts, learned.scales, learned.directions, tuple(learned.sigmas)) != (
        half.shifts, half.scales, half.directions, tuple(half.sigmas))
    assert (learned.options["fitted_on"], half.options["fitted_on"]) == ("all", "even half")
    # on all the calibration noise the refit is no worse than the half-fit it started from, and its figures are there
    ref = flowdiff.reference_solution(flow, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7).x
    errors = {}
    for key, (solver, grid) in {"refit": _half_fit(learned), "half": _half_fit(half),
                                "base": (half.base(), half.base_grid())}.items():
        out = flowdiff.generate(flow, cal, solver=solver, grid=grid)
        assert out.stats.nfe <= 5
        errors[key] = _rms(out.x, ref)
    assert errors["refit"] < errors["half"]
    assert learned.calibration_error == pytest.approx(errors["refit"], rel=1e-9)
    assert learned.base_calibration_error == pytest.approx(errors["base"], rel=1e-9)
    # the held-out figures are the half-fit's (the refit saw the held-out half): measured again on that half
    assert (learned.validation_error, learned.base_validation_error) == (half.validation_error,
                                                                         half.base_validation_error)
    held = flowdiff.generate(flow, cal[1::2], solver=half.as_solver(), grid=half.sigmas).x
    assert _rms(held, ref[1::2]) == pytest.approx(learned.validation_error, rel=1e-9)
    # a kind the held-out half left at zero stays at zero in the refit
    for kind in ("scales", "directions"):
        if not any(getattr(half, kind)):
            assert not any(getattr(learned, kind))


def test_the_refit_keeps_the_variant_the_held_out_half_chose():
    """Where the held-out half takes the scales alone over the joint fit, the refit fits no directions."""
    flow = mixture()
    cal = noise(1, n=16)
    half, refit = _learn_both(flow, cal, solver="ipndm", nfe=5, learn=("shifts", "scales", "directions"))
    assert half.kept and any(half.scales) and not any(half.directions)  # this noise takes the scales alone
    assert refit.learn == half.learn and set(refit.directions) == {0.0} and refit.scales != half.scales


def test_fitting_nfe_counts_the_refit_exactly():
    flow = mixture()
    cal = noise(1, n=16)
    counted, calls = _counted(flow)
    _teacher(counted, cal)
    learned = learn_solver(counted, cal, solver="unipc", nfe=5, iterations=2)
    assert learned.kept and learned.options["fitted_on"] == "all"
    assert learned.fitting_nfe - learned.reference_nfe == len(calls)  # every candidate solve: half-fit and refit
    half, _ = _learn_both(flow, cal, solver="unipc", nfe=5, iterations=2)
    per_solve = flowdiff.generate(flow, cal, solver=learned.as_solver(), grid=learned.sigmas).stats.nfe
    assert learned.solves > half.solves  # the refit's candidate solves (all the noise in one solve each)
    assert learned.fitting_nfe - half.fitting_nfe == (learned.solves - half.solves) * per_solve


def test_a_fit_the_held_out_half_rejects_is_not_refitted():
    flow = mixture()
    cal = noise(4, n=4)
    counted, calls = _counted(flow)
    _teacher(counted, cal)
    learned = learn_solver(counted, cal, solver="ipndm", nfe=6, learn=("shifts", "scales"), iterations=3)
    half, refit = _learn_both(flow, cal, solver="ipndm", nfe=6, learn=("shifts", "scales"), iterations=3)
    assert not half.kept and refit is None and not learned.kept
    assert learned.options["fitted_on"] == "even half" and learned.fitting_nfe == half.fitting_nfe
    assert learned.fitting_nfe - learned.reference_nfe == len(calls)
    assert learned.solves == half.solves and set(learned.shifts) == set(learned.scales) == {0.0}


def test_a_refitted_solver_saves_and_loads_bit_for_bit(tmp_path):
    flow = mixture()
    cal = noise(1, n=8)
    learned = learn_solver(flow, cal, solver="unipc", nfe=5, iterations=2)
    assert learned.kept and learned.options["fitted_on"] == "all"
    back = LearnedSolver.load(learned.save(tmp_path / "refit.learned.json"), flow)
    assert back.options == learned.options and back.shifts == learned.shifts and back.scales == learned.scales
    assert back.directions == learned.directions and np.array_equal(back.sigmas, learned.sigmas)
    assert (back.validation_error, back.calibration_error, back.fitting_nfe, back.solves) == (
        learned.validation_error, learned.calibration_error, learned.fitting_nfe, learned.solves)
    assert torch.equal(flowdiff.generate(flow, cal, solver=learned.as_solver(), grid=learned.sigmas).x,
                       flowdiff.generate(flow, cal, solver=back.as_solver(), grid=back.sigmas).x)


def test_fitting_nfe_counts_the_teacher_and_its_error_check_exactly():
    """``reference_nfe`` is every evaluation the teacher cost: its solve and the looser solve that checks its error
    (it counted the first alone: 288 of 511 on the mixture); with nothing cached, ``fitting_nfe`` is every call."""
    clear_reference_cache()
    flow = mixture()
    cal = noise(2, n=8)
    counted, calls = _counted(flow)
    flowdiff.reference_solution(counted, cal, sigma_end=0.0, rtol=1e-7, atol=1e-7)
    teacher = len(calls)
    clear_reference_cache()
    del calls[:]
    learned = learn_solver(counted, cal, solver="unipc", nfe=5, iterations=1)
    assert learned.reference_nfe == teacher and learned.fitting_nfe == len(calls)
    clear_reference_cache()
    del calls[:]
    tuned = flowdiff.tune(counted, cal, solver="unipc", nfe=5, max_evals=6)
    assert tuned.reference_nfe == teacher and tuned.tuning_nfe == len(calls)
