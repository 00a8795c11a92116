"""compare on a flow-matching flow measures every row against the exact solution for the noise, from t = 1.

New-user sweep 16 found that ``flowdiff.compare`` solved its reference from the schedule's σ_max (2997 with shift 3),
reading the noise as x̄ = noise·√(1+σ_max²) there, while diffusers' FlowMatch samplers start from the noise at t = 1
(σ = ∞): a peer's row was its distance to another solution (FlowMatch Heun at 199 NFE read 2.0e-4 where it is 1.66e-4
from the solution it solves). The reference now starts at t = 1 with the boundary step out of pure noise
(:meth:`flowdiff.ProbabilityFlow.step_from_noise`) and the adaptive solve; flowdiff's own rows still start where
``generate(grid=...)`` does, at σ_max, and carry that start's error.

The model is the exact rectified-flow velocity of Gaussian data N(μ, Σ) (per-pixel means and variances), so the
solution from t = 1 is known in closed form: x̄(σ) = μ + √(Σ + σ²)·noise.
"""

import math
import warnings

import pytest
import torch

import flowdiff
from flowdiff.engine.options import Grid
from flowdiff.models.analytic import Gaussian
from flowdiff.tools import peers
from flowdiff.tools.reference import FLOW_MATCHING_BOUNDARY_SIGMA, clear_reference_cache, last_finite_sigma

pytest.importorskip("diffusers")

SCHEDULE = flowdiff.FlowMatchingSchedule(1000, shift=3.0)  # SD3's: σ_max = 2997
MEAN = torch.linspace(-0.6, 0.6, 16, dtype=torch.float64).reshape(1, 4, 4)
VAR = torch.linspace(0.05, 0.5, 16, dtype=torch.float64).reshape(1, 4, 4)
TOL = 1e-9  # the reference's rtol = atol (compare's default)


class GaussianVelocity:
    """v = E[ε − x₀ | x_t] of N(MEAN, VAR) data as ``model(x, t)`` (T·t fed, x = x̄/(1+σ)): (1+σ)·ε̂ − x̄ from the
    closed-form ε̂, and x − MEAN at t = 1 (pure noise: x = ε, E[x₀] = MEAN). Counts its calls."""

    def __init__(self) -> None:
        self.gaussian = Gaussian(MEAN, VAR, SCHEDULE)
        self.calls = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        tau = float(t.reshape(-1)[0]) / SCHEDULE.train_steps
        if tau >= 1.0:
            return x - MEAN.to(x)
        sigma = tau / (1.0 - tau)
        xbar = x.double() * (1.0 + sigma)
        return ((1.0 + sigma) * self.gaussian.eps(xbar, sigma) - xbar).to(x.dtype)


def _flow() -> flowdiff.ProbabilityFlow:
    return flowdiff.ProbabilityFlow(GaussianVelocity(), SCHEDULE, prediction_type="velocity")


def _noise(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _exact(noise: torch.Tensor, sigma: float, *, start: float = math.inf) -> torch.Tensor:
    """x̄(σ) of the ODE from the noise: read as pure noise at t = 1 (σ = ∞), or as x̄ = noise·√(1+start²) at ``start``
    (where generate's grids read it)."""
    if start == math.inf:
        return MEAN + torch.sqrt(VAR + sigma**2) * noise
    xbar = noise * math.sqrt(1.0 + start**2)
    return MEAN + torch.sqrt((VAR + sigma**2) / (VAR + start**2)) * (xbar - MEAN)


def _compares_target(noise: torch.Tensor, **start: float) -> torch.Tensor:
    """compare's reference in closed form: the solution to σ_min, then the Euler step into σ = 0 (the denoised
    image there, MEAN + VAR/(VAR + σ²)·(x̄ − MEAN))."""
    s_min = SCHEDULE.sigma_min
    return MEAN + VAR / (VAR + s_min**2) * (_exact(noise, s_min, **start) - MEAN)


def _rms(x: torch.Tensor) -> float:
    return float(x.double().pow(2).mean().sqrt())


def test_the_reference_is_the_exact_solution_from_t_equal_1():
    flow, noise = _flow(), _noise()
    clear_reference_cache()
    ref = flowdiff.reference_solution(flow, noise, sigma_end=0.0, rtol=TOL, atol=TOL, cache=False)
    exact = _exact(noise, 0.0)
    assert _rms(ref.x - exact) <= TOL  # 3.3e-10 measured (6.5e-5 from σ_max, before)
    assert ref.sigma_start == math.inf
    assert last_finite_sigma(flow.schedule) == FLOW_MATCHING_BOUNDARY_SIGMA > flow.schedule.sigma_max
    assert _rms(ref.x - exact) <= 3 * ref.error  # its own estimate holds: the boundary step adds nothing visible
    # it is generate's boundary step out of pure noise (one evaluation, counted) and the adaptive solve from there
    landed = flow.step_from_noise(noise, FLOW_MATCHING_BOUNDARY_SIGMA)
    tight = flowdiff.generate(flow, landed, solver="dopri8",
                              adaptive=flowdiff.Adaptive(rtol=TOL, atol=TOL, sigma_start=FLOW_MATCHING_BOUNDARY_SIGMA))
    torch.testing.assert_close(ref.x, tight.x, rtol=0, atol=1e-12)
    assert ref.nfe == 1 + tight.stats.nfe
    # compare's default (to σ_min, then the Euler step into 0), also in closed form
    ref = flowdiff.reference_solution(flow, noise, rtol=TOL, atol=TOL, cache=False)
    assert ref.sigma_start == math.inf and _rms(ref.x - _compares_target(noise)) <= TOL
    # from σ_max (where generate's grids start) it is the other solution, which those grids converge to
    at_max = flowdiff.reference_solution(flow, noise, sigma_start=flow.schedule.sigma_max, sigma_end=0.0, rtol=TOL,
                                         atol=TOL, cache=False)
    start_error = _rms(_exact(noise, 0.0, start=flow.schedule.sigma_max) - exact)
    assert _rms(at_max.x - _exact(noise, 0.0, start=flow.schedule.sigma_max)) <= TOL
    assert start_error > 1e4 * TOL  # 6.5e-5: what compare measured the FlowMatch peers against before


def test_a_flowmatch_euler_peer_reads_its_distance_to_the_exact_solution():
    flow, noise = _flow(), _noise(seed=1)
    clear_reference_cache()
    budgets = [4, 25]
    result = flowdiff.compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=budgets, peers=["diffusers"],
                              keep_images=noise.shape[0])
    assert result.reference.sigma_start == math.inf
    target = _compares_target(noise)
    euler = [r for r in result.runs if r.source == "diffusers" and r.solver == "FlowMatch Euler"]
    assert {(r.grid, r.budget) for r in euler} >= {("linspace, shift 3", b) for b in budgets}
    for row in [r for r in result.runs if r.source == "diffusers"]:  # FlowMatch Euler, Heun, DPM++ 2M, UniPC on flow σ
        image = result.images[(row.source, row.solver, row.grid, row.budget)]
        assert abs(row.rms_error - _rms(image - target)) <= TOL, row
    # the peer's own loop, run apart: the same image, so the row is the distance of what it makes to the solution
    sampler = next(s for s in peers.default_samplers(["diffusers"], flow) if s.name == "FlowMatch Euler"
                   and s.grid == "linspace, shift 3")
    alone = peers.run(sampler, flow, noise, budgets[-1])
    assert alone.sigma_start == math.inf and alone.nfe == budgets[-1]
    row = next(r for r in euler if r.grid == "linspace, shift 3" and r.budget == budgets[-1])
    assert abs(row.rms_error - _rms(alone.x - target)) <= TOL
    assert abs(row.rms_error - _rms(alone.x - _compares_target(noise, start=flow.schedule.sigma_max))) > 1e-7


def test_flowdiffs_rows_still_start_where_generate_starts():
    flow, noise = _flow(), _noise(seed=2)
    clear_reference_cache()
    result = flowdiff.compare(flow, noise, solvers=["euler", "dpmpp_2m"], grids=["trailing", "karras"], nfe=[6, 40],
                              keep_images=noise.shape[0])
    target = _compares_target(noise)
    assert len(result.runs) == 8
    for row in result.runs:
        out = flowdiff.generate(flow, noise, solver=row.solver, grid=Grid(row.grid, nfe=row.budget))
        assert row.sigma_start == out.sigmas[0] == pytest.approx(flow.schedule.sigma_max, rel=1e-12)
        assert (row.nfe, row.steps) == (out.stats.nfe, out.stats.steps)
        assert torch.equal(result.images[("flowdiff", row.solver, row.grid, row.budget)], out.x)
        assert abs(row.rms_error - _rms(out.x - target)) <= TOL  # the start's error counted, as a user gets it


def test_a_flow_without_the_step_out_of_pure_noise_keeps_sigma_max():
    """A σ-native field has no t = 1 (its FlowMatch peers are left out): its reference starts at σ_max, as its grids
    do; asked for σ = ∞ it is refused before any evaluation, as is σ = ∞ where the noise is not pure noise there."""
    native = Gaussian(MEAN, VAR, SCHEDULE).flow()
    noise = _noise(2)
    ref = flowdiff.reference_solution(native, noise, rtol=1e-7, atol=1e-7, cache=False)
    assert ref.sigma_start == SCHEDULE.sigma_max
    with pytest.raises(ValueError, match=r"sigma_start=math.inf: .*σ-native field .*leave sigma_start out"):
        flowdiff.reference_solution(native, noise, sigma_start=math.inf, cache=False)
    calls = GaussianVelocity()
    epsilon = flowdiff.ProbabilityFlow(calls, SCHEDULE, prediction_type="epsilon")  # its output read as ε
    assert flowdiff.reference_solution(epsilon, noise, rtol=1e-3, atol=1e-3, cache=False).sigma_start == \
        SCHEDULE.sigma_max
    calls.calls = 0
    with pytest.raises(ValueError, match=r"sigma_start=math.inf: .*prediction_type 'epsilon'"):
        flowdiff.reference_solution(epsilon, noise, sigma_start=math.inf, cache=False)
    assert calls.calls == 0
    vp = Gaussian(torch.zeros(1, 4, 4), 0.5).flow()
    with pytest.raises(ValueError, match=r"sigma_start must be a finite number > 0, math.inf on a zero-terminal-SNR "
                                         r"or flow-matching schedule .*got inf"):
        flowdiff.reference_solution(vp, noise, sigma_start=math.inf, cache=False)


def test_a_given_reference_from_a_finite_sigma_is_said_beside_the_flowmatch_peers():
    """A reference from σ_max (given, or kept on disk by a flowdiff compare from before this change) is still taken,
    and a warning says that the FlowMatch peers, which start at t = 1, are measured against another solution."""
    flow, noise = _flow(), _noise(2, seed=3)
    at_max = flowdiff.reference_solution(flow, noise, sigma_start=SCHEDULE.sigma_max, rtol=1e-7, atol=1e-7)
    with pytest.warns(UserWarning, match=r"reference starts at σ=2997, and diffusers' FlowMatch Euler and FlowMatch "
                                         r"Heun start from the noise at t = 1 .*reference_solution\(flow, noise\)"):
        result = flowdiff.compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[4], peers=["diffusers"],
                                  reference=at_max)
    assert result.reference is at_max and any(r.solver == "FlowMatch Euler" for r in result.runs)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        flowdiff.compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[4], peers=["diffusers"],
                         reference=flowdiff.reference_solution(flow, noise, rtol=1e-7, atol=1e-7))
        flowdiff.compare(flow, noise, solvers=["euler"], grids=["trailing"], nfe=[4], reference=at_max)  # no peers
    assert not [w for w in seen if "t = 1" in str(w.message)]
