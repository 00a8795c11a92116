"""The comparison harness: NFE accounting, convergence, the cached float64 reference, the renderings."""

import csv
import io
import math

import numpy as np
import pytest
import torch

import solvers
from flowdiff import ProbabilityFlow
from flowdiff.models.analytic import Gaussian
from flowdiff.tools.compare import (
    CSV_COLUMNS,
    Comparison,
    Reference,
    clear_reference_cache,
    compare,
    default_solvers,
    reference_solution,
)


def _gaussian() -> Gaussian:
    return Gaussian(torch.zeros(1, 4, 4), torch.linspace(0.05, 1.0, 16))


def _noise(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


class CountingEps:
    """The Gaussian's exact ε, counting its calls and the dtypes it saw."""

    def __init__(self, model: Gaussian) -> None:
        self.model = model
        self.calls = 0

    def __call__(self, xbar: torch.Tensor, sigma: float) -> torch.Tensor:
        self.calls += 1
        return self.model.eps(xbar, sigma)



@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_reference_cache()
    yield
    clear_reference_cache()


@pytest.mark.parametrize("tol", [1e-5, 1e-7])
@pytest.mark.parametrize("to_zero", [False, True])
def test_reference_matches_the_closed_form_solution_and_estimates_its_own_error(tol, to_zero):
    g = _gaussian()
    noise = _noise()
    ref = reference_solution(g.flow(), noise, rtol=tol, atol=tol, sigma_end=0.0 if to_zero else None)
    s0, s_min = g.schedule.sigma_max, g.schedule.sigma_min
    xbar0 = noise * math.sqrt(1 + s0 * s0)
    if to_zero:
        exact = g.solution(xbar0, s0, 0.0)
    else:  # the exact flow to σ_min, then the Euler step into σ = 0 that the fixed grids end with
        at_min = g.solution(xbar0, s0, s_min)
        exact = at_min - s_min * g.eps(at_min, s_min)
    actual = float((ref.x - exact).pow(2).mean().sqrt())
    assert ref.x.dtype == torch.float64
    assert (ref.sigma_start, ref.sigma_end) == (s0, 0.0 if to_zero else s_min)
    assert actual < 10 * tol
    assert ref.error / 10 < actual < ref.error * 10  # the estimate has the right order of magnitude


def test_fixed_grid_errors_converge_to_the_default_reference_not_to_the_ode_at_zero():
    # data with tiny variances: ε changes fast below σ_min, so the grids' fixed last step σ_min -> 0 matters
    g = Gaussian(torch.zeros(1, 4, 4), torch.logspace(-5, 0, 16))
    flow, noise, budgets = g.flow(), _noise(), [40, 80, 160]

    def errors(sigma_end):
        ref = reference_solution(flow, noise, rtol=1e-9, atol=1e-9, sigma_end=sigma_end)
        runs = compare(flow, noise, solvers=["heun"], grids=["logsnr"], nfe=budgets, reference=ref).runs
        runs = sorted(runs, key=lambda r: r.nfe)
        return [r.rms_error for r in runs], [r.nfe for r in runs]

    to_min, nfe = errors(None)
    assert np.polyfit(np.log(nfe), np.log(to_min), 1)[0] < -1.7  # Heun's second order
    to_zero, _ = errors(0.0)
    assert to_zero[-1] > 0.5 * to_zero[-2]  # stalls at the error of the last step into σ = 0


def test_reference_is_cached_per_flow_and_noise():
    g = _gaussian()
    eps = CountingEps(g)
    flow = ProbabilityFlow.from_sigma_field(eps, g.schedule)
    noise = _noise()
    first = reference_solution(flow, noise)
    calls = eps.calls
    assert calls > first.nfe > 0  # the tight solve plus the looser check solve
    assert reference_solution(flow, noise.clone()) is first  # same values: a hit, no evaluation
    assert eps.calls == calls
    compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[4])
    assert eps.calls == calls + 4  # the run's own 4 evaluations only
    other = reference_solution(flow, _noise(seed=1))  # different noise: solved
    assert other is not first and eps.calls > calls + 4
    calls = eps.calls
    reference_solution(flow, noise, cache=False)
    assert eps.calls > calls


def test_a_given_reference_is_used_and_survives_a_file_round_trip(tmp_path):
    g = _gaussian()
    eps = CountingEps(g)
    flow = ProbabilityFlow.from_sigma_field(eps, g.schedule)
    noise = _noise()
    ref = reference_solution(g.flow(), noise, rtol=1e-7, atol=1e-7)
    path = ref.save(tmp_path / "ref.safetensors", key="gaussian|seed 0")
    loaded = Reference.load(path, key="gaussian|seed 0")
    assert loaded == Reference(loaded.x, ref.sigma_start, ref.sigma_end, ref.solver, ref.rtol, ref.atol, ref.nfe,
                               ref.wall_time, ref.error, ref.error_nfe)
    assert ref.error_nfe > 0  # the looser solve that checks the reference is counted
    assert torch.equal(loaded.x, ref.x)
    assert Reference.load(path, key="another model") is None
    result = compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[5], reference=loaded)
    assert eps.calls == 5  # the runs only: no reference solve
    assert result.reference is loaded
    with pytest.raises(ValueError, match="shape"):
        compare(flow, _noise(2), solvers=["euler"], grids=["trailing"], nfe=[5], reference=loaded)
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not a flowdiff reference"):
        Reference.load(other)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:  # a file written before error_nfe was recorded still reads
        meta = {k: v for k, v in fh.metadata().items() if k != "error_nfe"}
    old = tmp_path / "old.safetensors"
    save_file({"x": ref.x.contiguous()}, str(old), metadata={**meta, "format": "flowdiff.Reference/2"})
    read = Reference.load(old)
    assert read == Reference(read.x, ref.sigma_start, ref.sigma_end, ref.solver, ref.rtol, ref.atol, ref.nfe,
                             ref.wall_time, ref.error, 0) and torch.equal(read.x, ref.x)


def test_a_float32_network_is_solved_in_float64_for_the_reference():
    g = _gaussian()
    seen = []

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float32))

        def forward(self, x_t, t):
            seen.append((x_t.dtype, self.scale.dtype))
            return g(x_t, t) * self.scale

    flow = ProbabilityFlow(Net(), g.schedule)
    ref = reference_solution(flow, _noise(1).float())
    assert ref.x.dtype == torch.float64
    assert set(seen) == {(torch.float64, torch.float64)}
    assert flow.model.scale.dtype == torch.float32  # the caller's network is left as it was


def test_nfe_used_is_the_counted_cost_of_the_steps_and_the_budget_for_one_evaluation_solvers():
    g = _gaussian()
    names = ["euler", "heun", "rk4", "midpoint", *[s for s in ("lms", "dpmpp_2m") if s in solvers.available()]]
    budgets = [1, 3, 8, 13]
    result = compare(g.flow(), _noise(2), solvers=names, grids=["trailing", "karras"], nfe=budgets)
    assert {(r.solver, r.grid, r.budget) for r in result.runs} | \
        {(s.solver, s.grid, s.budget) for s in result.skipped} == \
        {(s, gr, b) for s in names for gr in ("trailing", "karras") for b in budgets}
    for run in result.runs:
        assert run.nfe <= run.budget
        assert run.nfe == solvers.nfe_for_steps(run.solver, run.steps, eval_end=False)
        assert solvers.nfe_for_steps(run.solver, run.steps + 1, eval_end=False) > run.budget  # the largest fit
        one_eval = all(solvers.nfe_for_steps(run.solver, k, eval_end=False) == k for k in (1, 2, 5))
        if one_eval:
            assert run.nfe == run.budget
    # midpoint never evaluates σ = 0, so one step costs 2: a budget of 1 is skipped, not run over budget
    assert {(s.solver, s.budget) for s in result.skipped} == {("midpoint", 1)}


def test_a_grid_without_that_step_count_is_skipped_with_its_reason():
    g = _gaussian()  # T = 1000 trained timesteps: the quadratic grid repeats timesteps past ~200 steps
    result = compare(g.flow(), _noise(1), solvers=["euler"], grids=["quadratic", "trailing"], nfe=[10, 500])
    assert {(r.grid, r.budget) for r in result.runs} == {("quadratic", 10), ("trailing", 10), ("trailing", 500)}
    (skip,) = result.skipped
    assert (skip.solver, skip.grid, skip.budget) == ("euler", "quadratic", 500)
    assert "repeats timesteps" in skip.reason


def test_errors_fall_with_nfe_at_first_order_for_euler(device):
    g = _gaussian()
    budgets = [10, 20, 40, 80, 160]
    result = compare(g.flow(), _noise().to(device), solvers=["euler"], grids=["trailing"], nfe=budgets)
    assert result.reference.x.device == torch.device(device)
    errors = [r.rms_error for r in sorted(result.runs, key=lambda r: r.nfe)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    slope = np.polyfit(np.log(budgets), np.log(errors), 1)[0]
    assert -1.3 < slope < -0.7
    assert all(r.max_error >= r.rms_error for r in result.runs)


def test_markdown_csv_and_plot_render_every_run(tmp_path):
    g = _gaussian()
    result = compare(g.flow(), _noise(2), solvers=["euler", "heun", "midpoint"], grids=["trailing", "logsnr"],
                     nfe=[1, 6, 12])
    wide = result.to_markdown().strip().splitlines()
    assert wide[0] == "| solver | grid | NFE 1 | NFE 6 | NFE 12 |"
    assert len(wide) == 2 + 6  # header, rule, one row per solver and grid
    for budget in (1, 6, 12):
        best = result.best(budget)
        assert best.rms_error == min(r.rms_error for r in result.runs if r.budget == budget)
    assert sum(line.count("**") for line in wide) == 2 * 3  # one bold best per budget
    assert any("—" in line for line in wide if line.startswith("| midpoint"))  # skipped at NFE 1
    long = result.to_markdown("long").strip().splitlines()
    assert len(long) == 2 + len(result.runs)
    rows = list(csv.DictReader(io.StringIO(result.to_csv())))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert [(r["solver"], r["grid"], int(r["budget"]), int(r["nfe"]), float(r["rms_error"])) for r in rows] == \
        [(r.solver, r.grid, r.budget, r.nfe, r.rms_error) for r in result.runs]
    path = result.plot(tmp_path / "sub" / "plot.png", title="gaussian")
    from PIL import Image

    with Image.open(path) as img:
        assert img.format == "PNG" and img.width > 100 and img.height > 100
    with pytest.raises(ValueError, match="layout"):
        result.to_markdown("tall")
    with pytest.raises(ValueError, match="budget"):
        result.best(7)


def test_progress_reports_the_reference_and_every_run():
    g = _gaussian()
    labels = []
    compare(g.flow(), _noise(1), solvers=["euler", "heun"], grids=["trailing"], nfe=[4, 8], progress=labels.append)
    assert labels == ["reference", "euler/trailing/NFE 4", "euler/trailing/NFE 8", "heun/trailing/NFE 4",
                      "heun/trailing/NFE 8"]


def test_default_solvers_are_euler_heun_and_the_registered_multistep_methods():
    names = default_solvers()
    assert names[:2] == ["euler", "heun"]
    assert set(names[2:]) == set(solvers.available(multistep=True)) - {"euler", "heun"}


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"solvers": ["nope"]}, ValueError, "unknown solver 'nope'.*accepted"),
    ({"solvers": []}, ValueError, "solvers must name at least one"),
    ({"grids": ["wiggly"]}, ValueError, "unknown grid 'wiggly'"),
    ({"nfe": [0]}, ValueError, "positive ints"),
    ({"nfe": []}, ValueError, "at least one budget"),
    ({"rtol": 0.0}, ValueError, "rtol"),
    ({"atol": 0.1}, ValueError, "atol"),
    ({"reference_solver": "euler"}, ValueError, "adaptive solver"),
    ({"progress": "yes"}, TypeError, "progress"),
])
def test_bad_arguments_are_named(kwargs, error, match):
    args = {"solvers": ["euler"], "grids": ["trailing"], "nfe": [2], **kwargs}
    with pytest.raises(error, match=match):
        compare(_gaussian().flow(), _noise(1), **args)


def test_flow_and_noise_types_are_checked():
    with pytest.raises(TypeError, match="flow"):
        compare(object(), _noise(1))
    with pytest.raises(TypeError, match="noise"):
        compare(_gaussian().flow(), np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="sigma_start"):
        reference_solution(_gaussian().flow(), _noise(1), sigma_start=-1.0)
    with pytest.raises(ValueError, match="sigma_end"):
        reference_solution(_gaussian().flow(), _noise(1), sigma_start=1.0, sigma_end=2.0)


def test_comparison_of_nothing_has_no_best():
    result = Comparison([], reference=None, skipped=[])
    with pytest.raises(ValueError, match="no run"):
        result.best(10)
