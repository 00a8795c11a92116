"""Issue 22's last two pieces: the likelihood's variables come from the engine's one chooser, and one
place (``flowdiff.engine.grids.reversed_grid``) turns a σ grid around for every decode."""

import math

import numpy as np
import pytest
import torch

import flowdiff
import solvers
from flowdiff import Adaptive, Trace
from flowdiff.engine import formulations
from flowdiff.engine.formulations import VP, Data, LogSigma, Sigma, formulation_for
from flowdiff.engine.grids import reversed_grid
from flowdiff.engine.options import Grid
from flowdiff.engine.plugins import decodes_with
from flowdiff.models.analytic import Gaussian
from flowdiff.tools import likelihood
from flowdiff.tools.likelihood import log_likelihood


def _gaussian() -> Gaussian:
    return Gaussian(torch.tensor([0.3, -0.2, 0.1, 0.0, 0.5]), torch.tensor([0.5, 1.0, 0.05, 0.2, 0.8]))


# -- the formulation's pieces an augmented solve uses ------------------------------------------------------------

FORMS = [Sigma(), LogSigma(0.0), LogSigma(0.02), Data(), VP()]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"{f.name}{getattr(f, 'c', '')}")
@pytest.mark.parametrize("sigma", [0.05, 0.7, 3.0, 40.0])
def test_dsigma_dt_is_the_derivative_of_the_time_to_sigma_map(form, sigma):
    t = form.time(sigma)
    h = 1e-6 * max(1.0, abs(t))
    numeric = (form.sigma(t + h) - form.sigma(t - h)) / (2 * h)
    assert form.dsigma_dt(t) == pytest.approx(numeric, rel=1e-6)


@pytest.mark.parametrize("form", [Sigma(), LogSigma(0.0), LogSigma(0.02)], ids=lambda f: f.name)
def test_augmented_field_is_the_sigma_field_times_dsigma_dt(form):
    calls = []

    def sigma_field(sigma, y):
        calls.append(sigma)
        return torch.cat([y * sigma, torch.full((y.shape[0], 1), math.cos(sigma), dtype=y.dtype)], 1)

    y = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = form.times([2.5])[0]
    out = form.augmented_field(sigma_field)(t, y)
    assert calls[-1] == 2.5  # the grid point's own σ
    assert out.shape == (3, 5) and torch.equal(out, sigma_field(2.5, y) * form.dsigma_dt(t))


@pytest.mark.parametrize("form", [Data(), VP()], ids=lambda f: f.name)
def test_variables_that_rescale_the_state_refuse_an_augmented_field(form):
    with pytest.raises(ValueError, match=f"the {form.name!r} variables rescale it"):
        form.augmented_field(lambda sigma, y: y)


def test_uniform_grid_has_equal_steps_in_its_time_and_its_ends_map_back_exactly():
    form = LogSigma(0.002)
    s_max = 157.40723
    grid = form.uniform_grid(0.0, s_max, 7, solvers.get("rk4"))
    ts = np.asarray(grid.ts)
    assert len(ts) == 8 and ts[0] == math.log(0.002) and ts[-1] == math.log(s_max + 0.002)
    np.testing.assert_allclose(np.diff(ts), (ts[-1] - ts[0]) / 7, rtol=1e-12)
    assert form.sigma(ts[0]) == 0.0 and form.sigma(ts[-1]) == s_max
    assert not grid.methods  # rk4 has no final method of its own; nothing else is changed
    with pytest.raises(ValueError, match="needs both ends at finite times.*1/σ"):
        Data().uniform_grid(0.0, 10.0, 4, solvers.get("rk4"))
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        form.uniform_grid(0.0, s_max, 0, solvers.get("rk4"))


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "rk4", "heun", "ipndm", "lms", "reversible_heun"])
@pytest.mark.parametrize("adaptive", [True, False])
def test_an_augmented_solve_runs_in_log_sigma_plus_c_whatever_the_solver_would_encode_in(solver, adaptive):
    # ipndm is refused for a plain encode and lms/reversible_heun encode in other variables; an augmented solve's
    # grid is uniform in τ and its state must stay x̄, so every σ-variable solver gets LogSigma(c)
    form = formulation_for(solvers.get(solver), "encode", adaptive=adaptive, sigma_c=0.01, augmented=True)
    assert isinstance(form, LogSigma) and form.c == 0.01 and form.state_is_xbar


@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_an_augmented_solve_refuses_data_variable_solvers(solver):
    with pytest.raises(ValueError, match=f"solver '{solver}' runs in the flow's 'data' variables"):
        formulation_for(solvers.get(solver), "encode", sigma_c=0.01, augmented=True)


def test_an_augmented_solve_needs_its_c():
    with pytest.raises(ValueError, match="needs sigma_c"):
        formulation_for(solvers.get("dopri5"), "encode", adaptive=True, augmented=True)


# -- log_likelihood through the engine ---------------------------------------------------------------------------

def test_log_likelihood_asks_the_one_chooser(monkeypatch):
    calls = []

    def spy(solver, direction, **options):
        form = formulations.formulation_for(solver, direction, **options)
        calls.append((solver.name, direction, options, form.name))
        return form

    monkeypatch.setattr(likelihood, "formulation_for", spy)
    g = _gaussian()
    x = g.sample(2, torch.Generator().manual_seed(0))
    log_likelihood(g.flow(), x, solve_check=False)
    log_likelihood(g.flow(), x, adaptive=Adaptive(1e-4, 1e-4, sigma_c=0.05), solve_check=False)
    log_likelihood(g.flow(), x, solver="rk4", steps=3, solve_check=False)
    c = float(g.schedule.sigma_min)
    assert calls == [
        ("dopri5", "encode", {"adaptive": True, "sigma_c": c, "augmented": True}, "logsigma"),
        ("dopri5", "encode", {"adaptive": True, "sigma_c": 0.05, "augmented": True}, "logsigma"),
        ("rk4", "encode", {"adaptive": False, "sigma_c": c, "augmented": True}, "logsigma"),
    ]


@pytest.mark.parametrize("solver,steps", [("rk4", 12), ("heun", 20), ("ipndm", 16)])
def test_fixed_grid_likelihood_equals_an_independent_solve_on_a_closed_form_gaussian(solver, steps):
    """The route through the engine's formulation against a solve written out here: τ = log(σ + c) uniform,
    the field (σ + c)·[ε, div ε] with the Gaussian's closed-form ε and divergence Σᵢ σ/(vᵢ + σ²), its prior
    N(μ, v + σ_max²). Same log-density up to rounding, same NFE; and twice the steps come nearer the Gaussian's
    exact log-density."""
    g = _gaussian()
    x = g.sample(4, torch.Generator().manual_seed(1))
    r = log_likelihood(g.flow(), x, solver=solver, steps=steps, estimator=Trace("exact"), solve_check=False,
                       data_mean=g.mean, data_var=g.evals)

    c, s_max = float(g.schedule.sigma_min), float(g.schedule.sigma_max)
    dim = x.shape[1]
    taus = np.linspace(math.log(c), math.log(s_max + c), steps + 1)

    def field(tau, y):
        sigma = 0.0 if tau <= taus[0] else s_max if tau == taus[-1] else math.exp(tau) - c
        eps = g.eps(y[:, :dim], sigma)
        div = (sigma / (g.evals + sigma * sigma)).sum().expand(y.shape[0], 1)
        return torch.cat([eps, div], 1) * (sigma + c)

    y0 = torch.cat([x, x.new_zeros(x.shape[0], 1)], 1)
    sol = solvers.solve(field, y0, taus, solver)
    var = g.evals + s_max * s_max
    prior = -0.5 * (((sol.y[:, :dim] - g.mean) ** 2 / var).sum(1) + torch.log(2 * math.pi * var).sum())
    independent = prior + sol.y[:, dim]

    torch.testing.assert_close(r.log_prob, independent, rtol=0, atol=1e-11)
    assert r.stats.nfe == sol.stats.nfe == solvers.nfe_for_steps(solvers.get(solver), steps)
    exact = g.log_prob(x, 0.0)
    finer = log_likelihood(g.flow(), x, solver=solver, steps=2 * steps, estimator=Trace("exact"), solve_check=False,
                           data_mean=g.mean, data_var=g.evals)
    assert float((finer.log_prob - exact).abs().max()) < float((r.log_prob - exact).abs().max()) / 2


def test_adaptive_likelihood_reaches_the_closed_form_density_with_the_engines_time():
    g = _gaussian()
    x = g.sample(3, torch.Generator().manual_seed(2))
    r = log_likelihood(g.flow(), x, adaptive=Adaptive(1e-7, 1e-7), estimator=Trace("exact"), solve_check=False,
                       data_mean=g.mean, data_var=g.evals)
    assert float((r.log_prob - g.log_prob(x, 0.0)).abs().max()) < 1e-5


# -- one place turns a grid around -------------------------------------------------------------------------------

def test_reversed_grid_is_a_fresh_float64_array_and_an_involution():
    gen = np.array([80.0, 5.0, 0.3, 0.0], dtype=np.float32)
    enc = reversed_grid(gen)
    assert enc.dtype == np.float64 and enc.tolist() == [0.0, 0.30000001192092896, 5.0, 80.0]
    enc[0] = 9.0
    assert gen[-1] == 0.0  # not a view
    assert np.array_equal(reversed_grid(reversed_grid([3.0, 1.0, 0.0])), [3.0, 1.0, 0.0])
    with pytest.raises(ValueError, match=r"sigmas must be a 1-D σ grid, got shape \(2, 2\)"):
        reversed_grid(np.zeros((2, 2)))


@pytest.mark.parametrize("solver", ["euler", "heun", "rk4", "dpmpp_2m", "unipc"])
def test_the_encode_grid_is_the_generation_grid_reversed(solver):
    g = _gaussian()
    flow, s = g.flow(), solvers.get(solver)
    x = g.sample(2, torch.Generator().manual_seed(3))
    final_euler = not formulations.encode_evaluates_end(s)
    enc = Grid(steps=6).solve_sigmas(flow, s, "encode")
    assert np.array_equal(enc, reversed_grid(Grid(steps=6).generation_sigmas(flow, s, final_euler=final_euler)))
    assert np.array_equal(flowdiff.encode(flow, x, solver=solver, steps=6).latent.sigmas, enc)


ENCODES = {
    "euler": dict(solver="euler", steps=6),
    "heun": dict(solver="heun", steps=5),
    "rk4_karras": dict(solver="rk4", steps=4, grid="karras"),
    "ddim_inverse": dict(solver="ddim_inverse", steps=6),
    "fixed_point_heun": dict(solver=flowdiff.Inversion("fixed_point", solver="heun"), steps=4),
    "fixed_point_euler": dict(solver=flowdiff.Inversion("fixed_point"), steps=5),
}


@pytest.mark.parametrize("kind", ENCODES)
def test_decode_is_generate_on_the_reversed_grid_bit_for_bit(kind):
    g = _gaussian()
    flow = g.flow()
    x = g.sample(3, torch.Generator().manual_seed(4))
    latent = flowdiff.encode(flow, x, **ENCODES[kind]).latent
    own = decodes_with(latent.solver)  # ddim_inverse decodes with euler
    dec = flowdiff.decode(flow, latent)
    gen = flowdiff.generate(flow, latent.x, solver=own, grid=reversed_grid(latent.sigmas))
    assert torch.equal(dec.x, gen.x) and dec.stats.nfe == gen.stats.nfe
    assert np.array_equal(dec.sigmas, reversed_grid(latent.sigmas)) and np.array_equal(dec.sigmas, gen.sigmas)


@pytest.mark.parametrize("solver,grid", [("dpmpp_2m", "trailing"), ("dpmpp_3m", "leading"), ("unipc", "trailing"),
                                         ("lms", "karras"), ("reversible_heun", "trailing")])
def test_a_latent_decodes_along_its_grid_reversed_and_either_order_says_so(solver, grid):
    # multistep methods decode in the Data variables with the encode's reach (not generate's steps), and a
    # reversible latent by the exact inverse: their decode still runs the latent's grid reversed, step by step
    g = _gaussian()
    flow = g.flow()
    x = g.sample(3, torch.Generator().manual_seed(5))
    latent = flowdiff.encode(flow, x, solver=solver, steps=7, grid=grid).latent
    seen = []
    dec = flowdiff.decode(flow, latent, callback=lambda st: seen.append(st.sigma))
    back = reversed_grid(latent.sigmas)
    assert np.array_equal(dec.sigmas, back) and seen == back[1:].tolist()
    for given in (back, latent.sigmas):
        assert torch.equal(flowdiff.decode(flow, latent, grid=given).x, dec.x)
    if solver == "reversible_heun":
        torch.testing.assert_close(dec.x, x, rtol=0, atol=1e-12)
