"""Low-NFE solvers: the order of each formula, the data-variables change of variables, NFE counts."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff.engine.formulations import Data, data_field, finish_at_zero, variables_of
from flowdiff.engine.loop import solve_grid
from flowdiff.models.analytic import Gaussian
from solvers import History

#: name, options, formula order, interpolation in log time
MULTISTEP = [
    ("lms", {"order": 1}, 1), ("lms", {"order": 2}, 2), ("lms", {"order": 3}, 3), ("lms", {}, 4),
    ("abm", {"order": 1}, 2), ("abm", {"order": 2}, 3), ("abm", {}, 4),
    ("dpmpp_2m", {}, 2), ("dpmpp_3m", {}, 3),
    ("unipc", {"order": 1}, 2), ("unipc", {}, 3), ("unipc", {"order": 3}, 4),
]


def _problem():
    """dy/dt = c·y·cos t, y = exp(c·sin t) for three rates c: smooth, non-linear in t, on
    t ∈ [1, 2] (log t defined); several rates so that no error constant vanishes for all."""
    rates = torch.tensor([1.0, -0.7, 1.6], dtype=torch.float64)

    def f(t, y):
        return rates * y * math.cos(t)

    def exact(t):
        return torch.exp(rates * math.sin(t))

    return f, exact


def _seeded_error(name, options, n, t0=1.0, t1=2.0, grid="uniform"):
    """Global error of n steps with the history seeded by exact past derivatives (so that the
    order of the formula, not of the self-starting first steps, is measured)."""
    f, exact = _problem()
    if grid == "uniform":
        ts = np.linspace(t0, t1, n + 1)
    else:  # geometric: a variable step ratio every step
        ts = t0 * (t1 / t0) ** (np.linspace(0, 1, n + 1) ** 1.3)
    h0 = ts[1] - ts[0]
    past = tuple((t0 - j * h0, f(t0 - j * h0, exact(t0 - j * h0))) for j in range(1, 5))
    state = History.of(t0, f(t0, exact(t0)), past)
    sol = solvers.solve(f, exact(t0), ts, solvers.get(name, **options), state=state)
    return float((sol.y - exact(t1)).abs().max())


@pytest.mark.parametrize("name,options,order", MULTISTEP, ids=lambda v: str(v))
@pytest.mark.parametrize("grid", ["uniform", "variable"])
def test_formula_order_by_slope_fit(name, options, order, grid):
    assert solvers.get(name, **options).order == order
    ns = [128, 256, 512]  # asymptotic range: far from rounding, past pre-asymptotic overshoot
    errs = [_seeded_error(name, options, n, grid=grid) for n in ns]
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.35, (name, options, slope, errs)


def test_ipndm_order_on_uniform_grids():
    # iPNDM uses equal-step coefficients: its order holds on uniform grids.
    for order in (1, 2, 3, 4):
        ns = [128, 256, 512]  # asymptotic range: far from rounding, past pre-asymptotic overshoot
        errs = [_seeded_error("ipndm", {"order": order}, n) for n in ns]
        slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
        assert abs(slope - order) < 0.35, (order, slope, errs)


def test_adams_weights_integrate_polynomials_exactly():
    nodes = [1.0, 0.7, 0.45, 0.3]
    for degree in range(4):
        w = solvers.adams_weights(nodes, 1.0, 1.6)
        exact = (1.6 ** (degree + 1) - 1.0) / (degree + 1)
        assert sum(wj * t**degree for wj, t in zip(w, nodes)) == pytest.approx(exact, rel=1e-13)
    # In log time: polynomials in log t against dt, e.g. ∫ log t dt = t log t − t.
    w = solvers.adams_weights([1.0, 0.5], 1.0, 3.0, log_time=True)
    exact = (3 * math.log(3) - 3) - (0 - 1)
    assert sum(wj * math.log(t) for wj, t in zip(w, [1.0, 0.5])) == pytest.approx(exact, rel=1e-13)


def test_log_time_methods_are_exact_for_exponential_data_prediction():
    # dy/dρ = D with D constant in λ = log ρ: every log-time Adams method is exact in one step.
    def f(rho, y):
        return torch.full_like(y, 2.0)

    y0 = torch.zeros(2, dtype=torch.float64)
    for name in ("dpmpp_2m", "dpmpp_3m", "unipc"):
        sol = solvers.solve(f, y0, [0.5, 1.0, 3.0, 10.0], name)
        assert torch.allclose(sol.y, torch.full_like(y0, 2.0 * 9.5), rtol=1e-13), name


def _gaussian():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(16, dtype=torch.float64, generator=g) * 0.5
    var = torch.rand(16, dtype=torch.float64, generator=g) * 0.5 + 0.05
    return Gaussian(mean, var), g


@pytest.mark.parametrize("name,options,order", [("dpmpp_2m", {}, 2), ("unipc", {"order": 2}, 3)])
def test_data_variables_on_the_gaussian_converge_at_order(name, options, order):
    """Through flowdiff's change of variables, on the exact Gaussian flow between σ = 20 and 0.5."""
    gauss, g = _gaussian()
    eps = gauss.flow().field()
    x20 = torch.randn(3, 16, dtype=torch.float64, generator=g) * math.sqrt(1 + 20.0**2)
    exact = gauss.solution(x20, 20.0, 0.5)
    errs, ns = [], [16, 32, 64, 128]
    for n in ns:
        sig = np.exp(np.linspace(math.log(20.0), math.log(0.5), n + 1)).tolist()
        sol = solve_grid(eps, Data(), sig, solvers.get(name, **options), xbar0=x20)
        errs.append(float((sol.xbar - exact).abs().max()))
    slope = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert abs(slope - order) < 0.35, (name, slope, errs)


def test_data_field_is_the_denoiser_in_rho():
    gauss, g = _gaussian()
    eps = gauss.flow().field()
    xbar = torch.randn(2, 16, dtype=torch.float64, generator=g)
    sigma = 0.7
    d = data_field(eps)(1.0 / sigma, xbar / sigma)
    assert torch.allclose(d, gauss.denoised(xbar, sigma), rtol=1e-14)


@pytest.mark.parametrize("name", ["lms", "ipndm", "dpmpp_2m", "dpmpp_3m", "unipc", "abm"])
@pytest.mark.parametrize("nfe", [1, 2, 5, 10, 20])
def test_generate_spends_exactly_the_budget(name, nfe):
    gauss, g = _gaussian()
    calls = []
    eps = gauss.eps

    def counted(xbar, sigma):
        calls.append(sigma)
        return eps(xbar, sigma)

    flow = flowdiff.ProbabilityFlow.from_sigma_field(counted, gauss.schedule)
    noise = torch.randn(2, 16, dtype=torch.float64, generator=g)
    r = flowdiff.generate(flow, noise, solver=name, nfe=nfe, grid="logsnr")
    assert r.stats.nfe == len(calls) == nfe
    assert 0.0 not in calls or name in ("lms", "ipndm"), "data-variable methods never evaluate at σ = 0"


def test_dpmpp_2m_is_ddim_for_one_step_and_euler_in_data_variables_first():
    gauss, g = _gaussian()
    flow = gauss.flow()
    noise = torch.randn(2, 16, dtype=torch.float64, generator=g)
    for steps in (1, 2):
        sig = flowdiff.make_sigmas(flow.schedule, "logsnr", steps)
        a = flowdiff.generate(flow, noise, solver="dpmpp_2m", grid=sig).x
        b = flowdiff.generate(flow, noise, solver="euler", grid=sig).x
        if steps == 1:  # one step into σ = 0: x̄ = D = x̄ − σ ε, DDIM's step
            assert torch.allclose(a, b, rtol=1e-13, atol=1e-13)


def test_encode_decode_round_trip_in_data_variables():
    gauss, g = _gaussian()
    flow = gauss.flow()
    images = gauss.sample(3, generator=g)
    lat = flowdiff.encode(flow, images, solver="dpmpp_3m", steps=200, grid="logsnr")
    exact = gauss.solution(images, 0.0, flow.schedule.sigma_max) / math.sqrt(1 + flow.schedule.sigma_max**2)
    assert float((lat.x - exact).abs().max()) < 1e-2
    back = flowdiff.decode(flow, lat.latent)
    assert float((back.x - images).abs().max()) < 1e-2
    assert lat.stats.nfe == 200 and back.stats.nfe == 200


def test_multistep_capabilities_are_visible():
    assert {"lms", "ipndm", "abm", "dpmpp_2m", "dpmpp_3m", "unipc"} <= set(solvers.available(multistep=True))
    assert {"abm", "unipc"} <= set(solvers.available(adaptive=True))
    assert variables_of(solvers.get("dpmpp_2m")) == "data"
    assert variables_of(solvers.get("lms")) == "sigma"


def test_bad_orders_are_rejected_with_the_accepted_range():
    for name in ("lms", "ipndm", "abm", "unipc"):
        with pytest.raises(ValueError, match="order must be an int in 1..4"):
            solvers.get(name, order=5)
    with pytest.raises(ValueError, match=r"order must be 2 \(DPM-Solver\+\+\(2M\)\) or 1"):
        solvers.get("dpmpp_2m", order=3)  # its own order or DPM-Solver++(1), diffusers' solver_order=1
    with pytest.raises(TypeError, match="unknown option"):
        solvers.get("dpmpp_3m", order=2)


def test_finish_at_zero_is_second_order_and_fourth_with_extrapolation():
    gauss, g = _gaussian()
    eps = gauss.flow().field()
    x1 = torch.randn(2, 16, dtype=torch.float64, generator=g) * math.sqrt(1 + 1.0)
    x0 = gauss.solution(x1, 1.0, 0.0)
    plain, extrap, sig = [], [], [0.08, 0.04, 0.02, 0.01]
    for s in sig:
        xs, xs2 = gauss.solution(x0, 0.0, s), gauss.solution(x0, 0.0, 2 * s)
        d2 = gauss.denoised(xs2, 2 * s)
        state = History.of(1.0 / s, gauss.denoised(xs, s), ((1.0 / (2 * s), d2),))
        out, spent = finish_at_zero(None, s, xs, eps)
        assert spent == 1
        plain.append(float((out - x0).abs().max()))
        out, spent = finish_at_zero(state, s, xs, eps, extrapolate=True)
        assert spent == 0
        extrap.append(float((out - x0).abs().max()))
    assert abs(np.polyfit(np.log(sig), np.log(plain), 1)[0] - 2) < 0.2, plain
    assert abs(np.polyfit(np.log(sig), np.log(extrap), 1)[0] - 4) < 0.3, extrap


def _diffusers_loop(scheduler, gauss, noise, steps):
    scheduler.alphas_cumprod = torch.tensor(gauss.schedule.alphas_cumprod)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(x, t)
        eps = gauss(inp, torch.full((noise.shape[0],), float(t), dtype=torch.float64))
        x = scheduler.step(eps, t, x).prev_sample
    return x, scheduler.sigmas.double().numpy()


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmpp_2m_and_lms_equal_diffusers_schedulers(steps):
    """The same methods as diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2) and
    LMSDiscreteScheduler on their own σ grids. diffusers keeps σ in float32 (agreement ~1e-7), and
    its LMS coefficients come from scipy's quad at epsrel = 1e-4 (ours are exact: agreement ~1e-5)."""
    diffusers = pytest.importorskip("diffusers")
    gauss, g = _gaussian()
    flow = flowdiff.ProbabilityFlow(gauss, gauss.schedule)  # through the timestep, as a trained model
    noise = torch.randn(3, 16, dtype=torch.float64, generator=g)
    config = dict(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    dpm = diffusers.DPMSolverMultistepScheduler(**config, algorithm_type="dpmsolver++", solver_order=2,
                                                final_sigmas_type="zero", timestep_spacing="trailing")
    lms = diffusers.LMSDiscreteScheduler(**config, timestep_spacing="trailing")
    for name, scheduler, rel in (("dpmpp_2m", dpm, 2e-6), ("lms", lms, 1e-4)):
        x, sig = _diffusers_loop(scheduler, gauss, noise, steps)
        ours = flowdiff.generate(flow, noise, solver=name, grid=sig).x
        assert float((ours - x).abs().max()) < rel * float(x.abs().max()), name
